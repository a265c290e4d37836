"""Fault injection: every case ends with the report of an uninterrupted run and every target exactly once.

The jobs run as driver processes (`python jobs/incremental.py --address ...`) against a two-node
`ray.cluster_utils.Cluster` started here: a head and one worker node, both on this machine, so a node
can be lost and replaced. Per-class IoU must match the uninterrupted run within 0.5 points.
"""

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import s3fs

from conftest import PYTHON, ROOT, free_port, make_bucket

pytestmark = pytest.mark.slow

# Slow enough synthesis (one target per shard, 150 iterations) that a kill lands in the middle of it; the tests that
# need it check that it did.
JOB_ARGS = ["--preset", "smoke", "--set", "inversion.iterations=150", "--shard-size", "1", "--synthesis-actors", "2",
            "--cpus-per-actor", "0.5", "--train-workers", "1", "--cpus-per-worker", "1", "--quiet",
            "--shared-run-dir"]  # both nodes of the test cluster are this machine
RESUME_ARGS = ["--take-over-lease", "--lease-timeout", "0.5"]  # the killed driver could not release its lease
TOLERANCE = 0.005  # IoU as a fraction: 0.5 points


class MotoEndpoint:
    """A moto S3 endpoint that can be stopped and started again on the same port (its buckets survive)."""

    def __init__(self) -> None:
        self.port = free_port()
        self.env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                    "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": f"http://127.0.0.1:{self.port}"}
        self.server = None

    def start(self) -> None:
        from moto.server import ThreadedMotoServer

        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port)
        self.server.start()

    def stop(self) -> None:
        self.server.stop()


@pytest.fixture(scope="module")
def s3_server():
    """The module's S3 endpoint."""
    s3fs.S3FileSystem.clear_instance_cache()
    endpoint = MotoEndpoint()
    endpoint.start()
    yield endpoint
    endpoint.stop()


@pytest.fixture(scope="module")
def cluster(s3_server):
    """A head node and one worker node; tests may remove the worker node and add another.

    The nodes get the S3 endpoint and keys in their environment, as a cluster's nodes get them from
    their instance profile or setup commands: a job's driver environment does not reach them.
    """
    from ray.cluster_utils import Cluster

    patcher = pytest.MonkeyPatch()
    for key, value in s3_server.env.items():
        patcher.setenv(key, value)
    ray_cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    worker = ray_cluster.add_node(num_cpus=2)
    ray_cluster.wait_for_nodes()
    ray_cluster.worker = worker
    yield ray_cluster
    ray_cluster.shutdown()
    patcher.undo()
    s3fs.S3FileSystem.clear_instance_cache()  # instances made here point at this module's endpoint


def start_job(cluster, run_dir, *extra: str, env: dict | None = None) -> subprocess.Popen:
    """Start the job's driver against the cluster, in its own process group."""
    command = [PYTHON, "jobs/incremental.py", "--address", cluster.address, "--run-dir", str(run_dir), *JOB_ARGS, *extra]
    return subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, env={**os.environ, "RAY_TRAIN_ENABLE_PRINT_PATCH": "0", **(env or {})})


def finish(job: subprocess.Popen, timeout: float = 600) -> tuple[int, str]:
    """Wait for a driver; return its exit code and stderr."""
    _, err = job.communicate(timeout=timeout)
    return job.returncode, err


def run_job(cluster, run_dir, *extra: str, env: dict | None = None) -> dict:
    """Run the job to the end and return its report."""
    code, err = finish(start_job(cluster, run_dir, *extra, env=env))
    assert code == 0, err[-4000:]
    return read_report(run_dir)


def read_report(run_dir) -> dict:
    """report.json of a local or s3:// run directory."""
    import fsspec

    with fsspec.open(f"{run_dir}/report.json", "r") as f:
        return json.load(f)


def wait_for(predicate, job: subprocess.Popen, timeout: float = 300, what: str = "") -> None:
    """Poll until ``predicate()`` holds; fail if the job ends first."""
    deadline = time.time() + timeout
    while not predicate():
        if job.poll() is not None:
            pytest.fail(f"job ended (code {job.returncode}) before {what}: {job.stderr.read()[-3000:]}")
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def kill(job: subprocess.Popen) -> None:
    """SIGKILL the driver: no cleanup, its lease stays behind."""
    os.killpg(job.pid, signal.SIGKILL)
    job.wait()


def markers(run_dir: Path, step: int) -> list[Path]:
    """Commit markers of a step's shards."""
    return sorted((run_dir / "synthetic" / "_done").glob(f"step{step}-*.json"))


def assert_same_report(report: dict, reference: dict) -> None:
    """Same steps and per-class IoU within the tolerance at every step."""
    assert [s["step"] for s in report["steps"]] == [s["step"] for s in reference["steps"]]
    for ours, theirs in zip(report["steps"], reference["steps"]):
        assert len(ours["metrics"]["per_class"]) == len(theirs["metrics"]["per_class"])
        for index, (other, iou) in enumerate(zip(ours["metrics"]["per_class"], theirs["metrics"]["per_class"])):
            if iou is None or other is None:
                assert iou == other, (ours["step"], index)
            else:
                assert abs(other - iou) <= TOLERANCE, (ours["step"], index, other, iou)


def assert_every_target_once(run_dir: str) -> None:
    """Each synthesis step's manifest covers its targets' seeds exactly once, read from the shards themselves."""
    from hrhf.config import from_dict
    from hrhf.pipeline import kept_targets, step_targets, task_of
    from hrhf.shards import ShardStore

    cfg = from_dict(read_report(run_dir)["config"])
    task = task_of(cfg)
    targets_of = kept_targets if cfg.inversion.keep_images else step_targets
    store = ShardStore(f"{run_dir}/synthetic")
    for step in range(1, task.num_steps):
        seeds = [m["seed"] for m in store.read_step(step).meta]
        assert seeds == [t.seed for t in targets_of(cfg, task, step)], step


@pytest.fixture(scope="module")
def reference(cluster, tmp_path_factory):
    """The uninterrupted run."""
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    report = run_job(cluster, run_dir)
    assert_every_target_once(str(run_dir))
    return {"report": report, "run_dir": run_dir}


def test_local_run_dir_on_two_nodes_is_refused(cluster, tmp_path):
    run_dir = tmp_path / "run"
    command = [PYTHON, "jobs/incremental.py", "--address", cluster.address, "--run-dir", str(run_dir), "--preset",
               "smoke", "--quiet"]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "has 2 nodes" in result.stderr and "s3://" in result.stderr and "--shared-run-dir" in result.stderr
    assert not run_dir.exists()


def test_driver_killed_mid_synthesis_then_resubmitted(cluster, reference, tmp_path):
    run_dir = tmp_path / "run"
    job = start_job(cluster, run_dir)
    wait_for(lambda: len(markers(run_dir, 1)) >= 2, job, what="two step-1 shards")
    kill(job)
    total = len(markers(reference["run_dir"], 1))
    assert len(markers(run_dir, 1)) < total, "the kill came after synthesis: make it slower"
    assert (run_dir / "_lease.json").exists()
    assert_same_report(run_job(cluster, run_dir, *RESUME_ARGS), reference["report"])
    assert_every_target_once(str(run_dir))


def test_driver_killed_mid_training_then_resubmitted(cluster, reference, tmp_path):
    run_dir = tmp_path / "run"
    job = start_job(cluster, run_dir)
    wait_for(lambda: (run_dir / "synthetic" / "manifests" / "step-1.json").exists(), job, what="step-1 synthesis")
    time.sleep(3)  # into step 1's training
    kill(job)
    assert not (run_dir / "step-1.pt").exists(), "the kill came after training: make it slower"
    assert_same_report(run_job(cluster, run_dir, *RESUME_ARGS), reference["report"])
    assert_every_target_once(str(run_dir))


def test_worker_node_lost_and_replaced(cluster, reference, tmp_path):
    run_dir = tmp_path / "run"
    job = start_job(cluster, run_dir)
    wait_for(lambda: len(markers(run_dir, 1)) >= 1, job, what="the first step-1 shard")
    cluster.remove_node(cluster.worker, allow_graceful=False)
    total = len(markers(reference["run_dir"], 1))
    assert len(markers(run_dir, 1)) < total, "the node was lost after synthesis: make it slower"
    time.sleep(2)
    cluster.worker = cluster.add_node(num_cpus=2)  # what an autoscaler does
    code, err = finish(job)
    assert code == 0, err[-4000:]
    assert_same_report(read_report(run_dir), reference["report"])
    assert_every_target_once(str(run_dir))


def test_damaged_shard_empty_marker_and_lost_checkpoints_heal(cluster, reference, tmp_path):
    """The README's check: truncate a shard, empty a marker, delete the later steps' checkpoints; rerun."""
    run_dir = tmp_path / "run"
    shutil.copytree(reference["run_dir"], run_dir)
    shard = sorted((run_dir / "synthetic" / "shards").glob("step2-*.parquet"))[0]
    shard.write_bytes(shard.read_bytes()[:100])
    markers(run_dir, 1)[0].write_text("")
    for step in (1, 2):
        (run_dir / f"step-{step}.pt").unlink()
        shutil.rmtree(run_dir / "train" / f"step-{step}")
    assert_same_report(run_job(cluster, run_dir), reference["report"])
    assert_every_target_once(str(run_dir))


def test_corrupt_checkpoint_is_set_aside_and_recomputed(cluster, reference, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(reference["run_dir"], run_dir)
    checkpoint = run_dir / "step-1.pt"
    checkpoint.write_bytes(checkpoint.read_bytes()[:1000])
    assert_same_report(run_job(cluster, run_dir), reference["report"])
    assert (run_dir / "step-1.pt.damaged").exists()
    assert_every_target_once(str(run_dir))


def test_s3_endpoint_lost_mid_run_fails_fast_then_resumes(cluster, reference, s3_server):
    env = s3_server.env
    make_bucket(env, "faults")
    run_dir = "s3://faults/run"
    job = start_job(cluster, run_dir)
    fs = s3fs.S3FileSystem(key=env["AWS_ACCESS_KEY_ID"], secret=env["AWS_SECRET_ACCESS_KEY"],
                           client_kwargs={"endpoint_url": env["AWS_ENDPOINT_URL"]})

    def step0_done() -> bool:
        fs.invalidate_cache()
        return fs.exists("faults/run/step-0.pt")

    wait_for(step0_done, job, what="step 0's checkpoint")
    s3_server.stop()
    start = time.time()
    try:
        code, err = finish(job, timeout=300)
    finally:
        s3_server.start()  # the same bucket, back
    seconds = time.time() - start
    assert code != 0 and seconds < 240, (code, seconds, err[-3000:])
    assert err.strip().splitlines()[-1].startswith("error: "), err[-3000:]
    assert_same_report(run_job(cluster, run_dir, *RESUME_ARGS), reference["report"])
    assert_every_target_once(run_dir)


def in_process(run_dir, *extra: str) -> subprocess.CompletedProcess:
    """The same job without Ray (the disk-full case needs no cluster)."""
    command = [PYTHON, "jobs/incremental.py", "--in-process", "--preset", "smoke", "--quiet", "--run-dir", str(run_dir),
               *extra]
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)


def test_disk_full_fails_clearly_then_completes_after_space_is_freed(tmp_path):
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a small tmpfs needs root")
    reference = tmp_path / "reference"
    assert in_process(reference).returncode == 0
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(disk)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        ballast = disk / "ballast"
        ballast.write_bytes(b"\0" * (1400 * 1024))  # about 600 KiB left: room for step 0 and 1, not for step 2
        run_dir = disk / "run"
        failed = in_process(run_dir)
        assert failed.returncode == 1 and "No space left on device" in failed.stderr, failed.stderr[-3000:]
        assert failed.stderr.startswith("error: ") and "Traceback" not in failed.stderr
        assert not list(run_dir.glob(".tmp-*")), "a half-written file was left behind"
        assert not (run_dir / "report.json").exists() and not (run_dir / "_lease.json").exists()
        ballast.unlink()
        resumed = in_process(run_dir)
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        assert_same_report(read_report(run_dir), read_report(reference))
    finally:
        subprocess.run(["umount", str(disk)], capture_output=True)
