"""The run directory's write probe, run as a Ray task on a local one-CPU Ray."""

import pytest
import ray

from hrhf.distributed.probe import check_storage_where_work_runs


@pytest.fixture(scope="module")
def local_ray():
    """A new local Ray instance of one CPU (never one started elsewhere on the machine)."""
    ray.init(address="local", num_cpus=1, include_dashboard=False)
    yield
    ray.shutdown()


def head_ip() -> str:
    """The IP of the only node."""
    (node,) = ray.nodes()
    return node["NodeManagerAddress"]


def test_a_writable_dir_passes_on_the_head(local_ray, tmp_path):
    run_dir = tmp_path / "run"
    assert check_storage_where_work_runs(str(run_dir), num_cpus=1) == head_ip()
    assert run_dir.is_dir() and list(run_dir.iterdir()) == []  # the probe file is gone again


def test_an_unwritable_dir_is_named_with_the_node(local_ray, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("a regular file, so nothing can be created under it")
    uri = str(blocker / "run")
    with pytest.raises(OSError, match=f"{uri} is not writable from node {head_ip()}"):
        check_storage_where_work_runs(uri, num_cpus=1)


def test_the_probe_asks_for_the_workers_resources(local_ray, tmp_path):
    # a GPU that this cluster lacks: the task waits for a node that has one, as an actor would
    with pytest.raises(TimeoutError, match="1 GPU"):
        check_storage_where_work_runs(str(tmp_path / "run"), num_cpus=1, num_gpus=1, timeout_s=3)
