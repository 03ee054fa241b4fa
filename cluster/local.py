"""cluster/local.sh from Python: a throwaway multi-node Ray cluster on this machine, for tests and benchmarks.

    with local_cluster(workers=2, head_cpus=0, worker_cpus=2) as c:
        job = jobs.submit("pipeline.yaml", [...], address=c.dashboard)
        c.pids("worker1")        # that node's processes, e.g. to kill them

Each cluster gets its own temp dir and a free port range, so it never meets another user's Ray; it is torn
down by the PIDs local.sh recorded, never by `ray stop`.
"""
from __future__ import annotations

import contextlib
import random
import shutil
import socket
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

LOCAL_SH = Path(__file__).resolve().parent / "local.sh"


@dataclass
class LocalCluster:
    dir: Path
    address: str    # GCS host:port (ray.init)
    dashboard: str  # http://host:port (Jobs API, state API)

    def pids(self, node: str) -> list[int]:
        out = subprocess.run([str(LOCAL_SH), "pids", node, "--dir", str(self.dir)], capture_output=True, text=True,
                             check=True).stdout
        return [int(p) for p in out.split()]


def free_base_port(lo: int = 30000, hi: int = 45000) -> int:
    """A base port whose GCS, dashboard and client ports are free (local.sh uses BASE..BASE+999)."""
    for _ in range(50):
        base = random.randrange(lo, hi, 100)
        try:
            for p in (base, base + 1, base + 2):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", p))
            return base
        except OSError:
            continue
    raise RuntimeError("no free port range for a local cluster")


@contextlib.contextmanager
def local_cluster(workers: int = 2, head_cpus: int = 0, worker_cpus: int = 1, timeout: float = 900):
    d = Path(tempfile.mkdtemp(prefix="dvse-", dir="/tmp"))  # short: Ray's socket paths live under it
    cmd = [str(LOCAL_SH), "up", "--dir", str(d), "--port", str(free_base_port()), "--workers", str(workers),
           "--head-cpus", str(head_cpus), "--worker-cpus", str(worker_cpus)]
    try:
        up = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        if up.returncode != 0:
            raise RuntimeError(f"local.sh up failed ({up.returncode}):\n{up.stdout}\n{up.stderr}")
        yield LocalCluster(d, (d / "address").read_text().strip(), (d / "dashboard").read_text().strip())
    finally:
        subprocess.run([str(LOCAL_SH), "down", "--dir", str(d)], capture_output=True, timeout=120)
        shutil.rmtree(d, ignore_errors=True)
