"""Run the fault-injection, bad-input and cluster-security tests and print their outcome as Markdown tables.

    python benchmarks/robustness.py                 # all four tables (about 10 min on 2 cores)
    python benchmarks/robustness.py --json runs/robustness.json

Every row is a test of the suite, run here and now; the table says what passed, nothing is typed by hand.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ElementTree
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# (table, heading of its result column, test node ids). A fault case survives when the job ends with the
# report of an uninterrupted run and every synthesis target exactly once (or, for a fault that must stop
# the work, fails with a clear error, writes nothing wrong, and a rerun completes).
FAULT_CASES = [
    "tests/test_faults.py::test_driver_killed_mid_synthesis_then_resubmitted",
    "tests/test_faults.py::test_driver_killed_mid_training_then_resubmitted",
    "tests/test_faults.py::test_worker_node_lost_and_replaced",
    "tests/test_faults.py::test_damaged_shard_empty_marker_and_lost_checkpoints_heal",
    "tests/test_faults.py::test_corrupt_checkpoint_is_set_aside_and_recomputed",
    "tests/test_faults.py::test_s3_endpoint_lost_mid_run_fails_fast_then_resumes",
    "tests/test_faults.py::test_disk_full_fails_clearly_then_completes_after_space_is_freed",
    "tests/test_ray_synthesis.py::test_dead_actors_are_retried",
    "tests/test_ray_synthesis.py::test_damaged_and_stale_shards_are_recomputed",
    "tests/test_ray_synthesis.py::test_nan_in_inversion_fails_the_step_and_writes_nothing",
    "tests/test_ray_training.py::test_killed_worker_resumes_from_the_last_checkpoint",
    "tests/test_ray_training.py::test_non_finite_loss_in_a_worker_reaches_the_driver_as_such",
    "tests/test_nonfinite_training.py",
]
GROUPS = [
    ("Faults injected", "survived", FAULT_CASES),
    ("One job per run directory", "holds", ["tests/test_lease.py"]),
    ("Bad inputs tried", "refused: clear error, exit code 2, nothing written", [
        "tests/test_bad_inputs.py",
        "tests/test_jobs.py",
        "tests/test_faults.py::test_local_run_dir_on_two_nodes_is_refused",
    ]),
    ("Cluster security", "holds", [
        "tests/test_cluster.py::test_cluster_yaml_validates_against_rays_schema",
        "tests/test_cluster.py::test_a_typo_fails_the_schema",
        "tests/test_cluster.py::test_cluster_yaml_turns_on_token_auth_and_least_privilege",
        "tests/test_ray_job.py::test_a_client_without_the_token_is_refused",
        "tests/test_ray_job.py::test_stopping_a_cluster_leaves_the_others_running",
        "tests/test_probe.py",
    ]),
]


def run_group(node_ids: list[str]) -> list[dict]:
    """Run the tests with pytest; one row per test case: name, outcome, seconds."""
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "junit.xml"
        subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={report}", *node_ids],
                       cwd=ROOT, check=False)
        tree = ElementTree.parse(report)
    rows = []
    for case in tree.iter("testcase"):
        outcome = "passed"
        for tag in ("failure", "error", "skipped"):
            element = case.find(tag)
            if element is not None:
                outcome = {"failure": "FAILED", "error": "ERROR", "skipped": "skipped"}[tag]
                if tag == "skipped":
                    outcome += f" ({element.get('message', '')})"
        module = case.get("classname", "").rsplit(".", 1)[-1]
        rows.append({"test": f"{module}::{case.get('name')}", "outcome": outcome, "seconds": float(case.get("time", 0))})
    return rows


def describe(test: str) -> str:
    """'test_faults::test_driver_killed_mid_training' -> 'driver killed mid training'."""
    name = test.split("::", 1)[1].removeprefix("test_")
    base, _, params = name.partition("[")
    return base.replace("_", " ") + (f" [{params}" if params else "")


def markdown(title: str, column: str, rows: list[dict]) -> str:
    """One table: the case, whether it held, the test that shows it."""
    held = sum(r["outcome"] == "passed" for r in rows)
    lines = [f"**{title}: {len(rows)}, {column}: {held}**", "", f"| case | {column} | test | s |", "|---|---|---|---|"]
    for row in rows:
        mark = "yes" if row["outcome"] == "passed" else row["outcome"]
        lines.append(f"| {describe(row['test'])} | {mark} | `{row['test']}` | {row['seconds']:.0f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run every group and print its table; exit 1 when any case did not hold."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", default=None, help="also write the rows to this file")
    args = parser.parse_args(argv)
    start = time.time()
    results = {title: run_group(ids) for title, _, ids in GROUPS}
    print()
    for title, column, _ in GROUPS:
        print(markdown(title, column, results[title]))
        print()
    print(f"({time.time() - start:.0f} s)")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0 if all(r["outcome"] == "passed" for rows in results.values() for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
