"""train_dpo: DPO (sigmoid, IPO or hinge) on precomputed reference log-probs.

LoRA by default, AdamW with warmup + cosine, gradient accumulation, a validation
split, resumable checkpoints (trainable weights, optimizer, schedule, step, best
so far) and the best-by-validation model saved as adapter + merged HF directory.
"""
from __future__ import annotations

import io
import logging
import math
import tempfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import torch
import torch.nn.functional as F

from alignflow.config import DPOConfig
from storage.artifacts import ArtifactRef, ArtifactStore
from tasks.stage import Progress, RunContext, Stage, StageOutput, stage_task
from workers.models import load_causal_lm
from workers.scoring import pack, response_logprob_sums

log = logging.getLogger("alignflow")


def dpo_losses(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta: float, kind: str = "sigmoid"):
    """Per-pair loss and the implicit rewards beta * (log pi - log pi_ref) of each side.
    z = (log pi(y_w) - log pi(y_l)) - (log pi_ref(y_w) - log pi_ref(y_l))."""
    z = (policy_chosen - policy_rejected) - (ref_chosen - ref_rejected)
    if kind == "sigmoid":
        losses = -F.logsigmoid(beta * z)
    elif kind == "ipo":
        losses = (z - 1.0 / (2.0 * beta)) ** 2
    elif kind == "hinge":
        losses = torch.relu(1.0 - beta * z)
    else:
        raise ValueError(f"unknown DPO loss '{kind}' (expected sigmoid, ipo or hinge)")
    return losses, beta * (policy_chosen - ref_chosen), beta * (policy_rejected - ref_rejected)


def split_pairs(rows: list[dict], val_fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """A stable split by prompt id hash; at least one training pair."""
    def is_val(r):
        return zlib.crc32(f"{seed}:{r['prompt_id']}".encode()) % 10_000 < val_fraction * 10_000
    val = [r for r in rows if is_val(r)]
    train = [r for r in rows if not is_val(r)]
    if not train:
        train, val = val[:1], val[1:]
    return train, val


def lr_factor(step: int, total: int, warmup: int) -> float:
    """Linear warmup to 1, then cosine decay to 0 at ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def optimizer_steps_per_epoch(n_rows: int, config: DPOConfig) -> int:
    return math.ceil(math.ceil(n_rows / config.batch_size) / config.grad_accum)


def batch_losses(model, rows: list[dict], config: DPOConfig, pad_id: int):
    prompts = [r["prompt_ids"] for r in rows] * 2
    responses = [r["chosen_ids"] for r in rows] + [r["rejected_ids"] for r in rows]
    sums = response_logprob_sums(model, pack(prompts, responses, pad_id))
    ref_c = torch.tensor([r["chosen_logp"] for r in rows])
    ref_r = torch.tensor([r["rejected_logp"] for r in rows])
    return dpo_losses(sums[: len(rows)], sums[len(rows) :], ref_c, ref_r, config.beta, config.loss)


@torch.inference_mode()
def evaluate(model, rows: list[dict], config: DPOConfig, pad_id: int) -> dict:
    if not rows:
        return {}
    losses, chosen, rejected = [], [], []
    for start in range(0, len(rows), config.batch_size):
        loss, c, r = batch_losses(model, rows[start : start + config.batch_size], config, pad_id)
        losses.append(loss), chosen.append(c), rejected.append(r)
    return summarize(torch.cat(losses), torch.cat(chosen), torch.cat(rejected))


def summarize(losses, chosen_rewards, rejected_rewards) -> dict:
    margins = chosen_rewards - rejected_rewards
    return {
        "loss": float(losses.mean()), "reward_accuracy": float((margins > 0).float().mean()),
        "margin": float(margins.mean()), "chosen_reward": float(chosen_rewards.mean()),
        "rejected_reward": float(rejected_rewards.mean()),
    }


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


def prepare_model(model_dir: Path, config: DPOConfig):
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


def micro_batches(rows: list[dict], config: DPOConfig, epoch: int) -> list[list[dict]]:
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(config.seed * 1000 + epoch)).tolist()
    return [[rows[i] for i in order[s : s + config.batch_size]] for s in range(0, len(order), config.batch_size)]


def train(model, tokenizer, train_rows, val_rows, config: DPOConfig, checkpoints: Checkpoints, progress=None):
    """The training loop; returns the final TrainState with the best weights loaded."""
    pad_id = tokenizer.pad_token_id
    steps_per_epoch = optimizer_steps_per_epoch(len(train_rows), config)
    total = steps_per_epoch * config.epochs
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    schedule = lambda step: lr_factor(step, total, max(1, round(config.warmup_ratio * total)))  # noqa: E731
    state = checkpoints.restore(model, optimizer) or TrainState()
    if state.step:
        log.info("train_dpo: resumed from the checkpoint at step %d of %d", state.step, total)
    if progress:
        progress(state.step)
    for step in range(state.step, total):
        epoch, within = divmod(step, steps_per_epoch)
        batches = micro_batches(train_rows, config, epoch)[within * config.grad_accum : (within + 1) * config.grad_accum]
        for group in optimizer.param_groups:
            group["lr"] = config.lr * schedule(step)
        optimizer.zero_grad(set_to_none=True)
        parts = []
        for batch in batches:
            losses, chosen, rejected = batch_losses(model, batch, config, pad_id)
            (losses.sum() / sum(len(b) for b in batches)).backward()
            parts.append((losses.detach(), chosen.detach(), rejected.detach()))
        torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
        optimizer.step()
        state.step = step + 1
        row = {"step": state.step, "split": "train", "lr": optimizer.param_groups[0]["lr"],
               **summarize(*(torch.cat(x) for x in zip(*parts)))}
        state.log.append(row)
        if val_rows and (state.step % config.eval_every == 0 or state.step == total):
            _validate(model, val_rows, config, pad_id, state)
        if state.step % config.checkpoint_every == 0 and state.step < total:
            checkpoints.save(model, optimizer, state)
        if progress:
            progress(1)
    if state.best_weights:
        load_trainable(model, state.best_weights)
    return state


def _validate(model, val_rows, config, pad_id, state: TrainState) -> None:
    model.eval()
    metrics = evaluate(model, val_rows, config, pad_id)
    model.train()
    state.log.append({"step": state.step, "split": "val", "lr": None, **metrics})
    if metrics["loss"] < state.best_val_loss:
        state.best_val_loss = metrics["loss"]
        state.best_weights = trainable_state(model)


def save_models(model, tokenizer, config: DPOConfig, out: Path) -> dict[str, Path]:
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


def compute_train_dpo(ctx: RunContext, config: DPOConfig, key: str, policy: ArtifactRef, pairs: ArtifactRef):
    store = ctx.store()
    rows = store.read_rows(pairs)
    train_rows, val_rows = split_pairs(rows, config.val_fraction, config.seed)
    model, tokenizer = prepare_model(ctx.model_dir(policy), config)
    eval_rows = val_rows or train_rows
    model.eval()
    before = evaluate(model, eval_rows, config, tokenizer.pad_token_id)
    model.train()
    total = optimizer_steps_per_epoch(len(train_rows), config) * config.epochs
    progress = Progress("train_dpo", total, unit="steps")
    state = train(model, tokenizer, train_rows, val_rows, config, Checkpoints(store, "train_dpo", key), progress)
    progress.close()
    model.eval()
    after = evaluate(model, eval_rows, config, tokenizer.pad_token_id)
    tmp = Path(tempfile.mkdtemp(prefix="alignflow-dpo-"))
    dirs = save_models(model, tokenizer, config, tmp)
    metrics = {
        "train_pairs": len(train_rows), "val_pairs": len(val_rows), "steps": state.step,
        "eval_split": "val" if val_rows else "train",
        **{f"before_{k}": round(v, 4) for k, v in before.items()},
        **{f"after_{k}": round(v, 4) for k, v in after.items()},
    }
    return StageOutput(tables=[pa.Table.from_pylist(state.log)], dirs=dirs, metrics=metrics, scratch=tmp)


TRAIN_DPO = Stage("train_dpo", compute_train_dpo, ("tasks.train_dpo", "workers.scoring", "workers.models"))
train_dpo_task = stage_task(TRAIN_DPO)
