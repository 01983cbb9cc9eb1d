"""cra's arithmetic (genies/interventions/cra.py): the contrast c = heads(... Yes) -
heads(... No) read at the answer token, and mms's direction and score on c, by hand."""

from __future__ import annotations

import math

import pytest
import torch

from alignflow.config import GeniesScoringConfig
from alignflow.genies.interventions.cra import ContrastRepresentationArithmetic, CRAConfig
from alignflow.genies.interventions.direction_probe import mass_mean_directions, preferred_rows
from alignflow.genies.interventions.mass_mean import pair_differences, pair_score
from alignflow.workers.models import load_backbone

PAIRS = [
    {"prompt": "Q1 ### Response:\n", "response_a": "good", "response_b": "bad", "preferred": 0},
    {"prompt": "Q2 ### Response:\n", "response_a": "meh", "response_b": "a fine answer", "preferred": 1},
]


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return load_backbone(tiny_model_dir, "float32")


def ids(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def o_proj_inputs_at_last_token(model, token_ids: list[int]) -> torch.Tensor:
    """One unpadded sequence: every layer's o_proj input at its last token, layers x hidden."""
    seen = []
    hooks = [
        layer.self_attn.o_proj.register_forward_pre_hook(lambda _m, a: seen.append(a[0][0, -1]))
        for layer in model.layers
    ]
    model(input_ids=torch.tensor([token_ids]))
    for hook in hooks:
        hook.remove()
    return torch.stack(seen)


@pytest.mark.parametrize("question", [CRAConfig().question, "\n\n### Any question?\n"], ids=["default", "other"])
@torch.inference_mode()
def test_contrasts_are_yes_minus_no_head_outputs_at_the_answer_token(tiny, question):
    model, tokenizer = tiny
    cra = ContrastRepresentationArithmetic(GeniesScoringConfig(max_tokens=64), CRAConfig(question=question))
    contrast, index, heads = cra.activations(model, tokenizer, PAIRS)
    layers = model.config.num_hidden_layers
    assert heads == model.config.num_attention_heads
    assert contrast.shape == (4, layers * heads, model.config.hidden_size // heads)  # unit = layer * heads + head
    for (a, b), pair in zip(index.tolist(), PAIRS):
        for row, response in ((a, pair["response_a"]), (b, pair["response_b"])):
            text = tokenizer(pair["prompt"])["input_ids"] + ids(tokenizer, response)  # no EOS: the answer is last
            by_hand = o_proj_inputs_at_last_token(model, text + ids(tokenizer, question + "Yes"))
            by_hand -= o_proj_inputs_at_last_token(model, text + ids(tokenizer, question + "No"))
            torch.testing.assert_close(contrast[row].view(layers, -1), by_hand, atol=1e-5, rtol=1e-4)


def test_direction_and_score_on_contrasts_by_hand():
    # 4 sequences x 1 head x 2 dims; pair 0 = (0, 1) prefers A, pair 1 = (2, 3) prefers B
    yes = torch.tensor([[3.0, 1.0], [1.0, 2.0], [0.0, 4.0], [2.0, 2.0]]).unsqueeze(1)
    no = torch.tensor([[1.0, 1.0], [1.0, 1.0], [1.0, 1.0], [0.0, 2.0]]).unsqueeze(1)
    index = torch.tensor([[0, 1], [2, 3]])
    preferred, dispreferred = preferred_rows(index, [{"preferred": 0}, {"preferred": 1}])
    contrast = yes - no  # (2, 0), (0, 1), (-1, 3), (2, 0)
    direction = mass_mean_directions(contrast[preferred], contrast[dispreferred])
    assert direction.tolist() == [[2.5, -2.0]]  # mean of c0, c3 = (2, 0) minus mean of c1, c2 = (-0.5, 2)
    # upstream's form: the Yes directions minus the No directions
    upstream = mass_mean_directions(yes[preferred], yes[dispreferred]) - mass_mean_directions(
        no[preferred], no[dispreferred]
    )
    assert upstream.tolist() == direction.tolist()
    # c(B) - c(A): pair 0 (-2, 1), pair 1 (3, -3)
    cosines = [(-5.0 - 2.0) / math.sqrt(5.0 * 10.25), (7.5 + 6.0) / math.sqrt(18.0 * 10.25)]
    scores = pair_score(pair_differences(contrast, index), direction)
    assert scores.tolist() == pytest.approx([0.5 * (1 + c) for c in cosines])
