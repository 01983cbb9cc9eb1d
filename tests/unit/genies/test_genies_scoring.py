"""How GENIES text reaches the model (genies/scoring.py), the length filter, and the
mass-mean probe's arithmetic."""

from __future__ import annotations

import math

import pytest
import torch

from alignflow.genies.data import expand_pairs
from alignflow.genies.interventions.base import Scores
from alignflow.genies.interventions.mass_mean import fit_slope, held_out_mask, pair_score
from alignflow.genies.interventions.script import records_from_pairs
from alignflow.genies.scoring import (
    encode_pairs,
    last_token_states,
    per_pair_progress,
    prob_first,
    probs_from_scores,
    too_long,
)
from alignflow.genies.stages import score_table
from alignflow.workers.models import load_causal_lm
from alignflow.workers.scoring import pack

PROMPT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the "
    "request.\n\n### Instruction:\nName a primary color.\n\n### Response:\n"
)
RECORD = {"prompt": PROMPT, "responses": {"Red.": 1.0, "Green grass.": 0.0, "Purple, obviously.": 0.0, "Seven": 0.0}}


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return load_causal_lm(tiny_model_dir, "float32")


def ids(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


# -- encoding ------------------------------------------------------------------
def test_shared_sequences_are_encoded_once(tiny):
    _, tokenizer = tiny
    pairs = expand_pairs([RECORD], seed=0, distribution="d", split="test")
    assert len(pairs) == 3
    seqs = encode_pairs(tokenizer, pairs, max_tokens=512)
    assert len(seqs.prompts) == len(seqs.responses) == 4  # the preferred response is shared by all 3 pairs
    assert len(seqs.pair_index) == 3
    preferred = {(a, b)[p["preferred"]] for (a, b), p in zip(seqs.pair_index, pairs)}
    assert len(preferred) == 1
    assert all(prompt == seqs.prompts[0] for prompt in seqs.prompts)
    eos = tokenizer.eos_token_id
    for (a, b), pair in zip(seqs.pair_index, pairs):
        assert seqs.responses[a] == ids(tokenizer, pair["response_a"]) + [eos]
        assert seqs.responses[b] == ids(tokenizer, pair["response_b"]) + [eos]
    # a value per distinct sequence comes back as (A values, B values) per pair
    a_values, b_values = seqs.pair_scores([10.0, 11.0, 12.0, 13.0])
    assert a_values == [10.0 + a for a, _ in seqs.pair_index] and b_values == [10.0 + b for _, b in seqs.pair_index]


def test_two_prompts_sharing_a_response_stay_two_sequences(tiny):
    _, tokenizer = tiny
    pairs = [
        {"prompt": "P1 ### Response:\n", "response_a": "yes", "response_b": "no", "preferred": 0},
        {"prompt": "P2 ### Response:\n", "response_a": "yes", "response_b": "no", "preferred": 1},
    ]
    seqs = encode_pairs(tokenizer, pairs, max_tokens=64)
    assert seqs.pair_index == [(0, 1), (2, 3)]


def test_no_special_tokens_and_a_prefix_goes_before_the_prompt(tiny):
    _, tokenizer = tiny
    pairs = [{"pair_id": "d/test/0/0", "prompt": "P ### Response:\n", "response_a": "yes", "response_b": "no"}]
    plain = encode_pairs(tokenizer, pairs, max_tokens=64)
    assert plain.prompts[0] == ids(tokenizer, "P ### Response:\n")  # no BOS, as GENIES's collator
    shots = encode_pairs(tokenizer, pairs, max_tokens=64, prefix=lambda pair: [7, 8])
    assert shots.prompts == [[7, 8] + plain.prompts[0]] * 2 and shots.responses == plain.responses


def test_a_pair_over_max_tokens_is_refused_and_too_long_finds_its_record(tiny):
    _, tokenizer = tiny
    record = {"prompt": "P ### Response:\n", "responses": {"ok": 1.0, " ".join(["word"] * 40): 0.0}}
    longest = len(ids(tokenizer, record["prompt"])) + max(len(ids(tokenizer, r)) + 1 for r in record["responses"])
    assert too_long(tokenizer, record, longest - 1) and not too_long(tokenizer, record, longest)
    pairs = expand_pairs([record], seed=0, distribution="d", split="test")
    with pytest.raises(ValueError, match=f"pair d/test/0/0: {longest} tokens, over max_tokens={longest - 1}"):
        encode_pairs(tokenizer, pairs, max_tokens=longest - 1)


def test_prob_first_is_a_two_way_softmax():
    assert prob_first(0.0, 0.0) == 0.5
    assert prob_first(math.log(3.0), 0.0) == pytest.approx(0.75)
    assert prob_first(-2.0, -2.0 + math.log(3.0)) == pytest.approx(0.25)
    assert prob_first(1000.0, -1000.0) == 1.0 and prob_first(-1000.0, 1000.0) == pytest.approx(0.0, abs=1e-300)
    assert probs_from_scores([1.0, 0.0], [1.0, math.log(4.0)]) == pytest.approx([0.5, 0.2])


def test_per_pair_progress_reports_pairs_while_counting_sequences():
    reported = []
    advance = per_pair_progress(reported.append, sequences=4, pairs=3)
    advance(2)  # 2 of 4 sequences: 2 * 3 // 4 = 1 pair
    advance(1)  # 3 of 4: 9 // 4 = 2 pairs
    advance(1)  # all: 3 pairs
    assert reported == [1, 1, 1] and sum(reported) == 3
    assert per_pair_progress(None, 4, 3) is None


# -- the model -----------------------------------------------------------------
@torch.inference_mode()
def test_last_token_states_pick_each_rows_last_real_token(tiny):
    model, _ = tiny
    prompts, responses = [[5, 6, 7], [8], [9, 10]], [[11, 12], [13, 14, 15, 16], [17]]
    batch = pack(prompts, responses, pad_id=0)
    states = last_token_states(model, batch)
    layers = model.config.num_hidden_layers
    assert states.shape == (3, layers, model.config.hidden_size) and states.dtype == torch.float32
    for row, (p, r) in enumerate(zip(prompts, responses)):
        alone = model(input_ids=torch.tensor([p + r]), output_hidden_states=True).hidden_states
        expected = torch.stack([h[0, -1] for h in alone[1:]])
        torch.testing.assert_close(states[row], expected, atol=1e-4, rtol=1e-4)


# -- mass-mean probe arithmetic ------------------------------------------------
def test_fit_slope_recovers_a_known_slope():
    x = torch.linspace(-0.5, 0.5, 201)
    soft = torch.sigmoid(6.0 * x)  # expected labels: the optimum is w = 6 (up to the tiny L2)
    assert fit_slope(x, soft) == pytest.approx(6.0, abs=0.05)
    generator = torch.Generator().manual_seed(0)
    xs = torch.rand(4000, generator=generator) - 0.5
    ys = (torch.rand(4000, generator=generator) < torch.sigmoid(6.0 * xs)).float()
    assert fit_slope(xs, ys) == pytest.approx(6.0, abs=0.8)


def test_fit_slope_stays_finite_on_separable_data_and_needs_no_intercept():
    x = torch.tensor([-0.10, -0.05, -0.02, 0.02, 0.05, 0.10])
    y = torch.tensor([0.0, 0.0, 0.0, 1.0, 1.0, 1.0])
    w = fit_slope(x, y)
    assert math.isfinite(w) and w > 0
    assert ((torch.sigmoid(w * x) > 0.5).float() == y).all()
    # held-out labels all on one side (a few records) cannot tilt the probe towards a position
    assert fit_slope(torch.tensor([0.1, 0.2]), torch.tensor([1.0, 1.0])) > 0
    assert fit_slope(torch.zeros(3), torch.ones(3)) == 0.0


def test_pair_score_is_half_when_a_and_b_look_the_same():
    directions = torch.tensor([[1.0, 0.0, 0.0], [0.0, 2.0, 0.0]])  # 2 layers x hidden 3
    same = torch.zeros(4, 2, 3)  # a(B) - a(A) = 0 for every pair and layer
    assert pair_score(same, directions).tolist() == [0.5] * 4
    along = directions.unsqueeze(0) * 5.0  # B further along every direction: cos = 1
    against = -along
    orthogonal = torch.tensor([[[0.0, 0.0, 1.0], [1.0, 0.0, 0.0]]])
    assert pair_score(along, directions).tolist() == pytest.approx([1.0])
    assert pair_score(against, directions).tolist() == pytest.approx([0.0])
    assert pair_score(orthogonal, directions).tolist() == pytest.approx([0.5])
    mixed = torch.stack([directions[0], -directions[1]]).unsqueeze(0)  # +1 on layer 0, -1 on layer 1
    assert pair_score(mixed, directions).tolist() == pytest.approx([0.5])


def test_held_out_mask_splits_by_record():
    pairs = expand_pairs(
        [{"prompt": f"q{i}", "responses": {"a": 1.0, "b": 0.0, "c": 0.0}} for i in range(40)],
        seed=0,
        distribution="d",
        split="train",
    )
    mask = held_out_mask(pairs, 0.25, seed=0)
    by_prompt = {}
    for pair, held in zip(pairs, mask.tolist()):
        by_prompt.setdefault(pair["prompt"], set()).add(held)
    assert all(len(v) == 1 for v in by_prompt.values())  # a record's pairs never straddle the split
    assert 0 < int(mask.sum()) < len(pairs)
    assert held_out_mask(pairs[:2], 0.25, seed=0).tolist() == [True, True]  # one record: in-sample


# -- per-pair tables -----------------------------------------------------------
def test_score_table_turns_p_a_into_p_preferred():
    rows = [
        {"pair_id": "d/test/0/0", "preferred": 0},
        {"pair_id": "d/test/1/0", "preferred": 1},
        {"pair_id": "d/test/2/0", "preferred": 1},
    ]
    table, metrics = score_table(rows, Scores(p_a=[0.9, 0.2, 0.5]))
    assert table.column("p_preferred").to_pylist() == pytest.approx([0.9, 0.8, 0.5])
    assert metrics["accuracy"] == pytest.approx((1 + 1 + 0.5) / 3) and metrics["pairs"] == 3
    assert metrics["brier"] == pytest.approx((0.01 + 0.04 + 0.25) / 3)
    table, metrics = score_table(rows, Scores(accuracy=0.25))
    assert metrics == {"accuracy": 0.25, "pairs": 3}
    assert table.column("p_preferred").null_count == 3 and table.column("preferred").to_pylist() == [0, 1, 1]


def test_records_from_pairs_rebuild_the_records():
    records = [RECORD, {"prompt": "Q2", "responses": {"yes": 1.0, "no": 0.0}}]
    pairs = expand_pairs(records, seed=0, distribution="d", split="test")
    assert records_from_pairs(pairs) == records
