"""Memory of the Ray job's driver as the training set grows: the same job on shapes at two sizes.

    python benchmarks/scale.py --json runs/scale.json     # 2,000 and 20,000 training images at 64 px
    python benchmarks/scale.py --sizes 200,2000 --image-size 128

Each size runs jobs/incremental.py as a driver process of its own, with the same settings (the smoke
preset, protocol 6-2-2, one epoch per step, model width 8, a small validation set; only
``data.train_size`` differs), against one Ray head of 2 CPUs, workers at normal priority, that this
script starts in a temporary directory and stops alone, by killing that cluster's processes (`ray stop`
would end every Ray cluster of the machine).

Per size it reports:
- the driver's peak resident memory: ru_maxrss of the driver process, as wait4 returns it when the
  driver exits (the driver starts no process of its own: workers are children of the raylet);
- a train worker's peak resident memory: the largest VmHWM of the cluster's processes whose command
  line names RayTrainWorker, polled every 0.2 s, or rank 0's own per-epoch figure if that is larger;
- training images per second: real images of every epoch of every step over the summed epoch seconds
  that rank 0 reports (Ray Train's start-up and the evaluation are not in them);
- the driver's wall seconds.

The target is ``driver_growth`` (driver peak at the larger size / at the smaller) below 1.1: no image
should pass through, or stay in, the driver.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from hrhf.distributed import NORMAL_WORKER_PRIORITY  # noqa: E402
from hrhf.distributed.localcluster import free_port, kill_processes_under, peak_rss_mb, processes_under  # noqa: E402
from hrhf.train import iters_per_epoch  # noqa: E402

RAY = str(Path(sys.executable).parent / "ray")
GROWTH_TARGET = 1.1
POLL_S = 0.2
# The same for every size; data.train_size and data.image_size are added per run. Each worker streams
# the synthetic set once per pass over it, each pass a Ray Data read task per shard: with the smoke
# preset's 12 synthetic images a step read 47 passes at 2,000 images and took 6.4 s per batch on 2
# busy cores (1.9 s with the 384 images below), and 20,000 images need ten times the passes. So the
# set is larger (384 and 512 images) and written as one shard.
JOB_SETTINGS = ("data.protocol=6-2-2", "data.val_size=48", "model.width=8", "train.epochs_base=1",
                "train.epochs_step=1", "inversion.images_per_scale=32")
JOB_RESOURCES = ("--synthesis-actors", "2", "--cpus-per-actor", "0.5", "--train-workers", "2",
                 "--cpus-per-worker", "0.5", "--shard-size", "512")


class RayHead:
    """A one-node Ray cluster of 2 CPUs on 127.0.0.1, its files under a fresh directory, stopped alone."""

    def __init__(self) -> None:
        self.directory = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # short: Ray's socket paths must fit in 107 bytes
        self.address = f"127.0.0.1:{free_port()}"
        # the cluster and its drivers use the token of the default path, ~/.ray/auth_token (created if missing)
        dropped = ("RAY_ADDRESS", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")
        self.env = {k: v for k, v in os.environ.items() if k not in dropped}
        self.env.update(NORMAL_WORKER_PRIORITY, RAY_AUTH_MODE="token", RAY_TMPDIR=self.directory,
                        PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")

    def start(self) -> RayHead:
        """`ray start --head` in this head's directory; RuntimeError with Ray's output when it fails."""
        command = [RAY, "start", "--head", f"--port={self.address.rsplit(':', 1)[1]}", "--node-ip-address=127.0.0.1",
                   "--num-cpus=2", "--include-dashboard=false", "--disable-usage-stats",
                   f"--temp-dir={self.directory}/ray", f"--dashboard-agent-listen-port={free_port()}"]
        result = subprocess.run(command, env=self.env, capture_output=True, text=True, timeout=180)
        if result.returncode != 0:
            self.stop()
            raise RuntimeError(f"ray start failed:\n{result.stdout[-3000:]}{result.stderr[-3000:]}")
        return self

    def stop(self, timeout_s: float = 30.0) -> None:
        """Kill this cluster's processes, and nothing else, then remove its directory."""
        left = kill_processes_under(self.directory, timeout_s)
        shutil.rmtree(self.directory, ignore_errors=True)
        if left:
            raise RuntimeError(f"processes of the Ray cluster in {self.directory} still running: {left}")


class TrainWorkerWatch:
    """Polls the largest VmHWM of the cluster's Ray Train worker processes while a job runs."""

    def __init__(self, cluster_directory: str) -> None:
        self.cluster_directory = cluster_directory
        self.peak_mb = 0.0
        self.worker_pids: set[int] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def __enter__(self) -> TrainWorkerWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _poll(self) -> None:
        while not self._stop.is_set():
            for pid in processes_under(self.cluster_directory):
                try:
                    cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
                except OSError:
                    continue
                if b"RayTrainWorker" not in cmdline:
                    continue
                peak = peak_rss_mb(pid)
                if peak is not None:
                    self.worker_pids.add(pid)
                    self.peak_mb = max(self.peak_mb, peak)
            self._stop.wait(POLL_S)


def job_command(size: int, image_size: int, run_dir: str, address: str) -> list[str]:
    """The driver's command line for one dataset size."""
    overrides = [*JOB_SETTINGS, f"data.train_size={size}", f"data.image_size={image_size}"]
    sets = [arg for setting in overrides for arg in ("--set", setting)]
    return [sys.executable, "jobs/incremental.py", "--preset", "smoke", *sets, *JOB_RESOURCES,
            "--run-dir", run_dir, "--address", address, "--log-format", "json"]


def run_driver(command: list[str], env: dict[str, str], log_prefix: Path, timeout_s: float) -> tuple[int, float, float]:
    """Run the driver to its end: (exit code, its peak RSS in MiB from wait4, wall seconds); output to log files."""
    with open(f"{log_prefix}.out", "w") as out, open(f"{log_prefix}.err", "w") as err:
        start = time.perf_counter()
        driver = subprocess.Popen(command, cwd=ROOT, env=env, stdout=out, stderr=err)
        deadline = threading.Timer(timeout_s, driver.kill)
        deadline.start()
        try:
            _, status, usage = os.wait4(driver.pid, 0)
        except BaseException:
            driver.kill()
            driver.wait()
            raise
        finally:
            deadline.cancel()
        wall_s = time.perf_counter() - start
    driver.returncode = os.waitstatus_to_exitcode(status)
    return driver.returncode, usage.ru_maxrss / 1024, wall_s  # Linux gives ru_maxrss in KiB


def training_rate(report: dict[str, Any], events: list[dict[str, Any]]) -> float:
    """Real training images per second of epoch time, over every epoch of every step."""
    batch_size = report["config"]["train"]["batch_size"]
    num_real = {step["step"]: step["num_real"] for step in report["steps"]}
    images, seconds = 0, 0.0
    for event in events:
        if event.get("stage") != "training" or "seconds_per_step" not in event:
            continue
        iters = iters_per_epoch(num_real[event["step"]], batch_size)
        images += num_real[event["step"]] if iters == 1 else iters * batch_size
        seconds += event["seconds_per_step"] * iters
    if not seconds:
        raise RuntimeError("the job reported no training epoch")
    return images / seconds


def measure(size: int, image_size: int, head: RayHead, work_dir: Path, timeout_s: float) -> dict[str, Any]:
    """Run the job once at ``size`` training images and return its figures."""
    run_dir = work_dir / f"run-{size}"
    if run_dir.exists():  # the job would resume from it and recompute nothing
        raise RuntimeError(f"{run_dir} exists already; keep the runs in an empty folder")
    command = job_command(size, image_size, str(run_dir), head.address)
    with TrainWorkerWatch(head.directory) as workers:
        code, driver_peak_mb, wall_s = run_driver(command, head.env, work_dir / f"driver-{size}", timeout_s)
    stdout = Path(f"{work_dir}/driver-{size}.out").read_text()
    if code != 0:
        stderr = Path(f"{work_dir}/driver-{size}.err").read_text()
        raise RuntimeError(f"the job at {size} images exited with {code}:\n{stdout[-3000:]}\n{stderr[-3000:]}")
    events = []
    for line in stdout.splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line some library printed
        if isinstance(record, dict):
            events.append(record)
    report = json.loads((run_dir / "report.json").read_text())
    reported_worker_mb = max((e["peak_rss_mb"] for e in events if "peak_rss_mb" in e), default=0.0)
    if not workers.worker_pids and not reported_worker_mb:
        raise RuntimeError(f"no Ray Train worker was seen during the job at {size} images")
    return {
        "driver_peak_mb": driver_peak_mb,
        "worker_peak_mb": max(workers.peak_mb, reported_worker_mb),
        "images_per_s": training_rate(report, events),
        "wall_s": wall_s,
        "train_workers_seen": len(workers.worker_pids),
        "num_real_per_step": [step["num_real"] for step in report["steps"]],
    }


def markdown_table(sizes: list[int], results: dict[int, dict[str, Any]], image_size: int) -> str:
    """One row per dataset size."""
    lines = ["| training images | image px | driver peak MiB | train worker peak MiB | train images/s | wall s |",
             "|---:|---:|---:|---:|---:|---:|"]
    for size in sizes:
        r = results[size]
        lines.append(f"| {size:,} | {image_size} | {r['driver_peak_mb']:.0f} | {r['worker_peak_mb']:.0f} | "
                     f"{r['images_per_s']:.1f} | {r['wall_s']:.0f} |")
    return "\n".join(lines)


def print_figures(figures: dict[str, Any]) -> None:
    """The settings, the table and the driver's growth of one run's figures."""
    small, large = figures["sizes"]
    results = {size: {key: figures[f"{key}_{size}"] for key in ("driver_peak_mb", "worker_peak_mb", "images_per_s", "wall_s")}
               for size in (small, large)}
    settings = " ".join(figures["settings"])
    print(f"\nshapes at {figures['image_size']} px (--image-size); the same job settings at both sizes: {settings}\n")
    print(markdown_table([small, large], results, figures["image_size"]))
    growth = figures["driver_growth"]
    verdict = "met" if growth < GROWTH_TARGET else "NOT met"
    print(f"\ndriver_growth = driver_peak_mb_{large} / driver_peak_mb_{small} = {growth:.3f} "
          f"(target < {GROWTH_TARGET}: {verdict})")


def parse_sizes(text: str) -> list[int]:
    """'2000,20000' -> [2000, 20000]: two distinct positive sizes, smaller first."""
    sizes = sorted(int(part) for part in text.split(","))
    if len(sizes) != 2 or sizes[0] == sizes[1] or sizes[0] < 1:
        raise argparse.ArgumentTypeError(f"--sizes takes two distinct positive sizes, got {text!r}")
    return sizes


def main(argv: list[str] | None = None) -> int:
    """Run the job at both sizes on one Ray head, print the table and the driver's growth; --json writes them."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=parse_sizes, default=[2000, 20000], help="two training set sizes, e.g. 200,2000")
    parser.add_argument("--image-size", type=int, default=64,
                        help="shapes image side in px (256 px makes 20,000 images too slow on 2 cores)")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds allowed to each driver")
    parser.add_argument("--json", default=None, help="write the figures to this JSON file")
    parser.add_argument("--keep", default=None, help="keep the run directories and the drivers' output in this folder")
    parser.add_argument("--table", default=None, metavar="JSON", help="print the table of an earlier run's JSON; run nothing")
    args = parser.parse_args(argv)
    if args.table:
        print_figures(json.loads(Path(args.table).read_text()))
        return 0

    start = time.perf_counter()
    results: dict[int, dict[str, Any]] = {}
    work_dir = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="hrhf-scale-"))
    work_dir.mkdir(parents=True, exist_ok=True)
    # a terminated benchmark still kills its driver and its cluster on the way out
    previous_handler = signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    head = None
    try:
        head = RayHead().start()
        for size in args.sizes:
            print(f"running the job at {size:,} training images, {args.image_size} px ...", flush=True)
            results[size] = measure(size, args.image_size, head, work_dir, args.timeout)
    finally:
        if head is not None:
            head.stop()
        if not args.keep:
            shutil.rmtree(work_dir, ignore_errors=True)
        signal.signal(signal.SIGTERM, previous_handler)
    small, large = args.sizes
    growth = results[large]["driver_peak_mb"] / results[small]["driver_peak_mb"]
    figures: dict[str, Any] = {"image_size": args.image_size, "sizes": args.sizes}
    for size in args.sizes:
        for key in ("driver_peak_mb", "worker_peak_mb", "images_per_s", "wall_s", "train_workers_seen",
                    "num_real_per_step"):
            figures[f"{key}_{size}"] = results[size][key]
    figures.update(driver_growth=growth, driver_growth_target=GROWTH_TARGET,
                   settings=["--preset", "smoke", *JOB_SETTINGS, *JOB_RESOURCES],
                   seconds=time.perf_counter() - start)

    print_figures(figures)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
