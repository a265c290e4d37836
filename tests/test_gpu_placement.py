"""GPU placement on a two-node cluster whose worker node advertises a fake GPU: which process asks for which device.

Synthesis actors, evaluation actors, train workers and sweep trials resolve their device where Ray placed
them (hrhf.distributed.devices). With HRHF_DEVICE_LOG set in the nodes' environment, each of them records
its request (role, device, pid, node, GPU ids) and then computes on the CPU; the driver only orchestrates
and must never touch CUDA.
"""

import json
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import ray
import ray.train
import torch

from hrhf.config import load_config, to_dict
from hrhf.distributed.devices import DEVICE_LOG_ENV, compute_device
from hrhf.distributed.evaluation import RayEvaluator
from hrhf.distributed.synthesis import RaySynthesizer
from hrhf.distributed.training import RayTrainer
from hrhf.distributed.tuning import new_tuner, sweep_trainable
from hrhf.models import build_model, save_checkpoint
from hrhf.pipeline import run, task_of

pytestmark = pytest.mark.slow

# A custom resource of the fake GPU node. Ray Train workers that reserve a GPU need real CUDA and NCCL,
# so here they reach that node through this resource instead.
GPU_NODE = "gpu_node"


def quiet(_message: str) -> None:
    """A log that drops every line."""


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A head node without GPU and a worker node with one (fake) GPU; every process records its device."""
    from ray.cluster_utils import Cluster

    log = tmp_path_factory.mktemp("devices") / "devices.jsonl"
    patcher = pytest.MonkeyPatch()
    patcher.setenv(DEVICE_LOG_ENV, str(log))  # before the nodes start: their workers inherit it
    ray_cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "num_gpus": 0, "include_dashboard": False})
    try:
        gpu_node = ray_cluster.add_node(num_cpus=2, num_gpus=1, resources={GPU_NODE: 1})
        ray_cluster.wait_for_nodes()
        ray.init(address=ray_cluster.address)
        yield SimpleNamespace(log=log, gpu_node_id=gpu_node.node_id)
    finally:
        ray.shutdown()
        ray_cluster.shutdown()
        patcher.undo()


@pytest.fixture
def driver_without_cuda(monkeypatch):
    """Make any use of CUDA in this (the driver's) process fail the test, even where a caller swallows the error."""
    calls = []

    def refuse(name):
        def call(*args, **kwargs):
            calls.append(name)
            raise AssertionError(f"the driver called torch.cuda.{name}")
        return call

    monkeypatch.setattr(torch.cuda, "_lazy_init", refuse("_lazy_init"))
    monkeypatch.setattr(torch.cuda, "is_available", refuse("is_available"))
    yield
    assert calls == [], f"the driver touched CUDA: {calls}"


class GpuNodeTrainer(RayTrainer):
    """RayTrainer whose workers go to the fake GPU node through its custom resource, without reserving the GPU."""

    def scaling_config(self) -> ray.train.ScalingConfig:
        """One CPU share and the GPU node's custom resource per worker."""
        return ray.train.ScalingConfig(num_workers=self.num_workers, use_gpu=False,
                                       resources_per_worker={"CPU": self.cpus_per_worker, GPU_NODE: 1})


def small_config():
    """The smoke preset, smaller still: two steps run in well under a minute."""
    return load_config("smoke", overrides=["model.width=4", "data.image_size=32", "data.train_size=48",
                                           "data.val_size=16", "inversion.iterations=2"])


def new_records(log: Path, seen: int) -> list[dict]:
    """The device records written after the first ``seen`` ones."""
    lines = log.read_text().splitlines() if log.exists() else []
    return [json.loads(line) for line in lines[seen:]]


def record_count(log: Path) -> int:
    """How many device records the log holds."""
    return len(log.read_text().splitlines()) if log.exists() else 0


def check_placement(records: list[dict], gpu_node_id: str) -> None:
    """No record from the driver; every GPU request granted on the GPU node, with a GPU id."""
    assert records
    for record in records:
        assert record["pid"] != os.getpid(), f"the driver resolved a device: {record}"
        if record["device"] == "cuda":
            assert record["node_id"] == gpu_node_id, f"GPU work off the GPU node: {record}"
            assert record["gpu_ids"], f"GPU work without a GPU id: {record}"


def test_pipeline_work_asks_for_the_gpu_on_the_gpu_node(cluster, driver_without_cuda, tmp_path):
    cfg = small_config()
    cfg.inversion.allocation = "coverage"  # the evaluation actors count what step 1's real images show
    cfg.inversion.keep_images = False  # (kept images invert each class once, with the uniform budget)
    seen = record_count(cluster.log)
    report = run(
        cfg,
        run_dir=str(tmp_path / "run"),
        synthesizer=RaySynthesizer(cfg, num_actors=1, use_gpu=True, shard_size=8, log=quiet),
        trainer=GpuNodeTrainer(num_workers=1, use_gpu=True, storage_path=str(tmp_path / "train"), log=quiet),
        evaluator=RayEvaluator(num_actors=1, use_gpu=True),
        log=quiet,
        last_step=1,
    )
    assert [step["step"] for step in report["steps"]] == [0, 1]
    records = new_records(cluster.log, seen)
    check_placement(records, cluster.gpu_node_id)
    roles = {(r["role"], r["device"]) for r in records}
    # one synthesis pool and one coverage count (step 1), two fits that also score their model (steps 0 and 1)
    assert roles == {("synthesis", "cuda"), ("evaluation", "cuda"), ("train", "cpu")}, records
    assert sum(r["role"] == "evaluation" for r in records) >= 1 and sum(r["role"] == "train" for r in records) == 2
    assert {r["node_id"] for r in records if r["role"] == "train"} == {cluster.gpu_node_id}


def test_sweep_trial_asks_for_the_gpu_it_reserved(cluster, driver_without_cuda, tmp_path):
    cfg = small_config()
    task = task_of(cfg)
    base = str(tmp_path / "base" / "step-0.pt")
    torch.manual_seed(0)
    model = build_model(cfg.model.name, len(task.steps[0]) + 1, cfg.model.width)
    save_checkpoint(base, model, model_name=cfg.model.name, width=cfg.model.width, classes=[list(task.steps[0])],
                    step=0, config=to_dict(cfg))
    seen = record_count(cluster.log)
    trainable = sweep_trainable(cfg, base, cpus_per_trial=1.0, gpus_per_trial=1.0)
    tuner = new_tuner(trainable, str(tmp_path / "sweep"), cfg.train.epochs_step, num_samples=1,
                      search_space={"w_fake": 1.0})
    results = tuner.fit()
    assert results.num_errors == 0 and results[0].metrics["all"] is not None
    records = new_records(cluster.log, seen)
    check_placement(records, cluster.gpu_node_id)
    assert [(r["role"], r["device"]) for r in records] == [("trial", "cuda")]


def test_a_gpu_request_without_a_reserved_gpu_fails_clearly(cluster):
    @ray.remote(num_cpus=0.1, num_gpus=0)
    def resolve(use_gpu: bool) -> str:
        return compute_device(use_gpu, "synthesis")

    with pytest.raises(RuntimeError, match="synthesis was asked to compute on a GPU, but Ray assigned this process none"):
        ray.get(resolve.remote(True))
    with pytest.raises(RuntimeError, match="assigned this process none"):
        compute_device(True, "evaluation")  # the driver reserves nothing
    assert ray.get(resolve.remote(False)) == "cpu"


def test_progress_queues_stay_on_the_drivers_node(cluster):
    driver_node = ray.get_runtime_context().get_node_id()
    queues = [RayTrainer().progress_queue() for _ in range(6)]
    try:
        nodes = ray.get([q.actor.__ray_call__.remote(lambda _: ray.get_runtime_context().get_node_id())
                         for q in queues])
    finally:
        for q in queues:
            ray.kill(q.actor)
    assert driver_node != cluster.gpu_node_id and set(nodes) == {driver_node}


def test_ray_trainer_reserves_one_gpu_per_worker():
    scaling = RayTrainer(num_workers=2, use_gpu=True, cpus_per_worker=0.5).scaling_config()
    assert scaling.num_workers == 2 and scaling.use_gpu and scaling.num_gpus_per_worker == 1
    assert scaling.num_cpus_per_worker == 0.5
    assert not RayTrainer(use_gpu=False).scaling_config().use_gpu
