"""benchmarks/quality.py's summaries: the per-seed gain of HRHF over MiB."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import quality  # noqa: E402


def _report(seed: int, old: float) -> dict:
    return {"config": {"seed": seed}, "steps": [{"metrics": {"old": 0.9}}, {"metrics": {"old": old}}]}


def test_per_seed_gains_pair_each_seed_with_its_own_mib_run():
    results = {"5-1": {"hrhf": [_report(1, 0.80), _report(0, 0.60)],  # finished in another order than MiB
                       "mib": [_report(0, 0.10), _report(1, 0.20)]}}
    line = quality.per_seed_gains(results)
    assert "seed 0 +50.0, seed 1 +60.0" in line
    assert "mean +55.0" in line and "minimum +50.0" in line
    assert quality.per_seed_gains({"6-1": {"hrhf": [_report(0, 0.5)]}}) == ""
