"""What every stage shares: its artifact key, the skip-if-committed check, the
commit, the Prefect task around it (cache key = artifact key, retries with
backoff) and its report to the Prefect UI.

A stage is a plain function ``compute(ctx, config, **parents) -> StageOutput``,
or, for the model stages that scale out, ``Shards``: its input rows cut into
shards of ``config.shard_size``, each computed (in this process, or on a Ray
actor) into its own part file, and committed together. ``stage_task`` turns a
stage into a cached, retryable Prefect task whose parameters are the run
context, the stage config and parent ``ArtifactRef``s.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import cast
from uuid import UUID

import pyarrow as pa
from prefect import task
from prefect.tasks import exponential_backoff
from pydantic import BaseModel, ConfigDict

from alignflow.storage.artifacts import ArtifactError, ArtifactRef, ArtifactStore, artifact_key, stable_hash
from alignflow.tasks.code_graph import CodeGraph, project_graph
from alignflow.tasks.stage_report import in_prefect_run, publish_stage_report

log = logging.getLogger("alignflow")


class RunContext(BaseModel):
    """Where a run reads and writes; passed to every stage (small, hashable)."""

    model_config = ConfigDict(frozen=True)

    artifact_root: str
    model_cache: str
    storage_options: dict = {}
    executor: str = "local"  # "ray": stages run on the actor pool described by ``ray``
    ray: dict = {}

    def store(self) -> ArtifactStore:
        return ArtifactStore(self.artifact_root, self.storage_options)

    def model_dir(self, ref: ArtifactRef) -> Path:
        """Local directory of a model: a base model (a built-in name or its own path) or a trained model artifact."""
        if ref.stage == "model":
            from alignflow.workers.models import resolve_model_dir

            return resolve_model_dir(ref.uri, self.model_cache)
        return self.store().local_dir(ref, "merged", Path(self.model_cache) / "artifacts")


def run_context(config) -> RunContext:
    """Where a flow's stages read and write, and where they run (local or a Ray pool)."""
    paths = config.paths.resolved()
    executor = config.executor
    return RunContext(
        artifact_root=paths.artifact_root,
        model_cache=paths.model_cache,
        storage_options=config.storage.options(),
        executor=executor,
        ray=config.ray.model_dump() if executor == "ray" else {},
    )


@dataclass
class StageOutput:
    tables: list[pa.Table] = field(default_factory=list)
    shards: list[dict] = field(default_factory=list)  # receipts of part files the shards wrote
    dirs: dict[str, Path] = field(default_factory=dict)  # local directories copied into the artifact
    metrics: dict = field(default_factory=dict)
    scratch: Path | None = None  # a temporary directory removed once the artifact is committed


@dataclass(frozen=True)
class Shards:
    """A stage computed shard by shard. ``units(ctx, config, parents)`` lists its
    work in order (prompts, a prompt's candidates, pairs), read once by the
    driver; shards are runs of ``config.shard_size`` units, so the part files
    are the same wherever they run. ``open(ctx, config, parents)`` gives the
    process's model (loaded once, shared by shards); ``compute(model, units,
    config, progress)`` turns one shard's units into (output rows, the shard's
    own metrics); ``metrics(rows, seconds)`` sums up every shard's rows and
    compute time. ``work(units, config)`` is the progress a shard's units make,
    in ``unit``s (a prompt's n samples, its comparisons, a pair's two sequences)."""

    units: Callable[[RunContext, BaseModel, dict], list]
    open: Callable[[RunContext, BaseModel, dict], object]
    compute: Callable[[object, list, BaseModel, Callable | None], tuple[list[dict], dict]]
    metrics: Callable[[list[dict], float], dict]
    work: Callable[[list, BaseModel], int]
    unit: str


@dataclass(frozen=True)
class Stage:
    name: str
    compute: Callable[..., StageOutput] | None
    module: str  # the stage's own module: its key covers every project module this one imports (code_graph.py)
    shards: Shards | None = None
    # modules a config picks at run time (a GENIES intervention), outside the stage module's own imports
    config_modules: Callable[[BaseModel], tuple[str, ...]] | None = None
    # its output rows: one schema, or one per config (columns only some configs write); commit checks against it
    schema: pa.Schema | Callable[[BaseModel], pa.Schema] | None = None
    # a few example rows (or training curves) as markdown for the Prefect UI: (store, artifact, parents) -> markdown
    examples: Callable[[ArtifactStore, ArtifactRef, dict[str, ArtifactRef]], str] | None = None

    def output_schema(self, config: BaseModel) -> pa.Schema | None:
        return self.schema(config) if callable(self.schema) else self.schema

    def code_version(self, config: BaseModel, graph: CodeGraph | None = None) -> str:
        """Hash of the code that decides this stage's numbers (with model library versions where it runs a model)."""
        roots = (self.module, *(self.config_modules(config) if self.config_modules else ()))
        return (graph or project_graph()).code_version(*roots)

    def key(self, config: BaseModel, parents: dict[str, ArtifactRef]) -> str:
        ordered = [parents[name] for name in sorted(parents)]
        return artifact_key(self.name, config.model_dump(mode="json"), ordered, self.code_version(config))

    def run(self, ctx: RunContext, config: BaseModel, **parents: ArtifactRef) -> ArtifactRef:
        """Return the committed artifact for these inputs, computing it only if absent."""
        store = ctx.store()
        key = self.key(config, parents)
        if store.is_committed(self.name, key):
            log.info("%s: cached %s", self.name, store.uri(self.name, key))
            return store.ref(self.name, key)
        started = time.perf_counter()
        if self.shards:
            out = self._compute_sharded(self.shards, ctx, config, key, parents)
        elif self.compute:
            out = self.compute(ctx, config, key=key, **parents)
        else:
            raise TypeError(f"stage {self.name}: neither compute nor shards is given")
        metrics = {"worker": _worker(), **out.metrics, "seconds": round(time.perf_counter() - started, 3)}
        ref = store.commit(
            self.name,
            key,
            tables=out.tables,
            shards=out.shards,
            local_dirs=out.dirs,
            parents=list(parents.values()),
            config=config.model_dump(mode="json"),
            code_version=self.code_version(config),
            metrics=metrics,
            schema=self.output_schema(config),
        )
        if out.scratch:
            shutil.rmtree(out.scratch, ignore_errors=True)
        examples = partial(self.examples, store, ref, parents) if self.examples else None
        publish_stage_report(self.name, ref, metrics, rows_in=_rows_in(store, parents), examples=examples)
        log.info("%s: committed %s", self.name, ref.uri)
        return ref

    def _compute_sharded(
        self, plan: Shards, ctx: RunContext, config: BaseModel, key: str, parents: dict
    ) -> StageOutput:
        """Every shard's part file, computing only those no earlier attempt wrote."""
        store = ctx.store()
        units = plan.units(ctx, config, parents)
        size: int = config.shard_size  # type: ignore[attr-defined]  # every sharded stage's config has one
        shards = [units[i : i + size] for i in range(0, len(units), size)]
        done = store.shard_receipts(self.name, key)
        todo = {i: shard for i, shard in enumerate(shards) if i not in done}
        work = plan.work(units, config)
        store.plan_shards(self.name, key, shards=len(shards), work=work, unit=plan.unit)
        progress = Progress(self.name, work, unit=plan.unit, shards=len(shards))
        progress(sum(done[i]["work"] for i in done), shards=len(done))
        if done:
            log.info("%s: %d of %d shards were written by an earlier attempt", self.name, len(done), len(shards))

        def finished(receipt: dict) -> None:
            done[receipt["index"]] = receipt
            log.info(
                "%s: shard %d/%d done on %s in %.1fs",
                self.name,
                receipt["index"] + 1,
                len(shards),
                receipt["worker"],
                receipt["seconds"],
            )

        retries = run_shards(self, ctx, config, key, parents, todo, progress, finished)
        progress.close()
        receipts = [done[i] for i in range(len(shards))]
        # read back, checked against the receipts: the metrics cover every shard, wherever it ran
        rows = store.read_shards(self.name, key, receipts).to_pylist()
        metrics = plan.metrics(rows, sum(r["seconds"] for r in receipts))
        workers = sorted({r["worker"] for r in receipts})
        return StageOutput(
            shards=receipts,
            metrics={
                **metrics,
                "worker": ",".join(workers),
                "shards": len(shards),
                "shards_resumed": len(shards) - len(todo),
                "shard_retries": retries,
            },
        )

    def compute_shard(
        self, ctx: RunContext, config: BaseModel, key: str, index: int, units: list, parents: dict, progress=None
    ) -> dict:
        """One shard, in the process that runs it: its rows become a part file of the
        artifact. The receipt records the torch threads: on CPU, float sums split
        over a different number of threads differ in the last bits."""
        import torch

        plan = self.shards
        if plan is None:
            raise TypeError(f"stage {self.name} is not sharded")
        model = plan.open(ctx, config, parents)
        started = time.perf_counter()
        rows, _ = plan.compute(model, units, config, progress)
        seconds = round(time.perf_counter() - started, 3)
        return ctx.store().write_shard(
            self.name,
            key,
            index,
            pa.Table.from_pylist(rows),
            schema=self.output_schema(config),
            work=plan.work(units, config),
            seconds=seconds,
            worker=_worker(),
            torch_threads=torch.get_num_threads(),
        )


def run_shards(
    stage: Stage,
    ctx: RunContext,
    config: BaseModel,
    key: str,
    parents: dict,
    todo: dict[int, list],
    progress: Progress,
    finished: Callable[[dict], None],
) -> int:
    """Compute the ``todo`` shards in order here, or over the Ray pool's replicas;
    returns how many shard attempts were retried after their actor died."""
    if ctx.executor == "ray":
        from alignflow.workers.ray_pool import pool

        return pool(ctx.ray).map_shards(stage, ctx, config, key, parents, todo, progress, finished)
    for index, units in todo.items():
        receipt = stage.compute_shard(ctx, config, key, index, units, parents, progress)
        progress(0, shards=1)
        finished(receipt)
    return 0


def release_workers(*_hook_args) -> None:
    """Give back this process's loaded model and its Ray actors. Every flow runs it
    when it ends, however it ends (``RELEASE_HOOKS``)."""
    from alignflow.workers.backend import release_backends

    release_backends()
    if "alignflow.workers.ray_pool" in sys.modules:  # only a run that used Ray has pools (and Ray imported)
        sys.modules["alignflow.workers.ray_pool"].release_pools()


RELEASE_HOOKS = {hook: [release_workers] for hook in ("on_completion", "on_failure", "on_crashed", "on_cancellation")}


def _worker() -> str:
    """Which process computed an artifact (the driver, or a Ray actor)."""
    return f"{socket.gethostname()}:{os.getpid()}"


def _rows_in(store: ArtifactStore, parents: dict[str, ArtifactRef]) -> int:
    return sum(store.manifest(p.stage, p.key)["rows"] for p in parents.values() if p.stage != "model")


def stage_task(stage: Stage, retries: int = 2):
    """The Prefect task of a stage: its cache key is the artifact key (qualified by
    the artifact root), so a re-run with the same inputs is served from cache."""

    def cache_key(_ctx, params: dict) -> str:
        # Prefect hands keyword parents over as one dict named after the ** parameter.
        key = stage.key(params["config"], params["parents"])
        return f"{stage.name}-{key}-{stable_hash(params['ctx'].artifact_root)[:8]}"

    def run(ctx: RunContext, config: BaseModel, **parents: ArtifactRef) -> ArtifactRef:
        fail_once_if_asked(stage.name)
        if ctx.executor == "ray" and not stage.shards:  # a sharded stage sends its shards to the pool itself
            from alignflow.workers.ray_pool import run_on_ray

            return run_on_ray(stage, ctx, config, parents)
        return stage.run(ctx, config, **parents)

    run.__name__ = stage.name
    return task(
        name=stage.name,
        cache_key_fn=cache_key,
        persist_result=True,
        retries=retries,
        retry_delay_seconds=exponential_backoff(backoff_factor=2),
        retry_jitter_factor=0.2,
        retry_condition_fn=is_transient,
    )(run)


# Bad input (and a missing optional extra) fails the same way every time: retrying it only delays the error.
BAD_INPUT = (ValueError, LookupError, ArtifactError, FileNotFoundError, ImportError)


def fail_once_if_asked(stage: str) -> None:
    """Test hook: ``ALIGNFLOW_FAIL_ONCE=STAGE:MARKER_FILE`` fails STAGE the first time
    it runs and creates the marker, so the next run passes. A ValueError, like bad
    input, is not retried: the flow run fails and has to be resumed."""
    target, _, marker = os.environ.get("ALIGNFLOW_FAIL_ONCE", "").partition(":")
    if target == stage and marker and not os.path.exists(marker):
        Path(marker).touch()
        raise ValueError(f"{stage}: fault injected by ALIGNFLOW_FAIL_ONCE (marker {marker})")


def is_transient(_task, _run, state) -> bool:
    return not isinstance(state.data, BAD_INPUT)


class Progress:
    """A tqdm bar on the terminal and, inside a Prefect task, a progress artifact;
    a sharded stage's bar and artifact also count its shards."""

    def __init__(self, stage: str, total: int, unit: str = "rows", shards: int | None = None):
        from tqdm.auto import tqdm

        self.stage = stage
        self.bar = tqdm(total=total, desc=stage, unit=unit, leave=False)
        self.total = max(total, 1)
        self.done = 0
        self.shards, self.shards_done = shards, 0
        self.artifact_id: UUID | None = None
        self.last_push = 0.0
        if in_prefect_run():
            from prefect.artifacts import create_progress_artifact

            # in a sync task Prefect's sync-compatible call returns the id itself
            self.artifact_id = cast(UUID, create_progress_artifact(0.0, description=self.description()))

    def description(self) -> str:
        if self.shards is None:
            return f"{self.stage} progress"
        return f"{self.stage}: {self.shards_done}/{self.shards} shards"

    def __call__(self, n: int, shards: int = 0) -> None:
        self.bar.update(n)
        self.done += n
        self.shards_done += shards
        if shards:
            self.bar.set_postfix_str(f"shards {self.shards_done}/{self.shards}")
        if self.artifact_id and (shards or time.monotonic() - self.last_push > 2 or self.done >= self.total):
            from prefect.artifacts import update_progress_artifact

            update_progress_artifact(self.artifact_id, 100.0 * self.done / self.total, description=self.description())
            self.last_push = time.monotonic()

    def close(self) -> None:
        self.bar.close()
