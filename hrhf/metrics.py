"""Confusion-matrix mIoU for incremental segmentation: background, old, new, all and per class."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from hrhf.tasks import IGNORE_INDEX


class ConfusionMatrix:
    """Accumulates a (num_classes x num_classes) confusion matrix; rows are ground truth."""

    def __init__(self, num_classes: int) -> None:
        self.num_classes = num_classes
        self.matrix = torch.zeros(num_classes, num_classes, dtype=torch.int64)

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        """Add a batch of predicted and true label maps; pixels labelled 255 are skipped."""
        keep = target != IGNORE_INDEX
        target = target[keep].to(torch.int64)
        pred = pred[keep].to(torch.int64)
        if target.numel() and int(target.max()) >= self.num_classes:
            raise ValueError(f"target label {int(target.max())} >= num_classes {self.num_classes}")
        flat = target * self.num_classes + pred
        self.matrix += torch.bincount(flat, minlength=self.num_classes**2).reshape(self.num_classes, -1).cpu()

    def iou(self) -> torch.Tensor:
        """Per-class IoU; NaN for classes absent from both prediction and ground truth."""
        return class_iou(self.matrix)


def class_iou(matrix: torch.Tensor) -> torch.Tensor:
    """IoU per class of a confusion matrix (rows = truth), NaN where the class never occurs."""
    matrix = matrix.to(torch.float64)
    tp = matrix.diag()
    union = matrix.sum(0) + matrix.sum(1) - tp
    return torch.where(union > 0, tp / union.clamp(min=1), torch.full_like(tp, math.nan))


def _nanmean(values: torch.Tensor) -> float | None:
    values = values[~values.isnan()]
    return float(values.mean()) if values.numel() else None


def summarize(matrix: torch.Tensor, old: Sequence[int], new: Sequence[int]) -> dict:
    """mIoU over background, old and new class indices, all seen classes (with background), and per class.

    Values are fractions in [0, 1]; a class that never occurs in truth or prediction is left out of the
    means and reported as None, as is a mean over no class (old classes at step 0).
    """
    iou = class_iou(matrix)
    return summarize_iou([None if math.isnan(v) else float(v) for v in iou.tolist()], old, new)


def summarize_iou(per_class: Sequence[float | None], old: Sequence[int], new: Sequence[int]) -> dict:
    """The same summary from a per-class IoU list (index 0 background, None where undefined)."""
    iou = torch.tensor([math.nan if v is None else v for v in per_class], dtype=torch.float64)

    def mean_of(indices: Sequence[int]) -> float:
        return _nanmean(iou[torch.tensor(list(indices), dtype=torch.long)]) if len(indices) else None

    return {
        "background": _nanmean(iou[:1]),
        "old": mean_of(old),
        "new": mean_of(new),
        "all": _nanmean(iou),
        "per_class": list(per_class),
    }


def images_showing(predicted: torch.Tensor, num_classes: int, min_share: float) -> torch.Tensor:
    """Per class, how many of the (N, H, W) predicted label maps give it at least ``min_share`` of their pixels."""
    n = predicted.shape[0]
    counts = torch.zeros(n, num_classes, dtype=torch.long, device=predicted.device)
    counts.scatter_add_(1, predicted.reshape(n, -1).long(), torch.ones_like(predicted.reshape(n, -1), dtype=torch.long))
    pixels = predicted[0].numel() if n else 1
    return (counts >= min_share * pixels).sum(dim=0).cpu()
