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


def data_parallel() -> bool:
    """Whether this process is one of several data-parallel workers."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class GlobalBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics are those of the batch summed over every process of the group."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalise with global batch statistics in training, with the running ones in evaluation."""
        if not (self.training and data_parallel()):
            return super().forward(x)
        dtype = x.dtype
        x = x.float()  # statistics in float32 under bfloat16 autocast too
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
        return out.to(dtype)


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
