"""Actor pool sizing (pipeline.preprocess.actor_pool_sizes): model-stage actors must always leave some node
with room for a task, on one node and on several, or preprocessing hangs with every task unschedulable."""
from __future__ import annotations

import pytest

from densevse.pipeline.config import StageConfig
from densevse.pipeline.preprocess.run import actor_pool_sizes


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
    # two 4-CPU nodes: 10 actors fill one node to 3.0 CPU (1.0 left), 11 block it; 21 can never block both.
    # The odd one goes to the earlier stage; a stage's own concurrency leaves the rest to the others.
    assert actor_pool_sizes(_stages(0.3, detector=True), [4.0, 4.0]) == {"regions": 11, "features": 10}
    assert actor_pool_sizes(_stages(0.3, concurrency=2, detector=True), [4.0, 4.0]) == {"regions": 19, "features": 2}
    assert actor_pool_sizes(_stages(0.3, concurrency=30, detector=True), [4.0, 4.0]) == {"regions": 1,
                                                                                          "features": 20}


def test_the_default_two_cpu_machine_gets_two_detector_actors():
    """Detector + parser actors of 0.3 CPU and 1-CPU ingest tasks on 2 CPUs: 3 actors are safe, the spare
    one goes to the detector (regions), the costliest stage."""
    st = {"ingest": StageConfig(impl="image_caption"),
          "regions": StageConfig(impl="detectron2_features", num_cpus=0.3),
          "features": StageConfig(impl="from_regions"), "parse": StageConfig(impl="stanza", num_cpus=0.3)}
    assert actor_pool_sizes(st, [2.0]) == {"regions": 2, "parse": 1}


def test_memory_requests_bound_the_pools():
    """Actors that ask for memory Ray cannot give would never start (the run would wait forever): the pools fit
    the nodes' logical memory, and a stage that cannot get one actor is a clear error naming memory_mb."""
    st = {"ingest": StageConfig(impl="image_caption"),
          "regions": StageConfig(impl="detectron2_features", num_cpus=0.3, memory_mb=2048),
          "features": StageConfig(impl="from_regions"),
          "parse": StageConfig(impl="stanza", num_cpus=0.3, memory_mb=1024)}
    assert actor_pool_sizes(st, [(2.0, 16384.0)]) == {"regions": 2, "parse": 1}  # CPUs bound it
    assert actor_pool_sizes(st, [(2.0, 4096.0)]) == {"regions": 1, "parse": 1}  # two 2-GiB actors fit
    with pytest.raises(ValueError, match=r"stages.regions: .*2048 MiB.*memory_mb"):
        actor_pool_sizes(st, [(2.0, 3000.0)])
