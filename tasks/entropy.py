"""entropy (GEM cognitive filtering): score each chain-of-thought candidate by
Eq. 1 from the per-token entropies recorded while it was generated.

    S(a) = -H_final(a) + lambda_fork * mean(top-m of {H_t : t in the reasoning span})

H_final is the mean entropy over the final-answer tokens: those after the
``Final Answer:`` marker (found by token offsets), or without a marker the
last ``final_window`` real tokens. The stop token is not content and padding
never exists here (each candidate keeps only its own generated tokens).
A confident answer (low H_final) after exploratory reasoning (high entropy at
its forks) scores high.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from itertools import groupby

import pyarrow as pa

from alignflow.config import EntropyConfig
from alignflow.storage.artifacts import ArtifactRef
from alignflow.tasks.stage import RunContext, Stage, StageOutput, stage_task


@dataclass(frozen=True)
class Spans:
    reasoning: list[float]  # entropies of the reasoning tokens
    final: list[float]  # entropies of the final-answer tokens
    marker_found: bool


def token_offsets(tokenizer, token_ids: list[int]) -> list[int]:
    """Character offset in the decoded text where each token starts."""
    return [len(tokenizer.decode(token_ids[:i], skip_special_tokens=True)) for i in range(len(token_ids))]


def split_spans(entropies: list[float], offsets: list[int], text: str, marker: str, final_window: int) -> Spans:
    """Reasoning and final-answer entropies of one candidate (``entropies`` and
    ``offsets`` cover its content tokens only, stop token excluded)."""
    at = text.rfind(marker)
    if at >= 0:
        answer_from = at + len(marker)
        first_final = next((i for i, o in enumerate(offsets) if o >= answer_from), len(offsets))
        first_marker = max(0, sum(o <= at for o in offsets) - 1)  # the token holding the marker's first character
        if first_final < len(offsets):
            return Spans(entropies[:first_marker], entropies[first_final:], True)
    start = max(0, len(entropies) - final_window)
    return Spans(entropies[:start], entropies[start:], False)


def top_m_count(top_m: float, span: int) -> int:
    """top_m < 1 is a fraction of the span (rounded up), otherwise a count."""
    if span == 0:
        return 0
    count = math.ceil(top_m * span) if top_m < 1 else int(top_m)
    return max(1, min(count, span))


def final_entropy(spans: Spans) -> float:
    return sum(spans.final) / len(spans.final) if spans.final else 0.0


def fork_entropy(spans: Spans, top_m: float) -> float:
    """Mean of the top-m reasoning entropies (the forks where the reasoning explored)."""
    m = top_m_count(top_m, len(spans.reasoning))
    return sum(sorted(spans.reasoning, reverse=True)[:m]) / m if m else 0.0


def eq1_score(spans: Spans, lambda_fork: float, top_m: float) -> float:
    return -final_entropy(spans) + lambda_fork * fork_entropy(spans, top_m)


# -- the entropy stage -----------------------------------------------------------
def content_tokens(candidate: dict) -> tuple[list[int], list[float]]:
    """Token ids and entropies of a candidate's text: the stop token is not content."""
    ids, entropies = candidate["token_ids"], candidate["entropies"]
    if candidate["finish_reason"] == "stop":
        ids, entropies = ids[:-1], entropies[:-1]
    return ids, entropies


def score_candidate(tokenizer, candidate: dict, config: EntropyConfig) -> dict:
    ids, entropies = content_tokens(candidate)
    spans = split_spans(
        entropies, token_offsets(tokenizer, ids), candidate["response"], config.marker, config.final_window
    )
    return {
        "prompt_id": candidate["prompt_id"],
        "candidate": candidate["candidate"],
        "score": eq1_score(spans, config.lambda_fork, config.top_m),
        "final_entropy": final_entropy(spans),
        "fork_entropy": fork_entropy(spans, config.top_m),
        "marker_found": spans.marker_found,
        "reasoning_tokens": len(spans.reasoning),
        "final_tokens": len(spans.final),
    }


def lower_fence(scores: list[float], k: float) -> float:
    """Tukey's lower fence Q1 - k * IQR: scores below it are low outliers."""
    if len(scores) < 4:
        return -math.inf
    q1, _, q3 = statistics.quantiles(scores, n=4)
    return q1 - k * (q3 - q1)


def rank_and_trim(rows: list[dict], config: EntropyConfig) -> list[dict]:
    """Rank within each prompt (0 = highest S); mark low outliers as not kept."""
    fence = lower_fence([r["score"] for r in rows], config.iqr_k) if config.trim_outliers else -math.inf
    ordered = sorted(rows, key=lambda r: (r["prompt_id"], -r["score"], r["candidate"]))
    out = []
    for _, group in groupby(ordered, key=lambda r: r["prompt_id"]):
        out += [{**r, "rank": rank, "kept": r["score"] >= fence} for rank, r in enumerate(group)]
    return out


def compute_entropy(ctx: RunContext, config: EntropyConfig, key: str, policy: ArtifactRef, candidates: ArtifactRef):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(ctx.model_dir(policy))
    rows = rank_and_trim([score_candidate(tokenizer, c, config) for c in ctx.store().read_rows(candidates)], config)
    metrics = {
        "rows_out": len(rows),
        "marker_share": round(sum(r["marker_found"] for r in rows) / len(rows), 3),
        "mean_score": round(statistics.fmean(r["score"] for r in rows), 4),
        "mean_final_entropy": round(statistics.fmean(r["final_entropy"] for r in rows), 4),
        "mean_fork_entropy": round(statistics.fmean(r["fork_entropy"] for r in rows), 4),
        "trimmed": sum(not r["kept"] for r in rows),
    }
    return StageOutput(tables=[pa.Table.from_pylist(rows)], metrics=metrics)


def top_vs_bottom_pairs(candidates: list[dict], scores: list[dict]) -> list[dict]:
    """Per prompt, the best kept candidate as chosen and the worst kept one as rejected (distinct texts only)."""
    by_key = {(c["prompt_id"], c["candidate"]): c for c in candidates}
    pairs = []
    for prompt_id, group in groupby(
        sorted((s for s in scores if s["kept"]), key=lambda s: (s["prompt_id"], s["rank"])),
        key=lambda s: s["prompt_id"],
    ):
        ranked = list(group)
        best, worst = by_key[(prompt_id, ranked[0]["candidate"])], by_key[(prompt_id, ranked[-1]["candidate"])]
        if len(ranked) > 1 and best["response"] != worst["response"]:
            pairs.append(
                {
                    "id": prompt_id,
                    "prompt_id": prompt_id,
                    "prompt": best["prompt"],
                    "chosen": best["response"],
                    "rejected": worst["response"],
                    "margin": ranked[0]["score"] - ranked[-1]["score"],
                }
            )
    return pairs


def compute_entropy_pairs(
    ctx: RunContext, config: EntropyConfig, key: str, candidates: ArtifactRef, scores: ArtifactRef
):
    store = ctx.store()
    pairs = top_vs_bottom_pairs(store.read_rows(candidates), store.read_rows(scores))
    if not pairs:
        raise ValueError("entropy_pairs: no prompt has two kept candidates with different texts; nothing to pair")
    return StageOutput(tables=[pa.Table.from_pylist(pairs)], metrics={"rows_out": len(pairs)})


SCORE_ROWS = pa.schema(
    [
        ("prompt_id", pa.string()),
        ("candidate", pa.int64()),
        ("score", pa.float64()),
        ("final_entropy", pa.float64()),
        ("fork_entropy", pa.float64()),
        ("marker_found", pa.bool_()),
        ("reasoning_tokens", pa.int64()),
        ("final_tokens", pa.int64()),
        ("rank", pa.int64()),
        ("kept", pa.bool_()),
    ]
)
ENTROPY_PAIR_ROWS = pa.schema(
    [
        ("id", pa.string()),
        ("prompt_id", pa.string()),
        ("prompt", pa.string()),
        ("chosen", pa.string()),
        ("rejected", pa.string()),
        ("margin", pa.float64()),
    ]
)
ENTROPY = Stage("entropy", compute_entropy, __name__, schema=SCORE_ROWS)
ENTROPY_PAIRS = Stage("entropy_pairs", compute_entropy_pairs, __name__, schema=ENTROPY_PAIR_ROWS)
entropy_task = stage_task(ENTROPY)
entropy_pairs_task = stage_task(ENTROPY_PAIRS)
