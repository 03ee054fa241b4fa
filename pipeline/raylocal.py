"""Connecting to Ray, the same way for preprocessing and training."""
from __future__ import annotations

import os


def init_ray(cfg):
    """ray.address null means a fresh local instance ("local"): a bare ray.init() would join whatever cluster was
    last started on this machine (/tmp/ray/ray_current_cluster), e.g. another user's, with its CPUs and lifetime."""
    import ray

    if ray.is_initialized():
        return ray
    if cfg.ray.address:
        ray.init(address=cfg.ray.address)
    else:
        n = max(cfg.ray.num_cpus or os.cpu_count() or 1, cfg.train.num_workers)
        ray.init(address="local", num_cpus=n, include_dashboard=False, log_to_driver=True,
                 runtime_env={"worker_process_setup_hook": "densevse.pipeline.raylocal.quiet_ray_loggers"})
    return ray


def node_resources() -> list[tuple[float, float]]:
    """(CPUs, logical memory MiB) of each alive node of the connected Ray cluster."""
    import ray

    return [(n["Resources"].get("CPU", 0.0), n["Resources"].get("memory", 0.0) / 2**20)
            for n in ray.nodes() if n["Alive"]]


def cpus_per_worker(asked: int | None, num_workers: int, nodes: list[tuple[float, float]]) -> int:
    """CPUs for each of `num_workers` training workers (pure): `asked`, or the cluster's CPUs shared among them,
    at most the largest node's (a worker runs on one node), at least 1."""
    if asked:
        return asked
    cpus = [c for c, _ in nodes] or [1.0]
    return max(1, int(min(sum(cpus) / num_workers, max(cpus))))


# Ray Train's detached PlacementGroupCleaner warns on every state-API timeout (hundreds of lines on a loaded box)
# while it only keeps monitoring: not news for the person running the job.
NOISY_RAY_LOGGERS = ("ray.train.v2._internal.execution.controller.placement_group_cleaner",)


def quiet_ray_loggers() -> None:
    """Ray's worker_process_setup_hook: run in every worker process of a local Ray (the cleaner is an actor)."""
    import logging

    for name in NOISY_RAY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
