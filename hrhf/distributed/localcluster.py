"""A Ray cluster's processes on this machine, found through /proc (Linux): for tests and benchmarks.

`ray stop` cannot be scoped to one cluster in Ray 2.60: it ends every Ray process of the machine. A
cluster started with `ray start --temp-dir DIR` can be told apart: each of its processes names DIR on
its command line (GCS, raylet, dashboard, monitors) or descends from one that does (agents and workers
are children of the raylet, job drivers of their supervisor actor).
"""

from __future__ import annotations

import os
import signal
import socket
import time
from pathlib import Path


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nobody listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stat_fields(pid: int) -> list[str]:
    """The fields of /proc/PID/stat after the command name (state first, then the parent's PID)."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def processes_under(directory: str) -> set[int]:
    """PIDs of the processes whose command line names a path under ``directory``, and of their descendants."""
    needle = os.path.join(directory, "").encode()
    children: dict[int, list[int]] = {}
    roots = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
            parent = int(_stat_fields(int(entry.name))[1])
        except (OSError, IndexError, ValueError):  # the process ended meanwhile
            continue
        pid = int(entry.name)
        children.setdefault(parent, []).append(pid)
        if needle in cmdline:
            roots.append(pid)
    found, todo = set(), roots
    while todo:
        pid = todo.pop()
        if pid not in found and pid != os.getpid():
            found.add(pid)
            todo.extend(children.get(pid, []))
    return found


def is_running(pid: int) -> bool:
    """Whether the process runs; a zombie has ended (only its parent can reap it)."""
    try:
        return _stat_fields(pid)[0] != "Z"
    except (OSError, IndexError):
        return False


def peak_rss_mb(pid: int) -> float | None:
    """The peak resident memory (VmHWM) of a running process in MiB, or None once it has ended."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def kill_processes_under(directory: str, timeout_s: float = 30.0) -> list[int]:
    """SIGKILL the processes of the cluster under ``directory``, and nothing else; return those still running."""
    pids = processes_under(directory)
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + timeout_s
    while any(is_running(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.2)
    return sorted(pid for pid in pids if is_running(pid))
