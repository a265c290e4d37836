"""How often a protocol's later steps show old classes: per-image class sets in, plain figures out."""

from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np

from hrhf.tasks import Task, filter_step

THRESHOLDS = (0.01, 0.05, 0.2)  # "old classes above 1% / 5% / 20% of the step's images"
RARE = 0.01  # a base class under this share of every later step's images counts as missing from new data


def label_counts(mask: np.ndarray, num_classes: int) -> np.ndarray:
    """Pixel count per label 0..num_classes of one mask (ignore pixels left out)."""
    counts = np.bincount(mask.ravel(), minlength=256)
    return counts[: num_classes + 1].astype(np.int64)


def class_sets_of(pixel_counts: np.ndarray) -> list[frozenset[int]]:
    """Per image, the classes (1..N) with at least one pixel, from an (images, N + 1) count table."""
    return [frozenset(int(c) for c in np.flatnonzero(row[1:]) + 1) for row in pixel_counts]


def dataset_statistics(class_sets: Sequence[frozenset[int]], num_classes: int,
                       pixel_counts: np.ndarray | None = None) -> dict:
    """Class frequencies, classes per image and (with pixel counts) the foreground share of labelled pixels."""
    n = len(class_sets)
    sizes = np.array([len(s) for s in class_sets], dtype=np.int64)
    frequency = np.zeros(num_classes + 1)
    for s in class_sets:
        for c in s:
            frequency[c] += 1
    frequency = frequency[1:] / max(n, 1)
    stats = {
        "images": n,
        "classes_per_image": float(sizes.mean()) if n else 0.0,
        # images holding 1, 2, 3, 4+ classes (images with none are left out of every bin)
        "images_with_classes": [float(np.mean(sizes == k)) if n else 0.0 for k in (1, 2, 3)]
        + [float(np.mean(sizes >= 4)) if n else 0.0],
        "class_frequency": {int(c): float(f) for c, f in enumerate(frequency, start=1)},
        "foreground_pixels": None,
    }
    if pixel_counts is not None:
        labelled = pixel_counts.sum()
        stats["foreground_pixels"] = float(pixel_counts[:, 1:].sum() / labelled) if labelled else 0.0
    return stats


def step_statistics(class_sets: Sequence[frozenset[int]], task: Task, step: int,
                    pixel_counts: np.ndarray | None = None) -> dict:
    """Old-class presence among the training images of one step (the task's filtering, usually overlapped)."""
    keep = filter_step(class_sets, task, step)
    old = task.old_classes(step)
    old_set = set(old)
    n = len(keep)
    share = {c: 0.0 for c in old}
    any_old = 0
    for i in keep:
        present = class_sets[i] & old_set
        any_old += bool(present)
        for c in present:
            share[c] += 1
    if n:
        share = {c: k / n for c, k in share.items()}
    values = np.array([share[c] for c in old]) if old else np.zeros(0)
    top = max(old, key=lambda c: share[c]) if old else None
    stats = {
        "step": step,
        "new_classes": list(task.new_classes(step)),
        "images": n,
        "old_classes": len(old),
        "any_old": any_old / n if n else 0.0,
        "top_old_class": top,
        "top_old": float(values.max()) if old else 0.0,
        "median_old": float(np.median(values)) if old else 0.0,
        "old_above": [int(np.sum(values > t)) for t in THRESHOLDS],
        "old_share": {int(c): float(s) for c, s in share.items()},
        "old_pixels": None,
    }
    if pixel_counts is not None and n:
        counts = pixel_counts[keep]
        labelled = counts.sum()
        stats["old_pixels"] = float(counts[:, list(old)].sum() / labelled) if labelled and old else 0.0
    return stats


def protocol_statistics(class_sets: Sequence[frozenset[int]], task: Task, num_classes: int,
                        pixel_counts: np.ndarray | None = None) -> dict:
    """Every step's figures, their mean over the later steps, and the base classes rare in all of them."""
    steps = [step_statistics(class_sets, task, t, pixel_counts) for t in range(task.num_steps)]
    later = steps[1:]
    mean: dict = {}
    if later:
        for key in ("images", "old_classes", "any_old", "top_old", "median_old"):
            mean[key] = float(np.mean([s[key] for s in later]))
        mean["old_above"] = [float(np.mean([s["old_above"][k] for s in later])) for k in range(len(THRESHOLDS))]
        mean["old_above_share"] = [
            float(np.mean([s["old_above"][k] / s["old_classes"] for s in later])) for k in range(len(THRESHOLDS))
        ]
        pixels = [s["old_pixels"] for s in later if s["old_pixels"] is not None]
        mean["old_pixels"] = float(np.mean(pixels)) if pixels else None
    base = task.new_classes(0)
    rare = [c for c in base if later and all(s["old_share"][c] < RARE for s in later)]
    return {
        "protocol": task.name,
        "overlap": task.overlap,
        "steps": steps,
        "later_mean": mean,
        "base_classes": len(base),
        "base_rare_every_later_step": rare,
        "dataset": dataset_statistics(class_sets, num_classes, pixel_counts),
    }


def count_pixels(masks: Iterable[np.ndarray], num_classes: int) -> np.ndarray:
    """(images, N + 1) pixel counts per label 0..N of a sequence of masks."""
    rows = [label_counts(mask, num_classes) for mask in masks]
    return np.stack(rows) if rows else np.zeros((0, num_classes + 1), dtype=np.int64)
