"""An exclusive lease on a run directory, so that two jobs never write the same run at once.

The lease is one small JSON file, ``_lease.json``, in the run directory: who holds it (job id, host,
pid), a random token, and a heartbeat time that a background thread refreshes. It is taken with an
exclusive create: ``O_CREAT | O_EXCL`` on a local file system, a conditional PUT
(``If-None-Match: *``) on S3. A second job finds the file and is refused, naming the holder. A lease
whose heartbeat is older than ``stale_after_s`` belongs to a job that died; it may be taken over, but
only when asked for explicitly (``takeover=True``), because a slow or partitioned holder may still
be alive.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from typing import Any

import fsspec

from hrhf.storage import is_local, write_bytes_atomic

LEASE_NAME = "_lease.json"
HEARTBEAT_S = 15.0
STALE_AFTER_S = 120.0


class LeaseHeldError(RuntimeError):
    """The run directory is leased by another job."""


def job_id() -> str:
    """The Ray job's submission id when run by ``ray job submit``, else ``local-<pid>``."""
    return os.environ.get("RAY_JOB_SUBMISSION_ID") or os.environ.get("RAY_JOB_ID") or f"local-{os.getpid()}"


def describe(holder: dict[str, Any], now: float | None = None) -> str:
    """'job J on host H (pid P), heartbeat N s ago' for an error message."""
    age = (now or time.time()) - float(holder.get("heartbeat", 0))
    return (f"job {holder.get('job_id', '?')} on host {holder.get('host', '?')} (pid {holder.get('pid', '?')}), "
            f"last heartbeat {age:.0f} s ago")


class RunLease:
    """Holds ``{run_dir}/_lease.json`` from ``acquire()`` to ``release()``; use as a context manager."""

    def __init__(self, run_dir: str, stale_after_s: float = STALE_AFTER_S, heartbeat_s: float = HEARTBEAT_S) -> None:
        self.run_dir = run_dir.rstrip("/")
        self.uri = f"{self.run_dir}/{LEASE_NAME}"
        self.fs, self.path = fsspec.core.url_to_fs(self.uri)
        self.local = is_local(self.uri)
        self.stale_after_s = stale_after_s
        self.heartbeat_s = heartbeat_s
        self.token = uuid.uuid4().hex
        self.record = {"job_id": job_id(), "host": socket.gethostname(), "pid": os.getpid(), "token": self.token}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.lost: str | None = None  # why the lease was lost, if another job took it over
        self.made_directory = False  # the lease created the (local) run directory

    def _payload(self) -> bytes:
        now = time.time()
        self.record.setdefault("acquired", now)
        self.record["heartbeat"] = now
        return json.dumps(self.record).encode()

    def _create(self) -> bool:
        """Create the lease file if there is none; False if one exists."""
        data = self._payload()
        if self.local:
            directory = os.path.dirname(self.path)
            self.made_directory = not os.path.isdir(directory)
            os.makedirs(directory, exist_ok=True)
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            return True
        try:
            self.fs.pipe_file(self.path, data, mode="create")
        except OSError as err:
            if isinstance(err, FileExistsError) or "PreconditionFailed" in str(err) or "412" in str(err):
                return False
            raise
        return True

    def holder(self) -> dict[str, Any] | None:
        """The current lease record, or None when there is none; a garbled file reads as a stale holder."""
        try:
            self.fs.invalidate_cache(self.path)
            raw = self.fs.cat_file(self.path)
        except FileNotFoundError:
            return None
        try:
            record = json.loads(raw)
            if not isinstance(record, dict):
                raise ValueError("not a JSON object")
            return record
        except ValueError:
            return {"job_id": "unknown (garbled lease file)", "heartbeat": 0}

    def acquire(self, takeover: bool = False) -> RunLease:
        """Take the lease, or raise LeaseHeldError naming its holder; start the heartbeat thread."""
        try:
            created = self._create()
        except Exception as err:  # botocore's connection errors are not OSErrors
            raise OSError(f"run directory {self.run_dir} is not reachable or not writable: {err}") from err
        if not created:
            holder = self.holder() or {}
            age = time.time() - float(holder.get("heartbeat", 0))
            if age <= self.stale_after_s:
                raise LeaseHeldError(
                    f"run directory {self.run_dir} is in use by {describe(holder)}; wait for that job "
                    "to end (or stop it), or use another run directory"
                )
            if not takeover:
                raise LeaseHeldError(
                    f"run directory {self.run_dir} has a stale lease of {describe(holder)} "
                    f"(older than {self.stale_after_s:.0f} s): if that job is gone, rerun with --take-over-lease"
                )
            self._write()
        self._thread = threading.Thread(target=self._beat, name="run-lease-heartbeat", daemon=True)
        self._thread.start()
        return self

    def _write(self) -> None:
        write_bytes_atomic(self.uri, self._payload())

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                current = self.holder()
                if current is None or current.get("token") != self.token:
                    self.lost = f"the lease was taken over by {describe(current or {})}"
                    return
                self._write()
            except Exception:  # a missed heartbeat is retried at the next tick; staleness needs many
                continue

    def check(self) -> None:
        """Raise LeaseHeldError if another job has taken the lease over since it was acquired."""
        if self.lost:
            raise LeaseHeldError(f"run directory {self.run_dir}: {self.lost}; stopping before writing more")

    def release(self) -> None:
        """Stop the heartbeat and delete the lease file if it is still ours."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        try:
            current = self.holder()
            if current is not None and current.get("token") == self.token:
                self.fs.rm_file(self.path)
            directory = os.path.dirname(self.path)
            if self.made_directory and not os.listdir(directory):
                os.rmdir(directory)  # a job refused after taking the lease leaves nothing behind
        except Exception:
            pass  # an unreachable store leaves a lease that goes stale; a takeover can then clear it

    def __enter__(self) -> RunLease:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
