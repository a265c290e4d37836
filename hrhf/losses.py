"""Losses of incremental segmentation: plain / unbiased cross-entropy and output distillation.

Channel convention: index 0 is background, 1..n_old are the old classes, the rest are new.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from hrhf.tasks import IGNORE_INDEX


def predicted_classes(logits: torch.Tensor) -> torch.Tensor:
    """Per-pixel class of (N, C, H, W) logits, the first maximum on ties.

    ``max(dim=1).indices`` rather than ``argmax(dim=1)``: the same result, and on CPU ``argmax`` over
    the channel dimension of an NCHW tensor is about 20 times slower.
    """
    return logits.max(dim=1).indices


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Pixel-wise cross-entropy, 255 ignored; zero (with a graph) when every pixel is ignored."""
    if not bool((labels != IGNORE_INDEX).any()):
        return logits.sum() * 0.0
    return F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX)


def unbiased_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, n_old: int) -> torch.Tensor:
    """MiB's unbiased CE: a pixel labelled background may be background or any old class.

    The background log-probability becomes log(sum of p over background and old classes).
    """
    log_norm = torch.logsumexp(logits, dim=1, keepdim=True)
    log_bg_or_old = torch.logsumexp(logits[:, : n_old + 1], dim=1, keepdim=True)
    log_probs = torch.cat([log_bg_or_old, logits[:, n_old + 1 :]], dim=1) - log_norm
    # After merging, channel 0 stands for bg+old and new class k sits at k - n_old.
    merged = torch.where((labels > n_old) & (labels != IGNORE_INDEX), labels - n_old, labels)
    merged = torch.where(labels <= n_old, torch.zeros_like(labels), merged)
    if not bool((merged != IGNORE_INDEX).any()):
        return logits.sum() * 0.0
    return F.nll_loss(log_probs, merged, ignore_index=IGNORE_INDEX)


def knowledge_distillation(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """KD on the softmax over the teacher's channels (background + old), averaged over pixels.

    The student's extra (new-class) channels are left out, as in LwF / ILT output distillation.
    """
    n = teacher.shape[1]
    log_q = F.log_softmax(student[:, :n] / temperature, dim=1)
    p = F.softmax(teacher / temperature, dim=1)
    return -(p * log_q).sum(dim=1).mean() * temperature**2 + (p * p.clamp_min(1e-12).log()).sum(1).mean() * temperature**2


def unbiased_knowledge_distillation(
    student: torch.Tensor, teacher: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """MiB's unbiased KD: the student's background probability is background + all new classes."""
    n = teacher.shape[1]
    scaled = student / temperature
    log_norm = torch.logsumexp(scaled, dim=1, keepdim=True)
    log_bg = torch.logsumexp(torch.cat([scaled[:, :1], scaled[:, n:]], dim=1), dim=1, keepdim=True)
    log_q = torch.cat([log_bg, scaled[:, 1:n]], dim=1) - log_norm
    p = F.softmax(teacher / temperature, dim=1)
    return -(p * log_q).sum(dim=1).mean() * temperature**2 + (p * p.clamp_min(1e-12).log()).sum(1).mean() * temperature**2


def pseudo_labels(labels: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Fill pixels labelled background with the teacher's prediction (which may be an old class)."""
    return torch.where(labels == 0, predicted_classes(teacher), labels)
