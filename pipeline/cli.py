"""`densevse` command line. Each feature module contributes its subcommands through `register(subparsers)`."""
from __future__ import annotations

import argparse
import importlib
import sys

# Modules that add subcommands; each defines register(subparsers) and sets args.func.
COMMAND_MODULES = [
    "pipeline.commands",
    "pipeline.parser_train",
    "pipeline.tracking",
    "pipeline.detector_train",
    "cluster.jobs",
    "pipeline.describe",
]


def common_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", nargs="?", default="pipeline.yaml", help="pipeline.yaml (default: ./pipeline.yaml)")
    p.add_argument("--set", "-s", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. -s train.epochs=2 (repeatable)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="densevse", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from pipeline.config import ConfigError

    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except ConfigError as e:
        print(f"densevse: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
