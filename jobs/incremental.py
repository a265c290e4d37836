"""Run a class-incremental protocol end to end on Ray: parallel synthesis, DDP distillation, evaluation.

    ray job submit --working-dir . -- python jobs/incremental.py --run-dir s3://bucket/runs/a --gpu
    python jobs/incremental.py                     # local Ray, embedded default (shapes 6-2-2, HRHF)
    python jobs/incremental.py --in-process        # the same pipeline without Ray

Re-running with the same --run-dir resumes: finished steps and synthetic shards are not recomputed.
``--reference mib,ft`` also runs those methods in the same job, from the run's step-0 model (joint
training: its last step, from scratch), each under references/<name>/ of the run directory, and shows
them beside the run in the report.
The run directory ends with report.json, report.md, report.html (self-contained), the plots
miou_per_step.png and per_class_iou.png, and a gallery-step-N.png of each step's synthetic images.
Progress goes to stdout as text or, with --log-format json, as one JSON object per line.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import traceback
from typing import Any

from hrhf.cli import add_config_arguments, add_progress_arguments, config_from_args, progress_from_args
from hrhf.config import Config
from hrhf.inversion import NonFiniteError
from hrhf.lease import STALE_AFTER_S, LeaseHeldError, RunLease
from hrhf.pipeline import (add_references, check_references, preflight, reference_config, reference_dir, run,
                           run_reference)
from hrhf.progress import Progress
from hrhf.report import markdown_report
from hrhf.storage import absolute_uri, is_local


PROBE_TIMEOUT_S = 900  # long enough for an autoscaler to start a GPU node for the probe


def build_parser() -> argparse.ArgumentParser:
    """The job's command line."""
    parser = add_config_arguments(argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter))
    parser.add_argument("--run-dir", default="runs/default", help="local path or s3:// URI; reruns resume from it")
    parser.add_argument("--synthesis-actors", type=int, default=2, help="parallel SegInversion actors")
    parser.add_argument("--cpus-per-actor", type=float, default=1.0)
    parser.add_argument("--train-workers", type=int, default=1, help="Ray Train DDP workers")
    parser.add_argument("--cpus-per-worker", type=float, default=None,
                        help="CPUs of each train worker (its torch threads); default: 1 with --gpu, else the CPUs of "
                             "the cluster's largest node shared by the workers")
    parser.add_argument("--gpu", action="store_true", help="one GPU per synthesis actor and per train worker")
    parser.add_argument("--shard-size", type=int, default=32, help="synthesis targets per shard")
    parser.add_argument("--sink", choices=("parquet", "object-store"), default="parquet",
                        help="synthetic images as Parquet shards in the run directory, or Ray object refs only")
    parser.add_argument("--max-failures", type=int, default=2, help="train worker failures to recover from")
    parser.add_argument("--address", default=os.environ.get("RAY_ADDRESS"), help="Ray address (default: local Ray)")
    parser.add_argument("--in-process", action="store_true", help="run without Ray")
    parser.add_argument("--worker-logs", action="store_true",
                        help="also print what Ray's actors and workers print (otherwise only in Ray's log files)")
    parser.add_argument("--take-over-lease", action="store_true",
                        help="take the run directory over from a job whose lease went stale (it crashed or was killed)")
    parser.add_argument("--lease-timeout", type=float, default=STALE_AFTER_S,
                        help="seconds without a heartbeat after which a run directory's lease counts as stale")
    parser.add_argument("--shared-run-dir", action="store_true",
                        help="the local --run-dir is on a file system that every node of the cluster mounts (NFS, EFS, ...)")
    parser.add_argument("--skip-data-check", action="store_true",
                        help="do not decode every real image and mask before step 0 (they are then checked when used)")
    parser.add_argument("--reference", action="append", default=[], metavar="METHOD[,METHOD...]",
                        help="also run METHOD from this run's step-0 model (joint: last step from scratch) and show "
                             "it beside the run in the report; repeatable")
    return add_progress_arguments(parser)


def check_arguments(args: argparse.Namespace) -> None:
    """Raise ValueError for job arguments no run can use."""
    for name in ("synthesis_actors", "train_workers", "shard_size", "max_failures"):
        value, least = getattr(args, name), 0 if name == "max_failures" else 1
        if value < least:
            raise ValueError(f"--{name.replace('_', '-')} must be >= {least}, got {value}")
    for name in ("cpus_per_actor", "cpus_per_worker", "lease_timeout"):
        if getattr(args, name) is not None and not getattr(args, name) > 0:
            raise ValueError(f"--{name.replace('_', '-')} must be > 0, got {getattr(args, name)}")
    if args.gpu and args.in_process:
        import torch

        if not torch.cuda.is_available():
            raise ValueError("--gpu with --in-process needs CUDA, and torch finds no CUDA device on this machine")


def error_line(err: BaseException) -> str:
    """The one line a user reads for an error, also when a Ray task or actor raised it (without Ray's traceback)."""
    cause = getattr(err, "cause", None)  # a ray.exceptions.RayTaskError carries the exception raised remotely
    shown = cause if isinstance(cause, BaseException) else err
    return "error: " + (" ".join(str(shown).split()) or type(shown).__name__)


def reference_names(args: argparse.Namespace) -> list[str]:
    """The --reference methods as given: repeated flags and comma-separated lists, in order."""
    return [name.strip() for value in args.reference for name in value.split(",")]


def main(argv: list[str] | None = None) -> int:
    """Check everything, then run every step and print the Markdown report (or its JSON record)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    # `ray job stop` sends SIGTERM: leave through the normal exits, so that the run directory's lease is released.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    try:
        check_arguments(args)
        cfg = config_from_args(args)
        if args.gpu and args.in_process:
            cfg.device = "cuda"  # on Ray only the actors and train workers use GPUs; the driver may have none
        references = check_references(cfg, reference_names(args))
        run_dir = absolute_uri(args.run_dir)
        preflight(cfg, run_dir, check_data=not args.skip_data_check, references=references)
        lease = RunLease(run_dir, stale_after_s=args.lease_timeout).acquire(takeover=args.take_over_lease)
    except (ValueError, FileNotFoundError, OSError, LeaseHeldError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    progress = progress_from_args(args)
    with lease:
        if not args.in_process:
            try:
                connect_ray(args)
                if args.cpus_per_worker is None:
                    args.cpus_per_worker = default_cpus_per_worker(args)
                check_run_dir_reaches_every_node(run_dir, args.shared_run_dir)
                probe_storage(args, run_dir)
            except (ValueError, OSError) as err:
                print(f"error: {err}", file=sys.stderr)
                return 2
        try:
            report = run_all(cfg, run_dir, references, args, progress, lease)
        except (NonFiniteError, LeaseHeldError, OSError) as err:  # OSError: disk full, storage gone, ...
            print(error_line(err), file=sys.stderr)
            return 1
        except Exception as err:  # inside Ray or a storage client: the traceback stays for a bug report
            traceback.print_exc()
            print(f"error: {type(err).__name__}: {err}", file=sys.stderr)
            return 1
    progress.final(report, markdown_report(report))
    return 0


def run_all(cfg: Config, run_dir: str, references: list[str], args: argparse.Namespace, progress: Progress,
            lease: RunLease) -> dict[str, Any]:
    """Every step of the run, then of each reference method; the run's report with the references beside it."""
    report = run(cfg, run_dir=run_dir, log=progress, lease=lease, **workers_of(cfg, run_dir, args, progress))
    if not references:
        return report
    results = {}
    for name in references:
        ref_workers = workers_of(reference_config(cfg, name), reference_dir(run_dir, name), args, progress)
        results[name] = run_reference(cfg, name, run_dir, log=progress, lease=lease, **ref_workers)
    return add_references(report, run_dir, results, log=progress, lease=lease)


def workers_of(cfg: Config, run_dir: str, args: argparse.Namespace, progress: Progress) -> dict[str, Any]:
    """The synthesizer, trainer and evaluator of a run: none with --in-process (the pipeline's own), else Ray's."""
    return {} if args.in_process else ray_workers(cfg, run_dir, args, progress)


def connect_ray(args: argparse.Namespace) -> None:
    """Connect to (or start) Ray; ValueError when --gpu asks for GPUs that this cluster can never have."""
    import ray

    from hrhf.distributed import normal_worker_priority, quiet_ray_output, ray_train_settings

    ray_train_settings()
    # The job's output holds the job's own lines (its progress events all come from this driver); what
    # Ray's actors, workers and Ray Data print stays in Ray's logs unless --worker-logs asks for it.
    normal_worker_priority()  # for a Ray started here; a cluster's start commands set it for theirs
    ray.init(address=args.address, log_to_driver=args.worker_logs and not (args.quiet or args.log_format == "json"))
    quiet_ray_output()
    if args.gpu and not ray.cluster_resources().get("GPU"):
        # An autoscaling cluster may start without GPU nodes; one whose node types offer none never gets any.
        from ray._private.state import state

        most = state.get_max_resources_from_cluster_config()
        if most is None and args.address in (None, "local"):
            most = {}  # the local Ray this job started: no autoscaler
        if most is not None and not most.get("GPU"):
            ray.shutdown()
            raise ValueError("--gpu: the Ray cluster has no GPU and its configuration cannot add any")


def default_cpus_per_worker(args: argparse.Namespace) -> float:
    """One CPU per GPU worker; without GPUs, the largest node's CPUs shared by the train workers (whole CPUs).

    A worker's torch threads follow its CPUs, so on one machine a single worker computes as fast as the
    job in process does.
    """
    import ray

    if args.gpu:
        return 1.0
    largest = max((node["Resources"].get("CPU", 0) for node in ray.nodes() if node["Alive"]), default=1)
    return float(max(1, int(largest) // args.train_workers))


def check_run_dir_reaches_every_node(run_dir: str, shared: bool) -> None:
    """ValueError for a local run directory on a cluster of several nodes, or one that may add nodes.

    Actors and workers on other nodes would write shards and checkpoints to their own disks, which the
    driver cannot read.
    """
    import ray
    from ray._private.state import state

    if not is_local(run_dir) or shared:
        return
    nodes = sum(1 for node in ray.nodes() if node["Alive"])
    autoscaling = state.get_cluster_config() is not None
    if nodes > 1 or autoscaling:
        where = f"{nodes} nodes" if nodes > 1 else "an autoscaling cluster (it may add nodes)"
        raise ValueError(
            f"--run-dir {run_dir} is a local directory, but the Ray cluster has {where}: workers on other nodes "
            "would write to their own disks. Use an s3:// run directory, or pass --shared-run-dir if every node "
            "mounts this path (NFS, EFS)"
        )


def probe_storage(args: argparse.Namespace, run_dir: str) -> None:
    """Write-probe the run directory from a Ray task with a synthesis actor's resources, where the work will run."""
    from hrhf.distributed.probe import check_storage_where_work_runs

    check_storage_where_work_runs(run_dir, num_cpus=args.cpus_per_actor, num_gpus=1 if args.gpu else 0,
                                  timeout_s=PROBE_TIMEOUT_S)


def ray_workers(cfg: Config, run_dir: str, args: argparse.Namespace, progress: Progress) -> dict[str, Any]:
    """Ray actors for synthesis, Ray Train for distillation, Ray Data for evaluation; shards and train state in ``run_dir``."""
    from hrhf.distributed.evaluation import RayEvaluator
    from hrhf.distributed.synthesis import RaySynthesizer
    from hrhf.distributed.training import RayTrainer
    from hrhf.storage import pyarrow_filesystem

    synthesizer = RaySynthesizer(
        cfg,
        num_actors=args.synthesis_actors,
        cpus_per_actor=args.cpus_per_actor,
        use_gpu=args.gpu,
        store_uri=f"{run_dir}/synthetic" if args.sink == "parquet" else None,
        shard_size=args.shard_size,
        log=progress,
    )
    storage_path, storage_filesystem = pyarrow_filesystem(f"{run_dir}/train")
    trainer = RayTrainer(
        num_workers=args.train_workers,
        use_gpu=args.gpu,
        cpus_per_worker=args.cpus_per_worker,
        storage_path=storage_path,
        storage_filesystem=storage_filesystem,
        max_failures=args.max_failures,
        log=progress,
    )
    evaluator = RayEvaluator(num_actors=args.train_workers, cpus_per_actor=args.cpus_per_worker, use_gpu=args.gpu)
    return {"synthesizer": synthesizer, "trainer": trainer, "evaluator": evaluator}


if __name__ == "__main__":
    sys.exit(main())
