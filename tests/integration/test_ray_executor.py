"""executor: ray on a real local Ray cluster: stages run in actor processes, give
the same artifacts as the local executor (sharded stages part file by part
file), and a shard or stage whose actor dies is retried on a fresh actor."""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

import pytest

ray = pytest.importorskip("ray")

from helpers import gem_config_data, tiny_config_data  # noqa: E402

from alignflow.cli import main  # noqa: E402
from alignflow.config import GemConfig, GeniesConfig, SampleConfig, SelfImproveConfig, Strict  # noqa: E402
from alignflow.storage.artifacts import ArtifactStore  # noqa: E402
from alignflow.tasks.base_model import base_model_ref  # noqa: E402
from alignflow.tasks.prompts import PROMPTS, prompt_source  # noqa: E402
from alignflow.tasks.sample import SAMPLE  # noqa: E402
from alignflow.tasks.stage import RunContext, Stage, StageOutput  # noqa: E402
from alignflow.workers.ray_pool import ActorPool, pool, release_pools  # noqa: E402

RAY = {"replicas": 2, "cpus_per_replica": 0.5}
# small shards, so every sharded stage spreads over both replicas
SHARDED = {"sample__shard_size": 2, "judge__shard_size": 2, "logprobs__shard_size": 3}


@pytest.fixture(scope="module")
def ray_cluster():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # actors cannot import this test module
    yield
    ray.shutdown()


def _genies_config(tiny_model_dir, data_dir, home: Path, **extra) -> GeniesConfig:
    shifts = home / "shifts.json"
    shifts.parent.mkdir(parents=True, exist_ok=True)
    shifts.write_text(json.dumps([{"source": "alpaca_short", "target": "alpaca_long", "category": "spurious_cues"}]))
    return GeniesConfig.model_validate(
        {
            "model": str(tiny_model_dir),
            "data_dir": str(data_dir),
            "shifts": str(shifts),
            "interventions": ["few_shot"],
            "max_train_pairs": 4,
            "max_eval_pairs": 4,
            "scoring": {"max_tokens": 512},  # the tiny BPE spends many tokens per word
            "paths": {"home": str(home)},
            **extra,
        }
    )


def _workers(root: Path, stage: str) -> set[str]:
    return {m["metrics"]["worker"] for m in ArtifactStore(str(root)).committed() if m["stage"] == stage}


def test_genies_flow_on_ray_actors_matches_local(ray_cluster, tiny_model_dir, genies_data_dir, tmp_path):
    from alignflow.flows.genies_eval import genies_eval

    config = _genies_config(tiny_model_dir, genies_data_dir, tmp_path, executor="ray", ray=RAY)
    on_ray = genies_eval(config=config)
    root = tmp_path / "artifacts"
    workers = _workers(root, "genies_evaluate")
    assert workers and all(not w.endswith(f":{os.getpid()}") for w in workers), workers

    local = genies_eval(config=config.model_copy(update={"executor": "local"}))
    assert local["report"] == on_ray["report"]  # same keys: the executor never changes the numbers
    assert _workers(root, "genies_evaluate") == workers  # nothing was recomputed locally


def test_gem_flow_runs_its_stages_on_ray_actors(ray_cluster, tiny_model_dir, genies_data_dir, tmp_path):
    from alignflow.flows.gem import gem

    data = gem_config_data(tiny_model_dir, genies_data_dir, tmp_path)
    # one SEGA iteration, no control and one baseline: where stages run, not what GEM computes
    data |= {"executor": "ray", "ray": RAY, "shuffled_control": False, "baselines": ["pro"]}
    data["sega"] |= {"iterations": 1}
    config = GemConfig.model_validate(data)
    summary = gem(config=config)
    root = tmp_path / "artifacts"
    for stage in ("train_sft", "sample", "train_sega", "train_pro", "pref_accuracy"):
        workers = _workers(root, stage)
        assert workers and all(not w.endswith(f":{os.getpid()}") for w in workers), (stage, workers)
    assert {(r["model"], r["reward"]) for r in summary["accuracy"]} >= {("base", "log pi"), ("gem", "log pi")}


def _die_once(ctx, config, key, marker: str) -> StageOutput:
    import pyarrow as pa

    if not Path(marker).exists():
        Path(marker).touch()
        os._exit(1)  # the actor process dies mid-stage
    return StageOutput(tables=[pa.table({"x": [1]})], metrics={"rows_out": 1})


class _Marker(Strict):
    marker: str


def test_dead_actor_stage_is_retried_on_a_new_actor(ray_cluster, tmp_path):
    stage = Stage(
        "die_once", lambda ctx, config, key: _die_once(ctx, config, key, config.marker), "alignflow.tasks.stage"
    )
    ctx = RunContext(artifact_root=str(tmp_path / "artifacts"), model_cache=str(tmp_path / "models"))
    pool = ActorPool(address=None, replicas=1, gpus_per_replica=0, cpus_per_replica=0.5)
    ref = pool.run(stage, ctx, _Marker(marker=str(tmp_path / "died")), {})
    assert (tmp_path / "died").exists()
    assert ArtifactStore(ctx.artifact_root).read_rows(ref) == [{"x": 1}]


def _stage_artifacts(root: Path) -> dict[str, dict]:
    """stage -> manifest of the run's artifacts (one round: one per stage)."""
    return {m["stage"]: m for m in ArtifactStore(str(root)).committed()}


@pytest.fixture
def one_torch_thread():
    """The actors run one torch thread (Ray sets OMP_NUM_THREADS from their CPUs);
    float sums split over another number of threads differ in the last bits, so
    the local side of a bitwise comparison runs one too."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_self_improve_on_ray_gives_the_local_artifacts_part_for_part(
    ray_cluster, one_torch_thread, tiny_model_dir, tmp_path
):
    from alignflow.flows.self_improve import self_improve

    data = tiny_config_data(tiny_model_dir, tmp_path / "ray", **SHARDED) | {"executor": "ray", "ray": RAY}
    self_improve(config=SelfImproveConfig.model_validate(data))
    local_data = tiny_config_data(tiny_model_dir, tmp_path / "local", **SHARDED)
    self_improve(config=SelfImproveConfig.model_validate(local_data))

    on_ray, local = _stage_artifacts(tmp_path / "ray" / "artifacts"), _stage_artifacts(tmp_path / "local" / "artifacts")
    for stage in ("sample", "judge", "logprobs", "train_dpo"):
        assert on_ray[stage]["key"] == local[stage]["key"], stage  # same inputs all the way down
        assert on_ray[stage]["content_hash"] == local[stage]["content_hash"], stage
    for stage, shards in (("sample", 3), ("judge", 3), ("logprobs", None)):
        metrics = on_ray[stage]["metrics"]
        assert len(on_ray[stage]["parts"]) == metrics["shards"] == local[stage]["metrics"]["shards"]
        assert shards is None or metrics["shards"] == shards  # 6 prompts in shards of 2
        workers = metrics["worker"].split(",")
        assert all(not w.endswith(f":{os.getpid()}") for w in workers)
        if metrics["shards"] > 1:
            assert len(workers) == 2, (stage, workers)  # both replicas took shards
    assert local["sample"]["metrics"]["worker"].endswith(f":{os.getpid()}")
    assert not list((tmp_path / "ray").glob("**/_manifest.json.*.tmp"))


def _sample_inputs(ctx: RunContext, tiny_model_dir) -> dict:
    return {
        "policy": base_model_ref(str(tiny_model_dir), ctx.model_cache),
        "prompts": PROMPTS.run(ctx, prompt_source("builtin:demo", 12)),
    }


def test_killed_actor_mid_stage_gives_the_same_artifact(ray_cluster, one_torch_thread, tiny_model_dir, tmp_path):
    """SIGKILL one actor while the sample stage's shards are running: its shard
    is retried on a restarted actor and the artifact equals an uninterrupted run."""
    config = SampleConfig(n=2, max_new_tokens=24, temperature=1.0, top_p=1.0, batch_size=4, shard_size=1)
    local = RunContext(artifact_root=str(tmp_path / "local"), model_cache=str(tmp_path / "models"))
    uninterrupted = SAMPLE.run(local, config, **_sample_inputs(local, tiny_model_dir))

    settings = {
        "address": None,
        "replicas": 2,
        "gpus_per_replica": 0,
        "cpus_per_replica": 0.5,
        "spread": True,
        "placement_timeout_s": 60.0,
        "shard_retries": 2,
    }
    ctx = RunContext(
        artifact_root=str(tmp_path / "ray"), model_cache=str(tmp_path / "models"), executor="ray", ray=settings
    )
    inputs = _sample_inputs(ctx, tiny_model_dir)
    victim = pool(settings).replicas[0].where()[0]["pid"]
    result = {}
    stage = threading.Thread(target=lambda: result.update(ref=SAMPLE.run(ctx, config, **inputs)))
    stage.start()
    receipts = Path(ctx.artifact_root) / "sample"
    while not list(receipts.glob("*/_shards/*.json")) and stage.is_alive():
        time.sleep(0.05)
    os.kill(victim, signal.SIGKILL)  # a shard is done, the other 11 are queued or running
    stage.join(timeout=600)
    release_pools()

    ref = result["ref"]
    manifest = ArtifactStore(ctx.artifact_root).manifest(ref.stage, ref.key)
    assert manifest["metrics"]["shard_retries"] >= 1
    assert ref.key == uninterrupted.key and ref.content_hash == uninterrupted.content_hash
    assert len(manifest["parts"]) == 12


def test_a_stage_resumes_from_the_shards_an_earlier_attempt_wrote(tiny_model_dir, tmp_path, capsys):
    """The driver dies after every shard is written but before the commit: the
    next attempt commits those part files without computing a shard."""
    config = SampleConfig(n=2, max_new_tokens=6, batch_size=4, shard_size=4)
    ctx = RunContext(artifact_root=str(tmp_path / "artifacts"), model_cache=str(tmp_path / "models"))
    inputs = _sample_inputs(ctx, tiny_model_dir)
    first = SAMPLE.run(ctx, config, **inputs)
    manifest_path = Path(ctx.artifact_root) / "sample" / first.key / "_manifest.json"
    before = json.loads(manifest_path.read_text())
    manifest_path.unlink()
    assert main(["artifacts", "progress", "--root", ctx.artifact_root]) == 0
    assert f"sample       {first.key}   3/3 shards  24/24 samples" in capsys.readouterr().out

    again = SAMPLE.run(ctx, config, **inputs)
    after = json.loads(manifest_path.read_text())
    assert again == first and after["parts"] == before["parts"]
    assert after["metrics"]["shards_resumed"] == after["metrics"]["shards"] == 3
    assert main(["artifacts", "progress", "--root", ctx.artifact_root]) == 0
    assert "no sharded stage is in progress" in capsys.readouterr().out
