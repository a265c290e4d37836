"""How close the expensive parts run to this machine's limit, as ratios measured side by side in one run.

    python benchmarks/speed.py                          # all sections, CPU (about 10 minutes on 2 cores)
    python benchmarks/speed.py --only inversion --json runs/speed.json
    python benchmarks/speed.py --device cuda --bf16     # where a GPU exists

1. inversion: SegInversion image-iterations/s vs the bare forward + backward (to the input) of the
   frozen teacher at the same batch and resolution (``inversion_vs_bare``), for the small default
   model at 64 px and DeepLabV3-MobileNetV3 at 64 and 128 px; the bare loop's FLOP/s as a share of
   a large float32 matrix product's, measured in the same run (``bare_flops_share``).
2. ray: the synthesis of a default step (120 targets, 100 iterations, shards of 32 written as
   Parquet) through the actor pool with one 1-CPU actor vs in-process on one thread
   (``pool_vs_inprocess``); two 1-CPU actors vs one (``scaling_2_actors``). Actor start-up counts:
   the job starts its actors for every step.
3. distill: images/s of the distillation step (data loading, teacher, student, losses, optimiser)
   vs the bare teacher forward + student forward/backward of the same batches held in memory
   (``distill_vs_bare``), in-process on this machine's threads and on one thread
   (``distill_local_1_thread_vs_bare``), through Ray Train with one 1-CPU worker
   (``distill_ray_vs_bare``) and with one loader process beside it (``distill_ray_1_loader_vs_bare``,
   ``train.num_workers=1``); DDP with two 1-CPU workers vs one (``ddp_scaling_2``).
4. memory: peak resident memory of a synthesis actor (ray section) and of a Ray Train worker (distill
   section) on the default config's model, image size, shard and batch sizes.

Measurements of a ratio alternate between its two sides and take the median of each, so that a
noisy neighbour slows both. Absolute rates are printed as context only.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from hrhf.config import Config, load_config  # noqa: E402
from hrhf.inversion import SegInversion, make_targets  # noqa: E402
from hrhf.models import build_model  # noqa: E402

SECTIONS = ("inversion", "ray", "distill")


def autocast(device: str, bf16: bool) -> contextlib.AbstractContextManager:
    """bfloat16 autocast on ``device`` when asked for, else nothing."""
    return torch.autocast(device_type=device, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()


def sync(device: str) -> None:
    """Wait for queued device work, so that timings cover it."""
    if device == "cuda":
        torch.cuda.synchronize()


def alternate(sides: dict[str, Callable[[], float]], repeats: int) -> dict[str, float]:
    """Run each side ``repeats`` times, interleaved; the median of what each returns (a rate)."""
    rates: dict[str, list[float]] = {name: [] for name in sides}
    for _ in range(repeats):
        for name, measure in sides.items():
            rates[name].append(measure())
    return {name: statistics.median(values) for name, values in rates.items()}


def matmul_flops(device: str, size: int = 2048, repeats: int = 10) -> float:
    """FLOP/s of a large float32 matrix product: the machine's practical compute limit."""
    a, b = (torch.randn(size, size, device=device) for _ in range(2))
    a @ b
    sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    sync(device)
    return 2 * size**3 * repeats / (time.perf_counter() - start)


def teacher_of(name: str, device: str, num_classes: int = 11, width: int = 16) -> nn.Module:
    """A frozen teacher with BN statistics of real-looking activations (a few train-mode forwards)."""
    torch.manual_seed(0)
    model = build_model(name, num_classes, width)
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(8, 3, 64, 64))
    return model.to(device).eval().requires_grad_(False)


def bare_step(teacher: nn.Module, x: torch.Tensor, bf16: bool) -> None:
    """One forward of the frozen teacher and one backward to its input: SegInversion's floor."""
    with autocast(x.device.type, bf16):
        loss = teacher(x).float().mean()
    loss.backward()
    x.grad = None


def bare_flops(teacher: nn.Module, x: torch.Tensor, bf16: bool) -> float:
    """FLOPs of one bare step, counted by torch's FlopCounterMode."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        bare_step(teacher, x, bf16)
    return float(counter.get_total_flops())


def inversion_section(device: str, bf16: bool, repeats: int, quick: bool) -> dict[str, float]:
    """SegInversion vs the bare teacher forward/backward, per model and resolution."""
    cfg = load_config()
    cases = [("small", 64, cfg.inversion.batch_size, cfg.inversion.iterations)]
    cases += [("deeplabv3_mobilenet_v3_large", 64, 32, 20), ("deeplabv3_mobilenet_v3_large", 128, 16, 20)]
    if quick:
        cases = [(name, size, min(batch, 16), max(4, iters // 10)) for name, size, batch, iters in cases]
    # The limit is re-measured between cases and the best kept, so that a moment of load cannot lower it.
    matmul = [matmul_flops(device)]
    figures: dict[str, float] = {}
    shares: dict[str, float] = {}
    for name, size, batch, iterations in cases:
        teacher = teacher_of(name, device)
        inv_cfg = copy.deepcopy(cfg.inversion)
        inv_cfg.iterations, inv_cfg.batch_size, inv_cfg.bf16 = iterations, batch, bf16
        # One optimisation per image: this untrained teacher makes few of its targets, and the second try
        # for those (inversion.retry_below) would time every image's iterations twice.
        inv_cfg.retry_below = 0.0
        targets = make_targets(list(range(1, 11)), inv_cfg.scales, 4, base_seed=1)[:batch]
        x = torch.randn(batch, 3, size, size, device=device, requires_grad=True)

        def bare() -> float:
            bare_step(teacher, x, bf16)
            sync(device)
            start = time.perf_counter()
            for _ in range(iterations):
                bare_step(teacher, x, bf16)
            sync(device)
            return batch * iterations / (time.perf_counter() - start)

        def inversion() -> float:
            with SegInversion(teacher, inv_cfg, size, device) as inverter:
                start = time.perf_counter()
                inverter.invert_batch(targets)
                sync(device)
                return batch * iterations / (time.perf_counter() - start)

        bare(), inversion()  # warm-up: allocator, kernels
        rates = alternate({"bare": bare, "inversion": inversion}, repeats)
        tag = f"{'mnv3' if name != 'small' else 'small'}_{size}"
        figures[f"{tag}_bare_img_it_per_s"] = rates["bare"]
        figures[f"{tag}_inversion_img_it_per_s"] = rates["inversion"]
        figures[f"{tag}_inversion_vs_bare"] = rates["inversion"] / rates["bare"]
        shares[tag] = bare_flops(teacher, x, bf16) / batch * rates["bare"]
        matmul.append(matmul_flops(device))
        print(f"  {tag}: batch {batch}, {iterations} iterations, bare {rates['bare']:.1f} img-it/s, "
              f"inversion {rates['inversion']:.1f} img-it/s", flush=True)
    figures["matmul_gflops"] = max(matmul) / 1e9
    figures.update({f"{tag}_bare_flops_share": achieved / max(matmul) for tag, achieved in shares.items()})
    return figures


def step_config(quick: bool) -> Config:
    """The default config; quick runs shorten inversion and training."""
    overrides = ["inversion.iterations=10", "data.train_size=400"] if quick else []
    return load_config(overrides=overrides)


def ray_section(quick: bool) -> dict[str, float]:
    """Synthesis of a default step's targets: pool of one actor vs in-process, two actors vs one."""
    import ray

    from hrhf.distributed.synthesis import RaySynthesizer

    cfg = step_config(quick)
    teacher = teacher_of(cfg.model.name, "cpu", num_classes=7, width=cfg.model.width)
    # Step 1 of the default protocol: 6 old classes x the scales x images_per_scale.
    targets = make_targets(list(range(1, 7)), cfg.inversion.scales, cfg.inversion.images_per_scale, base_seed=1)
    shard_size = 32  # jobs/incremental.py's default

    def in_process() -> float:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            start = time.perf_counter()
            with SegInversion(teacher, cfg.inversion, cfg.data.image_size) as inverter:
                inverter.invert(targets)
            return len(targets) / (time.perf_counter() - start)
        finally:
            torch.set_num_threads(threads)

    def pool(actors: int, work: list = targets) -> Callable[[], float]:
        def measure() -> float:
            with tempfile.TemporaryDirectory() as store:  # the job's default sink: Parquet shards
                synthesizer = RaySynthesizer(cfg, num_actors=actors, cpus_per_actor=1.0, shard_size=shard_size,
                                             store_uri=store, log=lambda _m: None)
                start = time.perf_counter()
                synthesizer.synthesize(teacher, work, step=1)
                rate = len(work) / (time.perf_counter() - start)
            peak_rss[actors] = max(peak_rss.get(actors, 0.0), synthesizer.actor_peak_rss_mb)
            return rate

        return measure

    peak_rss: dict[int, float] = {}
    from hrhf.distributed import normal_worker_priority

    normal_worker_priority()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        pool(2, targets[:4])()  # warm-up: Ray's worker pool
        rates = alternate({"inprocess": in_process, "pool_1": pool(1), "pool_2": pool(2)}, 1)
    finally:
        ray.shutdown()
    return {
        "synthesis_inprocess_img_per_s": rates["inprocess"],
        "synthesis_pool_1_img_per_s": rates["pool_1"],
        "synthesis_pool_2_img_per_s": rates["pool_2"],
        "pool_vs_inprocess": rates["pool_1"] / rates["inprocess"],
        "scaling_2_actors": rates["pool_2"] / rates["pool_1"],
        "synthesis_actor_peak_rss_mb": peak_rss[1],
    }


def step_job(cfg: Config):
    """Step 1 of the default protocol: real data, a teacher, a widened student and a synthetic set."""
    from hrhf.models import widen_classifier
    from hrhf.pipeline import StepJob, sources_of, step_datasets, step_targets, task_of
    from hrhf.train import plan_step

    task = task_of(cfg)
    real, _ = step_datasets(cfg, task, 1, sources_of(cfg))
    teacher = teacher_of(cfg.model.name, "cpu", num_classes=7, width=cfg.model.width)
    inv_cfg = copy.deepcopy(cfg.inversion)
    inv_cfg.iterations = 2  # the images' content does not matter for speed
    with SegInversion(teacher, inv_cfg, cfg.data.image_size) as inverter:
        fake = inverter.invert(step_targets(cfg, task, 1))
    # trainable, as the pipeline's student is: a copy of the frozen teacher would compute no weight gradients
    student = widen_classifier(copy.deepcopy(teacher).requires_grad_(True), len(task.new_classes(1)))
    plan = dataclasses.replace(plan_step(cfg, 1, n_old=len(task.old_classes(1)), incremental=True), epochs=3)
    return StepJob(1, student, teacher, real, fake, plan, cfg)


def bare_train_rate(job, batch_size: int, fake_size: int, steps: int) -> float:
    """Images/s of the teacher's forward on the real half + the student's forward/backward on both halves, held in memory.

    The loop keeps the teacher's logits on the synthetic rows through a step (hrhf.train.OldModelLogits),
    so the teacher's pass over the synthetic half is not part of a step's work.
    """
    student = copy.deepcopy(job.student).train()
    images = torch.stack([job.real[i][0] for i in range(batch_size)])
    fake = torch.randn(fake_size, *images.shape[1:])
    inputs = torch.cat([images, fake])
    for i in range(steps + 1):
        if i == 1:
            start = time.perf_counter()
        with torch.no_grad():
            job.teacher(images)
        student(inputs).mean().backward()
        student.zero_grad(set_to_none=True)
    return len(inputs) * steps / (time.perf_counter() - start)


def distill_section(quick: bool) -> dict[str, float]:
    """The distillation step in-process and on Ray Train vs its bare compute; DDP 2 vs 1 workers."""
    import ray

    from hrhf.distributed.training import RayTrainer
    from hrhf.train import InMemoryFake, iters_per_epoch, make_optimizer, mixed_batches, old_model_logits, real_batches
    from hrhf.train import step_lr, train_steps

    cfg = step_config(quick)
    job = step_job(cfg)
    plan = job.plan
    batch = plan.batch_size
    fake_size = plan.fake_per_batch
    old_logits = old_model_logits(job.teacher, len(job.fake), plan, "cpu")  # filled by the warm-up epoch, as on Ray

    def local() -> float:
        """One epoch of the in-process loop (the epoch driver's batches and step), after its loader is built."""
        student = copy.deepcopy(job.student)
        iters = iters_per_epoch(len(job.real), batch)
        optimizer = make_optimizer(student, plan.lr, plan.weight_decay, plan.head_lr_mult)
        batches = mixed_batches(real_batches(job.real, plan, 0, cfg.train.num_workers),
                                InMemoryFake(job.fake.images), plan, 0, iters, old_logits=old_logits)
        start = time.perf_counter()
        steps, _ = train_steps(student, job.teacher, batches, optimizer, step_lr(plan, iters), 0, plan)
        return steps * (batch + fake_size) / (time.perf_counter() - start)

    def bare() -> float:
        return bare_train_rate(job, batch, fake_size, steps=10 if quick else 20)

    local(), bare()  # warm-up
    rates = alternate({"local": local, "bare": bare}, 1 if quick else 3)
    figures = {
        "distill_local_img_per_s": rates["local"],
        "distill_bare_img_per_s": rates["bare"],
        "distill_vs_bare": rates["local"] / rates["bare"],
    }

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a Ray Train worker of one CPU runs one torch thread
    try:
        one_thread = alternate({"local": local, "bare": bare}, 1 if quick else 3)
    finally:
        torch.set_num_threads(threads)
    figures["distill_local_1_thread_vs_bare"] = one_thread["local"] / one_thread["bare"]
    from hrhf.distributed import normal_worker_priority

    def with_loaders(loaders: int):
        """The step job with ``loaders`` loader processes per worker (train.num_workers)."""
        cfg_loaders = copy.deepcopy(cfg)
        cfg_loaders.train.num_workers = loaders
        return dataclasses.replace(copy.deepcopy(job), cfg=cfg_loaders)

    normal_worker_priority()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        seconds = {}
        for workers, loaders in ((1, 0), (1, 1), (2, 0)):
            trainer = RayTrainer(num_workers=workers, cpus_per_worker=1.0, log=lambda _m: None)
            trainer.train(with_loaders(loaders))
            seconds[workers, loaders] = statistics.mean(h["seconds_per_step"] for h in trainer.history[1:])  # epoch 0 warms up
            if (workers, loaders) == (1, 0):
                figures["train_worker_peak_rss_mb"] = max(h["peak_rss_mb"] for h in trainer.history)
    finally:
        ray.shutdown()
    figures["distill_ray_1_img_per_s"] = (batch + fake_size) / seconds[1, 0]
    figures["distill_bare_1_thread_img_per_s"] = one_thread["bare"]
    figures["distill_ray_vs_bare"] = figures["distill_ray_1_img_per_s"] / one_thread["bare"]
    # the same worker with one loader process decoding and augmenting while it computes (a second CPU's work)
    figures["distill_ray_1_loader_vs_bare"] = (batch + fake_size) / seconds[1, 1] / one_thread["bare"]
    figures["ddp_scaling_2"] = seconds[1, 0] / seconds[2, 0]  # same global batch
    return figures


TARGETS = {"inversion_vs_bare": ">= 0.85", "pool_vs_inprocess": ">= 0.9", "scaling_2_actors": ">= 1.7",
           "distill_vs_bare": ">= 0.8", "distill_ray_vs_bare": ">= 0.8", "distill_ray_1_loader_vs_bare": ">= 0.8"}


def print_comparison(before: dict[str, float], after: dict[str, float]) -> None:
    """One Markdown table of two runs' figures, with the target of each ratio that has one."""
    print("| figure | before | after | target |\n|---|---|---|---|")
    for key in after:
        target = next((t for suffix, t in TARGETS.items() if key.endswith(suffix)), "")
        old = f"{before[key]:.3f}" if key in before else "-"
        print(f"| {key} | {old} | {after[key]:.3f} | {target} |")


def main(argv: list[str] | None = None) -> int:
    """Run the chosen sections, print one table, and write the figures as JSON when asked."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="device of the inversion section")
    parser.add_argument("--bf16", action="store_true", help="bfloat16 autocast in the inversion section")
    parser.add_argument("--only", action="append", choices=SECTIONS, help="run only these sections (repeatable)")
    parser.add_argument("--repeats", type=int, default=3, help="alternations per ratio")
    parser.add_argument("--quick", action="store_true", help="small workloads: checks that the script runs")
    parser.add_argument("--json", default=None, help="write the figures to this file")
    parser.add_argument("--compare", nargs=2, metavar=("BEFORE", "AFTER"), default=None,
                        help="measure nothing: print the figures of two --json files side by side")
    args = parser.parse_args(argv)
    if args.compare:
        print_comparison(*(json.loads(Path(path).read_text()) for path in args.compare))
        return 0
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is visible")
    sections = args.only or list(SECTIONS)
    figures: dict[str, float] = {"torch_threads": torch.get_num_threads()}
    if "inversion" in sections:
        print("inversion ...", flush=True)
        figures.update(inversion_section(args.device, args.bf16, args.repeats, args.quick))
    if "ray" in sections:
        print("ray ...", flush=True)
        figures.update(ray_section(args.quick))
    if "distill" in sections:
        print("distill ...", flush=True)
        figures.update(distill_section(args.quick))
    print(f"\nCommand: `python benchmarks/speed.py {' '.join(argv if argv is not None else sys.argv[1:])}`".rstrip())
    print("\n| figure | value |\n|---|---|")
    for key, value in figures.items():
        print(f"| {key} | {value:.3f} |")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
