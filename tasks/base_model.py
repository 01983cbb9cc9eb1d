"""base_model: resolve a built-in name or HF directory to a model reference
(converting the built-in GGUF once), content-hashed so downstream keys change
when the weights do."""
from __future__ import annotations

from prefect import task

from alignflow.storage.artifacts import ArtifactRef
from alignflow.tasks.stage import is_transient
from alignflow.workers.models import content_hash, resolve_model_dir


def base_model_ref(name_or_path: str, model_cache: str) -> ArtifactRef:
    model_dir = resolve_model_dir(name_or_path, model_cache)
    digest = content_hash(model_dir)
    return ArtifactRef(stage="model", key=digest[:20], uri=str(model_dir), content_hash=digest)


base_model_task = task(base_model_ref, name="base_model", retries=1, retry_condition_fn=is_transient)
