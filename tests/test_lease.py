"""The run directory's exclusive lease: one job at a time, stale leases taken over only when asked."""

import json
import subprocess
import time

import pytest

from conftest import PYTHON, ROOT, make_bucket
from hrhf.config import load_config
from hrhf.lease import LEASE_NAME, LeaseHeldError, RunLease
from hrhf.pipeline import run


def test_second_holder_is_refused_with_the_holders_name(tmp_path):
    with RunLease(str(tmp_path)).acquire() as first:
        with pytest.raises(LeaseHeldError, match=rf"in use by job {first.record['job_id']} on host"):
            RunLease(str(tmp_path)).acquire()
        assert json.loads((tmp_path / LEASE_NAME).read_text())["token"] == first.token
    assert not (tmp_path / LEASE_NAME).exists()
    RunLease(str(tmp_path)).acquire().release()  # free again once released


def test_stale_lease_needs_an_explicit_takeover(tmp_path):
    crashed = RunLease(str(tmp_path), heartbeat_s=0.05).acquire()
    crashed._stop.set()  # a job that died: its heartbeat stops
    time.sleep(0.3)
    with pytest.raises(LeaseHeldError, match="--take-over-lease"):
        RunLease(str(tmp_path), stale_after_s=0.1).acquire()
    with RunLease(str(tmp_path), stale_after_s=0.1).acquire(takeover=True) as successor:
        assert json.loads((tmp_path / LEASE_NAME).read_text())["token"] == successor.token


def test_holder_notices_a_takeover(tmp_path):
    slow = RunLease(str(tmp_path), heartbeat_s=0.05).acquire()
    with RunLease(str(tmp_path), stale_after_s=0.0).acquire(takeover=True):
        time.sleep(0.3)
        with pytest.raises(LeaseHeldError, match="taken over"):
            slow.check()
        slow.release()  # must not delete the successor's lease
        assert (tmp_path / LEASE_NAME).exists()


def test_run_refuses_a_leased_run_dir(tmp_path):
    with RunLease(str(tmp_path)).acquire():
        with pytest.raises(LeaseHeldError):
            run(load_config("smoke"), run_dir=str(tmp_path), log=lambda *_: None)
    assert not (tmp_path / "config.yaml").exists()


def test_conditional_put_on_s3(s3_endpoint):
    make_bucket(s3_endpoint, "lease-runs")
    with RunLease("s3://lease-runs/a").acquire():
        with pytest.raises(LeaseHeldError, match="in use by"):
            RunLease("s3://lease-runs/a").acquire()
    RunLease("s3://lease-runs/a").acquire().release()


@pytest.mark.slow
def test_second_identical_job_is_refused_while_the_first_finishes(tmp_path):
    """The README's check: the same command twice on one run directory."""
    run_dir = tmp_path / "run"
    # --address local: a Ray of its own, never a cluster another test left on the machine
    command = [PYTHON, "jobs/incremental.py", "--preset", "smoke", "--run-dir", str(run_dir), "--quiet", "--address", "local"]
    first = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 180
    while not (run_dir / LEASE_NAME).exists():
        assert first.poll() is None and time.time() < deadline, first.communicate()
        time.sleep(0.1)
    second = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert second.returncode == 2, second.stderr
    assert "is in use by job local-" in second.stderr and "Traceback" not in second.stderr
    out, err = first.communicate(timeout=600)
    assert first.returncode == 0, err[-3000:]
    assert (run_dir / "report.json").exists() and not (run_dir / LEASE_NAME).exists()
