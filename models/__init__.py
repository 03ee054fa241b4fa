"""Embedding models, selected by `train.model` in pipeline.yaml: hmlstm (ours), vse and dvsa (baselines)."""
from __future__ import annotations

from densevse.models import baselines, hmlstm  # noqa: F401  (register the models)
from densevse.models.base import MODELS


def new_embedding_model(name: str, train_cfg, **dims):
    """A fresh (untrained) model `name`, sized by the train config section and the data's `dims`."""
    return MODELS.get(name).from_config(train_cfg, **dims)


def rebuild(name: str, hparams: dict):
    """A model from a checkpoint's (name, hparams); weights are loaded by the caller."""
    return MODELS.get(name)(**hparams)


def restore(ck: dict, device="cpu"):
    """The trained model of a checkpoint dict (models.checkpoint.load_checkpoint), in eval mode."""
    model = rebuild(ck["model_name"], ck["hparams"]).to(device)
    model.load_state_dict(ck["state_dict"])
    return model.eval()
