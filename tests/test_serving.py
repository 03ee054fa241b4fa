"""Using a trained model: the registered raw-input model (same vectors as the shards), its `champion` alias,
REST serving with `mlflow models serve`, the FAISS index and `densevse search`.

The slow tests share conftest's tiny_run: a real `densevse run` on 40 synthetic images through the real
Detectron2 + EfficientNet-Lite0 + Stanza stages (tiny models), registered in a real MLflow server on 127.0.0.1."""
from __future__ import annotations

import base64
import io
import json
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from densevse.pipeline.errors import ModelMismatch
from densevse.pipeline.search.query import check_model
from densevse.pipeline.serving.pyfunc import image_bytes

ROOT = Path(__file__).resolve().parents[1]
MODEL = "densevse-hmlstm"


# ---------------------------------------------------------------- fast


def test_image_cells_are_data_not_addresses(tmp_path):
    """Over the model's API an image is its bytes (base64, data: URI). A path, file:// or http(s):// URI is refused
    with one reason, the same for an existing file as for a missing one (nothing is opened or fetched)."""
    from densevse.pipeline.serving.pyfunc import IMAGE_FORMS

    png = tmp_path / "a.png"
    png.write_bytes(b"\x89PNG fake")
    assert image_bytes(base64.b64encode(b"abc").decode(), 0) == b"abc"
    assert image_bytes(" data:image/png;base64," + base64.b64encode(b"xyz").decode(), 0) == b"xyz"
    reasons = set()
    for bad in ("", None, 3.5, str(png), f"file://{png}", str(tmp_path / "missing.png"), f"file://{tmp_path}/no.png",
                "http://127.0.0.1:9/x.jpg", "file://http://127.0.0.2:9/x.jpg", "https://example.com/x.jpg",
                "s3://bucket/x.jpg", "~/x.jpg",
                "data:image/png,%89PNG", "not base64 !!"):
        with pytest.raises(ValueError) as e:
            image_bytes(bad, 3)
        reasons.add(str(e.value))
    assert reasons == {f"row 3: {IMAGE_FORMS}"}


def test_index_refuses_another_model():
    built = {"dim": 32, "sha256": "a" * 64, "source": "best.pt"}
    check_model(built, {"dim": 32, "sha256": "a" * 64})
    with pytest.raises(ModelMismatch, match="embeds in 64 dimensions"):
        check_model(built, {"dim": 64, "sha256": "a" * 64, "source": "other.pt"})
    with pytest.raises(ModelMismatch, match="not with other.pt"):
        check_model(built, {"dim": 32, "sha256": "b" * 64, "source": "other.pt"})


def test_champion_alias_follows_the_best_score(tmp_path):
    """A real MLflow registry (sqlite): the alias moves only to a version that scores at least as well."""
    from mlflow.tracking import MlflowClient

    from densevse.pipeline.tracking.registry import CHAMPION, promote

    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    client.create_registered_model("m")
    versions = [client.create_model_version("m", source=str(tmp_path)).version for _ in range(4)]
    champion = lambda: client.get_model_version_by_alias("m", CHAMPION).version  # noqa: E731
    assert promote(client, "m", versions[0], 10.0, "r0") and champion() == versions[0]
    assert not promote(client, "m", versions[1], 5.0, "r1") and champion() == versions[0]
    assert not promote(client, "m", versions[2], None, "r2") and champion() == versions[0]  # no score: no
    assert promote(client, "m", versions[3], 12.5, "r3") and champion() == versions[3]
    assert client.get_model_version("m", versions[3]).tags["score"] == "12.5"


# ---------------------------------------------------------------- slow: the registered model


def _test_sample(cfg):
    """A test-split sample from the shards, and its source image file."""
    from densevse.pipeline.shardset import shard_paths
    from densevse.pipeline.shardset import iter_samples

    s = next(iter_samples(shard_paths(cfg.shard_dir, "test")))
    return s, Path(s["meta"]["source"])


@pytest.mark.slow
def test_registered_model_embeds_raw_inputs_as_the_shards_do(tiny_run):
    import mlflow
    import pandas as pd
    from mlflow.tracking import MlflowClient

    cfg, uri = tiny_run
    mlflow.set_tracking_uri(uri)
    client = MlflowClient(uri)
    champ = client.get_model_version_by_alias(MODEL, "champion")
    assert float(champ.tags["score"]) > 0  # val rsum of the best epoch
    m = mlflow.pyfunc.load_model(f"models:/{MODEL}@champion")
    assert {c.name for c in m.metadata.get_input_schema().inputs} >= {"image", "text", "feats", "boxes", "tree"}
    assert m.metadata.saved_input_example_info is not None
    bundled = m.unwrap_python_model().stage_artifacts  # the stage models, as MLflow artifacts of the model
    assert set(bundled) == {"regions.config", "parse.model_dir", "features.weights"}
    assert (Path(bundled["regions.config"]) / "model_final.pth").is_file()

    s, src = _test_sample(cfg)
    cap = next(c for c in s["meta"]["captions"] if "tree" in c)
    raw = m.predict(pd.DataFrame({"image": [base64.b64encode(src.read_bytes()).decode(), None],
                                  "text": [None, cap["text"]]}))
    feat = m.predict(pd.DataFrame({"feats": [s["feats"].tolist(), None], "boxes": [s["boxes"].tolist(), None],
                                   "tree": [None, json.dumps(cap["tree"])]}))
    assert np.allclose(raw["boxes"][0], s["boxes"], atol=0.5)  # the detector's boxes, as in the shard
    for col in ("embedding", "parts"):
        a, b = np.asarray(raw[col][0], np.float32), np.asarray(feat[col][0], np.float32)
        assert a.shape == b.shape and np.abs(a - b).max() < 2e-2, (col, np.abs(a - b).max())  # float16 features
    assert json.loads(raw["tree"][1]) == cap["tree"]  # the bundled parser gives the shard's tree
    assert np.allclose(raw["embedding"][1], feat["embedding"][1], atol=1e-5)
    assert [sp["text"] for sp in json.loads(raw["spans"][1])] == [
        " ".join(cap["tree"]["tokens"][p["start"]:p["end"]]) for p in cap["phrases"]]

    from mlflow.exceptions import MlflowException

    with pytest.raises(MlflowException, match="text 0: empty caption"):
        m.predict(pd.DataFrame({"text": ["   "]}))


def _post(url: str, payload: dict, timeout: float = 120) -> tuple[int, dict]:
    req = urllib.request.Request(url, data=json.dumps(payload).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


def _huge_png() -> bytes:
    """A valid PNG header claiming 10,000 x 10,000 pixels (over the 64 M pixel cap), a few hundred bytes."""
    from PIL import Image

    buf = io.BytesIO()
    Image.new("1", (10_000, 10_000)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.slow
def test_rest_serving_answers_like_predict_and_refuses_bad_input(tiny_run, tmp_path):
    import mlflow
    import pandas as pd

    from densevse.pipeline.serving import rest
    from densevse.pipeline.tracking.server import free_port

    cfg, uri = tiny_run
    s, src = _test_sample(cfg)
    text = next(c for c in s["meta"]["captions"] if "tree" in c)["text"]
    b64 = base64.b64encode(src.read_bytes()).decode()
    proc, url = rest.start(f"models:/{MODEL}@champion", uri, free_port(), tmp_path / "serve.log")
    try:
        def invoke(image, txt):
            return _post(f"{url}/invocations", {"dataframe_split": {"columns": ["image", "text"],
                                                                    "data": [[image, txt]]}})

        status, body = _post(f"{url}/invocations", {"dataframe_split": {
            "columns": ["image", "text"], "data": [[b64, None], [None, text]]}})
        assert status == 200, body
        mlflow.set_tracking_uri(uri)
        local = mlflow.pyfunc.load_model(f"models:/{MODEL}@champion").predict(
            pd.DataFrame({"image": [b64, None], "text": [None, text]}))
        got = body["predictions"]
        for i in (0, 1):
            assert np.allclose(got[i]["embedding"], local["embedding"][i], atol=1e-5)
        assert np.allclose(got[0]["boxes"], local["boxes"][0], atol=1e-3)

        for bad, msg in ((base64.b64encode(b"hello, not an image").decode(), "image 0"),
                         (base64.b64encode(_huge_png()).decode(), "pixels")):
            status, body = invoke(bad, None)
            assert 400 <= status < 500 and msg in body.get("message", ""), (status, body)
        status, body = invoke(None, "")
        assert 400 <= status < 500 and "text 0" in body.get("message", ""), (status, body)

        # Addresses are not images: an existing path, a missing one, file://, a live 127.0.0.1 URL that redirects.
        # One reason for all (which paths exist is not told), and the server fetches nothing.
        from densevse.pipeline.serving.pyfunc import IMAGE_FORMS
        from tests.untrusted_fixture import recording_server

        with recording_server() as (base, seen):
            port = base.rsplit(":", 1)[1]
            answers = [invoke(cell, None) for cell in (str(src), str(src) + ".missing", f"file://{src}",
                                                       f"{base}/photo.jpg", f"file://{base}/photo.jpg",
                                                       f"http://localhost:{port}/photo.jpg")]
        assert seen == [] and {status for status, _ in answers} == {400}, (seen, answers)
        reasons = {body["message"].rpartition("Error: ")[2] for _, body in answers}  # MLflow echoes the input first
        assert reasons == {f"row 0: {IMAGE_FORMS}"}, answers

        status, body = invoke(None, "a " * 600_000)  # 1.2 M characters: refused on its length
        assert status == 400 and "over the limit of 1000" in body.get("message", ""), (status, body)
        status, body = invoke(None, text)  # still serving
        assert status == 200 and len(body["predictions"][0]["embedding"]) == cfg.train.embed_dim
    finally:
        rest.stop(proc)


# ---------------------------------------------------------------- slow: index and search


def user_stage_models(cfg) -> list[str]:
    """`-s` overrides that give the CLI the tiny run's stage models, as a user's own pipeline.yaml would."""
    return ["-s", f"stages.regions.params.config={cfg.stages.regions.params.config}",
            "-s", f"stages.parse.params.model_dir={cfg.stages.parse.params.model_dir}"]


def _cli(*args) -> tuple[int, dict | None, str]:
    r = subprocess.run([sys.executable, "-m", "densevse.pipeline.cli", *args], capture_output=True, text=True, cwd=ROOT,
                       timeout=600)
    try:
        out = json.loads(r.stdout)
    except ValueError:
        out = None
    return r.returncode, out, r.stderr


@pytest.mark.slow
def test_index_and_search(tiny_run, search_index, tmp_path):
    cfg, _ = tiny_run
    info = json.loads((search_index / "index.json").read_text())
    n = info["counts"]
    assert n["image"] == len(np.load(search_index / "img_emb" / "img_emb_0.npy"))
    assert n["text"] == len(np.load(search_index / "text_emb" / "text_emb_0.npy")) > n["image"]
    assert n["region"] > 0 and n["phrase"] > 0 and n["image_index"]["kind"] == "flat"

    assert set(info["model"]) == {"model", "dim", "checkpoint", "sha256"}  # a path + its sha256, never a URI
    own = user_stage_models(cfg)  # query stages' model files: the user's config, not the checkpoint's
    rc, out, err = _cli("search", "a red circle left of a blue square", "--index", str(search_index), "-k", "5", *own)
    assert rc == 0, err
    hits = out["hits"]
    assert len(hits) == 5 and [h["rank"] for h in hits] == [1, 2, 3, 4, 5]
    assert all(a["score"] >= b["score"] for a, b in zip(hits, hits[1:])) and hits[0]["captions"]

    rc, out, err = _cli("search", "--regions", "a blue square", "--index", str(search_index), "-k", "4",
                        "--draw", str(tmp_path / "drawn"), *own)
    assert rc == 0, err
    for h in out["hits"]:
        x0, y0, x1, y1 = h["box"]
        assert 0 <= x0 < x1 <= h["width"] + 0.5 and 0 <= y0 < y1 <= h["height"] + 0.5
    assert len(out["drawn"]) == 4 and all(Path(p).stat().st_size > 1000 for p in out["drawn"])

    s, src = _test_sample(cfg)
    rc, out, err = _cli("search", "--image", str(src), "--index", str(search_index), "-k", "3", *own)
    assert rc == 0, err
    assert len(out["hits"]) == 3 and all(h["text"] for h in out["hits"])

    # Another model (same shape, other weights): refused before any search, one line, exit 2.
    import torch

    from densevse.models.checkpoint import load_checkpoint

    ck = load_checkpoint(Path(info["model"]["checkpoint"]))
    ck["state_dict"] = {k: v + 0.01 if v.is_floating_point() else v for k, v in ck["state_dict"].items()}
    torch.save(ck, tmp_path / "other.pt")
    rc, out, err = _cli("search", "a red circle", "--index", str(search_index), "--model", str(tmp_path / "other.pt"))
    assert rc == 2 and out is None and "was built with" in err and "Traceback" not in err, err

    # Past the size threshold the index is approximate (IVF), and still finds the same top image.
    rc, out, err = _cli("index", "--shards", str(cfg.shard_dir), "--model", info["model"]["checkpoint"],
                        "--out", str(tmp_path / "ivf"), "--exact-below", "10")
    assert rc == 0, err
    assert out["counts"]["image_index"]["kind"] == "ivf"
    rc, ivf, err = _cli("search", "a red circle left of a blue square", "--index", str(tmp_path / "ivf"), "-k", "1",
                        *own)
    assert rc == 0 and ivf["hits"][0]["key"] == hits[0]["key"], err
