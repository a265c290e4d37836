"""Figures of a run as PNG bytes: mIoU per step, per-class IoU, the synthetic-image gallery, sweep scatters.

Pure functions of the report dict, a SyntheticSet or sweep rows. Figures are drawn on matplotlib's Agg
canvas directly (no pyplot, no global backend state), so they work headless and in any thread.
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from hrhf.inversion import SyntheticSet

DPI = 100
SERIES = (("old", "#1f77b4"), ("new", "#d62728"), ("all", "#2ca02c"), ("background", "#7f7f7f"))
REFERENCE_COLORS = ("#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#bcbd22", "#17becf")  # none of SERIES' colours

# Gallery layout in pixels.
LABEL_WIDTH = 120
HEADER_HEIGHT = 64
PANEL_GAP = 4  # between an image and its mask
COLUMN_GAP = 14
ROW_GAP = 6
MARGIN = 8
IGNORE_COLOR = (255, 255, 255)


def _figure(width_px: int, height_px: int) -> Figure:
    # Half a pixel of slack: Agg truncates width * dpi to an int, and W / DPI * DPI can land just below W.
    fig = Figure(figsize=((width_px + 0.5) / DPI, (height_px + 0.5) / DPI), dpi=DPI)
    FigureCanvasAgg(fig)
    return fig


def _png(fig: Figure) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI)
    return buffer.getvalue()


def _value(x: Any) -> float:
    """A metric as a float, NaN when missing or undefined."""
    return float("nan") if x is None else float(x)


def miou_per_step_png(report: Mapping[str, Any], references: Mapping[str, Sequence[Mapping[str, Any]]] | None = None) -> bytes:
    """Old / new / all / background mIoU (percent) against the step; references' 'all' as dashed lines."""
    steps = report["steps"]
    if not steps:
        raise ValueError("the report has no steps to plot")
    fig = _figure(820, 420)
    ax = fig.add_subplot()
    x = [s["step"] for s in steps]
    for key, color in SERIES:
        y = [100 * _value(s["metrics"].get(key)) for s in steps]
        style = {"linestyle": ":", "linewidth": 1.2} if key == "background" else {"linewidth": 2}
        ax.plot(x, y, marker="o", color=color, label=f"{report['method']} {key}", **style)
    for i, (name, ref_steps) in enumerate((references or {}).items()):
        xs = [s["step"] for s in ref_steps]
        ax.plot(xs, [100 * _value(s["metrics"].get("all")) for s in ref_steps], marker="s", markersize=4,
                linestyle="--", linewidth=1.2, color=REFERENCE_COLORS[i % len(REFERENCE_COLORS)],
                label=f"{name} all (reference)")
    ax.set_xticks(sorted(set(x) | {s["step"] for r in (references or {}).values() for s in r}))
    ax.set_xlabel("step")
    ax.set_ylabel("mIoU (%)")
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    ax.set_title("mIoU after each step (validation, unseen classes ignored)")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    return _png(fig)


def per_class_matrix(report: Mapping[str, Any]) -> tuple[list[str], list[int], np.ndarray]:
    """(class names incl. background, steps, IoU matrix classes x steps with NaN where a class was not seen)."""
    steps = report["steps"]
    if not steps:
        raise ValueError("the report has no steps to plot")
    names = ["background", *steps[-1]["seen_classes"]]
    row = {name: i for i, name in enumerate(names)}
    matrix = np.full((len(names), len(steps)), np.nan)
    for j, step in enumerate(steps):
        for name, iou in zip(["background", *step["seen_classes"]], step["metrics"]["per_class"]):
            if name in row:
                matrix[row[name], j] = _value(iou)
    return names, [s["step"] for s in steps], matrix


def per_class_iou_png(report: Mapping[str, Any]) -> bytes:
    """Heatmap of per-class IoU (percent) after each step, classes on the vertical axis."""
    names, steps, matrix = per_class_matrix(report)
    height = 110 + 22 * len(names)
    width = 260 + 70 * len(steps)
    fig = _figure(width, height)
    ax = fig.add_subplot()
    cmap = colormaps["viridis"].with_extremes(bad="#dddddd")  # grey: class not seen yet
    image = ax.imshow(100 * np.ma.masked_invalid(matrix), cmap=cmap, vmin=0, vmax=100, aspect="auto")
    ax.set_xticks(range(len(steps)), [str(s) for s in steps])
    ax.set_yticks(range(len(names)), names)
    ax.set_xlabel("after step")
    ax.set_title("per-class IoU (%)", fontsize=10)
    if len(names) <= 60:
        for i in range(len(names)):
            for j in range(len(steps)):
                if not math.isnan(matrix[i, j]):
                    value = 100 * matrix[i, j]
                    ax.text(j, i, f"{value:.0f}", ha="center", va="center", fontsize=7,
                            color="white" if value < 60 else "black")
    fig.colorbar(image, ax=ax, fraction=0.08, pad=0.04)
    fig.tight_layout()
    return _png(fig)


def cell_size(image_size: int) -> int:
    """Side in pixels of one gallery panel: small images enlarged by an integer factor, large ones shown at 128."""
    if image_size < 1:
        raise ValueError(f"image size must be positive, got {image_size}")
    return image_size * max(1, 128 // image_size) if image_size <= 128 else 128


def gallery_size(n_rows: int, n_cols: int, image_size: int) -> tuple[int, int]:
    """(width, height) in pixels of a gallery with ``n_rows`` classes and ``n_cols`` scales."""
    cell = cell_size(image_size)
    width = LABEL_WIDTH + n_cols * (2 * cell + PANEL_GAP) + (n_cols - 1) * COLUMN_GAP + MARGIN
    height = HEADER_HEIGHT + n_rows * cell + (n_rows - 1) * ROW_GAP + MARGIN
    return width, height


def gallery_cells(synthetic: SyntheticSet) -> tuple[list[int], list[float], dict[tuple[int, float], int]]:
    """(classes, scales, index of the first image of each (class, scale)), classes and scales sorted."""
    first: dict[tuple[int, float], int] = {}
    for i, meta in enumerate(synthetic.meta):
        first.setdefault((int(meta["class"]), float(meta["scale"])), i)
    classes = sorted({c for c, _ in first})
    scales = sorted({s for _, s in first})
    return classes, scales, first


def color_lut(colors: Sequence[Sequence[int]]) -> np.ndarray:
    """A (256, 3) uint8 lookup table from label id to colour; ids without a colour (255: ignore) are white."""
    lut = np.tile(np.array(IGNORE_COLOR, dtype=np.uint8), (256, 1))
    if len(colors) > 256:
        raise ValueError(f"a palette holds at most 256 colours, got {len(colors)}")
    for i, color in enumerate(colors):
        lut[i] = color
    return lut


def gallery_png(
    synthetic: SyntheticSet, labels: Sequence[str], colors: Sequence[Sequence[int]], title: str = "Synthetic images"
) -> bytes:
    """Rows = classes, columns = SAA scales: one image per cell beside its pseudo-label mask.

    ``labels`` and ``colors`` are indexed by the label ids of the masks and the ``class`` of the metadata
    (0 = background). Column headers give r and the mean teacher-labelled area over all images of that r;
    each mask shows the area of its own image.
    """
    if not len(synthetic):
        raise ValueError("no synthetic images to show")
    classes, scales, first = gallery_cells(synthetic)
    if classes[-1] >= len(labels) or classes[-1] >= len(colors):
        raise ValueError(f"class {classes[-1]} of the synthetic set has no label or colour "
                         f"({len(labels)} labels, {len(colors)} colours)")
    present = np.flatnonzero(np.bincount(synthetic.masks.numpy().ravel(), minlength=256))
    unknown = [int(v) for v in present if v >= len(colors) and v != 255]
    if unknown:
        raise ValueError(f"mask labels {unknown} have no colour in a palette of {len(colors)}")
    lut = color_lut(colors)
    image_size = synthetic.images.shape[-1]
    cell = cell_size(image_size)
    width, height = gallery_size(len(classes), len(scales), image_size)
    fig = _figure(width, height)
    fw, fh = fig.bbox.width, fig.bbox.height

    def axes_at(left: float, top: float) -> Any:
        ax = fig.add_axes((left / fw, 1 - (top + cell) / fh, cell / fw, cell / fh))
        ax.set_axis_off()
        return ax

    fig.text(MARGIN / fw, 1 - 18 / fh, title, fontsize=11, weight="bold", va="baseline")
    areas = np.array([m["area"] for m in synthetic.meta])
    scale_of = np.array([m["scale"] for m in synthetic.meta])
    smooth = "nearest" if cell >= image_size else "antialiased"
    for j, scale in enumerate(scales):
        left = LABEL_WIDTH + j * (2 * cell + PANEL_GAP + COLUMN_GAP)
        center = (left + cell + PANEL_GAP / 2) / fw
        fig.text(center, 1 - 40 / fh, f"r = {scale:g}", ha="center", fontsize=9, weight="bold")
        fig.text(center, 1 - 55 / fh, f"mean area {areas[scale_of == scale].mean():.2f}", ha="center", fontsize=8)
        for i, cls in enumerate(classes):
            top = HEADER_HEIGHT + i * (cell + ROW_GAP)
            if j == 0:
                middle = top + cell / 2
                fig.text((LABEL_WIDTH - 24) / fw, 1 - middle / fh, labels[cls], ha="right", va="center", fontsize=9)
                fig.add_artist(Rectangle(((LABEL_WIDTH - 18) / fw, 1 - (middle + 5) / fh), 10 / fw, 10 / fh,
                                         facecolor=np.array(colors[cls]) / 255, edgecolor="black", linewidth=0.5))
            index = first.get((cls, scale))
            if index is None:
                continue
            axes_at(left, top).imshow(synthetic.images[index].permute(1, 2, 0).numpy(), interpolation=smooth)
            mask_ax = axes_at(left + cell + PANEL_GAP, top)
            mask_ax.imshow(lut[synthetic.masks[index].numpy()], interpolation="nearest")
            mask_ax.text(0.04, 0.05, f"{synthetic.meta[index]['area']:.2f}", transform=mask_ax.transAxes, fontsize=7,
                         color="white", bbox={"facecolor": "black", "alpha": 0.6, "pad": 1, "linewidth": 0})
    return _png(fig)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def scored_rows(rows: Sequence[Mapping[str, Any]], objective: str) -> list[Mapping[str, Any]]:
    """The sweep rows whose objective is a number (trials that failed or never reported are left out)."""
    return [r for r in rows if isinstance(r.get(objective), (int, float)) and not math.isnan(r[objective])]


def sweep_png(rows: Sequence[Mapping[str, Any]], params: Sequence[str], objective: str = "all") -> bytes:
    """One scatter per swept parameter of the objective (percent) against the parameter; the best trial in red.

    Numeric parameters get a linear axis (logarithmic when they span a factor of 10 or more), others
    (e.g. a list of scales) one category per distinct value.
    """
    if not params:
        raise ValueError("no swept parameters to plot")
    scored = scored_rows(rows, objective)
    if not scored:
        raise ValueError(f"no trial has a value of the objective {objective!r}")
    best = max(scored, key=lambda r: r[objective])
    n_cols = min(3, len(params))
    n_rows = math.ceil(len(params) / n_cols)
    fig = _figure(320 * n_cols, 40 + 280 * n_rows)
    for k, param in enumerate(params):
        ax = fig.add_subplot(n_rows, n_cols, k + 1)
        points = [r for r in scored if r.get(param) is not None]
        values = [r[param] for r in points]
        if all(_is_number(v) for v in values):
            x = [float(v) for v in values]
            if x and min(x) > 0 and max(x) / min(x) >= 10:
                ax.set_xscale("log")
        else:
            categories = list(dict.fromkeys(str(v) for v in values))
            x = [categories.index(str(v)) for v in values]
            ax.set_xticks(range(len(categories)), categories, rotation=20, ha="right", fontsize=7)
            ax.set_xlim(-0.5, len(categories) - 0.5)
        y = [100 * r[objective] for r in points]
        colors = ["#d62728" if r is best else "#1f77b4" for r in points]
        ax.scatter(x, y, c=colors, s=28, edgecolors="black", linewidths=0.4, zorder=3)
        ax.set_title(param, fontsize=10)
        ax.set_ylabel(f"{objective} mIoU (%)" if k % n_cols == 0 else "")
        ax.grid(alpha=0.3)
    fig.suptitle(f"Sweep: {objective} mIoU against each parameter ({len(scored)} trials, best in red)", fontsize=10)
    fig.tight_layout()
    return _png(fig)
