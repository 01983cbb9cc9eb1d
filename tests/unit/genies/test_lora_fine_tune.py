"""lora_fine_tune's arithmetic: two logits -> a response's score -> P(A preferred), the
Bradley-Terry loss on each logit, the constant learning rate, the epoch-wise batches, the
head's pooling and initialisation, and when the base model is loaded in 4 bits."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from alignflow.genies.interventions import lora_fine_tune
from alignflow.genies.interventions.lora_fine_tune import (
    LoraFineTuneConfig,
    constant_lr,
    evaluation_precision,
    response_scores,
    shuffled_batches,
    two_logit_head,
    use_4bit,
)
from alignflow.genies.interventions.lora_rm import (
    LastTokenHead,
    bradley_terry_loss,
    fit_preferences,
    pair_chunks,
    preferred_index,
)
from alignflow.genies.scoring import Sequences, encode_pairs, probs_from_scores
from alignflow.tasks.training import lr_factor
from alignflow.workers.models import load_backbone
from alignflow.workers.scoring import pack


def test_defaults_are_upstreams_training_arguments():
    config = LoraFineTuneConfig()
    assert (config.lora.r, config.lora.alpha, config.lora.dropout) == (64, 16, 0.1)
    assert config.lora.target_modules == ["q_proj", "v_proj"]  # peft's default for Llama
    assert (config.lr, config.steps, config.batch_size, config.max_grad_norm) == (2e-4, 100, 16, 0.3)
    assert config.warmup_ratio == 0.0 and config.quantize_4bit is True


def test_a_responses_score_is_the_mean_of_its_logits_and_p_a_their_softmax():
    scores = response_scores(torch.tensor([[1.0, 3.0], [0.0, -2.0]]))
    assert scores.tolist() == [2.0, -1.0]
    # softmax over (2, -1): 1 / (1 + e^-3)
    assert probs_from_scores([2.0], [-1.0]) == [pytest.approx(0.9525741268224334)]
    assert float(torch.softmax(scores, dim=0)[0]) == pytest.approx(0.9525741268224334)


def test_the_loss_is_bradley_terry_on_each_logit_then_the_mean():
    loss = bradley_terry_loss(torch.tensor([[1.0, 3.0]]), torch.tensor([[0.0, -2.0]]))
    # (-log sigmoid(1 - 0) - log sigmoid(3 + 2)) / 2 = (log(1 + e^-1) + log(1 + e^-5)) / 2,
    # not -log sigmoid(mean difference 3) = 0.0486
    assert float(loss) == pytest.approx(0.15998851800367048)


def test_the_learning_rate_is_constant_after_an_optional_warmup():
    assert [lr_factor(s, 100, 3, decay=False) for s in (0, 1, 2, 3, 50, 99)] == pytest.approx(
        [1 / 3, 2 / 3, 1, 1, 1, 1]
    )
    warm = constant_lr(LoraFineTuneConfig(warmup_ratio=0.03))  # round(0.03 x 100) = 3 warmup steps
    assert [warm(s) for s in (0, 1, 2, 3, 99)] == pytest.approx([2e-4 / 3, 4e-4 / 3, 2e-4, 2e-4, 2e-4])
    upstream = constant_lr(LoraFineTuneConfig())  # its "constant" scheduler ignores warmup_ratio
    assert [upstream(s) for s in (0, 1, 99)] == [2e-4, 2e-4, 2e-4]


def test_batches_go_through_a_fresh_shuffle_each_epoch():
    batches = shuffled_batches(10, 4, 7, seed=0)
    assert [len(b) for b in batches] == [4, 4, 2, 4, 4, 2, 4]  # an epoch's last batch holds the rest
    first, second = batches[:3], batches[3:6]
    assert sorted(sum(first, [])) == sorted(sum(second, [])) == list(range(10))
    assert sum(first, []) != sum(second, [])
    assert shuffled_batches(10, 4, 7, seed=0) == batches and shuffled_batches(10, 4, 7, seed=1) != batches


def test_the_head_reads_each_rows_last_real_token():
    class Echo(torch.nn.Module):  # a backbone whose state at a token is its id
        def forward(self, input_ids, attention_mask):
            return SimpleNamespace(last_hidden_state=input_ids[..., None].float())

    head = torch.nn.Linear(1, 2, bias=False)
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[1.0], [2.0]]))
    batch = pack([[5, 6], [7]], [[8, 9], [10]], pad_id=0)  # rows 5 6 8 9 and 7 10 0 0
    assert LastTokenHead(Echo(), head)(batch).tolist() == [[9.0, 18.0], [10.0, 20.0]]


def test_the_head_is_initialised_as_transformers_classifiers():
    torch.manual_seed(0)
    backbone = SimpleNamespace(config=SimpleNamespace(hidden_size=4096, initializer_range=0.02), device="cpu")
    head = two_logit_head(backbone)
    assert head.weight.shape == (2, 4096) and head.bias is None
    weights = head.weight.detach()
    assert float(weights.mean()) == pytest.approx(0.0, abs=1e-3)
    assert float(weights.std()) == pytest.approx(0.02, rel=0.03)


@pytest.mark.parametrize(
    "requested, cuda, bitsandbytes, quantized",
    [(True, True, True, True), (True, False, True, False), (True, True, False, False), (False, True, True, False)],
)
def test_4bit_needs_bitsandbytes_and_cuda(monkeypatch, tmp_path, requested, cuda, bitsandbytes, quantized):
    monkeypatch.setattr(lora_fine_tune.torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(lora_fine_tune.importlib.util, "find_spec", lambda name: object() if bitsandbytes else None)
    assert use_4bit(requested) is quantized
    (tmp_path / "precision.json").write_text(json.dumps({"quantized_4bit": requested}))
    assert evaluation_precision(tmp_path) is quantized  # evaluated in 4 bits only where trained so


def _lengths_seqs(lengths: list[int]) -> tuple[Sequences, list[tuple[int, int]]]:
    """Pairs whose two sequences are ``length`` tokens long (a 1-token prompt and the rest)."""
    prompts = [[1] for _ in lengths for _ in (0, 1)]
    responses = [[2] * (n - 1) for n in lengths for _ in (0, 1)]
    return Sequences(prompts, responses, [(2 * i, 2 * i + 1) for i in range(len(lengths))]), [
        (2 * i, 2 * i + 1) for i in range(len(lengths))
    ]


def test_a_steps_pairs_are_cut_into_micro_batches_within_the_token_budget():
    seqs, order = _lengths_seqs([10, 30, 10, 10, 100])
    # budget 80: 2 rows per pair, padded to the longest: [10] + [30] = 2*2*30 = 120 > 80 -> apart
    assert pair_chunks(seqs, order, [0, 1, 2, 3, 4], 80) == [[0], [1], [2, 3], [4]]
    assert pair_chunks(seqs, order, [0, 2, 3], 10_000) == [[0, 2, 3]]


def test_micro_batches_give_the_whole_batchs_loss_and_gradient(tiny_model_dir):
    backbone, tokenizer = load_backbone(tiny_model_dir, "float32")
    pairs = [
        {
            "pair_id": str(i),
            "prompt": f"Question {i}?" * (1 + i),
            "response_a": f"yes {i}",
            "response_b": "no " * (i + 1),
        }
        | {"preferred": i % 2}
        for i in range(4)
    ]
    seqs = encode_pairs(tokenizer, pairs, 512)
    order = preferred_index(seqs, pairs)
    results = []
    for budget in (100_000, 40):  # one forward, and one pair at a time
        torch.manual_seed(0)
        model = LastTokenHead(backbone, two_logit_head(backbone))
        losses = fit_preferences(model, seqs, order, tokenizer.pad_token_id, [[0, 1, 2, 3]], lambda _: 0.0, 1e9, budget)
        results.append((losses, torch.cat([p.grad.flatten() for p in model.head.parameters()])))
    assert len(pair_chunks(seqs, order, [0, 1, 2, 3], 40)) == 4
    assert results[1][0] == pytest.approx(results[0][0], rel=1e-5)
    torch.testing.assert_close(results[1][1], results[0][1], rtol=1e-4, atol=1e-7)
