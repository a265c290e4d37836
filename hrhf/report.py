"""Markdown rendering of a run's report (the JSON report is the source of every figure)."""

from __future__ import annotations

import math
from typing import Any


def pct(value: float | None) -> str:
    """A [0, 1] fraction as a percentage with one decimal, '-' when undefined."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{100 * value:.1f}"


def markdown_report(report: dict[str, Any]) -> str:
    """Per-step table of background / old / new / all mIoU (percent) and per-class IoU."""
    task = report["task"]
    lines = [
        f"# {task['dataset']} {task['protocol']} ({'overlapped' if task['overlap'] else 'disjoint'}), method {report['method']}",
        "",
        "mIoU in percent on the validation set, classes not yet seen ignored.",
        "",
        "| step | new classes | bg | old | new | all | synthetic images | synthesis s | training s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for step in report["steps"]:
        m = step["metrics"]
        lines.append(
            f"| {step['step']} | {', '.join(step['new_classes'])} | {pct(m['background'])} | {pct(m['old'])} | "
            f"{pct(m['new'])} | {pct(m['all'])} | {step['num_fake']} | {step['synthesis_seconds']:.1f} | "
            f"{step['training_seconds']:.1f} |"
        )
    last = report["steps"][-1]
    names = ["background", *last["seen_classes"]]
    lines += ["", f"Per-class IoU after step {last['step']}:", "", "| class | IoU |", "|---|---|"]
    lines += [f"| {name} | {pct(iou)} |" for name, iou in zip(names, last["metrics"]["per_class"])]
    return "\n".join(lines) + "\n"
