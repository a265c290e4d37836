"""Incremental-learning methods as data, and the one step loss they all configure.

    L = L_ce_real + w_kd_real * L_kd_real + w_fake * (L_kd_fake + w_ce_fake * L_ce_fake)

FT, LwF, MiB and HRHF differ only in which terms are on; joint training is plain CE on
labels of every seen class.
"""

from __future__ import annotations

import torch

from hrhf import losses
from hrhf.config import MethodConfig

METHODS: dict[str, MethodConfig] = {
    "ft": MethodConfig(name="ft", ce="plain", kd_real="none", fake=False, init="random"),
    "lwf": MethodConfig(name="lwf", ce="plain", kd_real="plain", fake=False, init="random"),
    "mib": MethodConfig(name="mib", ce="unbiased", kd_real="unbiased", fake=False, init="mib"),
    "hrhf": MethodConfig(name="hrhf", ce="unbiased", kd_real="unbiased", fake=True, init="mib"),
    "joint": MethodConfig(name="joint", ce="plain", kd_real="none", fake=False, joint=True),
}


def needs_teacher_on_real(method: MethodConfig) -> bool:
    """Whether the real half needs the old model's outputs."""
    return method.kd_real != "none" or method.ce == "pseudo"


def step_loss(
    method: MethodConfig,
    n_old: int,
    student_real: torch.Tensor,
    labels_real: torch.Tensor,
    teacher_real: torch.Tensor | None = None,
    student_fake: torch.Tensor | None = None,
    teacher_fake: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The loss of one batch and its parts; fake tensors are None for methods without a fake half.

    ``n_old`` counts old foreground classes (0 at step 0, where only the CE term applies).
    """
    parts: dict[str, torch.Tensor] = {}
    if n_old == 0 or method.ce == "plain" or method.joint:
        parts["ce_real"] = losses.cross_entropy(student_real, labels_real)
    elif method.ce == "unbiased":
        parts["ce_real"] = losses.unbiased_cross_entropy(student_real, labels_real, n_old)
    else:
        parts["ce_real"] = losses.cross_entropy(student_real, losses.pseudo_labels(labels_real, teacher_real))
    total = parts["ce_real"]
    if n_old > 0 and not method.joint:
        if method.kd_real != "none":
            kd = losses.unbiased_knowledge_distillation if method.kd_real == "unbiased" else losses.knowledge_distillation
            parts["kd_real"] = kd(student_real, teacher_real, method.kd_temperature)
            total = total + method.w_kd_real * parts["kd_real"]
        if method.fake and student_fake is not None:
            parts["kd_fake"] = losses.knowledge_distillation(student_fake, teacher_fake, method.kd_temperature)
            parts["ce_fake"] = losses.cross_entropy(student_fake, losses.predicted_classes(teacher_fake))
            total = total + method.w_fake * (parts["kd_fake"] + method.w_ce_fake * parts["ce_fake"])
    return total, {name: float(value.detach()) for name, value in parts.items()}
