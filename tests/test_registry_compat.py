"""Models registered before the layout changes keep loading and predicting the same.

tests/fixtures/registry-v0.tar.gz is a real MLflow registry (sqlite + artifacts) holding a tiny HM-LSTM
embedding model and a tiny captioner, registered with the code of commit 66cef60 (an early layout) by
tests/fixtures/make_registry_v0.py.txt, together with the predictions that code gave. They are cloudpickled
PythonModels whose class paths are top-level modules (`pipeline.pyfunc_model.EmbeddingPyfunc`,
`pipeline.captioner.CaptionerPyfunc`), and they ship that code (MLflow `code_paths`). Today's code is installed
under one namespace, `densevse.*`, so nothing of it answers to those top-level names any more: in a process that
runs today's CLI, an old model loads with the code it shipped (no import shims, no clash), as MLflow intends.
"""
from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "tests" / "fixtures" / "registry-v0.tar.gz"

LOAD = r"""
import json, sys
import pandas as pd
import densevse.pipeline.cli  # what `densevse ...` has imported before it loads a model
import mlflow
uri, which = sys.argv[1], sys.argv[2]
mlflow.set_tracking_uri(uri)
expected = json.load(open(sys.argv[3]))
m = mlflow.pyfunc.load_model(f"models:/{which}/1")
cls = type(m.unwrap_python_model())
inp = expected["embedding_input" if which == "densevse-hmlstm" else "captioner_input"]
out = m.predict(pd.DataFrame(inp))
print(json.dumps({"module": sys.modules[cls.__module__].__file__, "cls": cls.__qualname__,
                  "out": {k: out[k].tolist() for k in out.columns}}, default=lambda a: a.tolist()))
"""


def _unpack(tmp_path: Path) -> tuple[str, dict]:
    """Extract the registry and point its stored absolute paths at the new place."""
    with tarfile.open(FIXTURE) as t:
        t.extractall(tmp_path, filter="data")
    root = tmp_path / "densevse-registry-v0"
    expected = json.loads((root / "expected.json").read_text())
    old, new = expected["prefix"], str(root)
    db = sqlite3.connect(root / "mlflow.db")
    for (table,) in db.execute("select name from sqlite_master where type='table'").fetchall():
        for col in [r[1] for r in db.execute(f"pragma table_info({table})")]:
            db.execute(f'update "{table}" set "{col}" = replace("{col}", ?, ?) '
                       f'where typeof("{col}") = \'text\' and instr("{col}", ?) > 0', (old, new, old))
    db.commit()
    db.close()
    for meta in root.rglob("MLmodel"):
        meta.write_text(meta.read_text().replace(old, new))
    return f"sqlite:///{root}/mlflow.db", expected


def _load(uri: str, name: str, tmp_path: Path) -> dict:
    exp = tmp_path / "densevse-registry-v0" / "expected.json"
    r = subprocess.run([sys.executable, "-c", LOAD, uri, name, str(exp)], capture_output=True, text=True,
                       cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_embedding_model_registered_before_the_move_loads_and_predicts_the_same(tmp_path):
    uri, expected = _unpack(tmp_path)
    got = _load(uri, "densevse-hmlstm", tmp_path)
    assert "/artifacts/code/" in got["module"], got["module"]  # the code it shipped, not today's (densevse.*)
    want = expected["embedding_output"]
    assert len(got["out"]["embedding"]) == 2
    for g, w in zip(got["out"]["embedding"], want["embedding"]):
        assert g == pytest.approx(w, abs=1e-5)
    for g, w in zip(got["out"]["parts"], want["parts"]):
        assert len(g) == len(w)
        for gr, wr in zip(g, w):
            assert gr == pytest.approx(wr, abs=1e-5)


def test_captioner_registered_before_the_move_loads_and_predicts_the_same(tmp_path):
    uri, expected = _unpack(tmp_path)
    got = _load(uri, "densevse-captioner", tmp_path)
    assert "/artifacts/code/" in got["module"], got["module"]
    want = expected["captioner_output"]
    assert got["out"]["text"] == want["text"]
    assert got["out"]["score"] == pytest.approx(want["score"], abs=1e-5)
