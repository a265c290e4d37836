"""Sweep the distillation weights, the real:fake ratio and the SAA scales with Ray Tune (ASHA).

    ray job submit --working-dir . -- python jobs/sweep.py --run-dir s3://bucket/sweeps/a --num-samples 16
    python jobs/sweep.py --preset smoke --run-dir runs/sweep --num-samples 4    # local Ray

The step-0 model is trained once (or given with --base-checkpoint); every trial then runs step 1 of the
protocol (synthesis + distillation + evaluation). The run directory receives results.csv, results.md and
best_config.yaml.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import ray

from hrhf.cli import add_config_arguments, config_from_args
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
    args = parser.parse_args(argv)
    try:
        cfg = config_from_args(args)
    except (ValueError, FileNotFoundError) as err:
        parser.error(str(err))
    from hrhf.distributed.tuning import base_dict, results_table, sweep, trial_config, write_results

    run_dir = absolute_uri(args.run_dir)
    ray.init(address=args.address, log_to_driver=False)
    base = args.base_checkpoint
    if base is None:
        base_dir = f"{run_dir}/base"
        train_base = ray.remote(num_cpus=args.cpus_per_trial, num_gpus=args.gpus_per_trial)(run)
        ray.get(train_base.remote(cfg, run_dir=base_dir, log=print, last_step=0))
        base = f"{base_dir}/step-0.pt"
    print(f"sweeping {args.num_samples} trials from {base}", flush=True)
    results = sweep(cfg, base, storage_path=run_dir, num_samples=args.num_samples,
                    cpus_per_trial=args.cpus_per_trial, gpus_per_trial=args.gpus_per_trial, seed=cfg.seed)
    rows = results_table(results)
    best = results.get_best_result()
    write_results(rows, trial_config(base_dict(cfg, base), best.config), f"{run_dir}/sweep")
    print((Path(run_dir) / "sweep" / "results.md").read_text() if "://" not in run_dir else f"results in {run_dir}/sweep")
    return 0


if __name__ == "__main__":
    sys.exit(main())
