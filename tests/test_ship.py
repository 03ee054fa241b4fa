"""Stage model files travel with a run: packed on the driver, unpacked by each actor (pipeline/ship.py),
and shipped with a submitted job (pipeline/jobs.py)."""
from __future__ import annotations

import shutil
import uuid
from pathlib import Path

import pytest

from densevse.pipeline import jobs
from densevse.pipeline.config import load_config
from densevse.pipeline import ship
from densevse.stages.parse import StanzaParse
from densevse.stages.regions import RegionParams

ROOT = Path(__file__).resolve().parents[1]


def _model_dir(d: Path) -> Path:
    d.mkdir(parents=True)
    (d / "config.yaml").write_text("MODEL: {}\n")
    (d / "model_final.pth").write_bytes(b"\x00weights" * 100)
    (d / "sub").mkdir()
    (d / "sub" / "extra.json").write_text("{}")
    return d


def test_pack_unpack_points_params_at_an_identical_local_copy(tmp_path):
    src = _model_dir(tmp_path / "detector")
    params = RegionParams(config=str(src), top_k=7)
    copy = ship.unpack(params, ship.pack(params), tmp_path / "node")
    assert copy.top_k == 7 and copy.weights is None and Path(copy.config) != src
    got = {p.relative_to(copy.config): p.read_bytes() for p in Path(copy.config).rglob("*") if p.is_file()}
    assert got == {p.relative_to(src): p.read_bytes() for p in src.rglob("*") if p.is_file()}


def test_weights_file_and_parser_fields_are_shipped_too(tmp_path):
    w = tmp_path / "w.pth"
    w.write_bytes(b"abc")
    params = RegionParams(config="COCO-Detection/faster_rcnn_R_50_FPN_3x.yaml", weights=str(w))
    copy = ship.unpack(params, ship.pack(params), tmp_path / "node")
    assert copy.config == params.config  # a model-zoo name is not a local file: left as it is
    assert Path(copy.weights).read_bytes() == b"abc" and Path(copy.weights) != w
    pdir = _model_dir(tmp_path / "parser")
    pp = StanzaParse.Params(model_dir=str(pdir), pretrain_path=str(w))
    pc = ship.unpack(pp, ship.pack(pp), tmp_path / "node2")
    assert (Path(pc.model_dir) / "sub" / "extra.json").is_file() and Path(pc.pretrain_path).read_bytes() == b"abc"


def test_nothing_local_nothing_shipped(tmp_path):
    params = RegionParams(config="COCO-Detection/faster_rcnn_R_50_FPN_3x.yaml", weights="https://example.org/w.pkl")
    assert ship.pack(params) is None and ship.unpack(params, None) is params


@pytest.fixture
def repo_model():
    rel = Path(".cache") / f"test-ship-{uuid.uuid4().hex[:8]}"
    _model_dir(ROOT / rel)
    yield str(rel)
    shutil.rmtree(ROOT / rel, ignore_errors=True)


def test_submitted_job_carries_the_stage_models_it_names(tmp_path, repo_model):
    over = ["run.output_dir=/shared/x", f"stages.regions.params.config={repo_model}",
            "stages.parse.params.model_dir=.cache/not-trained-here"]
    cfg = jobs.job_config(ROOT / "pipeline.yaml", over)
    staged = jobs.stage(cfg, tmp_path / "project")
    assert (staged / repo_model / "model_final.pth").read_bytes() == (ROOT / repo_model / "model_final.pth").read_bytes()
    assert not (staged / ".cache" / "not-trained-here").exists()
    assert jobs.unshipped_paths(cfg) == [("stages.parse.params.model_dir", ".cache/not-trained-here")]
    assert load_config(staged / jobs.JOB_CONFIG).stages.regions.params.config == repo_model
    assert ".cache" not in jobs.runtime_env(staged)["excludes"]  # Ray uploads what `stage` put there
    assert not (staged / ".gitignore").exists()  # Ray's upload honours .gitignore, which ignores .cache/
