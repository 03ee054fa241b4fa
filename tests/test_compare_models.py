"""bench/compare_models.py: every (model, seed) trained in its own output dir on the same shards, the table as
mean +- std over seeds, the runs tracked in MLflow as children of one parent run that holds the table; a second
call reuses the finished runs. The pure parts (summary, table, verdict) are tested on hand-made rows."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from tests.shard_fixture import write_fixture_shards

REPO = Path(__file__).resolve().parents[1]


def _bench():
    spec = importlib.util.spec_from_file_location("compare_models", REPO / "bench" / "compare_models.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _row(model, seed, i2t, t2i):
    r = {m: 0.0 for m in _bench().METRICS}
    r.update(model_key=model, seed=seed, i2t_r1=i2t, t2i_r1=t2i, rsum=i2t + t2i)
    return r


def test_summary_table_and_verdict():
    cm = _bench()
    rows = [_row("hmlstm", 0, 30.0, 20.0), _row("hmlstm", 1, 32.0, 22.0),
            _row("vse", 0, 20.0, 21.0), _row("vse", 1, 22.0, 23.0)]
    s = cm.summarize(rows)
    assert s["hmlstm"]["i2t_r1"] == pytest.approx((31.0, 2 ** 0.5)) and s["vse"]["seeds"][0] == 2
    md = cm.table(s)
    assert "| hmlstm (ours, 2 seeds) | 31.0 ± 1.4 |" in md
    assert "| HM-LSTM (Niu et al. 2017), published | 27.7 | - | 68.6 |" in md
    v = cm.verdict(s)
    # i2t: 31 vs 21, one std 1.4: a win; t2i: 21 vs 22: not a win
    assert "i2t_r1 31.0 vs vse 21.0: wins" in v and "t2i_r1 21.0 vs vse 22.0: does not win" in v
    assert cm.summarize([_row("vse", 0, 1.0, 2.0)])["vse"]["i2t_r1"] == (1.0, 0.0)  # one seed: std 0


@pytest.mark.slow
def test_compare_models_seeds_mlflow_parent_and_resume(tmp_path, monkeypatch, capsys):
    from mlflow.tracking import MlflowClient

    monkeypatch.chdir(tmp_path)
    shards = tmp_path / "shards"
    write_fixture_shards(shards, n_train=24, n_val=6, n_test=6, feat_dim=16, per_shard=12)
    db = f"sqlite:///{tmp_path / 'mlflow.db'}"
    args = [str(REPO / "pipeline.yaml"), "--models", "hmlstm", "vse", "--seeds", "2",
            "-s", f"run.output_dir={tmp_path / 'run'}", "-s", f"shards.dir={shards}", "-s", "ray.num_cpus=2",
            "-s", "train.word_vectors=random", "-s", "train.epochs=1", "-s", f"mlflow.tracking_uri={db}"]
    cm = _bench()
    assert cm.main(args) == 0
    base = tmp_path / "run" / "compare"
    runs = json.loads((base / "compare_models.json").read_text())["runs"]
    assert sorted((r["model_key"], r["seed"]) for r in runs) == [("hmlstm", 0), ("hmlstm", 1), ("vse", 0), ("vse", 1)]
    for r in runs:  # each in its own dir, evaluated on the test split's 6 images
        assert (base / f"{r['model_key']}-seed{r['seed']}" / "models" / r["model_key"] / "best.pt").is_file()
        assert r["split"] == "test" and r["n_images"] == 6
    md = (base / "compare_models.md").read_text()
    assert "hmlstm (ours, 2 seeds)" in md and "vse (ours, 2 seeds)" in md and "published" in md

    client = MlflowClient(db)
    exp = client.get_experiment_by_name("densevse")
    (parent,) = client.search_runs([exp.experiment_id], "tags.kind = 'comparison'")
    assert parent.info.status == "FINISHED"
    assert "compare_models.md" in [a.path for a in client.list_artifacts(parent.info.run_id)]
    kids = client.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert sorted(k.info.run_id for k in kids) == sorted(r["mlflow_run_id"] for r in runs)
    assert parent.data.metrics["hmlstm_i2t_r1_mean"] == pytest.approx(
        sum(r["i2t_r1"] for r in runs if r["model_key"] == "hmlstm") / 2)

    capsys.readouterr()
    assert cm.main(args) == 0  # everything finished: reused, nothing retrained
    again = json.loads((base / "compare_models.json").read_text())["runs"]
    assert [r["mlflow_run_id"] for r in again] == [r["mlflow_run_id"] for r in runs]
