"""RefEval self-improvement: sample -> judge -> pairs -> logprobs -> train_dpo, per round.

Round k+1 samples from round k's model, which is also its reference model.
"""
from __future__ import annotations

from prefect import flow

from alignflow.config import SelfImproveConfig
from flows.report import publish_summary, run_summary
from tasks.base_model import base_model_task
from tasks.judge import judge_task
from tasks.logprobs import logprobs_task
from tasks.pairs import pairs_task
from tasks.prompts import prompt_source, prompts_task
from tasks.sample import sample_task
from tasks.stage import run_context
from tasks.train_dpo import train_dpo_task


@flow(name="self-improve")
def self_improve(config: SelfImproveConfig = SelfImproveConfig()) -> dict:
    ctx = run_context(config)
    prompts = prompts_task(ctx, prompt_source(config.prompts, config.limit_prompts))
    policy = base_model_task(config.model, ctx.model_cache)
    judge_model = base_model_task(config.judge.model, ctx.model_cache) if config.judge.model else None
    rounds = []
    for _ in range(config.rounds):
        candidates = sample_task(ctx, config.sample, policy=policy, prompts=prompts)
        judgments = judge_task(ctx, config.judge, judge_model=judge_model or policy, candidates=candidates)
        pairs = pairs_task(ctx, config.pairs, candidates=candidates, judgments=judgments)
        with_reference = logprobs_task(ctx, config.logprobs, reference=policy, pairs=pairs)
        policy = train_dpo_task(ctx, config.dpo, policy=policy, pairs=with_reference)
        rounds.append({"sample": candidates, "judge": judgments, "pairs": pairs,
                       "logprobs": with_reference, "train_dpo": policy})
    summary = run_summary(ctx.store(), prompts, rounds)
    publish_summary("self-improve", summary)
    return summary
