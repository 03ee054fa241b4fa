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
import pickle
import sys
import tempfile
import time

from pipeline import storage
from pipeline.config import PipelineConfig, StageConfig
from pipeline.console import emit
from pipeline.preprocess import ship, shards
from pipeline.preprocess.plan import (check_resume, fingerprint, plan, plan_dir, read_shard, retry_shards,
                                     shard_rows)
from pipeline.preprocess.prepare import prepare_stage_models
from pipeline.raylocal import init_ray
from stages.base import STAGES, is_transient

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
        for attempt in range(1, RETRY_TRIES + 1):
            try:
                out.extend(stage.process([dict(r) for r in batch]))
                break
            except Exception as e:
                if not is_transient(e):
                    raise
                if attempt == RETRY_TRIES:
                    raise RuntimeError(f"stage {stage.name}: shard {shard}: {type(e).__name__}: {e} "
                                       f"(after {RETRY_TRIES} tries)") from e
                wait = RETRY_BACKOFF_S * 2 ** (attempt - 1)
                log.warning("stage %s: shard %s: %s: %s; retry %d/%d in %.1f s", stage.name, shard,
                            type(e).__name__, e, attempt, RETRY_TRIES - 1, wait)
                _free_memory()
                time.sleep(wait)
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
    built once, in the constructor, and serve many shards; as a task, the stage is built per call. `models`
    (an object ref to ship.pack's tar) is unpacked into this actor's own directory first, so the model files
    are the driver's, on whichever node the actor runs."""

    def __init__(self, impl: str, params, batch_size: int, load: bool = True, models=None):
        if models is not None:
            import ray

            self._models_dir = tempfile.TemporaryDirectory(prefix="densevse-models-")  # removed with the actor
            params = ship.unpack(params, ray.get(models) if isinstance(models, ray.ObjectRef) else models,
                                 self._models_dir.name)
        self.impl, self.params, self.batch_size = impl, params, batch_size
        self.stage = STAGES.get(impl)(params) if load else None

    def __call__(self, batch):
        stage = self.stage or STAGES.get(self.impl)(self.params)
        return {"shard": batch["shard"], "rows": [_run_stage(stage, p, self.batch_size) for p in batch["rows"]]}


def run_stages(cfg) -> dict[str, StageConfig]:
    """The stages to run, in order: a passthrough one (features `from_regions`, when the regions stage computes
    them) is left out, so its shard rows never travel through Ray for nothing."""
    return {name: getattr(cfg.stages, name) for name in STAGE_ORDER
            if not STAGES.get(getattr(cfg.stages, name).impl).passthrough}


def actor_pool_sizes(stage_cfgs: dict[str, StageConfig], node_cpus: float | list[float]) -> dict[str, int]:
    """Actors per model stage, capped so the pools always leave some node room for a task.

    Actors hold their CPUs for the whole run; if they left no node with `task` CPUs free, the task stages could
    never be scheduled and the run would hang (seen on a 2-CPU machine with 2 feature actors, and on two 1-CPU
    nodes with one 0.3-CPU actor on each). Ray may place actors on any node, so the bound assumes the worst:
    a node with C CPUs is blocked by floor((C - task) / a) + 1 actors of the largest size a, and the pools
    together stay one actor short of blocking every node. Caps are logged, not silent.
    """
    nodes = [node_cpus] if isinstance(node_cpus, (int, float)) else list(node_cpus)
    model = {n: sc for n, sc in stage_cfgs.items() if STAGES.get(sc.impl).uses_model}
    task = max([sc.num_cpus for n, sc in stage_cfgs.items() if n not in model] + [0.0])
    if not model:
        return {}
    a = max(sc.num_cpus for sc in model.values())  # num_cpus > 0 (validated)
    room = sum(math.floor((c - task) / a + 1e-9) + 1 for c in nodes if c >= task) - 1  # actors that stay safe
    fit = room // len(model)  # each model stage's share
    if fit < 1:
        raise ValueError(f"stages.{next(iter(model))}: {len(model)} model stage(s) need actors of up to {a} CPU and "
                         f"the task stages {task} CPU on one node, but the cluster's nodes have {nodes} CPUs; lower "
                         f"stages.*.num_cpus")
    sizes = {}
    for n, sc in model.items():
        want = sc.concurrency or fit
        sizes[n] = min(want, fit)
        if sizes[n] < want:
            log.warning("stages.%s.concurrency=%d capped to %d actors so that a node keeps %.1f CPU for task "
                        "stages (node CPUs %s)", n, want, sizes[n], task, nodes)
    return sizes


def node_cpus() -> list[float]:
    """CPUs of each alive node of the connected Ray cluster."""
    import ray

    return [n["Resources"].get("CPU", 0.0) for n in ray.nodes() if n["Alive"]]


def _add_stage(ds, sc: StageConfig, actors: int | None, models=None):
    """The stage as Ray Data map over shards: an actor pool for a model stage, tasks otherwise.

    Ray's own retries are bounded (its defaults retry forever, so a shard that kills its worker every time, a
    segfaulting decoder say, would hang the run): a dead worker or actor is retried RAY_TASK_RETRIES /
    RAY_ACTOR_RESTARTS times (calls to a restarting actor RAY_ACTOR_TASK_RETRIES times).
    Application errors are not retried by Ray (`retry_exceptions=False`; Ray Data
    still adds its RaySystemError): _run_stage already retried the transient ones, and bad input never fails.
    Ray 2.60 takes these only as `**ray_remote_args` (deprecated, removal announced for 2.64; no named form yet)."""
    args = dict(impl=sc.impl, params=sc.params, batch_size=sc.batch_size)
    common = dict(batch_size=1, num_cpus=sc.num_cpus, num_gpus=sc.num_gpus or None, batch_format="numpy",
                  **({"memory": sc.memory_mb * 2**20} if sc.memory_mb else {}))
    if actors:
        args["models"] = models
        return ds.map_batches(_StageOnShards, fn_constructor_kwargs=args, concurrency=actors, **common,
                              max_restarts=RAY_ACTOR_RESTARTS, max_task_retries=RAY_ACTOR_TASK_RETRIES)
    return ds.map_batches(_StageOnShards(**args, load=False), concurrency=sc.concurrency, **common,
                          max_retries=RAY_TASK_RETRIES, retry_exceptions=False)


def _write(batch, shard_dir: str, fingerprint: dict | None = None):
    stats = [shards.write_shard(pickle.loads(p), storage.location(shard_dir), s, fingerprint)
             for s, p in zip(batch["shard"], batch["rows"])]
    return {"shard": [st["shard"] for st in stats], "n_ok": [st["n_ok"] for st in stats],
            "n_rejected": [st["n_rejected"] for st in stats]}


def _shard_items(batch):
    """Plan items (one per shard: its plan file and row group) -> the items the stages take: {"shard", "rows":
    pickled rows}. On the workers."""
    out = {"shard": [], "rows": []}
    for path, rg in zip(batch["file"], batch["row_group"]):
        r = read_shard(str(path), int(rg))
        out["shard"].append(r["shard"])
        out["rows"].append(pickle.dumps(shard_rows(r), protocol=pickle.HIGHEST_PROTOCOL))
    return out


def shard_dataset(ray, plan_path: storage.Location, infos: list[dict], skip: set[str] = frozenset()):
    """The Ray Dataset of the planned shards not in `skip`, one shard per block (so every actor gets work): the
    driver's items are (plan file, row group) pairs, O(shards); the rows are read and built on the workers."""
    items = [{"file": str(storage.join(plan_path, i["file"])), "row_group": i["row_group"]}
             for i in infos if i["shard"] not in skip]
    ds = ray.data.from_items(items, override_num_blocks=max(1, len(items)))
    return ds.map_batches(_shard_items, batch_size=1, batch_format="numpy")


def preprocess(cfg: PipelineConfig, progress: bool = True, force: bool = False,
               retry_rejected: str | None = None) -> dict:
    """Run (or resume) preprocessing; returns the run summary (also written to <shard_dir>/summary.json).

    A finished shard made with another config (its stats' fingerprint differs) stops the run before any shard
    work with a ConfigError naming the changed keys; `force` redoes those shards instead. `retry_rejected`
    (a reason prefix, "" for any) also redoes the finished shards holding samples rejected with such a reason
    (plan.retry_shards), and only those. Stage models are prepared first (trained on first use) so that the
    fingerprint hashes the model files the run will use."""
    t0 = time.time()
    shard_dir = cfg.shard_dir
    storage.makedirs(shard_dir)
    infos = plan(cfg)
    planned = {i["shard"]: i["keys_sha256"] for i in infos}
    n_samples = sum(i["n"] for i in infos)
    done = shards.finished_shards(shard_dir, planned)
    prepare_stage_models(cfg)
    fp = fingerprint(cfg)
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
    if len(done) < len(planned):
        ray = init_ray(cfg)
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = progress
        ds = shard_dataset(ray, plan_dir(shard_dir), infos, set(done))
        stage_cfgs = run_stages(cfg)
        actors = actor_pool_sizes(stage_cfgs, node_cpus())
        for name, sc in stage_cfgs.items():
            packed = ship.pack(sc.params) if actors.get(name) else None
            ds = _add_stage(ds, sc, actors.get(name), ray.put(packed) if packed else None)
        todo, n, written = sum(i["n"] for i in infos if i["shard"] not in done), 0, []
        for w in ds.map_batches(_write, fn_kwargs={"shard_dir": str(shard_dir), "fingerprint": fp}, batch_size=1,
                                batch_format="numpy").iter_rows():
            written.append(w)  # one row per shard written: the console's samples/s and ETA
            n += int(w["n_ok"]) + int(w["n_rejected"])
            emit({"step": "preprocess", "done": n, "total": todo})
        missing = set(planned) - set(done) - {w["shard"] for w in written}
        if missing:
            raise RuntimeError(f"shards not written: {sorted(missing)[:5]}")
    stale = sorted(n for n in map(shards.shard_of, storage.listdir(shard_dir, ".tar")) if n not in planned)
    if stale:
        log.warning("%d shard(s) in %s are not in this run's plan: left out of the manifest, so never read: %s",
                    len(stale), shard_dir, stale[:5])
    manifest = shards.write_manifest(shard_dir, sorted(planned))
    summary = {"samples": n_samples, "shards": len(planned), "shards_skipped": len(done),
               "shards_written": len(planned) - len(done), "shards_redone_config_changed": len(redo),
               "seconds": round(time.time() - t0, 1), "manifest": str(manifest),
               "fingerprint": fp["sha256"], "splits": shards.summarize_shards(shard_dir, sorted(planned))}
    if retry_rejected is not None:
        summary["retry_rejected"] = {"prefix": retry_rejected, "shards_redone": len(retry),
                                     "samples_retried": sum(retry.values()), "shards": list(retry)}
    shards.write_atomic(storage.join(shard_dir, "summary.json"), json.dumps(summary, indent=1))
    return summary
