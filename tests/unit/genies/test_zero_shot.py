"""zero_shot / few_shot arithmetic as GENIES computes it: each pair's summed log-probs
divided by its padded length minus one, then a two-way softmax; few-shot's seeded
examples per record."""

from __future__ import annotations

import math

import pytest

from alignflow.config import GeniesScoringConfig
from alignflow.genies.interventions.zero_shot import FewShot, FewShotConfig, normalised_probs, padded_lengths
from alignflow.genies.scoring import Sequences


def test_both_sides_of_a_pair_share_the_longer_sides_length():
    # pair 0: A = 3 + 2 tokens, B = 3 + 4 tokens -> padded 7, divisor 6
    # pair 1: A = 2 + 1 (sequence 3), B = sequence 0 again (3 + 2)  -> padded 5, divisor 4
    seqs = Sequences(
        prompts=[[1, 2, 3], [1, 2, 3], [9, 9], [9, 9]],
        responses=[[4, 5], [4, 5, 6, 7], [8], [0, 0, 0]],
        pair_index=[(0, 1), (2, 0)],
    )
    assert padded_lengths(seqs) == [6, 4]
    sums = [-3.0, -9.0, -2.0, -100.0]
    # pair 0: softmax(-3/6, -9/6) -> sigmoid(1.0); pair 1: softmax(-2/4, -3/4) -> sigmoid(0.25)
    assert normalised_probs(seqs, sums) == pytest.approx([1 / (1 + math.exp(-1.0)), 1 / (1 + math.exp(-0.25))])


def test_dividing_by_the_shared_length_changes_confidence_not_the_winner():
    seqs = Sequences(prompts=[[1] * 10, [1] * 10], responses=[[2] * 5, [2] * 20], pair_index=[(0, 1)])
    (p,) = normalised_probs(seqs, [-10.0, -12.0])
    assert p == pytest.approx(1 / (1 + math.exp(-2.0 / 29)))  # summed: sigmoid(2); GENIES: sigmoid(2 / 29)
    assert 0.5 < p < 1 / (1 + math.exp(-2.0))


def test_few_shot_draws_k_examples_per_record_from_the_seed():
    pool = [{"prompt": f"p{i}", "response": f"r{i}"} for i in range(20)]
    few_shot = FewShot(GeniesScoringConfig(), FewShotConfig(k=4, seed=1))
    first = few_shot.shots(pool, "test prompt A")
    assert len(first) == 4 and len({e["prompt"] for e in first}) == 4 and all(e in pool for e in first)
    assert few_shot.shots(pool, "test prompt A") == first  # the same record gets the same examples
    assert few_shot.shots(pool, "test prompt B") != first  # another record, another draw
    assert FewShot(GeniesScoringConfig(), FewShotConfig(k=4, seed=2)).shots(pool, "test prompt A") != first
    assert len(few_shot.shots(pool[:2], "x")) == 2  # a pool smaller than k gives all of it
