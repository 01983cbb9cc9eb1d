"""lora_reward_model: a scalar head on the decoder's last-token state, trained with
LoRA and the Bradley-Terry loss -log sigmoid(r_preferred - r_dispreferred).

Its pieces (the last-token head, the training loop, pair scoring) also serve the
two-logit classifiers of lora_fine_tune.py and prompt_tuning.py."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
import torch.nn.functional as F
from pydantic import Field

from alignflow.config import GeniesScoringConfig, LoraConfig, Strict
from alignflow.genies.interventions.base import BuiltinIntervention, Scores, register
from alignflow.genies.scoring import Sequences, encode_pairs, per_pair_progress, probs_from_scores
from alignflow.tasks.base_model import model_name
from alignflow.tasks.training import lr_factor, save_adapter
from alignflow.workers.models import load_backbone
from alignflow.workers.scoring import map_batches, pack, token_budget_batches


class LoraRewardConfig(Strict):
    lora: LoraConfig = LoraConfig(r=64, alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    lr: float = Field(2e-4, gt=0.0)
    steps: int = Field(150, ge=1)
    batch_size: int = Field(8, ge=1, description="pairs per step")
    warmup_ratio: float = Field(0.1, ge=0.0, le=1.0)
    max_grad_norm: float = Field(1.0, gt=0.0)
    token_budget: int = Field(
        4096, ge=64, description="padded tokens per forward pass: a step's pairs train in micro-batches that fit"
    )
    seed: int = 0


class LastTokenHead(torch.nn.Module):
    """A linear head on the backbone's state at each row's last real token (rows are
    right-padded): rows x head outputs, in float32."""

    def __init__(self, backbone, head: torch.nn.Linear):
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        device = self.head.weight.device  # batches are packed on the CPU; a 4-bit backbone runs on the GPU
        mask = batch["attention_mask"].to(device)
        hidden = self.backbone(input_ids=batch["input_ids"].to(device), attention_mask=mask).last_hidden_state
        last = mask.sum(dim=1) - 1
        return self.head(hidden[torch.arange(len(last), device=device), last].float())


class RewardModel(LastTokenHead):
    def __init__(self, backbone, hidden_size: int):
        super().__init__(backbone, torch.nn.Linear(hidden_size, 1))

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return super().forward(batch).squeeze(-1)


def with_lora(backbone, lora: LoraConfig):
    from peft import LoraConfig as PeftLora
    from peft import get_peft_model

    config = PeftLora(
        r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=list(lora.target_modules)
    )
    return get_peft_model(backbone, config)


def rewards(model: torch.nn.Module, seqs: Sequences, rows: list[int], pad_id: int) -> torch.Tensor:
    return model(pack([seqs.prompts[i] for i in rows], [seqs.responses[i] for i in rows], pad_id))


def preferred_index(seqs: Sequences, pairs: list[dict]) -> list[tuple[int, int]]:
    """(preferred, dispreferred) sequence index per pair."""
    return [(a, b) if p["preferred"] == 0 else (b, a) for (a, b), p in zip(seqs.pair_index, pairs)]


def bradley_terry_loss(preferred: torch.Tensor, dispreferred: torch.Tensor) -> torch.Tensor:
    """Mean of -log sigmoid(r_preferred - r_dispreferred) over pairs and, for several
    outputs per row, over the outputs (each is trained as a reward of its own)."""
    return -F.logsigmoid(preferred - dispreferred).mean()


def sampled_batches(pairs: int, batch_size: int, steps: int, seed: int) -> Iterable[list[int]]:
    """Per step, ``batch_size`` pair indices drawn with replacement."""
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        yield torch.randint(pairs, (min(batch_size, pairs),), generator=generator).tolist()


def pair_chunks(seqs: Sequences, order: list[tuple[int, int]], chosen: list[int], budget: int) -> list[list[int]]:
    """A step's pairs in micro-batches whose padded forward over both responses of each pair
    stays within ``budget`` tokens (a pair longer than that is a micro-batch of its own). The
    pairs keep the step's order: regrouped, they would get other dropout masks (LoRA) and other
    float sums, and a few steps amplify that into another model (docs/genies_results.md)."""
    rows = [2 * max(len(seqs.prompts[j]) + len(seqs.responses[j]) for j in order[i]) for i in chosen]
    return [[chosen[k] for k in batch] for batch in token_budget_batches(rows, budget, by_length=False)]


def fit_preferences(
    model: torch.nn.Module,
    seqs: Sequences,
    order: list[tuple[int, int]],
    pad_id: int,
    batches: Iterable[list[int]],
    learning_rate: Callable[[int], float],
    max_grad_norm: float,
    token_budget: int,
    progress=None,
) -> list[float]:
    """Train ``model`` (rewards per row) on the Bradley-Terry loss; a step per batch of indices
    into ``order`` (preferred, dispreferred), AdamW without weight decay at ``learning_rate(step)``,
    gradients clipped to ``max_grad_norm``. A step's pairs go forward in micro-batches of at most
    ``token_budget`` padded tokens, their gradients summed into the whole batch's (a batch of 16
    long pairs in one pass took 17 GB on CPU). Returns the losses."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=learning_rate(0), weight_decay=0.0)
    losses = []
    for step, chosen in enumerate(batches):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step)
        optimizer.zero_grad(set_to_none=True)
        step_loss = 0.0
        for chunk in pair_chunks(seqs, order, chosen, token_budget):
            r = rewards(model, seqs, [order[i][0] for i in chunk] + [order[i][1] for i in chunk], pad_id)
            loss = bradley_terry_loss(r[: len(chunk)], r[len(chunk) :]) * (len(chunk) / len(chosen))
            loss.backward()
            step_loss += loss.item()
        torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        optimizer.step()
        losses.append(step_loss)
        if progress:
            progress(len(chosen))
    return losses


def record_losses(losses: list[float], out: Path) -> dict:
    """Write the loss curve beside the state; the train metrics that summarise it."""
    (out / "train_log.json").write_text(json.dumps({"loss": losses}))
    tail = losses[-10:]
    return {"steps": len(losses), "first_loss": round(losses[0], 4), "last_loss": round(sum(tail) / len(tail), 4)}


def pair_probabilities(
    score: Callable[[dict], torch.Tensor], tokenizer, pairs: list[dict], scoring: GeniesScoringConfig, progress=None
) -> list[float]:
    """P(A preferred) = softmax over the two responses' scores; ``score(batch)``: one per row."""
    seqs = encode_pairs(tokenizer, pairs, scoring.max_tokens)
    values = map_batches(
        lambda batch: score(batch).tolist(),
        seqs.prompts,
        seqs.responses,
        tokenizer.pad_token_id,
        scoring.token_budget,
        per_pair_progress(progress, len(seqs.prompts), len(pairs)),
    )
    return probs_from_scores(*seqs.pair_scores(values))


@register("lora_reward_model", LoraRewardConfig)
class LoraRewardModel(BuiltinIntervention):
    trains = True
    config: LoraRewardConfig

    def train(self, base: Path, pairs: list[dict], out: Path, progress=None) -> dict:
        torch.manual_seed(self.config.seed)
        backbone, tokenizer = load_backbone(base, "float32")
        model = RewardModel(with_lora(backbone, self.config.lora), backbone.config.hidden_size)
        model.train()
        seqs = encode_pairs(tokenizer, pairs, self.scoring.max_tokens)
        warmup = max(1, round(self.config.warmup_ratio * self.config.steps))
        losses = fit_preferences(
            model,
            seqs,
            preferred_index(seqs, pairs),
            tokenizer.pad_token_id,
            sampled_batches(len(pairs), self.config.batch_size, self.config.steps, self.config.seed),
            lambda step: self.config.lr * lr_factor(step, self.config.steps, warmup),
            self.config.max_grad_norm,
            self.config.token_budget,
            progress,
        )
        save_adapter(model.backbone, out / "adapter", model_name(base))
        torch.save(model.head.state_dict(), out / "head.pt")
        return record_losses(losses, out)

    @torch.inference_mode()
    def evaluate(self, base: Path, state: Path | None, pairs: list[dict], progress=None) -> Scores:
        from peft import PeftModel

        backbone, tokenizer = load_backbone(base, self.scoring.dtype)
        model = RewardModel(PeftModel.from_pretrained(backbone, state / "adapter"), backbone.config.hidden_size)
        model.head.load_state_dict(torch.load(state / "head.pt"))
        model.eval()
        return Scores(p_a=pair_probabilities(model, tokenizer, pairs, self.scoring, progress))
