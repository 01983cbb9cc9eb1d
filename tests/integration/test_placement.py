"""Placement on a simulated cluster of two 8-GPU nodes (logical GPUs, as Ray
schedules them on real ones): replicas are placement groups packed on one node,
spread over nodes, each actor sees its own device, and an impossible request
fails with one clear line."""

from __future__ import annotations

import os
import sys
import time

import pyarrow as pa
import pytest

ray = pytest.importorskip("ray")

from alignflow.storage.artifacts import ArtifactStore  # noqa: E402
from alignflow.tasks.stage import RunContext, Stage, StageOutput  # noqa: E402
from alignflow.workers.placement import PlacementError, available_gpus  # noqa: E402
from alignflow.workers.ray_pool import ActorPool, pool, release_pools  # noqa: E402


@pytest.fixture(scope="module")
def two_gpu_nodes():
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "num_gpus": 8})
    cluster.add_node(num_cpus=1, num_gpus=8)
    ray.init(address=cluster.address, log_to_driver=False)
    cluster.wait_for_nodes()
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # actors cannot import this test module
    yield cluster
    release_pools()
    ray.shutdown()
    cluster.shutdown()


def wait_for_free_gpus(count: int, timeout_s: float = 30) -> bool:
    """Ray frees a removed group's GPUs asynchronously."""
    deadline = time.monotonic() + timeout_s
    while sum(available_gpus().values()) < count and time.monotonic() < deadline:
        time.sleep(0.2)
    return sum(available_gpus().values()) == count


@pytest.fixture(autouse=True)
def all_gpus_free(two_gpu_nodes):
    """Each test starts on an idle cluster."""
    assert wait_for_free_gpus(16)


def test_a_tensor_parallel_group_of_four_lands_on_one_node_with_four_devices(two_gpu_nodes):
    group = ActorPool(address=None, replicas=1, gpus_per_replica=4, cpus_per_replica=0.4)
    try:
        ranks = group.replicas[0].where()
    finally:
        group.release()
    assert len({r["node_id"] for r in ranks}) == 1
    assert [len(r["gpu_ids"]) for r in ranks] == [1, 1, 1, 1]
    own = [r["gpu_ids"][0] for r in ranks]
    assert len(set(own)) == 4  # Ray's assignment: four distinct devices, none shared with another replica
    assert [r["cuda_visible_devices"] for r in ranks[1:]] == own[1:]
    assert ranks[0]["cuda_visible_devices"] == ",".join(own)  # rank 0's engine spans the replica's four


def test_two_replicas_of_eight_land_on_different_nodes(two_gpu_nodes):
    group = ActorPool(address=None, replicas=2, gpus_per_replica=8, cpus_per_replica=0.8)
    try:
        replicas = [replica.where() for replica in group.replicas]
    finally:
        group.release()
    nodes = [{r["node_id"] for r in ranks} for ranks in replicas]
    assert all(len(n) == 1 for n in nodes) and nodes[0] != nodes[1]
    assert all(len({r["gpu_ids"][0] for r in ranks}) == 8 for ranks in replicas)


def test_replicas_that_fit_on_one_node_are_still_spread_over_nodes(two_gpu_nodes):
    group = ActorPool(address=None, replicas=2, gpus_per_replica=2, cpus_per_replica=0.2)
    try:
        nodes = [replica.where()[0]["node_id"] for replica in group.replicas]
    finally:
        group.release()
    assert nodes[0] != nodes[1]


def test_more_gpus_than_the_cluster_has_fails_with_one_clear_line(two_gpu_nodes):
    with pytest.raises(PlacementError) as failure:
        ActorPool(address=None, replicas=3, gpus_per_replica=8, cpus_per_replica=0.8, placement_timeout_s=3)
    message = str(failure.value)
    assert "\n" not in message
    assert "3 replica(s) x 8 GPUs on one node" in message
    assert "2 node(s): 8 GPUs (8 free), 8 GPUs (8 free)" in message
    assert wait_for_free_gpus(16)  # the two groups that did fit were given back


def _pid_table(ctx, config, key) -> StageOutput:
    return StageOutput(tables=[pa.table({"pid": [os.getpid()]})])


def test_the_pool_reuses_its_actors_across_stages(two_gpu_nodes, tmp_path):
    settings = {
        "address": None,
        "replicas": 1,
        "gpus_per_replica": 1,
        "cpus_per_replica": 0.2,
        "spread": True,
        "placement_timeout_s": 30.0,
    }
    ctx = RunContext(
        artifact_root=str(tmp_path / "artifacts"), model_cache=str(tmp_path / "models"), executor="ray", ray=settings
    )
    config = RunContext(artifact_root="-", model_cache="-")  # any pydantic model serves as a stage config
    first, second = (Stage(name, _pid_table, "alignflow.tasks.stage") for name in ("first", "second"))
    refs = [pool(settings).run(stage, ctx, config, {}) for stage in (first, second)]
    store = ArtifactStore(ctx.artifact_root)
    pids = [store.read_rows(ref)[0]["pid"] for ref in refs]
    assert pids[0] == pids[1] != os.getpid()
    assert pool(settings) is pool(settings)
