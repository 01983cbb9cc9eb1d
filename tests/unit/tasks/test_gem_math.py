"""GEM's numbers by hand: entropy, Eq. 1 spans and score, SEGA advantages, loss and gradient."""

from __future__ import annotations

import math

import pytest
import torch

from alignflow.tasks.entropy import Spans, eq1_score, split_spans, top_m_count
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


def test_marker_splits_reasoning_from_final_answer():
    spans = split_spans(ENTROPIES, OFFSETS, TEXT, "Final Answer:", final_window=3)
    # the marker starts at char 7, inside the token " Final" (offset 6): reasoning is "Think" "."
    assert spans == Spans(reasoning=[2.0, 1.0], final=[0.2], marker_found=True)


def test_without_marker_the_last_window_is_the_answer():
    spans = split_spans(ENTROPIES, OFFSETS, TEXT, "Answer is:", final_window=3)
    assert spans == Spans(reasoning=[2.0, 1.0, 0.5], final=[0.4, 0.3, 0.2], marker_found=False)


def test_marker_with_nothing_after_it_falls_back_to_the_window():
    spans = split_spans([1.0, 2.0, 3.0], [0, 5, 12], "Think Final Answer:", "Final Answer:", final_window=1)
    assert spans == Spans(reasoning=[1.0, 2.0], final=[3.0], marker_found=False)


def test_short_candidate_is_all_answer():
    assert split_spans([0.7], [0], "x", "Final Answer:", final_window=3) == Spans([], [0.7], False)


def test_top_m_fraction_rounds_up_and_count_is_capped():
    assert top_m_count(0.1, 25) == 3  # ceil(2.5)
    assert top_m_count(0.1, 3) == 1
    assert top_m_count(4, 3) == 3
    assert top_m_count(0.1, 0) == 0


def test_eq1_score_by_hand():
    spans = Spans(reasoning=[0.5, 3.0, 1.0, 2.0], final=[0.2, 0.4], marker_found=True)
    # top 50% of 4 reasoning entropies = {3.0, 2.0}, mean 2.5; H_final = 0.3
    assert eq1_score(spans, lambda_fork=0.4, top_m=0.5) == pytest.approx(-0.3 + 0.4 * 2.5)
    assert eq1_score(Spans([], [1.0], False), lambda_fork=0.4, top_m=0.1) == pytest.approx(-1.0)


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
    assert out == {"pairs": 4, "accuracy": 0.5, "ties": 0.25, "mean_margin": pytest.approx(0.5 * (2 + 0 - 1 + 6) / 4)}


def test_implicit_reward_with_reference():
    from alignflow.tasks.pref_accuracy import implicit_rewards, preference_accuracy

    assert implicit_rewards([-3.0, -5.0], beta=0.1, reference=[-4.0, -4.0]) == pytest.approx([0.1, -0.1])
    with pytest.raises(ValueError, match="same non-zero number"):
        preference_accuracy([], [])
