"""The errors a user acts on, in a leaf module every layer may import."""
from __future__ import annotations


class ConfigError(ValueError):
    """pipeline.yaml (or an override, or a path it names) is invalid; the message names each bad key."""


class DatasetError(ValueError):
    """A dataset's files are missing or malformed; the message names the file."""
