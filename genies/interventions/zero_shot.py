"""zero_shot and few_shot, scored as GENIES scores them: a response's score is its
summed log-prob (response + EOS, given the prompt) divided by the pair's padded
length minus one, the positions its trainer averages over, so both responses of a
pair share the divisor; P(A preferred) = softmax over the two scores.

few_shot puts, before each test prompt, ``k`` examples (prompt + preferred
response, each after a blank line) drawn for that record from the source's whole
train split. GENIES draws them unseeded; here the draw is seeded per record, so a
run repeats. Departure: the examples keep their last ``max_prefix_tokens`` tokens,
where GENIES drops a test pair whose prompt with examples exceeds the model's
context (2048 tokens for its models), since our CPU runs cap sequences far lower.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from pydantic import Field

from alignflow.config import GeniesScoringConfig, Strict
from alignflow.genies.data import preferred_texts
from alignflow.genies.interventions.base import BuiltinIntervention, Scores, register
from alignflow.genies.scoring import Sequences, encode_pairs, per_pair_progress, probs_from_scores, text_ids
from alignflow.workers.models import load_causal_lm
from alignflow.workers.scoring import sequence_logprob_sums

SEPARATOR = "\n\n"  # between few-shot examples, and before the test prompt


def padded_lengths(seqs: Sequences) -> list[int]:
    """Per pair, the positions GENIES's trainer averages over: the longer side's
    prompt + response length, minus the first token (it predicts nothing)."""
    lengths = [len(p) + len(r) for p, r in zip(seqs.prompts, seqs.responses)]
    return [max(lengths[a], lengths[b]) - 1 for a, b in seqs.pair_index]


def normalised_probs(seqs: Sequences, sums: list[float]) -> list[float]:
    """P(A preferred) from per-sequence summed log-probs, each pair's scores divided by its padded length."""
    a, b = seqs.pair_scores(sums)
    divisors = padded_lengths(seqs)
    return probs_from_scores([x / d for x, d in zip(a, divisors)], [y / d for y, d in zip(b, divisors)])


def evaluate_logprobs(base: Path, pairs: list[dict], scoring: GeniesScoringConfig, progress, prefix=None) -> Scores:
    model, tokenizer = load_causal_lm(base, scoring.dtype)
    seqs = encode_pairs(tokenizer, pairs, scoring.max_tokens, prefix(tokenizer) if prefix else None)
    sums = sequence_logprob_sums(
        model,
        tokenizer.pad_token_id,
        seqs.prompts,
        seqs.responses,
        scoring.token_budget,
        per_pair_progress(progress, len(seqs.prompts), len(pairs)),
    )
    return Scores(p_a=normalised_probs(seqs, sums))


class FewShotConfig(Strict):
    k: int = Field(4, ge=1, description="source examples (prompt + preferred response) before each test prompt")
    max_prefix_tokens: int = Field(1024, ge=16, description="the examples keep their last this many tokens")
    seed: int = 0


@register("zero_shot")
class ZeroShot(BuiltinIntervention):
    trains = False

    def train(self, base, pairs, out, progress=None) -> dict:
        return {}

    def evaluate(self, base: Path, state: Path | None, pairs: list[dict], progress=None) -> Scores:
        return evaluate_logprobs(base, pairs, self.scoring, progress)


@register("few_shot", FewShotConfig)
class FewShot(BuiltinIntervention):
    trains = True  # "training" keeps the source's examples
    full_train_split = True  # the examples are drawn from all of it, not the capped pairs
    config: FewShotConfig

    def train(self, base, pairs: list[dict], out: Path, progress=None) -> dict:
        examples = {}
        for pair in pairs:  # one example per record: its preferred response
            examples.setdefault(pair["prompt"], preferred_texts(pair)[0])
        pool = [{"prompt": p, "response": r} for p, r in examples.items()]
        (out / "examples.json").write_text(json.dumps(pool, indent=1))
        return {"examples": len(pool)}

    def evaluate(self, base: Path, state: Path | None, pairs: list[dict], progress=None) -> Scores:
        pool = json.loads((state / "examples.json").read_text())
        return evaluate_logprobs(base, pairs, self.scoring, progress, lambda tokenizer: self._prefixer(tokenizer, pool))

    def _prefixer(self, tokenizer, pool: list[dict]):
        """pair -> the token ids of its record's examples, the same for every pair of a record."""
        cache: dict[str, list[int]] = {}

        def prefix(pair: dict) -> list[int]:
            if pair["prompt"] not in cache:
                text = "".join(SEPARATOR + e["prompt"] + e["response"] for e in self.shots(pool, pair["prompt"]))
                cache[pair["prompt"]] = text_ids(tokenizer, text)[-self.config.max_prefix_tokens :] + text_ids(
                    tokenizer, SEPARATOR
                )
            return cache[pair["prompt"]]

        return prefix

    def shots(self, pool: list[dict], prompt: str) -> list[dict]:
        """The k examples of one test record, drawn from the seed and the record's prompt."""
        return random.Random(f"{self.config.seed}:{prompt}").sample(pool, min(self.config.k, len(pool)))
