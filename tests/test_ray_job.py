"""End to end through the real CLI: `ray start --head`, `ray job submit jobs/incremental.py`, resume, S3, sweep."""

import json
import os
import subprocess
import time

import pytest

from conftest import PYTHON, ROOT, free_port, make_bucket

pytestmark = pytest.mark.slow

# Rewritten by every run, resumed or not; everything else in the run directory is written once.
REPORT_FILES = {"report.json", "report.md", "report.html", "miou_per_step.png", "per_class_iou.png"}


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    """A one-node Ray cluster started with the CLI (token authentication on, as Ray sets it)."""
    port, dashboard = free_port(), free_port()
    env = {**os.environ, "RAY_AUTH_MODE": "token"}
    subprocess.run(
        ["ray", "start", "--head", f"--port={port}", f"--dashboard-port={dashboard}", "--num-cpus=2",
         "--dashboard-host=127.0.0.1", "--disable-usage-stats"],
        check=True, env=env, capture_output=True, timeout=180,
    )
    yield {"address": f"http://127.0.0.1:{dashboard}", "env": env}
    subprocess.run(["ray", "stop", "--force"], env=env, capture_output=True, timeout=120)


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


def test_job_submit_runs_and_resumes(ray_head, tmp_path):
    run_dir = tmp_path / "run"
    first = submit(ray_head, "--run-dir", str(run_dir))
    _assert_succeeded(first)
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
    result = submit(ray_head, "--run-dir", "s3://hrhf-runs/e2e", env_vars=s3_endpoint)
    _assert_succeeded(result)
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_endpoint["AWS_ENDPOINT_URL"]})
    report = json.loads(fs.cat_file("hrhf-runs/e2e/report.json"))
    _assert_complete(report)
    assert fs.exists("hrhf-runs/e2e/step-2.pt") and fs.exists("hrhf-runs/e2e/report.md")
    assert fs.exists("hrhf-runs/e2e/report.html") and fs.exists("hrhf-runs/e2e/gallery-step-2.png")
    assert fs.glob("hrhf-runs/e2e/train/**/checkpoint*") or fs.glob("hrhf-runs/e2e/train/**")
    shards = fs.glob("hrhf-runs/e2e/synthetic/shards/*.parquet")
    assert shards
    ray.init(address="auto", runtime_env={"env_vars": s3_endpoint})  # the read tasks need the credentials too
    try:
        dataset = ray.data.read_parquet(shards, filesystem=pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(fs)))
        rows = dataset.count()
        assert rows == sum(s["num_fake"] for s in report["steps"])
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
