"""GEM's numbers by hand: entropy, Eq. 1 spans and score, SEGA advantages, loss and gradient."""

from __future__ import annotations

import math

import pytest
import torch

from alignflow.config import EntropyConfig
from alignflow.tasks.entropy import Spans, eq1_score, fork_entropy, split_spans, top_m_count
from alignflow.tasks.train_sega import group_advantages, kl_penalty, sega_loss
from alignflow.workers.scoring import token_entropy


def test_token_entropy_is_log_v_for_uniform_and_zero_for_one_hot():
    vocab = 400
    uniform = torch.log_softmax(torch.zeros(vocab), dim=-1)
    assert float(token_entropy(uniform)) == pytest.approx(math.log(vocab), rel=1e-6)
    logits = torch.zeros(vocab)
    logits[7] = 1e4  # every other token's probability underflows to exactly 0
    assert float(token_entropy(torch.log_softmax(logits, dim=-1))) == 0.0
    rows = torch.stack([uniform, torch.log_softmax(logits, dim=-1)])  # one entropy per row
    assert token_entropy(rows).tolist() == pytest.approx([math.log(vocab), 0.0], rel=1e-6)


# text "Think. Final Answer: 42" as 6 tokens with these start offsets
TEXT = "Think. Final Answer: 42"
OFFSETS = [0, 5, 6, 12, 19, 20]  # "Think" "." " Final" " Answer" ":" " 42"
ENTROPIES = [2.0, 1.0, 0.5, 0.4, 0.3, 0.2]
MARKER_RULE = EntropyConfig(preset="marker", final_window=3)


def test_marker_splits_reasoning_from_final_answer():
    spans = split_spans(ENTROPIES, OFFSETS, TEXT, MARKER_RULE)
    # the marker starts at char 7, inside the token " Final" (offset 6): reasoning is "Think" "."
    assert spans == Spans(reasoning=[2.0, 1.0], final=[0.2], marker_found=True)


def test_without_marker_the_last_window_is_the_answer():
    spans = split_spans(ENTROPIES, OFFSETS, TEXT, MARKER_RULE.model_copy(update={"marker": "Answer is:"}))
    assert spans == Spans(reasoning=[2.0, 1.0, 0.5], final=[0.4, 0.3, 0.2], marker_found=False)


def test_marker_with_nothing_after_it_falls_back_to_the_window():
    config = MARKER_RULE.model_copy(update={"final_window": 1})
    spans = split_spans([1.0, 2.0, 3.0], [0, 5, 12], "Think Final Answer:", config)
    assert spans == Spans(reasoning=[1.0, 2.0], final=[3.0], marker_found=False)


def test_short_candidate_is_all_answer():
    assert split_spans([0.7], [0], "x", MARKER_RULE) == Spans([], [0.7], False)


def test_top_m_fraction_rounds_up_or_down_and_count_is_capped():
    assert top_m_count(0.1, 25) == 3  # ceil(2.5), the SEGA repository
    assert top_m_count(0.1, 25, "floor") == 2  # floor(2.5), GEM's
    assert top_m_count(0.1, 3) == 1
    assert top_m_count(0.1, 3, "floor") == 1  # floor(0.3) = 0, at least 1
    assert top_m_count(4, 3) == 3
    assert top_m_count(0.1, 0) == 0


def test_eq1_score_by_hand():
    spans = Spans(reasoning=[0.5, 3.0, 1.0, 2.0], final=[0.2, 0.4], marker_found=True)
    # top 50% of 4 reasoning entropies = {3.0, 2.0}, mean 2.5; H_final = 0.3
    config = EntropyConfig(lambda_fork=0.4, top_m=0.5)
    assert eq1_score(spans, config) == pytest.approx(-0.3 + 0.4 * 2.5)
    assert eq1_score(Spans([], [1.0], False), config) == pytest.approx(-1.0)


# 10 content tokens; the text holds GEM's marker "Final Answer" (SEGA's rule never looks at the text)
TEN = [3.0, 1.0, 2.0, 0.5, 4.0, 1.5, 2.5, 0.1, 0.2, 0.3]


def test_presets_fill_what_each_repository_uses_and_explicit_fields_win():
    sega, gem = EntropyConfig(), EntropyConfig(preset="gem")
    assert (sega.lambda_fork, sega.top_m_rounding, sega.final_span, sega.final_window) == (
        0.4,
        "ceil",
        "last_tokens",
        3,
    )
    assert (gem.lambda_fork, gem.top_m_rounding, gem.final_span, gem.marker) == (
        1.0,
        "floor",
        "fraction",
        "Final Answer",
    )
    assert EntropyConfig(preset="gem", lambda_fork=0.5).lambda_fork == 0.5
    assert EntropyConfig.model_validate(gem.model_dump()) == gem  # a dumped config reads back the same


def test_sega_preset_by_hand():
    """The last 3 tokens are final (mean 0.2); top ceil(0.7) = 1 of the 7 others (4.0); S = -0.2 + 0.4 * 4."""
    config = EntropyConfig(preset="sega")
    spans = split_spans(TEN, [], "Reasoning. Final Answer: x", config)
    assert spans == Spans(TEN[:7], TEN[7:], False)
    assert eq1_score(spans, config) == pytest.approx(-0.2 + 0.4 * 4.0)


def test_gem_preset_by_hand_with_and_without_the_marker():
    """GEM splits at int(10 * 0.75) = 7 when "Final Answer" is in the text (final: the last 3,
    mean 0.2), else at int(10 * 0.8) = 8 (final: the last 2, mean 0.25); top floor(0.7 or 0.8)
    -> at least 1 of the reasoning tokens (4.0); lambda 1."""
    config = EntropyConfig(preset="gem")
    with_marker = split_spans(TEN, [], "Reasoning. Final Answer: x", config)
    assert with_marker == Spans(TEN[:7], TEN[7:], True)
    assert eq1_score(with_marker, config) == pytest.approx(-0.2 + 4.0)
    without = split_spans(TEN, [], "Reasoning, then x", config)
    assert without == Spans(TEN[:8], TEN[8:], False)
    assert eq1_score(without, config) == pytest.approx(-0.25 + 4.0)
    # 20 tokens: top floor(0.1 * 15) = 1 (ceil would take 2)
    twenty = [float(i) for i in range(20)]
    assert fork_entropy(split_spans(twenty, [], "Final Answer: y", config), 0.1, "floor") == 14.0


def test_identity_advantages_are_centred_scores():
    a = group_advantages(torch.tensor([1.0, 2.0, 6.0]), "identity")
    assert a.tolist() == pytest.approx([-2.0, -1.0, 3.0])
    assert float(a.sum()) == pytest.approx(0.0, abs=1e-6)


def test_softmax_advantages_by_hand():
    scores = torch.tensor([0.0, math.log(3.0)])  # softmax = [1/4, 3/4]
    assert group_advantages(scores, "softmax").tolist() == pytest.approx([-0.25, 0.25])
    z = group_advantages(scores, "softmax", zscore=True)  # std of [1/4, 3/4] = 1/4
    assert z.tolist() == pytest.approx([-1.0, 1.0], rel=1e-5)


def test_sega_loss_and_gradient_by_hand():
    logp = torch.tensor([-3.0, -5.0, -4.0], requires_grad=True)
    advantages = torch.tensor([0.5, -0.25, -0.25])
    loss = sega_loss(logp, advantages)
    assert loss.item() == pytest.approx(-(0.5 * -3 + -0.25 * -5 + -0.25 * -4) / 3)
    loss.backward()
    assert logp.grad.tolist() == pytest.approx([-0.5 / 3, 0.25 / 3, 0.25 / 3])  # dL/dlogp_i = -A_i / k


def test_sega_advantages_get_no_gradient_and_length_normalisation():
    logp = torch.tensor([-4.0, -2.0], requires_grad=True)
    scores = torch.tensor([1.0, 0.0], requires_grad=True)
    loss = sega_loss(logp, group_advantages(scores, "identity"), lengths=torch.tensor([4.0, 2.0]))
    assert loss.item() == pytest.approx(-(0.5 * -1.0 + -0.5 * -1.0) / 2)
    loss.backward()
    assert scores.grad is None  # stopgrad(A)


def test_kl_penalty_zero_when_equal_and_positive_otherwise():
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    same = torch.tensor([[-1.0, -2.0, -9.0]])
    assert float(kl_penalty(same, same, mask)) == 0.0
    d = math.log(2.0)  # reference twice as likely on the first token
    policy = torch.tensor([[-1.0, -2.0, 0.0]])
    reference = torch.tensor([[-1.0 + d, -2.0, 5.0]])  # the padded position is ignored
    assert float(kl_penalty(policy, reference, mask)) == pytest.approx((2.0 - d - 1) / 2)


def test_preference_accuracy_reports_ties_separately():
    from alignflow.tasks.pref_accuracy import implicit_rewards, preference_accuracy

    chosen = implicit_rewards([-10.0, -4.0, -6.0, -3.0], beta=0.5)
    rejected = implicit_rewards([-12.0, -4.0, -5.0, -9.0], beta=0.5)
    out = preference_accuracy(chosen, rejected)
    low, high = out.pop("ci_low"), out.pop("ci_high")
    assert out == {
        "pairs": 4,
        "accuracy": 0.5,
        "ties": 0.25,
        "accuracy_ties_correct": 0.75,  # the SEGA repository's r_chosen >= r_rejected
        "mean_margin": pytest.approx(0.5 * (2 + 0 - 1 + 6) / 4),
    }
    assert low < 0.5 < high


def test_wilson_interval_by_hand():
    from alignflow.tasks.pref_accuracy import wilson_interval

    # 8 of 10: centre (0.8 + z^2/20) / (1 + z^2/10), half-width z sqrt(0.016 + z^2/400) / (1 + z^2/10)
    assert wilson_interval(8, 10) == pytest.approx((0.4902, 0.9433), abs=1e-4)
    low, high = wilson_interval(0, 10)  # sound at the edge: [0, 0.278]
    assert low == pytest.approx(0.0, abs=1e-12) and high == pytest.approx(0.2775, abs=1e-4)


def test_implicit_reward_with_reference():
    from alignflow.tasks.pref_accuracy import implicit_rewards, preference_accuracy

    assert implicit_rewards([-3.0, -5.0], beta=0.1, reference=[-4.0, -4.0]) == pytest.approx([0.1, -0.1])
    with pytest.raises(ValueError, match="same non-zero number"):
        preference_accuracy([], [])
