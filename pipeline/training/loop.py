"""The one Ray Train loop of every trained model, parameterised by a Task (torchtitan's "train spec").

    summary = fit(cfg, EmbeddingTask(cfg))               # pipeline/training/embedding.py
    summary = fit(cfg, CaptionerTask(cfg), resume=True)  # pipeline/training/captioner.py

Tasks are registered by name in pipeline/training/tasks.py, whose `train(cfg, task)` is the entry point.

The loop owns what the models share, so that it cannot drift apart between them:
  * driver: absolute paths for the workers (`for_workers`), Ray (pipeline.raylocal.init_ray), the MLflow run
    (continued on resume; marked FAILED when anything fails), a TorchTrainer with cfg.train.num_workers
    workers (DDP over gloo on CPU, NCCL on GPU), FailureConfig(cfg.train.max_failures), every checkpoint kept;
    afterwards the best epoch without optimizer state (`save_best`), the summary, the registered model.
  * worker: restore (Ray's latest checkpoint after a worker-group restart, else the one `resume` found), DDP
    with join() for ranks with unequal shares, the all-reduce of the epoch's loss sums (an epoch of 0 training
    pairs is an error, not a zero loss), rank 0 evaluates, reports the checkpoint, then logs the epoch to MLflow
    (best-effort, below); early stopping (`task.patience`, decided by rank 0, obeyed by all); each epoch's
    data-wait vs compute timing (`Task.batches`: a prefetching thread, pipeline/training/prefetch.py) as
    compute_share.

A Task (below) is what differs: data, model, loss, validation metric, checkpoint extras, registration.
The config travels to the workers as the validated PipelineConfig object, the task as the pickled instance
that `Task.prepare` filled in on the driver. Checkpoints hold plain values only (the config as its JSON dump):
they are read with models.checkpoint.load_checkpoint (weights_only).

Paths (locations, pipeline/storage.py: local or object storage alike): <storage>/<run.name>-<task.name>-<stamp>/
checkpoint_*/model.pt (one per epoch; storage is train.storage_path, default <output_dir>/ray_train); best.pt
and the summary where pipeline/trained.py says (best_path, summary_path:
<output_dir>/models/<task.name>/best.pt, <output_dir>/train-<task.name>.json), each written whole (put_atomic).

MLflow outages: the checkpoint (which holds the whole history) is reported before MLflow is called, and that
call is bounded (pipeline.tracking.runs.bounded: about 2 s when the server is down, at most 17 s when it hangs)
and best-effort: a failure is a warning on the console, and the next epoch that reaches MLflow also logs every
epoch MLflow lacks (runs.backfill, each at its step); the driver backfills once more after training. MLflow still
down then: the job keeps best.pt and succeeds, its summary lists the epochs MLflow lacks ("mlflow_missing_epochs")
and says no model was registered. MLflow down before training: a clear error, nothing trained.

Recovery tests: DENSEVSE_FAIL_AT_EPOCH=N makes rank 0 raise at the start of epoch N unless it restored from a
Ray checkpoint: one crash, which FailureConfig recovers from (with train.max_failures=0: a failed job). Read on
the driver when `fit` is called and handed to the workers in their runtime env. DENSEVSE_EPOCH_BARRIER=<dir> (same
path to the workers): rank 0, after reporting epoch N's checkpoint and before logging it to MLflow, creates
<dir>/reported-N and waits for <dir>/go-N, so that a test acts (stops the MLflow server) at a known point.
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch

from densevse.models.checkpoint import is_complete, load_checkpoint
from densevse.pipeline import shardset
from densevse.pipeline import storage as store
from densevse.pipeline.config import public_config, redact_uri
from densevse.pipeline.console import emit
from densevse.pipeline.storage import Location
from densevse.pipeline.raylocal import cpus_per_worker, init_ray, node_resources
from densevse.pipeline.training.prefetch import StepTimer, prefetch
from densevse.pipeline.training.stopping import early_stop
from densevse.pipeline.trained import best_path, summary_path

FAIL_AT_EPOCH = "DENSEVSE_FAIL_AT_EPOCH"
EPOCH_BARRIER = "DENSEVSE_EPOCH_BARRIER"
log = logging.getLogger("densevse.train")


class Task:
    """What one model's training needs; the loop calls these and nothing else. Built on the driver, filled in
    by `prepare`, then pickled to every worker, which calls `setup` before the rest. The optimizer is Adam
    over all parameters with learning rate `lr`."""

    name: str            # run names and output paths (module docstring)
    model_name: str      # the checkpoint's "model_name" and the summary's "model"
    epochs: int
    lr: float
    no_pairs_hint = ""   # the likely cause, appended to the "0 training pairs" error
    patience: int | None = None  # early stopping (pipeline/training/stopping.py): epochs without a better best_score
    prefetch_depth = 2   # batches prepared ahead by `batches` (0: inline, no thread)
    step_timer: StepTimer | None = None  # the epoch's data-wait vs compute timing, reset by the loop per epoch
    # {"<stage>.<field>": sha256} of the stage model files the train shards were made with (set by `fit`): the
    # checkpoint records them, so a user's model file for embedding new input is checked against them
    model_files: dict[str, str] = {}

    def prepare(self, cfg, paths: list[Location], state: dict | None) -> dict:
        """Driver, once: check the train shards, build what every worker needs (vocabularies...), from `state`
        (the checkpoint being resumed) when given. Returns entries for the summary."""
        raise NotImplementedError

    def setup(self, cfg, train_paths: list, val_paths: list[Location], device) -> None:
        """Worker: load this rank's train data (reads from densevse.pipeline.shardset.rank_shards); val_paths are
        the val shards on rank 0 (which evaluates) and [] elsewhere."""
        raise NotImplementedError

    def make_model(self, hparams: dict | None) -> torch.nn.Module:
        """The model to train: a fresh one (None), or a checkpoint's architecture (the loop loads its weights)."""
        raise NotImplementedError

    def train_epoch(self, model, core, opt, epoch: int) -> tuple[dict[str, float], int]:
        """One pass over this rank's data through `model` (`core` DDP-wrapped when world > 1): (the losses summed
        over pairs, e.g. {"loss": sum of loss * batch pairs}, pairs). The epoch's train_<key> is sum / pairs
        over all ranks."""
        raise NotImplementedError

    def batches(self, items):
        """`items` (the epoch's batches) prefetched by a background thread and timed per step: train_epoch
        iterates over this so that loading overlaps compute and the epoch reports its compute_share."""
        if self.step_timer is None:
            self.step_timer = StepTimer()
        return self.step_timer.iterate(prefetch(items, self.prefetch_depth) if self.prefetch_depth else items)

    def evaluate(self, core) -> dict:
        """Rank 0, after each epoch: validation metrics ("val_..." floats) for the epoch's entry."""
        return {}

    def checkpoint_extra(self) -> dict:
        """The checkpoint's task-specific entries (vocabularies...); plain values only."""
        return {}

    def best_score(self, entry: dict) -> float:
        """Which epoch is best: the highest score over the history entries."""
        raise NotImplementedError

    def register(self, cfg, run_id: str, history: list[dict], best: Location) -> int | None:
        """Log best.pt (`best`) to the MLflow run as a model and register it; returns the version."""
        raise NotImplementedError


# ---------------------------------------------------------------- driver


def storage(cfg) -> Location:
    """Ray Train's storage_path: train.storage_path (a local path or a URI), default <run.output_dir>/ray_train."""
    return (cfg.train.storage_path or cfg.run.output_dir / "ray_train").resolve()


def latest_checkpoint(cfg, name: str | None = None) -> Location | None:
    """The newest complete checkpoint dir reported by any earlier run of task `name` (default: cfg.train.model,
    the embedding model) under this output dir: the last by name, as run names carry their start time and
    checkpoint names the epoch (an object store has no mtimes). A partial copy (a worker killed while its
    checkpoint was being persisted) is passed over: resuming from it would fail, and the epoch before it is whole."""
    pattern = f"{cfg.run.name}-{name or cfg.train.model}-*/checkpoint_*/model.pt"
    found = [p for p in sorted(storage(cfg).glob(pattern)) if _complete(p)]
    return found[-1].parent if found else None


def _complete(model_pt: Location) -> bool:
    with model_pt.open("rb") as f:
        return is_complete(f)


def load_dir(d) -> dict:
    """The model.pt of a checkpoint dir (a location: local or in an object store)."""
    with store.local(store.location(d) / "model.pt") as f:
        return load_checkpoint(f)


def for_workers(cfg):
    """A copy of cfg with absolute paths: Ray Train workers run in another directory, so a relative shard dir,
    output dir or sqlite/file tracking URI would point somewhere else there (an empty MLflow store, say)."""
    from densevse.pipeline.tracking.server import absolute_uri

    cfg = cfg.model_copy(deep=True)
    cfg.shards.dir = cfg.shard_dir.resolve()
    cfg.run.output_dir = cfg.run.output_dir.resolve()
    cfg.mlflow.tracking_uri = absolute_uri(cfg.mlflow.tracking_uri)
    return cfg


def fit(cfg, task: Task, resume: bool = False) -> dict:
    """Train `task` on cfg's train shards; `resume`: continue from its latest checkpoint (and MLflow run).
    Returns the summary, also written to <output_dir>/train-<task.name>.json."""
    t0 = time.time()
    cfg = for_workers(cfg)
    paths = shardset.shard_paths(cfg.shard_dir, "train")
    if not paths:
        raise FileNotFoundError(f"no finished train shards in {cfg.shard_dir}; run `densevse preprocess` first")
    resume_from = latest_checkpoint(cfg, task.name) if resume else None
    if resume and resume_from is None:
        raise FileNotFoundError(f"--resume: no checkpoint of {task.name} under {storage(cfg)}")
    state = load_dir(resume_from) if resume_from else None
    info = task.prepare(cfg, paths, state)
    task.model_files = _model_files(cfg.shard_dir, paths[0])
    env = {**_fail_env(), EPOCH_BARRIER: os.environ.get(EPOCH_BARRIER, "")}
    init_ray(cfg)  # before the MLflow run: a Ray that fails to start leaves no empty run behind
    run_id = _mlflow_run(cfg, task, state)
    try:
        result = _trainer(cfg, task, run_id, resume_from, env).fit()
        summary = {**_summary(cfg, task, result, info), "seconds": round(time.time() - t0, 1), "mlflow_run_id": run_id}
        if run_id:
            _end_tracking(cfg, task, run_id, result, summary)
    except BaseException as e:
        if run_id:  # a failed job shows as FAILED in MLflow (with why), not as a run forever RUNNING
            _mark_failed(cfg.mlflow.tracking_uri, run_id, e)
        raise
    store.put_atomic(summary_path(cfg.run.output_dir, task.name), json.dumps(summary, indent=1, default=str))
    return summary


def _summary(cfg, task: Task, result, info: dict) -> dict:
    """best.pt written (save_best), and what the job did: the history, its best epoch, where things are."""
    best = best_path(cfg.run.output_dir, task.name)
    history, best_epoch = save_best(result, best, task.best_score)
    stopped = early_stop(history, task.best_score, task.patience) if history[-1]["epoch"] + 1 < task.epochs else None
    return {"model": task.model_name, "epochs": len(history), "best_epoch": best_epoch, "early_stop": stopped, **info,
            "best": next(h for h in history if h["epoch"] == best_epoch), "history": history,
            "checkpoint": result.checkpoint.path, "best_model": str(best)}


def _model_files(shard_dir, tar) -> dict[str, str]:
    """The stage model files' sha256 recorded in a train shard's config fingerprint (the set holds one config)."""
    st = shardset.read_stats(shard_dir, shardset.shard_of(tar)) or {}
    return shardset.recorded_model_files(st.get("fingerprint"))


def _fail_env() -> dict:
    """The fault injection for the workers' env, always set ("" when off): workers inherit the env the local Ray
    was started with, which may hold an older value. A malformed value fails here, not in a worker."""
    value = os.environ.get(FAIL_AT_EPOCH, "").strip()
    if value and not value.isdigit():
        raise ValueError(f"{FAIL_AT_EPOCH}={value!r}: expected an epoch number")
    return {FAIL_AT_EPOCH: value}


def _mlflow_run(cfg, task: Task, state: dict | None) -> str | None:
    """The resumed checkpoint's MLflow run, else a new one named <run.name>-<task.name>; None without tracking.
    An MLflow that does not answer now is an error before anything trains (bounded: seconds, not MLflow's
    minutes of retries): tracking was asked for, and a run begun without it could never be logged to."""
    from densevse.pipeline.tracking import runs

    if not cfg.mlflow.tracking_uri:
        return None
    try:
        with runs.bounded():
            return _open_run(cfg, task, state)
    except Exception as e:  # noqa: BLE001 - connection, HTTP, auth: all mean no run to log into
        raise RuntimeError(
            f"MLflow at {redact_uri(cfg.mlflow.tracking_uri)} did not answer before training ({type(e).__name__}: "
            f"{_short(e)}); nothing was trained. Start the server (`densevse mlflow`) or fix mlflow.tracking_uri, "
            f"or set mlflow.tracking_uri to null to train without tracking.") from e


def _open_run(cfg, task: Task, state: dict | None) -> str:
    from densevse.pipeline.tracking import runs

    if state is not None and state.get("mlflow_run_id"):
        runs.reopen_run(cfg.mlflow.tracking_uri, state["mlflow_run_id"])
        return state["mlflow_run_id"]
    return runs.start_run(cfg, run_name=f"{cfg.run.name}-{task.name}", model=task.model_name)


def _short(e: BaseException, n: int = 300) -> str:
    """An exception's text as one readable line: for MLflow's HTTP errors (the whole URL, urllib3's retry chain)
    the root cause ("... [Errno 111] Connection refused", "Read timed out"), cut to n characters."""
    text = " ".join(str(e).split())
    if "Caused by " in text:
        text = text.rsplit("Caused by ", 1)[1].rstrip(")")
    return text if len(text) <= n else text[:n] + "..."


def _end_tracking(cfg, task: Task, run_id: str, result, summary: dict) -> None:
    """After training, best.pt written: backfill the epochs MLflow lacks, tag early stopping, register. An MLflow
    still down loses nothing: the job succeeds with best.pt, the summary lists the epochs MLflow lacks and says
    nothing was registered (a warning says so). A registration error while MLflow answers is a real error."""
    from mlflow.tracking import MlflowClient

    from densevse.pipeline.tracking import runs

    uri, best = cfg.mlflow.tracking_uri, best_path(cfg.run.output_dir, task.name)
    try:
        with runs.bounded():
            late = runs.backfill(uri, run_id, summary["history"])
    except Exception as e:  # noqa: BLE001 - an outage: reported below, the training is kept
        missing = _unlogged_at_end(result, summary["history"])
        summary.update(registered_version=None, mlflow_missing_epochs=missing,
                       mlflow_error=f"{type(e).__name__}: {_short(e)}")
        log.warning("MLflow at %s does not answer after training (%s): steps %s are missing from run %s, no model "
                    "was registered and the run stays RUNNING there. Nothing trained is lost: the best model is %s and "
                    "every epoch's metrics are in the summary (history) and in each checkpoint.",
                    uri, summary["mlflow_error"], missing, run_id, best)
        return
    if late:
        summary["mlflow_backfilled_epochs"] = late
        log.warning("MLflow had missed steps %s of run %s: logged now", late, run_id)
    try:
        if summary["early_stop"]:
            MlflowClient(uri).set_tag(run_id, "early_stop", summary["early_stop"])
        summary["registered_version"] = task.register(cfg, run_id, summary["history"], best)
    except Exception as e:
        if runs.answers(uri, run_id):
            raise
        summary.update(registered_version=None, mlflow_error=f"{type(e).__name__}: {_short(e)}")
        log.warning("MLflow at %s stopped answering while the model was registered (%s): no model registered, run %s "
                    "may stay RUNNING. Nothing trained is lost: the best model is %s.", uri, summary["mlflow_error"],
                    run_id, best)


def _unlogged_at_end(result, history: list[dict]) -> list[int]:
    """The epochs MLflow lacks as far as the workers knew: the last checkpoint's list (its own epoch included:
    logged after the checkpoint, so unknown here); every epoch for a checkpoint without one."""
    with result.checkpoint.as_directory() as d:
        known = load_checkpoint(Path(d) / "model.pt").get("mlflow_unlogged")
    return sorted(known) if known is not None else [h["epoch"] for h in history]


def _mark_failed(uri: str, run_id: str, error: BaseException) -> None:
    """end_run(FAILED) with why, never raising: an MLflow that is down must not hide the job's real error."""
    from densevse.pipeline.tracking import runs

    try:
        with runs.bounded():
            runs.end_run(uri, run_id, "FAILED", f"{type(error).__name__}: {error}")
    except Exception as e:  # noqa: BLE001
        log.warning("MLflow run %s not marked FAILED (MLflow at %s: %s: %s)", run_id, uri, type(e).__name__, _short(e))


def _trainer(cfg, task: Task, run_id: str | None, resume_from: Location | None, env: dict):
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    use_gpu = cfg.train.use_gpu
    cpus = cpus_per_worker(cfg.train.cpus_per_worker, cfg.train.num_workers, node_resources())
    return TorchTrainer(
        worker,
        train_loop_config={"cfg": cfg, "task": task, "mlflow_run_id": run_id, "cpus": cpus,
                           "resume_from": str(resume_from) if resume_from else None},
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=cfg.train.num_workers, use_gpu=use_gpu,
                                     resources_per_worker={"GPU": 1, "CPU": cpus} if use_gpu else {"CPU": cpus}),
        run_config=RunConfig(name=f"{cfg.run.name}-{task.name}-{time.strftime('%Y%m%d-%H%M%S')}",
                             **store.ray_storage(storage(cfg)),
                             failure_config=FailureConfig(max_failures=cfg.train.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=None),
                             worker_runtime_env={"env_vars": env}),
    )


def save_best(result, dest: Location, score) -> tuple[list[dict], int]:
    """Copy the best epoch's checkpoint (highest `score(history entry)`), without optimizer state, to dest
    (written whole: storage.put_atomic).

    The history comes from the last checkpoint, which carries every epoch's metrics (resumed runs included)."""
    with result.checkpoint.as_directory() as d:
        history = load_checkpoint(Path(d) / "model.pt")["history"]
    best_epoch = max(history, key=score)["epoch"]
    for ckpt, _ in result.best_checkpoints:
        with ckpt.as_directory() as d:
            ck = load_checkpoint(Path(d) / "model.pt")
        if ck["epoch"] == best_epoch:
            ck.pop("optimizer", None)
            buf = io.BytesIO()
            torch.save(ck, buf)
            store.put_atomic(dest, buf.getvalue())
    return history, best_epoch


# ---------------------------------------------------------------- worker


def worker(config: dict) -> None:
    """One Ray Train worker: restore, then per epoch train, all-reduce, (rank 0) evaluate, log and checkpoint."""
    import ray.train
    import ray.train.torch

    cfg, task, run_id = config["cfg"], config["task"], config["mlflow_run_id"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device() if cfg.train.use_gpu else torch.device("cpu")
    torch.manual_seed(cfg.train.seed)
    if device.type == "cpu":
        torch.set_num_threads(config.get("cpus") or 1)  # Ray sets OMP_NUM_THREADS to it as well
    state, from_ray = _restore(config["resume_from"])
    _setup_data(cfg, task, rank, world, device)
    core, model, opt = _build(task, state, world, device)
    history = state["history"] if state else []
    unlogged = list(state.get("mlflow_unlogged") or []) if state else []  # epochs MLflow may lack
    stop = None
    fail_at = int(os.environ.get(FAIL_AT_EPOCH) or -1) if rank == 0 and not from_ray else -1

    for epoch in range(state["epoch"] + 1 if state else 0, task.epochs):
        if epoch == fail_at:
            raise RuntimeError(f"{FAIL_AT_EPOCH}={epoch}: injected crash (recovery test)")
        metrics = _train_epoch(cfg, task, model, core, opt, epoch, world)
        checkpoint = None
        if rank == 0:
            metrics.update(task.evaluate(core))
            history.append(metrics)
            if run_id:
                unlogged = sorted({*unlogged, epoch})  # until MLflow has it
            checkpoint = _checkpoint(cfg, task, core, opt, epoch, history, run_id, unlogged)
            emit({"step": "train", "epochs": task.epochs, **metrics})  # the driver's console shows the epoch
            stop = early_stop(history, task.best_score, task.patience)
        ray.train.report(metrics, checkpoint=checkpoint)  # first: an MLflow outage must not cost the epoch
        if checkpoint is not None:  # Ray has copied it to the run's storage
            shutil.rmtree(checkpoint.path, ignore_errors=True)
        if rank == 0 and run_id:
            _barrier(epoch)
            unlogged = log_epochs(cfg.mlflow.tracking_uri, run_id, history, unlogged, epoch)
        if _all_stop(rank == 0 and stop is not None, world, device):
            if rank == 0:
                emit({"step": "train", "message": stop})
            break


def log_epochs(uri: str, run_id: str, history: list[dict], unlogged: list[int], epoch: int) -> list[int]:
    """Rank 0, once epoch `epoch`'s checkpoint is reported: log it, and every earlier epoch MLflow lacks, bounded
    and best-effort (module docstring). Returns the epochs MLflow may still lack: [] once a backfill went through,
    else `unlogged` (which holds `epoch`); a failure is a warning on the driver's console, never an exception."""
    from densevse.pipeline.tracking import runs

    try:
        with runs.bounded():
            done = runs.backfill(uri, run_id, history)
    except Exception as e:  # noqa: BLE001 - whatever MLflow's failure, the training goes on
        msg = (f"warning: MLflow at {redact_uri(uri)} did not take epoch {epoch + 1}'s metrics ({type(e).__name__}: "
               f"{_short(e, 200)}); training goes on, and MLflow steps {unlogged} are logged once it answers again")
        log.warning(msg)
        emit({"step": "train", "message": msg})
        return unlogged
    late = sorted(set(done) - {epoch})
    if late:
        emit({"step": "train", "message": f"MLflow answers again: steps {late} logged late"})
    return []


def _barrier(epoch: int) -> None:
    """The test hook DENSEVSE_EPOCH_BARRIER (module docstring); off when unset or empty."""
    where = os.environ.get(EPOCH_BARRIER)
    if not where:
        return
    (Path(where) / f"reported-{epoch}").touch()
    deadline = time.time() + 600
    while not (Path(where) / f"go-{epoch}").exists():
        if time.time() > deadline:
            raise TimeoutError(f"{EPOCH_BARRIER}: no go-{epoch} in {where} within 600 s")
        time.sleep(0.1)


def _all_stop(stop: bool, world: int, device) -> bool:
    """Rank 0's early-stop decision on every rank: all must leave the epoch loop together (each reports)."""
    if world == 1:
        return stop
    import torch.distributed as dist

    flag = torch.tensor([int(stop)], device=device)
    dist.broadcast(flag, src=0)
    return bool(flag.item())


def _restore(resume_from: str | None) -> tuple[dict | None, bool]:
    """(checkpoint, whether Ray restored it): Ray's latest after a worker-group restart, else --resume's."""
    import ray.train

    restored = ray.train.get_checkpoint()
    if restored is not None:
        with restored.as_directory() as d:
            return load_checkpoint(Path(d) / "model.pt"), True
    return (load_dir(resume_from) if resume_from else None), False


def _setup_data(cfg, task: Task, rank: int, world: int, device) -> None:
    """Every task shards the same way: rank r gets its reads of the train shards; rank 0 the val shards."""
    train = shardset.shard_paths(cfg.shard_dir, "train")
    if not train:
        raise FileNotFoundError(f"worker {rank}: no train shards in {cfg.shard_dir}")
    task.setup(cfg, shardset.rank_shards(train, rank, world),
               shardset.shard_paths(cfg.shard_dir, "val") if rank == 0 else [], device)


def _build(task: Task, state: dict | None, world: int, device):
    """(core model, the model to train: core or its DDP wrapper, Adam), restored from `state` when given."""
    import ray.train.torch

    core = task.make_model(state["hparams"] if state else None)
    if state:
        core.load_state_dict(state["state_dict"])
    core.to(device)
    # Which parameters get a gradient depends on the data: with one region per image (the whole image only,
    # e.g. Flickr8k without a detector) HM-LSTM's region tree never runs its child gates, and DDP would fail.
    model = ray.train.torch.prepare_model(core, move_to_device=device,
                                          parallel_strategy_kwargs={"find_unused_parameters": True}) \
        if world > 1 else core
    opt = torch.optim.Adam(core.parameters(), lr=task.lr)
    if state:
        opt.load_state_dict(state["optimizer"])
    return core, model, opt


def _train_epoch(cfg, task: Task, model, core, opt, epoch: int, world: int) -> dict:
    """Train one epoch on every rank; the epoch's metrics, summed over all ranks."""
    import torch.distributed as dist

    model.train()
    task.step_timer = StepTimer()
    t = time.time()
    with model.join() if world > 1 else contextlib.nullcontext():  # ranks may have unequal batch counts
        sums, pairs = task.train_epoch(model, core, opt, epoch)
    seconds = time.time() - t
    total = torch.tensor([*sums.values(), pairs], dtype=torch.float64)
    if world > 1:
        dist.all_reduce(total)
    n = float(total[-1])
    if n == 0:  # never report an epoch that trained on nothing as a success
        raise RuntimeError(f"epoch {epoch}: 0 training pairs on {world} worker(s) from the train shards in "
                           f"{cfg.shard_dir}{task.no_pairs_hint}")
    return {"epoch": epoch, **{f"train_{k}": float(v) / n for k, v in zip(sums, total)}, "train_pairs": int(n),
            "pairs_per_s": n / max(seconds, 1e-9), "epoch_seconds": seconds, **task.step_timer.metrics()}


def _checkpoint(cfg, task: Task, core, opt, epoch: int, history: list[dict], run_id: str | None,
                unlogged: list[int] | None = None):
    """model.pt in a temp dir, as a Ray checkpoint (the caller removes the dir once reported). `unlogged`: the
    epochs MLflow lacks as of now (this one included: it is logged after the checkpoint is reported)."""
    import ray.train

    tmp = Path(tempfile.mkdtemp(prefix=f"densevse-{task.name}-"))
    torch.save({"model_name": task.model_name, "hparams": core.hparams, "state_dict": core.state_dict(),
                "optimizer": opt.state_dict(), **task.checkpoint_extra(), "epoch": epoch, "history": history,
                "mlflow_run_id": run_id, "mlflow_unlogged": list(unlogged or []), "model_files": task.model_files,
                "config": public_config(cfg)}, tmp / "model.pt")  # credentials redacted: checkpoints are shared
    return ray.train.Checkpoint.from_directory(str(tmp))
