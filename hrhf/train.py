"""Plain training and evaluation loops of one incremental step (no Ray; the Ray trainer reuses them)."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from hrhf.config import MethodConfig
from hrhf.pixels import normalize
from hrhf.inversion import NonFiniteError, SyntheticSet
from hrhf.losses import predicted_classes
from hrhf.methods import needs_teacher_on_real, step_loss
from hrhf.metrics import ConfusionMatrix
from hrhf.models import classifier_layers

Batch = tuple[torch.Tensor, torch.Tensor, "torch.Tensor | None"]


def fake_batch_size(real_batch_size: int, fake_ratio: float) -> int:
    """Synthetic images per batch so that they make up ``fake_ratio`` of it, real images kept as they are."""
    return max(1, round(real_batch_size * fake_ratio / (1.0 - fake_ratio))) if fake_ratio > 0 else 0


def sample_fake(fake: SyntheticSet, count: int, generator: torch.Generator) -> torch.Tensor:
    """A random batch of normalised synthetic images, each flipped with probability 1/2."""
    index = torch.randint(len(fake), (count,), generator=generator)
    images = normalize(fake.images[index])
    flip = torch.rand(count, generator=generator) < 0.5
    images[flip] = images[flip].flip(-1)
    return images


def mixed_batches(
    real_loader: Iterable[tuple[torch.Tensor, torch.Tensor]],
    fake: SyntheticSet | None,
    fake_ratio: float,
    generator: torch.Generator,
) -> Iterator[Batch]:
    """Yield (real images, real labels, fake images or None): the half-real half-fake batches."""
    for images, labels in real_loader:
        fake_images = None
        if fake is not None and len(fake) and fake_ratio > 0:
            fake_images = sample_fake(fake, fake_batch_size(len(images), fake_ratio), generator)
        yield images, labels, fake_images


def cosine_lr(base_lr: float, total_iters: int) -> Callable[[int], float]:
    """Learning rate at iteration i: short linear warm-up, then cosine decay to zero."""
    warmup = max(1, total_iters // 30)

    def lr_at(i: int) -> float:
        if i < warmup:
            return base_lr * (i + 1) / warmup
        return base_lr * 0.5 * (1 + math.cos(math.pi * (i - warmup) / max(1, total_iters - warmup)))

    return lr_at


def train_steps(
    student: nn.Module,
    teacher: nn.Module | None,
    batches: Iterable[Batch],
    optimizer: torch.optim.Optimizer,
    lr_at: Callable[[int], float],
    first_iter: int,
    method: MethodConfig,
    n_old: int,
    device: str = "cpu",
    freeze_bn: bool = False,
    clip_grad: float = 0.0,
) -> tuple[int, dict[str, float]]:
    """Run the shared step loss over ``batches``; returns the next iteration index and mean loss parts.

    ``freeze_bn`` keeps BatchNorm layers on their running statistics (still training their affine
    weights), so that neither a shift in the step's data nor the synthetic half moves them.
    ``clip_grad`` > 0 clips the gradient norm, which keeps rare loss spikes from wiping out a step.
    A non-finite loss or gradient raises NonFiniteError before the optimiser steps.
    """
    student.train()
    if freeze_bn:
        for module in student.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eval()
    totals: dict[str, float] = {}
    count = 0
    it = first_iter
    use_teacher_real = teacher is not None and needs_teacher_on_real(method)
    for images, labels, fake_images in batches:
        for group in optimizer.param_groups:
            group["lr"] = lr_at(it) * group.get("lr_scale", 1.0)
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        n_real = len(images)
        inputs = images if fake_images is None else torch.cat([images, fake_images.to(device)])
        outputs = student(inputs)
        teacher_out = None
        if teacher is not None and (use_teacher_real or fake_images is not None):
            with torch.no_grad():
                teacher_in = inputs if use_teacher_real else inputs[n_real:]
                teacher_out = teacher(teacher_in)
                if not use_teacher_real:
                    teacher_out = torch.cat([teacher_out.new_zeros(n_real, *teacher_out.shape[1:]), teacher_out])
        loss, parts = step_loss(
            method,
            n_old,
            outputs[:n_real],
            labels,
            teacher_real=None if teacher_out is None else teacher_out[:n_real],
            student_fake=None if fake_images is None else outputs[n_real:],
            teacher_fake=None if fake_images is None or teacher_out is None else teacher_out[n_real:],
        )
        parts["loss"] = float(loss.detach())
        if not math.isfinite(parts["loss"]):
            terms = ", ".join(f"{name}={value:.4g}" for name, value in parts.items())
            raise NonFiniteError(f"iteration {it}: non-finite loss ({terms})")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        # The norm is computed even without clipping: a non-finite gradient must stop the step, not reach the weights.
        grad_norm = float(torch.nn.utils.clip_grad_norm_(student.parameters(), clip_grad if clip_grad > 0 else math.inf))
        if not math.isfinite(grad_norm):
            raise NonFiniteError(f"iteration {it}: non-finite gradient norm (loss {parts['loss']:.4g})")
        if clip_grad > 0:
            parts["grad_norm"] = grad_norm
        optimizer.step()
        for name, value in parts.items():
            totals[name] = totals.get(name, 0.0) + value
        count += 1
        it += 1
    return it, {name: value / max(count, 1) for name, value in totals.items()}


def make_optimizer(model: nn.Module, lr: float, weight_decay: float, head_lr_mult: float = 1.0) -> torch.optim.Optimizer:
    """SGD with Nesterov momentum; no decay on BatchNorm and biases; the classifier at ``head_lr_mult`` x lr.

    Not Adam: after MiB's initialisation the new classes' weights equal the background's, and Adam's
    sign-like per-coordinate steps move them apart along no useful direction, so the new classes are
    never learnt; SGD moves them apart along the difference of new-class and background features.
    """
    head = {id(p) for layer in classifier_layers(model) for p in layer.parameters()}
    groups = []
    for in_head in (False, True):
        params = [p for p in model.parameters() if (id(p) in head) == in_head]
        scale = head_lr_mult if in_head else 1.0
        groups.append({"params": [p for p in params if p.ndim > 1], "weight_decay": weight_decay, "lr_scale": scale})
        groups.append({"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0, "lr_scale": scale})
    return torch.optim.SGD([g for g in groups if g["params"]], lr=lr, momentum=0.9, nesterov=True)


def real_loader(dataset: Dataset, batch_size: int, seed: int, num_workers: int = 0) -> DataLoader:
    """Shuffled loader of a step's real images; drops the last partial batch when there is more than one."""
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=True,
        drop_last=len(dataset) > batch_size,
        num_workers=num_workers,
        generator=torch.Generator().manual_seed(seed),
        persistent_workers=num_workers > 0,
    )


def fit(
    student: nn.Module,
    teacher: nn.Module | None,
    real: Dataset,
    fake: SyntheticSet | None,
    method: MethodConfig,
    n_old: int,
    epochs: int,
    lr: float,
    batch_size: int,
    weight_decay: float,
    seed: int,
    num_workers: int = 0,
    device: str = "cpu",
    freeze_bn: bool = False,
    clip_grad: float = 0.0,
    head_lr_mult: float = 1.0,
    on_epoch: Callable[[int, dict[str, float]], None] | None = None,
) -> nn.Module:
    """Train ``student`` in-process for ``epochs`` passes over the real data of the step."""
    if len(real) == 0:
        raise ValueError("the step has no training images: no image holds a pixel of its new classes")
    student.to(device)
    if teacher is not None:
        teacher.to(device).eval().requires_grad_(False)
    loader = real_loader(real, batch_size, seed, num_workers)
    optimizer = make_optimizer(student, lr, weight_decay, head_lr_mult)
    lr_at = cosine_lr(lr, epochs * len(loader))
    generator = torch.Generator().manual_seed(seed + 1)
    it = 0
    for epoch in range(epochs):
        batches = mixed_batches(loader, fake if method.fake else None, method.fake_ratio, generator)
        try:
            it, stats = train_steps(student, teacher, batches, optimizer, lr_at, it, method, n_old, device, freeze_bn,
                                    clip_grad)
        except NonFiniteError as err:
            raise NonFiniteError(f"epoch {epoch + 1}/{epochs}, {err}") from None
        if on_epoch is not None:
            on_epoch(epoch, stats)
    return student


@torch.no_grad()
def evaluate(model: nn.Module, dataset: Dataset, num_classes: int, batch_size: int = 32, device: str = "cpu") -> torch.Tensor:
    """Confusion matrix (rows = truth) of ``model`` on ``dataset``; use batch_size 1 for images of mixed sizes."""
    model.to(device).eval()
    confusion = ConfusionMatrix(num_classes)
    loader = DataLoader(dataset, batch_size=batch_size)
    for images, labels in loader:
        pred = predicted_classes(model(images.to(device))).cpu()
        confusion.update(pred, labels)
    return confusion.matrix
