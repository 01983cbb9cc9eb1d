"""dpo: train the policy on the source pairs with this project's DPO stage objective
and training loop (``fit``); a response's score is its implicit reward
beta * (log pi - log pi_ref)."""

from __future__ import annotations

import shutil
from pathlib import Path

from pydantic import Field

from alignflow.config import DPOConfig
from alignflow.genies.interventions.base import BuiltinIntervention, Scores, register
from alignflow.genies.scoring import Sequences, encode_pairs, per_pair_progress, probs_from_scores
from alignflow.tasks.train_dpo import dpo_objective
from alignflow.tasks.training import fit
from alignflow.workers.models import load_causal_lm
from alignflow.workers.scoring import sequence_logprob_sums


class GeniesDPOConfig(DPOConfig):
    """DPO as a GENIES intervention: more steps on the few source pairs, no validation split."""

    lr: float = Field(1e-4, gt=0.0)
    epochs: int = Field(2, ge=1)
    val_fraction: float = Field(0.0, ge=0.0, lt=1.0)


def dpo_rows(seqs: Sequences, pairs: list[dict]) -> list[dict]:
    """Token ids in the layout train_dpo reads. Both sides share one prompt: the
    more truncated of the two renderings, so it fits with either response."""
    rows = []
    for (a, b), pair in zip(seqs.pair_index, pairs):
        chosen, rejected = (a, b) if pair["preferred"] == 0 else (b, a)
        prompt = min(seqs.prompts[a], seqs.prompts[b], key=len)
        rows.append(
            {
                "prompt_id": pair["prompt"],
                "prompt_ids": prompt,
                "chosen_ids": seqs.responses[chosen],
                "rejected_ids": seqs.responses[rejected],
            }
        )
    return rows


def add_reference_logprobs(model, pad_id: int, rows: list[dict], token_budget: int) -> None:
    prompts = [r["prompt_ids"] for r in rows] * 2
    responses = [r["chosen_ids"] for r in rows] + [r["rejected_ids"] for r in rows]
    sums = sequence_logprob_sums(model, pad_id, prompts, responses, token_budget)
    for i, row in enumerate(rows):
        row["chosen_logp"], row["rejected_logp"] = sums[i], sums[len(rows) + i]


@register("dpo", GeniesDPOConfig)
class DPO(BuiltinIntervention):
    trains = True
    config: GeniesDPOConfig

    def train(self, base: Path, pairs: list[dict], out: Path, progress=None) -> dict:
        ctx, key = self.run  # checkpoints go under the genies_train stage's key
        output = fit(
            ctx,
            "genies_train",
            key,
            base,
            pairs,
            self.config,
            lambda tokenizer: dpo_objective(self.config, tokenizer.pad_token_id),
            self._with_reference,
        )
        for name, folder in output.dirs.items():
            shutil.move(folder, out / name)
        shutil.rmtree(output.scratch, ignore_errors=True)
        return {k: v for k, v in output.metrics.items() if isinstance(v, (int, float))}  # the train table is numbers

    def _with_reference(self, model, tokenizer, pairs: list[dict]) -> list[dict]:
        """Training rows with the reference log-probs. ``fit`` calls this with the starting
        policy, which is the reference: LoRA's B starts at zero, so its outputs are the base model's."""
        rows = dpo_rows(encode_pairs(tokenizer, pairs, self.scoring.max_tokens), pairs)
        add_reference_logprobs(model, tokenizer.pad_token_id, rows, self.scoring.token_budget)
        return rows

    def evaluate(self, base: Path, state: Path | None, pairs: list[dict], progress=None) -> Scores:
        policy, tokenizer = load_causal_lm(state / "merged", "float32")
        seqs = encode_pairs(tokenizer, pairs, self.scoring.max_tokens)
        advance = per_pair_progress(progress, 2 * len(seqs.prompts), len(pairs))
        policy_sums = self._sums(policy, tokenizer, seqs, advance)
        del policy
        reference, _ = load_causal_lm(base, "float32")
        reference_sums = self._sums(reference, tokenizer, seqs, advance)
        rewards = [self.config.beta * (p - r) for p, r in zip(policy_sums, reference_sums)]
        return Scores(p_a=probs_from_scores(*seqs.pair_scores(rewards)))

    def _sums(self, model, tokenizer, seqs: Sequences, progress) -> list[float]:
        return sequence_logprob_sums(
            model, tokenizer.pad_token_id, seqs.prompts, seqs.responses, self.scoring.token_budget, progress
        )
