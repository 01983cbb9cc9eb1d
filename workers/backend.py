"""The interface every model backend implements (hf, vllm), and the one place a
stage gets its backend from (``open_backend``)."""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
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
    stop_ids: list[int]  # the end-of-turn token ids generation stops on

    def generate(self, prompts: list[list[int]], params: GenerationParams, seeds: list[int],
                 progress=None) -> list[list[Completion]]:
        """n completions per prompt; seeds[i] makes prompt i's samples reproducible
        regardless of which other prompts share its batch. ``progress(k)``: k more rows done."""

    def sequence_logprobs(self, prompts: list[list[int]], responses: list[list[int]], progress=None) -> list[float]:
        """Summed float32 log-probs of each response given its prompt."""


@contextmanager
def open_backend(kind: str, model_dir: Path, dtype: str = "float32", tensor_parallel_size: int = 1,
                 batch_size: int = 16, token_budget: int = 4096) -> Iterator[Backend]:
    """The backend a stage config names, released when the stage is done, so that
    a vLLM engine never outlives its stage. ``batch_size`` and ``token_budget``
    size hf's batches; vLLM schedules its own."""
    if kind == "hf":
        if tensor_parallel_size != 1:
            raise ValueError(f"tensor_parallel_size={tensor_parallel_size} needs backend: vllm; hf runs on one device")
        from workers.hf import HFBackend

        yield HFBackend(model_dir, dtype=dtype, batch_size=batch_size, token_budget=token_budget)
    elif kind == "vllm":
        from workers.vllm import VLLMBackend

        backend = VLLMBackend(model_dir, dtype=dtype, tensor_parallel_size=tensor_parallel_size)
        try:
            yield backend
        finally:
            backend.close()
    else:
        raise ValueError(f"unknown backend {kind!r}; expected hf or vllm")
