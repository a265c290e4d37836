"""Joint image/mask transforms (torchvision v2) and ImageNet normalisation helpers."""

from __future__ import annotations

import torch
from torchvision import tv_tensors
from torchvision.transforms import v2

from hrhf.data import IGNORE

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)

_FILL = {tv_tensors.Image: 0, tv_tensors.Mask: IGNORE}


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


def _stats(like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    shape = (3, 1, 1) if like.dim() == 3 else (1, 3, 1, 1)
    mean = torch.tensor(MEAN, dtype=torch.float32, device=like.device).view(shape)
    std = torch.tensor(STD, dtype=torch.float32, device=like.device).view(shape)
    return mean, std


def normalize(img: torch.Tensor) -> torch.Tensor:
    """uint8 image(s) (3, H, W) or (B, 3, H, W) -> normalised float32."""
    mean, std = _stats(img)
    return (img.float() / 255.0 - mean) / std


def denormalize(x: torch.Tensor) -> torch.Tensor:
    """Normalised float image(s) (3, H, W) or (B, 3, H, W) -> uint8, clipped to the valid range."""
    mean, std = _stats(x)
    return ((x.float() * std + mean).clamp(0, 1) * 255.0).round().to(torch.uint8)


def pixel_bounds() -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised values of pixel 0 and pixel 255 per channel, each (1, 3, 1, 1)."""
    mean = torch.tensor(MEAN).view(1, 3, 1, 1)
    std = torch.tensor(STD).view(1, 3, 1, 1)
    return (0.0 - mean) / std, (1.0 - mean) / std
