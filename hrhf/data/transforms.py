"""Joint image/mask transforms (torchvision v2); the normalisation helpers live in hrhf.pixels."""

from __future__ import annotations

import torch
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from hrhf.tasks import IGNORE_INDEX
from hrhf.pixels import MEAN, STD, denormalize, normalize, pixel_bounds  # noqa: F401 (re-exported)

_FILL = {tv_tensors.Image: 0, tv_tensors.Mask: IGNORE_INDEX}


def _to_float() -> v2.ToDtype:
    return v2.ToDtype({tv_tensors.Image: torch.float32, "others": None}, scale=True)


class TrainTransform:
    """Random scale, random crop (padding: image 0, mask 255), horizontal flip, normalise.

    The scale is relative to the image fitted inside the crop, so one setting suits 64 px shapes and
    500 px VOC images alike. The steps, their random draws and their kernels are those of
    ``reference_train_transform`` (a v2.Compose), called directly: on 64 px images the Compose's
    per-item dispatch costs as much as the kernels. Given the same torch RNG state both give the same
    tensors (tested).
    """

    def __init__(self, crop_size: int, scale: tuple[float, float] = (0.5, 2.0)) -> None:
        self.crop_size = crop_size
        self.scale = scale

    def __call__(self, image: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 image (3, H, W) and mask (H, W) -> normalised float32 image and uint8 mask, both crop-sized."""
        image, mask = image.as_subclass(torch.Tensor), mask.as_subclass(torch.Tensor)
        crop = self.crop_size
        height, width = image.shape[-2:]
        # v2.ScaleJitter: one draw; float32 arithmetic, as there
        low, high = self.scale
        ratio = min(crop / height, crop / width) * (low + torch.rand(1) * (high - low))
        height, width = int(height * ratio), int(width * ratio)
        image = F.resize_image(image, [height, width], antialias=True)
        mask = F.resize_mask(mask, [height, width])
        # v2.RandomCrop(pad_if_needed=True): pad both sides by the shortfall, then up to two draws
        pad_y, pad_x = max(crop - height, 0), max(crop - width, 0)
        if pad_y or pad_x:
            padding = [pad_x, pad_y, pad_x, pad_y]
            image = F.pad_image(image, padding, fill=_FILL[tv_tensors.Image])
            mask = F.pad_mask(mask, padding, fill=_FILL[tv_tensors.Mask])
            height, width = height + 2 * pad_y, width + 2 * pad_x
        top = int(torch.randint(0, height - crop + 1, size=())) if height > crop else 0
        left = int(torch.randint(0, width - crop + 1, size=())) if width > crop else 0
        image, mask = image[..., top : top + crop, left : left + crop], mask[..., top : top + crop, left : left + crop]
        # v2.RandomHorizontalFlip(p=0.5)
        if torch.rand(1) < 0.5:
            image, mask = F.horizontal_flip_image(image), F.horizontal_flip_mask(mask)
        image = F.normalize_image(F.to_dtype_image(image, torch.float32, scale=True), MEAN, STD, inplace=True)
        return image, mask


def train_transform(crop_size: int, scale: tuple[float, float] = (0.5, 2.0)) -> TrainTransform:
    """The training augmentation of real images (TrainTransform)."""
    return TrainTransform(crop_size, scale)


def reference_train_transform(crop_size: int, scale: tuple[float, float] = (0.5, 2.0)) -> v2.Compose:
    """TrainTransform as a torchvision v2 composition: the definition that TrainTransform reproduces."""
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
