"""`jobs/incremental.py --reference`: other methods in the same job, from the run's own step-0 model."""

import contextlib
import importlib.util
import io
import json
import shutil

import pytest
import yaml

from conftest import ROOT
from hrhf import pipeline

spec = importlib.util.spec_from_file_location("incremental_job", ROOT / "jobs" / "incremental.py")
job = importlib.util.module_from_spec(spec)
spec.loader.exec_module(job)

TINY = ["--preset", "smoke", "--in-process", "--quiet", "--method", "mib",
        "--set", "data.train_size=48", "--set", "data.val_size=16", "--set", "data.image_size=32"]
REFERENCES = ["--reference", "ft", "--reference", "joint"]


class CountingFit:
    """Stands in for hrhf.pipeline.fit: trains as it does and records (method, step) of every call."""

    def __init__(self, fit):
        self.fit = fit
        self.calls: list[tuple[str, int]] = []

    def __call__(self, student, teacher, real, fake, plan, **kwargs):
        self.calls.append((plan.method.name, plan.step))
        return self.fit(student, teacher, real, fake, plan, **kwargs)


def run_job(run_dir, *args: str) -> tuple[int, str, list[tuple[str, int]]]:
    """Run the job in this process; return its exit code, its stdout and the (method, step) trainings it did."""
    counting = CountingFit(pipeline.fit)
    out = io.StringIO()
    with pytest.MonkeyPatch.context() as patch, contextlib.redirect_stdout(out):
        patch.setattr(pipeline, "fit", counting)
        code = job.main([*TINY, "--run-dir", str(run_dir), *args])
    return code, out.getvalue(), counting.calls


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished run of MiB with FT and joint as references: (run directory, stdout, trainings)."""
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    code, out, calls = run_job(run_dir, *REFERENCES)
    assert code == 0, out
    return run_dir, out, calls


def test_report_holds_the_references(finished):
    run_dir, out, _ = finished
    report = json.loads((run_dir / "report.json").read_text())
    assert report["method"] == "mib"
    assert list(report["references"]) == ["ft", "joint"]
    assert [s["step"] for s in report["references"]["ft"]] == [0, 1, 2]
    assert [s["step"] for s in report["references"]["joint"]] == [2]  # joint: the last step only, from scratch
    for text in (out, (run_dir / "report.md").read_text()):  # the printed table and report.md
        assert "| ft (reference) | 1 |" in text and "| joint (reference) | 2 |" in text
    assert "joint (reference)" in (run_dir / "report.html").read_text()
    ref_config = yaml.safe_load((run_dir / "references" / "ft" / "config.yaml").read_text())
    assert ref_config["method"]["name"] == "ft" and ref_config["data"] == report["config"]["data"]


def test_references_start_from_the_runs_step0_model(finished):
    run_dir, _, calls = finished
    assert calls == [("mib", 0), ("mib", 1), ("mib", 2), ("ft", 1), ("ft", 2), ("joint", 2)]
    assert (run_dir / "references" / "ft" / "step-0.pt").read_bytes() == (run_dir / "step-0.pt").read_bytes()
    report = json.loads((run_dir / "report.json").read_text())
    assert report["references"]["ft"][0]["metrics"] == report["steps"][0]["metrics"]
    assert not (run_dir / "references" / "joint" / "step-0.pt").exists()


def test_rerun_recomputes_nothing(finished, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(finished[0], run_dir)
    before = {p: p.stat().st_mtime_ns for p in run_dir.rglob("step-*.pt")}
    code, out, calls = run_job(run_dir, "--reference", "ft,joint")
    assert code == 0, out
    assert calls == []
    assert {p: p.stat().st_mtime_ns for p in run_dir.rglob("step-*.pt")} == before
    assert list(json.loads((run_dir / "report.json").read_text())["references"]) == ["ft", "joint"]


def test_reference_from_another_step0_model_starts_over(finished, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(finished[0], run_dir)
    ref = run_dir / "references" / "ft"
    (ref / "step-0.pt").write_bytes((run_dir / "step-1.pt").read_bytes())  # as if the run's step 0 was retrained
    counting = CountingFit(pipeline.fit)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(pipeline, "fit", counting)
        steps = pipeline.run_reference(job.config_from_args(job.build_parser().parse_args(TINY)), "ft", str(run_dir),
                                       log=lambda _: None)
    assert counting.calls == [("ft", 1), ("ft", 2)]
    assert (ref / "step-0.pt").read_bytes() == (run_dir / "step-0.pt").read_bytes()
    assert [s["step"] for s in steps] == [0, 1, 2]


def test_reference_folder_of_another_config_is_refused(finished, tmp_path, capsys):
    run_dir = tmp_path / "run"
    shutil.copytree(finished[0], run_dir)
    config = run_dir / "references" / "ft" / "config.yaml"
    config.write_text(config.read_text().replace("kd_real: none", "kd_real: plain"))
    code = job.main([*TINY, "--run-dir", str(run_dir), "--reference", "ft"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and "method.kd_real" in err, err
