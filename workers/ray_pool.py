"""The Ray executor: stages run on a pool of long-lived actors.

The pool holds ``replicas``; each is a placement group (workers/placement.py)
with one actor per bundle, so a replica of g GPUs is g actors on one node, each
seeing its own device. A replica's first actor (rank 0) does the work: it
imports the project once and keeps its model loaded (workers/backend.py), so
it serves every shard of every stage of the flow run that uses that model.

A sharded stage (tasks/stage.py ``Shards``) sends each shard to whichever
replica is free; the actor writes the shard's part file straight to the
artifact store and returns a small receipt. Other stages run whole on one
replica, reading parents from the store and committing, so only small
``ArtifactRef``s cross the wire. Concurrent Prefect tasks share the replicas
shard by shard. An actor that dies is restarted in its bundle and its shard
(or stage) retried there, ``shard_retries`` times at most.

Actors have no Prefect run context, so each call collects the ``alignflow`` log
records it makes and returns them beside its result; the driver logs them again
inside the task run, named after the actor, so they reach the run's Prefect logs.
"""

from __future__ import annotations

import logging
import os
import queue
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager, suppress

import ray
from ray.exceptions import ActorDiedError, ActorUnavailableError
from ray.util.placement_group import remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from alignflow.workers.placement import ReplicaShape, reserve

log = logging.getLogger("alignflow")

ACTOR_LOST = (ActorDiedError, ActorUnavailableError)
_pools: dict[tuple, ActorPool] = {}
_lock = threading.Lock()


class LogCapture(logging.Handler):
    """Keeps the records of one actor call as plain dicts, to return with its result."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.records: list[dict] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append({"levelno": record.levelno, "message": record.getMessage(), "created": record.created})


@contextmanager
def captured_logs() -> Iterator[list[dict]]:
    """The ``alignflow`` records (INFO and up) logged inside the block."""
    handler, level = LogCapture(), log.level
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    try:
        yield handler.records
    finally:
        log.removeHandler(handler)
        log.setLevel(level)


def replay_logs(records: list[dict], worker: str) -> None:
    """Log an actor's records here, where the task run's context sends them to Prefect."""
    for r in records:
        if log.isEnabledFor(r["levelno"]):
            log.handle(
                logging.makeLogRecord(
                    {
                        "name": log.name,
                        "levelno": r["levelno"],
                        "levelname": logging.getLevelName(r["levelno"]),
                        "msg": "[%s] %s",
                        "args": (worker, r["message"]),
                        "created": r["created"],
                        "msecs": r["created"] % 1 * 1000,
                    }
                )
            )


class StageActor:
    """Runs stages in its own process, on the devices of its bundle. Its calls
    return (result, log records, this actor's name)."""

    def __init__(self):
        self.name = f"{socket.gethostname()}:{os.getpid()}"

    def run(self, stage, ctx, config, parents: dict) -> tuple:
        with captured_logs() as records:
            ref = stage.run(ctx, config, **parents)
        return ref, records, self.name

    def compute_shard(self, stage, ctx, config, key: str, index: int, units: list, parents: dict) -> tuple:
        with captured_logs() as records:
            receipt = stage.compute_shard(ctx, config, key, index, units, parents)
        return receipt, records, self.name

    def see_devices(self, devices: list[str]) -> None:
        """Make every GPU of the replica visible here (before CUDA starts), so a
        tensor-parallel engine on rank 0 spans them all."""
        os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(devices)

    def where(self) -> dict:
        context = ray.get_runtime_context()
        return {
            "pid": os.getpid(),
            "node_id": context.get_node_id(),
            "gpu_ids": [str(g) for g in ray.get_gpu_ids()],
            "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
        }


class Replica:
    """A placement group and one actor per bundle. Rank 0 runs stages and sees
    all of the replica's GPUs (a tensor-parallel engine spans them); the other
    ranks only hold their bundle's GPU for it and never start CUDA themselves."""

    def __init__(self, group, bundles: list[dict]):
        self.group = group
        self.bundles = bundles
        self.actors = [self._start(rank) for rank in range(len(bundles))]
        self._share_devices_with_rank_0()

    def _start(self, rank: int):
        bundle = self.bundles[rank]
        strategy = PlacementGroupSchedulingStrategy(placement_group=self.group, placement_group_bundle_index=rank)
        return (
            ray.remote(StageActor)
            .options(num_cpus=bundle["CPU"], num_gpus=bundle.get("GPU", 0), scheduling_strategy=strategy)
            .remote()
        )

    def restart(self, rank: int) -> None:
        self.actors[rank] = self._start(rank)
        if rank == 0:
            self._share_devices_with_rank_0()

    def _share_devices_with_rank_0(self) -> None:
        if len(self.actors) > 1:
            own = [where["gpu_ids"][0] for where in self.where()]
            ray.get(self.actors[0].see_devices.remote(own))

    def where(self) -> list[dict]:
        return ray.get([actor.where.remote() for actor in self.actors])

    def release(self) -> None:
        for actor in self.actors:
            ray.kill(actor)
        remove_placement_group(self.group)


class ActorPool:
    def __init__(
        self,
        address: str | None,
        replicas: int,
        gpus_per_replica: int,
        cpus_per_replica: float,
        spread: bool = True,
        placement_timeout_s: float = 60.0,
        shard_retries: int = 2,
    ):
        if not ray.is_initialized():
            ray.init(
                address=address,
                include_dashboard=False,
                log_to_driver=False,
                runtime_env={"env_vars": _forwarded_env()},
            )
        shape = ReplicaShape(replicas, gpus_per_replica, cpus_per_replica, spread, placement_timeout_s)
        self.replicas = [Replica(group, shape.bundles()) for group in reserve(shape)]
        self.shard_retries = shard_retries
        self.free: queue.Queue = queue.Queue()
        for replica in self.replicas:
            self.free.put(replica)

    def run(self, stage, ctx, config, parents: dict):
        """Run a whole stage on a free replica's rank 0; a dead actor is restarted
        in its bundle and the stage retried."""
        replica = self.free.get()
        try:
            for attempt in range(self.shard_retries + 1):
                try:
                    return _with_logs(ray.get(replica.actors[0].run.remote(stage, ctx, config, parents)))
                except ACTOR_LOST as e:
                    self._replace_dead_actor(replica, stage.name, e, attempt)
        finally:
            self.free.put(replica)

    def map_shards(
        self, stage, ctx, config, key: str, parents: dict, shards: dict[int, list], progress, finished
    ) -> int:
        """Compute ``shards`` (index -> units) on free replicas, as many at once as
        replicas are free; ``finished(receipt)`` as each lands. A shard whose actor
        dies is retried on the restarted actor. Returns the number of retries."""
        pending = sorted(shards)
        running: dict = {}  # object ref -> (shard index, replica)
        attempts = dict.fromkeys(shards, 0)
        try:
            while pending or running:
                while pending and (replica := self._borrow(wait=not running)):
                    index = pending.pop(0)
                    ref = replica.actors[0].compute_shard.remote(stage, ctx, config, key, index, shards[index], parents)
                    running[ref] = (index, replica)
                [ready], _ = ray.wait(list(running), num_returns=1)
                index, replica = running.pop(ready)
                try:
                    receipt = _with_logs(ray.get(ready))
                except ACTOR_LOST as e:
                    self._replace_dead_actor(replica, f"{stage.name} shard {index}", e, attempts[index])
                    attempts[index] += 1
                    pending.insert(0, index)
                    continue
                finally:
                    self.free.put(replica)
                progress(receipt["work"], shards=1)
                finished(receipt)
        finally:
            self._return_when_done(running)
        return sum(attempts.values())

    def _borrow(self, wait: bool):
        try:
            return self.free.get(block=wait)
        except queue.Empty:
            return None

    def _replace_dead_actor(self, replica: Replica, what: str, error: Exception, retries_so_far: int) -> None:
        """Restart a replica's dead rank 0 in its bundle, or give up after ``shard_retries``."""
        if retries_so_far >= self.shard_retries:
            raise RuntimeError(
                f"{what}: its actor died {retries_so_far + 1} times (ray.shard_retries="
                f"{self.shard_retries}); last: {error}"
            ) from error
        log.warning("%s: actor died (%s); restarting it and retrying", what, error)
        replica.restart(0)

    def _return_when_done(self, running: dict) -> None:
        """After a failed shard: let the shards still running finish, then give their replicas back."""
        for ref, (_, replica) in running.items():
            with suppress(Exception):  # the first failure is the one raised
                ray.get(ref)
            self.free.put(replica)

    def release(self) -> None:
        for replica in self.replicas:
            replica.release()


def _with_logs(returned: tuple):
    """An actor call's result, its log records replayed here."""
    result, records, worker = returned
    replay_logs(records, worker)
    return result


def _forwarded_env() -> dict:
    """Settings actors need to behave like the driver (quiet logs, no telemetry)."""
    names = ("ALIGNFLOW_HOME", "HF_HUB_OFFLINE", "TRANSFORMERS_VERBOSITY", "TOKENIZERS_PARALLELISM")
    return {n: os.environ[n] for n in names if n in os.environ}


def pool(settings: dict) -> ActorPool:
    """The process's pool for these settings (a RayConfig as a dict): stages of a
    flow run that share settings share actors."""
    key = tuple(sorted(settings.items()))
    with _lock:
        if key not in _pools:
            _pools[key] = ActorPool(**settings)
        return _pools[key]


def release_pools() -> None:
    """Give every pool's actors and GPUs back to the cluster."""
    with _lock:
        while _pools:
            _pools.popitem()[1].release()


def run_on_ray(stage, ctx, config, parents: dict):
    return pool(ctx.ray).run(stage, ctx, config, parents)
