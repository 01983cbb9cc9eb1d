"""Which float type the hardware a stage runs on computes fast: ``dtype: auto`` resolution.

bfloat16 halves memory and is faster where the hardware has bf16 arithmetic (CUDA GPUs
with bf16, CPUs with AVX512-BF16 or AMX); elsewhere torch emulates it, several times
slower than float32 (an AVX2-only CPU). "auto" is resolved once when a flow starts, so
stage keys and manifests carry the dtype actually used.
"""

from __future__ import annotations

import warnings
from typing import Literal

import torch
from pydantic import BaseModel

Device = Literal["cpu", "cuda"]


# -- capability probes (tests replace these) ----------------------------------
def cuda_bf16() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def cpu_avx512_bf16() -> bool:
    return _cpu_probe("_is_avx512_bf16_supported")


def cpu_amx() -> bool:
    return _cpu_probe("_is_amx_tile_supported")


def _cpu_probe(name: str) -> bool:
    probe = getattr(torch.cpu, name, None)  # private torch API: absent means unknown, so no
    return bool(probe()) if probe else False


# -- resolution ---------------------------------------------------------------
def native_bf16(device: Device) -> bool:
    if device == "cuda":
        return cuda_bf16()
    return cpu_avx512_bf16() or cpu_amx()


def resolve_dtype(dtype: str, device: Device = "cpu") -> str:
    """A concrete dtype for ``device``: "auto" -> bfloat16 where it is native, else float32.
    An explicit dtype is kept; an explicit bfloat16 the CPU would emulate is warned about."""
    if dtype == "auto":
        return "bfloat16" if native_bf16(device) else "float32"
    if dtype == "bfloat16" and device == "cpu" and not native_bf16("cpu"):
        warnings.warn(
            "dtype bfloat16: this CPU has no AVX512-BF16/AMX and emulates it, several times slower than "
            "float32; use dtype: auto",
            stacklevel=2,
        )  # one location: shown once per process
    return dtype


def run_device(config: BaseModel, inherited: Device = "cpu") -> Device:
    """Where a flow config's stages compute: CUDA workers with executor: ray and
    gpus_per_replica > 0 (assumed bf16-capable, as every GPU since Ampere is), else this CPU."""
    executor, ray = getattr(config, "executor", None), getattr(config, "ray", None)
    if executor is None or ray is None:
        return inherited
    return "cuda" if executor == "ray" and ray.gpus_per_replica > 0 else "cpu"


def resolve_dtypes(config: BaseModel, device: Device | None = None) -> BaseModel:
    """A copy of a flow config with every ``dtype`` field resolved for the device its stages run on
    (each sub-flow config, e.g. a pipeline's training and genies halves, decides for itself)."""
    device = run_device(config, device or "cpu")
    updates: dict = {}
    for name in type(config).model_fields:
        value = getattr(config, name)
        if isinstance(value, BaseModel):
            resolved = resolve_dtypes(value, device)
            if resolved is not value:
                updates[name] = resolved
        elif name == "dtype" and isinstance(value, str):
            resolved_dtype = resolve_dtype(value, device)
            if resolved_dtype != value:
                updates[name] = resolved_dtype
    return config.model_copy(update=updates) if updates else config


def local_device() -> Device:
    return "cuda" if torch.cuda.is_available() else "cpu"


def torch_dtype(dtype: str, device: Device = "cpu") -> torch.dtype:
    """The torch dtype a model is loaded in ("auto" is resolved here too, for callers that
    build stage configs without a flow, like bench/)."""
    return getattr(torch, resolve_dtype(dtype, device))
