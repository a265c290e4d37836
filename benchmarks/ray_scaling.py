"""What Ray costs and what it buys, measured side by side in one run on this machine.

    python benchmarks/ray_scaling.py                    # job on the default preset (minutes)
    python benchmarks/ray_scaling.py --job-preset smoke  # quicker

1. Wall time of jobs/incremental.py submitted with `ray job submit` to a local `ray start --head`
   cluster of this machine's 2 CPUs vs the same config run in-process (`--in-process`), ratio ray /
   in-process: the job's own defaults (2 synthesis actors of one CPU, one train worker taking both
   CPUs), and with `--job-train-workers 2` two DDP workers of one CPU each.
2. SegInversion images/s through the actor pool with 1 and with 2 actors of one CPU each, ratio.
3. DDP step time of the Ray Train trainer with 1 and with 2 workers of one CPU each (same global batch),
   ratio 1 worker / 2 workers (the speed-up).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).parent / "ray")


def job_wall_times(preset: str, workdir: Path, train_workers: int | None = None) -> dict[str, float]:
    """Seconds for the job through `ray job submit` and in-process, same config and machine."""
    job = [sys.executable, "jobs/incremental.py", "--preset", preset]
    start = time.perf_counter()
    subprocess.run([*job, "--in-process", "--run-dir", str(workdir / "inprocess")], cwd=ROOT, check=True,
                   capture_output=True)
    in_process = time.perf_counter() - start
    from hrhf.distributed import NORMAL_WORKER_PRIORITY
    from hrhf.distributed.localcluster import free_port, kill_processes_under

    port, dashboard = free_port(), free_port()
    cluster_dir = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # short: Ray's socket paths must fit in 107 bytes
    # workers at normal priority, as cluster.yaml starts them; the cluster's files in a directory of its own,
    # so that stopping it ends no other Ray of the machine (`ray stop` would end them all)
    env = {**os.environ, **NORMAL_WORKER_PRIORITY, "RAY_AUTH_MODE": "token", "RAY_TMPDIR": cluster_dir}
    try:
        subprocess.run([RAY, "start", "--head", f"--port={port}", f"--dashboard-port={dashboard}", "--num-cpus=2",
                        "--dashboard-host=127.0.0.1", "--disable-usage-stats", f"--temp-dir={cluster_dir}/ray",
                        f"--dashboard-agent-listen-port={free_port()}"], check=True, env=env, capture_output=True)
        start = time.perf_counter()
        subprocess.run(
            [RAY, "job", "submit", "--address", f"http://127.0.0.1:{dashboard}", "--working-dir", str(ROOT), "--",
             *job, "--run-dir", str(workdir / "ray"),
             *([] if train_workers is None else ["--train-workers", str(train_workers), "--cpus-per-worker", "1"])],
            cwd=ROOT, check=True, env=env, capture_output=True,
        )
        on_ray = time.perf_counter() - start
    finally:
        kill_processes_under(cluster_dir)
        shutil.rmtree(cluster_dir, ignore_errors=True)
    return {"job_inprocess_s": in_process, "job_ray_submit_s": on_ray, "job_ray_vs_inprocess": on_ray / in_process}


def synthesis_rates() -> dict[str, float]:
    """Images/s of the actor pool with 1 and 2 one-CPU actors on the same 12 shards (actor start-up included)."""
    import ray

    from hrhf.config import load_config
    from hrhf.distributed.synthesis import RaySynthesizer
    from hrhf.inversion import make_targets
    from hrhf.models import build_model

    cfg = load_config(overrides=["inversion.iterations=40", "inversion.batch_size=16"])
    teacher = build_model(cfg.model.name, 7, cfg.model.width)
    targets = make_targets(list(range(1, 7)), [0.1, 0.4], 8, base_seed=0)
    rates = {}
    from hrhf.distributed import normal_worker_priority

    normal_worker_priority()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        for actors in (1, 2):
            synthesizer = RaySynthesizer(cfg, num_actors=actors, cpus_per_actor=1.0, shard_size=8, log=lambda _m: None)
            synthesizer.synthesize(teacher, targets[:8], step=1)  # warm-up: imports and first batch in the workers
            start = time.perf_counter()
            synthesizer.synthesize(teacher, targets, step=1)
            rates[f"synthesis_img_per_s_{actors}_actor"] = len(targets) / (time.perf_counter() - start)
    finally:
        ray.shutdown()
    rates["synthesis_2_vs_1_actors"] = rates["synthesis_img_per_s_2_actor"] / rates["synthesis_img_per_s_1_actor"]
    return rates


def ddp_step_times() -> dict[str, float]:
    """Seconds per optimisation step of Ray Train with 1 and 2 one-CPU workers, same global batch."""
    import copy
    import dataclasses

    import ray

    from hrhf.config import load_config
    from hrhf.distributed.training import RayTrainer
    from hrhf.models import build_model, widen_classifier
    from hrhf.pipeline import StepJob, sources_of, step_datasets, task_of
    from hrhf.train import plan_step

    cfg = load_config(method="mib", overrides=["data.train_size=600"])
    task = task_of(cfg)
    real, _ = step_datasets(cfg, task, 1, sources_of(cfg))
    teacher = build_model(cfg.model.name, 7, cfg.model.width).eval()
    plan = dataclasses.replace(plan_step(cfg, 1, n_old=6, incremental=True), epochs=4)
    times = {}
    from hrhf.distributed import normal_worker_priority

    normal_worker_priority()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        for workers in (1, 2):
            student = widen_classifier(copy.deepcopy(teacher), len(task.new_classes(1)))
            trainer = RayTrainer(num_workers=workers, cpus_per_worker=1.0, log=lambda _m: None)
            trainer.train(StepJob(1, student, teacher, real, None, plan, cfg))
            steps = [h["seconds_per_step"] for h in trainer.history[1:]]  # the first epoch warms up
            times[f"ddp_s_per_step_{workers}_worker"] = statistics.mean(steps)
    finally:
        ray.shutdown()
    times["ddp_speedup_2_workers"] = times["ddp_s_per_step_1_worker"] / times["ddp_s_per_step_2_worker"]
    return times


def main(argv: list[str] | None = None) -> int:
    """Run the three measurements and print them; --json writes them too."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--job-preset", default="default", help="preset of the job timing (default: default)")
    parser.add_argument("--job-train-workers", type=int, default=None,
                        help="train workers of one CPU each for the submitted job (default: the job's own default)")
    parser.add_argument("--skip-job", action="store_true", help="leave out the job wall-time comparison")
    parser.add_argument("--only-job", action="store_true", help="only the job wall-time comparison")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    figures: dict[str, float] = {}
    if not args.only_job:
        figures.update(synthesis_rates())
        figures.update(ddp_step_times())
    if not args.skip_job:
        with tempfile.TemporaryDirectory() as workdir:
            figures.update(job_wall_times(args.job_preset, Path(workdir), args.job_train_workers))
    print(f"Command: `python benchmarks/ray_scaling.py {' '.join(argv if argv is not None else sys.argv[1:])}`".strip())
    print("\n| figure | value |\n|---|---|")
    for key, value in figures.items():
        print(f"| {key} | {value:.3f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
