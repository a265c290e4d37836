"""Report files of a run (HTML, Markdown, PNG plots, galleries), progress output of the job, sweep figures."""

import base64
import io
import json
import math
import shutil
import subprocess
from html.parser import HTMLParser

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import PYTHON, ROOT
from hrhf.inversion import SyntheticSet
from hrhf.plots import gallery_png, gallery_size, sweep_png
from hrhf.progress import Progress, as_progress, format_text
from hrhf.report import html_report, markdown_report, pct, synthesis_rows, synthesis_summary

JOB = str(ROOT / "jobs" / "incremental.py")
REPORT_FIGURES = ["miou_per_step.png", "per_class_iou.png", "gallery-step-1.png", "gallery-step-2.png"]


def run_job(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([PYTHON, JOB, "--preset", "smoke", "--in-process", *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=600)


@pytest.fixture(scope="module")
def job_run(tmp_path_factory):
    """One smoke HRHF run of the job with JSON progress: (run directory, stdout lines)."""
    run_dir = tmp_path_factory.mktemp("report") / "run"
    result = run_job("--run-dir", str(run_dir), "--log-format", "json")
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir, result.stdout.splitlines()


@pytest.fixture(scope="module")
def report(job_run):
    return json.loads((job_run[0] / "report.json").read_text())


class Page(HTMLParser):
    """Table rows (cell texts), image sources and any external references of an HTML page."""

    def __init__(self):
        super().__init__()
        self.rows, self.images, self.external, self._row, self._cell = [], [], [], None, None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "tr":
            self._row = []
        elif tag in ("td", "th"):
            self._cell = ""
        elif tag == "img":
            self.images.append(attrs["src"])
        for key in ("src", "href"):
            if key in attrs and not attrs[key].startswith(("data:", "#")):
                self.external.append(attrs[key])
        if tag in ("link", "script") or (tag == "style" and "src" in attrs):
            self.external.append(tag)

    def handle_data(self, data):
        if self._cell is not None:
            self._cell += data

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._row is not None:
            self._row.append(self._cell.strip())
            self._cell = None
        elif tag == "tr":
            self.rows.append(self._row)
            self._row = None


def parse(html_text: str) -> Page:
    page = Page()
    page.feed(html_text)
    page.close()
    return page


def test_json_progress_lines_parse_and_carry_stage_and_step(job_run, report):
    records = [json.loads(line) for line in job_run[1] if line.strip()]
    assert records and all(isinstance(r, dict) and {"stage", "step", "time", "level"} <= set(r) for r in records)
    stages = {r["stage"] for r in records}
    assert {"synthesis", "training", "evaluation", "report"} <= stages
    epochs = [r for r in records if r["stage"] == "training" and r.get("unit") == "epoch" and r["done"] > 0]
    assert [r["step"] for r in epochs] == [0, 1, 2]
    assert all(r["done"] == r["total"] == 1 and "loss" in r and r["eta_s"] == 0 for r in epochs)
    synthesis = [r for r in records if r["stage"] == "synthesis" and r.get("done", 0) > 0]  # not its warnings
    # kept images: step 1 inverts the six base classes, step 2 only the two classes step 1 learnt (2 scales each)
    assert [(r["step"], r["done"], r["total"]) for r in synthesis] == [(1, 12, 12), (2, 4, 4)]
    assert [s["num_fake"] for s in report["steps"]] == [0, 12, 16]
    scores = [r for r in records if r["stage"] == "evaluation" and r.get("message") == "mIoU (%)"]
    assert [r["all"] for r in scores] == [round(100 * s["metrics"]["all"], 1) for s in report["steps"]]
    assert records[-1]["stage"] == "report" and records[-1]["report"]["steps"] == report["steps"]


def test_report_files_are_written(job_run):
    run_dir = job_run[0]
    for name in ["report.json", "report.md", "report.html", *REPORT_FIGURES]:
        assert (run_dir / name).stat().st_size > 0, name
    assert not (run_dir / "gallery-step-0.png").exists()  # step 0 synthesises nothing


def test_pngs_decode_with_the_expected_sizes(job_run, report):
    run_dir = job_run[0]
    for name in REPORT_FIGURES:
        with Image.open(run_dir / name) as image:
            image.verify()
    # Rows: the old classes of the step (6, then 8); columns: the smoke preset's two SAA scales.
    scales, size = report["config"]["inversion"]["scales"], report["config"]["data"]["image_size"]
    for step, rows in ((1, 6), (2, 8)):
        with Image.open(run_dir / f"gallery-step-{step}.png") as image:
            assert image.size == gallery_size(rows, len(scales), size)
            assert np.asarray(image.convert("RGB")).std() > 10
    with Image.open(run_dir / "miou_per_step.png") as image:
        assert image.size == (820, 420)


def test_html_is_self_contained_and_holds_the_report_figures(job_run, report):
    run_dir = job_run[0]
    page = parse((run_dir / "report.html").read_text())
    assert page.external == []
    for step in report["steps"]:
        m = step["metrics"]
        row = next(r for r in page.rows if r[:2] == ["hrhf", str(step["step"])])
        assert row[3:7] == [pct(m["background"]), pct(m["old"]), pct(m["new"]), pct(m["all"])]
    last = report["steps"][-1]
    for name, iou in zip(["background", *last["seen_classes"]], last["metrics"]["per_class"]):
        assert [name, pct(iou)] in page.rows
    assert len(page.images) == len(REPORT_FIGURES)
    embedded = [base64.b64decode(src.removeprefix("data:image/png;base64,")) for src in page.images]
    assert sorted(embedded) == sorted((run_dir / name).read_bytes() for name in REPORT_FIGURES)


def test_markdown_links_the_figures(job_run, report):
    text = (job_run[0] / "report.md").read_text()
    assert all(f"]({name})" in text for name in REPORT_FIGURES)
    assert f"| hrhf | 2 | crescent, bar | {pct(report['steps'][-1]['metrics']['background'])} |" in text


def test_quiet_rerun_prints_only_the_report_and_keeps_the_galleries(job_run, report):
    run_dir = job_run[0]
    galleries = {name: (run_dir / name).stat().st_mtime_ns for name in REPORT_FIGURES if name.startswith("gallery")}
    result = run_job("--run-dir", str(run_dir), "--quiet")
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout == markdown_report(report)  # the final report, no progress lines
    assert {name: (run_dir / name).stat().st_mtime_ns for name in galleries} == galleries
    page = parse((run_dir / "report.html").read_text())
    assert len(page.images) == len(REPORT_FIGURES)  # resumed steps keep their galleries in the report


def test_report_html_renders_in_headless_chromium(job_run, tmp_path):
    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.skip("chromium is not installed (Debian: apt-get install chromium); CI installs it")
    shot = tmp_path / "shot.png"
    command = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
               "--disable-background-networking", "--disable-component-update", "--disable-sync",
               f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={shot}", "--window-size=1200,1600",
               (job_run[0] / "report.html").as_uri()]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and shot.exists(), result.stderr[-3000:]
    with Image.open(shot) as image:
        pixels = np.asarray(image.convert("RGB"))
    assert pixels.shape[:2] == (1600, 1200)
    assert pixels.std() > 20 and len(np.unique(pixels.reshape(-1, 3), axis=0)) > 200


def test_progress_text_eta_and_quiet():
    lines, now = [], [0.0]
    progress = Progress("text", write=lines.append, clock=lambda: now[0])
    progress.event("training", 1, done=0, total=10, unit="epoch")
    now[0] = 4.0
    record = progress.event("training", 1, done=2, total=10, unit="epoch", loss=0.123456)
    assert record["eta_s"] == 16.0 and record["elapsed_s"] == 4.0
    assert lines[-1] == "[step 1] training epoch 2/10 loss=0.1235 eta 16s"
    assert "eta_s" not in progress.event("training", 1, done=3, total=10, unit="epoch", estimate=False)
    progress("plain message")
    assert lines[-1] == "run plain message"
    quiet = Progress("json", quiet=True, write=lines.append)
    before = len(lines)
    quiet.event("synthesis", 2, done=1, total=4, unit="shards")
    quiet.event("synthesis", 2, "shard lost", level="warning")
    assert len(lines) == before
    quiet.event("run", None, "broken", level="error", value=math.nan)
    assert json.loads(lines[-1]) | {"time": 0} == {"time": 0, "level": "error", "stage": "run", "step": None,
                                                   "message": "broken", "value": None}
    assert as_progress(progress) is progress
    assert format_text({"stage": "evaluation", "step": 0, "old": None, "all": 13.3}) == "[step 0] evaluation old=- all=13.3"
    with pytest.raises(ValueError, match="log format"):
        Progress("xml")


def test_reference_rows_in_the_html_and_markdown(report):
    mib = [{"step": s["step"], "metrics": {**s["metrics"], "all": 0.4242}} for s in report["steps"]]
    page = parse(html_report(report, references={"mib": mib}))
    rows = [r for r in page.rows if r[0] == "mib (reference)"]
    assert [r[1] for r in rows] == ["0", "1", "2"] and all(r[6] == "42.4" for r in rows)
    assert "| mib (reference) | 2 |" in markdown_report({**report, "references": {"mib": mib}})
    with pytest.raises(ValueError, match="reference 'mib'"):
        html_report(report, references={"mib": [{"metrics": {}}]})


def synthetic_set(classes=(1, 2, 3), scales=(0.1, 0.5), seeds=2, size=16) -> SyntheticSet:
    meta = [{"class": c, "scale": r, "seed": s, "loss": 0.0, "area": r} for s in range(seeds) for r in scales for c in classes]
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (len(meta), 3, size, size), dtype=torch.uint8, generator=generator)
    masks = torch.stack([torch.full((size, size), m["class"], dtype=torch.uint8) for m in meta])
    masks[:, 0, 0] = 255
    return SyntheticSet(images, masks, meta)


def test_synthesis_summary_names_the_class_the_inversion_failed():
    # class 1: objects of the asked size; class 2: a tenth of it at r = 0.4, nothing at r = 0.2
    meta = [{"class": 1, "scale": 0.2, "area": 0.2}, {"class": 1, "scale": 0.4, "area": 0.4},
            {"class": 2, "scale": 0.2, "area": 0.0, "retried": True}, {"class": 2, "scale": 0.4, "area": 0.04, "retried": True}]
    fake = SyntheticSet(torch.zeros(4, 3, 2, 2, dtype=torch.uint8), torch.zeros(4, 2, 2, dtype=torch.uint8), meta)
    summary = synthesis_summary(fake)
    assert summary["weakest_class"] == 2 and math.isclose(summary["weakest_hit_ratio"], 0.05, rel_tol=1e-6)
    assert summary["retried"] == 2
    assert math.isclose(summary["mean_area"], 0.16, rel_tol=1e-6)
    assert math.isclose(summary["area_vs_scale_mae"], 0.14, rel_tol=1e-6)
    step = {"step": 1, "num_fake": 4, "synthesis": summary, "synthesis_seconds": 1.0, "seen_classes": ["disc", "ring"]}
    assert synthesis_rows({"steps": [step]}) == [["1", "4", "2", "0.160", "0.140", "ring 0.05", "1.0"]]


def test_gallery_layout_and_bad_palettes():
    synthetic = synthetic_set()
    labels, colors = ["background", "a", "b", "c"], [(0, 0, 0), (255, 0, 0), (0, 255, 0), (0, 0, 255)]
    with Image.open(io.BytesIO(gallery_png(synthetic, labels, colors))) as image:
        assert image.size == gallery_size(3, 2, 16)
        pixels = np.asarray(image.convert("RGB"))
    assert ((pixels == (0, 0, 255)).all(-1)).sum() > 100  # class 3's mask in its palette colour
    with pytest.raises(ValueError, match="class 3 .* no label or colour"):
        gallery_png(synthetic, labels, colors[:3])
    synthetic.masks[0, 1, 1] = 7
    with pytest.raises(ValueError, match=r"mask labels \[7\] have no colour"):
        gallery_png(synthetic, labels, colors)
    with pytest.raises(ValueError, match="no synthetic images"):
        gallery_png(SyntheticSet.concat([]), labels, colors)


def test_sweep_scatter_has_a_panel_per_parameter():
    rows = [{"trial": f"t{i}", "w_fake": 0.3 * (i + 1), "scales": [[0.1, 0.3], [0.2, 0.4]][i % 2], "all": 0.5 + 0.05 * i}
            for i in range(4)] + [{"trial": "t4", "w_fake": 1.0, "scales": [0.1, 0.3], "all": None}]
    with Image.open(io.BytesIO(sweep_png(rows, ["w_fake", "scales"]))) as image:
        assert image.size == (640, 320)
    with pytest.raises(ValueError, match="no swept parameters"):
        sweep_png(rows, [])

