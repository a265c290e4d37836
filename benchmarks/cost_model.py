"""GPU cost of the paper-scale protocols, from FLOPs per image counted here and an assumed GPU throughput.

    python benchmarks/cost_model.py                      # 15 s on 2 idle CPU cores, under 2 minutes on busy ones
    python benchmarks/cost_model.py --tflops 250 --json runs/cost_model.json
    python benchmarks/cost_model.py --quick              # 128 px: checks that the script runs

1. FLOPs per image of DeepLabV3-ResNet-101 at --image-size, counted by torch's FlopCounterMode:
   - a forward of the frozen teacher;
   - one SegInversion iteration: the teacher's forward (with the BN-statistics hooks) and backward
     to the image;
   - one distillation step: the widened student's forward and backward to its parameters plus the
     teacher's forward, per image of a half-real half-synthetic batch;
   - one base-step training image: the student alone, no teacher.
   The counts at full size run on the meta device (shapes only, no arithmetic). The same counts taken
   through the project's own code on the CPU (``SegInversion.invert_batch``, ``hrhf.train.train_steps``)
   at 64 px must equal them; the run prints and records the difference. FlopCounterMode counts
   convolutions and matrix products only: BatchNorm, softmax, the top-k of the SAA term and the
   optimiser are memory-bound and not in the count.
2. GPU-hours per step of VOC 15-1 and ADE20K 100-50 = FLOPs / (--tflops, an assumption), and the
   GPUs that bring a step under --target-hours: synthesis is spread over actors (one shard of
   --shard-size targets at a time each), then training over as many DDP workers, assumed to scale
   linearly.
3. Data plane: CPU seconds per image of JPEG/PNG decoding and the training augmentation on one core,
   measured on the genuine VOC files in ../shared/data/voc_mini; the cores per GPU that keep the
   training step fed at the modelled GPU rate; the bytes a driver would move if it read the images.
"""

from __future__ import annotations

import argparse
import copy
import csv
import json
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode
from torchvision import tv_tensors

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from hrhf.config import Config  # noqa: E402
from hrhf.data import make_source  # noqa: E402
from hrhf.data.incremental import StepDataset, filter_step  # noqa: E402
from hrhf.data.transforms import train_transform  # noqa: E402
from hrhf.inversion import SegInversion, make_targets  # noqa: E402
from hrhf.models import build_model, widen_classifier  # noqa: E402
from hrhf.pixels import denormalize  # noqa: E402
from hrhf.shards import decode_png, encode_png  # noqa: E402
from hrhf.tasks import make_task  # noqa: E402
from hrhf.train import iters_per_epoch, make_optimizer, plan_step, train_steps  # noqa: E402

MODEL = "deeplabv3_resnet101"
CHECK_SIZE = 64  # image side at which the meta-device counts are checked against the project's own code
SHARED_DATA = ROOT.parent / "shared" / "data"
VOC_STATS_CSV = SHARED_DATA / "voc_stats" / "train_aug_image_classes.csv"  # class ids shown by each train_aug image
VOC_MINI = SHARED_DATA / "voc_mini"  # 28 genuine VOC 2012 training pairs

# PASCAL VOC 2012 + SBD "train_aug" list (the usual training set of the incremental-segmentation papers).
VOC_TRAIN_IMAGES = 10_582
# Used only when VOC_STATS_CSV is missing; both were computed from that file (overlapped setting, index order).
VOC_BASE_IMAGES_FALLBACK = 9_619  # images showing any of classes 1..15
VOC_STEP_IMAGES_FALLBACK = 508  # mean over the five one-class steps

# ADE20K SceneParsing training split.
ADE_TRAIN_IMAGES = 20_210
# Training images showing each of classes 101..150 ("Train" column of objectInfo150.csv, SceneParsing devkit).
ADE_IMAGES_PER_CLASS_101_150 = (
    354, 108, 557, 52, 99, 57, 292, 77, 340, 66, 465, 50, 622, 80, 59, 531, 282, 73, 435, 136,
    116, 266, 58, 418, 319, 1193, 97, 347, 52, 246, 108, 201, 285, 268, 1020, 1282, 528, 453, 671, 397,
    92, 228, 570, 217, 206, 130, 178, 504, 775, 421,
)  # fmt: skip


@dataclass
class Step:
    """One learning step of a protocol: what it trains on and what it synthesises."""

    index: int
    old_classes: int  # foreground classes the teacher knows (0 at the base step)
    new_classes: int
    real_images: int
    epochs: int
    synthetic_images: int  # SegInversion targets of the step (0 at the base step)


@dataclass
class Protocol:
    """A protocol's steps, its model sizes and where its image counts come from."""

    name: str
    teacher_outputs: int  # background + old classes of the first incremental step
    steps: list[Step]
    source_of_counts: str


def voc_step_images(task_steps: int) -> tuple[list[int], str]:
    """Training images of each VOC 15-1 step (overlapped): counted from the class-presence file, or estimated."""
    if not VOC_STATS_CSV.exists():
        counts = [VOC_BASE_IMAGES_FALLBACK] + [VOC_STEP_IMAGES_FALLBACK] * (task_steps - 1)
        return counts, (f"estimate ({VOC_STATS_CSV} not found): {VOC_BASE_IMAGES_FALLBACK} base, "
                        f"{VOC_STEP_IMAGES_FALLBACK} per step")
    with open(VOC_STATS_CSV, newline="") as f:
        rows = list(csv.DictReader(f))
    if len(rows) != VOC_TRAIN_IMAGES:
        raise ValueError(f"{VOC_STATS_CSV}: {len(rows)} images, expected {VOC_TRAIN_IMAGES}")
    present = [frozenset(int(c) for c in row["classes"].split()) for row in rows]
    task = make_task("voc", "15-1", overlap=True)
    return [len(filter_step(present, task, step)) for step in range(task.num_steps)], f"counted in {VOC_STATS_CSV.name}"


def ade_step1_images_estimate() -> int:
    """Images showing any of ADE classes 101..150, were classes present independently of each other.

    Rare ADE classes cluster by scene (kitchen, bathroom), so the true count is lower; the sum of the
    per-class counts is a hard upper bound.
    """
    absent_everywhere = np.prod([1 - n / ADE_TRAIN_IMAGES for n in ADE_IMAGES_PER_CLASS_101_150])
    return round(ADE_TRAIN_IMAGES * (1 - absent_everywhere))


def build_protocols(cfg: Config) -> list[Protocol]:
    """VOC 15-1 and ADE20K 100-50 with the inversion and epoch settings of ``cfg``."""
    inv = cfg.inversion

    def synthetic(old: int) -> int:
        return len(make_targets(list(range(1, old + 1)), inv.scales, inv.images_per_scale, base_seed=0)) if old else 0

    voc_task = make_task("voc", "15-1", overlap=True)
    voc_counts, voc_source = voc_step_images(voc_task.num_steps)
    def epochs(step: int, old: int, images: int) -> int:  # the trainer's own rule, train.min_iters_step included
        return plan_step(cfg, step, old, incremental=step > 0, num_real=images).epochs

    voc_steps = []
    for t in range(voc_task.num_steps):
        old = len(voc_task.old_classes(t))
        voc_steps.append(Step(t, old, len(voc_task.new_classes(t)), voc_counts[t], epochs(t, old, voc_counts[t]),
                              synthetic(old)))
    ade_step1_images = ade_step1_images_estimate()
    ade_steps = [
        # Nearly every ADE image shows one of the 100 most frequent classes (wall alone is in 11,664).
        Step(0, 0, 100, ADE_TRAIN_IMAGES, epochs(0, 0, ADE_TRAIN_IMAGES), 0),
        Step(1, 100, 50, ade_step1_images, epochs(1, 100, ade_step1_images), synthetic(100)),
    ]
    ade_source = (f"estimate: base all {ADE_TRAIN_IMAGES:,}; step 1 from objectInfo150 per-class counts, classes "
                  f"assumed independent (upper bound {sum(ADE_IMAGES_PER_CLASS_101_150):,})")
    return [
        Protocol("voc_15-1", 16, voc_steps, voc_source),
        Protocol("ade_100-50", 101, ade_steps, ade_source),
    ]


def counted_flops(run: Callable[[], object]) -> float:
    """FLOPs (convolutions, matrix products) that ``run()`` dispatches."""
    counter = FlopCounterMode(display=False)
    with counter:
        run()
    return float(counter.get_total_flops())


def project_flops(teacher_outputs: int, new_classes: int, size: int, cfg: Config) -> dict[str, float]:
    """FLOPs per image through the project's own code on the CPU: SegInversion.invert_batch and train_steps."""
    torch.manual_seed(0)
    teacher = build_model(MODEL, teacher_outputs).eval().requires_grad_(False)
    image = torch.randn(1, 3, size, size)

    def forward() -> None:
        with torch.no_grad():
            teacher(image)

    forward_flops = counted_flops(forward)

    inv_cfg = copy.deepcopy(cfg.inversion)
    # One try per image: a random teacher makes no object, and a second try would count the iteration twice.
    inv_cfg.iterations, inv_cfg.bf16, inv_cfg.retry_below = 1, False, 0.0
    target = make_targets([1], [inv_cfg.scales[0]], 1, base_seed=0)
    with SegInversion(copy.deepcopy(teacher), inv_cfg, size) as inverter:
        # invert_batch ends with one no-grad forward to label the final image.
        inversion_flops = counted_flops(lambda: inverter.invert_batch(target)) - forward_flops

    labels = torch.randint(0, teacher_outputs, (1, size, size))  # valid for the base and the widened model
    synthetic = torch.randn(1, 3, size, size)

    def one_step(student: nn.Module, step_teacher: nn.Module | None, fake: torch.Tensor | None) -> None:
        incremental = step_teacher is not None
        plan = plan_step(cfg, int(incremental), teacher_outputs - 1 if incremental else 0, incremental)
        optimizer = make_optimizer(student, plan.lr, plan.weight_decay, plan.head_lr_mult)
        real = image if fake is not None else torch.cat([image, image])
        batch = [(real, labels.expand(len(real), -1, -1), fake, None)]
        train_steps(student, step_teacher, batch, optimizer, lambda _: plan.lr, 0, plan)

    # Batches of two images: train-mode BatchNorm after DeepLabV3's image pooling needs more than one.
    student = widen_classifier(copy.deepcopy(teacher).requires_grad_(True), new_classes)
    distill_flops = counted_flops(lambda: one_step(student, teacher, synthetic)) / 2
    base_student = copy.deepcopy(teacher).requires_grad_(True)  # same network: a base model of as many classes
    base_flops = counted_flops(lambda: one_step(base_student, None, None)) / 2
    return {"forward": forward_flops, "inversion_iteration": inversion_flops, "distill_step": distill_flops,
            "base_step": base_flops}


def meta_flops(teacher_outputs: int, new_classes: int, size: int, cfg: Config) -> dict[str, float]:
    """The same four counts on the meta device (shapes only, no arithmetic), so that 512 px costs no compute.

    The loops run the convolutions of ``project_flops``: the teacher with SegInversion's BN hooks, and
    the student and teacher of a half-real half-synthetic batch. Their losses differ, but losses only
    run element-wise operations, which FlopCounterMode does not count; ``main`` compares both at 64 px.
    """
    with torch.device("meta"):
        teacher = build_model(MODEL, teacher_outputs).eval().requires_grad_(False)
        student = widen_classifier(build_model(MODEL, teacher_outputs), new_classes).train()
        base_student = build_model(MODEL, teacher_outputs).train()
        pair = torch.empty(2, 3, size, size)
    image = pair[:1]

    def forward() -> None:
        with torch.no_grad():
            teacher(image)

    with SegInversion(teacher, cfg.inversion, size, device="meta") as inverter:

        def inversion_iteration() -> None:
            x = image.clone().requires_grad_(True)
            logits, prior = inverter.bn_prior(x)
            (logits.float().log_softmax(1)[:, 1].mean() + cfg.inversion.w_bn * prior).backward()

        inversion_flops = counted_flops(inversion_iteration)

    def train_step(model: nn.Module, step_teacher: nn.Module | None) -> None:
        outputs = model(pair)
        loss = outputs.float().log_softmax(1).mean()
        if step_teacher is not None:
            with torch.no_grad():
                targets = step_teacher(pair)
            loss = loss + (outputs[:, : targets.shape[1]] - targets).pow(2).mean()
        loss.backward()

    return {
        "forward": counted_flops(forward),
        "inversion_iteration": inversion_flops,
        "distill_step": counted_flops(lambda: train_step(student, teacher)) / 2,
        "base_step": counted_flops(lambda: train_step(base_student, None)) / 2,
    }


def data_plane(size: int, passes: int, limit: int | None) -> dict[str, float]:
    """CPU seconds per image on one core: JPEG/PNG decoding and the training transform; PNG shard decoding."""
    source = make_source("voc", "train", root=str(VOC_MINI))
    if limit is not None:
        source.keep_first(limit)
    dataset = StepDataset(source, range(len(source)), torch.arange(256), train_transform(size))
    file_bytes = [source.fs.size(p) + source.fs.size(q) for p, q in zip(source.image_paths, source.mask_paths)]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        dataset[0]  # warm-up: imports, allocator
        load_cpu = transform_cpu = 0.0
        wall_start = time.perf_counter()
        pixels = []
        crops = []
        for _ in range(passes):
            for i in range(len(source)):
                start = time.thread_time()
                image, mask = source.load(i)
                loaded = time.thread_time()
                crop, _ = dataset.transform(tv_tensors.Image(image), tv_tensors.Mask(mask))
                transform_cpu += time.thread_time() - loaded
                load_cpu += loaded - start
                pixels.append(image.shape[1] * image.shape[2])
                crops.append(crop)
        wall = time.perf_counter() - wall_start
        count = passes * len(source)
        # Synthetic images travel as PNG (image and pseudo-label mask). Inverted images lie between a
        # real-looking crop and noise, so both are timed.
        crop_pngs = [encode_png(denormalize(c[None])[0].permute(1, 2, 0).numpy()) for c in crops[: len(source)]]
        rng = np.random.default_rng(0)
        noise_pngs = [encode_png(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(4)]
        mask_png = encode_png(np.zeros((size, size), dtype=np.uint8))
        png_cpu = {name: _decode_seconds(pngs, mask_png) for name, pngs in (("crop", crop_pngs), ("noise", noise_pngs))}
    finally:
        torch.set_num_threads(threads)
    return {
        "images_timed": count,
        "decode_cpu_s": load_cpu / count,
        "transform_cpu_s": transform_cpu / count,
        "real_cpu_s": (load_cpu + transform_cpu) / count,
        "real_wall_s": wall / count,
        "real_file_bytes": float(np.mean(file_bytes)),
        "real_decoded_bytes": 3 * float(np.mean(pixels)),
        "synthetic_png_cpu_s_crop": png_cpu["crop"],
        "synthetic_png_cpu_s_noise": png_cpu["noise"],
        "synthetic_png_bytes_crop": float(np.mean([len(p) for p in crop_pngs])) + len(mask_png),
        "synthetic_png_bytes_noise": float(np.mean([len(p) for p in noise_pngs])) + len(mask_png),
    }


def _decode_seconds(image_pngs: list[bytes], mask_png: bytes, repeats: int = 3) -> float:
    """CPU seconds to decode one synthetic image and its mask."""
    start = time.thread_time()
    for _ in range(repeats):
        for png in image_pngs:
            decode_png(png)
            decode_png(mask_png)
    return (time.thread_time() - start) / (repeats * len(image_pngs))


def gpus_for(synthesis_s: float, shards: int, training_s: float, target_s: float, cap: int = 100_000) -> int | None:
    """Fewest GPUs for which synthesis (whole shards per actor) then DDP training fit in ``target_s``."""
    shard_s = synthesis_s / shards if shards else 0.0
    for gpus in range(1, cap + 1):
        if math.ceil(shards / gpus) * shard_s + training_s / gpus <= target_s:
            return gpus
    return None


def cost_rows(protocol: Protocol, flops: dict[str, float], cfg: Config, args: argparse.Namespace) -> list[dict]:
    """GPU-hours and GPU counts of every step of a protocol."""
    rate = args.tflops * 1e12
    rows = []
    for step in protocol.steps:
        incremental = step.index > 0
        plan = plan_step(cfg, step.index, step.old_classes, incremental)
        # Base step: real images only, no teacher. Later steps: every global batch of real images gets
        # fake_per_batch synthetic ones, and the teacher sees both halves.
        per_batch = plan.batch_size + (plan.fake_per_batch if incremental else 0)
        train_images = iters_per_epoch(step.real_images, plan.batch_size) * per_batch * step.epochs
        train_flops = train_images * flops["distill_step" if incremental else "base_step"]
        per_synthetic = cfg.inversion.iterations * flops["inversion_iteration"] + flops["forward"]
        synthesis_s = step.synthetic_images * per_synthetic / rate
        training_s = train_flops / rate
        shards = math.ceil(step.synthetic_images / args.shard_size)
        rows.append({
            "step": step.index,
            "old_classes": step.old_classes,
            "new_classes": step.new_classes,
            "real_images": step.real_images,
            "synthetic_images": step.synthetic_images,
            "epochs": step.epochs,
            "train_images_seen": train_images,
            "synthesis_pflop": step.synthetic_images * per_synthetic / 1e15,
            "training_pflop": train_flops / 1e15,
            "synthesis_gpu_hours": synthesis_s / 3600,
            "training_gpu_hours": training_s / 3600,
            "synthesis_max_actors": shards,
            "gpus_under_target": gpus_for(synthesis_s, shards, training_s, args.target_hours * 3600),
            # Below this sustained rate one GPU no longer finishes the step within the target.
            "tflops_for_one_gpu": args.tflops * (synthesis_s + training_s) / (args.target_hours * 3600),
        })
    return rows


def cores_per_gpu(flops_per_image: float, real_share: float, plane: dict[str, float], tflops: float) -> float:
    """CPU cores that prepare images as fast as one GPU trains on them (synthetic: the slower kind of PNG)."""
    images_per_s = tflops * 1e12 / flops_per_image
    synthetic_cpu_s = max(plane["synthetic_png_cpu_s_crop"], plane["synthetic_png_cpu_s_noise"])
    cpu_per_image = real_share * plane["real_cpu_s"] + (1 - real_share) * synthetic_cpu_s
    return images_per_s * cpu_per_image


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command-line flags; the workload defaults come from hrhf.config.Config()."""
    defaults = Config()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tflops", type=float, default=400.0,
                        help="ASSUMED sustained TFLOP/s per GPU (default: H100, bf16, about 40%% of peak)")
    parser.add_argument("--image-size", type=int, default=512, help="crop and synthetic image side")
    parser.add_argument("--iterations", type=int, default=defaults.inversion.iterations, help="SegInversion iterations")
    parser.add_argument("--images-per-scale", type=int, default=defaults.inversion.images_per_scale,
                        help="synthetic images per (class, scale)")
    parser.add_argument("--scales", type=lambda s: [float(v) for v in s.split(",")], default=defaults.inversion.scales,
                        help="comma-separated SAA object-area ratios")
    parser.add_argument("--epochs-base", type=int, default=defaults.train.epochs_base)
    parser.add_argument("--epochs-step", type=int, default=defaults.train.epochs_step)
    parser.add_argument("--min-iters-step", type=int, default=defaults.train.min_iters_step,
                        help="incremental steps get the epochs for at least this many updates")
    parser.add_argument("--shard-size", type=int, default=32, help="synthesis targets per shard (jobs/incremental.py)")
    parser.add_argument("--target-hours", type=float, default=1.0, help="wall-clock goal per step")
    parser.add_argument("--quick", action="store_true", help="128 px and a few images: checks that the script runs")
    parser.add_argument("--json", default=None, help="write every figure to this file")
    args = parser.parse_args(argv)
    if args.quick:
        args.image_size = 128
    if min(args.tflops, args.target_hours) <= 0 or min(args.image_size, args.shard_size, args.images_per_scale) < 1:
        parser.error("--tflops, --target-hours, --image-size, --shard-size and --images-per-scale must be positive")
    if min(args.iterations, args.epochs_base, args.epochs_step, args.min_iters_step) < 0 or not args.scales:
        parser.error("--iterations and epochs must be >= 0, --scales non-empty")
    return args


def _hours(value: float) -> str:
    return f"{value:.3f}" if value < 10 else f"{value:.1f}"


def print_report(figures: dict, argv: list[str]) -> None:
    """Markdown tables of the figures."""
    a = figures["assumptions"]
    print(f"\nCommand: `{' '.join(['python benchmarks/cost_model.py', *argv])}`")
    print(f"\nASSUMED sustained throughput: {a['tflops']:g} TFLOP/s per GPU, not measured here "
          "(`python benchmarks/speed.py --device cuda --bf16` measures the share of a GPU's matmul rate that "
          "the teacher loop reaches, on the smaller models it times). "
          f"Model {MODEL}, {a['image_size']} px; inversion {a['iterations']} iterations, "
          f"{a['images_per_scale']} images x {len(a['scales'])} scales per old class; epochs {a['epochs_base']} base, "
          f"{a['epochs_step']} per step (at least {a['min_iters_step']} updates); "
          f"fake ratio {a['fake_ratio']}; shards of {a['shard_size']}; "
          "DDP assumed to scale linearly.")
    print("\n| FLOPs per image (counted) | VOC model (16 outputs) | ADE model (101 outputs) |\n|---|---|---|")
    voc, ade = figures["flops_per_image"]["voc_15-1"], figures["flops_per_image"]["ade_100-50"]
    for key in ("forward", "inversion_iteration", "distill_step", "base_step"):
        print(f"| {key} | {voc[key] / 1e9:.1f} GFLOP | {ade[key] / 1e9:.1f} GFLOP |")
    check = figures["flops_check"]
    print(f"\nAt {check['image_size']} px the counts through SegInversion.invert_batch and train_steps equal these "
          f"loops' to within {check['max_relative_difference']:.1e} (relative).")
    print(f"\n| protocol | step | old / new classes | real images | synthetic images | synthesis GPU-h "
          f"| training GPU-h | GPUs for a step under {a['target_hours']:g} h | synthesis actors (max) "
          f"| TFLOP/s one GPU needs for {a['target_hours']:g} h |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, protocol in figures["protocols"].items():
        for row in protocol["steps"]:
            gpus = row["gpus_under_target"] if row["gpus_under_target"] is not None else "unreachable"
            print(f"| {name} | {row['step']} | {row['old_classes']} / {row['new_classes']} | {row['real_images']:,} "
                  f"| {row['synthetic_images']:,} | {_hours(row['synthesis_gpu_hours'])} "
                  f"| {_hours(row['training_gpu_hours'])} | {gpus} | {row['synthesis_max_actors']} "
                  f"| {row['tflops_for_one_gpu']:.0f} |")
        total = protocol["total"]
        print(f"| {name} | all | | | {total['synthetic_images']:,} | {_hours(total['synthesis_gpu_hours'])} "
              f"| {_hours(total['training_gpu_hours'])} | | | |")
    for name, protocol in figures["protocols"].items():
        print(f"\n{name} image counts: {protocol['source_of_counts']}")
    plane = figures.get("data_plane")
    if plane is None:
        print(f"\nData plane: skipped ({VOC_MINI} not found)")
        return
    print(f"\n| data plane (one core, {plane['images_timed']} VOC images) | value |\n|---|---|")
    print(f"| JPEG + PNG decode, CPU ms per image | {plane['decode_cpu_s'] * 1e3:.1f} |")
    print(f"| scale-jitter / crop / flip / normalise to {a['image_size']} px, CPU ms per image "
          f"| {plane['transform_cpu_s'] * 1e3:.1f} |")
    print(f"| synthetic PNG image + mask decode, CPU ms (real-looking / noise) "
          f"| {plane['synthetic_png_cpu_s_crop'] * 1e3:.1f} / {plane['synthetic_png_cpu_s_noise'] * 1e3:.1f} |")
    print(f"| GPU training rate at {a['tflops']:g} TFLOP/s, images/s (base / distillation step) "
          f"| {plane['gpu_images_per_s_base']:.0f} / {plane['gpu_images_per_s_distill']:.0f} |")
    print(f"| CPU cores per GPU to keep up (base / distillation step) "
          f"| {plane['cores_per_gpu_base']:.1f} / {plane['cores_per_gpu_distill']:.1f} |")
    print(f"| bytes per real image: files / decoded uint8 / float32 crop "
          f"| {plane['real_file_bytes'] / 1e3:.0f} kB / {plane['real_decoded_bytes'] / 1e3:.0f} kB "
          f"/ {plane['crop_tensor_bytes'] / 1e6:.2f} MB |")
    for name, driver in plane["driver_bytes"].items():
        print(f"| {name}: a driver reading every image would move, files (at VOC file sizes) / float32 crops "
              f"| {driver['files_gb']:.0f} GB / {driver['crops_gb']:.0f} GB |")


def config_from_args(args: argparse.Namespace) -> Config:
    """The default config with the inversion and training settings the command line overrides."""
    cfg = Config()
    cfg.inversion.iterations, cfg.inversion.images_per_scale = args.iterations, args.images_per_scale
    cfg.inversion.scales = list(args.scales)
    cfg.train.epochs_base, cfg.train.epochs_step = args.epochs_base, args.epochs_step
    cfg.train.min_iters_step = args.min_iters_step
    return cfg


def main(argv: list[str] | None = None) -> int:
    """Measure, model, print the tables and write the JSON."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    started = time.perf_counter()
    cfg = config_from_args(args)
    protocols = build_protocols(cfg)
    figures: dict = {
        "assumptions": {
            "tflops": args.tflops, "tflops_is_assumed": True, "model": MODEL, "image_size": args.image_size,
            "iterations": cfg.inversion.iterations, "images_per_scale": cfg.inversion.images_per_scale,
            "scales": cfg.inversion.scales, "epochs_base": cfg.train.epochs_base, "epochs_step": cfg.train.epochs_step,
            "min_iters_step": cfg.train.min_iters_step,
            "batch_size": cfg.train.batch_size, "fake_ratio": cfg.method.fake_ratio, "shard_size": args.shard_size,
            "target_hours": args.target_hours, "voc_train_images": VOC_TRAIN_IMAGES, "ade_train_images": ADE_TRAIN_IMAGES,
        },
        "flops_per_image": {},
        "protocols": {},
    }
    print(f"counting FLOPs through SegInversion and train_steps at {CHECK_SIZE} px ...", flush=True)
    voc = protocols[0]
    check = {"image_size": CHECK_SIZE,
             "project": project_flops(voc.teacher_outputs, voc.steps[1].new_classes, CHECK_SIZE, cfg),
             "meta": meta_flops(voc.teacher_outputs, voc.steps[1].new_classes, CHECK_SIZE, cfg)}
    check["max_relative_difference"] = max(abs(check["meta"][k] / v - 1) for k, v in check["project"].items())
    figures["flops_check"] = check
    for protocol in protocols:
        print(f"counting FLOPs: {protocol.name} at {args.image_size} px ...", flush=True)
        flops = meta_flops(protocol.teacher_outputs, protocol.steps[1].new_classes, args.image_size, cfg)
        figures["flops_per_image"][protocol.name] = flops
        rows = cost_rows(protocol, flops, cfg, args)
        total = {key: sum(r[key] for r in rows) for key in ("synthetic_images", "synthesis_gpu_hours", "training_gpu_hours")}
        figures["protocols"][protocol.name] = {"source_of_counts": protocol.source_of_counts, "steps": rows, "total": total}
    if VOC_MINI.exists():
        print("timing the data plane ...", flush=True)
        plane = data_plane(args.image_size, passes=1 if args.quick else 3, limit=8 if args.quick else None)
        voc_flops = figures["flops_per_image"]["voc_15-1"]
        plan = plan_step(cfg, 1, voc.steps[1].old_classes, incremental=True)
        real_share = plan.batch_size / (plan.batch_size + plan.fake_per_batch)
        plane["gpu_images_per_s_base"] = args.tflops * 1e12 / voc_flops["base_step"]
        plane["gpu_images_per_s_distill"] = args.tflops * 1e12 / voc_flops["distill_step"]
        plane["cores_per_gpu_base"] = cores_per_gpu(voc_flops["base_step"], 1.0, plane, args.tflops)
        plane["cores_per_gpu_distill"] = cores_per_gpu(voc_flops["distill_step"], real_share, plane, args.tflops)
        plane["crop_tensor_bytes"] = 4 * 3 * args.image_size**2
        plane["driver_bytes"] = {}
        for name, protocol in figures["protocols"].items():
            real_seen = sum(r["real_images"] * r["epochs"] for r in protocol["steps"])
            all_seen = sum(r["train_images_seen"] for r in protocol["steps"])
            plane["driver_bytes"][name] = {
                "files_gb": real_seen * plane["real_file_bytes"] / 1e9,
                "crops_gb": all_seen * plane["crop_tensor_bytes"] / 1e9,
            }
        figures["data_plane"] = plane
    figures["seconds"] = time.perf_counter() - started
    print_report(figures, argv)
    print(f"\n({figures['seconds']:.0f} s on {torch.get_num_threads()} torch threads)")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
