"""PASCAL VOC 2012 and ADE20K readers over any fsspec filesystem (local path, file://, s3://)."""

from __future__ import annotations

import hashlib
import io
import posixpath

import fsspec
import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from hrhf.data import SegmentationSource, color_map
from hrhf.tasks import IGNORE_INDEX

VOC_CLASSES = [
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
    "tvmonitor",
]  # fmt: skip

# SceneParsing objectInfo150 short names, label ids 1..150
ADE_CLASSES = [
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane", "grass",
    "cabinet", "sidewalk", "person", "earth", "door", "table", "mountain", "plant", "curtain", "chair",
    "car", "water", "painting", "sofa", "shelf", "house", "sea", "mirror", "rug", "field",
    "armchair", "seat", "fence", "desk", "rock", "wardrobe", "lamp", "bathtub", "railing", "cushion",
    "base", "box", "column", "signboard", "chest of drawers", "counter", "sand", "sink", "skyscraper",
    "fireplace", "refrigerator", "grandstand", "path", "stairs", "runway", "case", "pool table",
    "pillow", "screen door", "stairway", "river", "bridge", "bookcase", "blind", "coffee table",
    "toilet", "flower", "book", "hill", "bench", "countertop", "stove", "palm", "kitchen island",
    "computer", "swivel chair", "boat", "bar", "arcade machine", "hovel", "bus", "towel", "light",
    "truck", "tower", "chandelier", "awning", "streetlight", "booth", "television receiver",
    "airplane", "dirt track", "apparel", "pole", "land", "bannister", "escalator", "ottoman",
    "bottle", "buffet", "poster", "stage", "van", "ship", "fountain", "conveyer belt", "canopy",
    "washer", "plaything", "swimming pool", "stool", "barrel", "basket", "waterfall", "tent", "bag",
    "minibike", "cradle", "oven", "ball", "food", "step", "tank", "trade name", "microwave", "pot",
    "animal", "bicycle", "lake", "dishwasher", "screen", "blanket", "sculpture", "hood", "sconce",
    "vase", "traffic light", "tray", "ashcan", "fan", "pier", "crt screen", "plate", "monitor",
    "bulletin board", "shower", "radiator", "glass", "clock", "flag",
]  # fmt: skip


class _FileSource(SegmentationSource):
    """Image/mask pairs listed up front and read through fsspec."""

    def __init__(self, root: str, storage_options: dict | None):
        self.root = root
        self.storage_options = dict(storage_options or {})
        self.fs, self.path = fsspec.core.url_to_fs(root, **self.storage_options)
        self.ids: list[str] = []
        self.image_paths: list[str] = []
        self.mask_paths: list[str] = []
        self._labels: dict[int, frozenset[int]] = {}

    def _show(self, path: str) -> str:
        protocol = self.fs.protocol if isinstance(self.fs.protocol, str) else self.fs.protocol[0]
        return path if protocol in ("file", "local") else self.fs.unstrip_protocol(path)

    def _find_root(self, candidates: list[str], marker: str, what: str, expected: str) -> str:
        for c in candidates:
            if self.fs.isdir(posixpath.join(c, marker)):
                return c
        tried = ", ".join(self._show(c) for c in candidates)
        raise FileNotFoundError(f"{what} not found at {self.root!r}: expected {expected} (tried {tried})")

    def _read(self, path: str) -> Image.Image:
        try:
            with self.fs.open(path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            raise FileNotFoundError(f"missing file {self._show(path)}") from None
        try:
            img = Image.open(io.BytesIO(data))
            img.load()
        except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as e:
            raise ValueError(f"cannot decode {self._show(path)}: {e}") from None
        return img

    def _mask_array(self, path: str) -> np.ndarray:
        img = self._read(path)
        if img.mode not in ("P", "L"):
            raise ValueError(f"mask {self._show(path)} has mode {img.mode}; expected a palette (P) or grey (L) PNG")
        mask = np.array(img)  # palette PNGs give palette indices, i.e. the label ids
        bad = np.unique(mask[(mask > self.num_classes) & (mask != IGNORE_INDEX)])
        if bad.size:
            raise ValueError(
                f"mask {self._show(path)} has label values {bad.tolist()} outside 0..{self.num_classes} and {IGNORE_INDEX}"
            )
        return mask

    def __len__(self) -> int:
        return len(self.ids)

    def load(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Image uint8 (3, H, W) and mask uint8 (H, W) of item i."""
        i = self._check_index(i)
        img = self._read(self.image_paths[i]).convert("RGB")
        mask = self._mask_array(self.mask_paths[i])
        if mask.shape != (img.height, img.width):
            raise ValueError(
                f"mask {self._show(self.mask_paths[i])} is {mask.shape[1]}x{mask.shape[0]} but image "
                f"{self._show(self.image_paths[i])} is {img.width}x{img.height} (width x height)"
            )
        image = torch.from_numpy(np.ascontiguousarray(np.array(img).transpose(2, 0, 1)))
        return image, torch.from_numpy(mask)

    def load_mask(self, i: int) -> torch.Tensor:
        """Mask uint8 (H, W) of item i, without decoding the image."""
        return torch.from_numpy(self._mask_array(self.mask_paths[self._check_index(i)]))

    def labels_present(self, i: int) -> frozenset[int]:
        """Class labels in mask i (0 and 255 excluded), read once and remembered."""
        i = self._check_index(i)
        if i not in self._labels:
            self._labels[i] = super().labels_present(i)
        return self._labels[i]

    def item_id(self, i: int) -> str:
        """File stem of item i."""
        return self.ids[self._check_index(i)]

    def keep_first(self, n: int) -> None:
        """Keep only the first n listed items (for smoke runs on a slice of a real dataset)."""
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        del self.ids[n:], self.image_paths[n:], self.mask_paths[n:]
        self._labels = {i: v for i, v in self._labels.items() if i < n}

    def _ids_digest(self) -> str:
        return hashlib.sha256("\n".join(self.ids).encode()).hexdigest()[:16]


class VOCSegmentation(_FileSource):
    """PASCAL VOC 2012 segmentation.

    `root` (local path or fsspec URI) holds `VOCdevkit/VOC2012/` or is `VOC2012/` itself:

        VOC2012/JPEGImages/{id}.jpg
        VOC2012/SegmentationClass/{id}.png           palette PNG, 0 bg, 1..20, 255 border
        VOC2012/ImageSets/Segmentation/{split}.txt   one id per line

    With `aug_list=True` the SBD-augmented set (10582 train images) is read instead:

        VOC2012/SegmentationClassAug/{id}.png        grey PNG, same label values
        VOC2012/ImageSets/SegmentationAug/{split}.txt

    A list line may be a bare id or a DeepLab-style pair "/JPEGImages/{id}.jpg /SegmentationClassAug/{id}.png".
    """

    name = "voc"
    num_classes = 20
    class_names = ["background"] + VOC_CLASSES
    palette = color_map(21)

    def __init__(self, root: str, split: str = "train", aug_list: bool = False, storage_options: dict | None = None):
        super().__init__(root, storage_options)
        self.split = split
        self.aug_list = aug_list
        base = self.path.rstrip("/")
        self.base = self._find_root(
            [base, posixpath.join(base, "VOC2012"), posixpath.join(base, "VOCdevkit", "VOC2012")],
            "JPEGImages",
            "PASCAL VOC 2012",
            "VOCdevkit/VOC2012/ or VOC2012/ holding JPEGImages/, SegmentationClass/ and ImageSets/Segmentation/",
        )
        list_dir, mask_dir = ("SegmentationAug", "SegmentationClassAug") if aug_list else ("Segmentation", "SegmentationClass")
        list_path = posixpath.join(self.base, "ImageSets", list_dir, f"{split}.txt")
        try:
            with self.fs.open(list_path, "r") as f:
                lines = f.read().splitlines()
        except FileNotFoundError:
            raise FileNotFoundError(f"missing list file {self._show(list_path)} for split {split!r}") from None
        for line in lines:
            if not line.strip():
                continue
            stem = posixpath.splitext(posixpath.basename(line.split()[0]))[0]
            self.ids.append(stem)
            self.image_paths.append(posixpath.join(self.base, "JPEGImages", f"{stem}.jpg"))
            self.mask_paths.append(posixpath.join(self.base, mask_dir, f"{stem}.png"))

    def identity(self) -> dict:
        """Root, split, list flavour, and a digest of the listed ids."""
        return {
            "name": self.name,
            "root": self.root,
            "split": self.split,
            "aug_list": self.aug_list,
            "num_items": len(self),
            "ids_sha": self._ids_digest(),
        }


class ADE20K(_FileSource):
    """ADE20K SceneParsing (150 classes) in the ADEChallengeData2016 layout.

    `root` (local path or fsspec URI) holds `ADEChallengeData2016/` or is it:

        images/{training,validation}/{id}.jpg
        annotations/{training,validation}/{id}.png   grey PNG, 0 = other (background), 1..150
    """

    name = "ade"
    num_classes = 150
    class_names = ["background"] + ADE_CLASSES
    palette = color_map(151)
    SPLIT_ALIASES = {"train": "training", "val": "validation", "training": "training", "validation": "validation"}

    def __init__(self, root: str, split: str = "training", storage_options: dict | None = None):
        super().__init__(root, storage_options)
        if split not in self.SPLIT_ALIASES:
            raise ValueError(f"unknown ADE20K split {split!r}; known splits: ['training', 'validation']")
        self.split = self.SPLIT_ALIASES[split]
        base = self.path.rstrip("/")
        self.base = self._find_root(
            [base, posixpath.join(base, "ADEChallengeData2016")],
            "images",
            "ADE20K",
            "ADEChallengeData2016/ holding images/{split}/*.jpg and annotations/{split}/*.png",
        )
        image_dir = posixpath.join(self.base, "images", self.split)
        images = sorted(self.fs.glob(posixpath.join(image_dir, "*.jpg")))
        if not images:
            raise FileNotFoundError(f"no images found under {self._show(image_dir)}")
        for path in images:
            stem = posixpath.splitext(posixpath.basename(path))[0]
            self.ids.append(stem)
            self.image_paths.append(path)
            self.mask_paths.append(posixpath.join(self.base, "annotations", self.split, f"{stem}.png"))

    def identity(self) -> dict:
        """Root, split, and a digest of the listed ids."""
        return {
            "name": self.name,
            "root": self.root,
            "split": self.split,
            "num_items": len(self),
            "ids_sha": self._ids_digest(),
        }
