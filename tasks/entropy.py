"""entropy (GEM cognitive filtering): score each chain-of-thought candidate by
Eq. 1 from the per-token entropies recorded while it was generated.

    S(a) = -H_final(a) + lambda_fork * mean(top-m of {H_t : t in the reasoning span})

H_final is the mean entropy over the final-answer tokens; the reasoning span is
every content token before them. Which tokens are final (``final_span``):
- last_tokens: the last ``final_window`` (the SEGA repository: 3);
- fraction: the last 25% when the marker's text is in the candidate, else the
  last 20% (GEM's repository: it checks only that the marker is there);
- marker: the tokens after the marker, found by token offsets, else the last
  ``final_window`` (this project's rule).
top-m is a fraction of the reasoning tokens rounded up (SEGA) or down (GEM), at
least 1. The stop token is not content and padding never exists here (each
candidate keeps only its own generated tokens), where both repositories also
count positions after the end of shorter candidates. A confident answer (low
H_final) after exploratory reasoning (high entropy at its forks) scores high.
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


def marker_spans(entropies: list[float], offsets: list[int], text: str, marker: str) -> Spans | None:
    """Reasoning before the marker, the answer after it (None: no marker, or nothing after it)."""
    at = text.rfind(marker)
    if at < 0:
        return None
    answer_from = at + len(marker)
    first_final = next((i for i, o in enumerate(offsets) if o >= answer_from), len(offsets))
    first_marker = max(0, sum(o <= at for o in offsets) - 1)  # the token holding the marker's first character
    if first_final == len(offsets):
        return None
    return Spans(entropies[:first_marker], entropies[first_final:], True)


def split_at(entropies: list[float], final_count: int, marker_found: bool) -> Spans:
    start = len(entropies) - min(final_count, len(entropies))
    return Spans(entropies[:start], entropies[start:], marker_found)


def split_spans(entropies: list[float], offsets: list[int], text: str, config: EntropyConfig) -> Spans:
    """Reasoning and final-answer entropies of one candidate (``entropies`` and
    ``offsets`` cover its content tokens only, stop token excluded)."""
    if config.final_span == "fraction":
        found = config.marker in text
        share = config.final_fraction_with_marker if found else config.final_fraction
        return split_at(entropies, len(entropies) - int(len(entropies) * (1 - share)), found)
    if config.final_span == "marker":
        spans = marker_spans(entropies, offsets, text, config.marker)
        if spans:
            return spans
    return split_at(entropies, config.final_window, False)


def top_m_count(top_m: float, span: int, rounding: str = "ceil") -> int:
    """top_m < 1 is a fraction of the span (rounded up or down, at least 1), otherwise a count."""
    if span == 0:
        return 0
    if top_m >= 1:
        count = int(top_m)
    else:
        count = math.ceil(top_m * span) if rounding == "ceil" else math.floor(top_m * span)
    return max(1, min(count, span))


def final_entropy(spans: Spans) -> float:
    return sum(spans.final) / len(spans.final) if spans.final else 0.0


def fork_entropy(spans: Spans, top_m: float, rounding: str = "ceil") -> float:
    """Mean of the top-m reasoning entropies (the forks where the reasoning explored)."""
    m = top_m_count(top_m, len(spans.reasoning), rounding)
    return sum(sorted(spans.reasoning, reverse=True)[:m]) / m if m else 0.0


def eq1_score(spans: Spans, config: EntropyConfig) -> float:
    return -final_entropy(spans) + config.lambda_fork * fork_entropy(spans, config.top_m, config.top_m_rounding)


# -- the entropy stage -----------------------------------------------------------
def content_tokens(candidate: dict) -> tuple[list[int], list[float]]:
    """Token ids and entropies of a candidate's text: the stop token is not content."""
    ids, entropies = candidate["token_ids"], candidate["entropies"]
    if candidate["finish_reason"] == "stop":
        ids, entropies = ids[:-1], entropies[:-1]
    return ids, entropies


def score_candidate(tokenizer, candidate: dict, config: EntropyConfig) -> dict:
    ids, entropies = content_tokens(candidate)
    offsets = token_offsets(tokenizer, ids) if config.final_span == "marker" else []
    spans = split_spans(entropies, offsets, candidate["response"], config)
    return {
        "prompt_id": candidate["prompt_id"],
        "candidate": candidate["candidate"],
        "score": eq1_score(spans, config),
        "final_entropy": final_entropy(spans),
        "fork_entropy": fork_entropy(spans, config.top_m, config.top_m_rounding),
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
    """Rank within each prompt (0 = highest S); mark each prompt's low outliers as not kept."""
    ordered = sorted(rows, key=lambda r: (r["prompt_id"], -r["score"], r["candidate"]))
    out = []
    for _, group in groupby(ordered, key=lambda r: r["prompt_id"]):
        group = list(group)
        fence = lower_fence([r["score"] for r in group], config.iqr_k) if config.trim_outliers else -math.inf
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
ENTROPY = Stage("entropy", compute_entropy, __name__, schema=SCORE_ROWS)
entropy_task = stage_task(ENTROPY)
