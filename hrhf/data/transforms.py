"""Joint image/mask transforms (torchvision v2); the normalisation helpers live in hrhf.pixels."""

from __future__ import annotations

import torch
from torchvision import tv_tensors
from torchvision.transforms import v2

from hrhf.tasks import IGNORE_INDEX
from hrhf.pixels import MEAN, STD, denormalize, normalize, pixel_bounds  # noqa: F401 (re-exported)

_FILL = {tv_tensors.Image: 0, tv_tensors.Mask: IGNORE_INDEX}


def _to_float() -> v2.ToDtype:
    return v2.ToDtype({tv_tensors.Image: torch.float32, "others": None}, scale=True)


def train_transform(crop_size: int, scale: tuple[float, float] = (0.5, 2.0)) -> v2.Compose:
    """Random scale, random crop (padding: image 0, mask 255), horizontal flip, normalise.

    The scale is relative to the image fitted inside the crop, so one setting suits 64 px
    shapes and 500 px VOC images alike.
    """
    return v2.Compose(
        [
            v2.ScaleJitter((crop_size, crop_size), scale_range=scale, antialias=True),
            v2.RandomCrop(crop_size, pad_if_needed=True, fill=_FILL),
            v2.RandomHorizontalFlip(),
            _to_float(),
            v2.Normalize(MEAN, STD),
        ]
    )


def eval_transform(size: int | None = None) -> v2.Compose:
    """Normalise; with `size`, resize the shorter side to it and centre-crop a square, as MiB does."""
    resize = [v2.Resize(size, antialias=True), v2.CenterCrop(size)] if size is not None else []
    return v2.Compose([*resize, _to_float(), v2.Normalize(MEAN, STD)])
