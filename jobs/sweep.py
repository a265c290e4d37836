"""Sweep the distillation weights, the real:fake ratio and the SAA scales with Ray Tune (ASHA).

    ray job submit --working-dir . -- python jobs/sweep.py --run-dir s3://bucket/sweeps/a --num-samples 16
    python jobs/sweep.py --preset smoke --run-dir runs/sweep --num-samples 4    # local Ray

The step-0 model is trained once (or given with --base-checkpoint); every trial then runs step 1 of the
protocol (synthesis + distillation + evaluation). The run directory receives sweep/results.csv,
sweep/results.md, sweep/results.html (the table and the scatter), sweep/sweep.png (the objective against
each swept parameter) and sweep/best_config.yaml.
"""

from __future__ import annotations

import argparse
import os
import sys

import ray

from hrhf.cli import add_config_arguments, add_progress_arguments, config_from_args, progress_from_args
from hrhf.pipeline import run
from hrhf.storage import absolute_uri


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
    from hrhf.distributed.tuning import OBJECTIVE, base_dict, results_table, sweep, trial_config, write_results
    from hrhf.report import sweep_markdown

    progress = progress_from_args(args)
    run_dir = absolute_uri(args.run_dir)
    ray.init(address=args.address, log_to_driver=False)
    base = args.base_checkpoint
    if base is None:
        base_dir = f"{run_dir}/base"
        train_base = ray.remote(num_cpus=args.cpus_per_trial, num_gpus=args.gpus_per_trial)(run)
        ray.get(train_base.remote(cfg, run_dir=base_dir, log=print, last_step=0))
        base = f"{base_dir}/step-0.pt"
    progress.event("run", None, f"sweeping {args.num_samples} trials from {base}")
    results = sweep(cfg, base, storage_path=run_dir, num_samples=args.num_samples,
                    cpus_per_trial=args.cpus_per_trial, gpus_per_trial=args.gpus_per_trial, seed=cfg.seed)
    rows = results_table(results)
    best = results.get_best_result()
    write_results(rows, trial_config(base_dict(cfg, base), best.config), f"{run_dir}/sweep")
    progress.event("report", None, f"results written to {run_dir}/sweep")
    progress.final({"results": rows, "best_trial": rows[0]["trial"], "run_dir": f"{run_dir}/sweep"},
                   sweep_markdown(rows, OBJECTIVE))
    return 0


if __name__ == "__main__":
    sys.exit(main())
