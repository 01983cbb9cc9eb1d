"""lora_reward_model: a scalar head on the decoder's last-token state, trained with
LoRA and the Bradley-Terry loss -log sigmoid(r_preferred - r_dispreferred)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from pydantic import Field

from alignflow.config import LoraConfig, Strict
from alignflow.genies.interventions.base import BuiltinIntervention, Scores, register
from alignflow.genies.scoring import Sequences, encode_pairs, per_pair_progress, probs_from_scores
from alignflow.tasks.base_model import model_name
from alignflow.tasks.training import lr_factor, save_adapter
from alignflow.workers.models import load_backbone
from alignflow.workers.scoring import map_batches, pack


class LoraRewardConfig(Strict):
    lora: LoraConfig = LoraConfig(r=64, alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    lr: float = Field(2e-4, gt=0.0)
    steps: int = Field(150, ge=1)
    batch_size: int = Field(8, ge=1, description="pairs per step")
    warmup_ratio: float = Field(0.1, ge=0.0, le=1.0)
    max_grad_norm: float = Field(1.0, gt=0.0)
    seed: int = 0


class RewardModel(torch.nn.Module):
    def __init__(self, backbone, hidden_size: int):
        super().__init__()
        self.backbone = backbone
        self.head = torch.nn.Linear(hidden_size, 1)

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        hidden = self.backbone(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        last = batch["attention_mask"].sum(dim=1) - 1
        return self.head(hidden[torch.arange(len(last)), last].float()).squeeze(-1)


def with_lora(backbone, config: LoraRewardConfig):
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(
        r=config.lora.r,
        lora_alpha=config.lora.alpha,
        lora_dropout=config.lora.dropout,
        target_modules=list(config.lora.target_modules),
    )
    return get_peft_model(backbone, lora)


def rewards(model: RewardModel, seqs: Sequences, rows: list[int], pad_id: int) -> torch.Tensor:
    return model(pack([seqs.prompts[i] for i in rows], [seqs.responses[i] for i in rows], pad_id))


def preferred_index(seqs: Sequences, pairs: list[dict]) -> list[tuple[int, int]]:
    """(preferred, dispreferred) sequence index per pair."""
    return [(a, b) if p["preferred"] == 0 else (b, a) for (a, b), p in zip(seqs.pair_index, pairs)]


@register("lora_reward_model", LoraRewardConfig)
class LoraRewardModel(BuiltinIntervention):
    trains = True
    config: LoraRewardConfig

    def train(self, base: Path, pairs: list[dict], out: Path, progress=None) -> dict:
        torch.manual_seed(self.config.seed)
        backbone, tokenizer = load_backbone(base, "float32")
        model = RewardModel(with_lora(backbone, self.config), backbone.config.hidden_size)
        model.train()
        seqs = encode_pairs(tokenizer, pairs, self.scoring.max_tokens)
        order = preferred_index(seqs, pairs)
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=self.config.lr, weight_decay=0.0)
        warmup = max(1, round(self.config.warmup_ratio * self.config.steps))
        generator = torch.Generator().manual_seed(self.config.seed)
        losses = []
        for step in range(self.config.steps):
            chosen = torch.randint(len(order), (min(self.config.batch_size, len(order)),), generator=generator).tolist()
            r = rewards(
                model, seqs, [order[i][0] for i in chosen] + [order[i][1] for i in chosen], tokenizer.pad_token_id
            )
            loss = -F.logsigmoid(r[: len(chosen)] - r[len(chosen) :]).mean()
            for group in optimizer.param_groups:
                group["lr"] = self.config.lr * lr_factor(step, self.config.steps, warmup)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, self.config.max_grad_norm)
            optimizer.step()
            losses.append(loss.item())
            if progress:
                progress(len(chosen))
        save_adapter(model.backbone, out / "adapter", model_name(base))
        torch.save(model.head.state_dict(), out / "head.pt")
        (out / "train_log.json").write_text(json.dumps({"loss": losses}))
        tail = losses[-10:]
        return {"steps": len(losses), "first_loss": round(losses[0], 4), "last_loss": round(sum(tail) / len(tail), 4)}

    @torch.inference_mode()
    def evaluate(self, base: Path, state: Path | None, pairs: list[dict], progress=None) -> Scores:
        from peft import PeftModel

        backbone, tokenizer = load_backbone(base, self.scoring.dtype)
        model = RewardModel(PeftModel.from_pretrained(backbone, state / "adapter"), backbone.config.hidden_size)
        model.head.load_state_dict(torch.load(state / "head.pt"))
        model.eval()
        seqs = encode_pairs(tokenizer, pairs, self.scoring.max_tokens)
        advance = per_pair_progress(progress, len(seqs.prompts), len(pairs))
        values = map_batches(
            lambda batch: model(batch).tolist(),
            seqs.prompts,
            seqs.responses,
            tokenizer.pad_token_id,
            self.scoring.token_budget,
            advance,
        )
        return Scores(p_a=probs_from_scores(*seqs.pair_scores(values)))
