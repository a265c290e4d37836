"""Segmentation sources (procedural shapes, PASCAL VOC, ADE20K) and per-step datasets."""

from __future__ import annotations

import abc

import numpy as np
import torch
from torch.utils.data import Dataset

from hrhf.tasks import IGNORE_INDEX


def color_map(n: int) -> list[tuple[int, int, int]]:
    """The PASCAL VOC colour map (bit-interleaved label ids), first n entries."""
    colors = []
    for i in range(n):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        colors.append((r, g, b))
    return colors


class SegmentationSource(Dataset, abc.ABC):
    """A segmentation dataset in its original label space: 0 background, 1..N classes, 255 ignore."""

    name: str
    num_classes: int
    class_names: list[str]
    palette: list[tuple[int, int, int]]

    @abc.abstractmethod
    def __len__(self) -> int: ...

    @abc.abstractmethod
    def load(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Image uint8 (3, H, W) and mask uint8 (H, W) of item i."""

    def load_mask(self, i: int) -> torch.Tensor:
        """Mask uint8 (H, W) of item i; subclasses skip decoding the image where they can."""
        return self.load(i)[1]

    @abc.abstractmethod
    def item_id(self, i: int) -> str:
        """A stable name for item i."""

    @abc.abstractmethod
    def identity(self) -> dict:
        """What identifies this data, for keying cached splits."""

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.load(i)

    def _check_index(self, i: int) -> int:
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"index {i} out of range for {self.name} with {n} items")
        return i % n

    def labels_present(self, i: int) -> frozenset[int]:
        """Class labels in the mask of item i, without background 0 and ignore 255."""
        counts = np.bincount(self.load_mask(i).numpy().ravel(), minlength=256)
        return frozenset(int(c) for c in np.flatnonzero(counts) if c not in (0, IGNORE_INDEX))

    def all_labels_present(self) -> list[frozenset[int]]:
        """labels_present for every item, in index order."""
        return [self.labels_present(i) for i in range(len(self))]


from hrhf.data.shapes import ShapesDataset  # noqa: E402
from hrhf.data.real import ADE20K, VOCSegmentation  # noqa: E402
from hrhf.data.incremental import StepDataset, build_step_datasets, make_source  # noqa: E402

__all__ = [
    "ADE20K",
    "SegmentationSource",
    "ShapesDataset",
    "StepDataset",
    "VOCSegmentation",
    "build_step_datasets",
    "color_map",
    "make_source",
]
