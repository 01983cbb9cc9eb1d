"""The tiny model loaded once per test module, for the stage logic that needs a real tokenizer or forward pass."""

from __future__ import annotations

import pytest

from alignflow.workers.models import load_causal_lm


@pytest.fixture(scope="module")
def model_and_tokenizer(tiny_model_dir):
    return load_causal_lm(tiny_model_dir)


@pytest.fixture(scope="module")
def tokenizer(model_and_tokenizer):
    return model_and_tokenizer[1]
