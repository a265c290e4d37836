"""The embedded procedural benchmark: coloured, textured shapes on noisy backgrounds."""

from __future__ import annotations

import colorsys
import math
from functools import lru_cache

import numpy as np
import torch

from hrhf.data import SegmentationSource, color_map

VERSIONS = (1, 2)
DEFAULT_VERSION = 1
SPLITS = {"train": 0, "val": 1, "test": 2}

# name, hue in degrees, texture, largest rotation in degrees (180: any angle)
CLASSES: list[tuple[str, float, str, float]] = [
    ("disc", 0, "solid", 0),
    ("square", 210, "checker", 20),
    ("triangle", 55, "stripes", 20),
    ("ring", 300, "solid", 0),
    ("cross", 120, "dots", 20),
    ("star", 28, "gradient", 20),
    ("diamond", 180, "stripes", 15),
    ("hexagon", 265, "dots", 30),
    ("crescent", 90, "gradient", 180),
    ("bar", 330, "checker", 180),
]
SECOND_INSTANCE_P = 0.3

# Version 1: every class co-occurs uniformly with every other.
CLASS_COUNT_P = (0.6, 0.3, 0.1)  # images holding 1, 2, 3 distinct classes
SCALE_RANGE = (0.06, 0.85)  # object diameter as a share of the image side, sampled log-uniformly

# Version 2: PASCAL VOC's scene structure. Each image has a lead class, drawn with skewed
# frequencies, and each class of the lead's row joins it with the given probability. "cross" is
# the hub that goes with many classes (VOC's person); square, diamond, hexagon and bar share
# indoor scenes (chair, sofa, potted plant, tv monitor); ring and crescent share street scenes
# (car, bicycle); disc, triangle and star mostly appear alone (aeroplane, cow, sheep).
# Calibrated on VOC's class statistics alone (benchmarks/cooccurrence.py), never on a method's mIoU.
LEAD_P_V2: dict[str, float] = {
    "disc": 0.09, "square": 0.07, "triangle": 0.07, "ring": 0.11, "cross": 0.18,
    "star": 0.13, "diamond": 0.06, "hexagon": 0.07, "crescent": 0.10, "bar": 0.08,
}  # fmt: skip
COMPANION_P_V2: dict[str, dict[str, float]] = {
    "disc": {"cross": 0.12},
    "square": {"cross": 0.40, "hexagon": 0.30, "diamond": 0.15, "bar": 0.10},
    "triangle": {"cross": 0.10},
    "ring": {"cross": 0.40, "crescent": 0.10},
    "cross": {"square": 0.10, "ring": 0.10, "crescent": 0.07, "star": 0.04, "diamond": 0.04, "hexagon": 0.05,
              "bar": 0.04},
    "star": {"cross": 0.15},
    "diamond": {"cross": 0.32, "square": 0.25, "star": 0.08},
    "hexagon": {"square": 0.33, "cross": 0.26, "bar": 0.05},
    "crescent": {"cross": 0.32, "ring": 0.10},
    "bar": {"cross": 0.30, "square": 0.28, "diamond": 0.08},
}
# The lead object is large and central, as VOC's main object; companions are smaller.
LEAD_SCALE_V2 = (0.35, 1.1)
COMPANION_SCALE_V2 = (0.1, 0.6)
LEAD_CENTRE_V2 = (0.25, 0.75)  # centre range as a share of the side; companions use 0.05..0.95


def _class_table_v2() -> tuple[np.ndarray, np.ndarray]:
    """Lead probabilities (N,) and companion probabilities (N, N) of version 2, rows indexed by the lead."""
    index = {c[0]: k for k, c in enumerate(CLASSES)}
    lead = np.zeros(len(CLASSES))
    companions = np.zeros((len(CLASSES), len(CLASSES)))
    for name, p in LEAD_P_V2.items():
        lead[index[name]] = p
    for name, row in COMPANION_P_V2.items():
        for other, p in row.items():
            companions[index[name], index[other]] = p
    return lead / lead.sum(), companions


_LEAD_V2, _COMPANIONS_V2 = _class_table_v2()

# diameter (px), class id, centre (x, y) in px, five jitter draws (rotation, hue, saturation, value, texture)
_Object = tuple[float, int, np.ndarray, np.ndarray]


def _log_uniform(rng: np.random.Generator, low: float, high: float) -> float:
    return math.exp(rng.uniform(math.log(low), math.log(high)))


def _objects_v1(rng: np.random.Generator, side: int) -> list[_Object]:
    n_classes = int(rng.choice(len(CLASS_COUNT_P), p=CLASS_COUNT_P)) + 1
    classes = rng.choice(len(CLASSES), size=n_classes, replace=False) + 1
    objects = []
    for c in classes:
        for _ in range(1 + int(rng.random() < SECOND_INSTANCE_P)):
            diameter = _log_uniform(rng, *SCALE_RANGE) * side
            objects.append((diameter, int(c), rng.uniform(0.05, 0.95, size=2) * side, rng.random(5)))
    return objects


def _objects_v2(rng: np.random.Generator, side: int) -> list[_Object]:
    lead = int(rng.choice(len(CLASSES), p=_LEAD_V2))
    joining = np.flatnonzero(rng.random(len(CLASSES)) < _COMPANIONS_V2[lead])
    objects = []
    for c in [lead, *joining.tolist()]:
        scale, centre = (LEAD_SCALE_V2, LEAD_CENTRE_V2) if c == lead else (COMPANION_SCALE_V2, (0.05, 0.95))
        for _ in range(1 + int(rng.random() < SECOND_INSTANCE_P)):
            diameter = _log_uniform(rng, *scale) * side
            objects.append((diameter, c + 1, rng.uniform(*centre, size=2) * side, rng.random(5)))
    return objects


def _polygon(u: np.ndarray, v: np.ndarray, n: int, phase: float) -> np.ndarray:
    apothem = math.cos(math.pi / n)
    inside = np.ones(u.shape, dtype=bool)
    for k in range(n):
        a = phase + 2 * math.pi * k / n
        inside &= u * math.cos(a) + v * math.sin(a) <= apothem
    return inside


def _shape(name: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Inside test in object coordinates, where the shape fits the unit disc."""
    r2 = u * u + v * v
    if name == "disc":
        return r2 <= 1.0
    if name == "square":
        return _polygon(u, v, 4, 0.0)
    if name == "triangle":
        return _polygon(u, v, 3, -math.pi / 2)
    if name == "ring":
        return (r2 <= 1.0) & (r2 >= 0.55**2)
    if name == "cross":
        au, av = np.abs(u), np.abs(v)
        return ((au <= 0.3) & (av <= 0.95)) | ((av <= 0.3) & (au <= 0.95))
    if name == "star":
        lobes = (1 + np.cos(5 * np.arctan2(v, u))) / 2
        return np.sqrt(r2) <= 0.42 + 0.58 * lobes**2
    if name == "diamond":
        return np.abs(u) / 0.65 + np.abs(v) <= 1.0
    if name == "hexagon":
        return _polygon(u, v, 6, 0.0)
    if name == "crescent":
        return (r2 <= 1.0) & ((u - 0.45) ** 2 + v * v > 0.8**2)
    if name == "bar":
        return (np.abs(u) <= 1.0) & (np.abs(v) <= 0.28)
    raise ValueError(f"unknown shape {name!r}")


def _texture(kind: str, u: np.ndarray, v: np.ndarray, period: float) -> np.ndarray:
    """Mixing weight in [0, 1] between an object's main colour and its dark variant."""
    if kind == "solid":
        return np.zeros(u.shape, dtype=np.float32)
    if kind == "stripes":
        return (np.sin(2 * math.pi * u / period) > 0).astype(np.float32)
    if kind == "checker":
        return ((np.floor(2 * u / period) + np.floor(2 * v / period)) % 2).astype(np.float32)
    if kind == "dots":
        du, dv = u % period - period / 2, v % period - period / 2
        return (du * du + dv * dv < (0.3 * period) ** 2).astype(np.float32)
    if kind == "gradient":
        return np.clip((u + v + 1.4) / 2.8, 0, 1).astype(np.float32)
    raise ValueError(f"unknown texture {kind!r}")


@lru_cache(maxsize=64)
def _resize_matrix(n_out: int, n_in: int) -> np.ndarray:
    """Bilinear interpolation weights (n_out, n_in), so upsampling is two small matrix products."""
    pos = np.clip((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0, n_in - 1)
    i0 = np.floor(pos).astype(int)
    i1 = np.minimum(i0 + 1, n_in - 1)
    w = (pos - i0).astype(np.float32)
    m = np.zeros((n_out, n_in), dtype=np.float32)
    np.add.at(m, (np.arange(n_out), i0), 1 - w)
    np.add.at(m, (np.arange(n_out), i1), w)
    return m


def _smooth_noise(rng: np.random.Generator, size: int, cells: int, amplitude: float, chroma: float) -> np.ndarray:
    """Bilinearly upsampled random grid: shared brightness variation plus weaker per-channel tint."""
    grid = rng.normal(0.0, amplitude, size=(1, cells, cells)) + rng.normal(0.0, chroma, size=(3, cells, cells))
    m = _resize_matrix(size, cells)
    return (m @ grid.astype(np.float32) @ m.T).transpose(1, 2, 0)


def _hsv(h: float, s: float, v: float) -> np.ndarray:
    return np.array(colorsys.hsv_to_rgb((h / 360.0) % 1.0, s, v), dtype=np.float32)


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    base = _hsv(rng.uniform(0, 360), rng.uniform(0.05, 0.3), rng.uniform(0.3, 0.7))
    img = base + _smooth_noise(rng, size, int(rng.integers(2, 6)), 0.12, 0.06)
    img += _smooth_noise(rng, size, int(rng.integers(8, 16)), 0.05, 0.02)
    return img


class ShapesDataset(SegmentationSource):
    """Procedural CISS benchmark, deterministic from (seed, split, index, version).

    Ten classes differ in shape, hue and texture; objects may leave the frame and occlude each
    other (larger ones are drawn first). Most images hold one or two classes, as in VOC.
    Version 1 picks an image's classes uniformly and sizes objects from ~6% to ~85% of the side
    (log-uniform), so every old class shows up in about 9% of a later step's images. Version 2
    follows VOC's scenes (a hub class, groups of classes that share scenes, classes seen alone,
    skewed frequencies) with a large lead object, so most old classes are missing from later
    steps and foreground covers about a quarter of the pixels. Samples are memoised, so epochs
    after the first cost nothing.
    """

    name = "shapes"
    num_classes = len(CLASSES)
    class_names = ["background"] + [c[0] for c in CLASSES]
    palette = color_map(len(CLASSES) + 1)

    def __init__(
        self,
        split: str = "train",
        size: int = 2000,
        image_size: int = 64,
        seed: int = 0,
        version: int = DEFAULT_VERSION,
    ):
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; known splits: {list(SPLITS)}")
        if size < 0:
            raise ValueError(f"size must be >= 0, got {size}")
        if not 16 <= image_size <= 512:
            raise ValueError(f"image_size must be in 16..512, got {image_size}")
        if version not in VERSIONS:
            raise ValueError(f"unknown shapes generator version {version!r}; known versions: {list(VERSIONS)}")
        self.split = split
        self.version = version
        self.size = size
        self.image_size = image_size
        self.seed = seed
        self._cache: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self._present: list[frozenset[int]] | None = None

    def __len__(self) -> int:
        return self.size

    def render(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """Image uint8 (H, W, 3) and mask uint8 (H, W) of item i, generated from scratch."""
        i = self._check_index(i)
        rng = np.random.default_rng([self.seed, SPLITS[self.split], i])
        side = self.image_size
        img = _background(rng, side)
        mask = np.zeros((side, side), dtype=np.uint8)

        objects = _objects_v1(rng, side) if self.version == 1 else _objects_v2(rng, side)
        objects.sort(key=lambda o: -o[0])  # large first, so small objects end up on top

        for diameter, c, (cx, cy), r in objects:
            shape, hue, texture, max_rot = CLASSES[c - 1]
            radius = diameter / 2
            y0, y1 = max(0, int(cy - radius)), min(side, int(math.ceil(cy + radius)) + 1)
            x0, x1 = max(0, int(cx - radius)), min(side, int(math.ceil(cx + radius)) + 1)
            if y0 >= y1 or x0 >= x1:
                continue
            theta = math.radians((2 * r[0] - 1) * max_rot)
            dy = (np.arange(y0, y1, dtype=np.float32) + 0.5 - cy)[:, None]
            dx = (np.arange(x0, x1, dtype=np.float32) + 0.5 - cx)[None, :]
            cos, sin = math.cos(theta), math.sin(theta)
            u = (dx * cos + dy * sin) / radius
            v = (dy * cos - dx * sin) / radius
            inside = _shape(shape, u, v)
            if not inside.any():
                continue
            main = _hsv(hue + 12 * (r[1] - 0.5), 0.75 + 0.2 * r[2], 0.75 + 0.2 * r[3])
            dark = main * (0.35 + 0.2 * r[4])
            t = _texture(texture, u[inside], v[inside], max(4.0 / radius, 2 / 3))[:, None]
            img[y0:y1, x0:x1][inside] = main * (1 - t) + dark * t
            mask[y0:y1, x0:x1][inside] = c

        if self.version == 1:
            img += rng.normal(0.0, 0.03, size=img.shape).astype(np.float32)
        else:  # float32 draws cost less, which pays for version 2's larger objects
            img += np.float32(0.03) * rng.standard_normal(img.shape, dtype=np.float32)
        return (np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8), mask

    def load(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Image uint8 (3, H, W) and mask uint8 (H, W) of item i."""
        i = self._check_index(i)
        if i not in self._cache:
            img, mask = self.render(i)
            self._cache[i] = (np.ascontiguousarray(img.transpose(2, 0, 1)), mask)
        # numpy copies: torch's threaded copy costs more than the copy itself on images this small
        img, mask = self._cache[i]
        return torch.from_numpy(img.copy()), torch.from_numpy(mask.copy())

    def load_mask(self, i: int) -> torch.Tensor:
        """Mask uint8 (H, W) of item i; rendered without keeping the image, so scanning labels holds no pixels."""
        i = self._check_index(i)
        if i in self._cache:
            return torch.from_numpy(self._cache[i][1].copy())
        return torch.from_numpy(self.render(i)[1])

    def all_labels_present(self) -> list[frozenset[int]]:
        """labels_present for every item, in index order; scanned once (every step's split reads it)."""
        if self._present is None:
            self._present = super().all_labels_present()
        return list(self._present)

    def __getstate__(self) -> dict:
        # The rendered images stay where they were drawn: a copy sent to a worker draws its own.
        state = dict(self.__dict__)
        state["_cache"] = {}
        return state

    def item_id(self, i: int) -> str:
        """'shapes/<split>/<index>'."""
        return f"shapes/{self.split}/{self._check_index(i)}"

    def identity(self) -> dict:
        """Generator version, split, seed and sizes."""
        return {
            "name": self.name,
            "version": self.version,
            "split": self.split,
            "seed": self.seed,
            "size": self.size,
            "image_size": self.image_size,
        }
