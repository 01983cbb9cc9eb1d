"""Candidate scores, pair choice and the pairs stage's row logic (tasks/pairs.py)."""

import pytest

from alignflow.config import PairsConfig
from alignflow.tasks.pairs import build_pairs, candidate_scores, choose_pair, group_by_prompt, unique_candidates


def _j(pid, a, b, p_a):
    return {"prompt_id": pid, "a": a, "b": b, "p_a": p_a, "parsed": True}


# Three candidates, all 6 ordered judgments (p_a = probability that the (a) side wins)
THREE = [
    _j("p", 0, 1, 0.9),
    _j("p", 1, 0, 0.2),
    _j("p", 0, 2, 0.7),
    _j("p", 2, 0, 0.4),
    _j("p", 1, 2, 0.6),
    _j("p", 2, 1, 0.5),
]
# candidate 0: as (a) 0.9, 0.7; as (b) 1-0.2 = 0.8, 1-0.4 = 0.6   -> (0.9+0.7+0.8+0.6)/4 = 3.0/4 = 0.75
# candidate 1: as (a) 0.2, 0.6; as (b) 1-0.9 = 0.1, 1-0.5 = 0.5   -> (0.2+0.6+0.1+0.5)/4 = 1.4/4 = 0.35
# candidate 2: as (a) 0.4, 0.5; as (b) 1-0.7 = 0.3, 1-0.6 = 0.4   -> (0.4+0.5+0.3+0.4)/4 = 1.6/4 = 0.40
EXPECTED = {("p", 0): 0.75, ("p", 1): 0.35, ("p", 2): 0.40}


def test_candidate_scores_three_candidates_hand_worked():
    scores = candidate_scores(THREE)
    assert scores.keys() == EXPECTED.keys()
    for key, value in EXPECTED.items():
        assert scores[key] == pytest.approx(value, abs=1e-12), key
    # each comparison hands out 1 unit of win probability: 6 comparisons / 4 entries per candidate = 1.5
    assert sum(scores.values()) == pytest.approx(1.5, abs=1e-12)


def test_candidate_scores_are_per_prompt():
    scores = candidate_scores([_j("p", 0, 1, 1.0), _j("q", 0, 1, 0.25)])
    assert scores == {("p", 0): 1.0, ("p", 1): 0.0, ("q", 0): 0.25, ("q", 1): 0.75}


def test_choose_pair_best_vs_worst():
    scored = [(i, EXPECTED[("p", i)]) for i in range(3)]
    assert choose_pair(scored, min_margin=0.0) == (0, 1)
    assert choose_pair(list(reversed(scored)), min_margin=0.0) == (0, 1)


def test_choose_pair_tie_for_best_goes_to_lower_index():
    assert choose_pair([(3, 0.8), (1, 0.8), (2, 0.1)], 0.0) == (1, 2)
    assert choose_pair([(1, 0.8), (3, 0.8), (2, 0.1)], 0.0) == (1, 2)
    # the tied higher-index candidate is then the worst when only two are left
    assert choose_pair([(5, 0.6), (4, 0.6), (0, 0.2)], 0.0) == (4, 0)


def test_choose_pair_tied_worst_is_deterministic():
    # candidates 0 and 2 tie for worst; the choice must not depend on input order
    a = choose_pair([(0, 0.2), (1, 0.8), (2, 0.2)], 0.0)
    b = choose_pair([(2, 0.2), (1, 0.8), (0, 0.2)], 0.0)
    assert a == b and a[0] == 1 and a[1] in (0, 2)


def test_choose_pair_all_equal_is_skipped():
    assert choose_pair([(0, 0.5), (1, 0.5), (2, 0.5)], 0.0) == "all_scores_equal"


def test_choose_pair_min_margin():
    # margin 0.75 - 0.35 = 0.40
    scored = [(0, 0.75), (1, 0.35), (2, 0.40)]
    assert choose_pair(scored, min_margin=0.5) == "below_min_margin"
    assert choose_pair(scored, min_margin=0.3) == (0, 1)


def test_choose_pair_fewer_than_two():
    assert choose_pair([], 0.0) == "fewer_than_2_candidates"
    assert choose_pair([(0, 0.9)], 0.0) == "fewer_than_2_candidates"


def _row(pid, cand, response, n_tokens=3, prompt="Q", finish_reason="stop"):
    return {
        "prompt_id": pid,
        "prompt": prompt,
        "reference": "R",
        "candidate": cand,
        "response": response,
        "token_ids": list(range(n_tokens)),
        "finish_reason": finish_reason,
    }


def test_unique_candidates_dedupes_exact_text_keeping_lowest_index():
    rows = [
        _row("p", 2, "Hello"),
        _row("p", 0, "hi"),
        _row("p", 1, "Hello"),
        _row("p", 3, "hello"),
        _row("p", 4, "Hello "),
    ]
    out = unique_candidates(rows)
    assert [(r["candidate"], r["response"]) for r in out] == [(0, "hi"), (1, "Hello"), (3, "hello"), (4, "Hello ")]


def test_group_by_prompt_keeps_order():
    rows = [_row("p", 0, "x"), _row("q", 0, "y"), _row("p", 1, "z")]
    groups = group_by_prompt(rows)
    assert list(groups) == ["p", "q"]
    assert [r["response"] for r in groups["p"]] == ["x", "z"]


def test_build_pairs_hand_worked():
    cands = [_row("p", 0, "best"), _row("p", 1, "worst"), _row("p", 2, "middle")]
    pairs, metrics = build_pairs(cands, THREE, PairsConfig(max_response_tokens=10))
    assert len(pairs) == 1
    pair = pairs[0]
    assert pair["prompt_id"] == "p" and pair["prompt"] == "Q" and pair["reference"] == "R"
    assert (pair["chosen"], pair["rejected"]) == ("best", "worst")
    assert (pair["chosen_candidate"], pair["rejected_candidate"]) == (0, 1)
    assert pair["chosen_score"] == pytest.approx(0.75) and pair["rejected_score"] == pytest.approx(0.35)
    assert metrics == {"rows_out": 1, "unfinished_candidates": 0, "mean_margin": 0.4}


def test_build_pairs_length_filter_drops_long_responses():
    # the worst candidate (1) is 11 tokens long: with max 10 it is out, so 2 (score 0.40) is rejected
    cands = [_row("p", 0, "best", 10), _row("p", 1, "worst", 11), _row("p", 2, "middle", 4)]
    pairs, metrics = build_pairs(cands, THREE, PairsConfig(max_response_tokens=10))
    assert [(p["chosen_candidate"], p["rejected_candidate"]) for p in pairs] == [(0, 2)]
    assert metrics["mean_margin"] == pytest.approx(0.35)
    # max 3: all three (10, 11 and 4 tokens) are too long, nothing left to pair
    pairs, metrics = build_pairs(cands, THREE, PairsConfig(max_response_tokens=3))
    assert pairs == [] and metrics == {"rows_out": 0, "unfinished_candidates": 0, "skipped_fewer_than_2_candidates": 1}


def test_build_pairs_skip_reasons_and_duplicate_text():
    cands = [
        # p: two candidates with the same text -> one unique candidate
        _row("p", 0, "same"),
        _row("p", 1, "same"),
        # q: all scores equal
        _row("q", 0, "x"),
        _row("q", 1, "y"),
        # r: margin 0.2 below min_margin 0.3
        _row("r", 0, "u"),
        _row("r", 1, "v"),
        # s: margin 0.8
        _row("s", 0, "m"),
        _row("s", 1, "n"),
    ]
    judgments = [
        _j("p", 0, 1, 0.9),
        _j("p", 1, 0, 0.1),  # both scored, but 1 duplicates 0's text
        _j("q", 0, 1, 0.5),
        _j("q", 1, 0, 0.5),
        _j("r", 0, 1, 0.6),
        _j("r", 1, 0, 0.4),  # r0: (0.6 + 0.6)/2 = 0.6, r1: 0.4
        _j("s", 0, 1, 0.1),
        _j("s", 1, 0, 0.9),  # s0: 0.1, s1: 0.9 -> chosen 1, rejected 0
    ]
    pairs, metrics = build_pairs(cands, judgments, PairsConfig(min_margin=0.3))
    assert [(p["prompt_id"], p["chosen"], p["rejected"]) for p in pairs] == [("s", "n", "m")]
    assert metrics == {
        "rows_out": 1,
        "unfinished_candidates": 0,
        "skipped_all_scores_equal": 1,
        "skipped_below_min_margin": 1,
        "skipped_fewer_than_2_candidates": 1,
        "mean_margin": 0.8,
    }


def test_build_pairs_ignores_candidates_without_judgments():
    cands = [_row("p", 0, "a"), _row("p", 1, "b"), _row("p", 2, "never judged")]
    judgments = [_j("p", 0, 1, 0.7), _j("p", 1, 0, 0.2)]  # 0: 0.75, 1: 0.25
    pairs, _ = build_pairs(cands, judgments, PairsConfig())
    assert [(p["chosen_candidate"], p["rejected_candidate"]) for p in pairs] == [(0, 1)]
    assert pairs[0]["chosen_score"] == pytest.approx(0.75) and pairs[0]["rejected_score"] == pytest.approx(0.25)


def test_unfinished_candidates_are_left_out_and_counted():
    # the worst candidate (1) was cut off at max_new_tokens: 2 (score 0.40) becomes the rejected one
    cands = [_row("p", 0, "best"), _row("p", 1, "worst", finish_reason="length"), _row("p", 2, "middle")]
    pairs, metrics = build_pairs(cands, THREE, PairsConfig())
    assert [(p["chosen_candidate"], p["rejected_candidate"]) for p in pairs] == [(0, 2)]
    assert metrics == {"rows_out": 1, "unfinished_candidates": 1, "mean_margin": 0.35}
    # kept on request: best (0.75) vs worst (0.35) as before the filter
    pairs, metrics = build_pairs(cands, THREE, PairsConfig(keep_unfinished=True))
    assert [(p["chosen_candidate"], p["rejected_candidate"]) for p in pairs] == [(0, 1)]
    assert metrics["unfinished_candidates"] == 1


def test_a_prompt_left_with_one_finished_candidate_is_skipped():
    cands = [
        _row("p", 0, "cut", finish_reason="length"),
        _row("p", 1, "done"),
        _row("p", 2, "cut too", 5, "Q", "length"),
    ]
    pairs, metrics = build_pairs(cands, THREE, PairsConfig())
    assert pairs == [] and metrics == {"rows_out": 0, "unfinished_candidates": 2, "skipped_fewer_than_2_candidates": 1}


def test_the_unfinished_filter_runs_before_the_dedupe():
    # 0 and 1 share a text; 0 was cut off, so the finished 1 stands for that text
    cands = [_row("p", 0, "same", finish_reason="length"), _row("p", 1, "same"), _row("p", 2, "other")]
    pairs, _ = build_pairs(cands, THREE, PairsConfig())
    assert [(p["chosen_candidate"], p["rejected_candidate"]) for p in pairs] == [(2, 1)]


def test_a_dropped_comparison_is_not_counted_as_a_tie():
    judged = [
        {"prompt_id": "p", "a": 0, "b": 1, "p_a": 0.9, "dropped": False},
        {"prompt_id": "p", "a": 1, "b": 0, "p_a": 0.5, "dropped": True},  # over the judge's budget: no verdict
    ]
    assert candidate_scores(judged) == {("p", 0): pytest.approx(0.9), ("p", 1): pytest.approx(0.1)}
