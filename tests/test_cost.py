"""Preprocessing cost records (pipeline/preprocess/cost.py): pure functions, no Ray."""
from __future__ import annotations

import json
import time

import pytest

from densevse.pipeline.console import summary_table
from densevse.pipeline.preprocess.cost import Clock, add_cost, summarize_costs


def test_add_cost_accumulates_per_step():
    c = add_cost("", "ingest", (0.5, 1.0))
    c = add_cost(c, "regions", (2.0, 2.5))
    c = add_cost(c, "regions", (1.0, 0.5))
    assert json.loads(c) == {"ingest": [0.5, 1.0], "regions": [3.0, 3.0]}


def test_clock_counts_cpu_not_sleep():
    t = Clock()
    time.sleep(0.2)
    cpu, wall = t.lap()
    assert wall >= 0.2 and cpu < 0.1
    x = 0
    while time.process_time() - t.cpu < 0.1:
        x += 1
    cpu, _ = t.lap()
    assert cpu >= 0.1


def test_summarize_costs_per_image_and_efficiency():
    costs = [{"ingest": [1.0, 2.0], "regions": [4.0, 5.0]}, {"ingest": [1.0, 2.0], "regions": [6.0, 7.0]}]
    s = summarize_costs(costs, n_images=100, run_s=10.0, cores=2)
    assert s["cpu_s"] == {"ingest": 2.0, "regions": 10.0} and s["cpu_s_total"] == 12.0
    assert s["cpu_s_per_image"] == {"ingest": 0.02, "regions": 0.1}
    assert s["efficiency"] == pytest.approx(0.6)
    assert summarize_costs([], 0, 0.0, 2)["efficiency"] is None


def test_summary_table_shows_the_cost_line():
    cost = summarize_costs([{"ingest": [3.0, 4.0], "regions": [30.0, 31.0]}], 100, 20.0, 2) | {"ray_start_s": 4.2}
    t = summary_table({"preprocess": {"seconds": 30, "cost": cost}})
    assert "preprocess CPU ms/image  ingest 30  regions 300  (efficiency 82 % of 2 cores; Ray start 4.2 s)" in t


def test_training_workers_share_the_cluster_cpus():
    from densevse.pipeline.raylocal import cpus_per_worker

    assert cpus_per_worker(None, 1, [(2.0, 1e4)]) == 2  # one worker on this 2-core machine: both cores
    assert cpus_per_worker(None, 2, [(2.0, 1e4)]) == 1
    assert cpus_per_worker(None, 1, [(0.0, 1e4), (4.0, 1e4), (2.0, 1e4)]) == 4  # at most one node's
    assert cpus_per_worker(None, 4, [(1.0, 1e4)]) == 1 and cpus_per_worker(3, 1, [(2.0, 1e4)]) == 3
