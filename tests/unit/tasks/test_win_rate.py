"""Win-rate arithmetic on hand-worked verdicts (tasks/win_rate.py), and the AlpacaEval
format written and read back as prompts (tasks/alpaca_eval.py)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from alignflow.tasks.alpaca_eval import alpaca_eval_records, write_alpaca_eval
from alignflow.tasks.prompts import PromptFileError, prompt_source, read_prompt_rows, read_prompts
from alignflow.tasks.win_rate import (
    Matchup,
    bootstrap_ci,
    fit_intercept_and_slope,
    instruction_verdict,
    length_controlled_win_rate,
    orders_agree,
    win_rate_metrics,
)


def matchup(first, second, policy_chars=10, initial_chars=10, pid="p") -> Matchup:
    return Matchup(pid, first, second, policy_chars, initial_chars)


@pytest.mark.parametrize(
    "first, second, margin, verdict, agree",
    [
        (0.9, 0.8, 0.0, 1.0, True),  # both orders pick the policy
        (0.2, 0.1, 0.0, 0.0, True),  # both pick the initial model
        (0.9, 0.2, 0.0, 0.5, False),  # position bias: each order picks whichever is shown first
        (0.5, 0.9, 0.0, 0.5, False),  # one order undecided (an unparsed verdict is exactly 0.5)
        (None, None, 0.0, 0.5, False),  # identical answers: not judged
        (0.55, 0.58, 0.0, 1.0, True),
        (0.55, 0.58, 0.1, 0.5, False),  # within the tie margin of 0.5: no side picked
    ],
)
def test_an_instruction_is_won_only_when_both_orders_pick_the_policy(first, second, margin, verdict, agree):
    m = matchup(first, second)
    assert instruction_verdict(m, margin) == verdict
    assert orders_agree(m, margin) is agree


def test_headline_numbers_of_four_hand_worked_instructions():
    metrics = win_rate_metrics(
        [
            matchup(0.9, 0.7, 100, 50, "win"),
            matchup(0.3, 0.2, 40, 60, "loss"),
            matchup(0.8, 0.3, 80, 80, "orders disagree"),
            matchup(None, None, 30, 30, "identical answers"),
        ]
    )
    assert metrics["win_rate"] == (1 + 0 + 0.5 + 0.5) / 4
    assert (metrics["wins"], metrics["losses"], metrics["ties"], metrics["not_judged"]) == (1, 1, 2, 1)
    assert metrics["position_consistency"] == pytest.approx(2 / 3)  # of the 3 judged; identical answers left out
    assert metrics["policy_mean_chars"] == (100 + 40 + 80 + 30) / 4
    assert metrics["initial_mean_chars"] == (50 + 60 + 80 + 30) / 4
    assert metrics["win_rate_ci_low"] <= metrics["win_rate"] <= metrics["win_rate_ci_high"]
    # (0.9 + 0.7) / 2, (0.3 + 0.2) / 2, (0.8 + 0.3) / 2 over the 3 judged
    assert metrics["mean_preference"] == pytest.approx((0.8 + 0.25 + 0.55) / 3)


def test_mean_preference_cancels_a_judge_that_always_prefers_output_a():
    """p(a) = 0.87 + a small real preference d: each order alone says little, their mean says d."""
    lean = [0.02, 0.01, 0.03, -0.01]
    matchups = [matchup(0.87 + d, 1 - (0.87 - d), pid=str(i)) for i, d in enumerate(lean)]
    metrics = win_rate_metrics(matchups)
    assert metrics["position_consistency"] == 0.0 and metrics["win_rate"] == 0.5
    assert metrics["mean_preference"] == pytest.approx(0.5 + sum(lean) / len(lean))
    assert metrics["mean_preference_ci_low"] <= metrics["mean_preference"] <= metrics["mean_preference_ci_high"]


def test_bootstrap_interval_matches_the_normal_approximation_and_is_seeded():
    verdicts = np.array([1.0, 0.0] * 50)  # mean 0.5, standard error 0.05
    low, high = bootstrap_ci(verdicts, resamples=2000, seed=0, confidence=0.95)
    assert low == pytest.approx(0.5 - 1.96 * 0.05, abs=0.02) and high == pytest.approx(0.5 + 1.96 * 0.05, abs=0.02)
    assert bootstrap_ci(verdicts, 2000, 0, 0.95) == (low, high)
    assert bootstrap_ci(np.ones(7), 100, 0, 0.95) == (1.0, 1.0)


def two_length_groups() -> tuple[np.ndarray, np.ndarray]:
    """8 instructions where the policy's answer is 10 characters longer (6 wins, 2 losses) and
    2 where it is 10 shorter (1 win, 1 loss): raw win rate 7/10."""
    verdicts = np.array([1.0] * 6 + [0.0] * 2 + [1.0, 0.0])
    length_diff = np.array([10.0] * 8 + [-10.0] * 2)
    return verdicts, length_diff


def test_logistic_fit_reproduces_each_group_mean():
    # two feature values: the unpenalised fit matches each group's win rate exactly:
    # sigmoid(b0 + b1) = 6/8 and sigmoid(b0 - b1) = 1/2, so b0 = b1 = ln(3)/2
    verdicts, length_diff = two_length_groups()
    b0, b1 = fit_intercept_and_slope(np.sign(length_diff), verdicts, slope_l2=0.0)
    assert b0 == pytest.approx(math.log(3) / 2, abs=1e-9) and b1 == pytest.approx(math.log(3) / 2, abs=1e-9)


def test_length_controlled_win_rate_discounts_wins_that_come_with_longer_answers():
    verdicts, length_diff = two_length_groups()
    # tanh(d / std) is +c or -c: at zero length difference, sigmoid(b0) = sqrt(3) / (1 + sqrt(3))
    expected = math.sqrt(3) / (1 + math.sqrt(3))
    assert length_controlled_win_rate(verdicts, length_diff) == pytest.approx(expected, abs=1e-3)
    assert expected < verdicts.mean() == 0.7


def test_length_controlled_win_rate_without_length_differences_is_the_win_rate():
    verdicts = np.array([1.0, 0.5, 0.0, 1.0])  # ties are soft targets of 0.5
    assert length_controlled_win_rate(verdicts, np.zeros(4)) == pytest.approx(0.625, abs=1e-9)
    assert length_controlled_win_rate(np.ones(3), np.array([5.0, -5.0, 0.0])) == 1.0


def test_win_rate_needs_instructions():
    with pytest.raises(ValueError, match="no instructions"):
        win_rate_metrics([])


def test_alpaca_eval_export_reads_back_as_prompts_with_the_outputs_as_references(tmp_path):
    answers = [{"prompt": "Name a prime.", "response": "7 is prime."}, {"prompt": "Say hi", "response": "Hi! 👋"}]
    path = write_alpaca_eval(tmp_path / "outputs.json", alpaca_eval_records(answers, "my-model"))
    assert json.loads(path.read_text())[0] == {
        "instruction": "Name a prime.",
        "output": "7 is prime.",
        "generator": "my-model",
    }
    assert read_prompt_rows(path) == [
        {"id": "item-1", "prompt": "Name a prime.", "reference": "7 is prime."},
        {"id": "item-2", "prompt": "Say hi", "reference": "Hi! 👋"},
    ]


@pytest.mark.parametrize(
    "content, message",
    [
        ('{"instruction": "x"}', "expected a non-empty JSON list"),
        ('[{"instruction": "x", "output": "y"}, {"instruction": "z"}]', "item 2: field 'output' must be non-empty"),
        ('[["x", "y"]]', "item 1: expected an object"),
        ("[{", ":1: bad JSON"),
    ],
)
def test_a_bad_alpaca_eval_file_names_the_item(tmp_path, content, message):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(PromptFileError, match=message):
        read_prompt_rows(path)


def test_builtin_held_out_instructions_are_not_the_demo_training_prompts():
    demo, held_out = (read_prompts(prompt_source(spec, None)) for spec in ("builtin:demo", "builtin:heldout"))
    assert len(held_out) >= 30
    assert not {r["id"] for r in demo} & {r["id"] for r in held_out}
    assert not {r["prompt"].lower() for r in demo} & {r["prompt"].lower() for r in held_out}


@pytest.mark.parametrize(
    "spec, key",
    [
        ("artifact:0123abcd", "0123abcd"),
        ("artifact:train_dpo/0123abcd", "0123abcd"),  # how artifacts name a trained model (model_name)
        ("/runs/artifacts/train_dpo/0123abcd/", "0123abcd"),  # its URI, as a run summary prints it
        ("/models/my-policy", None),
        ("smollm2-135m-instruct", None),
    ],
)
def test_a_policy_spec_names_an_artifact_or_a_model(spec, key):
    from alignflow.flows.refeval_eval import trained_model_key

    assert trained_model_key(spec, "/runs/artifacts") == key


def test_eval_config_keeps_one_greedy_answer_under_partial_sample_overrides():
    from alignflow.config import ConfigError, RefEvalEvalConfig, load_config

    sample = load_config(RefEvalEvalConfig, None, ["sample.max_new_tokens=64"]).sample
    assert (sample.n, sample.temperature, sample.max_new_tokens) == (1, 0.0, 64)
    with pytest.raises(ConfigError, match="sample.n must be 1"):
        load_config(RefEvalEvalConfig, None, ["sample.n=2"])
