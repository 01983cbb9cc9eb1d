"""zero_shot and few_shot: score = summed log-prob of response + EOS given the
prompt; P(A preferred) = softmax over the two scores. few_shot prepends k
source examples (prompt + preferred response) to every prompt."""

from __future__ import annotations

import json
import random
from pathlib import Path

from pydantic import Field

from alignflow.config import GeniesScoringConfig, Strict
from alignflow.genies.data import preferred_texts
from alignflow.genies.interventions.base import BuiltinIntervention, Scores, register
from alignflow.genies.scoring import encode_pairs, per_pair_progress, probs_from_scores
from alignflow.workers.models import load_causal_lm
from alignflow.workers.scoring import sequence_logprob_sums


def response_logprobs(
    model, tokenizer, pairs: list[dict], scoring: GeniesScoringConfig, prefix: list[int] = (), progress=None
) -> tuple[list[float], list[float]]:
    """Summed log-prob of response A and of response B of every pair (after ``prefix``)."""
    seqs = encode_pairs(tokenizer, pairs, scoring.max_tokens, bos=not prefix)
    sums = sequence_logprob_sums(
        model,
        tokenizer.pad_token_id,
        seqs.prompts,
        seqs.responses,
        scoring.token_budget,
        per_pair_progress(progress, len(seqs.prompts), len(pairs)),
        prefix,
    )
    return seqs.pair_scores(sums)


def evaluate_logprobs(
    base: Path, pairs: list[dict], scoring: GeniesScoringConfig, prefix: str, progress, max_prefix_tokens: int = 0
) -> Scores:
    model, tokenizer = load_causal_lm(base, scoring.dtype)
    prefix_ids = tokenizer(prefix)["input_ids"][-max_prefix_tokens:] if prefix else []
    a, b = response_logprobs(model, tokenizer, pairs, scoring, prefix_ids, progress)
    return Scores(p_a=probs_from_scores(a, b))


class FewShotConfig(Strict):
    k: int = Field(4, ge=1, description="source examples (prompt + preferred response) prepended")
    max_prefix_tokens: int = Field(1024, ge=16, description="the examples keep their last this many tokens")
    seed: int = 0


@register("zero_shot")
class ZeroShot(BuiltinIntervention):
    trains = False

    def train(self, base, pairs, out, progress=None) -> dict:
        return {}

    def evaluate(self, base: Path, state: Path | None, pairs: list[dict], progress=None) -> Scores:
        return evaluate_logprobs(base, pairs, self.scoring, "", progress)


@register("few_shot", FewShotConfig)
class FewShot(BuiltinIntervention):
    trains = True  # "training" picks the k examples from the source distribution
    config: FewShotConfig

    def train(self, base, pairs: list[dict], out: Path, progress=None) -> dict:
        by_record = {}
        for pair in pairs:  # one example per record: its preferred response
            by_record.setdefault(pair["prompt"], preferred_texts(pair)[0])
        prompts = sorted(by_record)
        chosen = random.Random(self.config.seed).sample(prompts, min(self.config.k, len(prompts)))
        examples = [{"prompt": p, "response": by_record[p]} for p in chosen]
        (out / "examples.json").write_text(json.dumps(examples, indent=1))
        return {"examples": len(examples)}

    def evaluate(self, base: Path, state: Path | None, pairs: list[dict], progress=None) -> Scores:
        examples = json.loads((state / "examples.json").read_text())
        prefix = "".join(f"{e['prompt']}{e['response']}\n\n" for e in examples)
        return evaluate_logprobs(base, pairs, self.scoring, prefix, progress, self.config.max_prefix_tokens)
