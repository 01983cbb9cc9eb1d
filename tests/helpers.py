"""Helpers the tests import (``from helpers import ...``; pytest puts tests/ on the path):
the tiny model builder, configs sized for it, the GENIES test data's location, and a
flow runner that returns the task runs Prefect recorded. Fixtures live in conftest.py."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import pytest
import torch

T = TypeVar("T")

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def _training_text() -> list[str]:
    demo = Path(__file__).resolve().parents[1] / "alignflow" / "data" / "demo_prompts.jsonl"
    lines = demo.read_text().splitlines()
    lines += ["Output (a)", "Output (b)", "Reference Output", "Instruction", "Answer with exactly"] * 20
    return lines


def build_tiny_model(out_dir: Path) -> Path:
    """A 2-layer, hidden-64 random Llama with a BPE tokenizer trained on the demo text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(
        _training_text(),
        trainers.BpeTrainer(
            vocab_size=400, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
        ),
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>", bos_token="<|im_start|>"
    )
    tokenizer.chat_template = CHATML
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def tiny_config_data(model_dir: Path, home: Path, **overrides) -> dict:
    """A self-improve config sized for the tiny model: seconds, not minutes."""
    data = {
        "model": str(model_dir),
        "limit_prompts": 6,
        "paths": {"home": str(home)},
        "sample": {"n": 3, "max_new_tokens": 8, "temperature": 1.0, "top_p": 1.0, "batch_size": 8},
        # a random model rarely puts "a"/"b" in its top 5: score them over the whole vocabulary
        "judge": {"top_logprobs": 512, "batch_size": 8, "max_prompt_tokens": 1024},
        # a random model almost never ends its turn within 8 tokens: pair its cut-off candidates anyway
        "pairs": {"keep_unfinished": True},
        "dpo": {
            "epochs": 3,
            "batch_size": 2,
            "lr": 1e-3,
            "eval_every": 1,
            "checkpoint_every": 1,
            "val_fraction": 0.3,
            "lora": {"r": 4, "alpha": 8},
        },
    }
    for dotted, value in overrides.items():
        node = data
        *parents, leaf = dotted.split("__")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return data


def gem_config_data(model_dir: Path, data_dir: Path, home: Path) -> dict:
    """A gem config sized for the tiny model and a few real GENIES pairs: 2 on-policy SEGA
    iterations of 1 step on 2 prompts, the shuffled control and the three baselines."""
    lora = {"r": 4, "alpha": 8}
    return {
        "model": str(model_dir),
        "genies_data_dir": str(data_dir),
        "paths": {"home": str(home)},
        "train": {"mmlu": "genies:alpaca_mmlu:train", "short": "genies:alpaca_short:train"},
        "eval": {"mmlu": "genies:alpaca_mmlu:test", "arc_easy": "genies:arc_easy:test"},
        "max_train_pairs": 6,
        "max_eval_pairs": 4,
        "shuffled_control": True,
        "sft": {"lr": 1e-3, "batch_size": 4, "val_fraction": 0.0, "lora": lora},
        "sample": {"cot": True, "n": 3, "max_new_tokens": 10},
        "sega": {
            "iterations": 2,
            "batch_size": 2,
            "lr": 1e-3,
            "zscore": True,
            "kl_coef": 0.05,
            "checkpoint_every": 1,
            "lora": lora,
        },
        "dpo": {"lr": 1e-3, "batch_size": 4, "val_fraction": 0.0, "lora": lora},
        "pro": {"lr": 1e-3, "batch_size": 2, "val_fraction": 0.0, "max_response_tokens": 48, "lora": lora},
        "pref_accuracy": {"max_response_tokens": 48},
    }


# The public GENIES release lives beside the repository in <repo>/../shared/genies-data; the
# tests extract only the distributions they use, into a session temp folder.
GENIES_SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "genies-data"
GENIES_TEST_DISTRIBUTIONS = ("alpaca_short", "alpaca_long", "alpaca_mmlu", "arc_easy")


def require_shared(path: Path, what: str) -> Path:
    """``path`` from ../shared; missing, the test skips on a developer machine and fails in CI
    (CI=true), where a skipped test would hide that the data never arrived."""
    if not path.exists():
        message = f"{what} not found at {path}"
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(f"{message} (CI=true: tests that need ../shared data fail rather than skip)")
        pytest.skip(message)
    return path


def run_with_task_runs(flow_fn, config):
    """Run a flow; return (its result, its task runs as the Prefect API recorded them)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    state = flow_fn(config=config, return_state=True)

    def final_task_runs():
        # A task run's state (its first one too) reaches the API asynchronously, after the flow returns.
        with get_client(sync_client=True) as client:
            runs = client.read_task_runs(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[state.state_details.flow_run_id]))
            )
        return runs if all(run.state is not None and run.state.is_final() for run in runs) else None

    return state.result(), wait_for(final_task_runs, 30, "the flow's task runs to reach final states")


def wait_for(check: Callable[[], T], timeout: float, what: str, every: float = 0.5) -> T:
    """Poll ``check`` until it returns something truthy; fail naming ``what`` after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while not (value := check()):
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(every)
    return value
