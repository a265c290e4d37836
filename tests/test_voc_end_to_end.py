"""The job end to end on the genuine PASCAL VOC sample, with DeepLabV3-MobileNetV3: in process and on Ray."""

import json
import math
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import PYTHON, ROOT, SHARED_DATA, free_port
from hrhf.models import load_checkpoint, num_outputs
from hrhf.plots import gallery_size

VOC_ROOT = SHARED_DATA / "voc_mini"  # ../shared/data/voc_mini from the repository root
VOC2012 = VOC_ROOT / "VOCdevkit" / "VOC2012"
MODEL = "deeplabv3_mobilenet_v3_large"
IMAGE_SIZE = 64
# Protocol 15-5 in the default class order; both steps have training images in the 28-image train split.
STEPS = [list(range(1, 16)), list(range(16, 21))]
SCALES = [0.2]
IMAGES_PER_SCALE = 1

JOB_ARGS = [
    "--set", "data.dataset=voc", "--set", "data.protocol=15-5", "--set", f"data.root={VOC_ROOT}",
    "--set", f"data.image_size={IMAGE_SIZE}", "--set", f"model.name={MODEL}",
    "--set", "train.epochs_base=1", "--set", "train.epochs_step=1", "--set", "train.min_iters_step=0",
    "--set", "train.batch_size=8",
    "--set", "inversion.iterations=2", "--set", "inversion.batch_size=16",
    "--set", f"inversion.scales={SCALES}", "--set", f"inversion.images_per_scale={IMAGES_PER_SCALE}",
    # one torch thread, as the Ray actors and workers of one CPU have: on a busy 2-core machine, two
    # threads made the in-process run about five times slower (they spin while waiting for each other)
    "--set", "threads=1",
]

pytestmark = pytest.mark.skipif(not VOC2012.is_dir(), reason=f"VOC sample not found at {VOC_ROOT}")


def images_with_new_classes(step: int) -> int:
    """Training images of a step in the overlapped setting, counted from the masks themselves."""
    ids = (VOC2012 / "ImageSets" / "Segmentation" / "train.txt").read_text().split()
    new = set(STEPS[step])
    return sum(bool(new & set(np.unique(np.array(Image.open(VOC2012 / "SegmentationClass" / f"{i}.png"))).tolist()))
               for i in ids)


def run_job(run_dir: Path, *extra: str) -> subprocess.CompletedProcess:
    """Run jobs/incremental.py on the VOC sample to its end."""
    command = [PYTHON, "jobs/incremental.py", "--run-dir", str(run_dir), *JOB_ARGS, *extra]
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "RAY_TRAIN_ENABLE_PRINT_PATCH": "0"})


def assert_finite_fraction(value: object, what: object) -> None:
    """An IoU: a finite number in [0, 1]."""
    assert isinstance(value, float) and math.isfinite(value) and 0.0 <= value <= 1.0, (what, value)


def check_run(run_dir: Path) -> dict:
    """Report, checkpoints and gallery of a finished two-step VOC run; returns the report."""
    report = json.loads((run_dir / "report.json").read_text())
    assert report["config"]["data"]["dataset"] == "voc" and report["config"]["model"]["name"] == MODEL
    assert [s["step"] for s in report["steps"]] == [0, 1]
    for step, entry in enumerate(report["steps"]):
        metrics = entry["metrics"]
        for key in ("background", "new", "all"):
            assert_finite_fraction(metrics[key], (step, key))
        if step == 0:
            assert metrics["old"] is None
        else:
            assert_finite_fraction(metrics["old"], (step, "old"))
        # every class of the sample occurs in its validation split, so each seen class has an IoU
        n_seen = sum(len(classes) for classes in STEPS[: step + 1])
        assert len(metrics["per_class"]) == 1 + n_seen
        for index, iou in enumerate(metrics["per_class"]):
            assert_finite_fraction(iou, (step, "per_class", index))
        assert entry["num_real"] == images_with_new_classes(step)

    n_targets = len(STEPS[0]) * len(SCALES) * IMAGES_PER_SCALE
    assert report["steps"][0]["num_fake"] == 0 and report["steps"][1]["num_fake"] == n_targets

    x = torch.randn(1, 3, IMAGE_SIZE, IMAGE_SIZE)
    for step, entry in enumerate(report["steps"]):
        model, payload = load_checkpoint(str(run_dir / f"step-{step}.pt"))
        n_outputs = 1 + sum(len(classes) for classes in STEPS[: step + 1])
        assert payload["model"]["name"] == MODEL and payload["step"] == step
        assert payload["classes"] == STEPS[: step + 1] and num_outputs(model) == n_outputs
        assert payload["extra"]["result"] == entry
        with torch.no_grad():
            logits = model.eval()(x)
        assert logits.shape == (1, n_outputs, IMAGE_SIZE, IMAGE_SIZE) and torch.isfinite(logits).all()

    assert not (run_dir / "gallery-step-0.png").exists()  # step 0 synthesises nothing
    with Image.open(run_dir / "gallery-step-1.png") as gallery:
        gallery.verify()
    with Image.open(run_dir / "gallery-step-1.png") as gallery:
        # one row per old class, one column per scale
        assert gallery.size == gallery_size(len(STEPS[0]), len(SCALES), IMAGE_SIZE)
    return report


def test_voc_in_process(tmp_path):
    run_dir = tmp_path / "run"
    result = run_job(run_dir, "--in-process")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    check_run(run_dir)
    assert not (run_dir / "synthetic").exists()  # shards are written by the Ray synthesiser only


@pytest.fixture(scope="module")
def voc_cluster():
    """A one-node Ray cluster of this module on 127.0.0.1, with Ray's files under a fresh directory."""
    from ray.cluster_utils import Cluster

    base = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # short: Ray's socket paths must fit in 107 bytes
    patcher = pytest.MonkeyPatch()
    # the cluster's address file goes here, not where `address="auto"` of other clients looks
    patcher.setenv("RAY_TMPDIR", base)
    # Ray turns a 127.0.0.1 address into the machine's outward IP, where no raylet of a loopback node
    # listens; with multi-node clusters off, the nodes, the job's driver and its workers all keep 127.0.0.1.
    patcher.setenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    cluster = None
    try:
        cluster = Cluster(initialize_head=True, head_node_args={
            "num_cpus": 2, "node_ip_address": "127.0.0.1", "include_dashboard": False,
            "temp_dir": f"{base}/ray", "dashboard_agent_listen_port": free_port(),
        })
        cluster.wait_for_nodes()
        yield cluster
    finally:
        if cluster is not None:
            cluster.shutdown()
        patcher.undo()
        shutil.rmtree(base, ignore_errors=True)


@pytest.mark.slow
def test_voc_on_ray(voc_cluster, tmp_path):
    run_dir = tmp_path / "run"
    result = run_job(run_dir, "--address", voc_cluster.address, "--synthesis-actors", "1", "--cpus-per-actor", "1",
                     "--train-workers", "1", "--cpus-per-worker", "1")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = check_run(run_dir)
    shards = sorted((run_dir / "synthetic" / "shards").glob("*.parquet"))
    assert shards and len(list((run_dir / "synthetic" / "_done").glob("*.json"))) == len(shards)
    assert (run_dir / "train").is_dir()  # Ray Train's storage of the step checkpoints
    assert report["steps"][1]["synthesis"] is not None
