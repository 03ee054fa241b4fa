"""`densevse`: builds the parser from the verb-group modules and runs the chosen verb."""
from __future__ import annotations

import argparse
import logging
import pickle
import sys

from densevse.pipeline.cli import captioner, cluster, core, mlflow, models, search
from densevse.pipeline.errors import BadInput, ConfigError, ModelMismatch

VERB_GROUPS = (core, models, mlflow, captioner, search, cluster)  # each: register(subparsers), sets args.func


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="densevse", description="Dense visual-semantic embeddings on Ray + MLflow.")
    sub = parser.add_subparsers(dest="command", required=True)
    for group in VERB_GROUPS:
        group.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except (ConfigError, pickle.UnpicklingError, ModelMismatch, BadInput, FileNotFoundError) as e:  # a bad config,
        # checkpoint, query model or query input, a missing file: one line naming it, no traceback
        print(f"densevse: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
