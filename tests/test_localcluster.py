"""The /proc helpers that find, measure and stop one local Ray cluster's processes, and no other."""

import subprocess
import sys
import time

from hrhf.distributed.localcluster import is_running, kill_processes_under, peak_rss_mb, processes_under

# A parent that names its directory on the command line and starts a child that does not, both sleeping;
# the child holds about 64 MiB so that its peak memory is visible.
PARENT = (
    "import subprocess, sys, time; "
    "subprocess.Popen([sys.executable, '-c', 'import time; x = bytearray(64 << 20); time.sleep(60)']); "
    "time.sleep(60)"
)


def start_tree(directory) -> subprocess.Popen:
    """The parent process of a two-process tree; ``directory`` appears only in the parent's arguments."""
    return subprocess.Popen([sys.executable, "-c", PARENT, f"{directory}/marker"])


def wait_for(count: int, directory, timeout_s: float = 20.0) -> set[int]:
    deadline = time.monotonic() + timeout_s
    while len(found := processes_under(str(directory))) < count and time.monotonic() < deadline:
        time.sleep(0.1)
    return found


def test_finds_the_tree_under_its_directory_and_kills_only_it(tmp_path):
    mine, other = tmp_path / "mine", tmp_path / "other"
    first, second = start_tree(mine), start_tree(other)
    try:
        found = wait_for(2, mine)
        assert first.pid in found and len(found) == 2  # the parent by its command line, the child by descent
        assert second.pid not in found and not found & processes_under(str(other))
        child = (found - {first.pid}).pop()
        deadline = time.monotonic() + 20
        while (peak_rss_mb(child) or 0) < 64 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert peak_rss_mb(child) >= 64
        assert kill_processes_under(str(mine)) == []
        first.wait(timeout=10)
        assert not any(is_running(pid) for pid in found) and peak_rss_mb(child) is None
        assert is_running(second.pid) and len(processes_under(str(other))) == 2
    finally:
        kill_processes_under(str(mine))
        kill_processes_under(str(other))
        first.wait(timeout=10)
        second.wait(timeout=10)
