"""ImageNet normalisation of images, without torchvision: SegInversion's actors import only this."""

from __future__ import annotations

import torch

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


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
