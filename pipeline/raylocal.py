"""Connecting to Ray, the same way for preprocessing and training."""
from __future__ import annotations

import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


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
                 runtime_env={"env_vars": {"PYTHONPATH": str(REPO)},
                              "worker_process_setup_hook": "pipeline.raylocal.quiet_ray_loggers"})
    return ray


# Ray Train's detached PlacementGroupCleaner warns on every state-API timeout (hundreds of lines on a loaded box)
# while it only keeps monitoring: not news for the person running the job.
NOISY_RAY_LOGGERS = ("ray.train.v2._internal.execution.controller.placement_group_cleaner",)


def quiet_ray_loggers() -> None:
    """Ray's worker_process_setup_hook: run in every worker process of a local Ray (the cleaner is an actor)."""
    import logging

    for name in NOISY_RAY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
