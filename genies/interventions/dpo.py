"""dpo: train the policy on the source pairs with this project's DPO training
loop; a response's score is its implicit reward beta * (log pi - log pi_ref)."""
from __future__ import annotations

from pathlib import Path

from alignflow.config import DPOConfig, GeniesScoringConfig
from alignflow.genies.interventions.base import Scores
from alignflow.genies.scoring import Sequences, encode_pairs, per_pair_progress, probs_from_scores
from alignflow.storage.artifacts import ArtifactStore
from alignflow.tasks.train_dpo import dpo_objective
from alignflow.tasks.training import Checkpoints, prepare_model, save_models, split_rows, train
from alignflow.workers.models import load_causal_lm
from alignflow.workers.scoring import sequence_logprob_sums


def dpo_rows(seqs: Sequences, pairs: list[dict]) -> list[dict]:
    """Token ids in the layout train_dpo reads. Both sides share one prompt: the
    more truncated of the two renderings, so it fits with either response."""
    rows = []
    for (a, b), pair in zip(seqs.pair_index, pairs):
        chosen, rejected = (a, b) if pair["preferred"] == 0 else (b, a)
        prompt = min(seqs.prompts[a], seqs.prompts[b], key=len)
        rows.append({"prompt_id": pair["prompt"], "prompt_ids": prompt,
                     "chosen_ids": seqs.responses[chosen], "rejected_ids": seqs.responses[rejected]})
    return rows


def add_reference_logprobs(model, pad_id: int, rows: list[dict], token_budget: int) -> None:
    prompts = [r["prompt_ids"] for r in rows] * 2
    responses = [r["chosen_ids"] for r in rows] + [r["rejected_ids"] for r in rows]
    sums = sequence_logprob_sums(model, pad_id, prompts, responses, token_budget)
    for i, row in enumerate(rows):
        row["chosen_logp"], row["rejected_logp"] = sums[i], sums[len(rows) + i]


class DPO:
    name = "dpo"
    trains = True

    def __init__(self, scoring: GeniesScoringConfig, config: DPOConfig, checkpoints: tuple[ArtifactStore, str]):
        self.scoring = scoring
        self.config = config
        self.checkpoints = checkpoints  # where train_dpo keeps resumable checkpoints

    def train(self, base: Path, pairs: list[dict], out: Path, progress=None) -> dict:
        reference, tokenizer = load_causal_lm(base, "float32")
        rows = dpo_rows(encode_pairs(tokenizer, pairs, self.scoring.max_tokens), pairs)
        add_reference_logprobs(reference, tokenizer.pad_token_id, rows, self.scoring.token_budget)
        del reference
        train_rows, val_rows = split_rows(rows, self.config.val_fraction, self.config.seed)
        model, tokenizer = prepare_model(base, self.config)
        store, key = self.checkpoints
        objective = dpo_objective(self.config, tokenizer.pad_token_id)
        state = train(model, train_rows, val_rows, self.config, objective, Checkpoints(store, "genies_train", key), progress)
        model.eval()
        save_models(model, tokenizer, self.config, out)
        last = state.log[-1] if state.log else {}
        return {"steps": state.step, "train_pairs": len(train_rows), "last_loss": round(last.get("loss", 0.0), 4),
                "last_reward_accuracy": round(last.get("reward_accuracy", 0.0), 4)}

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
        return sequence_logprob_sums(model, tokenizer.pad_token_id, seqs.prompts, seqs.responses,
                                     self.scoring.token_budget, progress)
