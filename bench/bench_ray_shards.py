"""The sample stage on the Ray executor (shards over replicas) against the same
stage in-process (``executor: local``), in one run, on the same prompts, shards
and settings, each from a cold start: the local side loads its model inside the
stage; the Ray side starts its pool (actors, imports) and then loads the model
in every actor inside the stage. A second Ray pass on the warm pool shows what
a later stage of the same flow run pays.

    python bench/bench_ray_shards.py --prompts 24 --n 4 --max-new-tokens 64 --shard-size 6 --replicas 2
"""

from __future__ import annotations

import json
import os
import tempfile

import torch
from benchlib import sampling_parser, timed

from alignflow.config import RayConfig, SampleConfig, alignflow_home
from alignflow.storage.artifacts import ArtifactStore
from alignflow.tasks.base_model import base_model_ref
from alignflow.tasks.prompts import PROMPTS, prompt_source
from alignflow.tasks.sample import SAMPLE
from alignflow.tasks.stage import RunContext
from alignflow.workers.backend import release_backends


def sample_once(ctx: RunContext, config: SampleConfig, model: str) -> dict:
    """One cold sample stage into a fresh artifact root: its wall time and what it made."""
    inputs = {
        "policy": base_model_ref(model, ctx.model_cache),
        "prompts": PROMPTS.run(ctx, prompt_source("builtin:demo", None)),
    }
    ref, seconds = timed(lambda: SAMPLE.run(ctx, config, **inputs))
    metrics = ArtifactStore(ctx.artifact_root).manifest(ref.stage, ref.key)["metrics"]
    return {
        "wall_s": round(seconds, 2),
        "generated_tokens": metrics["generated_tokens"],
        "tokens_per_wall_s": round(metrics["generated_tokens"] / seconds, 1),
        "shards": metrics["shards"],
        "workers": len(metrics["worker"].split(",")),
        "content_hash": ref.content_hash[:12],
    }


def context(executor: str, ray: dict | None = None) -> RunContext:
    return RunContext(
        artifact_root=tempfile.mkdtemp(prefix=f"bench-{executor}-"),
        model_cache=str(alignflow_home() / "models"),
        executor=executor,
        ray=ray or {},
    )


def main() -> None:
    p = sampling_parser(__doc__.splitlines()[0])
    p.add_argument("--shard-size", type=int, default=6)
    p.add_argument("--replicas", type=int, default=2)
    p.add_argument("--cpus-per-replica", type=float, default=1.0)
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    args = p.parse_args()
    config = SampleConfig(
        n=args.n,
        temperature=0.8,
        top_p=0.95,
        max_new_tokens=args.max_new_tokens,
        max_prompts=args.prompts,
        dtype=args.dtype,
        batch_size=16,
        shard_size=args.shard_size,
    )
    local = sample_once(context("local"), config, args.model)
    release_backends()

    import ray

    from alignflow.workers.ray_pool import pool, release_pools

    settings = RayConfig(replicas=args.replicas, cpus_per_replica=args.cpus_per_replica).model_dump()
    _, pool_start_s = timed(lambda: pool(settings))  # starts a local Ray, as a flow with executor: ray does
    cold = sample_once(context("ray", settings), config, args.model)
    warm = sample_once(context("ray", settings), config, args.model)
    release_pools()
    ray.shutdown()
    print(
        json.dumps(
            {
                "driver_threads": torch.get_num_threads(),
                "cpus": os.cpu_count(),
                "replicas": args.replicas,
                "cpus_per_replica": args.cpus_per_replica,
                "local": local,
                "ray_pool_start_s": round(pool_start_s, 2),
                "ray_cold": cold,
                "ray_warm_pool": warm,
                "ratio_ray_cold_incl_pool_start": round(local["wall_s"] / (cold["wall_s"] + pool_start_s), 3),
                "ratio_ray_warm": round(local["wall_s"] / warm["wall_s"], 3),
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
