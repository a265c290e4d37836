"""Markdown and self-contained HTML renderings of a run's report and of a sweep's results.

The JSON report is the source of every figure. Optional reference results (other methods run on the
same protocol, e.g. by a benchmark) come as ``{method: [step result, ...]}``, each step result holding
``step`` and ``metrics`` as in ``report["steps"]``; they are passed as ``references`` or stored in
``report["references"]``, and shown as extra rows of the per-step table.
"""

from __future__ import annotations

import base64
import html
import json
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import yaml

from hrhf.inversion import SyntheticData
from hrhf.plots import miou_per_step_png, per_class_iou_png
from hrhf.storage import RunDir

METRICS = ("background", "old", "new", "all")
References = Mapping[str, Sequence[Mapping[str, Any]]]

FIGURE_CAPTIONS = {
    "miou_per_step.png": "mIoU of old, new and all classes (and background) after each step.",
    "per_class_iou.png": "Per-class IoU after each step; grey: class not seen yet.",
}


def _undefined(value: float | None) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def pct(value: float | None) -> str:
    """A [0, 1] fraction as a percentage with one decimal, '-' when undefined."""
    return "-" if _undefined(value) else f"{100 * value:.1f}"


def percent(value: float | None) -> float | None:
    """A [0, 1] fraction as a percentage rounded to one decimal, None when undefined (for JSON)."""
    return None if _undefined(value) else round(100 * value, 1)


def gallery_name(step: int) -> str:
    """File name of the synthetic-image gallery of a step."""
    return f"gallery-step-{step}.png"


def figure_caption(name: str) -> str:
    """The caption of a report figure, from its file name."""
    match = re.fullmatch(r"gallery-step-(\d+)\.png", name)
    if match:
        return (f"Synthetic images of step {match.group(1)}: rows are old classes, columns SAA ratios r; each image "
                "beside the old model's pseudo-label (number: share of pixels labelled as the class).")
    return FIGURE_CAPTIONS.get(name, name)


def title(report: Mapping[str, Any]) -> str:
    """'<dataset> <protocol> (<setting>), method <method>'."""
    task = report["task"]
    return f"{task['dataset']} {task['protocol']} ({'overlapped' if task['overlap'] else 'disjoint'}), method {report['method']}"


def references_of(report: Mapping[str, Any], references: References | None = None) -> dict[str, list[Mapping[str, Any]]]:
    """The reference results to show: ``references`` if given, else the report's own; checked."""
    chosen = references if references is not None else report.get("references") or {}
    checked = {}
    for name, steps in chosen.items():
        if isinstance(steps, Mapping) or not all(isinstance(s, Mapping) and "step" in s and "metrics" in s for s in steps):
            raise ValueError(f"reference {name!r} must be a list of step results with 'step' and 'metrics'")
        missing = [k for s in steps for k in ("old", "new", "all") if k not in s["metrics"]]
        if missing:
            raise ValueError(f"reference {name!r} lacks metrics {sorted(set(missing))}")
        checked[str(name)] = list(steps)
    return checked


def _seconds(step: Mapping[str, Any], key: str) -> str:
    return f"{step[key]:.1f}" if key in step else "-"


def step_rows(report: Mapping[str, Any], references: References | None = None) -> list[list[str]]:
    """Rows of the per-step table: the run's steps, then each reference's, as display strings."""
    rows = []
    for method, steps, is_ref in [(report["method"], report["steps"], False),
                                  *((name, steps, True) for name, steps in references_of(report, references).items())]:
        for step in steps:
            m = step["metrics"]
            rows.append([
                f"{method} (reference)" if is_ref else method, str(step["step"]), ", ".join(step.get("new_classes", [])),
                *(pct(m.get(k)) for k in METRICS),
                str(step.get("num_fake", "-")), _seconds(step, "synthesis_seconds"), _seconds(step, "training_seconds"),
            ])
    return rows


STEP_COLUMNS = ["method", "step", "new classes", "bg", "old", "new", "all", "synthetic images", "synthesis s", "training s"]
SYNTHESIS_COLUMNS = ["step", "synthetic images", "retried", "mean object area", "mean gap to r",
                     "weakest class (area / r)", "synthesis s"]


def synthesis_rows(report: Mapping[str, Any]) -> list[list[str]]:
    """One row per step with synthetic images: count, retried, mean teacher-labelled area, its gap to r, weakest class, seconds."""
    rows = []
    for step in report["steps"]:
        summary = step.get("synthesis")
        if summary:
            weakest = "-"
            if "weakest_class" in summary:  # reports written before it was recorded lack it
                weakest = f"{step['seen_classes'][summary['weakest_class'] - 1]} {summary['weakest_hit_ratio']:.2f}"
            retried = str(summary["retried"]) if "retried" in summary else "-"
            rows.append([str(step["step"]), str(step["num_fake"]), retried, f"{summary['mean_area']:.3f}",
                         f"{summary['area_vs_scale_mae']:.3f}", weakest, f"{step['synthesis_seconds']:.1f}"])
    return rows


def per_class_rows(report: Mapping[str, Any]) -> list[list[str]]:
    """(class, IoU %) after the last step."""
    last = report["steps"][-1]
    return [[name, pct(iou)] for name, iou in zip(["background", *last["seen_classes"]], last["metrics"]["per_class"])]


def _md_table(columns: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    return ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns), *("| " + " | ".join(r) + " |" for r in rows)]


def markdown_report(report: Mapping[str, Any], references: References | None = None, figures: Sequence[str] = ()) -> str:
    """Per-step table of background / old / new / all mIoU (percent), per-class IoU, synthesis; links to ``figures``."""
    if not report["steps"]:
        raise ValueError("the report has no steps")
    lines = [f"# {title(report)}", "", "mIoU in percent on the validation set, classes not yet seen ignored.", ""]
    lines += _md_table(STEP_COLUMNS, step_rows(report, references))
    plots = [f for f in figures if not f.startswith("gallery-")]
    galleries = [f for f in figures if f.startswith("gallery-")]
    lines += [line for f in plots for line in ("", f"![{figure_caption(f)}]({f})")]
    lines += ["", f"Per-class IoU after step {report['steps'][-1]['step']}:", ""]
    lines += _md_table(["class", "IoU"], per_class_rows(report))
    synthesis = synthesis_rows(report)
    if synthesis:
        lines += ["", "Synthesis (area: share of pixels the old model labels as the target class):", ""]
        lines += _md_table(SYNTHESIS_COLUMNS, synthesis)
    lines += [line for f in galleries for line in ("", f"![{figure_caption(f)}]({f})")]
    return "\n".join(lines) + "\n"


CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 0; background: #f6f7f9; color: #1d232b; }
main { max-width: 1100px; margin: 0 auto; padding: 24px 32px 48px; background: #fff; }
h1 { font-size: 1.5em; margin-top: 0; } h2 { font-size: 1.15em; margin-top: 2em; border-bottom: 1px solid #dde; }
p.note { color: #555; }
table { border-collapse: collapse; margin: 8px 0 16px; font-size: 0.92em; }
th, td { border: 1px solid #ccd; padding: 3px 9px; text-align: right; }
th { background: #eef1f6; } td.text, th.text { text-align: left; }
tr.reference td { color: #555; background: #fafafa; font-style: italic; }
figure { margin: 12px 0 20px; } figure img { max-width: 100%; border: 1px solid #dde; }
figcaption { color: #555; font-size: 0.9em; margin-top: 4px; }
pre { background: #f3f4f6; padding: 12px; overflow-x: auto; font-size: 0.85em; }
"""


def _html_table(columns: Sequence[str], rows: Sequence[Sequence[str]], text_columns: Sequence[int] = (0,),
                row_classes: Sequence[str] | None = None) -> str:
    def cell(tag: str, j: int, value: str) -> str:
        klass = ' class="text"' if j in text_columns else ""
        return f"<{tag}{klass}>{html.escape(value)}</{tag}>"

    head = "<tr>" + "".join(cell("th", j, c) for j, c in enumerate(columns)) + "</tr>"
    body = []
    for i, row in enumerate(rows):
        klass = f' class="{row_classes[i]}"' if row_classes and row_classes[i] else ""
        body.append(f"<tr{klass}>" + "".join(cell("td", j, v) for j, v in enumerate(row)) + "</tr>")
    return f"<table>\n<thead>{head}</thead>\n<tbody>\n" + "\n".join(body) + "\n</tbody>\n</table>"


def _html_figure(name: str, png: bytes, caption: str) -> str:
    data = base64.b64encode(png).decode("ascii")
    return (f'<figure id="{html.escape(name)}"><img src="data:image/png;base64,{data}" alt="{html.escape(caption)}">'
            f"<figcaption>{html.escape(caption)}</figcaption></figure>")


def _html_page(page_title: str, body: Sequence[str]) -> str:
    return "\n".join([
        "<!DOCTYPE html>", '<html lang="en">', "<head>", '<meta charset="utf-8">',
        f"<title>{html.escape(page_title)}</title>", f"<style>{CSS}</style>", "</head>", "<body>", "<main>",
        *body, "</main>", "</body>", "</html>",
    ]) + "\n"


def html_report(report: Mapping[str, Any], figures: Mapping[str, bytes] | None = None,
                references: References | None = None) -> str:
    """The report as one self-contained HTML page: tables, and ``figures`` (file name -> PNG) embedded inline."""
    if not report["steps"]:
        raise ValueError("the report has no steps")
    figures = dict(figures or {})
    rows = step_rows(report, references)
    run_rows = len(report["steps"])
    last = report["steps"][-1]["step"]
    body = [
        f"<h1>{html.escape(title(report))}</h1>",
        '<p class="note">mIoU in percent on the validation set; classes not yet seen are ignored.</p>',
        "<h2>mIoU per step</h2>",
        _html_table(STEP_COLUMNS, rows, text_columns=(0, 2),
                    row_classes=["" if i < run_rows else "reference" for i in range(len(rows))]),
    ]
    if "miou_per_step.png" in figures:
        body.append(_html_figure("miou_per_step.png", figures["miou_per_step.png"], figure_caption("miou_per_step.png")))
    body += [f"<h2>Per-class IoU after step {last}</h2>", _html_table(["class", "IoU"], per_class_rows(report))]
    if "per_class_iou.png" in figures:
        body.append(_html_figure("per_class_iou.png", figures["per_class_iou.png"], figure_caption("per_class_iou.png")))
    body.append("<h2>Synthesis</h2>")
    synthesis = synthesis_rows(report)
    if synthesis:
        body += ['<p class="note">Area: share of pixels the old model labels as the target class on the finished '
                 "image; SAA aims at the ratio r.</p>", _html_table(SYNTHESIS_COLUMNS, synthesis, text_columns=())]
    else:
        body.append(f'<p class="note">No synthetic images in this run (method {html.escape(str(report["method"]))}).</p>')
    for name in sorted(n for n in figures if n.startswith("gallery-")):
        body.append(_html_figure(name, figures[name], figure_caption(name)))
    if "config" in report:
        body += ["<h2>Configuration</h2>",
                 f"<details><summary>config.yaml</summary><pre>{html.escape(yaml.safe_dump(report['config'], sort_keys=False))}</pre></details>"]
    return _html_page(title(report), body)


def sweep_cell(column: str, value: Any) -> str:
    """A sweep table cell: mIoU columns in percent, parameters as sampled."""
    if column in ("old", "new", "all") and isinstance(value, float):
        return f"{100 * value:.1f}"
    return str(value)


def sweep_note(objective: str) -> str:
    """The sentence above a sweep's table."""
    return f"Sweep results, best first (mIoU in percent after step 1, objective: {objective})."


def sweep_markdown(rows: Sequence[Mapping[str, Any]], objective: str) -> str:
    """The sweep's table in Markdown, one row per trial."""
    columns = list(rows[0])
    table = _md_table(columns, [[sweep_cell(c, r[c]) for c in columns] for r in rows])
    return sweep_note(objective) + "\n\n" + "\n".join(table) + "\n"


def sweep_html(rows: Sequence[Mapping[str, Any]], objective: str, scatter_png: bytes | None = None) -> str:
    """The sweep's table and scatter plot as one self-contained HTML page."""
    columns = list(rows[0])
    body = ["<h1>Sweep results</h1>", f'<p class="note">{html.escape(sweep_note(objective))}</p>',
            _html_table(columns, [[sweep_cell(c, r[c]) for c in columns] for r in rows], text_columns=(0,))]
    if scatter_png is not None:
        body.append(_html_figure("sweep.png", scatter_png, f"{objective} mIoU against each swept parameter; best trial in red."))
    return _html_page("Sweep results", body)


def write_report(rundir: RunDir, report: dict[str, Any], references: References | None = None) -> list[str]:
    """Write the plots, report.md, report.html and report.json; return the names written.

    Galleries are not redrawn here: each synthesis step wrote its own, and those found in the run
    directory are embedded (a step resumed from a run without one has none). ``references`` (or
    ``report["references"]``) adds other methods' results as reference rows and curves.
    """
    if rundir.uri is None:
        raise ValueError("write_report needs a run directory")
    refs = references_of(report, references)
    figures = {"miou_per_step.png": miou_per_step_png(report, refs), "per_class_iou.png": per_class_iou_png(report)}
    written = list(figures)
    for name, png in figures.items():
        rundir.write_bytes(name, png)
    for step in report["steps"]:
        name = gallery_name(step["step"])
        if step.get("num_fake") and rundir.exists(name):
            figures[name] = rundir.read_bytes(name)
    rundir.write_text("report.md", markdown_report(report, refs, figures=list(figures)))
    rundir.write_text("report.html", html_report(report, figures, refs))
    rundir.write_text("report.json", json.dumps(report, indent=2))  # last: the files it describes are in place first
    return [*written, "report.md", "report.html", "report.json"]


def class_hit_ratios(meta: list[dict]) -> dict[int, float]:
    """Per synthesised class, the mean over its images of (area the old model labels as it) / (the asked ratio r)."""
    ratio = torch.tensor([m["area"] / m["scale"] for m in meta])
    classes = torch.tensor([m["class"] for m in meta])
    return {int(c): float(ratio[classes == c].mean()) for c in classes.unique()}


def synthesis_summary(fake: SyntheticData | None) -> dict[str, float] | None:
    """Mean teacher-labelled object area, its mean absolute gap to the SAA ratio r, the weakest class, images retried.

    A class's hit ratio is the mean over its images of area / r: near 1 where the old model sees
    objects of the asked size, near 0 where the inversion failed to make that class at all.
    """
    if not fake:
        return None
    area = torch.tensor([m["area"] for m in fake.meta])
    scale = torch.tensor([m["scale"] for m in fake.meta])
    hit = class_hit_ratios(fake.meta)
    weakest = min(hit, key=hit.get)
    return {"mean_area": float(area.mean()), "area_vs_scale_mae": float((area - scale).abs().mean()),
            "weakest_class": weakest, "weakest_hit_ratio": hit[weakest],
            "retried": sum(bool(m.get("retried", False)) for m in fake.meta)}
