"""The interface every model backend implements (hf now, vllm later)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol


@dataclass(frozen=True)
class GenerationParams:
    n: int = 1
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    max_new_tokens: int = 256
    top_logprobs: int = 0  # >0: keep the k most likely tokens of the raw distribution per step
    entropies: bool = False  # keep the raw next-token entropy per step (GEM)


@dataclass
class Completion:
    """One generated continuation. Log-probs and entropies come from the model's raw
    next-token distribution, before temperature and top-p."""

    token_ids: list[int]
    text: str
    logprobs: list[float]
    finish_reason: str  # "stop" (end-of-turn token generated) or "length"
    top_logprobs: list[list[tuple[int, float]]] | None = None
    entropies: list[float] | None = None
    stop_token: int | None = field(default=None)


class Backend(Protocol):
    tokenizer: object

    def generate(self, prompts: list[list[int]], params: GenerationParams, seeds: list[int]) -> list[list[Completion]]:
        """n completions per prompt; seeds[i] makes prompt i's samples reproducible
        regardless of which other prompts share its batch."""

    def sequence_logprobs(self, prompts: list[list[int]], responses: list[list[int]]) -> list[float]:
        """Summed float32 log-probs of each response given its prompt."""
