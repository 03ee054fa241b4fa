"""Shared fixtures. Real data lives in ../shared/data (read in place); tests needing it skip when absent."""
from __future__ import annotations

import contextlib
import io
import os
import sys
from pathlib import Path

import pytest

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
FLICKR8K = SHARED / "flickr8k-1k"
FLICKR8K_FULL = SHARED / "flickr8k"  # the whole set: 8,091 photos, the official 6,000 / 1,000 / 1,000 split
COCO = SHARED / "coco-mini"

# Every skip for want of real data gives a reason starting with this (then ": <what is missing>"), here and in
# the test files' own skipifs: pytest_terminal_summary counts them by it.
SHARED_ABSENT = "../shared/data absent"
needs_flickr8k = pytest.mark.skipif(not (FLICKR8K / "Flickr8k.token.txt").is_file(),
                                    reason=f"{SHARED_ABSENT}: flickr8k-1k")
needs_flickr8k_full = pytest.mark.skipif(not (FLICKR8K_FULL / "Flickr8k.token.txt").is_file(),
                                         reason=f"{SHARED_ABSENT}: flickr8k")
needs_coco = pytest.mark.skipif(not (COCO / "annotations").is_dir(), reason=f"{SHARED_ABSENT}: coco-mini")
GUM = SHARED / "gum"
needs_gum = pytest.mark.skipif(not (GUM / "const").is_dir(), reason=f"{SHARED_ABSENT}: gum")
GUM_SLICE_DOCS = ("GUM_academic_art", "GUM_academic_exposure", "GUM_academic_discrimination")  # train/dev/test


def gum_slice(dst: Path, n: int = 20) -> Path:
    """A treebank dir with the first n real GUM trees of one train, one dev and one test document."""
    from densevse.pipeline.stage_models.treebank import split_trees

    (dst / "const").mkdir(parents=True)
    (dst / "splits.md").write_text((GUM / "splits.md").read_text())
    for d in GUM_SLICE_DOCS:
        trees, _ = split_trees((GUM / "const" / f"{d}.ptb").read_text())
        (dst / "const" / f"{d}.ptb").write_text("\n\n".join(trees[:n]) + "\n")
    return dst

# A loaded 2-core CI box can take more than Ray's default 30 s to register a local raylet.
os.environ.setdefault("RAY_raylet_start_wait_time_s", "120")


@pytest.fixture(autouse=True, scope="module")
def _ray_ends_with_its_module():
    """Each test module gets its own Ray: one left initialised would be silently reused by the next module."""
    yield
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        ray.shutdown()


@pytest.fixture(scope="module")
def detector_dir(tmp_path_factory):
    """config.yaml + model_final.pth of the project's detector, heads untrained (fast to build)."""
    import torch
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.modeling import build_model

    from densevse.pipeline.stage_models.detector import DetectorSpec, build_cfg

    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("det")
    cfg = build_cfg(DetectorSpec(), out)
    model = build_model(cfg)
    DetectionCheckpointer(model, save_dir=str(out)).save("model_final")
    cfg.MODEL.EFFICIENTNET.PRETRAINED = ""
    (out / "config.yaml").write_text(cfg.dump())
    return out


ROOT = Path(__file__).resolve().parents[1]
STAGE_MODELS = Path(".cache") / "test-stage-models"  # relative, like the defaults; cached between runs


@pytest.fixture(scope="session")
def stage_models():
    """A tiny Detectron2 detector and Stanza parser, trained by the project's trainers (cached in .cache/):
    the real model stages, fast. Returns their dirs relative to the repo root, as the defaults are named."""
    from densevse.pipeline.stage_models.detector import DetectorSpec
    from densevse.pipeline.stage_models.detector import train as train_detector
    from densevse.pipeline.stage_models.parser import TrainSpec
    from densevse.pipeline.stage_models.parser import train as train_parser

    train_detector(ROOT / STAGE_MODELS / "detector", DetectorSpec(iters=4, num_images=16, eval_images=0,
                                                                  ims_per_batch=2))
    train_parser(ROOT / STAGE_MODELS / "parser", TrainSpec(n_trees=300, tagger_steps=40, parser_epochs=2))
    return STAGE_MODELS / "detector", STAGE_MODELS / "parser"


def tiny_overrides(stage_models, out: Path) -> list[str]:
    """A small synthetic run through the real Detectron2 + EfficientNet-Lite0 + Stanza stages."""
    detector, parser = stage_models
    return ["dataset.synthetic.num_images=40", "dataset.synthetic.test_images=8", "shards.samples_per_shard=16",
            f"run.output_dir={out}", f"stages.regions.params.config={detector}", "stages.regions.params.score_thresh=0",
            "stages.regions.params.top_k=5", f"stages.parse.params.model_dir={parser}",
            "stages.features.params.input_size=96", "train.epochs=2", "train.batch_size=16", "train.embed_dim=32",
            "train.hidden_dim=32", "train.word_vectors=random", "ray.num_cpus=2"]


@pytest.fixture(scope="session")
def tiny_run(stage_models, tmp_path_factory):
    """`densevse run` on 40 synthetic images with the tiny stage models, tracked in a real MLflow server on
    127.0.0.1 (stopped at the end of the session), so the HM-LSTM is registered there with its stage models.
    Yields (config, tracking URI)."""
    from densevse.pipeline.cli.main import main
    from densevse.pipeline.config import load_config
    from densevse.pipeline.tracking import server

    tmp = tmp_path_factory.mktemp("tiny-run")
    proc, uri = server.start_server(tmp / "mlflow")
    try:
        over = [*tiny_overrides(stage_models, tmp / "run"), f"mlflow.tracking_uri={uri}"]
        cwd = os.getcwd()
        os.chdir(ROOT)  # the stage model paths are relative to the repo root
        try:
            console = io.StringIO()  # what a person sees (tests/test_report.py reads it from console.txt)
            with contextlib.redirect_stdout(console), contextlib.redirect_stderr(console):
                assert main(["run", "pipeline.yaml", *[a for o in over for a in ("-s", o)]]) == 0
            (tmp / "console.txt").write_text(console.getvalue())
        finally:
            os.chdir(cwd)
        yield load_config(ROOT / "pipeline.yaml", over), uri
    finally:
        server.stop_server(proc)
        ray = sys.modules.get("ray")
        if ray is not None and ray.is_initialized():
            ray.shutdown()


@pytest.fixture(scope="session")
def search_index(tiny_run, tmp_path_factory):
    """`densevse index` of the tiny run's shards with its best checkpoint (its own process, as users run it):
    the index dir."""
    import subprocess

    cfg, _ = tiny_run
    out = tmp_path_factory.mktemp("index") / "index"
    model = Path(cfg.run.output_dir) / "models" / cfg.train.model / "best.pt"
    r = subprocess.run([sys.executable, "-m", "densevse.pipeline.cli", "index", "--shards", str(cfg.shard_dir), "--model",
                        str(model), "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    return out


# ---------------------------------------------------------------- summary

def pytest_terminal_summary(terminalreporter):
    """One line at the end of the run when tests skipped for want of ../shared/data (found by SHARED_ABSENT in
    their skip reason), so a green run without the real data does not pass for one that checked it."""
    missing, n = set(), 0
    for rep in terminalreporter.stats.get("skipped", []):
        reason = rep.longrepr[2] if isinstance(rep.longrepr, tuple) else str(rep.longrepr)  # "Skipped: <reason>"
        if SHARED_ABSENT in reason:
            n += 1
            missing.add(reason.split(SHARED_ABSENT, 1)[1].lstrip(": ").strip())
    if n:
        what = ", ".join(sorted(m for m in missing if m))
        terminalreporter.write_line(f"{n} test{'s' if n != 1 else ''} skipped: ../shared/data is absent "
                                    f"(real Flickr8k/COCO/GUM data{'; missing: ' + what if what else ''})")


# ---------------------------------------------------------------- exit

_EXIT = {}


def pytest_sessionfinish(session, exitstatus):
    _EXIT["status"] = int(exitstatus)


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config):
    """Leave without interpreter teardown, once pytest has reported everything, with pytest's own exit status.

    The slow suite loads several native runtimes into one process (torch's and FAISS's OpenMP, Ray's core worker,
    Playwright's greenlet driver); in one CI run the interpreter segfaulted while tearing them down, after every
    result had been printed (exit 139 instead of pytest's status). Nothing is left to run or report by now."""
    if "status" in _EXIT:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(_EXIT["status"])


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A real S3-compatible HTTP server (moto's standalone `moto_server`) on 127.0.0.1, with bucket `bucket`; the
    AWS_* environment that boto3, s3fs, pyarrow and MLflow read points at it for the session. Yields the endpoint."""
    import subprocess
    import time
    import urllib.request

    boto3 = pytest.importorskip("boto3")
    pytest.importorskip("moto.server")
    from densevse.pipeline.tracking.server import free_port

    port = free_port()
    log = open(tmp_path_factory.mktemp("moto") / "moto.log", "ab")
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    endpoint = f"http://127.0.0.1:{port}"
    env = {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
           "AWS_DEFAULT_REGION": "us-east-1", "MLFLOW_S3_ENDPOINT_URL": endpoint}
    saved = {k: os.environ.get(k) for k in env}
    try:
        deadline = time.time() + 60
        while True:
            try:
                urllib.request.urlopen(endpoint, timeout=2).close()
                break
            except OSError:
                if proc.poll() is not None or time.time() > deadline:
                    raise RuntimeError(f"moto_server did not start on {endpoint}")
                time.sleep(0.3)
        os.environ.update(env)
        boto3.client("s3").create_bucket(Bucket="bucket")
        yield endpoint
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
