"""benchmarks/parity.py on the smoke preset: the same figures in process and on Ray with 1 and 2 workers."""

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_smoke_config_gives_the_same_miou_in_process_and_on_one_or_two_ray_workers(tmp_path):
    spec = importlib.util.spec_from_file_location("parity", ROOT / "benchmarks" / "parity.py")
    parity = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(parity)
    out = tmp_path / "parity.json"
    assert parity.main(["--preset", "smoke", "--json", str(out)]) == 0
    figures = json.loads(out.read_text())
    # one worker runs the in-process loop on the same batches: equal up to float summation order
    for ours, theirs in zip(figures["per_step"]["in_process"], figures["per_step"]["ray_1"]):
        assert abs(ours - theirs) < 0.005
    assert figures["spread"] <= 1.0
    assert set(figures) >= {"in_process", "ray_1", "ray_2", "spread"}


def test_thread_sweep_runs_in_process_once_per_thread_count(tmp_path):
    spec = importlib.util.spec_from_file_location("parity", ROOT / "benchmarks" / "parity.py")
    parity = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(parity)
    out = tmp_path / "threads.json"
    assert parity.main(["--preset", "smoke", "--threads", "1,2", "--json", str(out)]) == 0
    figures = json.loads(out.read_text())
    assert set(figures) == {"1", "2"} and all(len(per_step) == 3 for per_step in figures.values())
