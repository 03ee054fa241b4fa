"""Pipeline runs as Ray Jobs: submit to a cluster's head, then follow, read and stop them.

    densevse submit pipeline.yaml --address http://HEAD:8265 [-s key=value ...] [--command run] [--wait]
    densevse status [JOB] --address http://HEAD:8265      # one job's state, or every job's
    densevse logs JOB [--follow] --address ...
    densevse stop JOB --address ...
    densevse submit pipeline.yaml --address local          # the same run, in this process

What is shipped: the config is loaded and validated here, overrides applied, before anything is sent; the
project's code, laid out as installed (densevse/models, densevse/stages, densevse/pipeline, densevse/cluster),
plus that resolved config (as densevse-job.yaml) and the stage models it names by relative path are copied to
a staging directory that becomes the job's runtime_env working_dir. Ray uploads it, every node unpacks it, and
the job runs `python -m densevse.pipeline.cli <command> densevse-job.yaml` in it. The working_dir comes first on
sys.path (for the job's workers too), ahead of the nodes' installed `densevse`, so the job runs the code as it
is here now, not whatever copy or editable install a node has. The nodes' Python environment is the cluster image's (setup.sh, see
cluster/aws.yaml); `--pip` adds packages for one job.
"""
from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
import uuid
from pathlib import Path

from densevse.pipeline.code import NAMESPACE, PACKAGES, ROOT
JOB_CONFIG = "densevse-job.yaml"
# Never shipped: environments, outputs, caches, datasets, VCS metadata (the runtime_env repeats them as excludes).
EXCLUDES = [".venv", "runs", ".cache", "data", "mlruns", "mlflow", "mlflow.db", ".git", "__pycache__", "*.pyc",
            "*.egg-info", ".pytest_cache", "build", "dist", ".whl", ".gl"]
COMMANDS = ("run", "preprocess", "train", "evaluate")
DONE = {"SUCCEEDED", "FAILED", "STOPPED"}


def default_address() -> str:
    """The dashboard URL: RAY_API_SERVER_ADDRESS / RAY_ADDRESS when they are http URLs, else the local head."""
    for var in ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS"):
        if os.environ.get(var, "").startswith("http"):
            return os.environ[var]
    return "http://127.0.0.1:8265"


def job_config(config: str | Path | None, overrides: list[str]):
    """The validated config the job runs: overrides applied; ray.address=auto (join the cluster it runs on)."""
    from densevse.pipeline.config import load_config

    cfg = load_config(config, overrides)
    cfg.ray.address = "auto"
    return cfg


def stage(cfg, dest: Path) -> Path:
    """Copy the project, the stage models the config names by relative path (trained here, under the
    otherwise excluded .cache/), and the resolved config into `dest` (the job's working_dir), so the job's
    driver finds the same models instead of training them again."""
    from densevse.pipeline.config import dump_config

    for pkg in PACKAGES:  # the code, importable as densevse.<pkg> from the working dir
        shutil.copytree(ROOT / pkg, dest / NAMESPACE / pkg, ignore=shutil.ignore_patterns(*EXCLUDES),
                        dirs_exist_ok=True)
    for _, rel in local_stage_models(cfg):
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        (shutil.copytree if (ROOT / rel).is_dir() else shutil.copy2)(ROOT / rel, target)
    (dest / JOB_CONFIG).write_text(dump_config(cfg))
    return dest


def _relative_model_paths(cfg) -> list[tuple[str, str]]:
    """(config key, value) of every stage model path given relative to the project."""
    out = []
    for name in type(cfg.stages).model_fields:
        params = getattr(cfg.stages, name).params
        for field in getattr(params, "model_paths", ()):
            v = getattr(params, field)
            if isinstance(v, str) and "://" not in v and not Path(v).is_absolute():
                out.append((f"stages.{name}.params.{field}", v))
    return out


def local_stage_models(cfg) -> list[tuple[str, str]]:
    """The relative stage model paths that exist here: shipped with the job."""
    return [(k, v) for k, v in _relative_model_paths(cfg) if (ROOT / v).exists()]


def unshipped_paths(cfg) -> list[tuple[str, str]]:
    """Relative paths the job cannot see as they are here: the output dir, and relative stage model paths that
    do not exist here (the job's driver trains the project's defaults, or fails naming the path)."""
    found = [] if cfg.run.output_dir.is_absolute() else [("run.output_dir", str(cfg.run.output_dir))]
    return found + [(k, v) for k, v in _relative_model_paths(cfg) if not (ROOT / v).exists()]


def entrypoint(command: str, python: str = "python") -> str:
    quiet = " --quiet" if command in ("run", "preprocess") else ""  # no progress bars in job logs
    return f"{python} -m densevse.pipeline.cli {command} {JOB_CONFIG}{quiet}"


def runtime_env(working_dir: Path, pip: list[str] | None = None) -> dict:
    # .cache/ is kept: `stage` put only the stage models the config names there.
    env = {"working_dir": str(working_dir), "excludes": [e for e in EXCLUDES if e != ".cache"],
           "env_vars": {"PYTHONUNBUFFERED": "1"}}
    if pip:
        env["pip"] = list(pip)
    return env


def use_token_auth() -> None:
    """Present Ray's auth token (~/.ray/auth_token, RAY_AUTH_TOKEN[_PATH]) when there is one and RAY_AUTH_MODE is
    unset: clusters started with token auth (Ray's default for new clusters, and cluster/local.sh) refuse
    Jobs/state API calls without it, and only ray.init turns it on by itself."""
    try:
        from ray._private.authentication.authentication_token_setup import (
            maybe_enable_token_auth_if_token_available)
    except ImportError:  # a Ray without token auth
        return
    maybe_enable_token_auth_if_token_available(warn_if_disabled=False)


def client(address: str):
    from ray.job_submission import JobSubmissionClient

    use_token_auth()
    return JobSubmissionClient(address)


def submit(config: str | Path | None, overrides: list[str] | None = None, address: str | None = None,
           command: str = "run", pip: list[str] | None = None, python: str = "python",
           submission_id: str | None = None) -> str:
    """Submit one pipeline command as a Ray job; returns its submission id."""
    if command not in COMMANDS:
        raise ValueError(f"command must be one of {COMMANDS}, not {command!r}")
    cfg = job_config(config, overrides or [])
    for key, value in unshipped_paths(cfg):
        what = ("outputs are lost with it; use a path on shared storage" if key == "run.output_dir" else
                "it does not exist here, so the job's driver trains it if it is the project's default model, "
                "else the job fails naming it")
        print(f"densevse: warning: {key}={value} is relative: the job resolves it in its own temporary working "
              f"dir ({what})", file=sys.stderr)
    submission_id = submission_id or f"densevse-{command}-{cfg.run.name}-{time.strftime('%Y%m%d-%H%M%S')}-" \
                                     f"{uuid.uuid4().hex[:6]}"
    with tempfile.TemporaryDirectory(prefix="densevse-job-") as tmp:
        staged = stage(cfg, Path(tmp) / "project")
        return client(address or default_address()).submit_job(
            entrypoint=entrypoint(command, python), runtime_env=runtime_env(staged, pip),
            submission_id=submission_id, metadata={"densevse_command": command, "run": cfg.run.name})


def follow(address: str, job_id: str, timeout: float | None = None, out=sys.stdout, poll: float = 2.0) -> str:
    """Print the job's logs as they grow until it ends (or `timeout` s pass); returns its last status."""
    c = client(address)
    shown, deadline, failures = 0, None if timeout is None else time.time() + timeout, 0
    while True:
        try:
            status, logs = str(c.get_job_status(job_id).value), c.get_job_logs(job_id)
            failures = 0
        except Exception:  # a busy head can time out a request: retry a few times before giving up
            failures += 1
            if failures >= 10:
                raise
            time.sleep(poll)
            continue
        if out is not None and len(logs) > shown:
            out.write(logs[shown:])
            out.flush()
        shown = len(logs)
        if status in DONE or (deadline is not None and time.time() > deadline):
            return status
        time.sleep(poll)


def _info(details) -> dict:
    keys = ("submission_id", "status", "message", "entrypoint", "start_time", "end_time", "metadata")
    return {k: getattr(details, k, None) for k in keys}


