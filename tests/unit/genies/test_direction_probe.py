"""The arithmetic of mms, lat_stim_1 and lat_stim_2 (genies/interventions/direction_probe.py):
where activations are read, the split, the mass-mean directions, the logistic fits, the unit
ranking, the calibration set and the final probability, each against numbers worked by hand
or computed independently (a hand-written attention for the per-head outputs)."""

from __future__ import annotations

import math

import pytest
import torch

from alignflow.config import GeniesScoringConfig
from alignflow.genies.interventions.direction_probe import (
    PROBE_L2,
    calibration_set,
    decoder_layers,
    fit_calibrator,
    fit_probes,
    last_token_inputs,
    leading_special_ids,
    mass_mean_directions,
    preferred_rows,
    prob_b,
    probe_accuracies,
    split_pairs,
    stimulus_sequences,
    top_units,
    unit_activations,
    unit_name,
)
from alignflow.genies.interventions.lat_stim_2 import LatStimulusConfig, LatStimWithStimulus
from alignflow.genies.scoring import text_ids
from alignflow.workers.models import load_backbone
from alignflow.workers.scoring import pack

PAIRS = [
    {"prompt": "Name a colour.\n### Response:\n", "response_a": "Red.", "response_b": "A fish", "preferred": 0},
    {"prompt": "Count to two.\n### Response:\n", "response_a": "one", "response_b": "one, two", "preferred": 1},
]
SCORING = GeniesScoringConfig(max_tokens=64)


@pytest.fixture(scope="module")
def backbone(tiny_model_dir):
    return load_backbone(tiny_model_dir, "float32")


# -- where activations are read ------------------------------------------------
def test_sequences_end_with_the_response_not_eos(backbone):
    _, tokenizer = backbone
    prompts, responses, index = stimulus_sequences(tokenizer, PAIRS, SCORING.max_tokens)
    assert index == [(0, 1), (2, 3)] and all(len(r) == 1 for r in responses)
    for (a, b), pair in zip(index, PAIRS):
        for row, text in ((a, pair["response_a"]), (b, pair["response_b"])):
            assert prompts[row] + responses[row] == text_ids(tokenizer, pair["prompt"]) + text_ids(tokenizer, text)
            assert responses[row][-1] != tokenizer.eos_token_id


class MarkingTokenizer:
    """Characters as ids, with BOS (1) in front unless special tokens are off, as Llama's does."""

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": [1] * add_special_tokens + [ord(c) for c in text]}


def test_bos_comes_first_where_the_tokenizer_adds_it(backbone):
    _, tokenizer = backbone
    assert leading_special_ids(MarkingTokenizer()) == [1]
    assert leading_special_ids(tokenizer) == []  # the tiny model's, like SmolLM2's, adds none


def test_stimulus_wraps_each_response_on_top_of_max_tokens(backbone):
    _, tokenizer = backbone
    lat_stim_2 = LatStimWithStimulus(SCORING, LatStimulusConfig())
    prefix, suffix = lat_stim_2.prefix, lat_stim_2.suffix  # the configured stimulus
    assert (prefix, suffix) == (LatStimulusConfig().prefix, LatStimulusConfig().suffix) != ("", "")
    pair = PAIRS[0]
    wrapped = [text_ids(tokenizer, t) for t in (pair["prompt"], prefix, pair["response_a"], pair["response_b"], suffix)]
    prompt_ids, prefix_ids, a_ids, b_ids, suffix_ids = wrapped
    fits = len(prompt_ids) + max(len(a_ids), len(b_ids)) + 1  # the longer response + EOS: exactly max_tokens
    prompts, responses, index = stimulus_sequences(tokenizer, [pair], fits, prefix, suffix)
    for row, response_ids in zip(index[0], (a_ids, b_ids)):
        assert prompts[row] + responses[row] == prompt_ids + prefix_ids + response_ids + suffix_ids
        assert len(prompts[row]) + 1 > fits  # the stimulus comes on top of max_tokens


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return x * cos + torch.cat([-x[..., half:], x[..., :half]], dim=-1) * sin


@torch.inference_mode()
def _head_outputs_by_hand(model, token_ids: list[int]) -> torch.Tensor:
    """Every head's attention output at the last token of one unpadded sequence, computed
    from the block inputs with a hand-written causal attention: layers x heads x head_dim."""
    config = model.config
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    ids_ = torch.tensor([token_ids])
    states = model(input_ids=ids_, output_hidden_states=True).hidden_states
    cos, sin = model.rotary_emb(states[0], torch.arange(len(token_ids))[None])
    out = []
    for layer, block in enumerate(decoder_layers(model)):
        h = block.input_layernorm(states[layer])[0]  # tokens x hidden
        attn = block.self_attn
        q = attn.q_proj(h).view(len(token_ids), heads, -1).transpose(0, 1)
        k = attn.k_proj(h).view(len(token_ids), kv_heads, -1).transpose(0, 1)
        v = attn.v_proj(h).view(len(token_ids), kv_heads, -1).transpose(0, 1)
        q, k = _rotate(q, cos[0], sin[0]), _rotate(k, cos[0], sin[0])
        per_head = []
        for head in range(heads):
            kv = head // (heads // kv_heads)  # grouped-query attention: consecutive heads share a kv head
            weights = torch.softmax(k[kv] @ q[head, -1] / math.sqrt(q.shape[-1]), dim=0)
            per_head.append(weights @ v[kv])
        out.append(torch.stack(per_head))
    return torch.stack(out)


def test_per_head_activations_match_a_hand_written_attention(backbone):
    model, tokenizer = backbone
    sites = [block.self_attn.o_proj for block in decoder_layers(model)]
    heads = model.config.num_attention_heads
    acts, index = unit_activations(model, tokenizer, PAIRS, SCORING, sites, heads)
    layers, head_dim = len(sites), model.config.hidden_size // heads
    assert acts.shape == (4, layers * heads, head_dim) and index.tolist() == [[0, 1], [2, 3]]
    prompts, responses, _ = stimulus_sequences(tokenizer, PAIRS, SCORING.max_tokens)
    for row in range(4):
        by_hand = _head_outputs_by_hand(model, prompts[row] + responses[row])
        for layer in range(layers):
            for head in range(heads):
                unit = layer * heads + head  # upstream's flattening
                assert unit_name(unit, heads) == [layer, head]
                torch.testing.assert_close(acts[row, unit], by_hand[layer, head], atol=1e-5, rtol=1e-4)


def test_layer_activations_are_block_inputs_at_the_last_real_token(backbone):
    model, tokenizer = backbone
    prompts, responses, _ = stimulus_sequences(tokenizer, PAIRS, SCORING.max_tokens)
    batch = pack(prompts, responses, tokenizer.pad_token_id)  # right-padded: rows of different lengths
    assert len(set(batch["attention_mask"].sum(dim=1).tolist())) > 1
    read = last_token_inputs(model, decoder_layers(model), batch)
    layers = len(decoder_layers(model))
    assert read.shape == (4, layers, model.config.hidden_size)
    for row in range(4):
        states = model(input_ids=torch.tensor([prompts[row] + responses[row]]), output_hidden_states=True)
        expected = torch.stack(states.hidden_states[:layers])[:, 0, -1]  # embeddings .. input of the last block
        torch.testing.assert_close(read[row], expected, atol=1e-5, rtol=1e-4)
    assert unit_name(1, 1) == 1


# -- fitting -------------------------------------------------------------------
def test_preferred_rows_follow_the_label():
    index = torch.tensor([[0, 1], [2, 3], [4, 1]])
    pairs = [{"preferred": 0}, {"preferred": 1}, {"preferred": 1}]
    preferred, dispreferred = preferred_rows(index, pairs)
    assert preferred.tolist() == [0, 3, 1] and dispreferred.tolist() == [1, 2, 4]


def test_split_sizes_and_determinism():
    fit, val = split_pairs(10, 0.3, seed=42)
    assert len(fit) == 7 and len(val) == 3  # int(10 * 0.7), as upstream
    assert sorted(fit.tolist() + val.tolist()) == list(range(10))
    assert fit.tolist() == sorted(fit.tolist()) and val.tolist() == sorted(val.tolist())
    assert [t.tolist() for t in split_pairs(10, 0.3, seed=42)] == [fit.tolist(), val.tolist()]
    assert [len(t) for t in split_pairs(8, 0.3, 0)] == [5, 3]  # int(5.6)
    assert [len(t) for t in split_pairs(2, 0.9, 0)] == [1, 1]  # int(0.2) = 0 fit pairs is raised to 1
    with pytest.raises(ValueError, match="at least one pair to fit and one to validate"):
        split_pairs(1, 0.3, 0)


def test_mass_mean_directions_by_hand():
    preferred = torch.tensor([[[1.0, 2.0]], [[3.0, 0.0]]])  # 2 responses x 1 unit x 2
    dispreferred = torch.tensor([[[0.0, 1.0]], [[0.0, 3.0]]])
    assert mass_mean_directions(preferred, dispreferred).tolist() == [[2.0, -1.0]]  # [2, 1] - [0, 2]


def test_calibrator_reproduces_the_empirical_odds():
    # at s=0 one label in four is 1, at s=1 three in four: sigmoid(c) = 1/4, sigmoid(w + c) = 3/4
    scores = torch.tensor([0.0] * 4 + [1.0] * 4)
    w, c = fit_calibrator(scores, torch.tensor([1.0, 0, 0, 0, 1, 1, 1, 0])).tolist()
    assert w == pytest.approx(2 * math.log(3), abs=1e-5) and c == pytest.approx(-math.log(3), abs=1e-5)


def test_separable_calibration_stays_finite():
    w, c = fit_calibrator(torch.tensor([0.4, 0.45, 0.55, 0.6]), torch.tensor([0.0, 0.0, 1.0, 1.0])).tolist()
    assert math.isfinite(w) and w > 50 and c == pytest.approx(-w / 2, rel=1e-3)  # threshold at 1/2 by symmetry


def test_probes_solve_scikit_learns_default_objective():
    # x = +1 preferred, x = -1 dispreferred: by symmetry c = 0, and the optimum of
    # logloss + |w|^2 / 2 satisfies w = 2 sigmoid(-w) (w ~ 0.6749)
    w, c = fit_probes(torch.tensor([[[1.0]]]), torch.tensor([[[-1.0]]]))[0].tolist()
    assert c == pytest.approx(0.0, abs=1e-10) and w == pytest.approx(2 / (1 + math.exp(w)), abs=1e-10)
    assert w == pytest.approx(0.6749, abs=1e-4)
    # 2 units of width 5, intercept unpenalised: the gradient of that objective vanishes at each fit
    generator = torch.Generator().manual_seed(0)
    preferred = torch.randn(15, 2, 5, generator=generator, dtype=torch.double) + 0.4
    dispreferred = torch.randn(15, 2, 5, generator=generator, dtype=torch.double)
    probes = fit_probes(preferred, dispreferred)
    x, y = torch.cat([preferred, dispreferred]), torch.cat([torch.ones(15), torch.zeros(15)]).double()
    for unit in range(2):
        weights, intercept = probes[unit, :-1], probes[unit, -1]
        residual = torch.sigmoid(x[:, unit] @ weights + intercept) - y
        gradient = x[:, unit].T @ residual + PROBE_L2 * weights
        torch.testing.assert_close(gradient, torch.zeros(5, dtype=torch.double), atol=1e-9, rtol=0)
        assert float(residual.sum()) == pytest.approx(0.0, abs=1e-9)


def test_probe_accuracy_counts_responses_labelled_right():
    probes = torch.tensor([[1.0, 0.0], [-1.0, 0.5]], dtype=torch.double)  # 2 units of width 1: (w, c)
    preferred = torch.tensor([[[2.0], [2.0]], [[-1.0], [0.0]]])  # 2 responses x 2 units x 1
    dispreferred = torch.tensor([[[-2.0], [1.0]], [[0.0], [3.0]]])
    # unit 0 says 1 where x > 0: right on 2.0 (1) and -2.0, 0.0 (0), wrong on -1.0 (1) -> 3/4
    # unit 1 says 1 where 0.5 - x > 0: right on 0.0 (1), 1.0 and 3.0 (0), wrong on 2.0 (1) -> 3/4
    # (x = 0 exactly for unit 0 is "not > 0": labelled 0, right for a dispreferred response)
    assert probe_accuracies(probes, preferred, dispreferred).tolist() == [0.75, 0.75]


def test_probes_rank_the_informative_unit_first():
    # unit 0 separates preferred (+) from dispreferred (-); unit 1 gives both responses of a pair
    # the same activation, so a probe labels them alike and gets exactly one of the two right
    generator = torch.Generator().manual_seed(1)

    def responses(n):
        noise = torch.randn(n, 3, generator=generator)
        shared = torch.randn(n, 3, generator=generator)
        return torch.stack([noise + 3, shared], dim=1), torch.stack([-noise - 3, shared], dim=1)

    accuracy = probe_accuracies(fit_probes(*responses(6)), *responses(4))
    assert accuracy.tolist() == [1.0, 0.5]
    assert top_units(accuracy, 1) == [0]


def test_top_units_order_and_ties():
    accuracy = torch.tensor([0.5, 0.9, 0.9, 0.2, 0.9])
    assert top_units(accuracy, 2) == [4, 2]  # equals: the later unit first, as upstream's reversed argsort
    assert top_units(accuracy, 16) == [4, 2, 1, 0, 3]  # k above the number of units keeps them all


def test_calibration_set_alternates_direction_and_label():
    directions = torch.tensor([[1.0, 0.0], [0.0, 1.0]])  # 2 kept units
    to_preferred = torch.tensor(
        [
            [[1.0, 0.0], [0.0, 2.0]],  # cosines 1, 1: s = 1
            [[1.0, 1.0], [0.0, 1.0]],  # cosines 1/sqrt 2, 1: towards the dispreferred, negated
            [[0.0, 1.0], [-1.0, 1.0]],  # cosines 0, 1/sqrt 2
        ]
    )
    scores, labels = calibration_set(to_preferred, directions)
    r = 1 / math.sqrt(2)
    expected = [1.0, 0.5 * (1 - (r + 1) / 2), 0.5 * (1 + r / 2)]
    assert scores.tolist() == pytest.approx(expected, abs=1e-6) and labels.tolist() == [1.0, 0.0, 1.0]


def test_probability_of_b_through_the_calibrator():
    p = prob_b(torch.tensor([0.5, 1.0, 0.0]), weight=4.0, bias=-2.0)
    assert p.tolist() == pytest.approx([0.5, 1 / (1 + math.exp(-2)), 1 / (1 + math.exp(2))])
