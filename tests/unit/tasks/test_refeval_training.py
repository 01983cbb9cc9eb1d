"""RefEval's training choices: SFT examples from references (tasks/train_ref_sft.py), the beta
sweep's configs and its pick by validation loss (flows/self_improve.py)."""

from __future__ import annotations

import pytest

from alignflow.config import DPOConfig, DPOSweepConfig, ReferenceSFTConfig, SelfImproveConfig
from alignflow.flows.self_improve import lowest_validation_loss
from alignflow.tasks.train_ref_sft import reference_examples
from alignflow.workers.chat import prompt_ids, response_ids

PROMPTS = [
    {"id": "paris", "prompt": "What is the capital of France?", "reference": "The capital of France is Paris."},
    {"id": "long", "prompt": "Name a colour.", "reference": "Red, " * 40 + "and blue."},
]


def test_reference_examples_are_the_reference_as_the_reply_with_the_prompt_apart(tokenizer):
    eot = tokenizer.convert_tokens_to_ids("<|im_end|>")
    [row, long] = reference_examples(tokenizer, [eot], PROMPTS, ReferenceSFTConfig())
    assert row["prompt_id"] == "paris"
    assert row["prompt_ids"] == prompt_ids(tokenizer, PROMPTS[0]["prompt"])
    assert row["target_ids"][-1] == eot and eot not in row["target_ids"][:-1]
    assert tokenizer.decode(row["target_ids"][:-1]) == PROMPTS[0]["reference"]
    assert long["prompt_id"] == "long"


def test_a_reference_over_max_reference_tokens_is_left_out_not_cut(tokenizer):
    eot = tokenizer.convert_tokens_to_ids("<|im_end|>")
    short = len(response_ids(tokenizer, PROMPTS[0]["prompt"], PROMPTS[0]["reference"], [eot]))
    rows = reference_examples(tokenizer, [eot], PROMPTS, ReferenceSFTConfig(max_reference_tokens=short))
    assert [r["prompt_id"] for r in rows] == ["paris"]


# validation metrics of a 3-beta sweep as train_dpo manifests record them (after_loss: the best checkpoint's)
SWEEP = {
    0.01: {"eval_split": "val", "after_loss": 0.6812},
    0.05: {"eval_split": "val", "after_loss": 0.6402},
    0.2: {"eval_split": "val", "after_loss": 0.7105},
}


def test_the_sweep_keeps_the_beta_with_the_lowest_validation_loss():
    assert lowest_validation_loss(SWEEP) == 0.05


def test_a_validation_loss_tie_goes_to_the_beta_listed_first():
    tied = {**SWEEP, 0.2: {"eval_split": "val", "after_loss": 0.6402}}
    assert lowest_validation_loss(tied) == 0.05
    assert lowest_validation_loss(dict(reversed(tied.items()))) == 0.2


def test_a_beta_trained_without_validation_pairs_cannot_be_compared():
    unvalidated = {**SWEEP, 0.01: {"eval_split": "train", "after_loss": 0.1}}
    with pytest.raises(ValueError, match=r"beta=0\.01: no validation pairs"):
        lowest_validation_loss(unvalidated)


def test_a_beta_list_gives_one_dpo_config_per_value_and_one_beta_keeps_its_key():
    sweep = DPOSweepConfig(beta=[0.005, 0.01, 0.2], lr=1e-4)
    trainings = sweep.trainings()
    assert [type(t) for t in trainings] == [DPOConfig] * 3
    assert [t.beta for t in trainings] == [0.005, 0.01, 0.2] and {t.lr for t in trainings} == {1e-4}
    # one beta: the same train_dpo config (and so the same cached artifact) as before sweeps existed
    assert DPOSweepConfig(beta=0.1).trainings()[0].model_dump() == DPOConfig(beta=0.1).model_dump()


@pytest.mark.parametrize("beta", [[], [0.1, 0.1], [0.1, -0.5]])
def test_bad_beta_lists_are_refused(beta):
    with pytest.raises(ValueError, match="dpo.beta"):
        SelfImproveConfig.model_validate({"dpo": {"beta": beta}})


def test_a_sweep_without_anything_to_validate_on_is_refused():
    with pytest.raises(ValueError, match="validation_prompts or dpo.val_fraction"):
        SelfImproveConfig.model_validate({"dpo": {"beta": [0.01, 0.1], "val_fraction": 0.0}})
    SelfImproveConfig.model_validate(
        {"dpo": {"beta": [0.01, 0.1], "val_fraction": 0.0}, "validation_prompts": "v.jsonl"}
    )


def test_the_paper_recipe_loads_with_upstreams_settings():
    from pathlib import Path

    from alignflow.config import load_config

    config = load_config(SelfImproveConfig, Path(__file__).resolve().parents[3] / "configs" / "refeval_paper.yaml")
    sample, dpo = config.sample, config.dpo
    assert (sample.n, sample.temperature, sample.top_p, sample.max_new_tokens) == (5, 0.8, 0.95, 2048)
    assert dpo.full_finetune and dpo.lr == 5e-7 and dpo.warmup_ratio == 0.1 and dpo.epochs == 1
    assert dpo.batch_size * dpo.grad_accum == 64 and dpo.weight_decay == 0.01
    assert dpo.distributed.strategy == "zero3" and dpo.betas() == [0.005, 0.01, 0.02, 0.05, 0.2]
    assert config.sft.enabled and config.validation_prompts and config.judge.model == "initial"
