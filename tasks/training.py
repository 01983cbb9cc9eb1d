"""The training loop every training stage shares (train_dpo, train_sft, train_sega):
LoRA or full fine-tune, AdamW with warmup + cosine, gradient accumulation and
clipping, a validation split with best-by-validation weights, and resumable
checkpoints (trainable weights, optimizer, RNG, step, log) under the stage's
uncommitted key. A stage supplies only its ``Objective``.
"""
from __future__ import annotations

import io
import logging
import math
import tempfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pyarrow as pa
import torch

from alignflow.config import TrainConfig
from storage.artifacts import ArtifactRef, ArtifactStore
from tasks.stage import Progress, RunContext, StageOutput
from workers.models import load_causal_lm

log = logging.getLogger("alignflow")


@dataclass(frozen=True)
class Objective:
    """What a stage optimises. ``batch_loss(model, rows)`` returns the mean loss
    over the rows (a tensor with grad) and metrics that are means over the rows,
    "loss" among them, so micro-batches combine by a size-weighted mean."""

    stage: str
    batch_loss: Callable[..., tuple[torch.Tensor, dict[str, float]]]


def split_rows(rows: list[dict], val_fraction: float, seed: int, group: str = "prompt_id") -> tuple[list[dict], list[dict]]:
    """A stable split by a hash of each row's group (rows of one prompt stay together); at least one training row."""
    def is_val(r):
        return zlib.crc32(f"{seed}:{r[group]}".encode()) % 10_000 < val_fraction * 10_000
    val = [r for r in rows if is_val(r)]
    train_rows = [r for r in rows if not is_val(r)]
    if not train_rows:
        train_rows, val = val[:1], val[1:]
    return train_rows, val


def lr_factor(step: int, total: int, warmup: int) -> float:
    """Linear warmup to 1, then cosine decay to 0 at ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def optimizer_steps_per_epoch(n_rows: int, config: TrainConfig) -> int:
    return math.ceil(math.ceil(n_rows / config.batch_size) / config.grad_accum)


def total_steps(n_rows: int, config: TrainConfig) -> int:
    return optimizer_steps_per_epoch(n_rows, config) * config.epochs


def weighted_means(parts: list[tuple[int, dict]]) -> dict:
    """Combine per-micro-batch metric means into means over all their rows."""
    n = sum(size for size, _ in parts)
    return {k: sum(size * m[k] for size, m in parts) / n for k in parts[0][1]}


@torch.inference_mode()
def evaluate(model, rows: list[dict], config: TrainConfig, objective: Objective) -> dict:
    if not rows:
        return {}
    batches = [rows[s : s + config.batch_size] for s in range(0, len(rows), config.batch_size)]
    return weighted_means([(len(b), objective.batch_loss(model, b)[1]) for b in batches])


@dataclass
class TrainState:
    """Everything a checkpoint holds; with it a resumed run continues bit for bit."""

    step: int = 0
    best_val_loss: float = math.inf
    best_weights: dict = field(default_factory=dict)
    log: list[dict] = field(default_factory=list)


def trainable_state(model) -> dict:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def load_trainable(model, weights: dict) -> None:
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in weights.items():
            params[name].copy_(value)


@dataclass(frozen=True)
class Checkpoints:
    """Where a training stage keeps resumable checkpoints: under its own uncommitted key."""

    store: ArtifactStore
    stage: str
    key: str

    def save(self, model, optimizer, state: TrainState) -> None:
        buffer = io.BytesIO()
        torch.save({"weights": trainable_state(model), "optimizer": optimizer.state_dict(),
                    "rng": torch.get_rng_state(), "state": state.__dict__}, buffer)
        self.store.save_checkpoint(self.stage, self.key, state.step, buffer.getvalue())

    def restore(self, model, optimizer) -> TrainState | None:
        """Load the newest readable checkpoint (a torn newest one falls back to the previous)."""
        for path in self.store.checkpoints(self.stage, self.key):
            try:
                saved = torch.load(io.BytesIO(self.store.read_bytes(path)), weights_only=False)
            except Exception:  # noqa: BLE001 - a partially written file from a killed run
                continue
            load_trainable(model, saved["weights"])
            optimizer.load_state_dict(saved["optimizer"])
            torch.set_rng_state(saved["rng"])
            return TrainState(**saved["state"])
        return None


def prepare_model(model_dir: Path, config: TrainConfig):
    """(model in train mode, tokenizer): float32, with LoRA adapters unless full fine-tune."""
    model, tokenizer = load_causal_lm(model_dir, "float32")
    if config.full_finetune:
        model.train()
        return model, tokenizer
    from peft import LoraConfig as PeftLora, get_peft_model

    torch.manual_seed(config.seed)
    lora = PeftLora(r=config.lora.r, lora_alpha=config.lora.alpha, lora_dropout=config.lora.dropout,
                    target_modules=list(config.lora.target_modules), task_type="CAUSAL_LM")
    model = get_peft_model(model, lora)
    model.train()
    return model, tokenizer


def micro_batches(rows: list[dict], config: TrainConfig, epoch: int) -> list[list[dict]]:
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(config.seed * 1000 + epoch)).tolist()
    return [[rows[i] for i in order[s : s + config.batch_size]] for s in range(0, len(order), config.batch_size)]


def train(model, train_rows, val_rows, config: TrainConfig, objective: Objective, checkpoints: Checkpoints,
          progress=None) -> TrainState:
    """The loop; returns the final TrainState with the best-by-validation weights loaded (the last without validation)."""
    steps_per_epoch = optimizer_steps_per_epoch(len(train_rows), config)
    total = steps_per_epoch * config.epochs
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    warmup = max(1, round(config.warmup_ratio * total))
    state = checkpoints.restore(model, optimizer) or TrainState()
    if state.step:
        log.info("%s: resumed from the checkpoint at step %d of %d", objective.stage, state.step, total)
    if progress:
        progress(state.step)
    for step in range(state.step, total):
        epoch, within = divmod(step, steps_per_epoch)
        batches = micro_batches(train_rows, config, epoch)[within * config.grad_accum : (within + 1) * config.grad_accum]
        for group in optimizer.param_groups:
            group["lr"] = config.lr * lr_factor(step, total, warmup)
        optimizer.zero_grad(set_to_none=True)
        rows = sum(len(b) for b in batches)
        parts = []
        for batch in batches:
            loss, metrics = objective.batch_loss(model, batch)
            (loss * len(batch) / rows).backward()
            parts.append((len(batch), metrics))
        grad_norm = torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
        optimizer.step()
        state.step = step + 1
        state.log.append({"step": state.step, "split": "train", "lr": optimizer.param_groups[0]["lr"],
                          "grad_norm": float(grad_norm), **weighted_means(parts)})
        if val_rows and (state.step % config.eval_every == 0 or state.step == total):
            _validate(model, val_rows, config, objective, state)
        if state.step % config.checkpoint_every == 0 and state.step < total:
            checkpoints.save(model, optimizer, state)
        if progress:
            progress(1)
    if state.best_weights:
        load_trainable(model, state.best_weights)
    return state


def _validate(model, val_rows, config: TrainConfig, objective: Objective, state: TrainState) -> None:
    model.eval()
    metrics = evaluate(model, val_rows, config, objective)
    model.train()
    state.log.append({"step": state.step, "split": "val", "lr": None, "grad_norm": None, **metrics})
    if metrics["loss"] < state.best_val_loss:
        state.best_val_loss = metrics["loss"]
        state.best_weights = trainable_state(model)


def save_models(model, tokenizer, config: TrainConfig, out: Path) -> dict[str, Path]:
    """The adapter (LoRA) and the merged HF model directory."""
    dirs = {}
    if not config.full_finetune:
        model.save_pretrained(out / "adapter")
        tokenizer.save_pretrained(out / "adapter")
        dirs["adapter"] = out / "adapter"
        model = model.merge_and_unload()
    model.save_pretrained(out / "merged")
    tokenizer.save_pretrained(out / "merged")
    dirs["merged"] = out / "merged"
    return dirs


def significant(value: float, digits: int = 4) -> float:
    """Rounded to significant digits: SEGA losses are often around 1e-5."""
    return float(f"{value:.{digits}g}")


def training_metrics(before: dict, after: dict, state: TrainState, train_rows: list, val_rows: list) -> dict:
    """The headline numbers of a training stage's manifest."""
    return {
        "train_rows": len(train_rows), "val_rows": len(val_rows), "steps": state.step,
        "eval_split": "val" if val_rows else "train",
        **{f"before_{k}": significant(v) for k, v in before.items()},
        **{f"after_{k}": significant(v) for k, v in after.items()},
    }


def fit(ctx: RunContext, stage: str, key: str, policy: ArtifactRef, rows: list[dict], config: TrainConfig,
        objective_for: Callable[..., Objective], prepare: Callable[..., list[dict]] | None = None) -> StageOutput:
    """A training stage end to end: ``prepare(model, tokenizer, rows)`` (tokenise,
    reference numbers) while the model is still the starting policy, split, measure
    before, train with checkpoints, measure after, save adapter + merged model."""
    model, tokenizer = prepare_model(ctx.model_dir(policy), config)
    if prepare:
        with torch.inference_mode():
            model.eval()
            rows = prepare(model, tokenizer, rows)
    train_rows, val_rows = split_rows(rows, config.val_fraction, config.seed)
    objective = objective_for(tokenizer)
    eval_rows = val_rows or train_rows
    model.eval()
    before = evaluate(model, eval_rows, config, objective)
    model.train()
    progress = Progress(stage, total_steps(len(train_rows), config), unit="steps")
    state = train(model, train_rows, val_rows, config, objective, Checkpoints(ctx.store(), stage, key), progress)
    progress.close()
    model.eval()
    after = evaluate(model, eval_rows, config, objective)
    scratch = Path(tempfile.mkdtemp(prefix=f"alignflow-{stage}-"))
    dirs = save_models(model, tokenizer, config, scratch)
    return StageOutput(tables=[pa.Table.from_pylist(state.log)], dirs=dirs,
                       metrics=training_metrics(before, after, state, train_rows, val_rows), scratch=scratch)
