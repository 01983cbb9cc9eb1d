"""The Ray executor: stages run on a pool of long-lived actors.

Each actor imports the project once and runs whole stages (read parents from
the artifact store, compute, commit), so only small ``ArtifactRef``s cross
the wire. Prefect tasks submitted concurrently each borrow a free actor; an
actor that dies takes its stage to another, freshly started actor.
"""
from __future__ import annotations

import logging
import os
import queue
import threading

log = logging.getLogger("alignflow")

_pools: dict[tuple, "ActorPool"] = {}
_lock = threading.Lock()


class StageActor:
    """Runs stages in its own process; pinned to GPUs when the pool asks for them."""

    def run(self, stage, ctx, config, parents: dict):
        return stage.run(ctx, config, **parents)

    def where(self) -> dict:
        return {"pid": os.getpid(), "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES")}


class ActorPool:
    def __init__(self, address: str | None, actors: int, num_cpus: float, num_gpus: float):
        import ray

        if not ray.is_initialized():
            ray.init(address=address, include_dashboard=False, log_to_driver=False,
                     runtime_env={"env_vars": _forwarded_env()})
        self.options = {"num_cpus": num_cpus, "num_gpus": num_gpus}
        self.free: queue.Queue = queue.Queue()
        for _ in range(actors):
            self.free.put(self._start())

    def _start(self):
        import ray

        return ray.remote(StageActor).options(**self.options).remote()

    def run(self, stage, ctx, config, parents: dict, attempts: int = 2):
        """Run a stage on a free actor; a dead actor is replaced and the stage retried."""
        import ray
        from ray.exceptions import ActorDiedError, ActorUnavailableError

        for attempt in range(1, attempts + 1):
            actor = self.free.get()
            try:
                result = ray.get(actor.run.remote(stage, ctx, config, parents))
            except (ActorDiedError, ActorUnavailableError) as e:
                log.warning("%s: actor died (%s); starting a new one", stage.name, e)
                actor = self._start()
                if attempt == attempts:
                    raise
                continue
            finally:
                self.free.put(actor)
            return result


def _forwarded_env() -> dict:
    """Settings actors need to behave like the driver (quiet logs, no telemetry)."""
    names = ("ALIGNFLOW_HOME", "HF_HUB_OFFLINE", "TRANSFORMERS_VERBOSITY", "TOKENIZERS_PARALLELISM")
    return {n: os.environ[n] for n in names if n in os.environ}


def pool(settings: dict) -> ActorPool:
    """The process's pool for these settings (address, actors, num_cpus, num_gpus)."""
    key = tuple(sorted(settings.items()))
    with _lock:
        if key not in _pools:
            _pools[key] = ActorPool(**settings)
        return _pools[key]


def run_on_ray(stage, ctx, config, parents: dict):
    return pool(ctx.ray).run(stage, ctx, config, parents)
