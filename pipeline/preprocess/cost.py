"""What preprocessing costs, per stage: CPU and wall seconds measured where the work runs, carried with each
shard (a JSON column beside its rows), stored in the shard's stats and summed in the run summary.

CPU seconds per image say which stage to make cheaper; efficiency (all stages' CPU seconds / (wall seconds x
cores)) says how much of the machine the run kept busy: what Ray start-up, scheduling gaps and idle actors cost.
"""
from __future__ import annotations

import json
import time


class Clock:
    """CPU seconds (this process, every thread: torch's included) and wall seconds since the last lap. A stage
    call holds its actor or task process alone, so the process's CPU delta is that call's own."""

    def __init__(self):
        self.cpu, self.wall = time.process_time(), time.perf_counter()

    def lap(self) -> tuple[float, float]:
        cpu, wall = time.process_time(), time.perf_counter()
        out = (cpu - self.cpu, wall - self.wall)
        self.cpu, self.wall = cpu, wall
        return out


def add_cost(cost: str, step: str, lap: tuple[float, float]) -> str:
    """A shard's cost record (JSON {step: [cpu_s, wall_s]}) with `lap` added to `step` (pure)."""
    out = json.loads(cost) if cost else {}
    cpu, wall = out.get(step, (0.0, 0.0))
    out[step] = [round(cpu + lap[0], 4), round(wall + lap[1], 4)]
    return json.dumps(out)


def summarize_costs(costs: list[dict], n_images: int, run_s: float, cores: float) -> dict:
    """Per step CPU seconds (total and per image) and the run's efficiency, from the written shards' cost
    records (pure). `run_s`: wall seconds of the shard work (start-up excluded); `cores`: the cluster's CPUs."""
    cpu: dict[str, float] = {}
    for c in costs:
        for step, (s, _wall) in c.items():
            cpu[step] = cpu.get(step, 0.0) + s
    total = sum(cpu.values())
    return {"cpu_s": {k: round(v, 1) for k, v in cpu.items()},
            "cpu_s_per_image": {k: round(v / max(1, n_images), 4) for k, v in cpu.items()},
            "cpu_s_total": round(total, 1), "run_s": round(run_s, 1), "cores": cores,
            "efficiency": round(total / (run_s * cores), 3) if run_s > 0 and cores else None}
