"""What training leaves behind, found and loaded the same way by everyone who reads it.

    best_path(cfg.run.output_dir, "hmlstm")   # <output_dir>/models/<task>/best.pt
    load_trained(path, EMBEDDING)             # (model, vocab, labels, checkpoint) of hmlstm / vse / dvsa
    load_trained(path, CAPTIONER)             # a models.captioner.Captioner

A training task's name (pipeline/training/tasks.py: train.model for the embedding task, "captioner") names
its outputs: the loop writes best.pt and the summary there; evaluation, describe, search, the report and the
summary table read them from there. The output dir is a location (pipeline/storage.py): local, or in object
storage, where a checkpoint is read from a local copy. A checkpoint records its model_name, and the loader
builds from it: a captioner given where an embedding model is expected (or the reverse) is an error naming both.

Imports models/ and pipeline.storage only: evaluation reads through it, and the embedding task imports evaluation.
"""
from __future__ import annotations

from densevse.models import MODELS, restore
from densevse.models.captioner import MODEL_NAME as CAPTIONER_MODEL
from densevse.models.captioner import Captioner
from densevse.models.checkpoint import load_checkpoint
from densevse.models.vocab import Vocab
from densevse.pipeline import storage
from densevse.pipeline.errors import ModelMismatch

EMBEDDING = "embedding"  # the kind of hmlstm, vse, dvsa (tasks named by train.model)
CAPTIONER = "captioner"  # the m-RNN captioner: its task's name and its kind


def best_path(output_dir, task: str) -> storage.Location:
    """Where task `task` keeps its best epoch."""
    return storage.location(output_dir) / "models" / task / "best.pt"


def summary_path(output_dir, task: str) -> storage.Location:
    """The summary of task `task`'s last training job (its history included)."""
    return storage.location(output_dir) / f"train-{task}.json"


def kind_of(model_name: str | None) -> str:
    if model_name == CAPTIONER_MODEL:
        return CAPTIONER
    if model_name in MODELS:
        return EMBEDDING
    raise ModelMismatch(f"a checkpoint of an unknown model {model_name!r} (known: {MODELS.names()}, "
                        f"{CAPTIONER_MODEL!r})")


def checkpoint_file(path, task: str | None = None) -> storage.Location:
    """The checkpoint a user names (a location): a file as given; a checkpoint dir's model.pt; with `task`, an
    output dir's best.pt of that task."""
    path = storage.location(path)
    if path.is_dir():
        if (path / "model.pt").is_file() or task is None:
            return path / "model.pt"
        return best_path(path, task)
    return path


def load_trained(path, kind: str | None = None, device="cpu"):
    """The trained model at `path` (checkpoint_file; an output dir names the captioner's best, the one task of
    its kind), loaded safely and built as its model_name says: (model in eval mode, vocab, labels, checkpoint)
    for an embedding model, a Captioner for the captioner. `kind` (EMBEDDING, CAPTIONER): what the caller
    needs; a checkpoint of another kind is a ModelMismatch."""
    file = checkpoint_file(path, CAPTIONER if kind == CAPTIONER else None)
    if not file.is_file():
        verb = "densevse captioner train" if kind == CAPTIONER else "densevse train"
        raise FileNotFoundError(f"no trained {kind or 'model'} at {file} (train one: `{verb}`)")
    with storage.local(file) as local:
        ck = load_checkpoint(local, device)
    have = kind_of(ck.get("model_name"))
    if kind is not None and have != kind:
        raise ModelMismatch(f"{file} holds a {ck['model_name']} {have} model, not the {kind} model needed here")
    if have == CAPTIONER:
        return Captioner.from_checkpoint(ck, device)
    return restore(ck, device), Vocab(ck["vocab"]), Vocab(ck["labels"]), ck
