"""Running on a Ray cluster: the cluster configs, what a job ships, and (slow) real jobs on a local multi-node
cluster (cluster/local.sh: a head and 2 worker nodes on 127.0.0.1) with faults injected by killing processes.

The fast tests check the launcher and KubeRay files at schema level (Ray's own schema for `ray up`; the
KubeRay kinds, entrypoint, token auth and the pipeline.yaml they carry) and the staged job. The slow ones show
the Jobs API refusing calls without Ray's auth token, then submit through it like a user: a run (preprocess +
train + evaluate) whose Ray Train worker is SIGKILLed after the first committed checkpoint, and a preprocessing
job whose worker node (the one running the model actor) is SIGKILLed.
"""
from __future__ import annotations

import json
import os
import signal
import tarfile
import time
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from densevse.pipeline import jobs
from densevse.cluster.local import local_cluster
from densevse.pipeline.config import load_config, parse_config

ROOT = Path(__file__).resolve().parents[1]

# Tiny but real: 20 train / 2 val / 10 test images in shards of 10, one feature actor with a small input; gold
# boxes and trees (the cluster's behaviour is under test here, not the Detectron2/Stanza models).
SMALL = ["dataset.synthetic.num_images=32", "dataset.synthetic.test_images=10", "shards.samples_per_shard=10",
         "stages.regions.impl=gold_boxes", "stages.regions.params={}", "stages.parse.impl=gold_trees",
         "stages.parse.params={}", "stages.features.params.input_size=64", "stages.features.concurrency=1",
         "stages.features.batch_size=16", "train.batch_size=16", "train.hidden_dim=32", "train.embed_dim=32",
         "train.word_vectors=random"]


# ---------------------------------------------------------------- configs (fast)


def test_aws_launcher_config_passes_rays_schema():
    from ray.autoscaler._private.util import prepare_config, validate_config

    cfg = prepare_config(yaml.safe_load((ROOT / "cluster" / "aws.yaml").read_text()))
    validate_config(cfg)  # defaults filled in, then Ray's ray-schema.json: what `ray up` does first
    types = cfg["available_node_types"]
    assert cfg["head_node_type"] in types and types["gpu_worker"]["resources"]["GPU"] >= 1
    assert any("bash setup.sh" in c for c in cfg["setup_commands"])
    head_start = " ".join(cfg["head_start_ray_commands"])
    assert "densevse/.venv/bin" in head_start and "--head" in head_start and "--num-cpus=0" in head_start
    assert all("densevse/.venv/bin" in c for c in cfg["worker_start_ray_commands"] if "ray start" in c)

    # token auth: every `ray start` (head, workers) runs with RAY_AUTH_MODE=token, after a check that fails the
    # start when the node has no token; the token is the operator's ~/.ray/auth_token, synced to every node
    assert cfg["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    for cmds in (cfg["head_start_ray_commands"], cfg["worker_start_ray_commands"]):
        starts = [i for i, c in enumerate(cmds) if "ray start" in c]
        assert starts and all("RAY_AUTH_MODE=token" in cmds[i] for i in starts)
        check = next(i for i, c in enumerate(cmds) if "RAY_AUTH_TOKEN" in c)
        assert check < starts[0] and "exit 1" in cmds[check] and "~/.ray/auth_token" in cmds[check]
    assert "--dashboard-host=0.0.0.0" in head_start  # reachable from the cluster, so only with the token above

    # secrets never reach the nodes: the MLflow server dir (user store, Flask key) and .env files are excluded
    # (rsync's patterns: a pattern without '/' matches a name at any depth; '**/' any leading path)
    import fnmatch

    def excluded(path: str) -> bool:
        parts = path.split("/")
        return any(any(fnmatch.fnmatch("/".join(parts[i:]), pat.removeprefix("**/")) or
                       fnmatch.fnmatch(parts[i], pat) for i in range(len(parts)))
                   for pat in cfg["rsync_exclude"])

    for secret in ("mlflow/basic_auth.db", "mlflow/flask_secret_key", ".env", "cluster/.env", "runs/x/prod.env",
                   "elsewhere/basic_auth.db"):
        assert excluded(secret), secret
    assert not excluded("pipeline/cli/main.py") and not excluded("setup.sh")


def test_kuberay_raycluster_and_rayjob():
    docs = {d["kind"]: d for d in yaml.safe_load_all((ROOT / "cluster" / "kuberay.yaml").read_text())}
    assert set(docs) == {"ConfigMap", "RayCluster", "RayJob"}
    rc, job = docs["RayCluster"], docs["RayJob"]
    assert rc["apiVersion"] == job["apiVersion"] == "ray.io/v1"
    assert job["spec"]["clusterSelector"]["ray.io/cluster"] == rc["metadata"]["name"]
    assert job["spec"]["entrypoint"].startswith("python -m densevse.pipeline.cli run /config/pipeline.yaml")

    pods = [rc["spec"]["headGroupSpec"]["template"]] + [g["template"] for g in rc["spec"]["workerGroupSpecs"]]
    assert len({c["image"] for p in pods for c in p["spec"]["containers"]}) == 1  # one image everywhere
    assert all(any(m["mountPath"] == "/data" for m in p["spec"]["containers"][0]["volumeMounts"]) for p in pods)
    assert {"mountPath": "/config", "name": "config"} in pods[0]["spec"]["containers"][0]["volumeMounts"]
    gpu = next(g for g in rc["spec"]["workerGroupSpecs"] if g["groupName"] == "gpu")
    assert gpu["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"

    # token auth: every Ray container, the autoscaler sidecar and the RayJob submitter get RAY_AUTH_MODE=token and
    # RAY_AUTH_TOKEN from one Secret; the dashboard listens on the pod network only with it
    token_env = [{"name": "RAY_AUTH_MODE", "value": "token"},
                 {"name": "RAY_AUTH_TOKEN", "valueFrom": {"secretKeyRef": {"name": "densevse-ray-auth",
                                                                           "key": "auth_token"}}}]
    # and MLflow's credentials from their own Secret in the Ray containers (the driver and rank 0 log to MLflow)
    mlflow_env = [{"name": f"MLFLOW_TRACKING_{k.upper()}", "valueFrom": {"secretKeyRef": {
        "name": "densevse-mlflow-auth", "key": k, "optional": True}}} for k in ("username", "password")]
    submitter = job["spec"]["submitterPodTemplate"]["spec"]["containers"]
    assert all(c["env"] == token_env + mlflow_env for p in pods for c in p["spec"]["containers"])
    assert "@" not in yaml.safe_load(docs["ConfigMap"]["data"]["pipeline.yaml"])["mlflow"]["tracking_uri"]
    assert rc["spec"]["autoscalerOptions"]["env"] == token_env and submitter[0]["env"] == token_env
    assert rc["spec"]["headGroupSpec"]["rayStartParams"]["dashboard-host"] == "0.0.0.0"

    # the shipped pipeline.yaml is a valid config whose model stages and training ask for GPUs
    cfg = parse_config(yaml.safe_load(docs["ConfigMap"]["data"]["pipeline.yaml"]))
    assert cfg.stages.regions.num_gpus > 0 and cfg.stages.features.num_gpus > 0 and cfg.train.use_gpu
    assert cfg.stages.ingest.num_gpus == cfg.stages.parse.num_gpus == 0
    assert str(cfg.run.output_dir).startswith("/data/")


def test_staged_job_carries_project_and_resolved_config(tmp_path):
    cfg = jobs.job_config(ROOT / "pipeline.yaml", ["train.epochs=3", "run.name=staged"])
    staged = jobs.stage(cfg, tmp_path / "project")
    code = staged / "densevse"  # laid out as installed: importable as densevse.* from the working dir
    assert (code / "pipeline" / "cli" / "main.py").is_file() and (code / "pipeline" / "jobs.py").is_file()
    assert not any((staged / d).exists() for d in (".venv", "runs", ".git", "pipeline", "models"))
    assert not list(code.rglob("__pycache__"))
    named = [Path(rel) for _, rel in jobs.local_stage_models(cfg)]
    shipped = [p.relative_to(staged) for p in (staged / ".cache").rglob("*") if p.is_file()]
    assert all(any(p.is_relative_to(n) for n in named) for p in shipped), (shipped, named)  # only those the config names
    shipped = load_config(staged / jobs.JOB_CONFIG)
    assert shipped.train.epochs == 3 and shipped.run.name == "staged" and shipped.ray.address == "auto"
    assert jobs.entrypoint("run") == f"python -m densevse.pipeline.cli run {jobs.JOB_CONFIG} --quiet"
    env = jobs.runtime_env(staged, pip=["stanza==1.9.2"])
    assert env["working_dir"] == str(staged) and ".venv" in env["excludes"] and env["pip"] == ["stanza==1.9.2"]


def test_submit_names_paths_the_job_cannot_see():
    gold = ["stages.parse.impl=gold_trees", "stages.parse.params={}"]
    cfg = load_config(ROOT / "pipeline.yaml", gold + ["run.output_dir=runs/x", "stages.regions.impl=detectron2",
                                                      "stages.regions.params={config: .cache/some-detector}"])
    assert jobs.unshipped_paths(cfg) == [("run.output_dir", "runs/x"),
                                         ("stages.regions.params.config", ".cache/some-detector")]
    cfg = load_config(ROOT / "pipeline.yaml", gold + ["run.output_dir=/shared/x", "stages.regions.impl=gold_boxes",
                                                      "stages.regions.params={}"])
    assert jobs.unshipped_paths(cfg) == []


def test_job_commands_are_registered():
    from densevse.pipeline.cli import cluster as cli
    from densevse.pipeline.cli.main import build_parser

    p = build_parser()
    a = p.parse_args(["submit", "pipeline.yaml", "--address", "local", "-s", "train.epochs=1", "--wait"])
    assert a.func is cli.cmd_submit and a.overrides == ["train.epochs=1"] and a.command == "run"
    assert p.parse_args(["status"]).func is cli.cmd_status
    assert p.parse_args(["logs", "job1", "-f"]).follow
    assert p.parse_args(["stop", "job1", "--address", "http://h:8265"]).address == "http://h:8265"


# ---------------------------------------------------------------- a real local cluster (slow)


@pytest.mark.slow
def test_jobs_api_refuses_calls_without_the_token(capsys):
    """A head-only local cluster with token auth (as aws.yaml and kuberay.yaml run theirs): GET /api/jobs/ is refused
    without the token (401) and with a wrong one (403), served with it; densevse's client sends it by itself."""
    import urllib.error
    import urllib.request

    from ray._raylet import AuthenticationTokenLoader

    from densevse.pipeline.cli.main import main

    def get(url: str, token: str | None = None) -> int:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        try:
            with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=60) as r:
                return r.status
        except urllib.error.HTTPError as e:
            return e.code

    with local_cluster(workers=0) as c:
        loader = AuthenticationTokenLoader.instance()
        loader.reset_cache()  # the head may have just made ~/.ray/auth_token
        token = loader.get_raw_token(ignore_auth_mode=True)
        url = f"{c.dashboard}/api/jobs/"
        assert (get(url), get(url, "not-" + token), get(url, token)) == (401, 403, 200)
        assert jobs.client(c.dashboard).list_jobs() == []
        assert main(["status", "--address", c.dashboard]) == 0 and capsys.readouterr().out == ""


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    from densevse.pipeline.tracking.server import start_server, stop_server

    proc, uri = start_server(tmp_path_factory.mktemp("mlflow"), wait=False)  # boots while the cluster starts
    yield proc, uri
    stop_server(proc)


@pytest.fixture(scope="module")
def cluster():
    """A head (0 CPUs: the job drivers) + 2 worker nodes (2 logical CPUs each)."""
    with local_cluster(workers=2, head_cpus=0, worker_cpus=2) as c:
        yield c


def _actors(dashboard: str, class_name: str) -> list:
    from ray.util.state import list_actors

    return [a for a in list_actors(address=dashboard, detail=True, limit=1000, timeout=120,
                                   raise_on_missing_output=False) if class_name in a.class_name]


def _wait(what: str, fn, timeout: float, poll: float = 0.5):
    """Poll fn until it returns something truthy; a failed poll (an overloaded dashboard) is retried."""
    deadline, error = time.time() + timeout, None
    while time.time() < deadline:
        try:
            v = fn()
        except Exception as e:  # noqa: BLE001 - e.g. ServerUnavailable while the machine is saturated
            v, error = None, e
        if v:
            return v
        time.sleep(poll)
    raise TimeoutError(f"timed out waiting for {what} (last error: {error!r})")


def _checkpoints(run_dir: Path) -> list[dict]:
    """Every complete checkpoint written; a copy the kill cut short (seen in CI: the worker died while Ray
    persisted its checkpoint) was never committed, and resume passes over it (loop.latest_checkpoint)."""
    from densevse.models.checkpoint import is_complete, load_checkpoint

    paths = [p for p in run_dir.glob("ray_train/*/checkpoint_*/model.pt") if is_complete(p)]
    return sorted((load_checkpoint(p) for p in paths), key=lambda c: c["epoch"])


def _epochs_committed(run_dir: Path) -> int | None:
    """How many epochs the latest checkpoint Ray Train has committed covers (its epoch + 1), from the controller's
    snapshot file, written when it registers a checkpoint; None before the first commit. A restart resumes there."""
    for snap in run_dir.glob("ray_train/*/checkpoint_manager_snapshot.json"):
        latest = json.loads(snap.read_text()).get("latest_checkpoint_result")
        if latest:
            return latest["metrics"]["epoch"] + 1
    return None


def _finish(dashboard: str, job_id: str, timeout: float) -> str:
    status = jobs.follow(dashboard, job_id, timeout=timeout, out=None)
    if status != "SUCCEEDED":
        print(jobs.client(dashboard).get_job_logs(job_id)[-6000:])
    return status


@pytest.mark.slow
def test_submitted_run_survives_killed_train_worker_and_lands_in_mlflow(cluster, mlflow_server, tmp_path):
    """submit -> preprocess + train + evaluate on the cluster; a Ray Train worker is SIGKILLed mid-training;
    training resumes from the last committed checkpoint (not from scratch) and the run is in MLflow."""
    from mlflow.tracking import MlflowClient

    from densevse.pipeline.tracking.server import wait_server

    proc, uri = mlflow_server
    wait_server(proc, uri, timeout=900)  # a loaded machine can take minutes to start it
    run_dir = tmp_path / "run"
    dash = cluster.dashboard
    job = jobs.submit(ROOT / "pipeline.yaml", SMALL + [
        f"run.output_dir={run_dir}", "run.name=cluster", "train.epochs=4", "train.max_failures=2",
        "train.patience=null",  # all 4 epochs: the kill must land mid-training
        f"mlflow.tracking_uri={uri}", "mlflow.experiment=cluster-test", "mlflow.registered_model=cluster-test"],
        address=dash, command="run")

    # Kill the training worker mid-training (4 epochs).
    worker = _wait("a RayTrainWorker", lambda: [a for a in _actors(dash, "RayTrainWorker") if a.state == "ALIVE"],
                   timeout=1800, poll=2)[0]
    # Killed once Ray Train's controller has committed a checkpoint (its snapshot file names it). A checkpoint
    # on disk is not enough: under load the controller can lag an epoch or more behind the worker (seen in CI:
    # epochs 0 and 1 on disk, none committed, so the restart rightly began from scratch).
    committed = _wait("a committed checkpoint", lambda: _epochs_committed(run_dir), 900, 0.2)
    os.kill(worker.pid, signal.SIGKILL)
    print(f"killed RayTrainWorker pid {worker.pid} on node {worker.node_id[:8]}; {committed} epoch(s) committed")

    assert _finish(dash, job, 1800) == "SUCCEEDED"
    summary = json.loads((run_dir / "train-hmlstm.json").read_text())
    # resumed, not restarted: every epoch up to the committed one trained once (later ones at most redone), all
    # epochs present, the killed worker replaced
    epochs = [c["epoch"] for c in _checkpoints(run_dir)]
    assert sorted(set(epochs)) == [0, 1, 2, 3] and epochs.count(0) == 1, epochs
    assert all(epochs.count(e) == 1 for e in range(committed)), (epochs, committed)
    assert [h["epoch"] for h in summary["history"]] == [0, 1, 2, 3]
    workers = _actors(dash, "RayTrainWorker")
    assert any(a.pid == worker.pid and a.state == "DEAD" for a in workers) and len(workers) >= 2

    # the job's run is in MLflow, with the shipped config and every epoch's metrics
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("cluster-test")
    runs = client.search_runs([exp.experiment_id])
    assert [r.info.run_id for r in runs] == [summary["mlflow_run_id"]]
    params = runs[0].data.params
    assert params["train.epochs"] == "4" and params["run.output_dir"] == str(run_dir) and params["ray.address"] == "auto"
    assert {m.step for m in client.get_metric_history(runs[0].info.run_id, "train_loss")} == {0, 1, 2, 3}
    logs = jobs.client(dash).get_job_logs(job)  # the run ended with its table, the detail in run.log
    assert "image->text" in logs and "text->image" in logs and str(run_dir / "run.log") in logs, logs[-2000:]
    assert "evaluate" in json.loads((run_dir / "summary.json").read_text())


@pytest.mark.slow
def test_preprocessing_survives_killed_worker_node(cluster, tmp_path):
    """A worker node (the one running the feature actor) is SIGKILLed, all its processes, mid-preprocessing:
    the job still finishes, with every planned sample in the manifest and the tars exactly once."""
    from densevse.pipeline.preprocess.plan import plan_dir
    from ray.util.state import list_nodes

    dash, out = cluster.dashboard, tmp_path / "pre"
    overrides = SMALL + [f"run.output_dir={out}", "shards.samples_per_shard=5"]  # 7 shards
    job = jobs.submit(ROOT / "pipeline.yaml", overrides, address=dash, command="preprocess")

    actor = _wait("the feature actor", lambda: [a for a in _actors(dash, "_StageOnShards") if a.state == "ALIVE"],
                  timeout=1200, poll=1)[0]
    shard_dir = out / "shards"
    _wait("a first shard", lambda: list(shard_dir.glob("*.stats.json")), 900, 0.2)
    nodes = {n.node_id: n for n in list_nodes(address=dash, detail=True)}
    victim = next(r[len("densevse_"):] for r in nodes[actor.node_id].resources_total if r.startswith("densevse_worker"))
    pids = cluster.pids(victim)
    done_before = len(list(shard_dir.glob("*.stats.json")))
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    print(f"killed {victim} ({len(pids)} processes) with {done_before} shards written")

    assert _finish(dash, job, 1800) == "SUCCEEDED"
    assert {n.node_id: n.state for n in list_nodes(address=dash)}[actor.node_id] == "DEAD"

    planned = sorted(k for f in plan_dir(shard_dir).glob("part-*.parquet")  # the job's plan: keys per shard row
                     for keys in pq.read_table(f, columns=["key"])["key"].to_pylist() for k in keys)
    manifest = pq.read_table(shard_dir / "manifest.parquet").to_pylist()
    assert sorted(r["key"] for r in manifest) == planned  # every planned sample, once
    in_tars = Counter(m.name.split(".", 1)[0] for t in shard_dir.glob("*.tar") for m in tarfile.open(t).getmembers()
                      if m.name.endswith(".json"))
    assert sorted(in_tars) == sorted(r["key"] for r in manifest if r["status"] == "ok")
    assert set(in_tars.values()) == {1}
    assert done_before < len({r["shard"] for r in manifest})  # the kill did land mid-run

