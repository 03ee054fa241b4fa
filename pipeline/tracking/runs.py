"""An MLflow run of a training job: created with the job's params, config and data hash, one log call per epoch,
and what survives an outage: bounded calls, a backfill of the epochs MLflow lacks, the run's end status.

A training run logs every config value as a param, the resolved pipeline.yaml, the sha256 of the shard manifest
(which data it saw) and per-epoch metrics (losses, val R@K). Its figures and registered model:
pipeline/tracking/registry.py.
"""
from __future__ import annotations

import math
import time


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def manifest_sha256(shard_dir) -> str | None:
    """The hash of the data a run trains on, logged as `dataset.manifest_sha256` (name kept so runs logged
    before stay comparable): shards.dataset_sha256, over each manifest shard's tar sha256 and config
    fingerprint, since a hash of manifest.parquet alone stays the same when only the features change."""
    from densevse.pipeline.shardset import dataset_sha256

    return dataset_sha256(shard_dir)


def start_run(cfg, run_name: str | None = None, model: str | None = None) -> str:
    """Create the MLflow run of a training job: params, config file, dataset manifest hash. Returns run id.
    `run_name` (default <run.name>-<train.model>) and the `model` tag (default train.model): the task trained."""
    import mlflow
    from mlflow.entities import Param
    from mlflow.tracking import MlflowClient

    from densevse.pipeline.config import dump_config, public_config

    mlflow.set_tracking_uri(cfg.mlflow.tracking_uri)
    exp = mlflow.set_experiment(cfg.mlflow.experiment)
    client = MlflowClient(cfg.mlflow.tracking_uri)
    digest = manifest_sha256(cfg.shard_dir)
    run = client.create_run(exp.experiment_id, run_name=run_name or f"{cfg.run.name}-{cfg.train.model}",
                            tags={"model": model or cfg.train.model, "dataset": cfg.dataset.kind,
                                  "manifest_sha256": digest or "none"})
    params = {k: str(v)[:6000] for k, v in _flatten(public_config(cfg)).items()}  # no credentials in params
    params["dataset.manifest_sha256"] = digest or "none"
    items = [Param(k, v) for k, v in sorted(params.items())]
    for i in range(0, len(items), 100):
        client.log_batch(run.info.run_id, params=items[i:i + 100])
    client.log_text(run.info.run_id, dump_config(cfg, redact=True), "config/pipeline.yaml")
    return run.info.run_id


def log_epoch(uri: str, run_id: str, metrics: dict, step: int) -> None:
    from mlflow.tracking import MlflowClient

    MlflowClient(uri).log_batch(run_id, metrics=_metrics(metrics, step, int(time.time() * 1000)))


def _metrics(metrics: dict, step: int, ts: int) -> list:
    """An epoch entry's finite numbers as MLflow metrics at `step` (its "epoch" is the step, not a metric)."""
    from mlflow.entities import Metric

    return [Metric(k, float(v), ts, step) for k, v in metrics.items()
            if isinstance(v, (int, float)) and k != "epoch" and math.isfinite(float(v))]


# A best-effort MLflow call (an epoch's metrics while the job trains, the backfill after it) must not stall
# training for the ~4 minutes MLflow's client retries by default. Within `bounded()` a call that cannot reach
# the server fails after at most 3 tries of 5 s each plus 2 s of backoff: about 2 s when the connection is
# refused (server stopped), 17 s when the server accepts but never answers. A variable already set in the
# environment is left as it is (the bound is then yours).
BOUNDED_HTTP = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "5"}
LOGGED_MARKER = "train_pairs"  # in every epoch entry of the training loop: its steps are the epochs MLflow holds
MAX_BATCH = 1000  # metrics per log_batch call (MLflow's limit)


class bounded:
    """`with bounded():` MLflow's HTTP retries and timeout bounded (BOUNDED_HTTP) for the calls made inside:
    MLflow reads them per request. They are process-wide while it lasts."""

    def __enter__(self):
        import os

        self.added = {k: v for k, v in BOUNDED_HTTP.items() if k not in os.environ}
        os.environ.update(self.added)
        return self

    def __exit__(self, *exc) -> None:
        import os

        for k in self.added:
            os.environ.pop(k, None)


def unlogged(history: list[dict], logged_steps) -> list[dict]:
    """The history entries MLflow lacks (pure): those whose epoch is not among the steps it holds."""
    have = set(logged_steps)
    return [h for h in history if h["epoch"] not in have]


def metric_batches(entries: list[dict], ts: int, limit: int = MAX_BATCH) -> list[list]:
    """The entries' metrics, each entry at its epoch as step, in log_batch calls of at most `limit` metrics
    (pure); an entry is never split, so that one whole call makes a whole epoch."""
    out: list[list] = []
    for h in entries:
        ms = _metrics(h, h["epoch"], ts)
        if not out or len(out[-1]) + len(ms) > limit:
            out.append([])
        out[-1].extend(ms)
    return [b for b in out if b]


def backfill(uri: str, run_id: str, history: list[dict]) -> list[int]:
    """Log every entry of `history` that the run lacks (asked from MLflow: the steps of LOGGED_MARKER), each at
    its epoch as step; returns the epochs logged now. Idempotent: what MLflow holds is not logged twice. Raises
    when MLflow fails; a batch logged before the failure counts (MLflow has it)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    todo = unlogged(history, (m.step for m in client.get_metric_history(run_id, LOGGED_MARKER)))
    for batch in metric_batches(todo, int(time.time() * 1000)):
        client.log_batch(run_id, metrics=batch)
    return [h["epoch"] for h in todo]


def answers(uri: str, run_id: str) -> bool:
    """Whether MLflow answers for the run now (bounded): tells an outage from a real error of a failed call."""
    from mlflow.tracking import MlflowClient

    try:
        with bounded():
            MlflowClient(uri).get_run(run_id)
        return True
    except Exception:  # noqa: BLE001 - any failure to answer is "no"
        return False


def end_run(uri: str, run_id: str, status: str = "FAILED", reason: str | None = None) -> None:
    """Terminate the run; a failed one carries why in its "failure" tag (the UI shows it beside FAILED)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    if reason:
        client.set_tag(run_id, "failure", reason[:5000])
    client.set_terminated(run_id, status)


def reopen_run(uri: str, run_id: str) -> None:
    """A resumed run is RUNNING again while it trains (it was FAILED, or KILLED)."""
    from mlflow.tracking import MlflowClient

    MlflowClient(uri).update_run(run_id, status="RUNNING")
