"""Real things for the trust and hostile-request tests: an untrained HM-LSTM checkpoint with a given run config, a
search index of fixture shards built with it, pickles that run code, and an HTTP server that records requests.

    ck = tiny_checkpoint(tmp / "best.pt", config={"stages": {...}})
    root = tiny_index(tmp, ck)
    evil = pickle_payload(tmp / "evil.pkl", marker)    # unpickling it creates `marker`
    with recording_server() as (base_url, seen): ...   # seen: the paths requested, each answered with a redirect
"""
from __future__ import annotations

import contextlib
import http.server
import os
import pickle
import threading
from pathlib import Path

import torch

from densevse.models.vocab import Vocab

WORDS = ["a", "red", "green", "blue", "yellow", "circle", "square", "triangle", "star", "left", "right", "of",
         "and", "is"]
LABELS = ["S", "NP", "VP", "PP", "ADVP", "DT", "JJ", "NN", "IN", "RB", "CC", "VBZ"]


class RunsCode:
    """Unpickling this runs `touch marker` (what a crafted .pkl or cloudpickled model can do)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def pickle_payload(path: Path, marker: Path) -> Path:
    path.write_bytes(pickle.dumps(RunsCode(marker)))
    return path


def tiny_checkpoint(path: Path, config: dict | None = None, feat_dim: int = 32, extra: dict | None = None) -> Path:
    """An untrained HM-LSTM (embed 8) saved as training saves it, with `config` as its run config."""
    from densevse.models.hmlstm import HMLSTM

    torch.manual_seed(0)
    vocab, labels = Vocab(WORDS), Vocab(LABELS)
    m = HMLSTM(vocab_size=len(vocab), n_labels=len(labels), feat_dim=feat_dim, hidden=8, embed=8)
    torch.save({"model_name": "hmlstm", "hparams": m.hparams, "state_dict": m.state_dict(), "vocab": vocab.words,
                "labels": labels.words, "config": config or {}, **(extra or {})}, path)
    return path


def tiny_index(tmp: Path, checkpoint: Path) -> Path:
    """`pipeline.search.index.build` of 12 fixture samples (32-d features) with `checkpoint`: the index dir."""
    from densevse.pipeline.search.index import build
    from densevse.pipeline.serving.embedder import Embedder
    from tests.shard_fixture import write_fixture_shards

    shards = write_fixture_shards(tmp / "shards", n_train=8, n_val=2, n_test=2, feat_dim=32, per_shard=4)
    out = tmp / "index"
    build(shards, Embedder.from_checkpoint(checkpoint), out, log=lambda m: None)
    return out


class _Recorder(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802
        self.server.seen.append(self.path)
        self.send_response(302)
        self.send_header("Location", "/evil.pkl")
        self.end_headers()

    def log_message(self, *args):
        pass


@contextlib.contextmanager
def recording_server():
    """A real HTTP server on 127.0.0.1 that records every request and redirects it: (base URL, seen paths)."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Recorder)
    server.seen = []
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", server.seen
    finally:
        server.shutdown()
        server.server_close()
