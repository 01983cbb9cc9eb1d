"""Summed response log-probs for a batch of (prompt, response) token sequences.

Shared by the reference log-prob stage (no grad) and DPO training (grad), so
both compute the numbers the same way: right-padded batches, the prompt masked,
float32 log_softmax, summed over response tokens.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch


def pack(prompts: list[list[int]], responses: list[list[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded input_ids / attention_mask, and a mask of the response tokens."""
    if any(not p for p in prompts) or any(not r for r in responses):
        raise ValueError("every sequence needs a non-empty prompt and response (the response ends with end-of-turn)")
    lengths = [len(p) + len(r) for p, r in zip(prompts, responses)]
    width = max(lengths)
    input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(prompts), width), dtype=torch.long)
    response = torch.zeros((len(prompts), width), dtype=torch.bool)
    for row, (p, r) in enumerate(zip(prompts, responses)):
        input_ids[row, : len(p) + len(r)] = torch.tensor(p + r)
        attention[row, : len(p) + len(r)] = 1
        response[row, len(p) : len(p) + len(r)] = True
    return {"input_ids": input_ids, "attention_mask": attention, "response_mask": response}


def response_token_logprobs(model, batch: dict[str, torch.Tensor], past=None) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 log pi(token | prefix) from the batch's earliest response token on,
    and the mask of response tokens in that window (rows x window).
    ``past``: a KV cache of a prefix shared by every row (already batch-sized)."""
    response_mask = batch["response_mask"]
    first = int(response_mask.float().argmax(dim=1).min())  # earliest response token in the batch
    keep = batch["input_ids"].shape[1] - first + 1  # logits only from the position before it
    mask = batch["attention_mask"]
    kwargs = {"attention_mask": mask} if past is None else after_prefix(past, mask)
    logits = model(input_ids=batch["input_ids"], logits_to_keep=keep, **kwargs).logits[:, :-1].float()
    labels = batch["input_ids"][:, first:]
    logp = torch.log_softmax(logits, dim=-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    return logp, response_mask[:, first:]


def response_logprob_sums(model, batch: dict[str, torch.Tensor], past=None) -> torch.Tensor:
    """Sum over response tokens of log pi(token | prefix), one float32 value per row."""
    logp, mask = response_token_logprobs(model, batch, past)
    return (logp * mask).sum(dim=1)


def token_entropy(logp: torch.Tensor) -> torch.Tensor:
    """Entropy -sum_v p(v) log p(v) of each row of log-probabilities (nats).
    A -inf entry (a token masked to probability 0) adds 0 rather than 0 * -inf = nan."""
    return -(logp.exp() * logp.clamp(min=torch.finfo(logp.dtype).min)).sum(dim=-1)


def map_batches(
    fn, prompts: list[list[int]], responses: list[list[int]], pad_id: int, token_budget: int, progress=None
) -> list:
    """``fn(packed batch)`` -> one value per row, over many sequences in
    length-bucketed batches; values come back in input order."""
    lengths = [len(p) + len(r) for p, r in zip(prompts, responses)]
    values = [None] * len(prompts)
    for rows in token_budget_batches(lengths, token_budget):
        batch = pack([prompts[i] for i in rows], [responses[i] for i in rows], pad_id)
        for i, value in zip(rows, fn(batch)):
            values[i] = value
        if progress:
            progress(len(rows))
    return values


@torch.inference_mode()
def sequence_logprob_sums(
    model,
    pad_id: int,
    prompts: list[list[int]],
    responses: list[list[int]],
    token_budget: int,
    progress=None,
) -> list[float]:
    """Summed response log-probs of many sequences, in length-bucketed batches."""
    return map_batches(
        lambda batch: response_logprob_sums(model, batch).tolist(), prompts, responses, pad_id, token_budget, progress
    )


def prefix_cache(model, prefix: Sequence[int]):
    """The KV cache of a token prefix that many sequences continue (computed once for all of them)."""
    return model(input_ids=torch.tensor([list(prefix)]), use_cache=True).past_key_values


def cache_for_rows(cache, rows: int):
    """A batch-sized copy of a one-row prefix cache: a forward pass appends to the cache it is given."""
    past = copy.deepcopy(cache)
    past.batch_repeat_interleave(rows)
    return past


def after_prefix(past, attention_mask: torch.Tensor) -> dict:
    """Forward-pass arguments for padded rows (left or right) that continue a cached prefix,
    or none (``past`` None): the mask covers the prefix and each row's real tokens, and each
    real token's position goes on from the prefix, wherever the padding sits."""
    shared = past.get_seq_length() if past is not None else 0
    rows = attention_mask.shape[0]
    return {
        "attention_mask": torch.cat([torch.ones(rows, shared, dtype=torch.long), attention_mask], 1),
        "position_ids": shared + (attention_mask.cumsum(-1) - 1).clamp(min=0),
        "past_key_values": past,
    }


def token_budget_batches(lengths: list[int], token_budget: int, by_length: bool = True) -> list[list[int]]:
    """Row indices grouped so that rows x longest row stays within the budget (bounded
    memory; a row longer than the budget is a batch of its own). ``by_length``: rows of
    similar length share a batch (little padding); else the rows keep their order."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i]) if by_length else range(len(lengths))
    batches: list[list[int]] = []
    current: list[int] = []
    longest = 0
    for i in order:
        if current and (len(current) + 1) * max(longest, lengths[i]) > token_budget:
            batches.append(current)
            current, longest = [], 0
        current.append(i)
        longest = max(longest, lengths[i])
    if current:
        batches.append(current)
    return batches
