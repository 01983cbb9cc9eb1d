"""train_dpo: DPO (sigmoid, IPO or hinge) on precomputed reference log-probs,
on the shared training loop (tasks/training.py)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from alignflow.config import DPOConfig
from alignflow.storage.artifacts import ArtifactRef
from alignflow.tasks.stage import RunContext, Stage, stage_task
from alignflow.tasks.training import Objective, curves, fit, history_schema
from alignflow.workers.scoring import pack, response_logprob_sums


def dpo_losses(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta: float, kind: str = "sigmoid"):
    """Per-pair loss and the implicit rewards beta * (log pi - log pi_ref) of each side.
    z = (log pi(y_w) - log pi(y_l)) - (log pi_ref(y_w) - log pi_ref(y_l))."""
    z = (policy_chosen - policy_rejected) - (ref_chosen - ref_rejected)
    if kind == "sigmoid":
        losses = -F.logsigmoid(beta * z)
    elif kind == "ipo":
        losses = (z - 1.0 / (2.0 * beta)) ** 2
    elif kind == "hinge":
        losses = torch.relu(1.0 - beta * z)
    else:
        raise ValueError(f"unknown DPO loss '{kind}' (expected sigmoid, ipo or hinge)")
    return losses, beta * (policy_chosen - ref_chosen), beta * (policy_rejected - ref_rejected)


def dpo_objective(config: DPOConfig, pad_id: int) -> Objective:
    """Rows carry token ids and reference log-probs (the logprobs stage's layout)."""

    def batch_loss(model, rows: list[dict]):
        prompts = [r["prompt_ids"] for r in rows] * 2
        responses = [r["chosen_ids"] for r in rows] + [r["rejected_ids"] for r in rows]
        sums = response_logprob_sums(model, pack(prompts, responses, pad_id))
        ref_c = torch.tensor([r["chosen_logp"] for r in rows])
        ref_r = torch.tensor([r["rejected_logp"] for r in rows])
        losses, chosen, rejected = dpo_losses(
            sums[: len(rows)], sums[len(rows) :], ref_c, ref_r, config.beta, config.loss
        )
        return losses.mean(), summarize(losses.detach(), chosen.detach(), rejected.detach())

    return Objective("train_dpo", batch_loss)


DPO_METRICS = ("loss", "reward_accuracy", "margin", "chosen_reward", "rejected_reward")


def summarize(losses, chosen_rewards, rejected_rewards) -> dict:
    margins = chosen_rewards - rejected_rewards
    return {
        "loss": float(losses.mean()),
        "reward_accuracy": float((margins > 0).float().mean()),
        "margin": float(margins.mean()),
        "chosen_reward": float(chosen_rewards.mean()),
        "rejected_reward": float(rejected_rewards.mean()),
    }


def compute_train_dpo(
    ctx: RunContext,
    config: DPOConfig,
    key: str,
    policy: ArtifactRef,
    pairs: ArtifactRef,
    validation: ArtifactRef | None = None,
):
    """``validation``: pairs of held-out prompts (with reference log-probs) that pick the best
    checkpoint; without them ``config.val_fraction`` of the prompts' pairs are held out."""
    store = ctx.store()
    return fit(
        ctx,
        "train_dpo",
        key,
        policy,
        store.read_rows(pairs),
        config,
        lambda tokenizer: dpo_objective(config, tokenizer.pad_token_id),
        val_rows=store.read_rows(validation) if validation else None,
    )


TRAIN_DPO = Stage(
    "train_dpo",
    compute_train_dpo,
    __name__,
    schema=history_schema(*DPO_METRICS),
    examples=curves("loss", "reward_accuracy"),
)
train_dpo_task = stage_task(TRAIN_DPO)
