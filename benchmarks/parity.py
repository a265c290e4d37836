"""Same config, same result: all-class mIoU after the last step in process, on Ray with 1 and with N workers.

    python benchmarks/parity.py --json runs/parity.json              # the parity config, a few minutes
    python benchmarks/parity.py --preset default --json runs/parity-default.json
    python benchmarks/parity.py --gpu --json runs/parity-gpu.json     # Ray workers on GPUs (NCCL)
    python benchmarks/parity.py --threads 1,2,3,4                      # in process only, per thread count

Every run trains the same global batches (hrhf.train fixes them by seed, not by worker count); what
may differ is floating-point summation order, and, with ``--set train.sync_bn=false``, BatchNorm
statistics taken per worker. Synthesis runs as one shard so that the synthetic images match too.
Prints a Markdown table; ``--json`` writes ``in_process``, ``ray_1``, ``ray_N`` (percent), ``spread``,
the per-step figures and the seconds of each run. ``--noise-floor`` adds an in-process run with another
torch thread count, which changes nothing but the order of float sums: on a small model trained for a
few epochs that alone can move the final mIoU by points, and no worker count can do better.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from hrhf.config import Config, load_config
from hrhf.pipeline import run

# A config that learns something in about a minute per run on 2 cores (the smoke preset learns nothing).
PARITY_OVERRIDES = ["data.train_size=480", "train.epochs_base=6", "train.epochs_step=4", "inversion.iterations=20",
                    "inversion.images_per_scale=2", "model.width=12"]


def parity_config(preset: str, overrides: list[str], method: str | None = None) -> Config:
    """The benchmark's config: the parity overrides on the smoke preset, or a preset as it is."""
    extra = PARITY_OVERRIDES if preset == "parity" else []
    return load_config("smoke" if preset == "parity" else preset, overrides=[*extra, *overrides], method=method)


def run_ray(cfg: Config, workers: int, use_gpu: bool, run_dir: str) -> dict:
    """The pipeline on the connected Ray cluster with ``workers`` train workers (one synthesis shard)."""
    from hrhf.distributed.evaluation import RayEvaluator
    from hrhf.distributed.synthesis import RaySynthesizer
    from hrhf.distributed.training import RayTrainer

    # one shard: the actor inverts the targets in the same batches as the in-process run
    synthesizer = RaySynthesizer(cfg, num_actors=1, use_gpu=use_gpu, shard_size=1_000_000, log=_quiet)
    trainer = RayTrainer(num_workers=workers, use_gpu=use_gpu, cpus_per_worker=1.0 if use_gpu else 2.0 / workers,
                         storage_path=f"{run_dir}/train", log=_quiet)
    evaluator = RayEvaluator(num_actors=workers, cpus_per_actor=1.0, use_gpu=use_gpu)
    return run(cfg, synthesizer=synthesizer, trainer=trainer, evaluator=evaluator, log=_quiet)


def _quiet(_message: str) -> None:
    pass


def last_all(report: dict) -> float:
    """All-class mIoU (percent) after the last step."""
    return 100 * report["steps"][-1]["metrics"]["all"]


def run_label(name: str) -> str:
    """The table's name of a run: 'ray_2' is 'Ray, 2 train workers'."""
    if name.startswith("ray_"):
        workers = int(name.split("_")[1])
        return f"Ray, {workers} train worker{'s' if workers > 1 else ''}"
    return {"in_process": "in process", "in_process_other_threads": "in process, the other torch thread count",
            "in_process_again": "in process, the same run again"}[name]


def timed_run(cfg: Config, threads: int | None = None) -> dict:
    """The in-process pipeline, with ``threads`` torch threads if given: {"report", "seconds"}."""
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    begin = time.perf_counter()
    try:
        return {"report": run(cfg, log=_quiet), "seconds": time.perf_counter() - begin}
    finally:
        torch.set_num_threads(before)


def print_step_table(argv: list[str] | None, start: float, first_column: str, results: dict[str, dict]) -> None:
    """The command line and its seconds, then a row per run: all-class mIoU after every step, the run's seconds."""
    command = "python benchmarks/parity.py " + " ".join(argv if argv is not None else sys.argv[1:])
    print(f"Command: `{command.strip()}` ({time.perf_counter() - start:.0f} s)\n")
    steps = len(next(iter(results.values()))["report"]["steps"])
    print(f"| {first_column} | " + " | ".join(f"all after step {s}" for s in range(steps)) + " | seconds |")
    print("|---|" + "---|" * (steps + 1))
    for label, r in results.items():
        per_step = " | ".join(f"{100 * s['metrics']['all']:.2f}" for s in r["report"]["steps"])
        print(f"| {label} | {per_step} | {r['seconds']:.0f} |")


def thread_sweep(args: argparse.Namespace, counts: list[int], argv: list[str] | None) -> int:
    """The in-process run at each torch thread count: the same batches, only the order of float sums differs."""
    cfg = parity_config(args.preset, list(args.overrides), args.method)
    start = time.perf_counter()
    rows = {str(count): timed_run(cfg, count) for count in counts}
    print_step_table(argv, start, "torch threads", rows)
    last = [last_all(r["report"]) for r in rows.values()]
    print(f"\nrange of the last step's all-class mIoU over thread counts: {max(last) - min(last):.2f} points")
    if args.json:
        per_step = {count: [100 * s["metrics"]["all"] for s in r["report"]["steps"]] for count, r in rows.items()}
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(per_step, indent=2))
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run the three configurations and print the table."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="parity", help="'parity' (default: smoke data, a few epochs) or a config preset")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    parser.add_argument("--method", default=None, help="a method of hrhf.methods.METHODS (default: the preset's, hrhf)")
    parser.add_argument("--workers", type=int, default=2, help="N of the N-worker run (1: no N-worker run)")
    parser.add_argument("--gpu", action="store_true", help="in-process run on cuda, Ray workers on GPUs")
    parser.add_argument("--address", default="local", help="Ray address (default: a local Ray started here)")
    parser.add_argument("--noise-floor", action="store_true",
                        help="also run in process with another torch thread count (on CUDA: the same run again): "
                             "how far float summation order alone moves the figure")
    parser.add_argument("--threads", default=None, metavar="N,N,...",
                        help="instead: the in-process run at each of these torch thread counts, no Ray: "
                             "how far float summation order alone spreads the figure")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    if args.threads:
        return thread_sweep(args, [int(n) for n in args.threads.split(",")], argv)
    overrides = list(args.overrides)
    cfg = parity_config(args.preset, overrides, args.method)
    results: dict[str, dict] = {}
    start = time.perf_counter()
    local = parity_config(args.preset, [*overrides, *(["device=cuda"] if args.gpu else [])], args.method)
    results["in_process"] = timed_run(local)
    if args.noise_floor and args.gpu:
        # the same run again: CUDA's kernels (atomic adds in convolution backward) do not fix the summation order
        results["in_process_again"] = timed_run(local)
    elif args.noise_floor:
        # the same process and batches with torch's other thread count: only float summation order changes
        results["in_process_other_threads"] = timed_run(local, 1 if torch.get_num_threads() > 1 else 2)

    import ray

    from hrhf.distributed import normal_worker_priority, quiet_ray_output

    normal_worker_priority()

    ray.init(address=args.address, include_dashboard=False, log_to_driver=False)
    quiet_ray_output()
    counts = sorted({1, args.workers})
    if args.gpu:  # NCCL takes one GPU per worker: no N-worker run on a one-GPU machine
        gpus = int(ray.cluster_resources().get("GPU", 0))
        counts = sorted({1, min(args.workers, gpus)})
        if len(counts) == 1:
            print(f"one GPU in the cluster: the {args.workers}-worker run is skipped")
    try:
        for workers in counts:
            begin = time.perf_counter()
            with tempfile.TemporaryDirectory(prefix="hrhf-parity-") as run_dir:
                report = run_ray(cfg, workers, args.gpu, run_dir)
            results[f"ray_{workers}"] = {"report": report, "seconds": time.perf_counter() - begin}
    finally:
        ray.shutdown()

    figures = {name: round(last_all(r["report"]), 2) for name, r in results.items()}
    noise_runs = ("in_process_other_threads", "in_process_again")
    compared = [v for name, v in figures.items() if name not in noise_runs]
    spread = max(compared) - min(compared)
    print_step_table(argv, start, "run", {run_label(name): r for name, r in results.items()})
    print(f"\nspread of the last step's all-class mIoU ({', '.join(n for n in figures if n not in noise_runs)}): {spread:.2f} points "
          "(target <= 1)")
    if "in_process_other_threads" in figures:
        floor = abs(figures["in_process_other_threads"] - figures["in_process"])
        print(f"in process with another torch thread count: {floor:.2f} points away (float summation order alone)")
    if "in_process_again" in figures:
        floor = abs(figures["in_process_again"] - figures["in_process"])
        print(f"the same in-process run again on CUDA: {floor:.2f} points away (CUDA's summation order alone)")
    if args.json:
        payload = {**figures, "spread": round(spread, 2),
                   "per_step": {name: [s["metrics"]["all"] for s in r["report"]["steps"]] for name, r in results.items()},
                   "seconds": {name: round(r["seconds"], 1) for name, r in results.items()}}
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(payload, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
