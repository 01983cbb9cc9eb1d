"""The Ray executor: stages run on a pool of long-lived actors.

The pool holds ``replicas``; each is a placement group (workers/placement.py)
with one actor per bundle, so a replica of g GPUs is g actors on one node, each
seeing its own device. A replica's first actor (rank 0) runs whole stages: it
imports the project once, reads parents from the artifact store, computes and
commits, so only small ``ArtifactRef``s cross the wire. Prefect tasks submitted
concurrently each borrow a free replica; an actor that dies is restarted in its
bundle and its stage retried there.
"""
from __future__ import annotations

import logging
import os
import queue
import threading

from workers.placement import ReplicaShape, reserve

log = logging.getLogger("alignflow")

_pools: dict[tuple, "ActorPool"] = {}
_lock = threading.Lock()


class StageActor:
    """Runs stages in its own process, on the devices of its bundle."""

    def run(self, stage, ctx, config, parents: dict):
        return stage.run(ctx, config, **parents)

    def where(self) -> dict:
        import ray

        context = ray.get_runtime_context()
        return {"pid": os.getpid(), "node_id": context.get_node_id(),
                "gpu_ids": [str(g) for g in ray.get_gpu_ids()],
                "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES")}


class Replica:
    """A placement group and one actor per bundle; rank 0 runs stages."""

    def __init__(self, group, bundles: list[dict]):
        self.group = group
        self.bundles = bundles
        self.actors = [self._start(rank) for rank in range(len(bundles))]

    def _start(self, rank: int):
        import ray
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        bundle = self.bundles[rank]
        strategy = PlacementGroupSchedulingStrategy(placement_group=self.group, placement_group_bundle_index=rank)
        return ray.remote(StageActor).options(num_cpus=bundle["CPU"], num_gpus=bundle.get("GPU", 0),
                                              scheduling_strategy=strategy).remote()

    def restart(self, rank: int) -> None:
        self.actors[rank] = self._start(rank)

    def where(self) -> list[dict]:
        import ray

        return ray.get([actor.where.remote() for actor in self.actors])

    def release(self) -> None:
        import ray
        from ray.util.placement_group import remove_placement_group

        for actor in self.actors:
            ray.kill(actor)
        remove_placement_group(self.group)


class ActorPool:
    def __init__(self, address: str | None, replicas: int, gpus_per_replica: int, cpus_per_replica: float,
                 spread: bool = True, placement_timeout_s: float = 60.0):
        import ray

        if not ray.is_initialized():
            ray.init(address=address, include_dashboard=False, log_to_driver=False,
                     runtime_env={"env_vars": _forwarded_env()})
        shape = ReplicaShape(replicas, gpus_per_replica, cpus_per_replica, spread, placement_timeout_s)
        self.replicas = [Replica(group, shape.bundles()) for group in reserve(shape)]
        self.free: queue.Queue = queue.Queue()
        for replica in self.replicas:
            self.free.put(replica)

    def run(self, stage, ctx, config, parents: dict, attempts: int = 2):
        """Run a stage on a free replica's rank 0; a dead actor is restarted in
        its bundle and the stage retried."""
        import ray
        from ray.exceptions import ActorDiedError, ActorUnavailableError

        replica = self.free.get()
        try:
            for attempt in range(1, attempts + 1):
                try:
                    return ray.get(replica.actors[0].run.remote(stage, ctx, config, parents))
                except (ActorDiedError, ActorUnavailableError) as e:
                    log.warning("%s: actor died (%s); restarting it", stage.name, e)
                    replica.restart(0)
                    if attempt == attempts:
                        raise
        finally:
            self.free.put(replica)

    def release(self) -> None:
        for replica in self.replicas:
            replica.release()


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
