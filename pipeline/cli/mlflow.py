"""`densevse mlflow`: a local MLflow tracking server (sqlite backend, artifacts beside it).

It listens on 127.0.0.1 unless told otherwise. The tracking API lets anyone who reaches it read, change and delete
every run and registered model, so a non-loopback --host needs --auth (MLflow's basic-auth app) and is refused
without it.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

from densevse.pipeline import storage
from densevse.pipeline.serving.rest import is_loopback
from densevse.pipeline.tracking.server import server_command, server_env

NO_AUTH = """densevse mlflow: refusing to serve on {host} without authentication: anyone who can reach it could read,
change and delete every run and registered model. Either
  * add --auth: MLflow's basic-auth app. On its first start set MLFLOW_AUTH_ADMIN_PASSWORD (12+ characters) for the
    admin user it creates (or pass --auth-config FILE, an MLflow basic_auth.ini); clients then set
    MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD; or
  * keep --host 127.0.0.1 and reach it through a tunnel: ssh -L {port}:127.0.0.1:{port} THIS_HOST"""


def register(subparsers) -> None:
    p = subparsers.add_parser("mlflow", help="run an MLflow tracking server (sqlite backend, local artifacts)")
    p.add_argument("--port", type=int, default=5000)
    p.add_argument("--host", default="127.0.0.1", help="listen address; a non-loopback one needs --auth")
    p.add_argument("--dir", type=Path, default=Path("mlflow"), help="holds mlflow.db and artifacts/")
    p.add_argument("--artifacts-destination", default=None, metavar="LOCATION",
                   help="where artifacts and registered models are stored: a path or s3:// gs:// URI "
                        "(default DIR/artifacts; S3 endpoint and keys from the AWS_* environment)")
    p.add_argument("--auth", action="store_true",
                   help="MLflow's basic-auth app (needs mlflow[auth]): users and passwords, stored in "
                        "DIR/basic_auth.db")
    p.add_argument("--auth-config", type=Path, default=None, metavar="FILE",
                   help="the basic-auth app's own config file (MLflow's basic_auth.ini format); implies --auth")
    p.set_defaults(func=_serve)


def _serve(args: argparse.Namespace) -> int:
    auth = args.auth or args.auth_config is not None
    if not auth and not is_loopback(args.host):
        print(NO_AUTH.format(host=args.host, port=args.port), file=sys.stderr)
        return 2
    try:
        artifacts = storage.location(args.artifacts_destination) if args.artifacts_destination else None
    except ValueError as e:
        print(f"densevse mlflow: --artifacts-destination: {e}", file=sys.stderr)
        return 2
    args.dir.mkdir(parents=True, exist_ok=True)
    print(f"MLflow at http://{args.host}:{args.port} (set mlflow.tracking_uri to it){' with basic auth' * auth}; "
          f"data in {args.dir}")
    return subprocess.call(server_command(args.dir, args.host, args.port, auth, artifacts),
                           env=server_env(args.dir, auth, args.auth_config))
