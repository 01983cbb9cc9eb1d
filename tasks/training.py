"""The training loop every training stage shares (train_dpo, train_sft, train_sega):
LoRA or full fine-tune, AdamW with warmup + cosine, gradient accumulation and
clipping, a validation split with best-by-validation weights, and resumable
checkpoints (trainable weights, optimizer, RNG, step, log) under the stage's
uncommitted key. A stage supplies only its ``Objective``.

An engine does the backward and the step: one process by default
(``LocalEngine``), or DeepSpeed ZeRO-2/3 with ``distributed.strategy`` on
``distributed.world_size`` ranks started by workers/distributed.py
(``ZeroEngine``). Each rank trains on its share of every global batch
(batch_size x grad_accum rows, as in one process), so a step's gradient is the
single-process one; rank 0 writes checkpoints and the trained model.
"""

from __future__ import annotations

import importlib.util
import io
import json
import logging
import math
import tempfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import pyarrow as pa
import torch
import torch.distributed as dist

from alignflow.config import TrainConfig
from alignflow.storage.artifacts import ArtifactRef, ArtifactStore
from alignflow.tasks.base_model import model_name
from alignflow.tasks.stage import Progress, RunContext, StageOutput
from alignflow.tasks.stage_report import training_curves_markdown
from alignflow.workers.backend import release_backends
from alignflow.workers.models import load_causal_lm

log = logging.getLogger("alignflow")


@dataclass(frozen=True)
class Objective:
    """What a stage optimises. ``batch_loss(model, rows)`` returns the mean loss
    over the rows (a tensor with grad) and metrics that are means over the rows,
    "loss" among them, so micro-batches combine by a size-weighted mean."""

    stage: str
    batch_loss: Callable[..., tuple[torch.Tensor, dict[str, float]]]


def split_rows(
    rows: list[dict], val_fraction: float, seed: int, group: str = "prompt_id"
) -> tuple[list[dict], list[dict]]:
    """A stable split by a hash of each row's group (rows of one prompt stay together); at least one training row."""

    def is_val(r):
        return zlib.crc32(f"{seed}:{r[group]}".encode()) % 10_000 < val_fraction * 10_000

    val = [r for r in rows if is_val(r)]
    train_rows = [r for r in rows if not is_val(r)]
    if not train_rows:
        train_rows, val = val[:1], val[1:]
    return train_rows, val


def lr_factor(step: int, total: int, warmup: int, decay: bool = True) -> float:
    """Linear warmup to 1, then cosine decay to 0 at ``total`` (``decay=False``: it stays at 1)."""
    if step < warmup:
        return (step + 1) / warmup
    if not decay:
        return 1.0
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

    def save(self, engine, state: TrainState) -> None:
        saved = {"weights": engine.weights(), **engine.resume_state(), "state": state.__dict__}
        if engine.rank == 0:
            buffer = io.BytesIO()
            torch.save(saved, buffer)
            self.store.save_checkpoint(self.stage, self.key, state.step, buffer.getvalue())

    def restore(self, engine) -> TrainState | None:
        """Load the newest readable checkpoint (a torn newest one falls back to the previous)."""
        for path in self.store.checkpoints(self.stage, self.key):
            try:
                saved = torch.load(io.BytesIO(self.store.read_bytes(path)), map_location="cpu", weights_only=False)
            except Exception:  # noqa: BLE001 - a partially written file from a killed run
                continue
            engine.load_weights(saved["weights"])
            engine.load_resume_state(saved)
            return TrainState(**saved["state"])
        return None


class LocalEngine:
    """One process: torch AdamW on the trainable parameters, clipped by torch."""

    rank, world_size = 0, 1

    def __init__(self, model, config: TrainConfig):
        self.model = self.wrapped = model
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=config.lr, weight_decay=config.weight_decay)
        self.max_grad_norm = config.max_grad_norm

    def backward(self, loss: torch.Tensor, boundary: bool) -> None:
        loss.backward()

    def step(self) -> float:
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(grad_norm)

    def weights(self) -> dict:
        return trainable_state(self.model)

    def load_weights(self, weights: dict) -> None:
        load_trainable(self.model, weights)

    def resume_state(self) -> dict:
        return {"optimizer": self.optimizer.state_dict(), "rng": torch.get_rng_state()}

    def load_resume_state(self, saved: dict) -> None:
        self.optimizer.load_state_dict(saved["optimizer"])
        torch.set_rng_state(saved["rng"])

    def all_ranks(self, items: list) -> list:
        return items

    def trained_model(self, fresh_model: Callable):
        return self.model


class ZeroEngine:
    """One rank of DeepSpeed ZeRO-2/3 (torch.distributed already set up): optimizer
    states and gradients partitioned across ranks (ZeRO-3: parameters too), the same
    torch AdamW and clipping as one process, bf16 weights with fp32 master copies on CUDA.
    ``wrapped`` (DeepSpeed's engine) must run the training forwards: it hooks backward."""

    def __init__(self, model, config: TrainConfig):
        if not dist.is_initialized():
            raise RuntimeError(
                f"distributed.strategy={config.distributed.strategy} trains through fit(), which starts "
                "the ranks (workers/distributed.py); this process has no torch.distributed group"
            )
        import deepspeed

        _skip_shm_comm_build()
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        optimizer = torch.optim.AdamW(
            [p for p in model.parameters() if p.requires_grad], lr=config.lr, weight_decay=config.weight_decay
        )
        self.wrapped, self.optimizer, _, _ = deepspeed.initialize(
            model=model, optimizer=optimizer, config=deepspeed_config(config)
        )
        self.model = self.wrapped.module
        self.zero_stage = self.wrapped.zero_optimization_stage()
        self.gathered = partial(deepspeed.zero.GatheredParameters, list(self.model.parameters()))

    def backward(self, loss: torch.Tensor, boundary: bool) -> None:
        # The loop's loss is this rank's share of the global mean; DeepSpeed averages over ranks.
        self.wrapped.set_gradient_accumulation_boundary(boundary)
        self.wrapped.backward(loss * self.world_size)

    def step(self) -> float:
        self.wrapped.step()
        return float(self.wrapped.get_global_grad_norm())

    def weights(self) -> dict:
        with self.gathered():  # ZeRO-3 holds a slice of each parameter per rank (a no-op for ZeRO-2)
            return trainable_state(self.model)

    def load_weights(self, weights: dict) -> None:
        with self.gathered(modifier_rank=0):
            load_trainable(self.model, weights)

    def resume_state(self) -> dict:
        """Every rank's optimizer partition and RNG, gathered on rank 0 (None elsewhere) as
        bytes: gathered as tensors, they would land on the other ranks' GPUs."""
        buffer = io.BytesIO()
        torch.save({"optimizer": self.optimizer.state_dict(), "rng": torch.get_rng_state()}, buffer)
        shards = [None] * self.world_size if self.rank == 0 else None
        dist.gather_object(buffer.getvalue(), shards, dst=0)
        return {"shards": shards}

    def load_resume_state(self, saved: dict) -> None:
        shards = [torch.load(io.BytesIO(s), map_location="cpu", weights_only=False) for s in saved["shards"]]
        # fp32 master weights from the checkpoint: rebuilding them from bf16 weights would round them
        self.optimizer.load_state_dict([s["optimizer"] for s in shards], load_from_fp32_weights=True)
        torch.set_rng_state(shards[self.rank]["rng"])

    def all_ranks(self, items: list) -> list:
        gathered = [None] * self.world_size
        dist.all_gather_object(gathered, items)
        return [item for rank_items in gathered for item in rank_items]

    def trained_model(self, fresh_model: Callable):
        """On rank 0 the trained model with whole parameters, to measure and save (None on the
        other ranks). ZeRO-2 keeps whole parameters on every rank; ZeRO-3 only slices, so rank 0
        loads the gathered weights into a fresh copy."""
        if self.zero_stage == 2:
            return self.model if self.rank == 0 else None
        weights = self.weights()
        if self.rank != 0:
            return None
        model = fresh_model()
        load_trainable(model, weights)
        return model


def deepspeed_config(config: TrainConfig) -> dict:
    return {
        "train_micro_batch_size_per_gpu": config.batch_size,
        "gradient_accumulation_steps": 1,  # the loop marks each step's last micro-batch as the boundary
        "gradient_clipping": config.max_grad_norm,
        "zero_optimization": {"stage": {"zero2": 2, "zero3": 3}[config.distributed.strategy]},
        "bf16": {"enabled": torch.cuda.is_available()},
        "steps_per_print": 2**31,  # the loop logs its own steps
    }


def _skip_shm_comm_build() -> None:
    """DeepSpeed's CPU accelerator JIT-compiles a shared-memory all-reduce on first use
    (30 s to minutes of g++) that only tensor-parallel inference calls; ZeRO training
    reduces through gloo, so mark the op unavailable instead of building it."""
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    if builder is not None:
        deepspeed.ops.__compatible_ops__[builder.NAME] = False


def make_engine(model, config: TrainConfig):
    return LocalEngine(model, config) if config.distributed.strategy == "none" else ZeroEngine(model, config)


def prepare_model(model_dir: Path, config: TrainConfig):
    """(model in train mode, tokenizer): float32, with LoRA adapters unless full fine-tune."""
    release_backends()  # the device goes to training: a sampling model kept loaded would share it
    model, tokenizer = load_causal_lm(model_dir, "float32")
    if config.gradient_checkpointing:
        # Non-reentrant: with LoRA no input of a checkpointed block requires grad (the embeddings are frozen).
        # (activation_checkpointing_enable, its new name, is missing before transformers 5.2x.)
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if config.full_finetune:
        model.train()
        return model, tokenizer
    from peft import LoraConfig as PeftLora
    from peft import get_peft_model

    torch.manual_seed(config.seed)
    lora = PeftLora(
        r=config.lora.r,
        lora_alpha=config.lora.alpha,
        lora_dropout=config.lora.dropout,
        target_modules=list(config.lora.target_modules),
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, lora)
    model.train()
    return model, tokenizer


def step_rows(rows: list[dict], config: TrainConfig, step: int, steps_per_epoch: int) -> list[dict]:
    """The global batch of an optimizer step: the next batch_size x grad_accum rows of its epoch's shuffle."""
    epoch, within = divmod(step, steps_per_epoch)
    order = torch.randperm(
        len(rows), generator=torch.Generator().manual_seed(config.seed * 1000 + epoch), device="cpu"
    ).tolist()
    size = config.batch_size * config.grad_accum
    return [rows[i] for i in order[within * size : (within + 1) * size]]


def rank_micro_batches(rows: list[dict], batch_size: int, rank: int, world_size: int) -> list[list[dict]]:
    """A rank's share of a step's rows (every world_size-th) in micro-batches of at most
    batch_size. Every rank gets as many micro-batches, the last ones possibly empty: ZeRO
    reduces gradients in each backward, so the ranks' backward passes must pair up."""
    share = rows[rank::world_size]
    count = math.ceil(math.ceil(len(rows) / world_size) / batch_size)
    return [share[i * batch_size : (i + 1) * batch_size] for i in range(count)]


def train(
    model,
    train_rows,
    val_rows,
    config: TrainConfig,
    objective: Objective,
    checkpoints: Checkpoints,
    progress=None,
    engine=None,
) -> TrainState:
    """The loop; returns the final TrainState with the best-by-validation weights loaded (the last without validation).
    ``engine``: what wraps the model (default: ``make_engine(model, config)``)."""
    steps_per_epoch = optimizer_steps_per_epoch(len(train_rows), config)
    total = steps_per_epoch * config.epochs
    warmup = max(1, round(config.warmup_ratio * total))
    engine = engine or make_engine(model, config)
    state = checkpoints.restore(engine) or TrainState()
    if state.step:
        log.info("%s: resumed from the checkpoint at step %d of %d", objective.stage, state.step, total)
    if progress:
        progress(state.step)
    log_every = max(1, total // 20)  # about 20 lines per training in the run's logs
    for step in range(state.step, total):
        rows = step_rows(train_rows, config, step, steps_per_epoch)
        for group in engine.optimizer.param_groups:
            group["lr"] = config.lr * lr_factor(step, total, warmup, decay=config.lr_schedule == "cosine")
        batches = rank_micro_batches(rows, config.batch_size, engine.rank, engine.world_size)
        parts = []
        for i, batch in enumerate(batches):
            # An empty share still runs a backward (on a stand-in row, weighted 0) to pair up with the other ranks'.
            loss, metrics = objective.batch_loss(engine.wrapped, batch or rows[:1])
            engine.backward(loss * len(batch) / len(rows), boundary=i == len(batches) - 1)
            parts += [(len(batch), metrics)] if batch else []
        grad_norm = engine.step()
        state.step = step + 1
        state.log.append(
            {
                "step": state.step,
                "split": "train",
                "lr": engine.optimizer.param_groups[0]["lr"],
                "grad_norm": grad_norm,
                **weighted_means(engine.all_ranks(parts)),
            }
        )
        if engine.rank == 0 and (state.step % log_every == 0 or state.step == total):
            _log_step(objective.stage, state.log[-1], total)
        if val_rows and (state.step % config.eval_every == 0 or state.step == total):
            _validate(engine, val_rows, config, objective, state)
        if state.step % config.checkpoint_every == 0 and state.step < total:
            checkpoints.save(engine, state)
        if progress:
            progress(1)
    if state.best_weights:
        engine.load_weights(state.best_weights)
    return state


def _log_step(stage: str, row: dict, total: int) -> None:
    log.info("%s: step %d/%d loss %.4g lr %.3g", stage, row["step"], total, row["loss"], row["lr"])


def _validate(engine, val_rows, config: TrainConfig, objective: Objective, state: TrainState) -> None:
    """Every rank validates on all rows (ZeRO-3 forwards are collective), so all take the same best weights."""
    engine.model.eval()
    metrics = evaluate(engine.model, val_rows, config, objective)
    engine.model.train()
    state.log.append({"step": state.step, "split": "val", "lr": None, "grad_norm": None, **metrics})
    if metrics["loss"] < state.best_val_loss:
        state.best_val_loss = metrics["loss"]
        state.best_weights = engine.weights()


def save_models(model, tokenizer, config: TrainConfig, out: Path, base_model: str) -> dict[str, Path]:
    """The adapter (LoRA) and the merged HF model directory. ``base_model``: the adapter's
    base as ``model_name`` gives it, not the local folder it was trained from."""
    dirs = {}
    if not config.full_finetune:
        save_adapter(model, out / "adapter", base_model)
        tokenizer.save_pretrained(out / "adapter")
        dirs["adapter"] = out / "adapter"
        model = model.merge_and_unload()
    model.save_pretrained(out / "merged")
    tokenizer.save_pretrained(out / "merged")
    dirs["merged"] = out / "merged"
    return dirs


def save_adapter(model, out: Path, base_model: str) -> None:
    """A peft adapter that names its base portably (``model_name``), not by the local folder
    it was trained from, and whose bytes do not depend on the writing process."""
    targets = set()
    for adapter in model.peft_config.values():  # what peft writes into adapter_config.json
        adapter.base_model_name_or_path = base_model
        targets |= set(adapter.target_modules or ())
    # said outright: peft's "auto" asks the hub whether the named base exists to decide
    model.save_pretrained(out, save_embedding_layers=bool(targets & {"embed_tokens", "lm_head"}))
    sort_target_modules(out / "adapter_config.json")
    # peft's boilerplate model card names the base model's local folder, and says nothing else
    (out / "README.md").unlink(missing_ok=True)


def sort_target_modules(adapter_config: Path) -> None:
    """peft writes ``target_modules`` from a set, in an order that changes with each
    process's hash seed: sorted, the same training gives the same bytes anywhere."""
    data = json.loads(adapter_config.read_text())
    if isinstance(data.get("target_modules"), list):
        data["target_modules"] = sorted(data["target_modules"])
    adapter_config.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def significant(value: float, digits: int = 4) -> float:
    """Rounded to significant digits: SEGA losses are often around 1e-5."""
    return float(f"{value:.{digits}g}")


def history_schema(*metrics: str) -> pa.Schema:
    """A training stage's committed table, ``TrainState.log``: a row per optimizer step (split
    "train", with its learning rate and gradient norm) and per validation (split "val"), each
    with the objective's ``metrics`` (means over the step's rows)."""
    return pa.schema(
        [
            ("step", pa.int64()),
            ("split", pa.string()),
            ("lr", pa.float64()),
            ("grad_norm", pa.float64()),
            *((name, pa.float64()) for name in metrics),
        ]
    )


def curves(*metrics: str) -> Callable[[ArtifactStore, ArtifactRef, dict], str]:
    """A training stage's examples in the Prefect UI: ``metrics`` per step, drawn from its committed history."""

    def markdown(store: ArtifactStore, ref: ArtifactRef, parents: dict) -> str:
        return training_curves_markdown(ref.stage, store.read_table(ref), list(metrics))

    return markdown


def training_metrics(before: dict, after: dict, state: TrainState, train_rows: list, val_rows: list) -> dict:
    """The headline numbers of a training stage's manifest."""
    return {
        "train_rows": len(train_rows),
        "val_rows": len(val_rows),
        "steps": state.step,
        "eval_split": "val" if val_rows else "train",
        **{f"before_{k}": significant(v) for k, v in before.items()},
        **{f"after_{k}": significant(v) for k, v in after.items()},
    }


def fit(
    ctx: RunContext,
    stage: str,
    key: str,
    policy: ArtifactRef | Path,
    rows: list[dict],
    config: TrainConfig,
    objective_for: Callable[..., Objective],
    prepare: Callable[..., list[dict]] | None = None,
    val_rows: list[dict] | None = None,
    carry_optimizer: bool = False,
) -> StageOutput:
    """A training stage end to end: ``prepare(model, tokenizer, rows)`` (tokenise,
    reference numbers) while the model is still the starting policy, split, measure
    before, train with checkpoints, measure after, save adapter + merged model.
    With a ZeRO strategy every rank runs it and rank 0's output comes back.
    ``policy``: a model artifact, or a local model folder (the GENIES dpo intervention's base).
    ``val_rows``: a validation set of its own (prepared as ``rows`` are), used instead of
    splitting ``config.val_fraction`` off ``rows``.
    ``carry_optimizer``: a full fine-tune in one process starts from the optimizer state the
    policy artifact carries (an earlier iteration's) and commits its own beside the model."""
    model_dir = policy if isinstance(policy, Path) else ctx.model_dir(policy)
    carry = carry_optimizer and carries_optimizer(config)
    job = partial(
        fit_on_rank,
        ctx,
        stage,
        key,
        model_dir,
        model_name(policy),
        rows,
        config,
        objective_for,
        prepare,
        val_rows,
        carry,
        carried_optimizer_state(ctx, policy) if carry else None,
    )
    strategy = config.distributed.strategy
    if strategy == "none":
        return job()
    if importlib.util.find_spec("deepspeed") is None:
        raise ImportError(f"distributed.strategy={strategy} needs DeepSpeed: pip install 'alignflow[deepspeed]'")
    from alignflow.workers.distributed import run_distributed

    return run_distributed(job, config.distributed.world_size, address=ctx.ray.get("address"))


OPTIMIZER, OPTIMIZER_FILE = "optimizer", "optimizer.pt"


def carries_optimizer(config: TrainConfig) -> bool:
    """Only a full fine-tune in one process: a LoRA run starts a new adapter on the merged
    model, whose parameters the old state does not fit; ZeRO partitions its state per rank."""
    return config.full_finetune and config.distributed.strategy == "none"


def carried_optimizer_state(ctx: RunContext, policy: ArtifactRef | Path) -> Path | None:
    """The optimizer state file a trained policy artifact carries, if it carries one."""
    if isinstance(policy, Path) or policy.stage == "model":
        return None
    store = ctx.store()
    if OPTIMIZER not in store.manifest(policy.stage, policy.key)["dirs"]:
        return None
    return store.local_dir(policy, OPTIMIZER, Path(ctx.model_cache) / "artifacts") / OPTIMIZER_FILE


def fit_on_rank(
    ctx: RunContext,
    stage: str,
    key: str,
    model_dir: Path,
    base_model: str,
    rows: list[dict],
    config: TrainConfig,
    objective_for: Callable[..., Objective],
    prepare: Callable[..., list[dict]] | None,
    val_rows: list[dict] | None = None,
    carry: bool = False,
    optimizer_state: Path | None = None,
) -> StageOutput | None:
    """``fit`` in this process: the only one, or one rank of a distributed job, where
    only rank 0 measures and saves (the others return None). ``carry``: start from
    ``optimizer_state`` (when there is one) and commit the final state beside the model."""
    lead = not dist.is_initialized() or dist.get_rank() == 0
    model, tokenizer = prepare_model(model_dir, config)
    if prepare:
        with torch.inference_mode():
            model.eval()
            rows = prepare(model, tokenizer, rows)
            val_rows = None if val_rows is None else prepare(model, tokenizer, val_rows)
    if val_rows is None:
        train_rows, val_rows = split_rows(rows, config.val_fraction, config.seed)
    else:
        train_rows = rows
    objective = objective_for(tokenizer)
    eval_rows = val_rows or train_rows
    model.eval()
    before = evaluate(model, eval_rows, config, objective) if lead else {}
    model.train()
    engine = make_engine(model, config)
    if optimizer_state:
        engine.optimizer.load_state_dict(torch.load(optimizer_state, map_location="cpu", weights_only=True))
    progress = Progress(stage, total_steps(len(train_rows), config), unit="steps") if lead else None
    state = train(
        model, train_rows, val_rows, config, objective, Checkpoints(ctx.store(), stage, key), progress, engine
    )
    model = engine.trained_model(lambda: prepare_model(model_dir, config)[0])
    if not lead:
        return None
    progress.close()
    model.eval()
    after = evaluate(model, eval_rows, config, objective)
    scratch = Path(tempfile.mkdtemp(prefix=f"alignflow-{stage}-"))
    dirs = save_models(model, tokenizer, config, scratch, base_model)
    if carry:
        dirs[OPTIMIZER] = scratch / OPTIMIZER
        dirs[OPTIMIZER].mkdir()
        torch.save(engine.optimizer.state_dict(), dirs[OPTIMIZER] / OPTIMIZER_FILE)
    return StageOutput(
        tables=[pa.Table.from_pylist(state.log)],
        dirs=dirs,
        metrics=training_metrics(before, after, state, train_rows, val_rows),
        scratch=scratch,
    )
