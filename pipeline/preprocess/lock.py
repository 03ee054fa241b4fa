"""One preprocessing run per shard dir at a time.

Two runs on one shard dir would replace each other's plan/ and a worker of one would read the other's keys, so
`preprocess` holds a lock on `<shard_dir>/.lock` for the whole run, and a second run fails at once naming the
holder (host, pid, run name, since when).

- Local dir (or a shared mount: NFS emulates flock with POSIX locks): `fcntl.flock` on the file. The kernel
  drops the lock when the holder dies, so a crashed run never leaves a stale lock; the file stays (deleting a
  lock file races with a process that has just opened it) and holds the last holder's record.
- s3://: a lease object written with a conditional PUT (`If-None-Match: *` to take a free lease, `If-Match:
  <etag>` to renew one's own or take over an expired one: S3's compare-and-swap). A heartbeat thread renews it
  every `ttl_s / 4`; a crashed holder's lease expires after `ttl_s`, then the next run takes it over. A holder
  that fails to renew (another run took an expired lease over: the holder was stalled for longer than ttl_s)
  marks itself lost, and `check()` raises before the run writes its manifest.
Other schemes (gs://) have no lock here yet: refused, naming the scheme.
"""
from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid

from densevse.pipeline import storage
from densevse.pipeline.errors import ConfigError

log = logging.getLogger("densevse.preprocess")
LOCK_NAME = ".lock"
TTL_S = 600.0  # an s3:// lease not renewed for this long is free


class LockHeld(RuntimeError):
    """Another run holds the shard dir's lock; the message names it."""


def _record(run: str, ttl_s: float | None) -> dict:
    now = time.time()
    rec = {"host": socket.gethostname(), "pid": os.getpid(), "run": run, "since": round(now, 3),
           "token": uuid.uuid4().hex}
    if ttl_s is not None:
        rec["expires"] = round(now + ttl_s, 3)
    return rec


def describe(rec: dict | None) -> str:
    """The holder as a person reads it."""
    if not rec:
        return "an unknown holder (no readable lock record)"
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(rec.get("since", 0)))
    text = f"run {rec.get('run', '?')!r}, pid {rec.get('pid', '?')} on {rec.get('host', '?')}, since {since}"
    if "expires" in rec:
        text += f", lease until {time.strftime('%H:%M:%S', time.localtime(rec['expires']))}"
    return text


class ShardDirLock:
    """`with ShardDirLock(shard_dir, run="default"):` (module docstring)."""

    def __init__(self, shard_dir, run: str = "", ttl_s: float = TTL_S):
        self.path = storage.location(shard_dir) / LOCK_NAME
        self.run, self.ttl_s = run, ttl_s
        self._fd: int | None = None
        self._etag: str | None = None
        self._lost: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> ShardDirLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    # ---- local
    def _acquire_local(self) -> None:
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_json(os.pread(fd, 65536, 0))
            os.close(fd)
            raise LockHeld(f"{self.path}: another preprocessing run holds this shard dir: {describe(holder)}. "
                           f"Wait for it to finish, or use another shards.dir") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(_record(self.run, None)).encode(), 0)
        self._fd = fd

    # ---- s3
    def _put(self, rec: dict, etag: str | None) -> str:
        """The lease record, written only if the lease is free (etag None) or still the version `etag`."""
        return storage.put_if(self.path, json.dumps(rec).encode(), etag)

    def _get(self) -> tuple[dict | None, str | None]:
        data, etag = storage.read_versioned(self.path)
        return (_read_json(data), etag) if data is not None else (None, None)

    def _acquire_s3(self) -> None:
        rec = _record(self.run, self.ttl_s)
        try:
            self._etag = self._put(rec, None)
        except storage.PreconditionFailed:
            holder, etag = self._get()
            if holder is not None and holder.get("expires", 0) > time.time():
                raise LockHeld(f"{self.path}: another preprocessing run holds this shard dir: {describe(holder)}. "
                               f"Wait for it to finish (a crashed run's lease expires), or use another "
                               f"shards.dir") from None
            try:  # expired (or unreadable): take it over, unless someone else just did
                self._etag = self._put(rec, etag)
            except storage.PreconditionFailed:
                raise LockHeld(f"{self.path}: another run took over the expired lease of "
                               f"{describe(holder)} at the same moment") from None
            log.warning("%s: took over the expired lease of %s", self.path, describe(holder))
        self._rec = rec
        self._thread = threading.Thread(target=self._heartbeat, name="densevse-lease", daemon=True)
        self._thread.start()

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.ttl_s / 4) and self.renew():
            pass

    def renew(self) -> bool:
        """Extend the lease (If-Match on our ETag); False once it is lost (then `check` raises). A renewal that
        fails otherwise (the store briefly down) is logged and tried again at the next beat."""
        rec = {**self._rec, "expires": round(time.time() + self.ttl_s, 3)}
        try:
            self._etag = self._put(rec, self._etag)
        except storage.PreconditionFailed:
            self._lost = (f"{self.path}: the lease was taken over by another run (this one stalled for over "
                          f"{self.ttl_s:g} s)")
            log.error(self._lost)
            return False
        except Exception as e:  # noqa: BLE001 - the store briefly down: tried again at the next beat
            log.warning("%s: lease renewal failed (%s: %s); retrying", self.path, type(e).__name__, e)
        return True

    # ---- both
    def acquire(self) -> None:
        """A flock on a local file, a lease with conditional PUTs on S3: the two kinds of storage lock differently."""
        sch = storage.scheme(self.path)
        if storage.is_local(self.path):
            self._acquire_local()
        elif sch == "s3":
            self._acquire_s3()
        else:
            raise ConfigError(f"shards.dir: no run lock for {sch}:// shard dirs yet (local paths and s3:// have "
                              f"one); two runs there could mix their data")

    def check(self) -> None:
        """Raise when the lease was lost (s3://): this run must not write its manifest over another's."""
        if self._lost:
            raise LockHeld(self._lost)

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing drops the flock
            self._fd = None
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None
            if not self._lost:
                holder, etag = self._get()
                if etag == self._etag and holder and holder.get("token") == self._rec["token"]:
                    self.path.unlink(missing_ok=True)


def _read_json(data: bytes) -> dict | None:
    try:
        rec = json.loads(data.decode() or "null")
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    return rec if isinstance(rec, dict) else None
