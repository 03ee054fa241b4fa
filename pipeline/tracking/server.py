"""The MLflow tracking server: started for tests and `densevse mlflow`, and tracking URIs made absolute.

    densevse mlflow --port 5000 --dir mlflow     # sqlite backend, artifacts under mlflow/artifacts, 127.0.0.1
"""
from __future__ import annotations

import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from densevse.pipeline import storage


def absolute_uri(uri: str | None) -> str | None:
    """A local tracking URI with its path made absolute (sqlite:///rel.db, file:rel, rel/dir); others (servers,
    databricks) as given."""
    if not uri:
        return uri
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return "sqlite:///" + str(Path(uri[len("sqlite:///"):]).resolve())
    if uri.startswith("file:") and not uri.startswith("file:/"):
        return "file:" + str(Path(uri[len("file:"):]).resolve())
    if ":" not in uri and not uri.startswith(("databricks", "uc")):  # a bare path: MLflow's file store
        return str(Path(uri).resolve())
    return uri


def server_command(root: Path, host: str = "127.0.0.1", port: int = 5000, auth: bool = False,
                   artifacts: str | Path | None = None) -> list[str]:
    """`mlflow server` on root's sqlite store; auth: MLflow's basic-auth app (every API call needs a user/password).
    artifacts: where the server stores artifacts (a local path or s3:// gs:// URI; default root/artifacts). The
    server proxies them (--serve-artifacts): clients need no object-store credentials."""
    root = Path(root).resolve()
    dest = storage.location(artifacts) if artifacts is not None else root / "artifacts"
    cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{root}/mlflow.db",
           "--artifacts-destination", str(dest), "--serve-artifacts",
           "--host", host, "--port", str(port), "--workers", "1"]
    return cmd + ["--app-name", "basic-auth"] if auth else cmd


def server_env(root: Path | None = None, auth: bool = False, auth_config: Path | None = None) -> dict:
    """The server's environment: MLflow 3's background job runner (unused here) is off, it slows startup. With auth,
    what the basic-auth app reads at start: its config file (MLFLOW_AUTH_CONFIG_PATH: `auth_config`, else
    root/basic_auth.ini, written once, whose user store is root/basic_auth.db rather than one in the working dir)
    and a static Flask secret key for its CSRF checks (MLFLOW_FLASK_SERVER_SECRET_KEY: from the environment, else
    made once in root/flask_secret_key). The admin password is never written here: MLflow takes it from
    MLFLOW_AUTH_ADMIN_PASSWORD (or the config file's admin_password) when it creates the admin user."""
    import os
    import secrets

    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    if not auth:
        return env
    root = Path(root).resolve()
    root.mkdir(parents=True, exist_ok=True)
    if auth_config is None:
        auth_config = root / "basic_auth.ini"
        if not auth_config.exists():
            auth_config.write_text(  # MLflow's defaults but for the user store's place
                f"[mlflow]\ndefault_permission = READ\ndatabase_uri = sqlite:///{root}/basic_auth.db\n"
                "admin_username = admin\nauthorization_function = mlflow.server.auth:authenticate_request_basic_auth\n")
    env["MLFLOW_AUTH_CONFIG_PATH"] = str(Path(auth_config).resolve())
    if not env.get("MLFLOW_FLASK_SERVER_SECRET_KEY"):
        key = root / "flask_secret_key"
        if not key.exists():
            fd = os.open(key, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_hex(32))
        env["MLFLOW_FLASK_SERVER_SECRET_KEY"] = key.read_text().strip()
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(root: Path, port: int | None = None, host: str = "127.0.0.1", timeout: float = 120,
                 wait: bool = True, auth: bool = False, artifacts: str | Path | None = None):
    """Start `mlflow server` in the background; returns (process, tracking uri), by default once /health
    answers (wait=False: at once, call wait_server before use, so other setup overlaps its slow start).
    auth: the basic-auth app (server_env; MLFLOW_AUTH_ADMIN_PASSWORD must be set on its first start)."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    log = open(root / "server.log", "ab")
    # Own session: stop_server ends the server and every process it spawned (uvicorn) as one group.
    proc = subprocess.Popen(server_command(root, host, port, auth, artifacts), stdout=log, stderr=subprocess.STDOUT,
                            env=server_env(root, auth), start_new_session=True)
    uri = f"http://{host}:{port}"
    if wait:
        wait_server(proc, uri, timeout)
    return proc, uri


def wait_server(proc: subprocess.Popen, uri: str, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"mlflow server exited with {proc.returncode}; see its server.log")
        try:
            with urllib.request.urlopen(f"{uri}/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    stop_server(proc)
    raise TimeoutError(f"mlflow server did not answer on {uri} within {timeout}s")


def stop_server(proc: subprocess.Popen, timeout: float = 20) -> None:
    """Terminate a server from start_server, with its children (its own process group)."""
    import os
    import signal

    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        except ProcessLookupError:
            pass
