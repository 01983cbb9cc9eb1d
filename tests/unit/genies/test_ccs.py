"""ccs's arithmetic (genies/interventions/ccs.py): the loss, the credence, the
orientation from training labels, P(A preferred) from two credences, and that the
restarts keep the lowest loss and find a planted truth direction."""

from __future__ import annotations

import math

import pytest
import torch

from alignflow.config import GeniesScoringConfig
from alignflow.genies.interventions.ccs import (
    CCSConfig,
    best_probe,
    ccs_loss,
    centred,
    contrast_pair,
    credence,
    labelled_responses,
    orient,
    pair_probs,
    response_accuracy,
    train_probe,
)
from alignflow.workers.models import load_backbone

PAIRS = [
    {"prompt": "Q1 ### Response:\n", "response_a": "good", "response_b": "bad", "preferred": 0},
    {"prompt": "Q1 ### Response:\n", "response_a": "worse", "response_b": "good", "preferred": 1},  # shares "good"
    {"prompt": "Q2 ### Response:\n", "response_a": "meh", "response_b": "a fine answer", "preferred": 1},
]


def sigmoid(z: float) -> float:
    return 1.0 / (1.0 + math.exp(-z))


def probe_of(weight: list[float], bias: float) -> torch.nn.Linear:
    probe = torch.nn.Linear(len(weight), 1)
    with torch.no_grad():
        probe.weight.copy_(torch.tensor([weight]))
        probe.bias.fill_(bias)
    return probe


@torch.inference_mode()
def test_contrast_pair_reads_the_last_layer_at_the_final_eos_then_centres(tiny_model_dir):
    model, tokenizer = load_backbone(tiny_model_dir, "float32")
    question = CCSConfig().question
    yes, no, index = contrast_pair(model, tokenizer, PAIRS, GeniesScoringConfig(max_tokens=64), question)
    assert len(yes) == len(no) == 5 and index[0, 0] == index[1, 1]  # distinct sequences, each read once
    by_hand = {}
    for answer in ("Yes", "No"):
        rows = {}
        for (a, b), pair in zip(index.tolist(), PAIRS):
            for row, response in ((a, pair["response_a"]), (b, pair["response_b"])):
                text = (
                    tokenizer(pair["prompt"])["input_ids"] + tokenizer(response, add_special_tokens=False)["input_ids"]
                )
                tail = tokenizer(question + answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
                rows[row] = model(input_ids=torch.tensor([text + tail])).last_hidden_state[0, -1]
        states = torch.stack([rows[r] for r in range(5)])
        by_hand[answer] = states - states.mean(dim=0)
    torch.testing.assert_close(yes, by_hand["Yes"], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(no, by_hand["No"], atol=1e-5, rtol=1e-4)


def test_labelled_responses_list_the_preferred_then_the_dispreferred():
    index = torch.tensor([[0, 1], [2, 0], [3, 4]])
    rows, labels = labelled_responses(index, [{"preferred": 0}, {"preferred": 1}, {"preferred": 1}])
    assert rows.tolist() == [0, 0, 4, 1, 2, 3] and labels.tolist() == [1.0, 1.0, 1.0, 0.0, 0.0, 0.0]


def test_ccs_loss_by_hand():
    p_yes, p_no = torch.tensor([[0.9], [0.2]]), torch.tensor([[0.3], [0.6]])
    # confidence: min = (0.3, 0.2) -> (0.09 + 0.04) / 2; consistency: 0.9 - 0.7, 0.2 - 0.4 -> 0.04 each
    assert ccs_loss(p_yes, p_no).item() == pytest.approx(0.065 + 0.04)
    assert ccs_loss(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])).item() == 0.0  # confident and consistent
    assert ccs_loss(torch.tensor([0.5]), torch.tensor([0.5])).item() == pytest.approx(0.25)  # the lazy 1/2


def test_credence_by_hand():
    probe = probe_of([1.0, 0.0], 0.5)
    yes, no = torch.tensor([[2.0, 5.0]]), torch.tensor([[-1.0, 3.0]])
    expected = 0.5 * (sigmoid(2.5) + 1 - sigmoid(-0.5))
    assert credence(probe, yes, no).tolist() == pytest.approx([expected], abs=1e-12)
    assert centred(torch.tensor([[1.0, 2.0], [3.0, 6.0]])).tolist() == [[-1.0, -2.0], [1.0, 2.0]]


def test_orientation_negates_a_probe_that_points_at_the_dispreferred_responses():
    yes = torch.tensor([[1.0], [-1.0], [2.0], [-2.0]])
    no = -yes
    rows, labels = torch.arange(4), torch.tensor([0.0, 1.0, 0.0, 1.0])  # preferred where x+ is negative
    probe = probe_of([1.0], 0.0)
    before = credence(probe, yes, no)
    assert response_accuracy(before, rows, labels) == 0.0
    assert orient(probe, yes, no, rows, labels) is True
    assert probe.weight.item() == -1.0 and probe.bias.item() == -0.0
    after = credence(probe, yes, no)
    assert after.tolist() == pytest.approx((1 - before).tolist())  # negating the probe maps c to 1 - c
    assert response_accuracy(after, rows, labels) == 1.0
    assert orient(probe, yes, no, rows, labels) is False  # already right: left alone
    assert probe.weight.item() == -1.0


def test_pair_probability_is_a_good_and_b_bad_given_exactly_one():
    c = torch.tensor([0.8, 0.4, 1.0, 0.5], dtype=torch.double)
    index = torch.tensor([[0, 1], [1, 0], [3, 3], [2, 1]])
    expected_first = 0.8 * 0.6 / (0.8 * 0.6 + 0.4 * 0.2)
    p = pair_probs(c, index)
    assert p[:3] == pytest.approx([expected_first, 1 - expected_first, 0.5])
    assert math.isfinite(p[3]) and p[3] > 0.999  # a credence of exactly 1 stays finite


def test_the_restart_with_the_lowest_final_loss_is_kept():
    generator = torch.Generator().manual_seed(1)
    yes, no = torch.randn(10, 3, generator=generator), torch.randn(10, 3, generator=generator)
    config = CCSConfig(epochs=5, tries=3, seed=7)
    torch.manual_seed(7)
    losses = [train_probe(yes, no, config)[1] for _ in range(3)]
    probe, loss = best_probe(yes, no, config)
    assert len(set(losses)) == 3 and loss == min(losses)
    assert ccs_loss(torch.sigmoid(probe(yes)), torch.sigmoid(probe(no))).item() < loss  # one more step was taken


def test_ccs_finds_a_planted_truth_direction_without_labels():
    generator = torch.Generator().manual_seed(0)
    truth = (torch.rand(60, generator=generator) < 0.5).float()  # 1: the Yes statement is true
    sign = 2 * truth - 1
    direction = torch.tensor([3.0, 0.0, 0.0, 0.0, 0.0])
    yes = sign[:, None] * direction + torch.randn(60, 5, generator=generator)
    no = -sign[:, None] * direction + torch.randn(60, 5, generator=generator)
    yes, no = centred(yes), centred(no)
    probe, loss = best_probe(yes, no, CCSConfig(epochs=300, tries=2, lr=1e-2))
    assert loss < 0.05
    rows = torch.arange(60)
    orient(probe, yes, no, rows, truth)
    assert response_accuracy(credence(probe, yes, no), rows, truth) > 0.95
