"""train_sega (GEM Eq. 2): a listwise objective over the k candidates of one prompt,
one on-policy iteration: the candidates were sampled from this stage's policy.

    r_i = S_i (identity) or softmax_i(S) ;  A_i = r_i - mean(r)  (optionally / std(r))
    L   = -(1/k) * sum_i stopgrad(A_i) * log pi(a_i | q)

log pi(a_i | q) is the summed log-prob of the candidate's tokens (optionally
divided by its length). An optional KL penalty to the reference uses the
per-token estimator exp(d) - d - 1 with d = log pi_ref - log pi, which is
non-negative and unbiased for KL(pi || pi_ref) on the policy's own samples.
The reference is the iteration's starting policy (the model that sampled the
candidates); its per-token log-probs are computed once before training.
``shuffle_advantages`` (the control) permutes each group's scores first, seeded:
the same advantage sizes, no entropy signal.

Training sees exactly the sampling context: the stored prompt token ids and the
generated token ids, stop token included (the SEGA repository scores a context
without its step-by-step line). With a full fine-tune the AdamW state goes from
one iteration to the next beside the model, so one step per iteration is
upstream's single optimizer run.
"""

from __future__ import annotations

import random
from itertools import groupby

import torch

from alignflow.config import SEGAConfig
from alignflow.storage.artifacts import ArtifactRef
from alignflow.tasks.stage import RunContext, Stage, stage_task
from alignflow.tasks.training import Objective, curves, fit, history_schema
from alignflow.workers.scoring import map_batches, pack, response_token_logprobs


def group_advantages(scores: torch.Tensor, mapping: str = "softmax", zscore: bool = False) -> torch.Tensor:
    """Advantages of one group: zero-mean by construction."""
    if mapping == "softmax":
        rewards = torch.softmax(scores, dim=-1)
    elif mapping == "identity":
        rewards = scores
    else:
        raise ValueError(f"unknown SEGA reward mapping '{mapping}' (expected softmax or identity)")
    advantages = rewards - rewards.mean()
    if zscore and len(scores) > 1:
        advantages = advantages / (rewards.std(unbiased=False) + 1e-8)
    return advantages


def sega_loss(logp_sums: torch.Tensor, advantages: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
    """-(1/k) sum_i stopgrad(A_i) log pi(a_i); ``lengths`` set: per-token mean log-probs."""
    logp = logp_sums / lengths if lengths is not None else logp_sums
    return -(advantages.detach() * logp).mean()


def kl_penalty(policy_logps: torch.Tensor, reference_logps: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over real tokens of exp(d) - d - 1, d = log pi_ref - log pi (per token)."""
    d = (reference_logps - policy_logps) * mask
    per_token = torch.exp(d) - d - 1
    return (per_token * mask).sum() / mask.sum().clamp(min=1)


def sega_groups(candidates: list[dict], scores: list[dict], config: SEGAConfig) -> list[dict]:
    """One row per prompt: its kept candidates' token ids and their advantages.
    Groups with fewer than two kept candidates or equal scores carry no signal."""
    kept = {(s["prompt_id"], s["candidate"]): s["score"] for s in scores if s["kept"]}
    members = sorted(
        (c for c in candidates if (c["prompt_id"], c["candidate"]) in kept),
        key=lambda c: (c["prompt_id"], c["candidate"]),
    )
    groups = []
    for prompt_id, group in groupby(members, key=lambda c: c["prompt_id"]):
        group = list(group)
        scores = [kept[(prompt_id, c["candidate"])] for c in group]
        if config.shuffle_advantages:
            random.Random(f"{config.seed}:{prompt_id}").shuffle(scores)
        advantages = group_advantages(torch.tensor(scores), config.mapping, config.zscore)
        if len(group) > 1 and bool(advantages.abs().max() > 0):
            groups.append(
                {
                    "prompt_id": prompt_id,
                    "prompt_ids": group[0]["prompt_ids"],
                    "responses": [c["token_ids"] for c in group],
                    "advantages": advantages.tolist(),
                }
            )
    return groups


def _flat(groups: list[dict]) -> tuple[list[list[int]], list[list[int]]]:
    prompts = [g["prompt_ids"] for g in groups for _ in g["responses"]]
    return prompts, [r for g in groups for r in g["responses"]]


def add_reference_token_logprobs(model, pad_id: int, groups: list[dict], token_budget: int = 4096) -> list[dict]:
    """Per-token log-probs of every candidate under the starting policy (for the KL penalty)."""

    def per_token(batch):
        logp, mask = response_token_logprobs(model, batch)
        return [row[m].tolist() for row, m in zip(logp, mask)]

    values = iter(map_batches(per_token, *_flat(groups), pad_id, token_budget))
    return [{**g, "reference_logps": [next(values) for _ in g["responses"]]} for g in groups]


def sega_objective(config: SEGAConfig, pad_id: int) -> Objective:
    def batch_loss(model, groups: list[dict]):
        logp, mask = response_token_logprobs(model, pack(*_flat(groups), pad_id))
        sums, lengths = (logp * mask).sum(dim=1), mask.sum(dim=1)
        losses, start = [], 0
        for g in groups:
            rows = slice(start, start + len(g["responses"]))
            norm = lengths[rows] if config.length_normalize else None
            losses.append(sega_loss(sums[rows], torch.tensor(g["advantages"]), norm))
            start = rows.stop
        policy_loss = torch.stack(losses).mean()
        kl = torch.zeros(())
        if config.kl_coef:
            reference = torch.zeros_like(logp)
            reference[mask] = torch.tensor([v for g in groups for lp in g["reference_logps"] for v in lp])
            kl = kl_penalty(logp, reference, mask.float())
        loss = policy_loss + config.kl_coef * kl
        metrics = {
            "loss": float(loss.detach()),
            "policy_loss": float(policy_loss.detach()),
            "kl": float(kl.detach()),
            "mean_token_logp": float((sums / lengths).mean().detach()),
        }
        return loss, metrics

    return Objective("train_sega", batch_loss)


def compute_train_sega(
    ctx: RunContext, config: SEGAConfig, key: str, policy: ArtifactRef, candidates: ArtifactRef, scores: ArtifactRef
):
    store = ctx.store()
    groups = sega_groups(store.read_rows(candidates), store.read_rows(scores), config)
    if not groups:
        raise ValueError(
            "train_sega: no prompt has two kept candidates with different scores; nothing to learn from "
            "(sample more candidates per prompt, or turn off entropy.trim_outliers)"
        )

    def with_reference(model, tokenizer, rows):
        return add_reference_token_logprobs(model, tokenizer.pad_token_id, rows) if config.kl_coef else rows

    out = fit(
        ctx,
        "train_sega",
        key,
        policy,
        groups,
        config,
        lambda tokenizer: sega_objective(config, tokenizer.pad_token_id),
        prepare=with_reference,
        carry_optimizer=True,
    )
    out.metrics["groups"] = len(groups)
    return out


TRAIN_SEGA = Stage(
    "train_sega",
    compute_train_sega,
    __name__,
    schema=history_schema("loss", "policy_loss", "kl", "mean_token_logp"),
    examples=curves("loss"),
)
train_sega_task = stage_task(TRAIN_SEGA)
