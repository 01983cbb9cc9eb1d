"""Distributed training processes: ``world_size`` ranks as Ray actors packed on one
node (a placement group), each with torch.distributed set up (nccl on CUDA, gloo on
CPU) before it runs the job; the caller gets rank 0's result.

The ranks run on the caller's node: rank 0 writes the trained model to local disk
for the caller to commit. On GPU nodes each rank holds one GPU and sees all the
job's GPUs (NCCL's peer-to-peer paths need that), its own as cuda:LOCAL_RANK; CPU
ranks take a fraction of a core each, so they fit beside the stage actor that
launched them.
"""

from __future__ import annotations

import os
import socket

CPUS_PER_RANK = 0.5
PLACEMENT_TIMEOUT_S = 120
FORWARDED_ENV = (
    "ALIGNFLOW_HOME",
    "HF_HUB_OFFLINE",
    "TRANSFORMERS_VERBOSITY",
    "TOKENIZERS_PARALLELISM",
    "TORCH_EXTENSIONS_DIR",
)


class Rank:
    """One rank's process."""

    def where(self) -> dict:
        import ray

        return {
            "ip": ray.util.get_node_ip_address(),
            "node": ray.get_runtime_context().get_node_id(),
            "gpus": [str(g) for g in ray.get_gpu_ids()],
        }

    def free_port(self) -> int:
        with socket.socket() as s:
            s.bind(("", 0))
            return s.getsockname()[1]

    def run(self, env: dict, boxed_job: list):
        """Join the process group, then run the job. The job comes as an ObjectRef in a list,
        which Ray leaves unresolved: unpickling it imports torch, which must see the new
        CUDA_VISIBLE_DEVICES."""
        import ray

        os.environ.update(env)
        job = ray.get(boxed_job[0])
        import torch
        import torch.distributed as dist

        cuda = torch.cuda.is_available()
        if cuda:
            torch.cuda.set_device(int(env["LOCAL_RANK"]))
            # the objectives build their tensors without a device: on a GPU rank they belong on its GPU
            torch.set_default_device(f"cuda:{env['LOCAL_RANK']}")
        # Left open on purpose: the caller kills every rank once the job is over, and a failed
        # rank's open connections keep its peers waiting rather than failing on a reset
        # connection, so the first error to reach the caller is the cause.
        dist.init_process_group("nccl" if cuda else "gloo")
        return job()


def rank_envs(master_addr: str, master_port: int, gpu_ids: list[str], world_size: int) -> list[dict]:
    """torch.distributed's environment of each rank, all on one node (LOCAL_RANK = RANK).
    ``gpu_ids``: the GPU Ray gave each rank, in rank order; every rank sees them in that
    order, so rank i's own GPU is cuda:i. Without them the ranks see no GPU at all (Ray
    leaves CPU actors the node's), so they run on CPU whatever the node has."""
    return [
        {
            "MASTER_ADDR": master_addr,
            "MASTER_PORT": str(master_port),
            "RANK": str(rank),
            "WORLD_SIZE": str(world_size),
            "LOCAL_RANK": str(rank),
            "CUDA_VISIBLE_DEVICES": ",".join(gpu_ids),
        }
        for rank in range(world_size)
    ]


def run_distributed(job, world_size: int, address: str | None = None):
    """``job()`` on ``world_size`` ranks; rank 0's result. A rank's error fails the job at once."""
    try:
        import ray
    except ImportError:
        raise ImportError("distributed training runs its ranks as Ray actors: pip install 'alignflow[ray]'") from None
    from ray.util.placement_group import placement_group, remove_placement_group

    if not ray.is_initialized():
        ray.init(address=address, include_dashboard=False, log_to_driver=False)
    bundle = {"CPU": CPUS_PER_RANK, **({"GPU": 1} if ray.cluster_resources().get("GPU", 0) else {})}
    here = ray.get_runtime_context().get_node_id()
    group = placement_group([bundle] * world_size, strategy="STRICT_PACK", _soft_target_node_id=here)
    ranks = []
    try:
        _wait_placed(group, world_size, bundle)
        ranks = _start_ranks(group, world_size, bundle)
        where = ray.get([r.where.remote() for r in ranks])
        if any(w["node"] != here for w in where):
            raise RuntimeError(
                f"the {world_size} ranks did not fit on this node ({here}), where rank 0 must write "
                f"the trained model: free {world_size} x {bundle} here"
            )
        port = ray.get(ranks[0].free_port.remote())
        envs = rank_envs(where[0]["ip"], port, [w["gpus"][0] for w in where if w["gpus"]], world_size)
        job_ref = ray.put(job)
        runs = [r.run.remote(env, [job_ref]) for r, env in zip(ranks, envs)]
        _wait_all(runs)
        return ray.get(runs[0])
    finally:
        for r in ranks:
            ray.kill(r)
        remove_placement_group(group)


def _wait_placed(group, world_size: int, bundle: dict) -> None:
    import ray
    from ray.exceptions import GetTimeoutError

    try:
        ray.get(group.ready(), timeout=PLACEMENT_TIMEOUT_S)
    except GetTimeoutError:
        raise RuntimeError(
            f"no node had room for {world_size} ranks of {bundle} within {PLACEMENT_TIMEOUT_S} s "
            f"(cluster: {ray.available_resources()} free)"
        ) from None


def _start_ranks(group, world_size: int, bundle: dict) -> list:
    import ray
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    env = {name: os.environ[name] for name in FORWARDED_ENV if name in os.environ}
    return [
        ray.remote(Rank)
        .options(
            num_cpus=bundle["CPU"],
            num_gpus=bundle.get("GPU", 0),
            runtime_env={"env_vars": env},
            scheduling_strategy=PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=i),
        )
        .remote()
        for i in range(world_size)
    ]


def _wait_all(runs: list) -> None:
    """Until every rank is done; a rank's error is raised at once (the others would wait for it in a collective)."""
    import ray

    pending = runs
    while pending:
        done, pending = ray.wait(pending, num_returns=1)
        ray.get(done)
