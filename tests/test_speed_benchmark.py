"""benchmarks/speed.py runs end to end on a tiny workload and writes every figure it prints (no timing asserted)."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_speed_script_quick_inversion_section_and_comparison(tmp_path):
    out = tmp_path / "speed.json"
    script = str(ROOT / "benchmarks" / "speed.py")
    run = subprocess.run([sys.executable, script, "--only", "inversion", "--quick", "--repeats", "1", "--json", str(out)],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    figures = json.loads(out.read_text())
    for tag in ("small_64", "mnv3_64", "mnv3_128"):
        assert figures[f"{tag}_inversion_vs_bare"] > 0 and figures[f"{tag}_bare_flops_share"] > 0
        assert f"| {tag}_inversion_vs_bare |" in run.stdout
    compare = subprocess.run([sys.executable, script, "--compare", str(out), str(out)], capture_output=True, text=True,
                             timeout=120)
    assert compare.returncode == 0, compare.stderr[-3000:]
    assert "| small_64_inversion_vs_bare |" in compare.stdout and ">= 0.85" in compare.stdout


def test_distillation_benchmark_trains_every_student_weight():
    """The step the distill section times must compute every weight gradient, as the pipeline's student does."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import speed

    job = speed.step_job(speed.step_config(quick=True))
    assert all(p.requires_grad for p in job.student.parameters())
    assert not any(p.requires_grad for p in job.teacher.parameters())
