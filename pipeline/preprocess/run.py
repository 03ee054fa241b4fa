"""Preprocessing on Ray Data: plan -> prepare stage models -> ingest -> regions -> features -> parse -> shards.

The plan (plan.py: which sample goes to which shard) is fixed up front from the dataset, sorted by key, so a
re-run finds the same shards, skips the finished ones and redoes the rest whole: no sample is lost or written twice.
It is Parquet under <shard_dir>/plan/, one row group per shard; the workers read their shard's row group and build
its rows, so the driver holds per-shard counts and digests only, never the samples.
The unit of work is a shard (as in img2dataset): each Ray Data row carries one shard's samples, every stage
maps shard -> shard (model stages as actor pools, the others as tasks) and the last step writes the tar inside
the cluster. No shuffle is needed, and a failed task redoes exactly one shard.
"""
from __future__ import annotations

import gc
import json
import logging
import math
import os
import pickle
import signal
import sys
import tempfile
import time

from densevse.pipeline import shardset, storage
from densevse.pipeline.config import PipelineConfig, StageConfig
from densevse.pipeline.console import emit
from densevse.pipeline import ship
from densevse.pipeline.preprocess.cost import Clock, add_cost, summarize_costs
from densevse.pipeline.preprocess.lock import ShardDirLock
from densevse.pipeline.preprocess.plan import check_resume, plan, plan_dir, read_shard, retry_shards, shard_rows
from densevse.pipeline.preprocess.prepare import prepare_stage_models
from densevse.pipeline.raylocal import init_ray, node_resources
from densevse.stages.base import STEPS, check_shard_rejections, is_transient

log = logging.getLogger("densevse.preprocess")
STAGE_ORDER = ("ingest", "regions", "features", "parse")


# A transient failure (stages.base.is_transient: out of memory, CUDA, I/O, a dead Ray worker) of one `process`
# call is retried in place this many times in all, waiting RETRY_BACKOFF_S, then twice that, ... in between;
# bad input is never retried (it is a recorded rejection). Ray then retries a task or actor that died outright.
RETRY_TRIES = 3
RETRY_BACKOFF_S = 2.0
RAY_TASK_RETRIES = 3  # a task stage's worker process that dies (OOM-killed, node lost) is rerun this often
RAY_ACTOR_RESTARTS = 3  # a model stage's actor that dies is restarted this often, and its shard resubmitted
# Calls to a model stage's actor are retried this often. Higher than the restarts: while a lost node is not yet
# declared dead, each call fails at once as "actor unavailable" and uses up a retry (seen in CI: 3 were gone
# before the actor restarted elsewhere, and the run failed). A crash loop stays bounded by RAY_ACTOR_RESTARTS.
RAY_ACTOR_TASK_RETRIES = 20
# Ray's own retries of the plan-read and write tasks: bounded like the stage tasks' (Ray's default retries a task
# whose worker dies forever: an OOM there would loop); their transient errors are retried inside (retry_transient).
TASK_RETRIES = {"max_retries": RAY_TASK_RETRIES, "retry_exceptions": False}
# Recovery tests: the write task of this shard SIGKILLs its own worker, as the kernel's OOM killer would.
KILL_WRITE = "DENSEVSE_KILL_WRITE"


def retry_transient(fn, what: str):
    """fn(), rerun while it fails transiently (stages.base.is_transient: memory, GPU, I/O, the network, the object
    store), RETRY_TRIES tries in all with backoff; then a RuntimeError naming `what` and the error, which fails
    the shard's task. Bad input is raised at once (a stage records it as a rejection before it gets here)."""
    for attempt in range(1, RETRY_TRIES + 1):
        try:
            return fn()
        except Exception as e:
            if not is_transient(e):
                raise
            if attempt == RETRY_TRIES:
                raise RuntimeError(f"{what}: {type(e).__name__}: {e} (after {RETRY_TRIES} tries)") from e
            wait = RETRY_BACKOFF_S * 2 ** (attempt - 1)
            log.warning("%s: %s: %s; retry %d/%d in %.1f s", what, type(e).__name__, e, attempt, RETRY_TRIES - 1,
                        wait)
            _free_memory()
            time.sleep(wait)


def _run_stage(stage, payload: bytes, batch_size: int) -> bytes:
    """Apply a stage to one shard's rows, `batch_size` rows per `process` call (one batched forward pass).

    A call failing transiently is rerun on fresh copies of its rows (a stage edits rows in place, and ingest
    run twice on its own output would reject every caption); if it persists, the shard's task fails with the
    stage, shard and error, so the shard stays unfinished and a rerun redoes it, instead of being written
    with machine failures recorded as rejected samples."""
    rows = pickle.loads(payload)
    shard = rows[0]["shard"] if rows else "?"
    out: list[dict] = []
    for i in range(0, len(rows), batch_size):
        batch = rows[i:i + batch_size]
        out.extend(retry_transient(lambda: stage.process([dict(r) for r in batch]), f"stage {stage.name}: shard {shard}"))
    if len(out) != len(rows) or [r["key"] for r in out] != [r["key"] for r in rows]:
        raise RuntimeError(f"stage {stage.name} changed the rows of shard {shard}")
    return pickle.dumps(out, protocol=pickle.HIGHEST_PROTOCOL)


def _free_memory() -> None:
    """Before a retry: drop the failed attempt's garbage, and torch's cached GPU blocks (a CUDA OOM leaves them)."""
    gc.collect()
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


class _StageOnShards:
    """A stage applied to whole shards. As a Ray actor (a model stage: `load=True`) the stage and its model are
    built once, in the constructor, and serve many shards; as a task, the stage is built per call. `impl` is
    looked up in the registry of `step` (stages.base.STEPS). `models` (an object ref to ship.pack's tar) is
    unpacked into this actor's own directory first, so the model files are the driver's, on whichever node the
    actor runs."""

    def __init__(self, step: str, impl: str, params, batch_size: int, load: bool = True, models=None):
        if models is not None:
            import ray

            self._models_dir = tempfile.TemporaryDirectory(prefix="densevse-models-")  # removed with the actor
            params = ship.unpack(params, ray.get(models) if isinstance(models, ray.ObjectRef) else models,
                                 self._models_dir.name)
        self.cls, self.params, self.batch_size = STEPS[step].get(impl), params, batch_size
        self.stage = self.cls(params) if load else None

    def __call__(self, batch):
        t = Clock()
        stage = self.stage or self.cls(self.params)  # a task stage's build is part of its cost
        rows, costs = [], []
        for p, c in zip(batch["rows"], batch["cost"]):
            rows.append(_run_stage(stage, p, self.batch_size))
            costs.append(add_cost(c, stage.name, t.lap()))
        return {"shard": batch["shard"], "rows": rows, "cost": costs}


def run_stages(cfg) -> dict[str, StageConfig]:
    """The stages to run, in order: a passthrough one (features `from_regions`, when the regions stage computes
    them) is left out, so its shard rows never travel through Ray for nothing."""
    return {name: getattr(cfg.stages, name) for name in STAGE_ORDER
            if not STEPS[name].get(getattr(cfg.stages, name).impl).passthrough}


def actor_pool_sizes(stage_cfgs: dict[str, StageConfig], nodes: float | list) -> dict[str, int]:
    """Actors per model stage, capped so the pools always leave some node room for a task. `nodes`: each alive
    node's CPUs, or (CPUs, memory MiB) pairs (Ray's logical memory).

    Actors hold their CPUs for the whole run; if they left no node with `task` CPUs free, the task stages could
    never be scheduled and the run would hang (seen on a 2-CPU machine with 2 feature actors, and on two 1-CPU
    nodes with one 0.3-CPU actor on each). Ray may place actors on any node, so the bound assumes the worst:
    a node with C CPUs is blocked by floor((C - task) / a) + 1 actors of the largest size a, and the pools
    together stay one actor short of blocking every node. Memory (`memory_mb`, requested so that Ray sizes
    and places workers by it) bounds the pools too: no more actors of the largest request than the nodes hold
    with a task's memory left on each. On a cluster of several nodes the bound also holds after the loss of its
    largest node (Ray restarts the lost node's actors on the others: seen with 2+2+2 actors on two 2-CPU nodes,
    where the survivor held all six and no ingest task could ever run again), unless the pools cannot be that
    small (one actor per stage), which is logged. A stage's `concurrency` is honoured within the bound (capped, with a
    warning, beyond it); the stages without one share the rest, one more actor each to the earlier stages
    while the rest does not divide (the detector, first, is the costliest in the defaults).
    """
    nodes = [nodes] if isinstance(nodes, (int, float)) else list(nodes)
    nodes = [n if isinstance(n, (tuple, list)) else (n, math.inf) for n in nodes]
    model = {n: sc for n, sc in stage_cfgs.items() if STEPS[n].get(sc.impl).uses_model}
    tasks = [sc for n, sc in stage_cfgs.items() if n not in model]
    task, task_mb = max([sc.num_cpus for sc in tasks] + [0.0]), max([sc.memory_mb or 0 for sc in tasks] + [0])
    if not model:
        return {}
    a = max(sc.num_cpus for sc in model.values())  # num_cpus > 0 (validated)
    a_mb = max(sc.memory_mb or 0 for sc in model.values())

    def safe(ns) -> int:  # actors that leave some node of `ns` room for a task
        room = sum(math.floor((c - task) / a + 1e-9) + 1 for c, _ in ns if c >= task) - 1
        return min(room, sum(math.floor((m - task_mb) / a_mb) for _, m in ns if m >= task_mb)) if a_mb else room

    room = safe(nodes)
    workers = sorted((i for i, n in enumerate(nodes) if n[0] > 0), key=lambda i: nodes[i], reverse=True)
    if len(workers) > 1:  # several nodes actors can run on: lose the largest
        after_loss = safe(nodes[:workers[0]] + nodes[workers[0] + 1:])
        if after_loss < len(model):
            log.warning("the model stages' actor pools cannot survive the loss of a node of %s: they need %d "
                        "actors, and the other nodes hold %d with room left for a task", nodes, len(model),
                        after_loss)
        room = min(room, max(after_loss, len(model)))
    if room < len(model):
        raise ValueError(f"stages.{next(iter(model))}: {len(model)} model stage(s) need actors of up to {a} CPU"
                         f"{f' and {a_mb} MiB' if a_mb else ''}, the task stages {task} CPU on one node, but the "
                         f"cluster's nodes have (CPUs, memory MiB) {nodes}; lower stages.*.num_cpus or memory_mb")
    sizes, left = {}, room
    for n, sc in [(n, sc) for n, sc in model.items() if sc.concurrency]:
        sizes[n] = min(sc.concurrency, left - (len(model) - len(sizes) - 1))  # every later stage keeps one
        left -= sizes[n]
        if sizes[n] < sc.concurrency:
            log.warning("stages.%s.concurrency=%d capped to %d actors so that a node keeps %.1f CPU for task "
                        "stages (nodes' CPUs, memory MiB: %s)", n, sc.concurrency, sizes[n], task, nodes)
    auto = [n for n, sc in model.items() if not sc.concurrency]
    for i, n in enumerate(auto):
        sizes[n] = left // len(auto) + (i < left % len(auto))
    return {n: sizes[n] for n in model}


def _add_stage(ds, step: str, sc: StageConfig, actors: int | None, models=None):
    """Step `step`'s stage as Ray Data map over shards: an actor pool for a model stage, tasks otherwise.

    Ray's own retries are bounded (its defaults retry forever, so a shard that kills its worker every time, a
    segfaulting decoder say, would hang the run): a dead worker or actor is retried RAY_TASK_RETRIES /
    RAY_ACTOR_RESTARTS times (calls to a restarting actor RAY_ACTOR_TASK_RETRIES times).
    Application errors are not retried by Ray (`retry_exceptions=False`; Ray Data
    still adds its RaySystemError): _run_stage already retried the transient ones, and bad input never fails.
    Ray 2.60 takes these only as `**ray_remote_args` (deprecated, removal announced for 2.64; no named form yet)."""
    args = dict(step=step, impl=sc.impl, params=sc.params, batch_size=sc.batch_size)
    common = dict(batch_size=1, num_cpus=sc.num_cpus, num_gpus=sc.num_gpus or None, batch_format="numpy",
                  **({"memory": sc.memory_mb * 2**20} if sc.memory_mb else {}))
    if actors:
        args["models"] = models
        return ds.map_batches(_StageOnShards, fn_constructor_kwargs=args, concurrency=actors, **common,
                              max_restarts=RAY_ACTOR_RESTARTS, max_task_retries=RAY_ACTOR_TASK_RETRIES)
    return ds.map_batches(_StageOnShards(**args, load=False), concurrency=sc.concurrency, **common, **TASK_RETRIES)


def _write(batch, shard_dir: storage.Location, fingerprint: dict | None = None):
    """Write each shard of the batch. Before it, the outage guard: a shard whose rejections are mostly of one
    kind that says the network or the store failed, not the inputs (stages.base.check_shard_rejections), stops
    the run naming the reason, instead of being finished with every sample rejected."""
    stats = []
    for s, p, c in zip(batch["shard"], batch["rows"], batch["cost"]):
        rows = pickle.loads(p)
        check_shard_rejections(rows)
        if os.environ.get(KILL_WRITE) == s:
            os.kill(os.getpid(), signal.SIGKILL)
        stats.append(retry_transient(lambda: shardset.write_shard(rows, shard_dir, s, fingerprint, json.loads(c)),
                                     f"write: shard {s}"))
    return {"shard": [st["shard"] for st in stats], "n_ok": [st["n_ok"] for st in stats],
            "n_rejected": [st["n_rejected"] for st in stats], "cost": [json.dumps(st["cost"]) for st in stats]}


def _shard_items(batch):
    """Plan items (one per shard: its plan file and row group) -> the items the stages take: {"shard", "rows":
    pickled rows}. On the workers."""
    out = {"shard": [], "rows": [], "cost": []}
    for path, rg in zip(batch["file"], batch["row_group"]):
        t = Clock()
        r = retry_transient(lambda: read_shard(str(path), int(rg)), f"plan: {path} row group {rg}")
        out["shard"].append(r["shard"])
        out["rows"].append(pickle.dumps(shard_rows(r), protocol=pickle.HIGHEST_PROTOCOL))
        out["cost"].append(add_cost("", "plan", t.lap()))
    return out


def shard_dataset(ray, plan_path: storage.Location, infos: list[dict], skip: set[str] = frozenset()):
    """The Ray Dataset of the planned shards not in `skip`, one shard per block (so every actor gets work): the
    driver's items are (plan file, row group) pairs, O(shards); the rows are read and built on the workers."""
    items = [{"file": str(plan_path / i["file"]), "row_group": i["row_group"]}
             for i in infos if i["shard"] not in skip]
    ds = ray.data.from_items(items, override_num_blocks=max(1, len(items)))
    return ds.map_batches(_shard_items, batch_size=1, batch_format="numpy", **TASK_RETRIES)


def preprocess(cfg: PipelineConfig, progress: bool = True, force: bool = False,
               retry_rejected: str | None = None, verify: bool = False) -> dict:
    """Run (or resume) preprocessing; returns the run summary (also written to <shard_dir>/summary.json).

    One run per shard dir at a time (lock.ShardDirLock: a second fails at once, naming the holder); temporary
    files crashed runs left there are removed first. A finished shard made with another config (its stats'
    fingerprint differs) stops the run before any shard work with a ConfigError naming the changed keys;
    `force` redoes those shards instead. `retry_rejected` (a reason prefix, "" for any) also redoes the finished
    shards holding samples rejected with such a reason (plan.retry_shards), and only those. A finished shard is
    trusted by its tar's size and mtime / ETag; `verify` hashes every tar. Stage models are prepared first
    (trained on first use) so that the fingerprint hashes the model files the run will use."""
    with ShardDirLock(cfg.shard_dir, run=cfg.run.name) as lock:
        swept = storage.sweep_temp(cfg.shard_dir)
        if swept:
            log.warning("removed %d temporary file(s) that an earlier run left in %s: %s", len(swept),
                        cfg.shard_dir, [p.name for p in swept[:5]])
        return _preprocess(cfg, lock, progress, force, retry_rejected, verify)


def _preprocess(cfg: PipelineConfig, lock: ShardDirLock, progress: bool, force: bool, retry_rejected: str | None,
                verify: bool) -> dict:
    t0 = time.time()
    shard_dir = cfg.shard_dir
    infos = plan(cfg)
    planned = {i["shard"]: i["keys_sha256"] for i in infos}
    n_samples = sum(i["n"] for i in infos)
    done = shardset.finished_shards(shard_dir, planned, verify=verify)
    t_plan = time.time()
    prepare_stage_models(cfg)
    t_prep = time.time()
    fp = shardset.fingerprint(cfg)
    redo = check_resume(fp, done, shard_dir, force)
    done = {s: st for s, st in done.items() if s not in redo}
    retry = {}
    if retry_rejected is not None:
        retry = retry_shards(done, retry_rejected)
        if retry:
            log.info("--retry-rejected %r: redoing %d shard(s) holding %d such rejected sample(s): %s",
                     retry_rejected, len(retry), sum(retry.values()), list(retry)[:5])
        else:
            log.warning("--retry-rejected %r: no finished shard holds a sample rejected with a reason starting "
                        "with %r: no shard redone for it", retry_rejected, retry_rejected)
        done = {s: st for s, st in done.items() if s not in retry}
    log.info("plan: %d samples in %d shards; %d shards already finished (%d more redone: --force, config "
             "changed; %d: --retry-rejected)", n_samples, len(planned), len(done), len(redo), len(retry))
    cost = None
    if len(done) < len(planned):
        ray = init_ray(cfg)
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = progress
        ds = shard_dataset(ray, plan_dir(shard_dir), infos, set(done))
        stage_cfgs = run_stages(cfg)
        actors = actor_pool_sizes(stage_cfgs, node_resources())
        for name, sc in stage_cfgs.items():
            packed = ship.pack(sc.params) if actors.get(name) else None
            ds = _add_stage(ds, name, sc, actors.get(name), ray.put(packed) if packed else None)
        todo, n, written = sum(i["n"] for i in infos if i["shard"] not in done), 0, []
        t_run = time.time()
        for w in ds.map_batches(_write, fn_kwargs={"shard_dir": shard_dir, "fingerprint": fp}, batch_size=1,
                                batch_format="numpy", **TASK_RETRIES).iter_rows():
            written.append(w)  # one row per shard written: the console's samples/s and ETA
            n += int(w["n_ok"]) + int(w["n_rejected"])
            if len(written) == 1:
                t_first, n_first = time.time(), n
            emit({"step": "preprocess", "done": n, "total": todo})
        missing = set(planned) - set(done) - {w["shard"] for w in written}
        if missing:
            raise RuntimeError(f"shards not written: {sorted(missing)[:5]}")
        cost = summarize_costs([json.loads(w["cost"]) for w in written], n, time.time() - t_run,
                               sum(c for c, _ in node_resources()))
        cost.update(plan_s=round(t_plan - t0, 1), prepare_s=round(t_prep - t_plan, 1),  # models trained on first use
                    ray_start_s=round(t_run - t_prep, 1),  # and the dataset's set-up; actors start within run_s
                    first_shard_s=round(t_first - t_run, 1),  # actors loading their models, the pipeline filling
                    steady_samples_per_s=round((n - n_first) / (time.time() - t_first), 2) if n > n_first else None)
    stale = sorted(n for n in map(shardset.shard_of, shard_dir.glob("*.tar")) if n not in planned)
    if stale:
        log.warning("%d shard(s) in %s are not in this run's plan: left out of the manifest, so never read: %s",
                    len(stale), shard_dir, stale[:5])
    lock.check()  # never write the manifest of a run whose lease another run took over
    manifest = shardset.write_manifest(shard_dir, sorted(planned))
    summary = {"samples": n_samples, "shards": len(planned), "shards_skipped": len(done),
               "shards_written": len(planned) - len(done), "shards_redone_config_changed": len(redo),
               "seconds": round(time.time() - t0, 1), "manifest": str(manifest),
               "fingerprint": fp["sha256"], "splits": shardset.summarize_shards(shard_dir, sorted(planned))}
    if cost:
        summary["cost"] = cost
    if retry_rejected is not None:
        summary["retry_rejected"] = {"prefix": retry_rejected, "shards_redone": len(retry),
                                     "samples_retried": sum(retry.values()), "shards": list(retry)}
    storage.put_atomic(shard_dir / shardset.SUMMARY, json.dumps(summary, indent=1))
    return summary
