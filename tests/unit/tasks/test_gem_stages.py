"""GEM stage logic on hand-made rows and the tiny model: entropy scoring, ranking and
trimming per prompt, SEGA groups (and the shuffled control) and objective, the prompts
of each on-policy iteration, preference accuracy per dataset, pair encoding, and the
preferences stage helpers."""

from __future__ import annotations

import json
import math

import pytest
import torch

from alignflow.config import EntropyConfig, SEGAConfig
from alignflow.tasks.entropy import content_tokens, lower_fence, rank_and_trim, score_candidate
from alignflow.tasks.pref_accuracy import accuracy_by_dataset, scored_sides
from alignflow.tasks.preferences import (
    PreferenceFileError,
    compute_preferences,
    fingerprint,
    preference_set,
    resolve_spec,
)
from alignflow.tasks.sega_prompts import SegaPrompts, iteration_prompt_ids
from alignflow.tasks.train_sega import add_reference_token_logprobs, sega_groups, sega_objective
from alignflow.workers.chat import encode_pair, fit_response, prompt_ids
from alignflow.workers.scoring import sequence_logprob_sums, token_entropy

MARKER = "Final Answer:"
CONFIG = EntropyConfig(preset="marker", lambda_fork=0.4, top_m=0.5, final_window=3)


def _candidate(tokenizer, text: str, finish_reason: str, stop_entropy: float = 50.0, **extra) -> dict:
    """A sampled candidate: its text's tokens, distinct entropies, and the stop token when it stopped."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    entropies = [0.1 * (i + 1) for i in range(len(ids))]
    if finish_reason == "stop":
        ids, entropies = ids + [tokenizer.eos_token_id], entropies + [stop_entropy]
    return {
        "prompt_id": "p",
        "candidate": 0,
        "response": text,
        "token_ids": ids,
        "entropies": entropies,
        "finish_reason": finish_reason,
        **extra,
    }


# -- entropy stage ---------------------------------------------------------------
def test_token_entropy_of_exact_one_hot_log_probs_is_zero():
    """log p = -inf for the zero-probability tokens (a model that masks logits with -inf)."""
    one_hot = torch.zeros(400)
    one_hot[7] = 1.0
    assert float(token_entropy(torch.log(one_hot))) == 0.0


def test_content_tokens_drop_the_stop_token_only_when_stopped():
    stopped = {"token_ids": [5, 6, 2], "entropies": [0.1, 0.2, 9.0], "finish_reason": "stop"}
    cut = {"token_ids": [5, 6, 7], "entropies": [0.1, 0.2, 0.3], "finish_reason": "length"}
    assert content_tokens(stopped) == ([5, 6], [0.1, 0.2])
    assert content_tokens(cut) == ([5, 6, 7], [0.1, 0.2, 0.3])


def test_score_finds_the_marker_and_scores_the_tokens_after_it(tokenizer):
    text = "Let me think. Final Answer: Paris is the capital"
    cand = _candidate(tokenizer, text, "stop")
    ids, entropies = content_tokens(cand)
    row = score_candidate(tokenizer, cand, CONFIG)
    assert row["marker_found"] is True
    n_final, n_reasoning = row["final_tokens"], row["reasoning_tokens"]
    # the final span is exactly the text after the marker; the reasoning ends before the marker
    assert tokenizer.decode(ids[len(ids) - n_final :]) == text[text.rfind(MARKER) + len(MARKER) :]
    assert tokenizer.decode(ids[:n_reasoning]).strip() == "Let me think."
    assert row["final_entropy"] == pytest.approx(sum(entropies[-n_final:]) / n_final)
    top = sorted(entropies[:n_reasoning], reverse=True)[: math.ceil(0.5 * n_reasoning)]
    assert row["fork_entropy"] == pytest.approx(sum(top) / len(top))
    assert row["score"] == pytest.approx(-row["final_entropy"] + 0.4 * row["fork_entropy"])


def test_score_without_marker_uses_the_last_final_window_tokens(tokenizer):
    cand = _candidate(tokenizer, "Think hard. The answer is 42", "stop")
    _, entropies = content_tokens(cand)
    row = score_candidate(tokenizer, cand, CONFIG)
    assert row["marker_found"] is False
    assert row["final_tokens"] == 3 and row["reasoning_tokens"] == len(entropies) - 3
    assert row["final_entropy"] == pytest.approx(sum(entropies[-3:]) / 3)


@pytest.mark.parametrize("text", ["Let me think. Final Answer: Paris is the capital", "Think hard. The answer is 42"])
def test_stop_token_entropy_never_enters_the_score(tokenizer, text):
    stopped = score_candidate(tokenizer, _candidate(tokenizer, text, "stop", stop_entropy=1e6), CONFIG)
    cut = score_candidate(tokenizer, _candidate(tokenizer, text, "length"), CONFIG)
    assert stopped == cut
    # the check can fail: the same token counted as content would move the score by ~1e6 / 3
    counted = _candidate(tokenizer, text, "stop", stop_entropy=1e6)
    counted["finish_reason"] = "length"
    assert score_candidate(tokenizer, counted, CONFIG)["score"] < cut["score"] - 1e3


def test_lower_fence_is_tukeys_and_needs_four_scores():
    # quartiles of 1..7 (exclusive method) are 2 and 6: fence = 2 - 1.5 * 4
    assert lower_fence([1, 2, 3, 4, 5, 6, 7], 1.5) == pytest.approx(-4.0)
    assert lower_fence([1.0, 2.0, -100.0], 1.5) == -math.inf


def _scored(prompt_id, candidate, score):
    return {"prompt_id": prompt_id, "candidate": candidate, "score": score}


ROWS = [
    _scored("a", 0, 1.0),
    _scored("a", 1, 1.2),
    _scored("a", 2, -50.0),
    _scored("a", 3, 1.1),
    _scored("b", 0, 0.9),
    _scored("b", 1, 1.15),
    _scored("b", 2, 1.05),
]


def test_rank_zero_is_the_highest_score_within_each_prompt():
    ranked = {(r["prompt_id"], r["candidate"]): r["rank"] for r in rank_and_trim(ROWS, EntropyConfig())}
    assert ranked == {("a", 1): 0, ("a", 3): 1, ("a", 0): 2, ("a", 2): 3, ("b", 1): 0, ("b", 2): 1, ("b", 0): 2}


def test_low_outlier_is_dropped_only_with_trim_outliers():
    eight = [_scored("c", i, 10.0 + 0.1 * i) for i in range(7)] + [_scored("c", 7, -50.0)]
    kept_off = {(r["prompt_id"], r["candidate"]): r["kept"] for r in rank_and_trim(eight, EntropyConfig())}
    trimmed = rank_and_trim(eight, EntropyConfig(trim_outliers=True))
    assert all(kept_off.values())
    assert [(r["prompt_id"], r["candidate"]) for r in trimmed if not r["kept"]] == [("c", 7)]


def test_each_prompt_is_trimmed_against_its_own_scores():
    """Prompt "low" scores far below prompt "high": one fence over both would drop all of "low"."""
    rows = [_scored("high", i, 10.0 + 0.1 * i) for i in range(16)] + [_scored("low", i, 0.1 * i) for i in range(4)]
    assert all(r["kept"] for r in rank_and_trim(rows, EntropyConfig(trim_outliers=True)))
    assert lower_fence([r["score"] for r in rows], 1.5) > 0.3  # what a single fence would have done


# -- SEGA ------------------------------------------------------------------------
def _sega_rows():
    def cand(prompt_id, candidate):
        return {
            "prompt_id": prompt_id,
            "candidate": candidate,
            "prompt_ids": [1, len(prompt_id)],
            "token_ids": [10 + candidate, 2],
        }

    def score(prompt_id, candidate, value, kept=True):
        return {"prompt_id": prompt_id, "candidate": candidate, "score": value, "kept": kept}

    candidates = [cand(p, c) for p, n in (("p1", 4), ("p2", 2), ("p3", 2)) for c in range(n)]
    scores = [
        score("p1", 0, 1.0),
        score("p1", 1, 3.0),
        score("p1", 2, -7.0, kept=False),
        score("p1", 3, 2.0),
        score("p2", 0, 1.0),
        score("p2", 1, 5.0, kept=False),  # one kept
        score("p3", 0, 0.5),
        score("p3", 1, 0.5),
    ]  # equal scores
    return candidates, scores


def test_sega_groups_keep_only_kept_candidates_of_informative_prompts():
    candidates, scores = _sega_rows()
    groups = sega_groups(candidates, scores, SEGAConfig(mapping="identity"))
    assert [g["prompt_id"] for g in groups] == ["p1"]
    assert groups[0]["prompt_ids"] == [1, 2]
    assert groups[0]["responses"] == [[10, 2], [11, 2], [13, 2]]  # candidates 0, 1, 3
    assert groups[0]["advantages"] == pytest.approx([-1.0, 1.0, 0.0])  # scores 1, 3, 2 minus their mean


def test_sega_groups_softmax_mapping_advantages_sum_to_zero():
    candidates, scores = _sega_rows()
    (group,) = sega_groups(candidates, scores, SEGAConfig(mapping="softmax"))
    e = [math.exp(s) for s in (1.0, 3.0, 2.0)]
    softmax = [v / sum(e) for v in e]
    assert group["advantages"] == pytest.approx([p - 1 / 3 for p in softmax])
    assert sum(group["advantages"]) == pytest.approx(0.0, abs=1e-6)


def test_the_shuffled_control_permutes_each_groups_scores_and_keeps_their_sizes():
    candidates, scores = _sega_rows()
    (plain,) = sega_groups(candidates, scores, SEGAConfig(mapping="identity"))
    shuffled = [
        sega_groups(candidates, scores, SEGAConfig(mapping="identity", shuffle_advantages=True, seed=seed))[0]
        for seed in range(6)
    ]
    for group in shuffled:
        assert sorted(group["advantages"]) == pytest.approx(sorted(plain["advantages"]))
        assert group["responses"] == plain["responses"]
    assert any(g["advantages"] != pytest.approx(plain["advantages"]) for g in shuffled)
    again = sega_groups(candidates, scores, SEGAConfig(mapping="identity", shuffle_advantages=True, seed=0))
    assert again[0]["advantages"] == shuffled[0]["advantages"]  # seeded


# -- the prompts of each on-policy iteration -------------------------------------
IDS = [f"q{i}" for i in range(10)]


def test_iterations_take_consecutive_slices_of_seeded_passes_over_every_prompt():
    slices = [iteration_prompt_ids(IDS, SegaPrompts(iteration=i, count=4, seed=7)) for i in range(5)]
    first_pass = slices[0] + slices[1] + slices[2][:2]
    assert sorted(first_pass) == IDS  # the first 10 positions are one pass: every prompt once
    second_pass = slices[2][2:] + slices[3] + slices[4]
    assert sorted(second_pass) == IDS and second_pass != first_pass  # reshuffled
    assert iteration_prompt_ids(IDS, SegaPrompts(iteration=3, count=4, seed=7)) == slices[3]
    assert iteration_prompt_ids(IDS, SegaPrompts(iteration=0, count=4, seed=8)) != slices[0]


def test_an_iteration_draws_the_prompts_of_its_steps_and_epochs_repeat_them():
    from alignflow.tasks.training import total_steps

    config = SEGAConfig(steps_per_iteration=4, batch_size=2, grad_accum=2, epochs=3)
    assert config.prompts_per_iteration == 16
    assert total_steps(config.prompts_per_iteration, config) == 4 * 3  # each epoch takes steps_per_iteration steps


def test_an_iteration_cannot_ask_for_more_prompts_than_there_are():
    with pytest.raises(ValueError, match="samples 11 prompts .* only 10 distinct prompts"):
        iteration_prompt_ids(IDS, SegaPrompts(iteration=0, count=11))


def _sega_batch(tokenizer):
    """Two groups with prompts and responses of different lengths (responses end with end-of-turn)."""
    eot = tokenizer.eos_token_id
    return [
        {
            "prompt_id": "g1",
            "prompt_ids": prompt_ids(tokenizer, "Name a colour."),
            "responses": [[40, 50, eot], [60, eot], [70, 80, 90, 100, eot]],
            "advantages": [0.5, -0.2, -0.3],
        },
        {
            "prompt_id": "g2",
            "prompt_ids": prompt_ids(tokenizer, "A much longer question about something else?"),
            "responses": [[33, 44, 55, 66, eot], [77, eot]],
            "advantages": [-0.4, 0.4],
        },
    ]


def _expected_sega_loss(model, tokenizer, groups, length_normalize=False):
    """Mean over groups of -(1/k) sum_i A_i log pi(a_i), from independently computed sums."""
    losses = []
    for g in groups:
        sums = sequence_logprob_sums(
            model, tokenizer.pad_token_id, [g["prompt_ids"]] * len(g["responses"]), g["responses"], token_budget=4096
        )
        logps = [s / len(r) if length_normalize else s for s, r in zip(sums, g["responses"])]
        losses.append(-sum(a * lp for a, lp in zip(g["advantages"], logps)) / len(logps))
    return sum(losses) / len(losses)


def test_sega_kl_to_the_same_model_is_zero(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    with torch.no_grad():
        groups = add_reference_token_logprobs(model, tokenizer.pad_token_id, _sega_batch(tokenizer))
        assert [len(lp) for g in groups for lp in g["reference_logps"]] == [3, 2, 5, 5, 2]
        loss, metrics = sega_objective(SEGAConfig(kl_coef=0.5), tokenizer.pad_token_id).batch_loss(model, groups)
    assert abs(metrics["kl"]) < 1e-5
    assert metrics["loss"] == pytest.approx(metrics["policy_loss"], abs=1e-5)
    assert float(loss) == pytest.approx(_expected_sega_loss(model, tokenizer, groups), rel=1e-5)


@pytest.mark.parametrize("length_normalize", [False, True])
def test_sega_loss_matches_listwise_formula_per_group(model_and_tokenizer, length_normalize):
    model, tokenizer = model_and_tokenizer
    groups = _sega_batch(tokenizer)
    with torch.no_grad():
        loss, metrics = sega_objective(
            SEGAConfig(length_normalize=length_normalize), tokenizer.pad_token_id
        ).batch_loss(model, groups)
    expected = _expected_sega_loss(model, tokenizer, groups, length_normalize)
    assert float(loss) == pytest.approx(expected, rel=1e-5)
    assert metrics["kl"] == 0.0
    if length_normalize:  # the two losses really differ, so the flag is what decides
        assert expected != pytest.approx(_expected_sega_loss(model, tokenizer, groups, False), rel=1e-3)


def test_sega_loss_gradient_reaches_the_model(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    model.zero_grad(set_to_none=True)
    loss, _ = sega_objective(SEGAConfig(), tokenizer.pad_token_id).batch_loss(model, _sega_batch(tokenizer))
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    model.zero_grad(set_to_none=True)
    assert grads and any(float(g.abs().max()) > 0 for g in grads)


# -- preference accuracy ---------------------------------------------------------
def test_accuracy_by_dataset_reports_ties_apart_from_correct():
    def row(dataset, chosen, rejected):
        return {"dataset": dataset, "chosen_reward": chosen, "rejected_reward": rejected}

    rows = [
        row("a", 1.0, 0.0),
        row("a", 0.5, 0.5),  # correct, tie
        row("b", 0.0, 1.0),
        row("b", 2.0, 1.0),
        row("b", 3.0, 2.0),
    ]  # wrong, correct, correct
    metrics = accuracy_by_dataset(rows)
    assert metrics["pairs"] == 5 and metrics["accuracy"] == 0.6 and metrics["ties"] == 0.2
    assert metrics["accuracy_ties_correct"] == 0.8
    per_dataset = {k: v for k, v in metrics.items() if "/" in k and not k.startswith("ci_")}
    assert per_dataset == {
        "pairs/a": 2,
        "accuracy/a": 0.5,
        "ties/a": 0.5,
        "accuracy_ties_correct/a": 1.0,
        "mean_margin/a": 0.5,
        "pairs/b": 3,
        "accuracy/b": 0.6667,
        "ties/b": 0.0,
        "accuracy_ties_correct/b": 0.6667,
        "mean_margin/b": 0.3333,
    }
    assert metrics["ci_low/a"] < 0.5 < metrics["ci_high/a"]


def test_scored_sides_follow_the_order_of_the_pairs():
    rows = [
        {"id": "x", "chosen_logp": -1.0, "rejected_logp": -2.0},
        {"id": "y", "chosen_logp": -3.0, "rejected_logp": -4.0},
    ]
    assert scored_sides(rows, [{"id": "y"}, {"id": "x"}]) == ([-3.0, -1.0], [-4.0, -2.0])
    with pytest.raises(ValueError, match="e.g. ds/z"):
        scored_sides(rows, [{"id": "x"}, {"id": "ds/z"}])


# -- pair encoding ---------------------------------------------------------------
def test_fit_response_keeps_the_first_tokens_and_the_last():
    ids = list(range(10, 20))
    assert fit_response(ids, 4) == [10, 11, 12, 19]
    assert fit_response(ids, None) == ids
    assert fit_response(ids, 10) == ids
    assert fit_response(ids, 50) == ids


def test_encode_pair_without_limits(tokenizer):
    eot = tokenizer.eos_token_id
    pair = {"prompt": "Name a colour.", "chosen": "Blue", "rejected": "Seven"}
    out = encode_pair(tokenizer, pair, [eot], None, None)
    assert out["prompt_ids"] == prompt_ids(tokenizer, "Name a colour.")
    for side in ("chosen", "rejected"):
        assert out[f"{side}_ids"][-1] == eot
        assert tokenizer.decode(out[f"{side}_ids"][:-1]) == pair[side]


def test_encode_pair_respects_the_limits(tokenizer):
    eot = tokenizer.eos_token_id
    long = " ".join(["the quick answer is something long"] * 10)
    out = encode_pair(tokenizer, {"prompt": long, "chosen": long, "rejected": "No"}, [eot], 24, 6)
    assert len(prompt_ids(tokenizer, long)) > 24 and len(out["prompt_ids"]) <= 24
    short = prompt_ids(tokenizer, "x")
    header = short[short.index(eot) :]  # end of the user turn and the assistant header
    assert out["prompt_ids"][-len(header) :] == header
    assert len(out["chosen_ids"]) == 6 and out["chosen_ids"][-1] == eot
    assert out["rejected_ids"][-1] == eot and len(out["rejected_ids"]) < 6


# -- preferences stage helpers ---------------------------------------------------
def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_resolve_spec_fills_in_the_genies_dir_only_for_the_short_form(tmp_path):
    assert resolve_spec("genies:alpaca_mmlu:test", tmp_path) == f"genies:{tmp_path}:alpaca_mmlu:test"
    assert resolve_spec("genies:/data:alpaca_mmlu:test", tmp_path) == "genies:/data:alpaca_mmlu:test"
    assert resolve_spec("prefs/train.jsonl", tmp_path) == "prefs/train.jsonl"


def test_fingerprint_follows_the_file_content(tmp_path):
    path = _write_jsonl(tmp_path / "p.jsonl", [{"prompt": "q", "chosen": "a", "rejected": "b"}])
    before = fingerprint(str(path))
    _write_jsonl(path, [{"prompt": "q", "chosen": "a", "rejected": "c"}])
    after = fingerprint(str(path))
    assert after != before
    _write_jsonl(path, [{"prompt": "q", "chosen": "a", "rejected": "b"}])
    assert fingerprint(str(path)) == before


def test_preference_set_needs_a_source(tmp_path):
    with pytest.raises(PreferenceFileError, match="no preference sources"):
        preference_set({}, tmp_path)


@pytest.fixture
def two_sources(tmp_path):
    first = _write_jsonl(
        tmp_path / "first.jsonl",
        [
            {"prompt": "2+2?", "chosen": "4", "rejected": "5"},
            {"prompt": "2+2?", "chosen": "four", "rejected": "22"},
            {"prompt": "Capital of France?", "chosen": "Paris", "rejected": "Rome"},
        ],
    )
    second = _write_jsonl(
        tmp_path / "second.jsonl",
        [
            {
                "id": f"s{i}",
                "prompt": "2+2?" if i == 0 else f"question {i}",
                "chosen": f"good {i}",
                "rejected": f"bad {i}",
            }
            for i in range(6)
        ],
    )
    return {"first": str(first), "second": str(second)}


def test_compute_preferences_labels_rows_by_dataset_and_prompt(two_sources, tmp_path):
    out = compute_preferences(None, preference_set(two_sources, tmp_path), "key")
    rows = out.tables[0].to_pylist()
    assert [r["id"] for r in rows] == [
        "first/first.jsonl:1",
        "first/first.jsonl:2",
        "first/first.jsonl:3",
        "second/s0",
        "second/s1",
        "second/s2",
        "second/s3",
        "second/s4",
        "second/s5",
    ]
    assert [r["dataset"] for r in rows] == ["first"] * 3 + ["second"] * 6
    by_prompt = {}
    for r in rows:
        by_prompt.setdefault(r["prompt"], set()).add(r["prompt_id"])
    assert all(len(ids) == 1 for ids in by_prompt.values())  # equal prompts share an id, across datasets too
    assert len({next(iter(ids)) for ids in by_prompt.values()}) == len(by_prompt)  # different prompts do not
    assert out.metrics == {"rows_out": 9, "distinct_prompts": 7, "pairs_first": 3, "pairs_second": 6}


def test_compute_preferences_seeded_limit_is_deterministic(two_sources, tmp_path):
    def ids(seed):
        out = compute_preferences(None, preference_set(two_sources, tmp_path, limit=2, seed=seed), "key")
        return [r["id"] for r in out.tables[0].to_pylist()], out.metrics

    first_ids, metrics = ids(seed=3)
    assert (metrics["pairs_first"], metrics["pairs_second"], metrics["rows_out"]) == (2, 2, 4)
    assert ids(seed=3) == (first_ids, metrics)
    second = [i for i in first_ids if i.startswith("second/")]
    assert second == sorted(second)  # file order is kept
