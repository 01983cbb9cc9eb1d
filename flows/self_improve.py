"""RefEval self-improvement: sample -> judge -> pairs -> logprobs -> train_dpo, per round.

Round k+1 samples from round k's model, which is also its reference model.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from prefect import flow

from alignflow.config import SelfImproveConfig
from alignflow.flows.report import publish_self_improve, self_improve_summary
from alignflow.storage.artifacts import ArtifactRef
from alignflow.tasks.base_model import base_model_task
from alignflow.tasks.judge import judge_task
from alignflow.tasks.logprobs import logprobs_task
from alignflow.tasks.pairs import pairs_task
from alignflow.tasks.prompts import prompt_source, prompts_task
from alignflow.tasks.sample import sample_task
from alignflow.tasks.stage import RELEASE_HOOKS, run_context
from alignflow.tasks.train_dpo import train_dpo_task
from alignflow.workers.hardware import resolve_dtypes


@dataclass(frozen=True)
class Steps:
    """How each stage is called: the flow calls Prefect tasks; bench/ calls the
    same stage functions directly to measure what Prefect adds."""

    prompts: Callable
    base_model: Callable
    sample: Callable
    judge: Callable
    pairs: Callable
    logprobs: Callable
    train_dpo: Callable


TASKS = Steps(prompts_task, base_model_task, sample_task, judge_task, pairs_task, logprobs_task, train_dpo_task)


def run_rounds(config: SelfImproveConfig, steps: Steps) -> tuple[ArtifactRef, list[dict[str, ArtifactRef]]]:
    """The prompts artifact and each round's artifacts, by stage."""
    config = resolve_dtypes(config)  # stage keys and manifests carry the dtype actually used
    ctx = run_context(config)
    prompts = steps.prompts(ctx, prompt_source(config.prompts, config.limit_prompts))
    policy = steps.base_model(config.model, ctx.model_cache)
    judge_model = steps.base_model(config.judge.model, ctx.model_cache) if config.judge.model else None
    rounds = []
    for _ in range(config.rounds):
        candidates = steps.sample(ctx, config.sample, policy=policy, prompts=prompts)
        judgments = steps.judge(ctx, config.judge, judge_model=judge_model or policy, candidates=candidates)
        pairs = steps.pairs(ctx, config.pairs, candidates=candidates, judgments=judgments)
        with_reference = steps.logprobs(ctx, config.logprobs, reference=policy, pairs=pairs)
        policy = steps.train_dpo(ctx, config.dpo, policy=policy, pairs=with_reference)
        rounds.append(
            {"sample": candidates, "judge": judgments, "pairs": pairs, "logprobs": with_reference, "train_dpo": policy}
        )
    return prompts, rounds


@flow(name="self-improve", **RELEASE_HOOKS)
def self_improve(config: SelfImproveConfig = SelfImproveConfig()) -> dict:
    prompts, rounds = run_rounds(config, TASKS)
    summary = self_improve_summary(run_context(config).store(), prompts, rounds)
    publish_self_improve(summary)
    return summary
