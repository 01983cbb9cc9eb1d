"""Where a pool's replicas go: one placement group per replica, its GPUs as
bundles packed on one node (STRICT_PACK), replicas spread over nodes.

Ray decides which devices each actor sees (CUDA_VISIBLE_DEVICES) from the
bundle it is scheduled into, so two actors never share a GPU. A request the
cluster cannot place fails after a timeout with one line naming what was asked
and what the cluster has, rather than waiting forever.
"""

from __future__ import annotations

from dataclasses import dataclass


class PlacementError(RuntimeError):
    pass


@dataclass(frozen=True)
class ReplicaShape:
    replicas: int
    gpus_per_replica: int  # 0: CPU-only actors (one bundle per replica)
    cpus_per_replica: float
    spread: bool = True  # replicas on different nodes where they fit; False lets Ray pack them
    timeout_s: float = 60.0

    def bundles(self) -> list[dict]:
        """One bundle per GPU of a replica (each a rank), or one CPU bundle."""
        if self.gpus_per_replica == 0:
            return [{"CPU": self.cpus_per_replica}]
        cpus = self.cpus_per_replica / self.gpus_per_replica
        return [{"GPU": 1, "CPU": cpus} for _ in range(self.gpus_per_replica)]

    def describe(self) -> str:
        per = f"{self.gpus_per_replica} GPUs on one node" if self.gpus_per_replica else "CPU only"
        return f"{self.replicas} replica(s) x {per} ({self.cpus_per_replica:g} CPUs each)"


def reserve(shape: ReplicaShape) -> list:
    """One ready placement group per replica; all or none."""
    from ray.util.placement_group import placement_group, remove_placement_group

    had = cluster_summary()  # before our own groups hold any of it
    targets = spread_targets(shape) if shape.spread else [None] * shape.replicas
    groups = [placement_group(shape.bundles(), strategy="STRICT_PACK", _soft_target_node_id=node) for node in targets]
    if all(group.wait(timeout_seconds=shape.timeout_s) for group in groups):
        return groups
    for group in groups:
        remove_placement_group(group)
    raise PlacementError(
        f"could not place {shape.describe()} within {shape.timeout_s:g}s; when asked, the cluster had {had}"
    )


def spread_targets(shape: ReplicaShape) -> list[str | None]:
    """A node for each replica, round-robin over the nodes with room for one, so
    replicas land on different nodes while there are nodes left. None when no node
    has room (the wait then fails with the clear message)."""
    need = max(shape.gpus_per_replica, 0)
    free = {node: gpus for node, gpus in available_gpus().items() if gpus >= need}
    targets: list[str | None] = []
    for _ in range(shape.replicas):
        fits = [node for node, gpus in free.items() if gpus >= need]
        if not fits:
            targets.append(None)
            continue
        node = max(fits, key=lambda n: (free[n], n))  # the emptiest node next
        free[node] -= need if need else 0.5  # CPU-only replicas: still rotate over nodes
        targets.append(node)
    return targets


def available_gpus() -> dict[str, float]:
    """Free GPUs of each alive node, by node id."""
    import ray

    available = ray._private.state.available_resources_per_node()
    return {node["NodeID"]: available.get(node["NodeID"], {}).get("GPU", 0.0) for node in ray.nodes() if node["Alive"]}


def cluster_summary() -> str:
    import ray

    nodes = [n for n in ray.nodes() if n["Alive"]]
    free = available_gpus()
    parts = [f"{n['Resources'].get('GPU', 0):g} GPUs ({free.get(n['NodeID'], 0):g} free)" for n in nodes]
    return f"{len(nodes)} node(s): " + ", ".join(parts)
