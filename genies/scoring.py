"""How GENIES text reaches a model, shared by every built-in intervention.

Prompts are Alpaca-formatted and end with ``### Response:\\n``; the response
follows with no separator and ends with EOS; no BOS, as GENIES tokenizes. Each
distinct (prompt, response) is encoded and scored once, however many pairs share it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
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


def encode_pairs(
    tokenizer, pairs: list[dict], max_tokens: int, prefix: Callable[[dict], list[int]] | None = None
) -> Sequences:
    """Token ids of ``prompt`` and ``response + EOS`` for both sides of every pair, each
    text tokenized on its own without special tokens, as GENIES's collator does.
    ``prefix(pair)`` gives ids to put before a pair's prompt (few-shot examples).

    Pairs longer than ``max_tokens`` are dropped by the pairs stage (``too_long``), as
    GENIES drops them; meeting one here means the pairs did not come through it."""
    seen: dict[tuple[str, str], int] = {}
    prompts, responses, index = [], [], []
    encoded_prompts: dict[str, list[int]] = {}
    for pair in pairs:
        sides = []
        for response in (pair["response_a"], pair["response_b"]):
            key = (pair["prompt"], response)
            if key not in seen:
                if pair["prompt"] not in encoded_prompts:
                    encoded_prompts[pair["prompt"]] = text_ids(tokenizer, pair["prompt"])
                prompt_ids, answer_ids = encoded_prompts[pair["prompt"]], response_ids(tokenizer, response)
                if len(prompt_ids) + len(answer_ids) > max_tokens:
                    raise ValueError(
                        f"pair {pair['pair_id']}: {len(prompt_ids) + len(answer_ids)} tokens, over max_tokens="
                        f"{max_tokens} (the genies_pairs stage drops such pairs)"
                    )
                seen[key] = len(prompts)
                prompts.append((prefix(pair) if prefix else []) + prompt_ids)
                responses.append(answer_ids)
            sides.append(seen[key])
        index.append((sides[0], sides[1]))
    return Sequences(prompts, responses, index)


def text_ids(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def response_ids(tokenizer, response: str) -> list[int]:
    return text_ids(tokenizer, response) + [tokenizer.eos_token_id]


def too_long(tokenizer, record: dict, max_tokens: int) -> bool:
    """Whether any response of a record, after its prompt, exceeds ``max_tokens``
    (GENIES drops the whole record, not only the long response's pair)."""
    prompt = len(text_ids(tokenizer, record["prompt"]))
    return any(prompt + len(response_ids(tokenizer, r)) > max_tokens for r in record["responses"])


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
