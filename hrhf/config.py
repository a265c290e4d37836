"""Typed configuration: one dataclass tree, loadable from YAML and overridable from the command line."""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


@dataclass
class DataConfig:
    """Which dataset, protocol and class order a run uses."""

    dataset: str = "shapes"  # shapes | voc | ade
    protocol: str = "6-2-2"
    overlap: bool = True  # overlapped (True) or disjoint (False) filtering
    root: str = ""  # VOC / ADE20K root: a local path or an fsspec URI such as s3://bucket/prefix
    class_order: list[int] | None = None  # explicit permutation of 1..N
    order_seed: int | None = None  # or a seeded permutation
    image_size: int = 64  # shapes image side, crop size for real data
    train_size: int = 2000  # shapes: number of training images
    val_size: int = 400  # shapes: number of validation images
    data_seed: int = 0  # shapes: generator seed
    shapes_version: int = 2  # shapes generator: 1 uniform class co-occurrence, 2 VOC-like scenes
    cache_dir: str | None = None  # where computed step splits are cached


@dataclass
class ModelConfig:
    """Segmentation network and where its backbone weights come from."""

    name: str = "small"  # small | deeplabv3_resnet50 | deeplabv3_resnet101 | deeplabv3_mobilenet_v3_large | lraspp_mobilenet_v3_large
    width: int = 16  # channel width of the small network
    backbone_weights: str | None = None  # path or URI of a backbone state dict


@dataclass
class TrainConfig:
    """Optimisation of each step."""

    epochs_base: int = 24
    epochs_step: int = 20
    min_iters_step: int = 400  # incremental steps: epochs are added until a step makes at least this many updates
    batch_size: int = 32
    lr_base: float = 0.05
    lr_step: float = 0.01
    weight_decay: float = 1e-4
    num_workers: int = 0
    # Incremental steps only (the classifier was just widened): a faster classifier, clipped gradients.
    head_lr_mult: float = 10.0
    clip_grad: float = 1.0
    freeze_bn: bool = False  # keep BatchNorm statistics of the previous model
    sync_bn: bool = True  # Ray Train: BatchNorm statistics of the global batch, not of each worker's share
    # bfloat16 autocast of the student's and the old model's passes in training (losses and evaluation stay
    # float32): about 1.6x faster updates on CPUs with AMX (Sapphire Rapids and later) and on GPUs, slower on other CPUs
    bf16: bool = False
    init_checkpoint: str | None = None  # a step-0 checkpoint to start from instead of training step 0


@dataclass
class InversionConfig:
    """SegInversion with Scale-Aware Aggregation (see hrhf.inversion)."""

    iterations: int = 100
    # Above DeepInversion's 0.2: in only 100 iterations, a model trained apart then reads the old model's
    # synthetic objects as their class (benchmarks/inversion_hits.py --judge), and SAA's areas come closer to r
    lr: float = 0.5
    batch_size: int = 64
    scales: list[float] = field(default_factory=lambda: [0.05, 0.1, 0.2, 0.4, 0.6])
    images_per_scale: int = 4  # seeds per (class, scale) target
    aggregation: str = "saa"  # saa | gap | gmp
    # uniform: images_per_scale for every old class; coverage: the same budget, shifted to the old classes
    # the old model sees in fewer than coverage_target of the step's real images (hrhf.inversion.allocate_images)
    allocation: str = "uniform"
    coverage_target: float = 0.2
    coverage_min_pixels: float = 0.01  # share of an image's pixels the old model must give a class to see it
    # True: a class is inverted once, by the model that learnt it from real images (the next step's
    # teacher), and its images are replayed at every later step; False: every step inverts every old
    # class from its own teacher, whose picture of a class it saw only in synthetic images drifts
    keep_images: bool = True
    # The image prior: with a weaker BN weight and almost no TV the old model is fooled by
    # high-frequency noise that a model trained apart does not read as the class, and the student
    # learns the class from noise (benchmarks/inversion_hits.py --judge measures it). Stronger still
    # (w_bn 0.5 and more) shrinks the large objects SAA asks for.
    w_bn: float = 0.2
    first_bn_mult: float = 10.0
    w_tv: float = 1.0
    w_l2: float = 1e-5
    jitter: int = 4
    init_std: float = 1.0  # standard deviation of the starting noise, in normalised pixel units
    # An image whose object covers under retry_below of its ratio r (as the old model labels it) is
    # synthesised once more without jitter, from noise of std retry_init_std; the better of the two is kept.
    retry_below: float = 0.25  # 0: no second try
    retry_init_std: float = 0.1
    flip: bool = True
    bf16: bool = False  # bfloat16 autocast of the teacher's forward (for GPUs; slower on most CPUs)


@dataclass
class MethodConfig:
    """One incremental-learning method as a setting of the shared step loss (see hrhf.methods)."""

    name: str = "hrhf"
    ce: str = "unbiased"  # plain | unbiased | pseudo | plop (entropy-thresholded pseudo-labels, PLOP)
    kd_real: str = "unbiased"  # none | plain | unbiased
    w_kd_real: float = 10.0
    # False: no real-image KD on pixels labelled as a new class, where the old model can only be wrong
    # (it sees a new object as the old class it resembles, and KD pulls the student that way)
    kd_on_new: bool = False  # True in the lwf and mib presets (their published rule)
    kd_temperature: float = 1.0
    fake: bool = True  # train on a synthetic (inverted) half
    fake_ratio: float = 0.5  # share of each batch that is synthetic
    w_fake: float = 1.0
    w_ce_fake: float = 1.0
    init: str = "mib"  # mib | random: how the widened classifier starts
    joint: bool = False  # offline upper bound: all seen classes labelled, trained from scratch
    pod: bool = False  # Local POD distillation of the tapped feature maps and the (folded) logits
    w_pod: float = 1.0  # weight of the Local POD term (its per-layer weights follow PLOP)
    pod_scales: list[int] = field(default_factory=lambda: [1, 2, 4])  # Local POD grid sides
    plop_quantile: float = 0.5  # ce=plop: per-class entropy quantile a pseudo-label must fall below


@dataclass
class Config:
    """The whole run: the same object drives the local run, the Ray job and the sweep."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    inversion: InversionConfig = field(default_factory=InversionConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    seed: int = 0
    device: str = "cpu"
    threads: int = 0  # torch intra-op threads; 0 leaves torch's default


PRESETS: dict[str, dict[str, Any]] = {
    "default": {},
    "smoke": {
        "data": {"train_size": 160, "val_size": 48, "image_size": 48},
        "model": {"width": 8},
        "train": {"epochs_base": 1, "epochs_step": 1, "min_iters_step": 0, "batch_size": 16},
        "inversion": {"iterations": 4, "batch_size": 16, "scales": [0.1, 0.4], "images_per_scale": 1},
    },
}

CHOICES: dict[str, tuple[str, ...]] = {
    "data.dataset": ("shapes", "voc", "ade"),
    "model.name": (
        "small",
        "deeplabv3_resnet50",
        "deeplabv3_resnet101",
        "deeplabv3_mobilenet_v3_large",
        "lraspp_mobilenet_v3_large",
    ),
    "inversion.aggregation": ("saa", "gap", "gmp"),
    "inversion.allocation": ("uniform", "coverage"),
    "method.ce": ("plain", "unbiased", "pseudo", "plop"),
    "method.kd_real": ("none", "plain", "unbiased"),
    "method.init": ("mib", "random"),
}


AT_LEAST_ONE = ("train.epochs_base", "train.epochs_step", "train.batch_size", "inversion.batch_size",
                "inversion.images_per_scale", "data.image_size", "data.train_size", "data.val_size", "model.width")
POSITIVE = ("train.lr_base", "train.lr_step", "train.head_lr_mult", "inversion.lr", "inversion.init_std",
            "inversion.retry_init_std", "method.kd_temperature")
NON_NEGATIVE = ("train.weight_decay", "train.min_iters_step", "train.clip_grad", "train.num_workers",
                "inversion.iterations", "inversion.w_bn", "inversion.first_bn_mult", "inversion.w_tv", "inversion.w_l2",
                "inversion.jitter", "inversion.retry_below", "method.w_kd_real", "method.w_fake", "method.w_ce_fake",
                "method.w_pod")


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain nested dict of a config (JSON / YAML / torch-checkpoint safe)."""
    return dataclasses.asdict(cfg)


def _coerce(value: Any, hint: Any, key: str) -> Any:
    """Check ``value`` against a type hint, converting int -> float where the hint asks for float."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, key)
            except ValueError as err:
                errors.append(str(err))
        raise ValueError(errors[0] if errors else f"{key}: bad value {value!r}")
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{key}: expected a list, got {value!r}")
        (item_hint,) = typing.get_args(hint)
        return [_coerce(v, item_hint, f"{key}[{i}]") for i, v in enumerate(value)]
    if hint is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str):
        try:  # YAML 1.1 reads 1e-3 (no dot, no sign in the exponent) as a string
            return float(value)
        except ValueError:
            pass
    if hint is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if hint is bool and isinstance(value, bool):
        return value
    if hint is str and isinstance(value, str):
        return value
    raise ValueError(f"{key}: expected {getattr(hint, '__name__', hint)}, got {value!r}")


def _merge(obj: Any, updates: dict[str, Any], prefix: str = "") -> None:
    """Apply a nested dict onto a dataclass in place, rejecting unknown keys and wrong types."""
    hints = typing.get_type_hints(type(obj))
    names = {f.name for f in dataclasses.fields(obj)}
    for name, value in updates.items():
        key = f"{prefix}{name}"
        if name not in names:
            raise ValueError(f"unknown config key '{key}'; valid keys here: {', '.join(sorted(names))}")
        current = getattr(obj, name)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ValueError(f"{key}: expected a mapping of its fields, got {value!r}")
            _merge(current, value, prefix=f"{key}.")
        else:
            setattr(obj, name, _coerce(value, hints[name], key))


def parse_override(text: str) -> dict[str, Any]:
    """Turn 'a.b=value' into {'a': {'b': value}}, the value parsed as YAML (so 0.1, true, [1, 2] work)."""
    if "=" not in text:
        raise ValueError(f"override {text!r} must look like section.key=value")
    dotted, raw = text.split("=", 1)
    value = yaml.safe_load(raw) if raw.strip() else ""
    nested: dict[str, Any] = {}
    node = nested
    parts = dotted.strip().split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    return nested


def validate(cfg: Config) -> Config:
    """Raise ValueError for settings no run can use; return the config unchanged otherwise."""
    flat = {
        f"{section}.{f.name}": getattr(getattr(cfg, section), f.name)
        for section in ("data", "model", "train", "inversion", "method")
        for f in dataclasses.fields(getattr(cfg, section))
    }
    for key, allowed in CHOICES.items():
        if flat[key] not in allowed:
            raise ValueError(f"{key}={flat[key]!r} is not one of {', '.join(allowed)}")
    if not cfg.inversion.scales or any(not 0.0 < r <= 1.0 for r in cfg.inversion.scales):
        raise ValueError(f"inversion.scales must be non-empty values in (0, 1], got {cfg.inversion.scales}")
    for key in ("inversion.coverage_target", "inversion.coverage_min_pixels"):
        if not 0.0 < flat[key] <= 1.0:
            raise ValueError(f"{key} must be in (0, 1], got {flat[key]}")
    if not 0.0 <= cfg.method.fake_ratio < 1.0:
        raise ValueError(f"method.fake_ratio must be in [0, 1), got {cfg.method.fake_ratio}")
    if not 0.0 <= cfg.method.plop_quantile <= 1.0:
        raise ValueError(f"method.plop_quantile must be in [0, 1], got {cfg.method.plop_quantile}")
    if not cfg.method.pod_scales or any(s < 1 for s in cfg.method.pod_scales):
        raise ValueError(f"method.pod_scales must be non-empty grid sides >= 1, got {cfg.method.pod_scales}")
    for key in AT_LEAST_ONE:
        if flat[key] < 1:
            raise ValueError(f"{key} must be >= 1, got {flat[key]}")
    for key in POSITIVE:  # comparisons written so that NaN fails them too
        if not 0 < flat[key] < math.inf:
            raise ValueError(f"{key} must be a finite value > 0, got {flat[key]}")
    for key in NON_NEGATIVE:
        if not 0 <= flat[key] < math.inf:
            raise ValueError(f"{key} must be a finite value >= 0, got {flat[key]}")
    if not (cfg.threads >= 0):
        raise ValueError(f"threads must be >= 0, got {cfg.threads}")
    if cfg.device != "cpu" and cfg.device != "cuda" and not cfg.device.startswith("cuda:"):
        raise ValueError(f"device must be cpu, cuda or cuda:N, got {cfg.device!r}")
    if cfg.data.dataset != "shapes" and not cfg.data.root:
        raise ValueError(f"data.root is required for dataset {cfg.data.dataset!r} (a path or s3:// URI)")
    if cfg.data.shapes_version not in (1, 2):
        raise ValueError(f"data.shapes_version must be 1 or 2, got {cfg.data.shapes_version}")
    if cfg.inversion.keep_images and cfg.inversion.allocation != "uniform":
        raise ValueError("inversion.keep_images inverts each class once, so inversion.allocation must be uniform "
                         "(set inversion.keep_images=false to allocate by coverage)")
    if cfg.data.class_order is not None and cfg.data.order_seed is not None:
        raise ValueError("give data.class_order or data.order_seed, not both")
    return cfg


def load_config(
    preset: str = "default",
    yaml_path: str | Path | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    method: str | None = None,
) -> Config:
    """Build a config: preset, then a method preset, then a YAML file, then 'a.b=value' overrides."""
    from hrhf.methods import METHODS  # methods import this module

    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; presets: {', '.join(PRESETS)}")
    cfg = Config()
    _merge(cfg, PRESETS[preset])
    if method is not None:
        if method not in METHODS:
            raise ValueError(f"unknown method {method!r}; methods: {', '.join(METHODS)}")
        cfg.method = dataclasses.replace(METHODS[method])
    if yaml_path is not None:
        path = Path(yaml_path)
        if not path.is_file():
            raise FileNotFoundError(f"config file not found: {path}")
        loaded = yaml.safe_load(path.read_text()) or {}
        if not isinstance(loaded, dict):
            raise ValueError(f"{path}: top level must be a mapping of config sections")
        _merge(cfg, loaded)
    return apply_overrides(cfg, overrides)


def apply_overrides(cfg: Config, overrides: list[str] | tuple[str, ...]) -> Config:
    """Apply 'a.b=value' overrides in place and return the validated config."""
    for text in overrides:
        _merge(cfg, parse_override(text))
    return validate(cfg)


def from_dict(data: dict[str, Any]) -> Config:
    """Rebuild a config from ``to_dict`` output (for example the one stored in a checkpoint)."""
    cfg = Config()
    _merge(cfg, data)
    return validate(cfg)
