"""benchmarks/quality.py: its summaries, its job queue and which runs it shares."""

import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import quality  # noqa: E402
from hrhf.config import load_config  # noqa: E402


def _report(seed: int, old: float) -> dict:
    return {"config": {"seed": seed}, "steps": [{"metrics": {"old": 0.9}}, {"metrics": {"old": old}}]}


def test_per_seed_gains_pair_each_seed_with_its_own_mib_run():
    results = {"5-1": {"hrhf": [_report(1, 0.80), _report(0, 0.60)],  # finished in another order than MiB
                       "mib": [_report(0, 0.10), _report(1, 0.20)]}}
    line = quality.per_seed_gains(results)
    assert "seed 0 +50.0, seed 1 +60.0" in line
    assert "mean +55.0" in line and "minimum +50.0" in line
    assert quality.per_seed_gains({"6-1": {"hrhf": [_report(0, 0.5)]}}) == ""


def _steps_report(seed: int, new: list[float]) -> dict:
    steps = [{"step": i, "metrics": {"new": value}} for i, value in enumerate(new)]
    return {"config": {"seed": seed}, "steps": steps}


def test_new_class_floor_finds_the_weakest_incremental_step_of_any_seed():
    # step 0's new classes are the base classes: never the floor, even when lower
    results = {"5-1": {"hrhf": [_steps_report(0, [0.1, 0.8, 0.55, 0.7]), _steps_report(1, [0.9, 0.6, 0.9, 0.8])],
                       "mib": [_steps_report(0, [0.1, 0.0, 0.0, 0.0])]}}
    line = quality.new_class_floor(results)
    assert "lowest over steps and seeds = 55.0 (seed 0, step 2" in line
    assert "std over seeds after the last step = 7.1" in line
    assert quality.new_class_floor({"6-1": {"mib": [_steps_report(0, [0.5, 0.5])]}}) == ""


def test_step0_model_is_compared_with_joint_on_the_base_classes_only():
    step0 = {"step": 0, "metrics": {"new": 0.90, "per_class": [0.99, 0.9, 0.9]}}  # background and 2 base classes
    mib = {"config": {"seed": 0}, "steps": [step0, {"step": 1, "metrics": {"new": 0.1}}]}
    joint = {"config": {"seed": 0}, "steps": [{"step": 1, "metrics": {"per_class": [0.99, 0.8, 1.0, 0.1]}}]}
    line = quality.base_against_joint({"2-1": {"mib": [mib], "joint": [joint]}})
    assert "base classes = 90.0, joint training on them = 90.0 (1.00 of joint" in line  # class 3 left out
    assert quality.base_against_joint({"2-1": {"joint": [joint]}}) == ""


def test_step0_cache_is_shared_by_protocols_and_methods_but_not_by_other_data():
    import argparse

    args = argparse.Namespace(overrides=[], class_order=None, preset="smoke", cache_dir="cache")

    def base(method, protocol, extra=()):
        return quality.base_dir(args, quality.make_config(args, method, protocol, 0, list(extra)))

    assert base("ft", "6-2-2") == base("hrhf", "6-1") == base("mib", "6-2-2", ["train.epochs_step=3"])
    assert base("ft", "6-2-2") != base("ft", "5-1")  # other base classes
    assert base("ft", "6-2-2") != base("ft", "6-2-2", ["data.shapes_version=1"])
    assert base("ft", "6-2-2") != base("ft", "6-2-2", ["train.epochs_base=3"])
    assert base("ft", "6-2-2") != base("ft", "6-2-2", ["model.width=4"])
    assert base("ft", "6-2-2") != base("ft", "6-2-2", ["train.bf16=false"])


def test_runs_share_the_step_split_cache_beside_the_step0_models_unless_told_otherwise():
    import argparse

    args = argparse.Namespace(overrides=[], class_order=None, preset="smoke", cache_dir="cache")
    configs = [quality.make_config(args, method, protocol, seed) for method, protocol, seed in
               [("ft", "6-2-2", 0), ("hrhf", "5-1", 1), ("joint", "6-1", 2)]]
    assert {cfg.data.cache_dir for cfg in configs} == {str(Path("cache") / "splits")}
    args.overrides = ["data.cache_dir=elsewhere"]
    assert quality.make_config(args, "mib", "6-1", 0).data.cache_dir == "elsewhere"


def test_the_benchmark_trains_in_bfloat16_unless_told_otherwise():
    import argparse

    args = argparse.Namespace(overrides=[], class_order=None, preset="default", cache_dir="cache")
    assert quality.make_config(args, "hrhf", "6-1", 0).train.bf16
    assert not load_config("default").train.bf16  # the job's own default stays float32
    args.overrides = ["train.bf16=false"]
    assert not quality.make_config(args, "hrhf", "6-1", 0).train.bf16


def _fake_result(job):
    """What run_jobs gives back for a job: its last step's per-class IoU 0.0, 0.1, 0.2, ... by model index."""
    kind, cfg, _ = job
    per_class = [i / 10 for i in range(len(quality.task_of(cfg).order) + 1)]
    return kind, cfg, {"config": {"seed": cfg.seed}, "steps": [{"step": -1, "metrics": {"per_class": per_class}}]}


@pytest.fixture
def recorded_jobs(monkeypatch) -> list:
    """The jobs quality.quality() hands to run_jobs, which gives back _fake_result for each; no step-0 job."""
    jobs = []
    monkeypatch.setattr(quality, "missing_bases", lambda args: [])
    monkeypatch.setattr(quality, "run_jobs", lambda todo, workers: jobs.extend(todo) or [_fake_result(j) for j in todo])
    return jobs


def test_runs_dir_gives_every_run_a_folder_of_its_own(recorded_jobs, tmp_path):
    import argparse

    jobs = recorded_jobs
    args = argparse.Namespace(overrides=[], class_order=None, preset="smoke", cache_dir=str(tmp_path / "cache"),
                              methods="hrhf,joint", seeds=[0, 1], protocols=["6-2-2"], jobs=1,
                              runs_dir=str(tmp_path / "runs"))
    quality.quality(args)
    folders = [options["run_dir"] for _, _, options in jobs]
    assert sorted(Path(f).name for f in folders) == ["hrhf-6-2-2-s0", "hrhf-6-2-2-s1", "joint-6-2-2-s0", "joint-6-2-2-s1"]
    assert all(Path(f).parent == tmp_path / "runs" for f in folders)
    args.runs_dir = None
    jobs.clear()
    quality.quality(args)
    assert not any("run_dir" in options for _, _, options in jobs)


def test_one_joint_run_per_seed_serves_every_protocol_ending_on_its_classes(recorded_jobs, tmp_path):
    import argparse

    jobs = recorded_jobs
    args = argparse.Namespace(overrides=[], class_order=None, preset="smoke", cache_dir=str(tmp_path), runs_dir=None,
                              methods="ft,joint", seeds=[0, 1], protocols=["5-1", "6-2-2", "6-1"], jobs=1)
    results = quality.quality(args)
    joint_jobs = [cfg for _, cfg, _ in jobs if cfg.method.joint]
    assert sorted(cfg.seed for cfg in joint_jobs) == [0, 1]  # not one per protocol
    assert sum(not cfg.method.joint for _, cfg, _ in jobs) == 6
    for protocol, last, old, new in (("5-1", 5, range(1, 10), [10]), ("6-2-2", 2, range(1, 9), [9, 10]),
                                     ("6-1", 4, range(1, 10), [10])):
        rows = results[protocol]["joint"]
        assert [r["config"]["seed"] for r in rows] == [0, 1]
        for row in rows:
            (step,) = row["steps"]
            assert step["step"] == last
            assert step["metrics"]["old"] == pytest.approx(sum(old) / 10 / len(old))
            assert step["metrics"]["new"] == pytest.approx(sum(new) / 10 / len(new))
    assert [r["config"]["seed"] for r in results["6-1"]["ft"]] == [0, 1]


def _timed_work(job):
    kind, cfg, options = job
    metrics = {"old": 0.5, "new": 0.5, "all": 0.5}
    return kind, cfg, {"steps": [{"metrics": metrics}], "wall_seconds": 0.0, "started": time.monotonic_ns()}


def test_runs_wait_for_their_step0_model_and_the_longest_ready_run_goes_first(tmp_path):
    import argparse

    args = argparse.Namespace(overrides=[], class_order=None, preset="smoke", cache_dir=str(tmp_path))
    base_a = quality.base_dir(args, quality.make_config(args, "ft", "6-1", 0))
    base_b = quality.base_dir(args, quality.make_config(args, "ft", "6-1", 1))

    def run(method, seed, base):
        return ("run", quality.make_config(args, method, "6-1", seed, [f"train.init_checkpoint={base}/step-0.pt"]), {})

    jobs = [
        run("ft", 0, base_a),
        ("run", quality.make_config(args, "joint", "6-1", 0), {}),
        run("hrhf", 1, base_b),
        ("base", quality.make_config(args, "ft", "6-1", 0), {"run_dir": base_a}),
        run("mib", 0, base_a),
        ("base", quality.make_config(args, "ft", "6-1", 1), {"run_dir": base_b}),
    ]
    results = quality.run_jobs(jobs, 1, work=_timed_work)
    assert [r[1] for r in results] == [job[1] for job in jobs]  # returned in job order
    order = sorted(range(len(jobs)), key=lambda i: results[i][2]["started"])
    # both step-0 models first, then the runs, longest expected first
    assert order[:2] == [3, 5]
    assert order[2:] == sorted([0, 1, 2, 4], key=lambda i: -quality.expected_cost(jobs[i]))
    assert quality.expected_cost(jobs[2]) > quality.expected_cost(jobs[4]) > quality.expected_cost(jobs[0])


def test_a_run_on_a_cached_step0_model_needs_no_base_job(tmp_path):
    import argparse

    args = argparse.Namespace(overrides=[], class_order=None, preset="smoke", cache_dir=str(tmp_path))
    base = quality.base_dir(args, quality.make_config(args, "ft", "6-1", 0))
    cfg = quality.make_config(args, "ft", "6-1", 0, [f"train.init_checkpoint={base}/step-0.pt"])
    assert len(quality.run_jobs([("run", cfg, {})], 1, work=_timed_work)) == 1
