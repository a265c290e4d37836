"""benchmarks/cost_model.py: its FLOP counts follow the project's own code, and its cost model moves the right way."""

import copy
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import cost_model  # noqa: E402

FLOP_KEYS = ("forward", "inversion_iteration", "distill_step", "base_step")


@pytest.fixture(scope="module")
def figures(tmp_path_factory):
    """The JSON of one quick run."""
    out = tmp_path_factory.mktemp("cost") / "cost.json"
    assert cost_model.main(["--quick", "--json", str(out)]) == 0
    return json.loads(out.read_text())


def test_json_holds_every_section(figures):
    assert figures["assumptions"]["tflops_is_assumed"] is True
    assert figures["assumptions"]["image_size"] == 128
    assert set(figures["protocols"]) == {"voc_15-1", "ade_100-50"}
    for name, protocol in figures["protocols"].items():
        assert set(figures["flops_per_image"][name]) == set(FLOP_KEYS)
        assert {"synthesis_gpu_hours", "training_gpu_hours", "synthetic_images"} <= set(protocol["total"])
        for row in protocol["steps"]:
            assert {"synthesis_gpu_hours", "training_gpu_hours", "gpus_under_target", "synthesis_max_actors"} <= set(row)


def test_meta_counts_equal_the_project_code_path(figures):
    check = figures["flops_check"]
    assert set(check["project"]) == set(FLOP_KEYS)
    assert check["max_relative_difference"] < 1e-9
    for key in FLOP_KEYS:
        assert check["meta"][key] == pytest.approx(check["project"][key], rel=1e-9)


def test_flops_per_image_are_ordered_and_add_up(figures):
    for flops in figures["flops_per_image"].values():
        # Backward to the image costs about one more forward; to the weights too.
        assert flops["forward"] < flops["inversion_iteration"] < flops["base_step"] < flops["distill_step"]
        assert flops["distill_step"] == pytest.approx(flops["base_step"] + flops["forward"], rel=0.01)
    # 101 outputs cost more than 16 in the classifier, nothing else.
    voc, ade = figures["flops_per_image"]["voc_15-1"], figures["flops_per_image"]["ade_100-50"]
    assert voc["forward"] < ade["forward"] < 1.01 * voc["forward"]


def test_step_workloads(figures):
    voc = figures["protocols"]["voc_15-1"]["steps"]
    assert [r["old_classes"] for r in voc] == [0, 15, 16, 17, 18, 19]
    per_class = len(figures["assumptions"]["scales"]) * figures["assumptions"]["images_per_scale"]
    assert [r["synthetic_images"] for r in voc] == [0] + [old * per_class for old in range(15, 20)]
    if cost_model.VOC_STATS_CSV.exists():  # counted, overlapped: images showing the step's classes
        assert [r["real_images"] for r in voc] == [9619, 522, 300, 649, 503, 567]
    ade = figures["protocols"]["ade_100-50"]["steps"]
    assert ade[0]["real_images"] == cost_model.ADE_TRAIN_IMAGES
    assert max(cost_model.ADE_IMAGES_PER_CLASS_101_150) < ade[1]["real_images"] < sum(cost_model.ADE_IMAGES_PER_CLASS_101_150)
    assert voc[0]["synthesis_gpu_hours"] == 0 and voc[1]["synthesis_gpu_hours"] > 0


def rows_for(figures, flags):
    """Cost rows of both protocols recomputed from the quick run's FLOP counts under other flags."""
    args = cost_model.parse_args(["--quick", *flags])
    cfg = cost_model.config_from_args(args)
    return {p.name: cost_model.cost_rows(p, figures["flops_per_image"][p.name], cfg, args)
            for p in cost_model.build_protocols(cfg)}


def test_more_iterations_or_a_slower_gpu_need_more_gpus(figures):
    slow = rows_for(figures, ["--tflops", "2"])
    longer = rows_for(figures, ["--tflops", "2", "--iterations", "1000"])
    for name in slow:
        for a, b in zip(slow[name][1:], longer[name][1:]):
            assert b["synthesis_gpu_hours"] == pytest.approx(a["synthesis_gpu_hours"] * 10, rel=0.01)
            assert b["training_gpu_hours"] == a["training_gpu_hours"]
            assert b["gpus_under_target"] > a["gpus_under_target"]
    fast = rows_for(figures, ["--tflops", "400"])
    assert all(r["gpus_under_target"] == 1 for rows in fast.values() for r in rows)
    assert slow["voc_15-1"][0]["gpus_under_target"] > 1
    # The rate one GPU needs is a property of the step, and one GPU suffices exactly when the GPU is that fast.
    for name in slow:
        for a, b in zip(slow[name], fast[name]):
            assert a["tflops_for_one_gpu"] == pytest.approx(b["tflops_for_one_gpu"])
            assert (a["gpus_under_target"] == 1) == (a["tflops_for_one_gpu"] <= 2)
    needed = fast["ade_100-50"][1]["tflops_for_one_gpu"]
    assert rows_for(figures, ["--tflops", str(needed * 1.01)])["ade_100-50"][1]["gpus_under_target"] == 1
    assert rows_for(figures, ["--tflops", str(needed * 0.99)])["ade_100-50"][1]["gpus_under_target"] == 2


def test_gpus_for_counts_whole_shards_and_ddp():
    # 10 shards of 0.3 h each, 4 GPU-hours of training: 4 GPUs give 3 * 0.3 + 1 = 1.9 h; 8 give 2 * 0.3 + 0.5 = 1.1 h;
    # 10 give 0.3 + 0.4 = 0.7 h, and 9 give 2 * 0.3 + 0.44 = 1.04 h.
    assert cost_model.gpus_for(3 * 3600, 10, 4 * 3600, 3600) == 10
    assert cost_model.gpus_for(0, 0, 4 * 3600, 3600) == 4
    assert cost_model.gpus_for(20 * 3600, 10, 0, 3600) is None  # one shard alone takes 2 h


def test_data_plane(figures):
    if not cost_model.VOC_MINI.exists():
        pytest.skip(f"{cost_model.VOC_MINI} not found")
    plane = figures["data_plane"]
    assert plane["images_timed"] == 8
    assert plane["decode_cpu_s"] > 0 and plane["transform_cpu_s"] > 0
    assert plane["real_cpu_s"] == pytest.approx(plane["decode_cpu_s"] + plane["transform_cpu_s"])
    # A crop of 128 px as float32, and a driver that read every image would move gigabytes.
    assert plane["crop_tensor_bytes"] == 4 * 3 * 128 * 128
    assert plane["cores_per_gpu_base"] > 0 and plane["cores_per_gpu_distill"] > 0
    for driver in plane["driver_bytes"].values():
        assert driver["files_gb"] > 1 and driver["crops_gb"] > 1


def test_cores_per_gpu_scales_with_the_gpu_rate():
    plane = {"real_cpu_s": 0.01, "synthetic_png_cpu_s_crop": 0.004, "synthetic_png_cpu_s_noise": 0.002}
    # 1e12 FLOP/s over 1e10 FLOPs per image: 100 images/s; half real (0.01 s), half synthetic (the slower, 0.004 s).
    assert cost_model.cores_per_gpu(1e10, 0.5, plane, 1.0) == pytest.approx(100 * 0.007)
    assert cost_model.cores_per_gpu(1e10, 0.5, copy.deepcopy(plane), 2.0) == pytest.approx(200 * 0.007)


def test_small_steps_get_the_epochs_of_the_minimum_of_updates():
    cfg = cost_model.Config()
    cfg.train.min_iters_step = 0
    plain = {p.name: p for p in cost_model.build_protocols(cfg)}
    assert all(step.epochs == cfg.train.epochs_step for step in plain["voc_15-1"].steps[1:])
    cfg.train.min_iters_step = 400
    steps = {p.name: p for p in cost_model.build_protocols(cfg)}["voc_15-1"].steps
    for step in steps[1:]:
        batches = cost_model.iters_per_epoch(step.real_images, cfg.train.batch_size)
        assert step.epochs >= cfg.train.epochs_step and batches * step.epochs >= 400
        assert step.epochs == cfg.train.epochs_step or batches * (step.epochs - 1) < 400
    assert steps[0].epochs == cfg.train.epochs_base
