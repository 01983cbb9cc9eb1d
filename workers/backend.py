"""The interface every model backend implements (hf, vllm), and the one place a
stage gets its backend from (``shared_backend``)."""

from __future__ import annotations

import gc
import itertools
import threading
from collections.abc import Iterable
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

    def generate(
        self, prompts: list[list[int]], params: GenerationParams, seeds: list[int], progress=None
    ) -> list[list[Completion]]:
        """n completions per prompt; seeds[i] makes prompt i's samples reproducible
        regardless of which other prompts share its batch. ``progress(k)``: k more rows done."""

    def next_token(self, groups: list[list[list[int]]], top_logprobs: int, progress=None) -> list[list[Completion]]:
        """One greedy token (with its top-k raw log-probs) per prompt of each group, the prompts of a
        group sharing a prefix that is computed once (the judge's comparisons of one instruction)."""

    def sequence_logprobs(self, prompts: list[list[int]], responses: list[list[int]], progress=None) -> list[float]:
        """Summed float32 log-probs of each response given its prompt."""


def regroup(items: list, sizes: Iterable[int]) -> list[list]:
    """A flat list cut back into consecutive groups of the given sizes."""
    return [items[a:b] for a, b in itertools.pairwise([0, *itertools.accumulate(sizes)])]


_loaded: dict[tuple, Backend] = {}  # this process's one loaded inference model
_loaded_lock = threading.Lock()


def shared_backend(
    kind: str,
    model_dir: Path,
    dtype: str = "float32",
    tensor_parallel_size: int = 1,
    batch_size: int = 16,
    token_budget: int = 4096,
) -> Backend:
    """The backend a stage config names, loaded once per process: every shard and
    every later stage that asks for the same model reuses it (a Ray actor serves a
    whole flow run's shards from one load). A process holds one model at a time:
    asking for another releases the first. ``batch_size`` and ``token_budget``
    size hf's batches; vLLM schedules its own."""
    if kind not in ("hf", "vllm"):
        raise ValueError(f"unknown backend {kind!r}; expected hf or vllm")
    if kind == "hf" and tensor_parallel_size != 1:
        raise ValueError(f"tensor_parallel_size={tensor_parallel_size} needs backend: vllm; hf runs on one device")
    identity = (kind, str(Path(model_dir).resolve()), dtype, tensor_parallel_size)
    with _loaded_lock:
        if identity not in _loaded:
            _release_loaded()
            _loaded[identity] = _load(kind, Path(model_dir), dtype, tensor_parallel_size)
        backend = _loaded[identity]
    if kind == "hf":  # sized per stage: the same loaded model serves stages with other batch sizes
        backend.batch_size, backend.token_budget = batch_size, token_budget  # type: ignore[attr-defined]
    return backend


def _load(kind: str, model_dir: Path, dtype: str, tensor_parallel_size: int) -> Backend:
    if kind == "hf":
        from alignflow.workers.hf import HFBackend

        return HFBackend(model_dir, dtype=dtype)
    from alignflow.workers.vllm import VLLMBackend

    return VLLMBackend(model_dir, dtype=dtype, tensor_parallel_size=tensor_parallel_size)


def release_backends() -> None:
    """Free the process's loaded model (a vLLM engine's process and memory too):
    before training needs the device, and when a flow run ends."""
    with _loaded_lock:
        _release_loaded()


def _release_loaded() -> None:
    while _loaded:
        backend = _loaded.popitem()[1]
        if hasattr(backend, "close"):
            backend.close()
    gc.collect()
