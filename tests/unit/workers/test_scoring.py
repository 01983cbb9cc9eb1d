"""Summed response log-probs (workers/scoring.py) against a direct per-sequence computation."""

import random

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from alignflow.workers.scoring import pack, response_logprob_sums, token_budget_batches

PAD = 0


@pytest.fixture(scope="module")
def tiny_llama():
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval()


def _seqs(lengths, seed):
    rng = random.Random(seed)
    return [[rng.randrange(1, 64) for _ in range(n)] for n in lengths]


PROMPTS = _seqs([3, 7, 1, 5], seed=1)
RESPONSES = _seqs([4, 1, 6, 2], seed=2)


@torch.no_grad()
def manual_sum(model, prompt, response):
    """One unpadded sequence: sum over response positions t of log_softmax(logits[t - 1])[token_t]."""
    ids = prompt + response
    logits = model(input_ids=torch.tensor([ids])).logits[0].float()
    logp = torch.log_softmax(logits, dim=-1)
    return sum(float(logp[t - 1, ids[t]]) for t in range(len(prompt), len(ids)))


def test_pack_layout():
    batch = pack([[1, 2], [3]], [[4], [5, 6, 7]], pad_id=9)
    assert batch["input_ids"].tolist() == [[1, 2, 4, 9], [3, 5, 6, 7]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0], [1, 1, 1, 1]]
    assert batch["response_mask"].tolist() == [[False, False, True, False], [False, True, True, True]]
    assert batch["input_ids"].dtype == torch.long and batch["response_mask"].dtype == torch.bool


@torch.no_grad()
def test_matches_manual_unpadded_computation(tiny_llama):
    sums = response_logprob_sums(tiny_llama, pack(PROMPTS, RESPONSES, PAD))
    assert sums.dtype == torch.float32 and sums.shape == (4,)
    expected = [manual_sum(tiny_llama, p, r) for p, r in zip(PROMPTS, RESPONSES)]
    assert sums.tolist() == pytest.approx(expected, abs=1e-5)
    assert all(v < 0 for v in expected)


@torch.no_grad()
def test_pad_id_value_does_not_matter(tiny_llama):
    a = response_logprob_sums(tiny_llama, pack(PROMPTS, RESPONSES, 0))
    b = response_logprob_sums(tiny_llama, pack(PROMPTS, RESPONSES, 63))
    c = response_logprob_sums(tiny_llama, pack(PROMPTS, RESPONSES, 17))
    torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    torch.testing.assert_close(a, c, atol=1e-6, rtol=0)


@torch.no_grad()
def test_batchmates_and_padding_do_not_change_a_row(tiny_llama):
    # row 1 alone (no padding) vs next to a much longer row (right-padded by 10)
    alone = response_logprob_sums(tiny_llama, pack([PROMPTS[1]], [RESPONSES[1]], PAD))
    long_prompt, long_response = _seqs([12], seed=3)[0], _seqs([7], seed=4)[0]
    mixed = response_logprob_sums(tiny_llama, pack([long_prompt, PROMPTS[1]], [long_response, RESPONSES[1]], PAD))
    assert float(mixed[1]) == pytest.approx(float(alone[0]), abs=1e-5)
    assert float(mixed[0]) == pytest.approx(manual_sum(tiny_llama, long_prompt, long_response), abs=1e-5)


@torch.no_grad()
def test_prompt_tokens_are_excluded(tiny_llama):
    # the same token sequence, with the prompt/response boundary moved one token right:
    # the difference is exactly the log-prob of the token that moved into the prompt
    seq = PROMPTS[0] + RESPONSES[0]  # 3 + 4 tokens
    k = len(PROMPTS[0])
    sums = response_logprob_sums(tiny_llama, pack([seq[:k], seq[: k + 1]], [seq[k:], seq[k + 1 :]], PAD))
    logits = tiny_llama(input_ids=torch.tensor([seq])).logits[0].float()
    logp = torch.log_softmax(logits, dim=-1)
    moved = float(logp[k - 1, seq[k]])
    assert float(sums[0] - sums[1]) == pytest.approx(moved, abs=1e-5)
    # and the prompt positions would have added something non-zero had they been counted
    with_prompt = sum(float(logp[t - 1, seq[t]]) for t in range(1, len(seq)))
    assert float(sums[0]) != pytest.approx(with_prompt, abs=1e-3)


@torch.no_grad()
def test_masked_response_sums_to_zero(tiny_llama):
    batch = pack(PROMPTS, RESPONSES, PAD)
    batch["response_mask"][2] = False
    batch["response_mask"][2, len(PROMPTS[2])] = True  # keep only the first response token of row 2
    sums = response_logprob_sums(tiny_llama, batch)
    logits = tiny_llama(input_ids=torch.tensor([PROMPTS[2] + RESPONSES[2]])).logits[0].float()
    first = float(torch.log_softmax(logits, -1)[len(PROMPTS[2]) - 1, RESPONSES[2][0]])
    assert float(sums[2]) == pytest.approx(first, abs=1e-5)


def test_gradients_flow_to_the_model(tiny_llama):
    tiny_llama.zero_grad(set_to_none=True)
    sums = response_logprob_sums(tiny_llama, pack(PROMPTS[:2], RESPONSES[:2], PAD))
    assert sums.requires_grad
    sums.sum().backward()
    grad = tiny_llama.model.embed_tokens.weight.grad
    assert grad is not None and float(grad.abs().sum()) > 0
    tiny_llama.zero_grad(set_to_none=True)


def test_empty_response_or_prompt_is_a_clear_error():
    with pytest.raises(ValueError, match="non-empty prompt and response"):
        pack([PROMPTS[0], PROMPTS[1]], [RESPONSES[0], []], PAD)
    with pytest.raises(ValueError, match="non-empty prompt and response"):
        pack([[]], [RESPONSES[0]], PAD)


# -- token_budget_batches ------------------------------------------------------------------


def test_token_budget_batches_hand_worked():
    # sorted by length: 1(1) 6(2) 3(3) 4(3) 0(5) 5(7) 2(9)
    # [1, 6, 3, 4]: 4 rows x 3 = 12 <= 12 ; adding 0 would be 5 x 5 = 25 -> new batch
    # [0]: adding 5 would be 2 x 7 = 14 -> new batch ; [5]: adding 2 would be 2 x 9 = 18 -> new batch
    assert token_budget_batches([5, 1, 9, 3, 3, 7, 2], 12) == [[1, 6, 3, 4], [0], [5], [2]]


def test_token_budget_batches_every_index_once_within_budget():
    rng = random.Random(0)
    for budget in (16, 64, 500):
        lengths = [rng.randint(1, 40) for _ in range(200)]
        batches = token_budget_batches(lengths, budget)
        flat = [i for b in batches for i in b]
        assert sorted(flat) == list(range(200))
        for b in batches:
            assert len(b) * max(lengths[i] for i in b) <= budget or len(b) == 1
        # length-bucketed: batches come in non-decreasing length order
        assert [lengths[i] for i in flat] == sorted(lengths)


def test_token_budget_batches_oversized_row_alone_and_empty():
    assert token_budget_batches([100, 2, 2], 10) == [[1, 2], [0]]
    assert token_budget_batches([], 10) == []


def test_token_budget_batches_in_row_order_pad_to_the_longest_so_far():
    # in order: [5, 1] 2 x 5 = 10; adding 9 -> 3 x 9 = 27 > 12; [9] alone; [3, 3] 6, adding 7 -> 21; [7, 2] 14 > 12
    assert token_budget_batches([5, 1, 9, 3, 3, 7, 2], 12, by_length=False) == [[0, 1], [2], [3, 4], [5], [6]]
