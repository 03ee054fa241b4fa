"""`densevse mlflow`: a local MLflow tracking server (sqlite backend, artifacts beside it)."""
from __future__ import annotations

import argparse
import subprocess
from pathlib import Path

from pipeline.tracking import server_command, server_env


def register(subparsers) -> None:
    p = subparsers.add_parser("mlflow", help="run an MLflow tracking server (sqlite backend, local artifacts)")
    p.add_argument("--port", type=int, default=5000)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--dir", type=Path, default=Path("mlflow"), help="holds mlflow.db and artifacts/")
    p.set_defaults(func=_serve)


def _serve(args: argparse.Namespace) -> int:
    args.dir.mkdir(parents=True, exist_ok=True)
    print(f"MLflow at http://{args.host}:{args.port} (set mlflow.tracking_uri to it); data in {args.dir}")
    return subprocess.call(server_command(args.dir, args.host, args.port), env=server_env())
