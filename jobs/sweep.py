"""Sweep the distillation weights, the real:fake ratio and the SAA scales with Ray Tune (ASHA).

    ray job submit --working-dir . -- python jobs/sweep.py --run-dir s3://bucket/sweeps/a --num-samples 16
    python jobs/sweep.py --preset smoke --run-dir runs/sweep --num-samples 4    # local Ray

The step-0 model is trained once (or given with --base-checkpoint); every trial then runs step 1 of the
protocol (synthesis + distillation + evaluation). The run directory receives sweep/results.csv,
sweep/results.md, sweep/results.html (the table and the scatter), sweep/sweep.png (the objective against
each swept parameter) and sweep/best_config.yaml.

Submitting the same command again resumes: the step-0 model in the run directory is reused, finished
trials are kept as they are and the trials that were interrupted start again (a resumed sweep keeps the
trial count and search space of its first submission).
"""

from __future__ import annotations

import argparse
import os
import sys

import ray

from hrhf.cli import add_config_arguments, add_progress_arguments, config_from_args, progress_from_args
from hrhf.storage import RunDir, absolute_uri


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, train or load the base model, run the sweep, write its tables."""
    parser = add_config_arguments(argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter))
    parser.add_argument("--run-dir", default="runs/sweep", help="local path or s3:// URI for the sweep's outputs")
    parser.add_argument("--num-samples", type=int, default=8, help="number of trials")
    parser.add_argument("--cpus-per-trial", type=float, default=1.0)
    parser.add_argument("--gpus-per-trial", type=float, default=0.0)
    parser.add_argument("--base-checkpoint", default=None, help="step-0 checkpoint to start every trial from")
    parser.add_argument("--address", default=os.environ.get("RAY_ADDRESS"), help="Ray cluster address (default: start a local Ray)")
    add_progress_arguments(parser)
    args = parser.parse_args(argv)
    try:
        cfg = config_from_args(args)
    except (ValueError, FileNotFoundError) as err:
        parser.error(str(err))
    from hrhf.distributed.tuning import (
        OBJECTIVE,
        base_dict,
        can_resume,
        finished_trials,
        new_tuner,
        results_table,
        resume_tuner,
        sweep_trainable,
        train_base,
        trial_config,
        write_results,
    )
    from hrhf.pipeline import incremental_epochs
    from hrhf.report import sweep_markdown

    progress = progress_from_args(args)
    run_dir = absolute_uri(args.run_dir)
    # Every trial checkpoints once, and Tune saves its experiment state after each checkpoint (so that a
    # resumed sweep knows them all); trials that end together make Tune warn about that, needlessly.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    from hrhf.distributed import normal_worker_priority, ray_train_settings

    normal_worker_priority()
    ray_train_settings()
    ray.init(address=args.address, log_to_driver=False)
    base = args.base_checkpoint
    if base is None:
        base_dir = RunDir(f"{run_dir}/base")
        base = base_dir.path("step-0.pt")
        if base_dir.exists("step-0.pt"):
            base_dir.check(cfg)  # the check a rerun of the base training makes: the same config or an error
            progress.event("run", 0, f"found {base}, not retrained")
        else:
            remote = ray.remote(num_cpus=args.cpus_per_trial, num_gpus=args.gpus_per_trial)(train_base)
            ray.get(remote.remote(cfg, base_dir.uri, use_gpu=args.gpus_per_trial > 0))
    trainable = sweep_trainable(cfg, base, cpus_per_trial=args.cpus_per_trial, gpus_per_trial=args.gpus_per_trial)
    if can_resume(run_dir):
        tuner = resume_tuner(run_dir, trainable)
        progress.event("run", None, f"resumed the sweep in {run_dir}/sweep: {finished_trials(tuner)} trials already finished")
    else:
        # ASHA's last rung must be the step's last epoch, where a trial saves its checkpoint
        tuner = new_tuner(trainable, run_dir, incremental_epochs(cfg, 1), num_samples=args.num_samples, seed=cfg.seed)
        progress.event("run", None, f"sweeping {args.num_samples} trials from {base}")
    results = tuner.fit()
    rows = results_table(results)
    best = results.get_best_result()
    write_results(rows, trial_config(base_dict(cfg, base), best.config), f"{run_dir}/sweep")
    progress.event("report", None, f"results written to {run_dir}/sweep")
    progress.final({"results": rows, "best_trial": rows[0]["trial"], "run_dir": f"{run_dir}/sweep"},
                   sweep_markdown(rows, OBJECTIVE))
    return 0


if __name__ == "__main__":
    sys.exit(main())
