"""End to end through the real CLI: `ray start --head`, `ray job submit jobs/incremental.py`, resume, S3, sweep."""

import json
import os
import secrets
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from conftest import PYTHON, ROOT, free_port, make_bucket
from hrhf.distributed.localcluster import is_running, kill_processes_under, processes_under

pytestmark = pytest.mark.slow

# Rewritten by every run, resumed or not; everything else in the run directory is written once.
REPORT_FILES = {"report.json", "report.md", "report.html", "miou_per_step.png", "per_class_iou.png"}


def stop_cluster(directory: str, timeout_s: float = 30.0) -> None:
    """Kill the processes of the Ray cluster whose ``--temp-dir`` is under ``directory``, and nothing else."""
    left = kill_processes_under(directory, timeout_s)
    assert not left, f"processes of the Ray cluster in {directory} still running: {left}"


def wait_until_accepting_jobs(head: dict, timeout_s: float = 120.0) -> None:
    """Wait until the job server takes a job: for a while after `ray start`, it has no agent to run one."""
    command = ["ray", "job", "submit", "--no-wait", "--address", head["address"], "--", "true"]
    deadline = time.monotonic() + timeout_s
    while True:
        result = subprocess.run(command, env=head["env"], capture_output=True, text=True, timeout=120)
        if result.returncode == 0:
            return
        assert "No available agent" in result.stderr and time.monotonic() < deadline, result.stderr[-3000:]
        time.sleep(2)


def head_env(base: str) -> dict:
    """The environment of a head started under ``base`` and of its clients: token auth, Ray's files under ``base``.

    The cluster and its clients use the token of the default path, ~/.ray/auth_token (created if missing).
    """
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")}
    env.update(RAY_AUTH_MODE="token", RAY_TMPDIR=base)
    return env


def start_head(base: str, env: dict, attempts: int = 3, pick_port: Callable[[], int] = free_port) -> int:
    """`ray start --head` with its files under ``base``; return the dashboard's port.

    The ports are free when chosen but another process of the machine may take one before Ray binds
    it, so a failed start is cleaned up and tried again on fresh ports.
    """
    for _ in range(attempts):
        port, dashboard = pick_port(), pick_port()
        command = [
            "ray", "start", "--head", f"--port={port}", f"--dashboard-port={dashboard}", "--num-cpus=2",
            "--dashboard-host=127.0.0.1", "--disable-usage-stats", f"--temp-dir={base}/ray",
            # its default, 52365, is taken by any other Ray instance on the machine, and then no job can run
            f"--dashboard-agent-listen-port={pick_port()}",
        ]
        result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=180)
        if result.returncode == 0:
            return dashboard
        stop_cluster(base)
        shutil.rmtree(f"{base}/ray", ignore_errors=True)
    raise RuntimeError(f"`ray start --head` failed {attempts} times; the last said:\n{result.stderr[-3000:]}")


@pytest.fixture(scope="module")
def ray_head(s3_endpoint):
    """A one-node Ray cluster of its own, started with the CLI (token authentication on) and stopped alone.

    The node holds the S3 endpoint and keys in its environment, as a cluster's nodes get them from their
    instance profile or setup commands, never through a job's runtime environment.

    Its files live under a fresh directory, which is also RAY_TMPDIR for the clients: `address="auto"`
    reads the latest cluster from <RAY_TMPDIR>/ray, so it finds this cluster, not another one of the
    machine, and turns token authentication on as for any cluster it finds itself.
    """
    base = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # short: Ray's socket paths must fit in 107 bytes
    env = head_env(base)
    try:
        dashboard = start_head(base, env)
        head = {"address": f"http://127.0.0.1:{dashboard}", "env": env, "directory": base}
        wait_until_accepting_jobs(head)
        with pytest.MonkeyPatch.context() as patch:
            patch.setenv("RAY_TMPDIR", base)  # for ray.init("auto") in the tests themselves
            yield head
    finally:
        stop_cluster(base)
        shutil.rmtree(base, ignore_errors=True)


def submit(head: dict, *job_args: str, env_vars: dict | None = None) -> subprocess.CompletedProcess:
    """`ray job submit` of jobs/incremental.py with the smoke preset; waits for the job to end."""
    runtime_env = json.dumps({"env_vars": {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0", **(env_vars or {})}})
    command = [
        "ray", "job", "submit", "--address", head["address"], "--working-dir", str(ROOT),
        "--runtime-env-json", runtime_env, "--",
        PYTHON, "jobs/incremental.py", "--preset", "smoke",
        "--synthesis-actors", "2", "--cpus-per-actor", "0.5", "--train-workers", "2", "--cpus-per-worker", "0.5",
        *job_args,
    ]
    return subprocess.run(command, env=head["env"], capture_output=True, text=True, timeout=900, cwd=ROOT)


def _assert_succeeded(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 0 and "succeeded" in result.stdout, result.stdout[-4000:] + result.stderr[-4000:]


def _assert_complete(report: dict) -> None:
    assert [s["step"] for s in report["steps"]] == [0, 1, 2]
    for step in report["steps"]:
        assert {"old", "new", "all", "background", "per_class"} <= set(step["metrics"])
        assert step["training_seconds"] >= 0 and "synthesis_seconds" in step
    assert report["steps"][1]["num_fake"] > 0


def test_a_client_without_the_token_is_refused(ray_head, tmp_path):
    def submit_echo(env: dict) -> subprocess.CompletedProcess:
        command = ["ray", "job", "submit", "--address", ray_head["address"], "--", "echo", "hrhf-auth-ok"]
        return subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)

    # a client elsewhere, as through `ray dashboard`: only the job server's HTTP address, no GCS address
    dropped = ("RAY_ADDRESS", "RAY_TMPDIR", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")
    client = {k: v for k, v in ray_head["env"].items() if k not in dropped}
    without_mode = submit_echo({k: v for k, v in client.items() if k != "RAY_AUTH_MODE"})
    assert without_mode.returncode != 0, without_mode.stdout
    assert "AuthenticationError" in without_mode.stderr and "Missing authentication token" in without_mode.stderr
    wrong = tmp_path / "wrong_token"
    wrong.write_text(secrets.token_hex(32))
    with_wrong_token = submit_echo({**client, "RAY_AUTH_TOKEN_PATH": str(wrong)})
    assert with_wrong_token.returncode != 0, with_wrong_token.stdout
    assert "AuthenticationError" in with_wrong_token.stderr
    assert "Invalid authentication token" in with_wrong_token.stderr
    # the cluster's token, named by RAY_AUTH_TOKEN_PATH as on the nodes of cluster.yaml
    right = tmp_path / "token"
    shutil.copyfile(Path.home() / ".ray" / "auth_token", right)
    with_token = submit_echo({**client, "RAY_AUTH_TOKEN_PATH": str(right)})
    assert with_token.returncode == 0 and "hrhf-auth-ok" in with_token.stdout and "succeeded" in with_token.stdout, (
        with_token.stdout[-3000:] + with_token.stderr[-3000:])


def core_processes(directory: str) -> set[int]:
    """PIDs of the GCS server and the raylet of the cluster under ``directory`` (workers come and go)."""
    core = set()
    for pid in processes_under(directory):
        try:
            program = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0]
        except OSError:
            continue
        if os.path.basename(program) in (b"gcs_server", b"raylet"):
            core.add(pid)
    return core


def test_stopping_a_cluster_leaves_the_othersis_running(ray_head):
    other = tempfile.mkdtemp(prefix="ray-", dir="/tmp")
    env = {k: v for k, v in ray_head["env"].items() if k != "RAY_TMPDIR"}
    try:
        subprocess.run(
            ["ray", "start", "--head", f"--port={free_port()}", "--num-cpus=0", "--include-dashboard=false",
             "--disable-usage-stats", f"--temp-dir={other}", f"--dashboard-agent-listen-port={free_port()}"],
            check=True, env=env, capture_output=True, timeout=180,
        )
        assert len(core_processes(other)) == 2
        kept = core_processes(ray_head["directory"])
        assert len(kept) == 2
        stop_cluster(other)
        assert not processes_under(other)
        assert all(is_running(pid) for pid in kept), "stopping one cluster ended the GCS or raylet of another"
    finally:
        stop_cluster(other)
        shutil.rmtree(other, ignore_errors=True)


def test_a_head_start_on_a_taken_port_is_tried_again():
    base = tempfile.mkdtemp(prefix="ray-", dir="/tmp")
    env = head_env(base)
    picked = []

    def first_port_taken() -> int:
        picked.append(taken.getsockname()[1] if not picked else free_port())
        return picked[-1]

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        try:
            start_head(base, env, pick_port=first_port_taken)  # the first GCS port is the one held here
            assert len(picked) == 6, "the start on a taken port did not fail, or was not tried again"
            assert len(core_processes(f"{base}/ray")) == 2
        finally:
            stop_cluster(base)
            shutil.rmtree(base, ignore_errors=True)


def test_job_submit_runs_and_resumes(ray_head, tmp_path):
    run_dir = tmp_path / "run"
    first = submit(ray_head, "--run-dir", str(run_dir))
    _assert_succeeded(first)
    assert "constructor arguments in the object store" not in first.stdout + first.stderr
    report = json.loads((run_dir / "report.json").read_text())
    _assert_complete(report)
    shards = sorted((run_dir / "synthetic" / "shards").glob("*.parquet"))
    assert shards and len(list((run_dir / "synthetic" / "_done").glob("*.json"))) == len(shards)
    assert (run_dir / "gallery-step-1.png").exists() and (run_dir / "gallery-step-2.png").exists()
    mtimes = {p: p.stat().st_mtime_ns for p in run_dir.rglob("*") if p.is_file() and p.name not in REPORT_FILES}
    second = submit(ray_head, "--run-dir", str(run_dir))
    _assert_succeeded(second)
    assert second.stdout.count("not recomputed") == 3
    assert json.loads((run_dir / "report.json").read_text())["steps"] == report["steps"]
    assert {p: p.stat().st_mtime_ns for p in mtimes} == mtimes  # nothing rewritten


def test_job_submit_with_run_dir_on_s3(ray_head, s3_endpoint):
    import pyarrow.fs
    import ray
    import s3fs

    make_bucket(s3_endpoint, "hrhf-runs")
    result = submit(ray_head, "--run-dir", "s3://hrhf-runs/e2e")
    _assert_succeeded(result)
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_endpoint["AWS_ENDPOINT_URL"]})
    report = json.loads(fs.cat_file("hrhf-runs/e2e/report.json"))
    _assert_complete(report)
    assert fs.exists("hrhf-runs/e2e/step-2.pt") and fs.exists("hrhf-runs/e2e/report.md")
    assert fs.exists("hrhf-runs/e2e/report.html") and fs.exists("hrhf-runs/e2e/gallery-step-2.png")
    assert fs.glob("hrhf-runs/e2e/train/**/checkpoint*") or fs.glob("hrhf-runs/e2e/train/**")
    shards = fs.glob("hrhf-runs/e2e/synthetic/shards/*.parquet")
    assert shards
    ray.init(address="auto")  # the read tasks find the credentials on the node
    try:
        dataset = ray.data.read_parquet(shards, filesystem=pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(fs)))
        rows = dataset.count()
        assert rows == report["steps"][-1]["num_fake"]  # kept images: the last step replays every step's shards
        assert {"image", "mask", "class", "scale", "seed"} <= set(dataset.schema().names)
    finally:
        ray.shutdown()


def test_sweep_of_four_trials_writes_its_table(ray_head, tmp_path):
    run_dir = tmp_path / "sweep"
    command = [PYTHON, "jobs/sweep.py", "--preset", "smoke", "--run-dir", str(run_dir), "--num-samples", "4",
               "--cpus-per-trial", "1", "--address", "auto"]
    result = subprocess.run(command, env=ray_head["env"], capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    lines = (run_dir / "sweep" / "results.csv").read_text().strip().splitlines()
    assert len(lines) == 1 + 4
    assert "w_kd_real" in lines[0] and "all" in lines[0]
    assert (run_dir / "sweep" / "best_config.yaml").exists() and (run_dir / "sweep" / "results.md").exists()
    assert (run_dir / "sweep" / "sweep.png").exists() and (run_dir / "sweep" / "results.html").exists()
