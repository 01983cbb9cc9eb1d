"""On-policy SEGA as iterations: with a full fine-tune, AdamW's state goes from one
iteration's training to the next beside the model, so two iterations of one step are
exactly one training of two steps (the SEGA repository's single optimizer run)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from alignflow.config import SEGAConfig
from alignflow.tasks.stage import RunContext
from alignflow.tasks.train_sega import sega_objective
from alignflow.tasks.training import OPTIMIZER, OPTIMIZER_FILE, fit_on_rank
from alignflow.workers.chat import prompt_ids

CONFIG = SEGAConfig(full_finetune=True, lr=1e-3, max_grad_norm=1e9)


def _groups(tokenizer) -> list[dict]:
    eot = tokenizer.eos_token_id
    prompt = prompt_ids(tokenizer, "Name a colour.")
    return [
        {"prompt_id": "g", "prompt_ids": prompt, "responses": [[40, 50, eot], [60, eot]], "advantages": [0.5, -0.5]}
    ]


def _train(ctx, key, model_dir, rows, config, carry=False, optimizer_state=None):
    return fit_on_rank(
        ctx,
        "train_sega",
        key,
        model_dir,
        "tiny",
        rows,
        config,
        lambda tokenizer: sega_objective(config, tokenizer.pad_token_id),
        None,
        carry=carry,
        optimizer_state=optimizer_state,
    )


def _weights(out) -> dict[str, torch.Tensor]:
    return load_file(out.dirs["merged"] / "model.safetensors")


def test_two_one_step_iterations_with_the_carried_state_are_one_two_step_run(tiny_model_dir, tokenizer, tmp_path):
    ctx = RunContext(artifact_root=str(tmp_path / "artifacts"), model_cache=str(tmp_path / "models"))
    rows = _groups(tokenizer)
    first = _train(ctx, "it1", tiny_model_dir, rows, CONFIG, carry=True)
    assert (first.dirs[OPTIMIZER] / OPTIMIZER_FILE).exists()
    second = _train(
        ctx,
        "it2",
        first.dirs["merged"],
        rows,
        CONFIG,
        carry=True,
        optimizer_state=first.dirs[OPTIMIZER] / OPTIMIZER_FILE,
    )
    fresh = _train(ctx, "it2-fresh", first.dirs["merged"], rows, CONFIG)
    together = _train(ctx, "both", tiny_model_dir, rows, CONFIG.model_copy(update={"epochs": 2}))
    assert OPTIMIZER not in together.dirs
    chained, single, restarted = _weights(second), _weights(together), _weights(fresh)
    for name, value in single.items():
        torch.testing.assert_close(chained[name], value, rtol=1e-5, atol=1e-7)
    # the check can fail: a fresh AdamW's first step (m = g, v = g^2) moves every weight by ~lr
    assert any(not torch.allclose(restarted[n], single[n], rtol=1e-5, atol=1e-7) for n in single)
    assert second.metrics["steps"] == 1 and together.metrics["steps"] == 2


@pytest.mark.parametrize("update", [{"full_finetune": False}, {"distributed": {"strategy": "zero2"}}])
def test_only_a_one_process_full_fine_tune_carries_the_state(update):
    from alignflow.tasks.training import carries_optimizer

    assert carries_optimizer(CONFIG)
    assert not carries_optimizer(SEGAConfig.model_validate({**CONFIG.model_dump(), **update}))
