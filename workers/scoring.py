"""Summed response log-probs for a batch of (prompt, response) token sequences.

Shared by the reference log-prob stage (no grad) and DPO training (grad), so
both compute the numbers the same way: right-padded batches, the prompt masked,
float32 log_softmax, summed over response tokens.
"""
from __future__ import annotations

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


def response_logprob_sums(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Sum over response tokens of log pi(token | prefix), one float32 value per row."""
    response_mask = batch["response_mask"]
    first = int(response_mask.float().argmax(dim=1).min())  # earliest response token in the batch
    keep = batch["input_ids"].shape[1] - first + 1  # logits only from the position before it
    logits = model(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], logits_to_keep=keep
    ).logits[:, :-1].float()
    labels = batch["input_ids"][:, first:]
    logp = torch.log_softmax(logits, dim=-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    return (logp * response_mask[:, first:]).sum(dim=1)


def token_budget_batches(lengths: list[int], token_budget: int) -> list[list[int]]:
    """Row indices grouped so that rows of similar length share a batch and
    rows x longest row stays within the budget (little padding, bounded memory)."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    batches, current = [], []
    for i in order:
        if current and (len(current) + 1) * lengths[i] > token_budget:
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    return batches
