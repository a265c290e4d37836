"""Segmentation networks, classifier widening with MiB's initialisation, and the checkpoint format."""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from typing import Any

import fsspec
import torch
import torch.nn.functional as F
from torch import nn

from hrhf.storage import write_bytes_atomic

CHECKPOINT_FORMAT = "hrhf-checkpoint-1"


def _conv_bn(cin: int, cout: int, stride: int = 1, dilation: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride=stride, padding=dilation, dilation=dilation, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class SmallSegNet(nn.Module):
    """A compact BatchNorm encoder (output stride 4) with a dilated context head, for CPU-scale runs."""

    def __init__(self, num_classes: int, width: int = 32) -> None:
        super().__init__()
        w = width
        self.backbone = nn.Sequential(
            _conv_bn(3, w, stride=2),
            _conv_bn(w, w),
            _conv_bn(w, 2 * w, stride=2),
            _conv_bn(2 * w, 2 * w),
            _conv_bn(2 * w, 4 * w, dilation=2),
            _conv_bn(4 * w, 4 * w, dilation=4),
        )
        self.head = nn.Sequential(_conv_bn(4 * w, 4 * w, dilation=8), _conv_bn(4 * w, 4 * w))
        self.classifier = nn.Conv2d(4 * w, num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Per-pixel class logits at the input resolution."""
        logits = self.classifier(self.head(self.backbone(x)))
        return F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)


class TorchvisionSeg(nn.Module):
    """Wraps a torchvision segmentation model so that forward returns the logits tensor."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Per-pixel class logits at the input resolution."""
        return self.net(x)["out"]


# Builders in torchvision.models.segmentation, imported on first use: torchvision takes about a second
# to import, which every synthesis actor of the small model would otherwise pay at start-up.
_TORCHVISION = ("deeplabv3_resnet50", "deeplabv3_resnet101", "deeplabv3_mobilenet_v3_large", "lraspp_mobilenet_v3_large")
MODEL_NAMES = ("small", *_TORCHVISION)


def read_state_dict(uri: str) -> dict[str, torch.Tensor]:
    """Load a state dict (tensors only) from a local path or fsspec URI."""
    try:
        with fsspec.open(uri, "rb") as f:
            payload = torch.load(io.BytesIO(f.read()), map_location="cpu", weights_only=True)
    except FileNotFoundError as err:
        raise FileNotFoundError(f"weights file not found: {uri}") from err
    if isinstance(payload, dict) and "state_dict" in payload:
        payload = payload["state_dict"]
    if not isinstance(payload, dict):
        raise ValueError(f"{uri}: expected a state dict, got {type(payload).__name__}")
    return payload


def build_model(name: str, num_classes: int, width: int = 32, backbone_weights: str | None = None) -> nn.Module:
    """Build a segmentation network by name; backbone weights come from a file or URI, never a hub."""
    if name == "small":
        model: nn.Module = SmallSegNet(num_classes, width)
    elif name in _TORCHVISION:
        from torchvision.models import segmentation as tv_seg

        net = getattr(tv_seg, name)(weights=None, weights_backbone=None, num_classes=num_classes, aux_loss=False)
        model = TorchvisionSeg(net)
    else:
        raise ValueError(f"unknown model {name!r}; models: {', '.join(MODEL_NAMES)}")
    if backbone_weights:
        state = read_state_dict(backbone_weights)
        backbone = model.backbone if name == "small" else model.net.backbone
        own = backbone.state_dict()
        matched = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
        if not matched:
            raise ValueError(f"{backbone_weights}: no tensor matches the {name} backbone")
        missing = sorted(set(own) - set(matched))
        if missing:
            raise ValueError(f"{backbone_weights}: backbone tensors missing or mis-shaped: {missing[:5]}")
        backbone.load_state_dict(matched)
    return model


def classifier_layers(model: nn.Module) -> list[nn.Conv2d]:
    """The final 1x1 convolutions whose outputs are the class logits (two for LR-ASPP, summed)."""
    if isinstance(model, SmallSegNet):
        return [model.classifier]
    from torchvision.models import segmentation as tv_seg

    net = model.net
    if isinstance(net, tv_seg.LRASPP):
        return [net.classifier.low_classifier, net.classifier.high_classifier]
    return [net.classifier[-1]]


def _set_classifier(model: nn.Module, old: nn.Conv2d, new: nn.Conv2d) -> None:
    for module in model.modules():
        for child_name, child in module.named_children():
            if child is old:
                setattr(module, child_name, new)
                return
    raise RuntimeError("classifier layer not found in model")


def num_outputs(model: nn.Module) -> int:
    """Number of output channels (background + classes) of a model."""
    return classifier_layers(model)[-1].out_channels


@dataclass
class ModelSpec:
    """What another process needs to rebuild a model: architecture, width, output count and CPU weights."""

    name: str
    width: int
    num_outputs: int
    state_dict: dict[str, torch.Tensor]

    @classmethod
    def of(cls, model: nn.Module, name: str, width: int) -> ModelSpec:
        """The spec of ``model``, built as ``build_model(name, ..., width)``."""
        state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
        return cls(name=name, width=width, num_outputs=num_outputs(model), state_dict=state)

    def build(self) -> nn.Module:
        """A new model on the CPU with these weights."""
        model = build_model(self.name, self.num_outputs, self.width)
        model.load_state_dict(self.state_dict)
        return model


@torch.no_grad()
def widen_classifier(model: nn.Module, num_new: int, init: str = "mib") -> nn.Module:
    """Add ``num_new`` output channels in place.

    ``init="mib"``: new channels copy the background weights, and the background and new biases become
    ``bg_bias - log(num_new + 1)``, so background + new probabilities sum to the old background
    probability and old-class probabilities are unchanged. ``init="random"``: default conv init.
    """
    if init not in ("mib", "random"):
        raise ValueError(f"unknown classifier init {init!r}")
    layers = classifier_layers(model)
    for i, old in enumerate(layers):
        n_old = old.out_channels
        new = nn.Conv2d(old.in_channels, n_old + num_new, 1, bias=old.bias is not None).to(old.weight.device)
        new.weight[:n_old] = old.weight
        if old.bias is not None:
            new.bias[:n_old] = old.bias
        if init == "mib":
            new.weight[n_old:] = old.weight[:1]
            if old.bias is not None:
                bg_bias = old.bias[0]
                # With two summed heads (LR-ASPP) the log shift is applied once, on the last head.
                shift = math.log(num_new + 1) if i == len(layers) - 1 else 0.0
                new.bias[n_old:] = bg_bias - shift
                new.bias[0] = bg_bias - shift
        _set_classifier(model, old, new)
    return model


def save_checkpoint(
    uri: str,
    model: nn.Module,
    *,
    model_name: str,
    width: int,
    classes: list[list[int]],
    step: int,
    config: dict[str, Any],
    extra: dict[str, Any] | None = None,
) -> None:
    """Write a checkpoint (state dict, class list per step, config) atomically to a path or URI."""
    payload = {
        "format": CHECKPOINT_FORMAT,
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "model": {"name": model_name, "width": width, "num_outputs": num_outputs(model)},
        "classes": [list(map(int, c)) for c in classes],
        "step": int(step),
        "config": config,
        "extra": extra or {},
    }
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    write_bytes_atomic(uri, buffer.getvalue())


def load_checkpoint(uri: str, device: str = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """Load a checkpoint with ``weights_only=True``; returns the rebuilt model and the payload."""
    try:
        with fsspec.open(uri, "rb") as f:
            data = f.read()
    except FileNotFoundError as err:
        raise FileNotFoundError(f"checkpoint not found: {uri}") from err
    try:
        payload = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as err:  # truncated or damaged files fail in zipfile, pickle or torch itself
        raise ValueError(f"{uri} is not a readable checkpoint ({type(err).__name__}: {err})") from None
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{uri} is not an hrhf checkpoint")
    spec = payload["model"]
    model = build_model(spec["name"], spec["num_outputs"], spec["width"])
    try:
        model.load_state_dict(payload["state_dict"])
    except RuntimeError as err:
        raise ValueError(f"{uri}: weights do not fit a {spec['name']} model ({str(err).splitlines()[0]})") from None
    return model.to(device), payload


def check_architecture(payload: dict[str, Any], name: str, width: int, uri: str) -> None:
    """Raise ValueError unless a checkpoint holds the configured architecture (width counts for ``small`` only)."""
    spec = payload["model"]
    if spec["name"] != name or (name == "small" and spec["width"] != width):
        raise ValueError(
            f"checkpoint {uri} holds a {spec['name']} model (width {spec['width']}) but the config asks for "
            f"{name} (width {width}); set model.name / model.width to match or use another checkpoint"
        )
