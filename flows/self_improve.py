"""RefEval self-improvement: sample -> judge -> pairs -> logprobs -> train_dpo, per round,
optionally after SFT on the references (train_ref_sft).

Round k+1 samples from round k's model, which is also its reference model. Validation
prompts, when given, go through the same stages each round; their pairs pick DPO's best
checkpoint and, with a list of betas, the beta.
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
from alignflow.tasks.stage import RELEASE_HOOKS, RunContext, run_context
from alignflow.tasks.train_dpo import train_dpo_task
from alignflow.tasks.train_ref_sft import TRAIN_REF_SFT, train_ref_sft_task
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
    train_ref_sft: Callable = TRAIN_REF_SFT.run  # optional stage: called directly where a caller leaves it out


TASKS = Steps(
    prompts_task,
    base_model_task,
    sample_task,
    judge_task,
    pairs_task,
    logprobs_task,
    train_dpo_task,
    train_ref_sft_task,
)


def run_rounds(config: SelfImproveConfig, steps: Steps) -> tuple[ArtifactRef, list[dict[str, ArtifactRef]]]:
    """The prompts artifact and each round's artifacts by name (round 1's with the SFT model's)."""
    config = resolve_dtypes(config)  # stage keys and manifests carry the dtype actually used
    ctx = run_context(config)
    prompts = steps.prompts(ctx, prompt_source(config.prompts, config.limit_prompts))
    held_out = validation_prompts(ctx, config, steps)
    policy = steps.base_model(config.model, ctx.model_cache)
    first = {}
    if config.sft.enabled:  # the SFT model is then the run's initial model: round 1's policy and reference
        policy = first["train_ref_sft"] = steps.train_ref_sft(
            ctx, config.sft, policy=policy, prompts=prompts, **held_out
        )
    # the judge: the initial model in every round, or a model of its own; None: each round's (drifting) policy
    by_role = {"initial": policy, "policy": None}
    judge_model = (
        by_role[config.judge.model]
        if config.judge.model in by_role
        else steps.base_model(config.judge.model, ctx.model_cache)
    )
    rounds = []
    for _ in range(config.rounds):
        judge = judge_model or policy
        refs = scored_pairs(ctx, config, steps, policy, judge, prompts)
        if held_out:
            validation = scored_pairs(ctx, config, steps, policy, judge, held_out["validation"])
            refs |= {f"validation_{stage}": ref for stage, ref in validation.items()}
        refs |= train_policy(ctx, config, steps, policy, refs["logprobs"], refs.get("validation_logprobs"))
        policy = refs["train_dpo"]
        rounds.append(first | refs)
        first = {}
    return prompts, rounds


def validation_prompts(ctx: RunContext, config: SelfImproveConfig, steps: Steps) -> dict[str, ArtifactRef]:
    """{"validation": the held-out prompts artifact}, or {} without validation_prompts."""
    if config.validation_prompts is None:
        return {}
    return {"validation": steps.prompts(ctx, prompt_source(config.validation_prompts, config.limit_validation_prompts))}


def scored_pairs(
    ctx: RunContext,
    config: SelfImproveConfig,
    steps: Steps,
    policy: ArtifactRef,
    judge: ArtifactRef,
    prompts: ArtifactRef,
) -> dict[str, ArtifactRef]:
    """sample -> judge -> pairs -> logprobs on ``prompts`` (training or validation), ``policy``
    sampling and giving the reference log-probs."""
    candidates = steps.sample(ctx, config.sample, policy=policy, prompts=prompts)
    judgments = steps.judge(ctx, config.judge, judge_model=judge, candidates=candidates)
    pairs = steps.pairs(ctx, config.pairs, candidates=candidates, judgments=judgments)
    with_reference = steps.logprobs(ctx, config.logprobs, reference=policy, pairs=pairs)
    return {"sample": candidates, "judge": judgments, "pairs": pairs, "logprobs": with_reference}


def train_policy(
    ctx: RunContext,
    config: SelfImproveConfig,
    steps: Steps,
    policy: ArtifactRef,
    pairs: ArtifactRef,
    validation: ArtifactRef | None,
) -> dict[str, ArtifactRef]:
    """train_dpo once per beta. One beta: {"train_dpo": its model}. A sweep: every run by its
    beta, and as "train_dpo" the one with the lowest validation loss."""
    held_out = {"validation": validation} if validation else {}
    runs = {
        dpo.beta: steps.train_dpo(ctx, dpo, policy=policy, pairs=pairs, **held_out) for dpo in config.dpo.trainings()
    }
    if len(runs) == 1:
        return {"train_dpo": runs[config.dpo.betas()[0]]}
    store = ctx.store()
    best = lowest_validation_loss({beta: store.manifest(ref.stage, ref.key)["metrics"] for beta, ref in runs.items()})
    return {**{f"train_dpo beta={beta}": ref for beta, ref in runs.items()}, "train_dpo": runs[best]}


def lowest_validation_loss(metrics_by_beta: dict[float, dict]) -> float:
    """The beta whose training ended with the lowest validation loss (its best checkpoint's:
    the loop keeps that one); a tie goes to the beta listed first."""
    for beta, metrics in metrics_by_beta.items():
        if metrics.get("eval_split") != "val":
            raise ValueError(
                f"train_dpo beta={beta}: no validation pairs to compare betas on; give validation_prompts, "
                "or more prompts or a larger dpo.val_fraction"
            )
    return min(metrics_by_beta, key=lambda beta: metrics_by_beta[beta]["after_loss"])


@flow(name="self-improve", **RELEASE_HOOKS)
def self_improve(config: SelfImproveConfig = SelfImproveConfig()) -> dict:
    prompts, rounds = run_rounds(config, TASKS)
    summary = self_improve_summary(run_context(config).store(), prompts, rounds)
    publish_self_improve(summary)
    return summary
