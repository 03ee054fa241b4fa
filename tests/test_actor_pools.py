"""Actor pool sizing (pipeline.preprocess.actor_pool_sizes): model-stage actors must always leave some node
with room for a task, on one node and on several, or preprocessing hangs with every task unschedulable."""
from __future__ import annotations

import pytest

from pipeline.config import StageConfig
from pipeline.preprocess.run import actor_pool_sizes


def _stages(model_cpus: float = 1.0, concurrency: int | None = None, detector: bool = False) -> dict:
    regions = StageConfig(impl="detectron2", num_cpus=model_cpus) if detector else StageConfig(impl="gold_boxes")
    return {"ingest": StageConfig(impl="image_caption"), "regions": regions,
            "features": StageConfig(impl="efficientnet_lite0", num_cpus=model_cpus, concurrency=concurrency),
            "parse": StageConfig(impl="gold_trees")}


def test_one_node_leaves_a_task_cpu():
    assert actor_pool_sizes(_stages(), 2.0) == {"features": 1}
    assert actor_pool_sizes(_stages(), [9.0]) == {"features": 8}
    assert actor_pool_sizes(_stages(0.3), [2.0]) == {"features": 3}  # 0.9 CPU of actors, 1.1 left for tasks
    with pytest.raises(ValueError, match="stages.features"):
        actor_pool_sizes(_stages(), 1.0)


def test_several_nodes_count_fragments_not_totals():
    """Head with 0 CPUs + two 1-CPU workers: one 0.3-CPU actor on each worker would leave 0.7 CPU per node and
    no room for a 1-CPU task although the cluster has 1.4 CPUs free; only one actor is safe."""
    assert actor_pool_sizes(_stages(0.3), [0.0, 1.0, 1.0]) == {"features": 1}
    assert actor_pool_sizes(_stages(0.3, concurrency=3), [0.0, 1.0, 1.0]) == {"features": 1}  # capped, logged
    with pytest.raises(ValueError, match="stages.regions"):  # two model stages need two actors: none is safe
        actor_pool_sizes(_stages(0.3, detector=True), [0.0, 1.0, 1.0])
    # two 4-CPU nodes: 10 actors fill one node to 3.0 CPU (1.0 left), 11 block it; 21 can never block both
    assert actor_pool_sizes(_stages(0.3, detector=True), [4.0, 4.0]) == {"regions": 10, "features": 10}
    assert actor_pool_sizes(_stages(0.3, concurrency=2, detector=True), [4.0, 4.0]) == {"regions": 10, "features": 2}
