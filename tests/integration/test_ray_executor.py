"""executor: ray on a real local Ray cluster: stages run in actor processes, give
the same artifacts as the local executor, and a stage whose actor dies is
retried on a fresh actor."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

ray = pytest.importorskip("ray")

from alignflow.config import GemConfig, GeniesConfig, Strict  # noqa: E402
from conftest import gem_config_data  # noqa: E402
from storage.artifacts import ArtifactStore  # noqa: E402
from tasks.stage import RunContext, Stage, StageOutput  # noqa: E402
from workers.ray_pool import ActorPool  # noqa: E402

RAY = {"replicas": 2, "cpus_per_replica": 0.5}


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
    return GeniesConfig.model_validate({
        "model": str(tiny_model_dir), "data_dir": str(data_dir), "shifts": str(shifts),
        "interventions": ["few_shot"], "max_train_pairs": 4, "max_eval_pairs": 4,
        "scoring": {"max_tokens": 96}, "paths": {"home": str(home)}, **extra,
    })


def _workers(root: Path, stage: str) -> set[str]:
    return {m["metrics"]["worker"] for m in ArtifactStore(str(root)).list() if m["stage"] == stage}


def test_genies_flow_on_ray_actors_matches_local(ray_cluster, tiny_model_dir, genies_data_dir, tmp_path):
    from flows.genies_eval import genies_eval

    config = _genies_config(tiny_model_dir, genies_data_dir, tmp_path, executor="ray", ray=RAY)
    on_ray = genies_eval(config=config)
    root = tmp_path / "artifacts"
    workers = _workers(root, "genies_evaluate")
    assert workers and all(not w.endswith(f":{os.getpid()}") for w in workers), workers

    local = genies_eval(config=config.model_copy(update={"executor": "local"}))
    assert local["report"] == on_ray["report"]  # same keys: the executor never changes the numbers
    assert _workers(root, "genies_evaluate") == workers  # nothing was recomputed locally


def test_gem_flow_runs_its_stages_on_ray_actors(ray_cluster, tiny_model_dir, genies_data_dir, tmp_path):
    from flows.gem import gem

    config = GemConfig.model_validate(gem_config_data(tiny_model_dir, genies_data_dir, tmp_path) | {
        "executor": "ray", "ray": RAY})
    summary = gem(config=config)
    root = tmp_path / "artifacts"
    for stage in ("train_sft", "sample", "train_sega", "pref_accuracy"):
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
    stage = Stage("die_once", lambda ctx, config, key: _die_once(ctx, config, key, config.marker), ("tasks.stage",))
    ctx = RunContext(artifact_root=str(tmp_path / "artifacts"), model_cache=str(tmp_path / "models"))
    pool = ActorPool(address=None, replicas=1, gpus_per_replica=0, cpus_per_replica=0.5)
    ref = pool.run(stage, ctx, _Marker(marker=str(tmp_path / "died")), {})
    assert (tmp_path / "died").exists()
    assert ArtifactStore(ctx.artifact_root).read_rows(ref) == [{"x": 1}]
