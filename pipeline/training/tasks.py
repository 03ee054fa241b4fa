"""Training tasks by name, as torchtitan registers train specs: one entry point for every trained model.

    summary = train(cfg)                           # `densevse train`: the task named train.model
    summary = train(cfg, "captioner", resume=True) # `densevse captioner train --resume`

A task's name names its outputs (pipeline/trained.py): its best.pt, its summary, its Ray Train and
MLflow run names. Every embedding model (models.MODELS: hmlstm, vse, dvsa) is one embedding task, which trains
train.model with the train: section; "captioner" is the m-RNN with the captioner: section.
"""
from __future__ import annotations

from functools import partial

from densevse.models import MODELS
from densevse.models.registry import Registry
from densevse.pipeline.training.captioner import CaptionerTask
from densevse.pipeline.training.embedding import EmbeddingTask
from densevse.pipeline.training.loop import fit

TASKS: Registry = Registry("training task")  # name -> (cfg -> Task)
for _model in MODELS.names():
    TASKS.register(_model)(partial(EmbeddingTask, model=_model))
TASKS.register(CaptionerTask.name)(CaptionerTask)


def train(cfg, task: str | None = None, resume: bool = False) -> dict:
    """Train the task named `task` (default: train.model) on cfg's train shards; `resume`: from its latest
    checkpoint. Returns the summary (also at trained.summary_path)."""
    return fit(cfg, TASKS.get(task or cfg.train.model)(cfg), resume)
