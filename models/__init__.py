"""Embedding models, selected by `train.model` in pipeline.yaml: hmlstm (ours), vse and dvsa (baselines)."""
from __future__ import annotations

from densevse.models import baselines, hmlstm  # noqa: F401  (register the models)
from densevse.models.base import MODELS


def build_model(name: str, train_cfg, **dims):
    return MODELS.get(name).from_config(train_cfg, **dims)


def rebuild(name: str, hparams: dict):
    """A model from a checkpoint's (name, hparams); weights are loaded by the caller."""
    return MODELS.get(name)(**hparams)
