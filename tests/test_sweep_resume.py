"""A sweep killed after some trials finished, then submitted again: it resumes and runs no finished trial twice."""

import collections
import json
import logging
import os
import signal
import subprocess
import time

import pytest

from conftest import PYTHON, ROOT
from hrhf.models import load_checkpoint

pytestmark = pytest.mark.slow

NUM_SAMPLES = 4


def sweep_command(run_dir) -> list[str]:
    """The sweep job on its own local Ray (``--address local``: never a cluster found on this machine)."""
    return [PYTHON, "jobs/sweep.py", "--preset", "smoke", "--run-dir", str(run_dir), "--num-samples", str(NUM_SAMPLES),
            "--address", "local"]


def finished_trials(experiment_dir) -> tuple[set[str], int]:
    """(ids of the trials the saved experiment state records as finished, how many of them are TERMINATED).

    A trial counts as finished when it is TERMINATED or holds a checkpoint (only a finished step reports one).
    """
    from ray.tune import ExperimentAnalysis

    logging.getLogger("ray.tune.analysis.experiment_analysis").setLevel(logging.ERROR)  # trials without results yet
    try:
        trials = ExperimentAnalysis(str(experiment_dir)).trials
    except Exception:  # no experiment state saved yet, or one caught while being written
        return set(), 0
    done = [t for t in trials if t.status == "TERMINATED" or t.checkpoint is not None]
    return {t.trial_id for t in done}, sum(t.status == "TERMINATED" for t in done)


def processes_with(marker: str) -> list[int]:
    """Live processes whose environment holds ``marker``: the sweep and every process it started, Ray's included."""
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/environ", "rb") as f:
                    if marker.encode() in f.read():
                        pids.append(int(entry))
            except OSError:  # gone meanwhile, or not ours
                continue
    return pids


def wait_gone(marker: str, timeout: float) -> list[int]:
    """Wait until no process carries ``marker``; return those still there at the deadline."""
    deadline = time.monotonic() + timeout
    while (left := processes_with(marker)) and time.monotonic() < deadline:
        time.sleep(0.5)
    return left


def kill_session(process: subprocess.Popen, marker: str) -> None:
    """SIGKILL the process group (the session) of ``process`` and make sure every process it started is gone."""
    os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=30)
    for pid in wait_gone(marker, timeout=30):  # one that left the group and outlived its parent
        os.kill(pid, signal.SIGKILL)
    left = wait_gone(marker, timeout=30)
    assert not left, f"processes of the killed sweep still run: {left}"


def test_a_killed_sweep_resumes_without_rerunning_finished_trials(tmp_path):
    run_dir, trial_log = tmp_path / "run", tmp_path / "trials.log"
    experiment_dir = run_dir / "sweep"
    env = {**os.environ, "HRHF_TRIAL_LOG": str(trial_log), "RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}
    env.pop("RAY_ADDRESS", None)

    with open(tmp_path / "first.log", "w") as first_log:
        first = subprocess.Popen(sweep_command(run_dir), cwd=ROOT, env=env, stdout=first_log, stderr=subprocess.STDOUT,
                                 start_new_session=True)
        try:
            deadline = time.monotonic() + 300
            finished: set[str] = set()
            while not finished and first.poll() is None and time.monotonic() < deadline:
                time.sleep(0.5)
                finished, _ = finished_trials(experiment_dir)
            assert first.poll() is None, "the sweep ended before it could be killed:\n" + (tmp_path / "first.log").read_text()[-3000:]
            assert finished, "no trial finished in time:\n" + (tmp_path / "first.log").read_text()[-3000:]
        finally:
            kill_session(first, marker=str(trial_log))

    # What the interrupted sweep left on disk: these trials must not train again.
    finished, terminated = finished_trials(experiment_dir)
    base_mtime = (run_dir / "base" / "step-0.pt").stat().st_mtime_ns
    assert 1 <= len(finished) < NUM_SAMPLES

    second = subprocess.run(sweep_command(run_dir), cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    output = second.stdout + second.stderr
    assert second.returncode == 0, output[-3000:]
    runs = collections.Counter(trial_log.read_text().split())
    assert {trial: runs[trial] for trial in finished} == {trial: 1 for trial in finished}, runs
    assert len(runs) == NUM_SAMPLES, runs  # every trial trained at least once, and no other trial appeared
    rows = (experiment_dir / "results.csv").read_text().strip().splitlines()
    assert len(rows) == 1 + NUM_SAMPLES
    assert f"resumed the sweep in {experiment_dir}: {terminated} trials already finished" in second.stdout
    assert "not retrained" in second.stdout and (run_dir / "base" / "step-0.pt").stat().st_mtime_ns == base_mtime
    # Each trial's checkpoint: the finished step's result and its model, loadable as an hrhf checkpoint.
    checkpoints = sorted(experiment_dir.glob("*/checkpoint_*"))
    assert len(checkpoints) == NUM_SAMPLES
    for checkpoint in checkpoints:
        _, payload = load_checkpoint(str(checkpoint / "step-1.pt"))
        assert payload["step"] == 1 and payload["extra"]["result"] == json.loads((checkpoint / "result.json").read_text())
