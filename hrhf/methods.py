"""Incremental-learning methods as data, and the one step loss they all configure.

    L = L_ce_real + w_kd_real * L_kd_real + w_pod * L_pod + w_fake * (L_kd_fake + w_ce_fake * L_ce_fake)

FT, LwF, MiB, HRHF and PLOP differ only in which terms are on; joint training is plain CE on
labels of every seen class. PLOP's CE is on entropy-thresholded pseudo-labels, each image weighted by
the share of its background pixels that got one, and L_pod is Local POD over the tapped feature maps
and the logits (the student's new-class logits folded into the background's).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from hrhf import losses
from hrhf.config import MethodConfig

METHODS: dict[str, MethodConfig] = {
    "ft": MethodConfig(name="ft", ce="plain", kd_real="none", fake=False, init="random"),
    "lwf": MethodConfig(name="lwf", ce="plain", kd_real="plain", kd_on_new=True, fake=False, init="random"),
    "mib": MethodConfig(name="mib", ce="unbiased", kd_real="unbiased", kd_on_new=True, fake=False, init="mib"),
    "hrhf": MethodConfig(name="hrhf", ce="unbiased", kd_real="unbiased", fake=True, init="mib"),
    "joint": MethodConfig(name="joint", ce="plain", kd_real="none", fake=False, joint=True),
    "plop": MethodConfig(name="plop", ce="plop", kd_real="none", fake=False, init="mib", pod=True),
}


@dataclass(frozen=True)
class PlopInputs:
    """What PLOP's terms need beyond the logits, for the real half of a batch."""

    thresholds: torch.Tensor | None = None  # (n_old + 1,) entropy thresholds, background first (ce == "plop")
    student_features: Sequence[torch.Tensor] = ()  # tapped maps of the student, in layer order (pod)
    teacher_features: Sequence[torch.Tensor] = ()  # the old model's maps of the same layers (pod)


def needs_teacher_on_real(method: MethodConfig) -> bool:
    """Whether the real half needs the old model's outputs."""
    return method.kd_real != "none" or method.ce in ("pseudo", "plop") or method.pod


def needs_thresholds(method: MethodConfig, n_old: int) -> bool:
    """Whether a step computes PLOP's entropy thresholds before training (incremental steps with ce == "plop")."""
    return method.ce == "plop" and n_old > 0 and not method.joint


def step_loss(
    method: MethodConfig,
    n_old: int,
    student_real: torch.Tensor,
    labels_real: torch.Tensor,
    teacher_real: torch.Tensor | None = None,
    student_fake: torch.Tensor | None = None,
    teacher_fake: torch.Tensor | None = None,
    plop: PlopInputs | None = None,
    mean: losses.PixelMean | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The loss of one batch and its parts; fake tensors are None for methods without a fake half.

    ``n_old`` counts old foreground classes (0 at step 0, where only the CE term applies). ``plop``
    carries the thresholds (ce == "plop") and the tapped feature maps (pod) of the real half. ``mean``
    turns the pixel-averaged terms' sums into means (losses.PixelMean; data-parallel workers).
    """
    parts: dict[str, torch.Tensor] = {}
    if n_old == 0 or method.ce == "plain" or method.joint:
        parts["ce_real"] = losses.cross_entropy(student_real, labels_real, mean)
    elif method.ce == "unbiased":
        parts["ce_real"] = losses.unbiased_cross_entropy(student_real, labels_real, n_old, mean)
    elif method.ce == "plop":
        if teacher_real is None or plop is None or plop.thresholds is None:
            raise ValueError("ce='plop' needs the old model's logits and the step's entropy thresholds")
        targets, image_weights = losses.plop_pseudo_labels(teacher_real, labels_real, n_old, plop.thresholds)
        parts["ce_real"] = losses.weighted_cross_entropy(student_real, targets, image_weights, mean)
    else:
        parts["ce_real"] = losses.cross_entropy(student_real, losses.pseudo_labels(labels_real, teacher_real), mean)
    total = parts["ce_real"]
    if n_old > 0 and not method.joint:
        if method.kd_real != "none":
            kd = losses.unbiased_knowledge_distillation if method.kd_real == "unbiased" else losses.knowledge_distillation
            keep = None if method.kd_on_new else losses.outside_new_classes(labels_real, n_old)
            parts["kd_real"] = kd(student_real, teacher_real, method.kd_temperature, keep, mean)
            total = total + method.w_kd_real * parts["kd_real"]
        if method.pod:
            parts["pod"] = pod_loss(method, n_old, student_real, teacher_real, plop)
            total = total + method.w_pod * parts["pod"]
        if method.fake and student_fake is not None:
            parts["kd_fake"] = losses.knowledge_distillation(student_fake, teacher_fake, method.kd_temperature, mean=mean)
            parts["ce_fake"] = losses.cross_entropy(student_fake, losses.predicted_classes(teacher_fake), mean)
            total = total + method.w_fake * (parts["kd_fake"] + method.w_ce_fake * parts["ce_fake"])
    return total, {name: float(value.detach()) for name, value in parts.items()}


def pod_loss(
    method: MethodConfig,
    n_old: int,
    student_real: torch.Tensor,
    teacher_real: torch.Tensor | None,
    plop: PlopInputs | None,
) -> torch.Tensor:
    """Local POD over the tapped maps followed by the logits, with PLOP's layer weights.

    The student's new-class logits are folded into its background logit so that the last "layer"
    has the old model's channels.
    """
    if teacher_real is None or plop is None or len(plop.student_features) != len(plop.teacher_features):
        raise ValueError("pod needs the old model's logits and matching student and teacher feature maps")
    student_maps = [*plop.student_features, losses.fold_new_into_background(student_real, n_old)]
    teacher_maps = [*plop.teacher_features, teacher_real]
    num_outputs = student_real.shape[1]
    weights = losses.plop_layer_weights(len(student_maps), num_outputs, num_outputs - (n_old + 1))
    return losses.local_pod(student_maps, teacher_maps, method.pod_scales, weights)
