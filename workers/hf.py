"""The transformers backend: batched, left-padded generation with a KV cache.

It runs its own decode loop rather than ``model.generate`` so that every step's
raw next-token distribution is seen exactly once: the sampled token's log-prob,
the entropy and the top-k come from it without storing B x steps x vocab
logits, and each row samples from its own seeded generator.
"""

from __future__ import annotations

from pathlib import Path

import torch

from alignflow.workers.backend import Completion, GenerationParams
from alignflow.workers.chat import end_of_turn_ids
from alignflow.workers.models import load_causal_lm
from alignflow.workers.scoring import after_prefix, cache_for_rows, prefix_cache, sequence_logprob_sums, token_entropy


class HFBackend:
    def __init__(self, model_dir: Path, dtype: str = "float32", batch_size: int = 16, token_budget: int = 4096):
        self.model, self.tokenizer = load_causal_lm(model_dir, dtype)
        self.batch_size = batch_size
        self.token_budget = token_budget
        self.stop_ids = end_of_turn_ids(self.tokenizer, self.model)

    # -- generation -----------------------------------------------------------
    def generate(self, prompts: list[list[int]], params: GenerationParams, seeds: list[int], progress=None):
        rows = [(i, j) for i in range(len(prompts)) for j in range(params.n)]
        rows.sort(key=lambda r: len(prompts[r[0]]))  # similar lengths share a batch
        results: list[list[Completion | None]] = [[None] * params.n for _ in prompts]
        for start in range(0, len(rows), self.batch_size):
            batch = rows[start : start + self.batch_size]
            generators = [_row_generator(seeds[i], j) for i, j in batch]
            completions = self._generate_batch([prompts[i] for i, _ in batch], params, generators)
            for (i, j), completion in zip(batch, completions):
                results[i][j] = completion
            if progress:
                progress(len(batch))
        return results

    @torch.inference_mode()
    def _generate_batch(self, prompts, params: GenerationParams, generators) -> list[Completion]:
        pad = self.tokenizer.pad_token_id
        width = max(len(p) for p in prompts)
        input_ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
        attention = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
        positions = (attention.cumsum(-1) - 1).clamp(min=0)
        steps = [_StepRecord() for _ in prompts]
        finished = torch.zeros(len(prompts), dtype=torch.bool)
        cache = None
        for _ in range(params.max_new_tokens):
            out = self.model(
                input_ids=input_ids,
                attention_mask=attention,
                position_ids=positions,
                past_key_values=cache,
                use_cache=True,
                logits_to_keep=1,
            )
            cache = out.past_key_values
            logp = torch.log_softmax(out.logits[:, -1].float(), dim=-1)
            tokens = _choose_tokens(logp, params, generators)
            entropies = token_entropy(logp).tolist() if params.entropies else None
            for row in torch.nonzero(~finished).flatten().tolist():
                steps[row].add(logp[row], int(tokens[row]), params, entropies[row] if entropies else None)
            finished |= torch.isin(tokens, torch.tensor(self.stop_ids))
            if finished.all():
                break
            input_ids = torch.where(finished, pad, tokens).unsqueeze(1)
            attention = torch.cat([attention, torch.ones_like(attention[:, :1])], dim=1)
            positions = positions[:, -1:] + 1
        return [self._completion(s, params) for s in steps]

    # -- one greedy token after a shared prefix (the judge's label) -------------
    def next_token(self, groups: list[list[list[int]]], top_logprobs: int, progress=None) -> list[list[Completion]]:
        """What ``generate`` gives greedily with max_new_tokens 1, per prompt of each group. A group's
        prompts (the judge's comparisons of one instruction) share a token prefix: its KV cache is
        computed once and every prompt runs only its own suffix against it."""
        params = GenerationParams(temperature=0.0, max_new_tokens=1, top_logprobs=top_logprobs)
        return [self._next_token_group(prompts, params, progress) for prompts in groups]

    @torch.inference_mode()
    def _next_token_group(self, prompts: list[list[int]], params: GenerationParams, progress) -> list[Completion]:
        shared = shared_prefix_length(prompts)
        cache = prefix_cache(self.model, prompts[0][:shared]) if shared else None
        completions = []
        for start in range(0, len(prompts), self.batch_size):
            suffixes = [p[shared:] for p in prompts[start : start + self.batch_size]]
            logp = self._next_token_logprobs(suffixes, cache)
            for row, token in zip(logp, _choose_tokens(logp, params, generators=None)):
                record = _StepRecord()
                record.add(row, int(token), params, None)
                completions.append(self._completion(record, params))
            if progress:
                progress(len(suffixes))
        return completions

    def _next_token_logprobs(self, suffixes: list[list[int]], cache) -> torch.Tensor:
        """float32 next-token log-probs after each suffix. Suffixes are left-padded so every row
        ends at the last position: only that position's logits are computed (``logits_to_keep=1``
        means the same in every transformers release; per-row indices do not)."""
        width = max(len(s) for s in suffixes)
        input_ids = torch.tensor([[self.tokenizer.pad_token_id] * (width - len(s)) + s for s in suffixes])
        mask = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in suffixes])
        past = cache_for_rows(cache, len(suffixes)) if cache is not None else None
        logits = self.model(input_ids=input_ids, logits_to_keep=1, **after_prefix(past, mask)).logits[:, -1]
        return torch.log_softmax(logits.float(), dim=-1)

    def _completion(self, record: _StepRecord, params: GenerationParams) -> Completion:
        stopped = bool(record.tokens) and record.tokens[-1] in self.stop_ids
        text_ids = record.tokens[:-1] if stopped else record.tokens
        return Completion(
            token_ids=record.tokens,
            text=self.tokenizer.decode(text_ids, skip_special_tokens=True),
            logprobs=record.logprobs,
            finish_reason="stop" if stopped else "length",
            top_logprobs=record.top if params.top_logprobs else None,
            entropies=record.entropies if params.entropies else None,
            stop_token=record.tokens[-1] if stopped else None,
        )

    # -- scoring --------------------------------------------------------------
    def sequence_logprobs(self, prompts: list[list[int]], responses: list[list[int]], progress=None) -> list[float]:
        return sequence_logprob_sums(
            self.model, self.tokenizer.pad_token_id, prompts, responses, self.token_budget, progress
        )


class _StepRecord:
    """Per-row record of what was generated and the raw distribution it came from."""

    def __init__(self):
        self.tokens: list[int] = []
        self.logprobs: list[float] = []
        self.entropies: list[float] = []
        self.top: list[list[tuple[int, float]]] = []

    def add(self, logp: torch.Tensor, token: int, params: GenerationParams, entropy: float | None) -> None:
        self.tokens.append(token)
        self.logprobs.append(float(logp[token]))
        if entropy is not None:
            self.entropies.append(entropy)
        if params.top_logprobs:
            values, ids = logp.topk(min(params.top_logprobs, logp.shape[-1]))
            self.top.append(list(zip(ids.tolist(), values.tolist())))


def shared_prefix_length(prompts: list[list[int]]) -> int:
    """Length of the prompts' longest common token prefix, leaving every prompt at least one token of its own."""
    shortest = min(len(p) for p in prompts)
    for i in range(shortest - 1):
        if any(p[i] != prompts[0][i] for p in prompts):
            return i
    return shortest - 1


def _row_generator(seed: int, sample_index: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + sample_index)


def _choose_tokens(logp: torch.Tensor, params: GenerationParams, generators) -> torch.Tensor:
    if params.temperature == 0:
        return logp.argmax(dim=-1)
    probs, ids = nucleus(torch.softmax(logp / params.temperature, dim=-1), params.top_p)
    uniforms = torch.cat([torch.rand(1, generator=g) for g in generators])  # one draw per row and step
    return sample_from(probs, ids, uniforms)


def nucleus(probs: torch.Tensor, top_p: float, first_k: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """The smallest set of most likely tokens whose mass reaches top_p, as (probs, token ids)
    sorted by probability with zeros past each row's nucleus. A partial top-k finds it
    without sorting the vocabulary; k grows only when a row's nucleus is longer."""
    if top_p >= 1.0:
        return probs, torch.arange(probs.shape[-1]).expand_as(probs)
    k = min(first_k, probs.shape[-1])
    while True:
        top, ids = probs.topk(k, dim=-1)
        if k == probs.shape[-1] or bool((top.sum(dim=-1) >= top_p).all()):
            break
        k = min(8 * k, probs.shape[-1])
    mass_before = top.cumsum(dim=-1) - top
    return top.masked_fill(mass_before >= top_p, 0.0), ids


def sample_from(probs: torch.Tensor, ids: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF sampling: row i takes the first token whose cumulative mass exceeds
    uniforms[i] x the row's mass (the same token for any k that holds the nucleus)."""
    cdf = probs.cumsum(dim=-1)
    picks = torch.searchsorted(cdf, (uniforms * cdf[:, -1]).unsqueeze(-1), right=True).clamp(max=probs.shape[-1] - 1)
    return ids.gather(-1, picks).squeeze(-1)
