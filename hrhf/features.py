"""Intermediate feature maps of a segmentation network, captured with forward hooks."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from types import TracebackType

import torch
from torch import nn
from torch.nn.parallel import DataParallel, DistributedDataParallel

from hrhf.models import SmallSegNet, TorchvisionSeg


def unwrap(model: nn.Module) -> nn.Module:
    """The network inside a (Distributed)DataParallel wrapper, or the model itself."""
    while isinstance(model, (DistributedDataParallel, DataParallel)):
        model = model.module
    return model


def default_layers(model: nn.Module) -> list[str]:
    """Names of the modules whose outputs feature distillation uses by default.

    The output of every backbone stage, then the decoder's output just before the classifier where
    the network has a single one (SmallSegNet's head, DeepLabV3's head); LR-ASPP has none, as its two
    classifiers read different maps.
    """
    model = unwrap(model)
    if isinstance(model, SmallSegNet):
        # backbone blocks 0-1, 2-3 and 4-5 form the three stages (widths w, 2w and 4w).
        return ["backbone.1", "backbone.3", "backbone.5", "head"]
    if not isinstance(model, TorchvisionSeg):
        raise ValueError(f"no default feature layers for {type(model).__name__}; pass the layer names")
    from torchvision.models import segmentation as tv_seg

    net = model.net
    blocks = dict(net.backbone.named_children())
    if "layer4" in blocks:  # ResNet
        layers = [f"net.backbone.layer{i}" for i in range(1, 5)]
    else:  # MobileNetV3: a stage ends just before each block that downsamples, and at the last block
        names = list(blocks)
        ends = [names[i - 1] for i, name in enumerate(names) if i > 0 and getattr(blocks[name], "_is_cn", False)]
        layers = [f"net.backbone.{name}" for name in [*ends, names[-1]]]
    if isinstance(net, tv_seg.DeepLabV3):
        layers.append(f"net.classifier.{len(net.classifier) - 2}")  # the ReLU before the last 1x1 conv
    return layers


class FeatureTap:
    """Keeps the latest outputs of named modules of a model until its hooks are removed.

    Hooks go on the inner module of a DDP / DataParallel wrapper, so the wrapped model's forward
    fills the tap. Usable as a context manager, which removes the hooks on exit.
    """

    def __init__(self, model: nn.Module, layers: Sequence[str] | None = None) -> None:
        inner = unwrap(model)
        self.layers = list(layers) if layers is not None else default_layers(inner)
        modules = dict(inner.named_modules())
        missing = [name for name in self.layers if name not in modules]
        if missing:
            raise ValueError(f"no module named {missing} in {type(inner).__name__}")
        self.outputs: dict[str, torch.Tensor] = {}
        self._handles = [modules[name].register_forward_hook(self._keeper(name)) for name in self.layers]

    def _keeper(self, name: str) -> Callable[[nn.Module, tuple, torch.Tensor], None]:
        def keep(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
            self.outputs[name] = output

        return keep

    @property
    def features(self) -> list[torch.Tensor]:
        """The latest output of every tapped layer, in layer order."""
        missing = [name for name in self.layers if name not in self.outputs]
        if missing:
            raise RuntimeError(f"layers {missing} have not run since the tap was set or cleared")
        return [self.outputs[name] for name in self.layers]

    def clear(self) -> None:
        """Forget the kept outputs (and the graphs they hold)."""
        self.outputs.clear()

    def remove(self) -> None:
        """Remove the hooks; the outputs already kept stay readable."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def __enter__(self) -> FeatureTap:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.remove()
