"""The one argument convention of every verb that reads a config."""
from __future__ import annotations

import argparse
from pathlib import Path

DEFAULT_CONFIG = "pipeline.yaml"


def common_args(p: argparse.ArgumentParser) -> None:
    """CONFIG (positional, default ./pipeline.yaml) and repeatable `-s key=value` overrides."""
    p.add_argument("config", nargs="?", default=DEFAULT_CONFIG, help="pipeline.yaml (default: ./pipeline.yaml)")
    overrides(p)


def overrides(p: argparse.ArgumentParser) -> None:
    p.add_argument("--set", "-s", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. -s train.epochs=2 (repeatable)")


def is_config(path: str) -> bool:
    """A leading positional that names a YAML file is the config (verbs whose other positionals are files)."""
    return Path(path).suffix in (".yaml", ".yml")


def load(args):
    """The validated config of a parsed command line."""
    from densevse.pipeline.config import load_config

    path = args.config
    if path == DEFAULT_CONFIG and not Path(path).is_file():
        path = None  # no ./pipeline.yaml: the code defaults (equal to pipeline.yaml's)
    return load_config(path, args.overrides)
