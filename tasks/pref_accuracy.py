"""pref_accuracy: how often a policy's implicit reward prefers the chosen response.

r(q, a) = beta * sum_t log pi(a_t | q, a_<t), (q, a) rendered in the run's format (the
one its models were trained in), or with a reference model
beta * (log pi - log pi_ref) (as RewardBench scores DPO models). A pair is
correct when r(chosen) > r(rejected); ties are reported on their own, and
``accuracy_ties_correct`` counts them as correct as the SEGA repository does.

The policy is a model (``policy``) or a pref_accuracy artifact that already
scored it on the same pairs (``policy_scores``); the reference is always such an
artifact (``reference_scores``): each model's log-probs are computed once however
many comparisons use them.
"""

from __future__ import annotations

import math

import pyarrow as pa

from alignflow.config import PrefAccuracyConfig
from alignflow.storage.artifacts import ArtifactRef
from alignflow.tasks.stage import Progress, RunContext, Stage, StageOutput, stage_task
from alignflow.workers.chat import encode_pair, end_of_turn_ids
from alignflow.workers.models import load_causal_lm
from alignflow.workers.scoring import sequence_logprob_sums


def implicit_rewards(policy: list[float], beta: float, reference: list[float] | None = None) -> list[float]:
    if reference is None:
        return [beta * p for p in policy]
    return [beta * (p - r) for p, r in zip(policy, reference)]


def wilson_interval(successes: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """The Wilson score interval of a proportion (95% by default): sound at small n and near 0 or 1."""
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return centre - half, centre + half


def preference_accuracy(chosen: list[float], rejected: list[float]) -> dict:
    """Share of pairs where chosen wins (with its 95% Wilson interval), where it ties, and the
    mean margin; also the accuracy that counts ties as correct, as the SEGA repository's
    evaluation does (r_chosen >= r_rejected)."""
    if not chosen or len(chosen) != len(rejected):
        raise ValueError(
            f"need the same non-zero number of chosen and rejected rewards, got {len(chosen)} and {len(rejected)}"
        )
    wins = sum(c > r for c, r in zip(chosen, rejected))
    ties = sum(c == r for c, r in zip(chosen, rejected))
    n = len(chosen)
    low, high = wilson_interval(wins, n)
    return {
        "pairs": n,
        "accuracy": wins / n,
        "ci_low": low,
        "ci_high": high,
        "ties": ties / n,
        "accuracy_ties_correct": (wins + ties) / n,
        "mean_margin": sum(c - r for c, r in zip(chosen, rejected)) / n,
    }


def policy_logprobs(model, tokenizer, pairs: list[dict], config: PrefAccuracyConfig, progress=None):
    """Summed log pi of each pair's chosen and of its rejected response."""
    stops = end_of_turn_ids(tokenizer, model)
    encoded = [
        encode_pair(tokenizer, p, stops, config.max_prompt_tokens, config.max_response_tokens, config.format)
        for p in pairs
    ]
    prompts = [e["prompt_ids"] for e in encoded] * 2
    responses = [e["chosen_ids"] for e in encoded] + [e["rejected_ids"] for e in encoded]
    sums = sequence_logprob_sums(model, tokenizer.pad_token_id, prompts, responses, config.token_budget, progress)
    return sums[: len(pairs)], sums[len(pairs) :]


def scored_sides(rows: list[dict], pairs: list[dict]) -> tuple[list[float], list[float]]:
    """The log-probs a pref_accuracy artifact holds, in the order of ``pairs``."""
    by_id = {r["id"]: r for r in rows}
    missing = [p["id"] for p in pairs if p["id"] not in by_id]
    if missing:
        raise ValueError(f"pref_accuracy: an artifact scored other pairs ({len(missing)} missing, e.g. {missing[0]})")
    return [by_id[p["id"]]["chosen_logp"] for p in pairs], [by_id[p["id"]]["rejected_logp"] for p in pairs]


def model_sides(ctx: RunContext, model_ref: ArtifactRef, pairs: list[dict], config: PrefAccuracyConfig):
    model, tokenizer = load_causal_lm(ctx.model_dir(model_ref), config.dtype)
    progress = Progress("pref_accuracy", 2 * len(pairs), unit="seqs")
    sides = policy_logprobs(model, tokenizer, pairs, config, progress)
    progress.close()
    return sides


def accuracy_by_dataset(rows: list[dict]) -> dict:
    """Flat metrics: overall and per dataset (``accuracy/<dataset>``, ...)."""
    metrics = {
        f"{k}": round(v, 4)
        for k, v in preference_accuracy(
            [r["chosen_reward"] for r in rows], [r["rejected_reward"] for r in rows]
        ).items()
    }
    for dataset in sorted({r["dataset"] for r in rows}):
        part = [r for r in rows if r["dataset"] == dataset]
        result = preference_accuracy([r["chosen_reward"] for r in part], [r["rejected_reward"] for r in part])
        metrics |= {f"{k}/{dataset}": round(v, 4) for k, v in result.items()}
    return metrics


def compute_pref_accuracy(
    ctx: RunContext,
    config: PrefAccuracyConfig,
    key: str,
    pairs: ArtifactRef,
    policy: ArtifactRef | None = None,
    policy_scores: ArtifactRef | None = None,
    reference_scores: ArtifactRef | None = None,
):
    if (policy is None) == (policy_scores is None):
        raise ValueError(
            "pref_accuracy: give either a policy model (policy) or the pref_accuracy artifact "
            "that scored it (policy_scores)"
        )
    store = ctx.store()
    rows = store.read_rows(pairs)
    chosen, rejected = (
        scored_sides(store.read_rows(policy_scores), rows) if policy_scores else model_sides(ctx, policy, rows, config)
    )
    ref_chosen, ref_rejected = (
        scored_sides(store.read_rows(reference_scores), rows) if reference_scores else (None, None)
    )
    chosen_rewards = implicit_rewards(chosen, config.beta, ref_chosen)
    rejected_rewards = implicit_rewards(rejected, config.beta, ref_rejected)
    out = [
        {
            "id": p["id"],
            "dataset": p["dataset"],
            "chosen_logp": c,
            "rejected_logp": r,
            "chosen_reward": cr,
            "rejected_reward": rr,
            "correct": cr > rr,
            "tie": cr == rr,
        }
        for p, c, r, cr, rr in zip(rows, chosen, rejected, chosen_rewards, rejected_rewards)
    ]
    return StageOutput(
        tables=[pa.Table.from_pylist(out)],
        metrics={"with_reference": reference_scores is not None, **accuracy_by_dataset(out)},
    )


SCORED_PAIR_ROWS = pa.schema(
    [
        ("id", pa.string()),
        ("dataset", pa.string()),
        ("chosen_logp", pa.float64()),
        ("rejected_logp", pa.float64()),
        ("chosen_reward", pa.float64()),
        ("rejected_reward", pa.float64()),
        ("correct", pa.bool_()),
        ("tie", pa.bool_()),
    ]
)
PREF_ACCURACY = Stage("pref_accuracy", compute_pref_accuracy, __name__, schema=SCORED_PAIR_ROWS)
pref_accuracy_task = stage_task(PREF_ACCURACY)
