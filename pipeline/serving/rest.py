"""REST serving of a registered model: MLflow's own scoring server, started the way users run it.

    mlflow models serve -m models:/densevse-hmlstm@champion --env-manager local -h 127.0.0.1 -p 5001
    curl -X POST 127.0.0.1:5001/invocations -H 'Content-Type: application/json' \
         -d '{"dataframe_split": {"columns": ["text"], "data": [["a red circle left of a blue square"]]}}'

Run it with the venv activated (`source .venv/bin/activate`: MLflow execs `uvicorn` by name).
`--env-manager local` serves from this environment (Detectron2 and Stanza installed by setup.sh). Bad input
gets HTTP 400 with the reason in "message" (pipeline/serving/pyfunc.py) and the server keeps serving.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path



def is_loopback(host: str) -> bool:
    """Only this machine can connect: localhost, 127.0.0.0/8 or ::1 (a host name other than localhost may resolve to
    anything, so it counts as non-loopback)."""
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def serve_command(model_uri: str, host: str = "127.0.0.1", port: int = 5001) -> list[str]:
    return [sys.executable, "-m", "mlflow", "models", "serve", "-m", model_uri, "--env-manager", "local",
            "-h", host, "-p", str(port)]


def start(model_uri: str, tracking_uri: str, port: int, log: Path, timeout: float = 300):
    """`mlflow models serve` in its own process group (stop it with `stop`), once /ping answers: (process, url)."""
    # MLflow execs `uvicorn` by name: the venv's bin must be on PATH even when the venv is not activated.
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri,
           "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])}
    proc = subprocess.Popen(serve_command(model_uri, port=port), stdout=Path(log).open("wb"),
                            stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    wait_http(proc, f"{url}/ping", log, timeout)
    return proc, url


def wait_http(proc: subprocess.Popen, url: str, log: Path, timeout: float = 300) -> None:
    """Until `url` answers 200; a server that exits or stays silent is stopped and raises with its log's tail."""
    deadline = time.time() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        if proc.poll() is not None or time.time() > deadline:
            stop(proc)
            raise RuntimeError(f"{' '.join(map(str, proc.args))[:200]} did not answer {url}: "
                               f"{Path(log).read_text(errors='replace')[-3000:]}")
        time.sleep(0.5)


def stop(proc: subprocess.Popen, timeout: float = 30) -> None:
    """End the server and everything it started (its process group): SIGTERM, then SIGKILL for what lingers."""
    import signal

    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            continue
        if sig == signal.SIGTERM:  # the leader is gone: anything it started that outlived it
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            break
