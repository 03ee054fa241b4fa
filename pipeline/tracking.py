"""MLflow: the tracking server, run logging, figures, and the registered embedding model.

    densevse mlflow --port 5000 --dir mlflow     # sqlite backend, artifacts under mlflow/artifacts, 127.0.0.1

A training run logs: every config value as a param, the resolved pipeline.yaml, the sha256 of the shard
manifest (which data it saw), per-epoch metrics (losses, val R@K), loss and R@K curves, an alignment figure
(an image, its regions, and the caption phrases each region won), and the best epoch as an mlflow.pyfunc model
registered as cfg.mlflow.registered_model.

The pyfunc model (pipeline/pyfunc_model.py) embeds region features and trees into the shared space.
"""
from __future__ import annotations

import math
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from densevse.pipeline import code, storage


# ---------------------------------------------------------------- server


def absolute_uri(uri: str | None) -> str | None:
    """A local tracking URI with its path made absolute (sqlite:///rel.db, file:rel, rel/dir); others (servers,
    databricks) as given."""
    if not uri:
        return uri
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return "sqlite:///" + str(Path(uri[len("sqlite:///"):]).resolve())
    if uri.startswith("file:") and not uri.startswith("file:/"):
        return "file:" + str(Path(uri[len("file:"):]).resolve())
    if ":" not in uri and not uri.startswith(("databricks", "uc")):  # a bare path: MLflow's file store
        return str(Path(uri).resolve())
    return uri


def server_command(root: Path, host: str = "127.0.0.1", port: int = 5000, auth: bool = False,
                   artifacts: str | Path | None = None) -> list[str]:
    """`mlflow server` on root's sqlite store; auth: MLflow's basic-auth app (every API call needs a user/password).
    artifacts: where the server stores artifacts (a local path or s3:// gs:// URI; default root/artifacts). The
    server proxies them (--serve-artifacts): clients need no object-store credentials."""
    root = Path(root).resolve()
    dest = storage.location(artifacts) if artifacts is not None else root / "artifacts"
    cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{root}/mlflow.db",
           "--artifacts-destination", str(dest), "--serve-artifacts",
           "--host", host, "--port", str(port), "--workers", "1"]
    return cmd + ["--app-name", "basic-auth"] if auth else cmd


def server_env(root: Path | None = None, auth: bool = False, auth_config: Path | None = None) -> dict:
    """The server's environment: MLflow 3's background job runner (unused here) is off, it slows startup. With auth,
    what the basic-auth app reads at start: its config file (MLFLOW_AUTH_CONFIG_PATH: `auth_config`, else
    root/basic_auth.ini, written once, whose user store is root/basic_auth.db rather than one in the working dir)
    and a static Flask secret key for its CSRF checks (MLFLOW_FLASK_SERVER_SECRET_KEY: from the environment, else
    made once in root/flask_secret_key). The admin password is never written here: MLflow takes it from
    MLFLOW_AUTH_ADMIN_PASSWORD (or the config file's admin_password) when it creates the admin user."""
    import os
    import secrets

    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    if not auth:
        return env
    root = Path(root).resolve()
    root.mkdir(parents=True, exist_ok=True)
    if auth_config is None:
        auth_config = root / "basic_auth.ini"
        if not auth_config.exists():
            auth_config.write_text(  # MLflow's defaults but for the user store's place
                f"[mlflow]\ndefault_permission = READ\ndatabase_uri = sqlite:///{root}/basic_auth.db\n"
                "admin_username = admin\nauthorization_function = mlflow.server.auth:authenticate_request_basic_auth\n")
    env["MLFLOW_AUTH_CONFIG_PATH"] = str(Path(auth_config).resolve())
    if not env.get("MLFLOW_FLASK_SERVER_SECRET_KEY"):
        key = root / "flask_secret_key"
        if not key.exists():
            fd = os.open(key, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_hex(32))
        env["MLFLOW_FLASK_SERVER_SECRET_KEY"] = key.read_text().strip()
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(root: Path, port: int | None = None, host: str = "127.0.0.1", timeout: float = 120,
                 wait: bool = True, auth: bool = False, artifacts: str | Path | None = None):
    """Start `mlflow server` in the background; returns (process, tracking uri), by default once /health
    answers (wait=False: at once, call wait_server before use, so other setup overlaps its slow start).
    auth: the basic-auth app (server_env; MLFLOW_AUTH_ADMIN_PASSWORD must be set on its first start)."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    log = open(root / "server.log", "ab")
    # Own session: stop_server ends the server and every process it spawned (uvicorn) as one group.
    proc = subprocess.Popen(server_command(root, host, port, auth, artifacts), stdout=log, stderr=subprocess.STDOUT,
                            env=server_env(root, auth), start_new_session=True)
    uri = f"http://{host}:{port}"
    if wait:
        wait_server(proc, uri, timeout)
    return proc, uri


def wait_server(proc: subprocess.Popen, uri: str, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"mlflow server exited with {proc.returncode}; see its server.log")
        try:
            with urllib.request.urlopen(f"{uri}/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    stop_server(proc)
    raise TimeoutError(f"mlflow server did not answer on {uri} within {timeout}s")


def stop_server(proc: subprocess.Popen, timeout: float = 20) -> None:
    """Terminate a server from start_server, with its children (its own process group)."""
    import os
    import signal

    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        except ProcessLookupError:
            pass


# ---------------------------------------------------------------- run logging


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def manifest_sha256(shard_dir: Path) -> str | None:
    """The hash of the data a run trains on, logged as `dataset.manifest_sha256` (name kept so runs logged
    before stay comparable): shards.dataset_sha256, over each manifest shard's tar sha256 and config
    fingerprint, since a hash of manifest.parquet alone stays the same when only the features change."""
    from densevse.pipeline.preprocess.shards import dataset_sha256

    return dataset_sha256(shard_dir)


def start_run(cfg) -> str:
    """Create the MLflow run of a training job: params, config file, dataset manifest hash. Returns run id."""
    import mlflow
    from mlflow.entities import Param
    from mlflow.tracking import MlflowClient

    from densevse.pipeline.config import dump_config, public_config

    mlflow.set_tracking_uri(cfg.mlflow.tracking_uri)
    exp = mlflow.set_experiment(cfg.mlflow.experiment)
    client = MlflowClient(cfg.mlflow.tracking_uri)
    digest = manifest_sha256(cfg.shard_dir)
    run = client.create_run(exp.experiment_id, run_name=f"{cfg.run.name}-{cfg.train.model}",
                            tags={"model": cfg.train.model, "dataset": cfg.dataset.kind,
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


def finish_run(cfg, run_id: str, history: list[dict], best_path: Path, score: float | None = None) -> int | None:
    """Curves, alignment figure, and the best embedding model logged + registered with the stage models it
    needs for raw input (pipeline/serving/pyfunc.py); the version becomes `champion` when its validation
    `score` beats the current champion's. Returns the version."""
    from densevse.pipeline.serving.embedder import bundled_paths, is_pickle_file
    from densevse.pipeline.serving.pyfunc import signature

    stages = {name: (sc.impl, sc.params) for name, sc in cfg.stages}
    paths = bundled_paths(stages)
    bundle = {k: str(p.resolve()) for k, p in paths.items() if not is_pickle_file(p)}
    pickled = sorted(set(paths) - set(bundle))  # loading would refuse them (plain pickle): not shipped

    def figures(client):
        if pickled:
            client.set_tag(run_id, "stage_models_not_bundled", f"{', '.join(pickled)}: .pkl weights load with "
                           f"plain pickle; convert them to .pth to serve raw images with the registered model")
        try:
            fig = alignment_figure(best_path, cfg.shard_dir)
            if fig is not None:
                client.log_figure(run_id, fig, "plots/alignment.png")
        except Exception as e:  # noqa: BLE001 - a figure must not lose the trained model
            client.set_tag(run_id, "alignment_figure_error", repr(e)[:500])

    return _log_model(cfg.mlflow.tracking_uri, run_id, history, best_path, "embedding_model.py", signature(),
                      cfg.mlflow.registered_model, figures, extra_artifacts=bundle,
                      input_example=example_input(cfg.shard_dir), score=score)


def example_input(shard_dir: Path):
    """One image (base64 JPEG) and one caption of the first val (else train) sample: the logged input_example."""
    import base64

    import pandas as pd

    from densevse.pipeline.preprocess.shards import shard_paths
    from densevse.pipeline.training.data import iter_samples

    for split in ("val", "train"):
        for s in iter_samples(shard_paths(shard_dir, split)[:1], with_image=True):
            text = s["meta"]["captions"][0]["text"]
            return pd.DataFrame({"image": [base64.b64encode(s["jpg"]).decode(), None], "text": [None, text]})
    return None


def register_captioner(cfg, run_id: str, history: list[dict], best_path: Path) -> int | None:
    """Loss curve + the best checkpoint as a pyfunc model registered as cfg.captioner.registered_model."""
    from densevse.pipeline.serving.pyfunc import pyfunc_signature

    return _log_model(cfg.mlflow.tracking_uri, run_id, history, best_path, "captioner_model.py", pyfunc_signature(),
                      cfg.captioner.registered_model)


CHAMPION = "champion"  # the alias users load: models:/<name>@champion
REQUIREMENTS = ["torch", "torchvision", "numpy", "pandas", "pyarrow", "pydantic", "pyyaml", "mlflow", "pillow",
                "stanza", "webdataset", "efficientnet-lite-pytorch"]  # + Detectron2: cluster/install_detectron2.py


def _log_model(uri: str, run_id: str, history: list[dict], best_path: Path, code_model: str, signature, name: str,
               figures=None, extra_artifacts: dict | None = None, input_example=None,
               score: float | None = None) -> int | None:
    """The run's curves (+ `figures(client)`), then the checkpoint (+ `extra_artifacts`) as an mlflow.pyfunc
    model registered as `name`, shipping the project's library code so the model loads where the project is
    not installed; then `promote` it. `code_model`: a models-from-code file of pipeline/serving (MLflow runs it
    to load the model; a pickled PythonModel would be unpickled instead)."""
    import matplotlib

    matplotlib.use("Agg")
    import mlflow
    from mlflow.tracking import MlflowClient

    mlflow.set_tracking_uri(uri)
    client = MlflowClient(uri)
    for fig_name, fig in curves(history).items():
        client.log_figure(run_id, fig, f"plots/{fig_name}.png")
    if figures is not None:
        figures(client)
    model_file = code.ROOT / "pipeline" / "serving" / code_model
    with mlflow.start_run(run_id=run_id), tempfile.TemporaryDirectory(prefix="densevse-code-") as tmp:
        shipped = code.ship([code.module_name(model_file)], Path(tmp))  # only what loading the model imports
        info = mlflow.pyfunc.log_model(
            name="model", python_model=str(model_file),
            artifacts={"checkpoint": str(best_path), **(extra_artifacts or {})},
            signature=signature, registered_model_name=name, input_example=input_example,
            code_paths=[str(shipped)], pip_requirements=REQUIREMENTS)
        mlflow.set_tag("best_model", str(best_path))
    version = info.registered_model_version
    if version is not None:
        promote(client, name, str(version), score, run_id)
    return version


def promote(client, name: str, version: str, score: float | None, run_id: str) -> bool:
    """Tag the version with its validation score; give it the `champion` alias when there is no champion yet
    or its score is at least the champion's (a version without a score never displaces one with a score)."""
    if score is not None:
        client.set_model_version_tag(name, version, "score", repr(float(score)))
    client.set_model_version_tag(name, version, "run_id", run_id)
    try:
        current = client.get_model_version_by_alias(name, CHAMPION)
    except Exception:  # noqa: BLE001 - MlflowException RESOURCE_DOES_NOT_EXIST: no champion yet
        current = None
    if current is not None and current.version != version:
        theirs = current.tags.get("score")
        if theirs is not None and (score is None or float(score) < float(theirs)):
            return False
    client.set_registered_model_alias(name, CHAMPION, version)
    return True


def curves(history: list[dict]) -> dict:
    import matplotlib.pyplot as plt

    ep = [h["epoch"] for h in history]
    figs = {}
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for k in ("train_loss", "train_loss_sentence", "train_loss_phrase"):
        if any(h.get(k) for h in history):
            ax.plot(ep, [h.get(k, float("nan")) for h in history], marker="o", label=k)
    ax.set_xlabel("epoch"), ax.set_ylabel("loss"), ax.legend(), ax.set_title("training loss")
    figs["loss_curves"] = fig
    keys = [k for k in history[0] if k.startswith("val_") and "_r" in k and not k.endswith(("medr", "meanr"))
            and k != "val_rsum"]
    if keys:
        fig, ax = plt.subplots(figsize=(5, 3.5))
        for k in keys:
            ax.plot(ep, [h.get(k, float("nan")) for h in history], marker="o", label=k[4:])
        ax.set_xlabel("epoch"), ax.set_ylabel("recall (%)"), ax.legend(fontsize=7), ax.set_title("validation R@K")
        figs["recall_curves"] = fig
    return figs


def alignment_figure(best_path: Path, shard_dir: Path, split: str = "val"):
    """The first image of `split` with its regions, each labelled with the phrases that score highest on it."""
    import io

    import matplotlib.pyplot as plt
    import torch
    from PIL import Image

    from densevse.models.batch import collate
    from densevse.models.checkpoint import load_model
    from densevse.pipeline.preprocess.shards import shard_paths
    from densevse.pipeline.training.data import eval_items

    paths = shard_paths(shard_dir, split) or shard_paths(shard_dir, "test") or shard_paths(shard_dir, "train")
    items = next(eval_items(paths[:1], 1, 1, with_image=True), None)
    if not items:
        return None
    model, vocab, labels, _ = load_model(best_path)
    b = collate(items, vocab, labels)
    with torch.no_grad():
        img, txt = model(b)
        best = model.phrase_scores(img, txt)[:, 0].argmax(-1)  # (P,) best candidate region per phrase
    fig, ax = plt.subplots(figsize=(6, 6.6))
    ax.imshow(Image.open(io.BytesIO(items[0][0]["jpg"])).convert("RGB"))
    colors = plt.cm.tab10.colors
    won: dict[int, list[str]] = {}
    for p, r in enumerate(best.tolist()):
        won.setdefault(r, []).append(b.phrase_text[p])
    for r in range(b.valid[0].sum().item()):
        x0, y0, x1, y1 = b.boxes[0, r].tolist()
        c = colors[r % 10]
        ax.add_patch(plt.Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, color=c, lw=2, ls="-" if r else "--"))
        if r in won:
            ax.text(x0, y0, "\n".join(sorted(set(won[r]), key=len)[:4]), color="white", fontsize=7, va="bottom",
                    bbox={"facecolor": c, "alpha": 0.8, "pad": 1})
    ax.set_title(items[0][1][0]["text"], fontsize=9)
    ax.axis("off")
    return fig
