"""The model stages' own models reach every node of a real multi-node cluster.

A head (0 CPUs: the job driver) and two worker nodes from cluster/local.sh, each node with its own temp dir,
so each unpacks the job into a working dir of its own: nothing is shared by accident. The job runs the
Detectron2 + EfficientNet-Lite0 + Stanza stages on models trained here (conftest's stage_models: small, under
the git-ignored .cache/, named by relative path as the defaults are): `submit` ships them with the job, the
job's driver checks them, and every actor gets them through Ray's object store (pipeline/ship.py).
"""
from __future__ import annotations

import json
import tarfile
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from densevse.pipeline import jobs
from densevse.cluster.local import local_cluster

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow


def test_default_model_stages_run_on_every_node(stage_models, tmp_path, capsys):
    from ray.util.state import list_actors

    detector, parser = stage_models
    out = tmp_path / "run"
    over = ["dataset.synthetic.num_images=24", "dataset.synthetic.test_images=8", "shards.samples_per_shard=4",
            f"run.output_dir={out}", f"stages.regions.params.config={detector}", "stages.regions.params.score_thresh=0",
            f"stages.parse.params.model_dir={parser}", "stages.features.params.input_size=96",
            "stages.regions.batch_size=4", "stages.features.batch_size=4", "stages.parse.batch_size=4"]
    with local_cluster(workers=2, head_cpus=0, worker_cpus=2) as c:
        job = jobs.submit(ROOT / "pipeline.yaml", over, address=c.dashboard, command="preprocess")
        assert "stages." not in capsys.readouterr().err  # no model path warned about: they are shipped
        status = jobs.follow(c.dashboard, job, timeout=1500, out=None)
        logs = jobs.client(c.dashboard).get_job_logs(job)
        assert status == "SUCCEEDED", logs[-4000:]
        actors = [a for a in list_actors(address=c.dashboard, detail=True, limit=1000, raise_on_missing_output=False)
                  if "_StageOnShards" in a.class_name]
    assert len({a.node_id for a in actors}) == 2, [(a.class_name, a.node_id) for a in actors]  # both workers
    shard_dir = out / "shards"
    manifest = pq.read_table(shard_dir / "manifest.parquet").to_pylist()
    assert len(manifest) == 24 and all(r["status"] == "ok" for r in manifest), [r["reason"] for r in manifest]
    assert all(r["n_phrases"] > 0 for r in manifest)  # Stanza trees, from the shipped parser
    with tarfile.open(sorted(shard_dir.glob("train-*.tar"))[0]) as t:
        meta = json.loads(t.extractfile(next(m for m in t.getmembers() if m.name.endswith(".json"))).read())
    assert meta["captions"][0]["phrases"] and meta["captions"][0]["tree"]["tokens"]  # a parsed caption
    assert "training it now" not in logs  # the job's driver found the shipped models: nothing retrained
