"""BatchNorm over the global batch of a torch.distributed group, on any device.

torch's SyncBatchNorm runs on GPUs only; ``GlobalBatchNorm2d`` is the same computation with one
differentiable all-reduce of per-channel sums, so that CPU workers (gloo) normalise with the
statistics of the whole global batch too, as a single process would.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn
from torch import nn


class GlobalBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics are those of the batch summed over every process of the group."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalise with global batch statistics in training, with the running ones in evaluation."""
        if not (self.training and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        count = torch.tensor([x.numel() / x.shape[1]], dtype=x.dtype, device=x.device)
        local = torch.cat([x.sum(dim=(0, 2, 3)), x.pow(2).sum(dim=(0, 2, 3)), count])
        total = dist_fn.all_reduce(local)  # differentiable: gradients flow back to every process's inputs
        channels = x.shape[1]
        n = total[-1]
        mean = total[:channels] / n
        var = (total[channels : 2 * channels] / n - mean.pow(2)).clamp_min(0)
        with torch.no_grad():
            self.num_batches_tracked += 1
            momentum = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
            self.running_mean.lerp_(mean.detach(), momentum)
            self.running_var.lerp_(var.detach() * n / (n - 1).clamp_min(1), momentum)
        shape = (1, channels, 1, 1)
        out = (x - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            out = out * self.weight.view(shape) + self.bias.view(shape)
        return out


def synchronise_batchnorm(model: nn.Module, device: torch.device) -> nn.Module:
    """Replace every BatchNorm2d by one over the global batch: SyncBatchNorm on CUDA, GlobalBatchNorm2d elsewhere."""
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    for name, child in model.named_children():
        if type(child) is nn.BatchNorm2d:
            replacement = GlobalBatchNorm2d(child.num_features, child.eps, child.momentum, child.affine,
                                            child.track_running_stats)
            replacement.load_state_dict(child.state_dict())
            setattr(model, name, replacement)
        else:
            synchronise_batchnorm(child, device)
    return model


class LeadingRowStatistics:
    """Moves the running statistics of a model's BatchNorm layers with the first ``rows`` images of each batch only.

    The layers still normalise with the statistics of the whole batch. Set ``rows`` before a training
    forward and call ``update()`` after it; with ``rows`` None the layers behave as usual. Under
    torch.distributed the leading rows of every process count, as one process holding the global batch would.
    """

    def __init__(self, model: nn.Module) -> None:
        self.rows: int | None = None
        self.pending: list[tuple[nn.modules.batchnorm._BatchNorm, torch.Tensor, torch.Tensor, torch.Tensor,
                                 torch.Tensor]] = []
        layers = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
        self.handles = [layer.register_forward_pre_hook(self._measure) for layer in layers]

    def _measure(self, layer: nn.modules.batchnorm._BatchNorm, inputs: tuple[torch.Tensor, ...]) -> None:
        if self.rows is None or not layer.training:
            return
        with torch.no_grad():
            x = inputs[0][: self.rows].detach().float()
            dims = [0, *range(2, x.ndim)]
            count = torch.tensor([x.numel() / x.shape[1]], dtype=x.dtype, device=x.device)
            sums = torch.cat([x.sum(dim=dims), x.pow(2).sum(dim=dims), count])
            if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
                dist.all_reduce(sums)
            channels = x.shape[1]
            n = sums[-1]
            mean = sums[:channels] / n
            var = (sums[channels : 2 * channels] / n - mean.pow(2)).clamp_min(0) * n / (n - 1).clamp_min(1)
            self.pending.append((layer, layer.running_mean.clone(), layer.running_var.clone(), mean, var))

    def update(self) -> None:
        """Replace the whole batch's update of each layer's running statistics by the leading rows' one."""
        with torch.no_grad():
            for layer, running_mean, running_var, mean, var in self.pending:
                momentum = layer.momentum if layer.momentum is not None else 1.0 / float(layer.num_batches_tracked)
                layer.running_mean.copy_(running_mean.lerp(mean.to(running_mean.dtype), momentum))
                layer.running_var.copy_(running_var.lerp(var.to(running_var.dtype), momentum))
        self.pending.clear()

    def remove(self) -> None:
        """Detach the hooks."""
        for handle in self.handles:
            handle.remove()
        self.pending.clear()
