"""Which model judges each round (flows/self_improve.py): ``judge.model`` initial, policy or a path."""

from __future__ import annotations

import pytest

from alignflow.config import SelfImproveConfig
from alignflow.flows.self_improve import Steps, run_rounds


def _recording_steps(judged_by: list):
    """Stages that only name what they were given; the judge's model is recorded per round."""
    rounds = iter(range(1, 100))
    return Steps(
        prompts=lambda ctx, source: "prompts",
        base_model=lambda name, cache: f"model:{name}",
        sample=lambda ctx, config, policy, prompts: f"candidates of {policy}",
        judge=lambda ctx, config, judge_model, candidates: judged_by.append(judge_model),
        pairs=lambda ctx, config, candidates, judgments: "pairs",
        logprobs=lambda ctx, config, reference, pairs: "pairs with reference",
        train_dpo=lambda ctx, config, policy, pairs: f"policy after round {next(rounds)}",
    )


@pytest.mark.parametrize(
    "judge_model,expected",
    [
        ("initial", ["model:base", "model:base", "model:base"]),
        ("policy", ["model:base", "policy after round 1", "policy after round 2"]),
        ("/models/judge", ["model:/models/judge"] * 3),
    ],
)
def test_the_judge_is_the_initial_model_unless_named_otherwise(tmp_path, judge_model, expected):
    config = SelfImproveConfig.model_validate(
        {"model": "base", "rounds": 3, "paths": {"home": str(tmp_path)}, "judge": {"model": judge_model}}
    )
    judged_by = []
    run_rounds(config, _recording_steps(judged_by))
    assert judged_by == expected


def test_the_default_judge_is_the_initial_model():
    assert SelfImproveConfig().judge.model == "initial"
