"""The errors a user acts on, in a leaf module every layer may import."""
from __future__ import annotations


class ConfigError(ValueError):
    """pipeline.yaml (or an override, or a path it names) is invalid; the message names each bad key."""


class DatasetError(ValueError):
    """A dataset's files are missing or malformed; the message names the file."""


class BadInput(ValueError):
    """An input item to embed or search with that the stages reject (its reason in the message)."""


class ModelMismatch(ValueError):
    """A query model that is not the one an index was built with."""
