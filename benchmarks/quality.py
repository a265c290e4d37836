"""Quality on the procedural benchmark: FT / LwF / MiB / PLOP / HRHF / joint, mean and spread over seeds.

    python benchmarks/quality.py                          # 5-1, 6-2-2, 6-1; seeds 0 1 2; all methods but LwF
    python benchmarks/quality.py --protocol 6-1 --seed 4 --methods mib,hrhf
    python benchmarks/quality.py --ablation               # SAA vs GAP vs GMP on 6-2-2 and 6-1

Prints Markdown tables of mIoU in percent (old / new / all after the last step, and per step). The
step-0 model of a seed is trained once and shared by every method that starts from it. Joint training
(the upper bound) runs the last step only, once per seed for all protocols that end on the same classes
in the same order; each protocol reads its own old / new split from that run. Runs wait only for their
own seed's step-0 model, and the longest ready run starts first. ``--json PATH`` writes the last step's
means as fractions in [0, 1]: ``{method: {"old", "new", "all"}}`` for one protocol,
``{protocol: {method: ...}}`` for several. ``--runs-dir DIR`` keeps every run's directory (step
checkpoints, galleries, report) as DIR/METHOD-PROTOCOL-sSEED, for benchmarks/inversion_hits.py and the
like; a rerun into it resumes.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import statistics
import sys
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from pathlib import Path
from typing import Callable

import torch

from hrhf.config import Config, load_config
from hrhf.inversion import SegInversion, make_targets
from hrhf.metrics import summarize_iou
from hrhf.models import load_checkpoint
from hrhf.pipeline import run, sources_of, task_of
from hrhf.report import pct
from hrhf.tasks import filter_step

ALL_METHODS = ("ft", "lwf", "mib", "plop", "hrhf", "joint")
DEFAULT_METHODS = ("ft", "mib", "plop", "hrhf", "joint")  # the ones the goals compare
DEFAULT_PROTOCOLS = ("5-1", "6-2-2", "6-1")
# bfloat16 network passes in training: 1.6x faster passes on CPUs with AMX, on which the benchmark is timed;
# on a CPU without it, --set train.bf16=false is faster.
BENCHMARK_SETTINGS = ("train.bf16=true",)


def _quiet(_msg: str) -> None:
    pass


def make_config(args: argparse.Namespace, method: str, protocol: str, seed: int, extra: list[str] = ()) -> Config:
    """The benchmark's config of one (method, protocol, seed) run: the preset under ``BENCHMARK_SETTINGS``, then --set."""
    # Step splits are cached beside the step-0 models: every run of a seed reads the same ones.
    splits = f"data.cache_dir={Path(args.cache_dir) / 'splits'}"
    overrides = [splits, *BENCHMARK_SETTINGS, f"data.protocol={protocol}", f"seed={seed}", *args.overrides, *extra]
    if args.class_order is not None:
        overrides.append(f"data.order_seed={args.class_order}")
    return load_config(args.preset, method=method, overrides=overrides)


def base_dir(args: argparse.Namespace, cfg: Config) -> str:
    """Cache folder of the step-0 model shared by the methods of one seed.

    Named by the base classes, class order and seed, and a digest of every setting step 0 depends on
    (data but the protocol, model, base-step training), so a changed setting never reuses a stale model.
    """
    first = "-".join(map(str, task_of(cfg).steps[0]))
    data = {k: v for k, v in dataclasses.asdict(cfg.data).items() if k not in ("protocol", "cache_dir")}
    base_train = {k: getattr(cfg.train, k) for k in ("epochs_base", "batch_size", "lr_base", "weight_decay", "bf16")}
    settings = json.dumps({"data": data, "model": dataclasses.asdict(cfg.model), "train": base_train}, sort_keys=True)
    digest = hashlib.sha256(settings.encode()).hexdigest()[:8]
    return str(Path(args.cache_dir) / f"base-c{first}-o{args.class_order}-s{cfg.seed}-{digest}")


def _work(job: tuple[str, Config, dict]) -> tuple[str, Config, dict]:
    kind, cfg, options = job
    torch.set_num_threads(1)
    start = time.perf_counter()
    report = run(cfg, log=_quiet, **options)
    report["wall_seconds"] = time.perf_counter() - start
    return kind, cfg, report


def expected_cost(job: tuple[str, Config, dict]) -> float:
    """A job's rough run time in units of one step of fine-tuning, for ordering the queue longest first."""
    kind, cfg, _ = job
    if kind == "base":
        return math.inf  # every later run of its seed waits for it
    if cfg.method.joint:
        return 3.0  # one long step from scratch
    uses_teacher = cfg.method.kd_real != "none" or cfg.method.ce != "plain"
    per_step = 1.0 + uses_teacher + 1.5 * cfg.method.fake  # student passes, old-model passes, the fake half
    return (task_of(cfg).num_steps - 1) * per_step


def run_jobs(jobs: list, workers: int, work: Callable = _work) -> list:
    """Run pipeline jobs in ``workers`` single-threaded processes and return their results in job order.

    A run whose ``train.init_checkpoint`` is the step-0 model of a base job in the list waits for that
    job; among the jobs ready to start, the longest expected goes first, so two processes stay busy to
    the end instead of one finishing a long run alone. Prints each job as it finishes.
    """
    provider = {str(Path(options["run_dir"], "step-0.pt")): i
                for i, (kind, _, options) in enumerate(jobs) if kind == "base"}
    waiting, running, finished = list(range(len(jobs))), {}, set()
    results: list = [None] * len(jobs)

    def ready(i: int) -> bool:
        needed = provider.get(str(jobs[i][1].train.init_checkpoint))
        return needed is None or needed in finished

    with ProcessPoolExecutor(workers) as pool:
        while waiting or running:
            free = workers - len(running)
            for i in sorted(filter(ready, waiting), key=lambda i: -expected_cost(jobs[i]))[:free]:
                waiting.remove(i)
                running[pool.submit(work, jobs[i])] = i
            if not running:
                raise RuntimeError("jobs wait for step-0 models that no job trains")
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in done:
                i = running.pop(future)
                kind, cfg, report = results[i] = future.result()
                finished.add(i)
                last = report["steps"][-1]["metrics"]
                print(
                    f"  done {kind} {cfg.method.name} {cfg.data.protocol} seed {cfg.seed}: "
                    f"old {pct(last['old'])} new {pct(last['new'])} all {pct(last['all'])} "
                    f"({report['wall_seconds']:.0f} s; {len(finished)}/{len(jobs)} jobs)",
                    file=sys.stderr, flush=True,
                )
    return results


def mean_std(values: list[float]) -> str:
    """'mean ± std' in percent over seeds (std 0 for a single seed)."""
    values = [v for v in values if v is not None and not math.isnan(v)]
    if not values:
        return "-"
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{100 * statistics.mean(values):.1f} ± {100 * std:.1f}"


def missing_bases(args: argparse.Namespace) -> list:
    """Jobs that train the step-0 model of every seed (and distinct base class set) not cached yet."""
    missing = {}
    for seed in args.seeds:
        for protocol in args.protocols:
            cfg = make_config(args, "ft", protocol, seed)
            if not Path(base_dir(args, cfg), "step-0.pt").exists():
                missing.setdefault(base_dir(args, cfg), cfg)
    return [("base", cfg, {"run_dir": d, "last_step": 0}) for d, cfg in missing.items()]


def joint_for(report: dict, cfg: Config) -> dict:
    """A joint run's report with its last step's mIoU split into ``cfg``'s old and new classes.

    Joint training on the same classes in the same order is the same experiment whatever the
    protocol (its step only seeds it), so one run per seed serves every protocol that ends there.
    """
    task = task_of(cfg)
    last = task.num_steps - 1
    per_class = report["steps"][-1]["metrics"]["per_class"]
    metrics = summarize_iou(per_class, task.old_indices(last), task.new_indices(last))
    return {**report, "steps": [{**report["steps"][-1], "step": last, "metrics": metrics}]}


def quality(args: argparse.Namespace) -> dict:
    """Run every method on every protocol and seed; return {protocol: {method: [report per seed]}}."""
    methods = [m for m in args.methods.split(",") if m]
    unknown = sorted(set(methods) - set(ALL_METHODS))
    if unknown:
        raise SystemExit(f"unknown methods {unknown}; choose from {', '.join(ALL_METHODS)}")
    bases = missing_bases(args)
    jobs: list = []
    rows: list = []  # (config of a table row, index of the job that serves it), in seed / protocol / method order
    joint_job: dict = {}  # (seed, class order) -> index of the one joint run of that seed and class order
    for seed in args.seeds:
        for protocol in args.protocols:
            for method in methods:
                if method == "joint":
                    cfg = make_config(args, method, protocol, seed)
                    key = (seed, task_of(cfg).order)
                    if key in joint_job:
                        rows.append((cfg, joint_job[key]))
                        continue
                    joint_job[key] = len(jobs)
                    options = {"first_step": task_of(cfg).num_steps - 1}
                else:
                    base = base_dir(args, make_config(args, "ft", protocol, seed))
                    cfg = make_config(args, method, protocol, seed, [f"train.init_checkpoint={base}/step-0.pt"])
                    options = {}
                if args.runs_dir:
                    options["run_dir"] = str(Path(args.runs_dir) / f"{method}-{protocol}-s{seed}")
                rows.append((cfg, len(jobs)))
                jobs.append(("run", cfg, options))
    print(f"training {len(bases)} step-0 model(s) and running {len(jobs)} incremental runs on {args.jobs} processes",
          file=sys.stderr, flush=True)
    reports = [report for _, _, report in run_jobs(bases + jobs, args.jobs)[len(bases):]]
    results: dict = {}
    for cfg, i in rows:
        report = joint_for(reports[i], cfg) if cfg.method.joint else reports[i]
        results.setdefault(cfg.data.protocol, {}).setdefault(cfg.method.name, []).append(report)
    return results


def last_step_table(results: dict) -> tuple[str, dict]:
    """Markdown table of the last step and the JSON summary (fractions)."""
    lines = ["| protocol | method | old | new | all | seeds |", "|---|---|---|---|---|---|"]
    summary: dict = {}
    for protocol, by_method in results.items():
        for method in [m for m in ALL_METHODS if m in by_method]:
            reports = by_method[method]
            last = [r["steps"][-1]["metrics"] for r in reports]
            cells = {k: [m[k] for m in last] for k in ("old", "new", "all")}
            lines.append(
                f"| {protocol} | {method} | {mean_std(cells['old'])} | {mean_std(cells['new'])} | "
                f"{mean_std(cells['all'])} | {len(reports)} |"
            )
            summary.setdefault(protocol, {})[method] = {k: statistics.mean(v) for k, v in cells.items()}
    return "\n".join(lines), summary


def per_step_table(results: dict) -> str:
    """Markdown table of every step (joint: last step only)."""
    lines = ["| protocol | method | step | old | new | all |", "|---|---|---|---|---|---|"]
    for protocol, by_method in results.items():
        for method in [m for m in ALL_METHODS if m in by_method]:
            reports = by_method[method]
            for i, step in enumerate(reports[0]["steps"]):
                cells = {k: [r["steps"][i]["metrics"][k] for r in reports] for k in ("old", "new", "all")}
                lines.append(
                    f"| {protocol} | {method} | {step['step']} | {mean_std(cells['old'])} | "
                    f"{mean_std(cells['new'])} | {mean_std(cells['all'])} |"
                )
    return "\n".join(lines)


def checks(summary: dict) -> str:
    """The claims the benchmark exists to test, each with its measured figure."""
    lines = []
    for protocol, s in summary.items():
        if {"hrhf", "mib", "joint"} <= set(s):
            h, m, j = s["hrhf"], s["mib"], s["joint"]
            gain = 10 if protocol == "5-1" else 5  # the long protocol is where replay must pay most
            lines += [
                f"- {protocol}: HRHF old - MiB old = {100 * (h['old'] - m['old']):+.1f} points (goal >= +{gain})",
                f"- {protocol}: HRHF old / joint old = {h['old'] / j['old']:.2f} (goal >= 0.75)",
                f"- {protocol}: HRHF new / joint new = {h['new'] / j['new']:.2f} (goal >= 0.60)",
                f"- {protocol}: HRHF all - MiB all = {100 * (h['all'] - m['all']):+.1f} points (goal > 0)",
            ]
        if {"hrhf", "plop"} <= set(s):
            lines.append(f"- {protocol}: HRHF all - PLOP all = {100 * (s['hrhf']['all'] - s['plop']['all']):+.1f} "
                         "points (goal >= 0)")
        if {"ft", "joint"} <= set(s):
            lines.append(f"- {protocol}: FT old / joint old = {s['ft']['old'] / s['joint']['old']:.2f} (forgetting)")
    return "\n".join(lines)


def per_seed_gains(results: dict) -> str:
    """HRHF old - MiB old on each seed (both from the same step-0 model), with the mean and the minimum."""
    lines = []
    for protocol, by_method in results.items():
        if not {"hrhf", "mib"} <= set(by_method):
            continue
        old = {method: {r["config"]["seed"]: r["steps"][-1]["metrics"]["old"] for r in by_method[method]}
               for method in ("hrhf", "mib")}
        seeds = sorted(set(old["hrhf"]) & set(old["mib"]))
        gains = [100 * (old["hrhf"][seed] - old["mib"][seed]) for seed in seeds]
        listed = ", ".join(f"seed {seed} {gain:+.1f}" for seed, gain in zip(seeds, gains))
        lines.append(f"- {protocol}: HRHF old - MiB old per seed: {listed}; mean {statistics.mean(gains):+.1f}, "
                     f"minimum {min(gains):+.1f} points")
    return "\n".join(lines)


def new_class_floor(results: dict) -> str:
    """HRHF's lowest new-class mIoU over the incremental steps and seeds, and the spread of the last step's over seeds."""
    lines = []
    for protocol, by_method in results.items():
        reports = by_method.get("hrhf", [])
        if not reports:
            continue
        cells = [(100 * step["metrics"]["new"], r["config"]["seed"], step["step"])
                 for r in reports for step in r["steps"] if step["step"] > 0]
        lowest, seed, step = min(cells)
        last = [100 * r["steps"][-1]["metrics"]["new"] for r in reports]
        spread = statistics.stdev(last) if len(last) > 1 else 0.0
        lines.append(f"- {protocol}: HRHF new-class mIoU, lowest over steps and seeds = {lowest:.1f} (seed {seed}, "
                     f"step {step}; goal >= 50); std over seeds after the last step = {spread:.1f} (goal <= 5)")
    return "\n".join(lines)


def base_against_joint(results: dict) -> str:
    """The step-0 model's mIoU on the base classes against joint training's on the same classes (goal: 90%)."""
    lines = []
    for protocol, by_method in results.items():
        joint = by_method.get("joint", [])
        incremental = next((reports for method, reports in by_method.items() if method != "joint"), [])
        if not joint or not incremental:
            continue
        step0 = [r["steps"][0]["metrics"] for r in incremental]
        base = range(1, len(step0[0]["per_class"]))  # step 0's model outputs: background and the base classes
        ours = statistics.mean(m["new"] for m in step0)
        joint_base = [[r["steps"][-1]["metrics"]["per_class"][i] for i in base] for r in joint]
        theirs = statistics.mean(statistics.mean(v for v in ious if v is not None) for ious in joint_base)
        lines.append(f"- {protocol}: step-0 model on the {len(base)} base classes = {100 * ours:.1f}, joint training on "
                     f"them = {100 * theirs:.1f} ({ours / theirs:.2f} of joint; goal >= 0.90)")
    return "\n".join(lines)


ABLATION_SCALES = (0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6)
AGGREGATIONS = ("saa", "gap", "gmp")


def ranks(values: list[float]) -> list[float]:
    """1-based ranks, ties sharing their mean rank."""
    order = sorted(range(len(values)), key=values.__getitem__)
    result = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            result[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return result


def spearman(x: list[float], y: list[float]) -> float:
    """Spearman rank correlation (Pearson correlation of the ranks)."""
    rx, ry = ranks(x), ranks(y)
    mx, my = statistics.mean(rx), statistics.mean(ry)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    norm = math.sqrt(sum((a - mx) ** 2 for a in rx) * sum((b - my) ** 2 for b in ry))
    return cov / norm if norm else math.nan


def _scale_study(job: tuple[str, Config, str]) -> tuple[str, dict[float, list[float]]]:
    aggregation, cfg, checkpoint = job
    torch.set_num_threads(1)
    teacher, payload = load_checkpoint(checkpoint)
    classes = list(range(1, len(payload["classes"][0]) + 1))
    cfg.inversion.aggregation = aggregation
    cfg.inversion.retry_below = 0.0  # the aggregation term alone: a second try would keep the larger object
    targets = make_targets(classes, ABLATION_SCALES, cfg.inversion.images_per_scale, base_seed=cfg.seed)
    with SegInversion(teacher, cfg.inversion, cfg.data.image_size) as inverter:
        result = inverter.invert(targets)
    areas: dict[float, list[float]] = {r: [] for r in ABLATION_SCALES}
    for meta in result.meta:
        areas[meta["scale"]].append(meta["area"])
    return aggregation, areas


def ablation(args: argparse.Namespace, start: float) -> int:
    """SAA vs GAP vs GMP: synthetic object area against r, and old-class mIoU after distillation."""
    protocol = args.protocols[0]
    seed = args.seeds[0]
    cfg = make_config(args, "hrhf", protocol, seed)
    base = base_dir(args, make_config(args, "ft", protocol, seed))
    run_jobs(missing_bases(args), args.jobs)
    with ProcessPoolExecutor(args.jobs) as pool:
        studies = dict(pool.map(_scale_study, [(a, cfg, f"{base}/step-0.pt") for a in AGGREGATIONS]))
    lines = [
        f"Teacher: step-0 model of {protocol}, seed {seed}; {cfg.inversion.images_per_scale} images per class and r.",
        "",
        "| aggregation | " + " | ".join(f"r={r}" for r in ABLATION_SCALES) + " | Spearman(r, area) | MAE(area, r) |",
        "|---|" + "---|" * (len(ABLATION_SCALES) + 2),
    ]
    for aggregation, areas in studies.items():
        means = [statistics.mean(areas[r]) for r in ABLATION_SCALES]
        mae = statistics.mean(abs(a - r) for r in ABLATION_SCALES for a in areas[r])
        rho = spearman(list(ABLATION_SCALES), means)
        lines.append(f"| {aggregation} | " + " | ".join(f"{m:.3f}" for m in means) + f" | {rho:.2f} | {mae:.3f} |")
    jobs = []
    for s in args.seeds:
        for p in args.protocols:
            base_s = base_dir(args, make_config(args, "ft", p, s))
            for aggregation in AGGREGATIONS:
                extra = [f"train.init_checkpoint={base_s}/step-0.pt", f"inversion.aggregation={aggregation}"]
                jobs.append(("ablation", make_config(args, "hrhf", p, s, extra), {}))
    by_key: dict = {}
    for _, c, report in run_jobs(jobs, args.jobs):
        by_key.setdefault((c.data.protocol, c.inversion.aggregation), []).append(report["steps"][-1]["metrics"])
    lines += ["", "HRHF after the last step, mIoU (%) mean ± std over seeds:", "",
              "| protocol | aggregation | old | new | all |", "|---|---|---|---|---|"]
    for (p, aggregation), metrics in by_key.items():
        cells = {k: mean_std([m[k] for m in metrics]) for k in ("old", "new", "all")}
        lines.append(f"| {p} | {aggregation} | {cells['old']} | {cells['new']} | {cells['all']} |")
    command = "python benchmarks/quality.py " + " ".join(sys.argv[1:])
    print(f"Command: `{command.strip()}` ({time.perf_counter() - start:.0f} s)\n")
    print("\n".join(lines))
    return 0


def old_object_shares(args: argparse.Namespace) -> str:
    """How many of each step's training images show an old class: what real-image distillation sees."""
    lines = ["| protocol | step | training images | share showing an old class |", "|---|---|---|---|"]
    for protocol in args.protocols:
        cfg = make_config(args, "mib", protocol, args.seeds[0])
        task = task_of(cfg)
        present = sources_of(cfg)[0].all_labels_present()
        for step in range(1, task.num_steps):
            kept = filter_step(present, task, step)
            old = set(task.old_classes(step))
            share = sum(bool(present[i] & old) for i in kept) / max(len(kept), 1)
            lines.append(f"| {protocol} | {step} | {len(kept)} | {100 * share:.0f}% |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, run the benchmark, print the tables."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", dest="seeds", type=int, action="append", help="a seed (repeatable; default 0 1 2)")
    parser.add_argument("--protocol", dest="protocols", action="append", help="shapes protocol (repeatable; default 5-1, 6-2-2 and 6-1)")
    parser.add_argument("--class-order", type=int, default=None, help="permute the class order with this seed")
    parser.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                        help="comma-separated subset of " + ",".join(ALL_METHODS) + " (default: all but lwf)")
    parser.add_argument("--preset", default="default")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1), help="parallel processes")
    parser.add_argument("--cache-dir", default="runs/quality-cache", help="where step-0 models and step splits are kept")
    parser.add_argument("--json", default=None, help="write the last step's means (fractions in [0, 1]) here")
    parser.add_argument("--runs-dir", default=None,
                        help="keep each run's directory (checkpoints, galleries, report) here as METHOD-PROTOCOL-sSEED")
    parser.add_argument("--ablation", action="store_true", help="compare SAA with GAP and GMP instead")
    args = parser.parse_args(argv)
    args.seeds = args.seeds or [0, 1, 2]
    start = time.perf_counter()
    if args.ablation:
        args.protocols = args.protocols or ["6-2-2", "6-1"]
        return ablation(args, start)
    args.protocols = args.protocols or list(DEFAULT_PROTOCOLS)
    results = quality(args)
    table, summary = last_step_table(results)
    command = "python benchmarks/quality.py " + " ".join(argv if argv is not None else sys.argv[1:])
    print(f"Command: `{command.strip()}` ({time.perf_counter() - start:.0f} s)\n")
    print("mIoU (%) after the last step, mean ± std over seeds:\n")
    print(table)
    print("\nPer step (joint: last step only):\n")
    print(per_step_table(results))
    print("\n" + checks(summary))
    print(per_seed_gains(results))
    print(new_class_floor(results))
    print(base_against_joint(results))
    print("\nTraining images of each step that show an old class:\n")
    print(old_object_shares(args))
    if args.json:
        payload = summary[args.protocols[0]] if len(args.protocols) == 1 else summary
        Path(args.json).write_text(json.dumps(payload, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
