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
    # two 4-CPU nodes: 10 actors fill one node to 3.0 CPU (1.0 left), 11 block it; 21 can never block both, but
    # after the loss of one node Ray restarts its actors on the other: at most 10 survive that, shared evenly.
    # A stage's own concurrency leaves the rest to the others.
    assert actor_pool_sizes(_stages(0.3, detector=True), [4.0, 4.0]) == {"regions": 5, "features": 5}
    assert actor_pool_sizes(_stages(0.3, concurrency=2, detector=True), [4.0, 4.0]) == {"regions": 8, "features": 2}
    assert actor_pool_sizes(_stages(0.3, concurrency=30, detector=True), [4.0, 4.0]) == {"regions": 1,
                                                                                          "features": 9}
    # a single node loses nothing: the old bound, 23 actors of 0.3 CPU leave one 8-CPU node 1.1 CPU for a task
    assert sum(actor_pool_sizes(_stages(0.3, detector=True), [8.0]).values()) == 23


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


def test_pools_survive_the_loss_of_a_node():
    """Two 2-CPU workers, three 0.3-CPU model stages asking for 2 actors each, tasks of 0.5 CPU: six actors fit
    the two nodes, but after one is lost Ray restarts its actors on the other, where six block the tasks forever
    (seen on the 3-node Flickr8k run). The pools are capped to what one node holds with a task's room."""
    from densevse.pipeline.config import StageConfig

    stages = {"ingest": StageConfig(impl="image_caption", num_cpus=0.5),
              "regions": StageConfig(impl="gold_boxes", num_cpus=0.3),
              "features": StageConfig(impl="efficientnet_lite0", num_cpus=0.3, concurrency=2),
              "parse": StageConfig(impl="stanza", num_cpus=0.3, concurrency=2)}
    sizes = actor_pool_sizes(stages, [(0.0, 8000), (2.0, 8000), (2.0, 8000)])
    assert sum(sizes.values()) * 0.3 <= 2.0 - 0.5  # all of them on one surviving node still leave a task its CPU
    assert sizes == {"features": 2, "parse": 2}
    one_node = actor_pool_sizes(stages, [(4.0, 8000)])  # a single node: nothing to lose, the old bound
    assert one_node == {"features": 2, "parse": 2}
