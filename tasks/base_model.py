"""base_model: resolve a built-in name or HF directory to a model reference
(converting the built-in GGUF once), content-hashed so downstream keys change
when the weights do.

A built-in model's reference carries its name, not the folder it was converted
into, and is resolved to that folder where it is loaded (``RunContext.model_dir``);
``model_name`` is how artifacts name a model on any machine."""

from __future__ import annotations

from pathlib import Path

from prefect import task

from alignflow.storage.artifacts import ArtifactRef
from alignflow.tasks.stage import is_transient
from alignflow.workers.models import BUILTIN_MODELS, content_hash, resolve_model_dir


def base_model_ref(name_or_path: str, model_cache: str) -> ArtifactRef:
    model_dir = resolve_model_dir(name_or_path, model_cache)
    digest = content_hash(model_dir)
    uri = name_or_path if name_or_path in BUILTIN_MODELS else str(model_dir)
    return ArtifactRef(stage="model", key=digest[:20], uri=uri, content_hash=digest)


def model_name(model: ArtifactRef | Path) -> str:
    """A model's name that holds on any machine: a built-in name, ``artifact:STAGE/KEY`` for
    a trained model, or ``sha256:HASH`` (its content) for a folder of the user's own."""
    if isinstance(model, Path):
        return f"sha256:{content_hash(model)}"
    if model.stage != "model":
        return f"artifact:{model.stage}/{model.key}"
    return model.uri if model.uri in BUILTIN_MODELS else f"sha256:{model.content_hash}"


base_model_task = task(base_model_ref, name="base_model", retries=1, retry_condition_fn=is_transient)
