"""jobs/incremental.py refuses bad input before any work starts, and leaves what exists untouched."""

import subprocess

from conftest import PYTHON, ROOT, make_bucket

JOB = str(ROOT / "jobs" / "incremental.py")


def run_job(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    import os

    return subprocess.run([PYTHON, JOB, "--preset", "smoke", *args], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, **(env or {})}, timeout=300)


def test_unreachable_bucket_is_reported_before_work(s3_endpoint):
    import boto3

    result = run_job("--run-dir", "s3://no-such-bucket/run", "--in-process", env=s3_endpoint)
    assert result.returncode == 2, result.stderr
    assert "no-such-bucket" in result.stderr and "not reachable" in result.stderr
    client = boto3.client("s3", endpoint_url=s3_endpoint["AWS_ENDPOINT_URL"])
    assert "no-such-bucket" not in [b["Name"] for b in client.list_buckets()["Buckets"]]


def test_closed_endpoint_is_reported(tmp_path):
    from conftest import free_port

    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{free_port()}", "AWS_ACCESS_KEY_ID": "x", "AWS_SECRET_ACCESS_KEY": "x",
           "AWS_MAX_ATTEMPTS": "1"}
    result = run_job("--run-dir", "s3://bucket/run", "--in-process", env=env)
    assert result.returncode == 2 and "not reachable" in result.stderr


def test_run_dir_of_another_run_is_refused_and_kept(tmp_path):
    run_dir = tmp_path / "run"
    first = run_job("--run-dir", str(run_dir), "--in-process", "--method", "ft")
    assert first.returncode == 0, first.stderr
    before = {p.name: p.read_bytes() for p in run_dir.iterdir()}
    second = run_job("--run-dir", str(run_dir), "--in-process", "--method", "mib")
    assert second.returncode == 2 and "another run's config" in second.stderr and "method.name" in second.stderr
    assert {p.name: p.read_bytes() for p in run_dir.iterdir()} == before


def test_checkpoint_lacking_the_protocols_classes_is_refused(tmp_path):
    base = tmp_path / "base"
    assert run_job("--run-dir", str(base), "--in-process", "--method", "ft", "--set", "data.protocol=6-1").returncode == 0
    result = run_job("--run-dir", str(tmp_path / "run"), "--in-process",
                     "--set", f"train.init_checkpoint={base}/step-0.pt", "--set", "data.order_seed=7")
    assert result.returncode == 2 and "checkpoint classes" in result.stderr
    assert not (tmp_path / "run" / "step-0.pt").exists()


def test_bad_config_value_names_the_key(tmp_path):
    result = run_job("--run-dir", str(tmp_path), "--set", "train.epochs_base=many")
    assert result.returncode == 2 and "train.epochs_base" in result.stderr

