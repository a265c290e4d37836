"""Per-step views of a source: the step's images, its label map and transforms."""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch.utils.data import Dataset
from torchvision import tv_tensors

from hrhf.data import SegmentationSource
from hrhf.data.real import ADE20K, VOCSegmentation
from hrhf.data.shapes import ShapesDataset
from hrhf.data.transforms import normalize
from hrhf.tasks import Task, cached_split, filter_step, label_lut

SPLIT_RULE_VERSION = 1


class StepDataset(Dataset):
    """The items `indices` of `source`, transformed, with masks mapped through `lut` to model indices."""

    def __init__(
        self,
        source: SegmentationSource,
        indices: Sequence[int],
        lut: torch.Tensor,
        transform: Callable | None,
    ):
        if lut.shape != (256,):
            raise ValueError(f"lut must have shape (256,), got {tuple(lut.shape)}")
        self.source = source
        self.indices = list(indices)
        self.lut = lut.long()
        self.transform = transform

    def __len__(self) -> int:
        return len(self.indices)

    def item_id(self, i: int) -> str:
        """Source item id of element i."""
        return self.source.item_id(self.indices[i])

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        image, mask = self.source.load(self.indices[i])
        if self.transform is None:
            image = normalize(image)
        else:
            image, mask = self.transform(tv_tensors.Image(image), tv_tensors.Mask(mask))
        mask = self.lut[mask.as_subclass(torch.Tensor).long()]
        return image.as_subclass(torch.Tensor), mask


def build_step_datasets(
    source_train: SegmentationSource,
    source_val: SegmentationSource,
    task: Task,
    step: int,
    mode: str,
    train_transform: Callable | None,
    eval_transform: Callable | None,
    cache_dir: str | None = None,
) -> tuple[StepDataset, StepDataset]:
    """Train and validation datasets of one step.

    mode "train": the step's images (overlapped or disjoint filter) labelled with its new classes only.
    mode "joint": every image holding any seen class, all seen classes labelled (the upper bound).
    Validation: every validation image, seen classes labelled, unseen ones ignored.
    """
    if mode not in ("train", "joint"):
        raise ValueError(f"unknown mode {mode!r}; known modes: ['train', 'joint']")
    seen = set(task.seen_classes(step))

    def compute() -> list[int]:
        present = source_train.all_labels_present()
        if mode == "train":
            return filter_step(present, task, step)
        return [i for i, labels in enumerate(present) if labels & seen]

    key = {
        "dataset": task.dataset,
        "data": source_train.identity(),
        "protocol": task.name,
        "steps": [list(s) for s in task.steps],
        "order": list(task.order),
        "step": step,
        "overlap": task.overlap,
        "mode": mode,
        "rule": SPLIT_RULE_VERSION,
    }
    indices = cached_split(cache_dir, key, compute)
    train = StepDataset(source_train, indices, label_lut(task, step, mode), train_transform)
    val = StepDataset(source_val, range(len(source_val)), label_lut(task, step, "eval"), eval_transform)
    return train, val


def make_source(
    name: str,
    split: str,
    root: str | None = None,
    image_size: int = 64,
    size: int | None = None,
    seed: int = 0,
    storage_options: dict | None = None,
    shapes_version: int = 1,
) -> SegmentationSource:
    """Build a source by dataset name.

    shapes: `size` items (default 2000 for train, 500 otherwise) of `image_size` px from `seed`, drawn by
    generator `shapes_version`.
    voc / ade: read from `root`; `size`, if given, keeps only the first `size` listed items.
    """
    if name == "shapes":
        if size is None:
            size = 2000 if split == "train" else 500
        return ShapesDataset(split=split, size=size, image_size=image_size, seed=seed, version=shapes_version)
    if name not in ("voc", "ade"):
        raise ValueError(f"unknown dataset {name!r}; known datasets: ['shapes', 'voc', 'ade']")
    if root is None:
        raise ValueError(f"dataset {name!r} needs a root (local path or fsspec URI)")
    if name == "voc":
        source = VOCSegmentation(root, split=split, storage_options=storage_options)
    else:
        source = ADE20K(root, split=split, storage_options=storage_options)
    if size is not None:
        source.keep_first(size)
    return source
