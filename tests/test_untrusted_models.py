"""No code runs from a file the user did not choose to trust (pipeline/serving/embedder.py: trusted_stages).

Each fault is fed for real: a weights-only-clean checkpoint whose run config names a crafted `.pkl` (a real pickle
payload that creates a marker file) or URLs on a real HTTP server; a registered model (MLflow models-from-code,
sqlite registry) whose checkpoint config names the payload; an index.json naming a crafted MLflow model or a
swapped checkpoint. Control steps show each payload does run when opened the old way."""
from __future__ import annotations

import base64
import io
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from densevse.models.checkpoint import ChecksumMismatch, UnsafeCheckpointError, load_checkpoint
from densevse.pipeline.config import load_config
from densevse.pipeline.errors import ModelMismatch
from densevse.pipeline.search.query import Index
from densevse.pipeline.serving.embedder import Embedder, UntrustedModelFile
from tests.untrusted_fixture import RunsCode, pickle_payload, recording_server, tiny_checkpoint, tiny_index

ROOT = Path(__file__).resolve().parents[1]
EFFNET_DIM = 1280


def _png() -> bytes:
    buf = io.BytesIO()
    img = Image.new("RGB", (96, 80), (30, 30, 30))
    img.paste((220, 40, 40), (10, 10, 50, 50))
    img.save(buf, format="PNG")
    return buf.getvalue()


def _stages(detector_dir, weights) -> dict:
    """A run config naming a detector dir and `weights`, with small inputs (fast on CPU)."""
    return {"stages": {"regions": {"impl": "detectron2", "params": {
        "config": str(detector_dir), "weights": weights, "score_thresh": 0.0, "top_k": 3, "threads": 1}},
        "features": {"impl": "efficientnet_lite0", "params": {"input_size": 64, "threads": 1}}}}


@pytest.fixture
def payload(tmp_path) -> tuple[Path, Path]:
    """(evil.pkl, marker): a real pickle whose loading creates the marker; shown to work (then reset)."""
    marker = tmp_path / "code-ran"
    evil = pickle_payload(tmp_path / "evil.pkl", marker)
    pickle.loads(evil.read_bytes())  # control: plain pickle (Detectron2's .pkl branch) runs it
    assert marker.exists()
    marker.unlink()
    return evil, marker


def test_checkpoint_config_pkl_weights_are_never_opened(detector_dir, payload, tmp_path):
    evil, marker = payload
    ck = tiny_checkpoint(tmp_path / "best.pt", _stages(detector_dir, str(evil)), feat_dim=EFFNET_DIM)
    load_checkpoint(ck)  # a plain checkpoint: weights-only loading passes it

    with pytest.raises(UntrustedModelFile, match=r"stages\.regions\.params\.weights: no trusted model file.*evil\.pkl"):
        Embedder.from_checkpoint(ck).images([_png()])
    assert not marker.exists()

    # The caller's own config gives the model files; the checkpoint's other params (top_k 3) still apply.
    mine = load_config(None, ["stages.regions.impl=detectron2", f"stages.regions.params.config={detector_dir}"]).stages
    e = Embedder.from_checkpoint(ck, stages=mine)
    impl, params = e.stages["regions"]
    assert (impl, params.config, params.weights, params.top_k) == ("detectron2", str(detector_dir), None, 3)
    out = e.images([_png()])[0]
    assert out["image"].shape == (8,) and 1 <= len(out["boxes"]) <= 4 and np.isfinite(out["image"]).all()
    assert not marker.exists()


def test_recorded_model_files_are_compared(detector_dir, tmp_path):
    """A checkpoint that records its stage models' sha256 ("model_files", taken from the shards' config
    fingerprint) warns when the caller's file is another one."""
    import warnings

    from densevse.pipeline.shardset import fingerprint, recorded_model_files

    cfg = load_config(None, ["stages.regions.impl=detectron2", f"stages.regions.params.config={detector_dir}"])
    mine, made_with = cfg.stages, recorded_model_files(fingerprint(cfg))["regions.config"]
    for recorded, warns in ((made_with, False), ("0" * 64, True)):
        ck = tiny_checkpoint(tmp_path / "best.pt", _stages(detector_dir, None), feat_dim=EFFNET_DIM,
                             extra={"model_files": {"regions.config": recorded}})
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            Embedder.from_checkpoint(ck, stages=mine)._stage("regions")
        ours = [str(w.message) for w in caught if "not the file this model was trained with" in str(w.message)]
        assert len(ours) == warns and all(f"recorded {recorded[:12]}" in m for m in ours), ours


@pytest.fixture
def http_server():
    with recording_server() as server:
        yield server


def test_checkpoint_config_urls_are_never_fetched(http_server, tmp_path):
    base, seen = http_server
    config = {"stages": {"regions": {"impl": "detectron2", "params": {"config": f"{base}/config.yaml",
                                                                      "weights": f"{base}/model.pkl"}},
                         "features": {"impl": "efficientnet_lite0", "params": {"weights": f"{base}/w.pth"}},
                         "parse": {"impl": "stanza", "params": {"model_dir": f"{base}/stanza"}}}}
    e = Embedder.from_checkpoint(tiny_checkpoint(tmp_path / "best.pt", config, feat_dim=EFFNET_DIM))
    with pytest.raises(UntrustedModelFile, match=r"params\.config: .*params\.weights: "):
        e.images([_png()])
    with pytest.raises(UntrustedModelFile, match=r"stages\.parse\.params\.model_dir"):
        e.texts(["a red circle"])
    assert e.stages["features"][1].weights is None  # not the checkpoint's URL: unused until its turn, and refused
    assert "features" in e.untrusted and seen == []


# ---------------------------------------------------------------- registered models (models-from-code)

PREDICT = r"""
import json, sys
import mlflow, pandas as pd
mlflow.set_tracking_uri(sys.argv[1])
m = mlflow.pyfunc.load_model(sys.argv[2])
out = m.predict(pd.DataFrame(json.loads(sys.argv[3])))
print(json.dumps({"dims": [len(e) for e in out["embedding"]], "boxes": [b is not None for b in out["boxes"]]}))
"""


def test_registered_model_loads_unpickled_and_uses_only_its_bundled_files(detector_dir, payload, tmp_path):
    """Registered through tracking/registry.py (_log_model) in a real sqlite registry, loaded in a fresh process
    with MLflow's pickle deserialization switched off: it loads (nothing is unpickled), and its raw-image path
    runs the bundled detector and weights, never the checkpoint config's evil.pkl."""
    import mlflow
    import yaml
    from mlflow.tracking import MlflowClient

    from densevse.pipeline.serving.pyfunc import signature
    from densevse.pipeline.tracking.registry import _log_model

    evil, marker = payload
    ck = tiny_checkpoint(tmp_path / "best.pt", _stages(detector_dir, str(evil)), feat_dim=EFFNET_DIM)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    mlflow.set_tracking_uri(uri)
    client = MlflowClient(uri)
    run = client.create_run(client.create_experiment("trust", artifact_location=str(tmp_path / "artifacts")))
    bundle = {"regions.config": str(detector_dir), "regions.weights": str(detector_dir / "model_final.pth")}
    version = _log_model(uri, run.info.run_id, [{"epoch": 1, "train_loss": 1.0}], ck, "embedding_model.py",
                         signature(), "trust-hmlstm", extra_artifacts=bundle)
    model_dir = Path(mlflow.artifacts.download_artifacts(f"models:/trust-hmlstm/{version}"))
    flavor = yaml.safe_load((model_dir / "MLmodel").read_text())["flavors"]["python_function"]
    assert "model_code_path" in flavor and "python_model" not in flavor, flavor
    assert not list(model_dir.rglob("*.pkl"))

    feats = np.random.default_rng(0).normal(size=(2, EFFNET_DIM)).tolist()
    rows = {"image": [base64.b64encode(_png()).decode(), None], "feats": [None, feats],
            "boxes": [None, [[0.0, 0.0, 96.0, 80.0], [10.0, 10.0, 50.0, 50.0]]]}
    r = subprocess.run([sys.executable, "-c", PREDICT, uri, f"models:/trust-hmlstm/{version}", json.dumps(rows)],
                       capture_output=True, text=True, cwd=ROOT, timeout=600,
                       env={**os.environ, "MLFLOW_ALLOW_PICKLE_DESERIALIZATION": "false"})
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads(r.stdout.strip().splitlines()[-1]) == {"dims": [8, 8], "boxes": [True, True]}
    assert not marker.exists()


def test_bundled_pkl_weights_are_refused(payload, tmp_path):
    """A registered model's bundled files are trusted, but not a .pkl among them (plain pickle)."""
    import pandas as pd
    from mlflow.exceptions import MlflowException
    from mlflow.pyfunc import PythonModelContext

    from densevse.pipeline.serving.pyfunc import EmbeddingPyfunc

    evil, marker = payload
    ck = tiny_checkpoint(tmp_path / "best.pt", feat_dim=EFFNET_DIM)
    py = EmbeddingPyfunc()
    py.load_context(PythonModelContext(artifacts={"checkpoint": str(ck), "regions.config": str(tmp_path),
                                                  "regions.weights": str(evil)}, model_config=None))
    with pytest.raises(MlflowException, match=r"bundled evil\.pkl is a \.pkl") as e:
        py.predict(None, pd.DataFrame({"image": [base64.b64encode(_png()).decode()]}))
    assert e.value.get_http_status_code() == 500  # the model's fault, not the request's
    assert not marker.exists()


# ---------------------------------------------------------------- index.json names a model: data, never code


def _evil_mlflow_model(path: Path, marker: Path) -> Path:
    """An MLflow model dir as an attacker writes it: MLmodel + a cloudpickled "python model" that runs code."""
    import cloudpickle

    path.mkdir()
    (path / "python_model.pkl").write_bytes(cloudpickle.dumps(RunsCode(marker)))
    (path / "MLmodel").write_text(
        "flavors:\n  python_function:\n    loader_module: mlflow.pyfunc.model\n    python_model: python_model.pkl\n"
        f"    cloudpickle_version: {cloudpickle.__version__}\n    python_version: \"3.11.0\"\n")
    return path


def _cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "densevse.pipeline.cli", *args], capture_output=True, text=True, cwd=ROOT,
                          timeout=300)


def test_index_never_loads_the_mlflow_model_its_json_names(tmp_path):
    import mlflow

    marker = tmp_path / "code-ran"
    evil = _evil_mlflow_model(tmp_path / "evil-model", marker)
    with pytest.raises(Exception):  # control: what `Index.open` did with model.source
        mlflow.pyfunc.load_model(f"file://{evil}")
    assert marker.exists()
    marker.unlink()

    root = tiny_index(tmp_path, tiny_checkpoint(tmp_path / "best.pt"))
    info = json.loads((root / "index.json").read_text())
    info["model"] = {"model": "hmlstm", "dim": 8, "source": f"file://{evil}", "sha256": "0" * 64}  # the old form
    (root / "index.json").write_text(json.dumps(info))
    for verb in (["search", "a red circle"], ["serve"]):
        r = _cli(*verb, "--index", str(root), "-s", f"run.output_dir={tmp_path}")
        assert r.returncode == 2 and "does not load models by itself" in r.stderr and "--model" in r.stderr, r.stderr
        assert "Traceback" not in r.stderr and not marker.exists()


def test_index_loads_its_checkpoint_weights_only_and_only_with_its_sha256(tmp_path):
    ck = tiny_checkpoint(tmp_path / "best.pt")
    root = tiny_index(tmp_path, ck)
    built = json.loads((root / "index.json").read_text())["model"]
    assert built["checkpoint"] == str(ck.resolve()) and len(built["sha256"]) == 64 and "source" not in built
    assert Index.open(root).embedder.identity["sha256"] == built["sha256"]

    # An index.json from before the checkpoint/sha256 fields: a path is taken only with its recorded sha256.
    info = json.loads((root / "index.json").read_text())
    info["model"] = {"model": "hmlstm", "dim": 8, "source": str(ck)}
    (root / "index.json").write_text(json.dumps(info))
    with pytest.raises(ModelMismatch, match="without its sha256"):
        Index.open(root)
    info["model"]["sha256"] = built["sha256"]
    (root / "index.json").write_text(json.dumps(info))
    assert Index.open(root).embedder.identity["sha256"] == built["sha256"]

    # The file swapped for a crafted one: refused on its sha256, before unpickling; with a forged sha256 too,
    # refused by the weights-only loader.
    import hashlib

    import torch

    marker = tmp_path / "code-ran"
    torch.save({"model_name": "hmlstm", "payload": RunsCode(marker)}, ck)
    with pytest.raises(ModelMismatch, match="was built with another"):
        Index.open(root)
    with pytest.raises(ChecksumMismatch):
        load_checkpoint(ck, sha256=built["sha256"])
    info["model"]["sha256"] = hashlib.sha256(ck.read_bytes()).hexdigest()
    (root / "index.json").write_text(json.dumps(info))
    with pytest.raises(UnsafeCheckpointError):
        Index.open(root)
    assert not marker.exists()
