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
from dataclasses import dataclass


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


def eq1_score(spans: Spans, lambda_fork: float, top_m: float) -> float:
    final = sum(spans.final) / len(spans.final) if spans.final else 0.0
    m = top_m_count(top_m, len(spans.reasoning))
    forks = sorted(spans.reasoning, reverse=True)[:m]
    exploration = sum(forks) / m if m else 0.0
    return -final + lambda_fork * exploration
