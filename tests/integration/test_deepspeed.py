"""DeepSpeed ZeRO on the shared training loop: two ranks (Ray actors on a local
cluster, gloo) train the tiny model with DPO step for step as one process does,
rank 0's checkpoint resumes to the same result, and bf16 ZeRO-2 runs on CUDA
where a GPU is present."""

from __future__ import annotations

import os
import shutil
import sys
import time
from pathlib import Path

import pyarrow as pa
import pytest
import torch

pytest.importorskip("deepspeed")
ray = pytest.importorskip("ray")

# Any DeepSpeed op that compiles on first use is built once, then loaded from here (the ranks inherit it).
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "alignflow" / "torch_extensions"))

from alignflow.config import DPOConfig  # noqa: E402
from alignflow.tasks.base_model import base_model_ref  # noqa: E402
from alignflow.tasks.stage import RunContext  # noqa: E402
from alignflow.tasks.train_dpo import compute_train_dpo  # noqa: E402
from alignflow.tasks.training import make_engine, prepare_model, rank_micro_batches, split_rows  # noqa: E402
from alignflow.workers.distributed import rank_envs, run_distributed  # noqa: E402
from alignflow.workers.models import load_causal_lm  # noqa: E402
from alignflow.workers.scoring import sequence_logprob_sums  # noqa: E402

PAIRS = 18
# 13 training pairs in global batches of 6 (3 per rank, as micro-batches of 2 and 1): the
# last step has one pair, so one rank trains on a stand-in row with weight 0. A low clipping
# norm makes DeepSpeed's clipping (not torch's) shape some of the steps.
CONFIG = {
    "lr": 1e-2,
    "batch_size": 2,
    "grad_accum": 3,
    "epochs": 2,
    "val_fraction": 0.25,
    "eval_every": 2,
    "checkpoint_every": 3,
    "max_grad_norm": 0.2,
    "lora": {"r": 4, "alpha": 8},
}
ZERO2 = {"strategy": "zero2", "world_size": 2}
# Two ranks add float32 gradients in another order than one process (each rank's share, then
# gloo's all-reduce) and run their matmuls on one thread, not two: measured, the losses and
# gradient norms differ by at most 2e-7 relative over these steps. 1e-5 leaves room for other
# CPUs and is far below what broken sharding does, which fails at step 1: both ranks training
# rank 0's rows moves the gradient norm from 0.150 to 0.204, an unscaled rank loss halves it.
REL = 1e-5


@pytest.fixture(scope="module")
def ray_cluster():
    """A local cluster without GPUs, even on a GPU machine: its ranks reproduce float32 CPU numbers."""
    ray.init(num_cpus=2, num_gpus=0, include_dashboard=False, log_to_driver=False)
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # ranks cannot import this module
    yield
    ray.shutdown()


@pytest.fixture
def gpu_ray_cluster():
    """A local cluster with the machine's GPUs, replacing the CPU tests' one (the GPU test comes last)."""
    ray.shutdown()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def _pairs(model_dir: Path) -> list[dict]:
    """Random token sequences with the tiny model's own log-probs as the reference (the logprobs stage's layout)."""
    model, tokenizer = load_causal_lm(model_dir)
    g = torch.Generator().manual_seed(0)

    def tokens(n: int) -> list[int]:
        return torch.randint(10, len(tokenizer) - 3, (n,), generator=g).tolist()

    eos = tokenizer.eos_token_id
    rows = [
        {
            "prompt_id": f"p{i}",
            "prompt_ids": tokens(6 + i % 5),
            "chosen_ids": tokens(3 + i % 4) + [eos],
            "rejected_ids": tokens(2 + i % 3) + [eos],
        }
        for i in range(PAIRS)
    ]
    sums = sequence_logprob_sums(
        model,
        tokenizer.pad_token_id,
        [r["prompt_ids"] for r in rows] * 2,
        [r["chosen_ids"] for r in rows] + [r["rejected_ids"] for r in rows],
        4096,
    )
    for i, row in enumerate(rows):
        row["chosen_logp"], row["rejected_logp"] = sums[i], sums[PAIRS + i]
    return rows


@pytest.fixture(scope="module")
def train_dpo(tiny_model_dir, tmp_path_factory):
    """``train_dpo(key, **config)``: the train_dpo stage's computation on the pairs, under ``key``."""
    home = tmp_path_factory.mktemp("deepspeed")
    ctx = RunContext(artifact_root=str(home / "artifacts"), model_cache=str(home / "models"))
    rows = _pairs(tiny_model_dir)
    train_rows, _ = split_rows(rows, CONFIG["val_fraction"], 0)
    assert len(train_rows) % (CONFIG["batch_size"] * CONFIG["grad_accum"]) == 1, "the epoch should end on a 1-row step"
    pairs = ctx.store().commit("logprobs", "tiny", tables=[pa.Table.from_pylist(rows)])
    policy = base_model_ref(str(tiny_model_dir), ctx.model_cache)

    outputs = []

    def run(key: str, **config):
        outputs.append(compute_train_dpo(ctx, DPOConfig.model_validate({**CONFIG, **config}), key, policy, pairs))
        return outputs[-1]

    run.checkpoints = lambda key: sorted(Path(ctx.artifact_root, "train_dpo", key, "_checkpoints").glob("step-*.pt"))
    yield run
    for out in outputs:  # the saved models, which a stage would have committed
        shutil.rmtree(out.scratch, ignore_errors=True)


@pytest.fixture(scope="module")
def one_process(train_dpo):
    return train_dpo("one-process")


@pytest.fixture(scope="module")
def zero2(train_dpo, ray_cluster):
    return train_dpo("zero2", distributed=ZERO2)


def _log(out) -> list[dict]:
    return out.tables[0].to_pylist()


def assert_same_steps(ours, theirs, rel: float = REL) -> None:
    a, b = _log(ours), _log(theirs)
    assert [(r["step"], r["split"]) for r in a] == [(r["step"], r["split"]) for r in b]
    for x, y in zip(a, b):
        where = f"step {x['step']} {x['split']}"
        assert x["lr"] == y["lr"], where
        assert x["loss"] == pytest.approx(y["loss"], rel=rel), where
        if x["split"] == "train":
            assert x["grad_norm"] == pytest.approx(y["grad_norm"], rel=rel), where


def test_rank_shares_pair_up_and_cover_the_step_once():
    rows = [{"i": i} for i in range(7)]
    shares = [rank_micro_batches(rows, 2, rank, 2) for rank in range(2)]
    assert [[len(b) for b in share] for share in shares] == [[2, 2], [2, 1]]
    assert sorted(r["i"] for share in shares for b in share for r in b) == list(range(7))
    assert rank_micro_batches(rows[:1], 2, 1, 2) == [[]]  # a rank with no row still runs one (empty) backward
    assert rank_micro_batches(rows, 2, 0, 1) == [rows[0:2], rows[2:4], rows[4:6], rows[6:7]]  # one process: as before


def test_rank_envs_give_each_rank_its_own_gpu():
    envs = rank_envs("10.0.0.5", 29500, ["3", "1"], 2)
    assert [e["RANK"] for e in envs] == [e["LOCAL_RANK"] for e in envs] == ["0", "1"]
    assert {e["CUDA_VISIBLE_DEVICES"] for e in envs} == {"3,1"}  # rank 1's GPU is cuda:1
    assert {(e["MASTER_ADDR"], e["MASTER_PORT"], e["WORLD_SIZE"]) for e in envs} == {("10.0.0.5", "29500", "2")}
    assert rank_envs("10.0.0.5", 29500, [], 2)[1]["CUDA_VISIBLE_DEVICES"] == ""  # CPU ranks see no GPU


def _rank0_fails_while_rank1_waits():
    import torch.distributed as dist

    if dist.get_rank() == 0:
        raise ValueError("rank 0 failed")
    dist.barrier()  # alone, this would wait for rank 0 until gloo's 30-minute timeout


def test_a_failing_rank_fails_the_job_at_once(ray_cluster):
    started = time.monotonic()
    with pytest.raises(ValueError, match="rank 0 failed"):
        run_distributed(_rank0_fails_while_rank1_waits, 2)
    assert time.monotonic() - started < 120


def test_zero2_on_two_ranks_trains_like_one_process(zero2, one_process):
    assert_same_steps(zero2, one_process)
    assert any(r["grad_norm"] and r["grad_norm"] > CONFIG["max_grad_norm"] for r in _log(one_process))  # clipped
    for name in ("steps", "after_loss", "after_margin"):
        assert zero2.metrics[name] == pytest.approx(one_process.metrics[name], rel=REL, abs=1e-7), name
    assert zero2.metrics["before_loss"] == one_process.metrics["before_loss"]
    # rank 0 saved the models where this process commits them from
    assert (zero2.dirs["adapter"] / "adapter_config.json").exists() and (zero2.dirs["merged"] / "config.json").exists()


def test_zero2_resumes_from_the_checkpoint_rank0_wrote(train_dpo, zero2):
    checkpoints = train_dpo.checkpoints("zero2")
    assert [p.name for p in checkpoints] == ["step-00000003.pt"]  # of 6 steps
    assert len(torch.load(checkpoints[0], weights_only=False)["shards"]) == 2  # both ranks' optimizer partitions
    written = checkpoints[0].stat().st_mtime_ns

    resumed = train_dpo("zero2", distributed=ZERO2)  # same key: resumes at step 3
    assert checkpoints[0].stat().st_mtime_ns == written  # steps 1-3 were not trained again
    assert_same_steps(resumed, zero2)
    assert resumed.metrics["after_loss"] == pytest.approx(zero2.metrics["after_loss"], rel=REL)


def test_zero3_on_two_ranks_trains_like_one_process(train_dpo, one_process, ray_cluster):
    zero3 = train_dpo("zero3", distributed={"strategy": "zero3", "world_size": 2})
    assert_same_steps(zero3, one_process)
    assert zero3.metrics["after_loss"] == pytest.approx(one_process.metrics["after_loss"], rel=REL)


def test_gradient_checkpointing_trains_the_same_steps(train_dpo, one_process, tiny_model_dir):
    model, _ = prepare_model(tiny_model_dir, DPOConfig(gradient_checkpointing=True))
    assert model.is_gradient_checkpointing
    assert_same_steps(train_dpo("checkpointed", gradient_checkpointing=True), one_process, rel=1e-6)


def test_zero_strategy_outside_fit_is_a_clear_error(tiny_model_dir):
    model, _ = prepare_model(tiny_model_dir, DPOConfig())
    with pytest.raises(RuntimeError, match="trains through fit"):
        make_engine(model, DPOConfig(distributed=ZERO2))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_zero2_bf16_on_gpus_trains_close_to_float32(train_dpo, one_process, gpu_ray_cluster):
    world = min(2, torch.cuda.device_count())
    out = train_dpo("zero2-bf16", distributed={"strategy": "zero2", "world_size": world})
    ours, theirs = _log(out), _log(one_process)
    assert [r["step"] for r in ours] == [r["step"] for r in theirs]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in ours)
    # bf16 weights (8 mantissa bits) move the summed log-probs by ~1e-2: the DPO loss stays within 2%
    assert ours[0]["loss"] == pytest.approx(theirs[0]["loss"], rel=2e-2)
    assert out.metrics["after_loss"] == pytest.approx(one_process.metrics["after_loss"], rel=2e-2)
