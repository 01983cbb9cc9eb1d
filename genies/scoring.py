"""How GENIES text reaches a model, shared by every built-in intervention.

Prompts are Alpaca-formatted and end with ``### Response:\\n``; the response
follows with no separator and ends with EOS. Each distinct (prompt, response)
is encoded and scored once, however many pairs share it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass
class Sequences:
    """Distinct token sequences and, per pair, the indices of its two responses."""

    prompts: list[list[int]]
    responses: list[list[int]]
    pair_index: list[tuple[int, int]]

    def pair_scores(self, values: list[float]) -> tuple[list[float], list[float]]:
        return [values[a] for a, _ in self.pair_index], [values[b] for _, b in self.pair_index]


def encode_pairs(tokenizer, pairs: list[dict], max_tokens: int, bos: bool = True) -> Sequences:
    """Token ids of ``prompt`` and ``response + EOS`` for both sides of every pair.
    Over-long responses keep their first max_tokens/2 tokens; then the prompt
    loses tokens from the left. ``bos=False`` when a shared prefix comes first."""
    seen: dict[tuple[str, str], int] = {}
    prompts, responses, index = [], [], []
    encoded_prompts: dict[str, list[int]] = {}
    for pair in pairs:
        sides = []
        for response in (pair["response_a"], pair["response_b"]):
            key = (pair["prompt"], response)
            if key not in seen:
                if pair["prompt"] not in encoded_prompts:
                    encoded_prompts[pair["prompt"]] = _ids(tokenizer, pair["prompt"], special=bos)
                prompt_ids, response_ids = _fit(
                    encoded_prompts[pair["prompt"]], _response_ids(tokenizer, response, max_tokens), max_tokens
                )
                seen[key] = len(prompts)
                prompts.append(prompt_ids)
                responses.append(response_ids)
            sides.append(seen[key])
        index.append((sides[0], sides[1]))
    return Sequences(prompts, responses, index)


def _ids(tokenizer, text: str, special: bool) -> list[int]:
    return list(tokenizer(text, add_special_tokens=special)["input_ids"])


def _response_ids(tokenizer, response: str, max_tokens: int) -> list[int]:
    return _ids(tokenizer, response, special=False)[: max(1, max_tokens // 2 - 1)] + [tokenizer.eos_token_id]


def _fit(prompt_ids: list[int], response_ids: list[int], max_tokens: int) -> tuple[list[int], list[int]]:
    room = max(1, max_tokens - len(response_ids))
    return prompt_ids[-room:], response_ids


def prob_first(score_a: float, score_b: float) -> float:
    """P(A preferred) = softmax over the two scores = sigmoid(score_a - score_b)."""
    return 1.0 / (1.0 + math.exp(min(700.0, score_b - score_a)))


def probs_from_scores(score_a: list[float], score_b: list[float]) -> list[float]:
    return [prob_first(a, b) for a, b in zip(score_a, score_b)]


def last_token_states(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Hidden state at each row's last real token, for every layer: rows x layers x hidden."""
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True)
    last = batch["attention_mask"].sum(dim=1) - 1
    layers = torch.stack(out.hidden_states[1:], dim=1)  # drop the embedding output
    return layers[torch.arange(len(last)), :, last].float()


def per_pair_progress(progress, sequences: int, pairs: int):
    """Report progress in pairs while the work is counted in sequences."""
    if progress is None:
        return None
    done = [0, 0]

    def advance(n: int) -> None:
        done[0] += n
        reached = done[0] * pairs // max(sequences, 1)
        progress(reached - done[1])
        done[1] = reached

    return advance
