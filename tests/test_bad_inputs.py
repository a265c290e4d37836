"""Bad input is refused before any work: a clear error naming the culprit, exit code 2, nothing written."""

import importlib.util
import shutil

import numpy as np
import pytest
from PIL import Image

from conftest import ROOT, SHARED_DATA

spec = importlib.util.spec_from_file_location("incremental_job", ROOT / "jobs" / "incremental.py")
job = importlib.util.module_from_spec(spec)
spec.loader.exec_module(job)

VOC_ID = "2007_000333"  # in voc_mini's train list


@pytest.fixture
def voc(tmp_path):
    """A writable copy of the VOC sample, to damage."""
    root = tmp_path / "voc"
    shutil.copytree(SHARED_DATA / "voc_mini", root)
    return root / "VOCdevkit" / "VOC2012"


def refused(capsys, run_dir, *args: str) -> str:
    """Run the job with ``args``; assert exit code 2, no traceback, no run directory; return stderr."""
    code = job.main(["--preset", "smoke", "--in-process", "--run-dir", str(run_dir), *args])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("error: ") and "Traceback" not in err
    assert not run_dir.exists(), sorted(p.name for p in run_dir.iterdir())
    return err


def voc_args(voc) -> list[str]:
    return ["--set", "data.dataset=voc", "--set", f"data.root={voc.parents[1]}", "--set", "data.protocol=15-5"]


def test_truncated_jpeg(voc, tmp_path, capsys):
    image = voc / "JPEGImages" / f"{VOC_ID}.jpg"
    image.write_bytes(image.read_bytes()[: image.stat().st_size // 2])
    err = refused(capsys, tmp_path / "run", *voc_args(voc))
    assert f"{VOC_ID}.jpg" in err and "cannot decode" in err


def test_zero_byte_png(voc, tmp_path, capsys):
    (voc / "SegmentationClass" / f"{VOC_ID}.png").write_bytes(b"")
    err = refused(capsys, tmp_path / "run", *voc_args(voc))
    assert f"{VOC_ID}.png" in err and "cannot decode" in err


def test_mask_of_another_size(voc, tmp_path, capsys):
    path = voc / "SegmentationClass" / f"{VOC_ID}.png"
    with Image.open(path) as mask:
        mask.crop((0, 0, mask.width - 7, mask.height)).save(path)
    err = refused(capsys, tmp_path / "run", *voc_args(voc))
    assert f"{VOC_ID}.png" in err and "but image" in err


def test_label_out_of_range(voc, tmp_path, capsys):
    path = voc / "SegmentationClass" / f"{VOC_ID}.png"
    with Image.open(path) as mask:
        values = np.array(mask)
        values[0, 0] = 77
        Image.fromarray(values, mode="L").save(path)
    err = refused(capsys, tmp_path / "run", *voc_args(voc))
    assert f"{VOC_ID}.png" in err and "[77]" in err


def test_missing_image(voc, tmp_path, capsys):
    (voc / "JPEGImages" / f"{VOC_ID}.jpg").unlink()
    err = refused(capsys, tmp_path / "run", *voc_args(voc))
    assert f"missing file" in err and f"{VOC_ID}.jpg" in err


@pytest.mark.parametrize(
    "yaml_text, message",
    [
        ("train:\n  epochs_base: many\n", "train.epochs_base: expected int"),
        ("train:\n  epoch_base: 3\n", "unknown config key 'train.epoch_base'"),
        ("- 1\n- 2\n", "top level must be a mapping"),
    ],
)
def test_bad_yaml_config(tmp_path, capsys, yaml_text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml_text)
    assert message in refused(capsys, tmp_path / "run", "--config", str(path))


@pytest.mark.parametrize(
    "override, message",
    [
        ("data.class_order=[1, 2, 3]", "permutation"),
        ("data.class_order=[1, 1, 2, 3, 4, 5, 6, 7, 8, 9]", "permutation"),
        ("data.protocol=6-6", "unknown protocol"),
        ("train.lr_step=-0.1", "train.lr_step must be a finite value > 0"),
        ("inversion.lr=.nan", "inversion.lr must be a finite value > 0"),
        ("method.fake_ratio=1.0", "method.fake_ratio"),
        ("inversion.scales=[0.0, 0.5]", "inversion.scales"),
        ("train.batch_size=0", "train.batch_size must be >= 1"),
        ("device=tpu", "device must be"),
    ],
)
def test_set_values_out_of_range(tmp_path, capsys, override, message):
    assert message in refused(capsys, tmp_path / "run", "--set", override)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--synthesis-actors", "0"], "--synthesis-actors must be >= 1"),
        (["--shard-size", "0"], "--shard-size must be >= 1"),
        (["--train-workers", "0"], "--train-workers must be >= 1"),
        (["--cpus-per-worker", "0"], "--cpus-per-worker must be > 0"),
    ],
)
def test_job_arguments_out_of_range(tmp_path, capsys, args, message):
    assert message in refused(capsys, tmp_path / "run", *args)


def test_gpu_without_cuda(tmp_path, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert "needs CUDA" in refused(capsys, tmp_path / "run", "--gpu")


def test_checkpoint_of_another_architecture(tmp_path, capsys):
    from hrhf.models import build_model, save_checkpoint

    checkpoint = tmp_path / "base.pt"
    model = build_model("small", 7, width=4)
    save_checkpoint(str(checkpoint), model, model_name="small", width=4, classes=[[1, 2, 3, 4, 5, 6]], step=0, config={})
    err = refused(capsys, tmp_path / "run", "--set", f"train.init_checkpoint={checkpoint}")
    assert "width 4" in err and "width 8" in err


def test_corrupt_init_checkpoint(tmp_path, capsys):
    checkpoint = tmp_path / "base.pt"
    checkpoint.write_bytes(b"PK\x03\x04 not really a zip")
    assert "not a readable checkpoint" in refused(capsys, tmp_path / "run", "--set", f"train.init_checkpoint={checkpoint}")


@pytest.mark.parametrize(
    "args, message",
    [
        (["--reference", "mibb"], "unknown reference method 'mibb'"),
        (["--reference", "ft,", "--reference", "lwf"], "unknown reference method ''"),
        (["--method", "mib", "--reference", "ft,mib"], "reference 'mib' is the run's own method"),
        (["--method", "joint", "--reference", "mib"], "a joint run has no incremental step-0 model"),
    ],
)
def test_bad_reference(tmp_path, capsys, args, message):
    assert message in refused(capsys, tmp_path / "run", *args)


@pytest.mark.parametrize(
    "argv, cpus_of_nodes, expected",
    [
        ([], [2], 2.0),  # one worker takes the machine, as the job in process does
        (["--train-workers", "2"], [2], 1.0),
        (["--train-workers", "3"], [8, 16], 5.0),  # the largest node, whole CPUs
        (["--train-workers", "4"], [2], 1.0),  # never below one CPU
        (["--gpu"], [16], 1.0),
    ],
)
def test_train_workers_default_to_the_largest_nodes_cpus(monkeypatch, argv, cpus_of_nodes, expected):
    import ray

    nodes = [{"Alive": True, "Resources": {"CPU": cpus}} for cpus in cpus_of_nodes]
    nodes.append({"Alive": False, "Resources": {"CPU": 64}})  # a dead node counts for nothing
    monkeypatch.setattr(ray, "nodes", lambda: nodes)
    args = job.build_parser().parse_args(argv)
    assert args.cpus_per_worker is None
    assert job.default_cpus_per_worker(args) == expected


def test_a_storage_error_raised_in_an_actor_reads_as_one_line():
    from ray.exceptions import RayTaskError

    cause = FileNotFoundError(2, "No such file or directory", "s3://bucket/run/synthetic/step-1/shard-0.parquet")
    try:
        raise cause
    except FileNotFoundError:
        import traceback

        remote = RayTaskError("SynthesisActor.run_shard", traceback.format_exc(), cause).as_instanceof_cause()
    assert isinstance(remote, OSError) and len(str(remote).splitlines()) > 2  # what the job catches, as Ray raises it
    line = job.error_line(remote)
    assert line == "error: [Errno 2] No such file or directory: 's3://bucket/run/synthetic/step-1/shard-0.parquet'"
    assert job.error_line(ValueError("bad\nvalue")) == "error: bad value"
