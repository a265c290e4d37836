"""Class-incremental protocols as data: step sizes, class orders, label maps and cached splits."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch

IGNORE_INDEX = 255  # the label of pixels that no loss or metric counts

NUM_CLASSES: dict[str, int] = {"voc": 20, "ade": 150, "shapes": 10}

PROTOCOLS: dict[str, dict[str, list[int]]] = {
    "voc": {
        "19-1": [19, 1],
        "15-5": [15, 5],
        "15-1": [15, 1, 1, 1, 1, 1],
        "10-1": [10] + [1] * 10,
        "5-3": [5, 3, 3, 3, 3, 3],
    },
    "ade": {
        "100-50": [100, 50],
        "50-50": [50, 50, 50],
        "100-10": [100] + [10] * 5,
        "100-5": [100] + [5] * 10,
    },
    "shapes": {
        "6-2-2": [6, 2, 2],
        "6-1": [6, 1, 1, 1, 1],
        "5-1": [5, 1, 1, 1, 1, 1],  # six tasks, as VOC 15-1
    },
}

LUT_MODES = ("train", "eval", "joint")


@dataclass(frozen=True)
class Task:
    """A protocol instance: the original class ids introduced at each step, and the setting."""

    dataset: str
    name: str
    steps: tuple[tuple[int, ...], ...]
    overlap: bool

    @property
    def num_steps(self) -> int:
        """Number of learning steps, the base step included."""
        return len(self.steps)

    @property
    def order(self) -> tuple[int, ...]:
        """All classes of the task in the order they are learnt; position k-1 holds model index k."""
        return tuple(c for step in self.steps for c in step)

    def _check_step(self, step: int) -> None:
        if not 0 <= step < self.num_steps:
            raise IndexError(f"step {step} out of range for task {self.name!r} with {self.num_steps} steps")

    def new_classes(self, step: int) -> tuple[int, ...]:
        """Original ids of the classes introduced at `step`."""
        self._check_step(step)
        return self.steps[step]

    def old_classes(self, step: int) -> tuple[int, ...]:
        """Original ids of the classes of all steps before `step`."""
        self._check_step(step)
        return tuple(c for s in self.steps[:step] for c in s)

    def seen_classes(self, step: int) -> tuple[int, ...]:
        """Original ids of the classes known after `step` (old + new)."""
        return self.old_classes(step) + self.new_classes(step)

    def num_seen(self, step: int) -> int:
        """Number of foreground classes the model predicts after `step`."""
        return len(self.seen_classes(step))

    def old_indices(self, step: int) -> list[int]:
        """Model output indices of the old classes at `step` (background 0 excluded)."""
        return list(range(1, len(self.old_classes(step)) + 1))

    def new_indices(self, step: int) -> list[int]:
        """Model output indices of the classes introduced at `step`."""
        n_old = len(self.old_classes(step))
        return list(range(n_old + 1, n_old + len(self.new_classes(step)) + 1))

    def model_index(self, cls: int) -> int:
        """Model output index of original class id `cls`."""
        try:
            return self.order.index(cls) + 1
        except ValueError:
            raise ValueError(f"class {cls} is not part of task {self.name!r}") from None


def _num_classes(dataset: str) -> int:
    if dataset not in NUM_CLASSES:
        raise ValueError(f"unknown dataset {dataset!r}; known datasets: {sorted(NUM_CLASSES)}")
    return NUM_CLASSES[dataset]


def _validate_steps(dataset: str, steps: Sequence[Sequence[int]]) -> tuple[tuple[int, ...], ...]:
    n = _num_classes(dataset)
    if len(steps) == 0:
        raise ValueError("a task needs at least one step")
    first_step: dict[int, int] = {}
    for t, classes in enumerate(steps):
        if len(classes) == 0:
            raise ValueError(f"step {t} is empty")
        for c in classes:
            if isinstance(c, bool) or not isinstance(c, (int, np.integer)):
                raise ValueError(f"class ids must be integers, got {c!r} in step {t}")
            if not 1 <= c <= n:
                raise ValueError(f"class {c} in step {t} is out of range 1..{n} for dataset {dataset!r}")
            if c in first_step:
                raise ValueError(f"class {c} appears in step {first_step[c]} and step {t}")
            first_step[c] = t
    return tuple(tuple(int(c) for c in classes) for classes in steps)


def make_task_from_steps(dataset: str, steps: list[list[int]], overlap: bool, name: str = "custom") -> Task:
    """Build a task from explicit per-step lists of original class ids."""
    return Task(dataset=dataset, name=name, steps=_validate_steps(dataset, steps), overlap=overlap)


def class_order(dataset: str, order: Sequence[int] | None = None, order_seed: int | None = None) -> list[int]:
    """The class order of a dataset: index order, an explicit permutation, or a seeded shuffle."""
    n = _num_classes(dataset)
    if order is not None and order_seed is not None:
        raise ValueError("give either order or order_seed, not both")
    if order_seed is not None:
        return [int(c) for c in np.random.default_rng(order_seed).permutation(np.arange(1, n + 1))]
    if order is None:
        return list(range(1, n + 1))
    order = [int(c) for c in order]
    if sorted(order) != list(range(1, n + 1)):
        missing = sorted(set(range(1, n + 1)) - set(order))
        extra = sorted(c for c in set(order) if not 1 <= c <= n)
        repeated = sorted(c for c in set(order) if order.count(c) > 1)
        raise ValueError(
            f"order must be a permutation of 1..{n} for dataset {dataset!r} "
            f"(missing {missing}, out of range {extra}, repeated {repeated})"
        )
    return order


def make_task(
    dataset: str,
    name: str,
    overlap: bool = True,
    order: Sequence[int] | None = None,
    order_seed: int | None = None,
) -> Task:
    """Build a named protocol (e.g. voc 15-1) over the default, given, or seeded class order."""
    n = _num_classes(dataset)
    if name not in PROTOCOLS[dataset]:
        raise ValueError(f"unknown protocol {name!r} for {dataset!r}; known protocols: {list(PROTOCOLS[dataset])}")
    sizes = PROTOCOLS[dataset][name]
    if sum(sizes) > n:
        raise ValueError(f"protocol {name!r} needs {sum(sizes)} classes but {dataset!r} has {n}")
    classes = class_order(dataset, order, order_seed)
    bounds = np.cumsum([0] + sizes)
    steps = [classes[a:b] for a, b in zip(bounds[:-1], bounds[1:])]
    return make_task_from_steps(dataset, steps, overlap, name=name)


def label_lut(task: Task, step: int, mode: str) -> torch.Tensor:
    """Lookup table (256,) from original mask values to model indices for a step.

    train: only the step's new classes are labelled, everything else (old, future) is background.
    eval / joint: every seen class is labelled, classes not yet seen are ignored (255).
    """
    if mode not in LUT_MODES:
        raise ValueError(f"unknown label mode {mode!r}; known modes: {list(LUT_MODES)}")
    if mode == "train":
        lut = torch.zeros(256, dtype=torch.long)
        labelled = task.new_classes(step)
        first = len(task.old_classes(step)) + 1
    else:
        lut = torch.full((256,), IGNORE_INDEX, dtype=torch.long)
        lut[0] = 0
        labelled = task.seen_classes(step)
        first = 1
    for k, c in enumerate(labelled):
        lut[c] = first + k
    lut[IGNORE_INDEX] = IGNORE_INDEX
    return lut


def filter_step(labels_present: Sequence[frozenset[int]], task: Task, step: int) -> list[int]:
    """Indices of the images a step trains on.

    Kept: images with a pixel of a new class. Disjoint setting also drops images
    showing any class outside old + new (i.e. a future class).
    """
    new = set(task.new_classes(step))
    allowed = set(task.seen_classes(step)) | {0, IGNORE_INDEX}
    keep = []
    for i, labels in enumerate(labels_present):
        if not new & labels:
            continue
        if not task.overlap and not labels <= allowed:
            continue
        keep.append(i)
    return keep


def _normalise_key(key: dict) -> dict:
    return json.loads(json.dumps(key, sort_keys=True))


def cached_split(cache_dir: str | None, key: dict, compute: Callable[[], list[int]]) -> list[int]:
    """Return compute(), stored as JSON in cache_dir under a hash of `key` and reused when the key matches."""
    if cache_dir is None:
        return [int(i) for i in compute()]
    key = _normalise_key(key)
    blob = json.dumps(key, sort_keys=True)
    path = os.path.join(cache_dir, f"split-{hashlib.sha256(blob.encode()).hexdigest()[:16]}.json")
    if os.path.exists(path):
        try:
            with open(path) as f:
                stored = json.load(f)
            if stored.get("key") == key:
                return [int(i) for i in stored["indices"]]
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError):
            pass  # unreadable or foreign file: recompute and overwrite
    indices = [int(i) for i in compute()]
    os.makedirs(cache_dir, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=cache_dir, prefix=".split-", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump({"key": key, "indices": indices}, f)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return indices
