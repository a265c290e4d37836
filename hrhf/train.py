"""The epoch driver of one incremental step, written once for the in-process and the Ray Train path.

Which images make up a batch is a pure function of the step's seed, the epoch and the batch index,
never of the number of workers: each epoch shuffles the step's real images into global batches of
``batch_size``; the synthetic half of global batch g is the run of ``fake_per_batch`` images that
starts at g * fake_per_batch in the synthetic set, read cyclically (the targets are interleaved, so any
run mixes classes and scales); every augmentation draw is seeded by (seed, epoch, item). A worker of
``world`` takes its contiguous share of each global batch. One worker and N workers therefore see
the same images in the same order. BatchNorm statistics (``train.sync_bn``) and every pixel-averaged
loss term (``global_pixel_mean``) are taken over the global batch, so their gradients are one process's.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from hrhf.batchnorm import data_parallel
from hrhf.config import Config, MethodConfig
from hrhf.features import FeatureTap
from hrhf.inversion import NonFiniteError, SyntheticData, SyntheticSet
from hrhf.losses import entropy_histogram, histogram_quantiles, predicted_classes
from hrhf.methods import PlopInputs, needs_teacher_on_real, needs_thresholds, step_loss
from hrhf.metrics import ConfusionMatrix
from hrhf.models import classifier_layers
from hrhf.pixels import normalize
from hrhf.schedule import warmup_cosine

# real images, their labels, the synthetic half, and the old model's logits on that half (None: computed in the step)
Batch = tuple[torch.Tensor, torch.Tensor, "torch.Tensor | None", "torch.Tensor | None"]
# Largest set of the old model's logits on the synthetic images (both orientations) that fit() keeps in memory
FAKE_LOGITS_BUDGET = 1 << 30


@dataclass(frozen=True)
class StepPlan:
    """How one step trains, whoever runs it: the step loss, the schedule and the global batch."""

    step: int
    method: MethodConfig
    n_old: int  # old classes the distillation terms cover (0 on step 0 and for joint training)
    epochs: int
    lr: float
    batch_size: int  # real images per global batch, split over the workers
    weight_decay: float
    seed: int
    freeze_bn: bool = False  # keep BatchNorm layers on their running statistics
    clip_grad: float = 0.0  # > 0: clip the gradient norm
    head_lr_mult: float = 1.0  # learning-rate multiplier of the classifier
    bf16: bool = False  # bfloat16 autocast of the network passes

    @property
    def fake_per_batch(self) -> int:
        """Synthetic images per global batch, so that they make up ``fake_ratio`` of it."""
        return fake_batch_size(self.batch_size, self.method.fake_ratio) if self.method.fake else 0


@dataclass
class StepJob:
    """Everything one step's training needs; picklable, so a distributed trainer can ship it."""

    step: int
    student: nn.Module
    teacher: nn.Module | None
    real: Dataset
    fake: SyntheticData | None
    plan: StepPlan
    cfg: Config
    val: Dataset | None = None  # when given, the trainer also scores the trained student on it


@dataclass
class TrainedStep:
    """A trained student, and its confusion matrix on the job's validation set (None without one)."""

    model: nn.Module
    confusion: torch.Tensor | None = None


def plan_step(cfg: Config, step: int, n_old: int, incremental: bool, num_real: int | None = None) -> StepPlan:
    """The plan of a step: base settings on step 0 and joint training, incremental ones after.

    With ``num_real`` (the step's real training images), an incremental step gets the epochs of
    ``step_epochs``, so that a step with few images still makes ``train.min_iters_step`` updates.
    """
    train = cfg.train
    epochs = train.epochs_base
    if incremental:
        epochs = train.epochs_step
        if num_real is not None:
            epochs = step_epochs(train.epochs_step, train.min_iters_step, num_real, train.batch_size)
    return StepPlan(
        step=step,
        method=cfg.method,
        n_old=n_old,
        epochs=epochs,
        lr=train.lr_step if incremental else train.lr_base,
        batch_size=train.batch_size,
        weight_decay=train.weight_decay,
        seed=cfg.seed * 100 + step,
        freeze_bn=train.freeze_bn and incremental,
        clip_grad=train.clip_grad if incremental else 0.0,
        head_lr_mult=train.head_lr_mult if incremental else 1.0,
        bf16=train.bf16,
    )


def fake_batch_size(real_batch_size: int, fake_ratio: float) -> int:
    """Synthetic images per batch so that they make up ``fake_ratio`` of it, real images kept as they are."""
    return max(1, round(real_batch_size * fake_ratio / (1.0 - fake_ratio))) if fake_ratio > 0 else 0


def epoch_batches(num_items: int, batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """The global batches (item indices) of an epoch; the last partial batch is dropped when there is more than one."""
    order = np.random.default_rng([seed, epoch]).permutation(num_items).tolist()
    if num_items <= batch_size:
        return [order]
    return [order[i : i + batch_size] for i in range(0, num_items - batch_size + 1, batch_size)]


def iters_per_epoch(num_items: int, batch_size: int) -> int:
    """How many global batches an epoch of ``num_items`` images holds."""
    return 1 if num_items <= batch_size else num_items // batch_size


def step_epochs(epochs: int, min_iters: int, num_items: int, batch_size: int) -> int:
    """``epochs``, raised to the fewest epochs over ``num_items`` images that make at least ``min_iters`` updates."""
    return max(epochs, math.ceil(min_iters / iters_per_epoch(num_items, batch_size)))


def share(count: int, rank: int, world: int) -> slice:
    """The contiguous part of ``count`` positions that worker ``rank`` of ``world`` takes."""
    return slice(count * rank // world, count * (rank + 1) // world)


def item_seed(seed: int, epoch: int, item: int) -> int:
    """Seed of every random draw of the augmentation of one item in one epoch."""
    return int(np.random.SeedSequence([seed, epoch, item]).generate_state(1)[0])


class SeededItems(Dataset):
    """A step dataset indexed by (epoch, item): each item is augmented with draws seeded by item_seed."""

    def __init__(self, dataset: Dataset, seed: int) -> None:
        self.dataset = dataset
        self.seed = seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int] | int) -> tuple[torch.Tensor, torch.Tensor]:
        """Item ``key = (epoch, item)`` with that epoch's augmentation; an int is the item at epoch 0."""
        epoch, item = (0, key) if isinstance(key, int) else key
        # torchvision's v2 transforms draw from torch's global generator
        with torch.random.fork_rng(devices=[]):
            # the CPU generator only: torch.manual_seed also seeds CUDA, lazily, and records a stack trace for it
            # every call, which cost a tenth of a training step on small images
            torch.default_generator.manual_seed(item_seed(self.seed, epoch, item))
            return self.dataset[item]


def collate_items(items: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack (image, mask) pairs into a batch."""
    return torch.stack([image for image, _ in items]), torch.stack([mask for _, mask in items])


class FakeSource(Protocol):
    """Where a worker's synthetic images come from: uint8 images at cyclic positions of the synthetic set."""

    def __len__(self) -> int: ...

    def take(self, positions: Sequence[int]) -> torch.Tensor:
        """uint8 (n, 3, H, W) images at ``positions`` (taken modulo the set's size, never decreasing)."""
        ...


class InMemoryFake:
    """A FakeSource over a synthetic set held in memory (the in-process path)."""

    def __init__(self, images: torch.Tensor) -> None:
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def take(self, positions: Sequence[int]) -> torch.Tensor:
        """Images at ``positions`` modulo the set's size."""
        return self.images[torch.tensor(positions, dtype=torch.long) % len(self.images)]


def forward(model: nn.Module, images: torch.Tensor, bf16: bool = False) -> torch.Tensor:
    """``model(images)`` as float32 logits, computed under bfloat16 autocast when ``bf16``."""
    with torch.autocast(images.device.type, dtype=torch.bfloat16, enabled=bf16):
        return model(images).float()


class OldModelLogits:
    """The frozen old model's logits on the rows of a synthetic set, as they are and flipped, kept from a row's first visit.

    A step's synthetic rows stay fixed and only flips vary, so each row costs the old model two passes
    per step instead of one per visit (a row is visited about 35 times in a 400-update step). The
    in-process trainer and a Ray Train worker, which streams its rows, keep them alike. When the whole
    set's logits would exceed ``budget`` bytes, nothing is kept and ``rows`` returns None: the caller then
    runs the old model on every batch.
    """

    def __init__(self, teacher: nn.Module, num_rows: int, device: str = "cpu", bf16: bool = False,
                 budget: int = FAKE_LOGITS_BUDGET) -> None:
        self.teacher, self.num_rows, self.device, self.bf16, self.budget = teacher, num_rows, device, bf16, budget
        self.logits: torch.Tensor | None = None  # (num_rows, 2, C, H, W) on the CPU, allocated on the first visit
        self.known = torch.zeros(num_rows, dtype=torch.bool)
        self.over_budget = False

    @torch.no_grad()
    def rows(self, positions: Sequence[int], images: torch.Tensor) -> torch.Tensor | None:
        """Logits (n, 2, C, H, W) of the uint8 ``images`` at ``positions`` (modulo the set's size), or None over budget."""
        if self.over_budget or not len(positions):
            return None
        rows = torch.tensor(positions, dtype=torch.long) % self.num_rows
        first_visit: dict[int, int] = {}  # new row -> its first index here (a set smaller than the batch repeats)
        for i, (row, known) in enumerate(zip(rows.tolist(), self.known[rows].tolist())):
            if not known:
                first_visit.setdefault(row, i)
        new = list(first_visit.values())
        if new:
            batch = normalize(images[new].to(self.device))
            fresh = torch.stack([forward(self.teacher, batch, self.bf16), forward(self.teacher, batch.flip(-1), self.bf16)],
                                dim=1).cpu()
            if self.logits is None:
                if self.num_rows * fresh[0].numel() * fresh.element_size() > self.budget:
                    self.over_budget = True
                    return None
                self.logits = fresh.new_empty(self.num_rows, *fresh.shape[1:])
            self.logits[rows[new]] = fresh
            self.known[rows[new]] = True
        return self.logits[rows]


def old_model_logits(teacher: nn.Module | None, num_rows: int, plan: StepPlan, device: str) -> OldModelLogits | None:
    """A keeper of the old model's logits on a step's synthetic rows, or None where no batch would read them."""
    if teacher is None or not num_rows or not plan.fake_per_batch:
        return None
    return OldModelLogits(teacher, num_rows, device, plan.bf16)


def fake_share(
    source: FakeSource, plan: StepPlan, global_batch: int, rank: int, world: int,
    old_logits: OldModelLogits | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """This worker's part of the synthetic half of global batch ``global_batch``: normalised, some flipped;
    and the old model's logits on it, as flipped, when ``old_logits`` keeps them."""
    count = plan.fake_per_batch
    part = share(count, rank, world)
    flips = torch.rand(count, generator=torch.Generator().manual_seed(plan.seed * 1_000_003 + global_batch))[part] < 0.5
    start = global_batch * count
    positions = range(start + part.start, start + part.stop)
    raw = source.take(positions)
    logits = old_logits.rows(positions, raw) if old_logits is not None else None
    images = normalize(raw)
    images[flips] = images[flips].flip(-1)
    if logits is not None:
        logits = logits[torch.arange(len(logits)), flips.long()]
    return images, logits


def mixed_batches(
    real: Iterable[tuple[torch.Tensor, torch.Tensor]],
    fake: FakeSource | None,
    plan: StepPlan,
    epoch: int,
    iters: int,
    rank: int = 0,
    world: int = 1,
    old_logits: OldModelLogits | None = None,
) -> Iterator[Batch]:
    """Yield Batches: this worker's share of each half-real half-fake batch.

    ``iters`` is the number of global batches per epoch, which numbers the global batches of the step.
    With ``old_logits`` the synthetic half carries the old model's logits on it.
    """
    first = epoch * iters
    for b, (images, labels) in enumerate(real):
        fake_images = fake_logits = None
        if fake is not None and len(fake) and plan.fake_per_batch:
            fake_images, fake_logits = fake_share(fake, plan, first + b, rank, world, old_logits)
        yield images, labels, fake_images, fake_logits


def global_pixel_mean(total: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """losses.PixelMean over the global batch of data-parallel workers: this worker's sum over the mean count per worker.

    DDP averages the workers' gradients, so the average is the gradient of the sum over every worker's
    pixels divided by their total count: one process's mean over the whole batch.
    """
    counts = count.detach().to(device=total.device, dtype=torch.float64).reshape(1)
    dist.all_reduce(counts)
    return total * (dist.get_world_size() / counts.clamp_min(1)).to(total.dtype)


def train_steps(
    student: nn.Module,
    teacher: nn.Module | None,
    batches: Iterable[Batch],
    optimizer: torch.optim.Optimizer,
    lr_at: Callable[[int], float],
    first_iter: int,
    plan: StepPlan,
    device: str = "cpu",
    thresholds: torch.Tensor | None = None,
) -> tuple[int, dict[str, float]]:
    """Run the shared step loss over ``batches``; returns the next iteration index and mean loss parts.

    ``plan.freeze_bn`` keeps BatchNorm layers on their running statistics (still training their affine
    weights), so that neither a shift in the step's data nor the synthetic half moves them.
    ``plan.clip_grad`` > 0 clips the gradient norm, which keeps rare loss spikes from wiping out a step.
    A non-finite loss or gradient raises NonFiniteError before the optimiser steps.
    A batch that carries the old model's logits on its synthetic half spares the old model's pass over it.
    ``thresholds`` are PLOP's entropy thresholds of the step (ce == "plop"); with ``method.pod`` the
    student and the teacher are tapped at their default feature layers for Local POD.
    """
    method = plan.method
    student.train()
    if plan.freeze_bn:
        for module in student.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eval()
    totals: dict[str, float] = {}
    count = 0
    it = first_iter
    use_teacher_real = teacher is not None and needs_teacher_on_real(method)
    use_pod = method.pod and teacher is not None and plan.n_old > 0 and not method.joint
    taps = (FeatureTap(student), FeatureTap(teacher)) if use_pod else ()
    # Workers' shares of a batch can hold different numbers of labelled pixels: average over the whole batch.
    mean = global_pixel_mean if data_parallel() else None
    try:
        for images, labels, fake_images, fake_logits in batches:
            for group in optimizer.param_groups:
                group["lr"] = lr_at(it) * group.get("lr_scale", 1.0)
            images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
            n_real = len(images)
            inputs = images if fake_images is None else torch.cat([images, fake_images.to(device)])
            outputs = forward(student, inputs, plan.bf16)
            teacher_out = None
            if teacher is not None and fake_logits is not None:
                fake_logits = fake_logits.to(device, non_blocking=True)
                real_out = fake_logits.new_zeros(n_real, *fake_logits.shape[1:])
                if use_teacher_real:
                    with torch.no_grad():
                        real_out = forward(teacher, images, plan.bf16)
                teacher_out = torch.cat([real_out, fake_logits])
            elif teacher is not None and (use_teacher_real or fake_images is not None):
                with torch.no_grad():
                    teacher_in = inputs if use_teacher_real else inputs[n_real:]
                    teacher_out = forward(teacher, teacher_in, plan.bf16)
                    if not use_teacher_real:
                        teacher_out = torch.cat([teacher_out.new_zeros(n_real, *teacher_out.shape[1:]), teacher_out])
            plop = None
            if thresholds is not None or taps:
                student_maps, teacher_maps = [[f[:n_real].float() for f in tap.features] for tap in taps] if taps else [(), ()]
                plop = PlopInputs(thresholds=thresholds, student_features=student_maps, teacher_features=teacher_maps)
            loss, parts = step_loss(
                method,
                plan.n_old,
                outputs[:n_real],
                labels,
                teacher_real=None if teacher_out is None else teacher_out[:n_real],
                student_fake=None if fake_images is None else outputs[n_real:],
                teacher_fake=None if fake_images is None or teacher_out is None else teacher_out[n_real:],
                plop=plop,
                mean=mean,
            )
            for tap in taps:
                tap.clear()
            parts["loss"] = float(loss.detach())
            if not math.isfinite(parts["loss"]):
                terms = ", ".join(f"{name}={value:.4g}" for name, value in parts.items())
                raise NonFiniteError(f"iteration {it}: non-finite loss ({terms})")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            # The norm is computed even without clipping: a non-finite gradient must stop the step, not reach the weights.
            clip = plan.clip_grad if plan.clip_grad > 0 else math.inf
            grad_norm = float(torch.nn.utils.clip_grad_norm_(student.parameters(), clip))
            if not math.isfinite(grad_norm):
                raise NonFiniteError(f"iteration {it}: non-finite gradient norm (loss {parts['loss']:.4g})")
            if plan.clip_grad > 0:
                parts["grad_norm"] = grad_norm
            optimizer.step()
            for name, value in parts.items():
                totals[name] = totals.get(name, 0.0) + value
            count += 1
            it += 1
    finally:
        for tap in taps:
            tap.remove()
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


def step_lr(plan: StepPlan, iters: int) -> Callable[[int], float]:
    """The step's schedule: warm-up over 1/30 of the iterations, then cosine decay."""
    return warmup_cosine(plan.lr, plan.epochs * iters, warmup_divisor=30)


EpochCallback = Callable[[int, int, dict[str, float]], None]  # (epoch, next iteration, mean loss parts)


def run_epochs(
    student: nn.Module,
    teacher: nn.Module | None,
    plan: StepPlan,
    batches_of_epoch: Callable[[int], Iterable[Batch]],
    iters: int,
    optimizer: torch.optim.Optimizer,
    device: str = "cpu",
    start_epoch: int = 0,
    on_epoch: EpochCallback | None = None,
    threshold_batches: Callable[[], Iterable[tuple[torch.Tensor, ...]]] | None = None,
) -> nn.Module:
    """The epoch driver: ``plan.epochs`` passes of the step loss over ``batches_of_epoch(epoch)``.

    ``iters`` is the number of global batches per epoch (it fixes the schedule); ``start_epoch`` > 0
    resumes a run whose optimizer state was restored. ``student`` may be a DDP wrapper.
    Methods with PLOP's pseudo-labels first compute the step's entropy thresholds from the teacher
    over epoch 0's real batches (also on resume: they depend only on the data and the teacher), read
    from ``threshold_batches()`` (images, labels, ...) when given, else from ``batches_of_epoch(0)``,
    which must then give a fresh iterable on every call.
    """
    lr_at = step_lr(plan, iters)
    it = start_epoch * iters
    thresholds = None
    if needs_thresholds(plan.method, plan.n_old):
        if teacher is None:
            raise ValueError(f"method {plan.method.name!r} needs the old model on step {plan.step}")
        source = threshold_batches() if threshold_batches is not None else batches_of_epoch(0)
        thresholds = plop_thresholds(teacher, source, plan.n_old, plan.method.plop_quantile, device, plan.bf16)
    for epoch in range(start_epoch, plan.epochs):
        try:
            it, stats = train_steps(student, teacher, batches_of_epoch(epoch), optimizer, lr_at, it, plan, device,
                                    thresholds)
        except NonFiniteError as err:
            raise NonFiniteError(f"epoch {epoch + 1}/{plan.epochs}, {err}") from None
        if epoch == 0 and thresholds is not None and threshold_batches is None and not stats:
            raise RuntimeError("epoch 0 gave no batches after the threshold pass read it: batches_of_epoch must "
                               "give a fresh iterable per call, or pass threshold_batches")
        if on_epoch is not None:
            on_epoch(epoch, it, stats)
    return student


@torch.no_grad()
def plop_thresholds(
    teacher: nn.Module,
    batches: Iterable[tuple[torch.Tensor, ...]],
    n_old: int,
    quantile: float,
    device: str = "cpu",
    bf16: bool = False,
) -> torch.Tensor:
    """PLOP's per-class entropy thresholds (n_old + 1,) from the teacher over (images, labels, ...) batches.

    Under torch.distributed the per-class histograms of all workers are summed, so every worker gets
    the thresholds of one process over the union of their batches.
    """

    def logits_and_labels() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for images, labels, *_ in batches:
            yield forward(teacher, images.to(device), bf16), labels.to(device)

    histogram = entropy_histogram(logits_and_labels(), n_old).to(device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(histogram)
    return histogram_quantiles(histogram, quantile)


def item_batches(real: Dataset, seed: int, batches: list[list[tuple[int, int]]], num_workers: int = 0) -> DataLoader:
    """Batches of (epoch, item) keys, decoded and augmented by ``num_workers`` loader processes (0: this process)."""
    return DataLoader(SeededItems(real, seed), batch_sampler=batches, num_workers=num_workers, collate_fn=collate_items)


def real_batches(
    real: Dataset, plan: StepPlan, epoch: int, num_workers: int = 0, rank: int = 0, world: int = 1
) -> DataLoader:
    """This process's share of each of an epoch's global real batches, decoded and augmented by a DataLoader here."""
    global_batches = epoch_batches(len(real), plan.batch_size, plan.seed, epoch)
    shares = [batch[share(len(batch), rank, world)] for batch in global_batches]
    return item_batches(real, plan.seed, [[(epoch, i) for i in items] for items in shares if items], num_workers)


def fit(
    student: nn.Module,
    teacher: nn.Module | None,
    real: Dataset,
    fake: SyntheticSet | None,
    plan: StepPlan,
    device: str = "cpu",
    num_workers: int = 0,
    on_epoch: EpochCallback | None = None,
) -> nn.Module:
    """Train ``student`` in this process for the plan's epochs over the step's real (and synthetic) data."""
    if len(real) == 0:
        raise ValueError("the step has no training images: no image holds a pixel of its new classes")
    student.to(device)
    if teacher is not None:
        teacher.to(device).eval().requires_grad_(False)
    fake_source = old_logits = None
    if fake is not None and len(fake) and plan.method.fake:
        fake_source = InMemoryFake(fake.images)
        old_logits = old_model_logits(teacher, len(fake), plan, device)
    iters = iters_per_epoch(len(real), plan.batch_size)
    optimizer = make_optimizer(student, plan.lr, plan.weight_decay, plan.head_lr_mult)

    def batches_of_epoch(epoch: int) -> Iterator[Batch]:
        return mixed_batches(real_batches(real, plan, epoch, num_workers), fake_source, plan, epoch, iters,
                             old_logits=old_logits)

    return run_epochs(student, teacher, plan, batches_of_epoch, iters, optimizer, device, on_epoch=on_epoch)


def prediction_batch_size(cfg: Config) -> int:
    """Images per prediction batch: whole batches of procedural images, real images (mixed sizes) one at a time."""
    return cfg.train.batch_size if cfg.data.dataset == "shapes" else 1


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


def evaluate_share(
    model: nn.Module, dataset: Dataset, num_classes: int, batch_size: int, device: str, rank: int = 0, world: int = 1
) -> torch.Tensor:
    """The confusion matrix of ``dataset`` when each of ``world`` processes scores its contiguous share of it.

    Under torch.distributed the shares' matrices are summed, so every process returns the whole matrix:
    in eval mode each image's prediction is its own, and the sum equals ``evaluate`` over the whole set.
    """
    part = evaluate(model, Subset(dataset, range(len(dataset))[share(len(dataset), rank, world)]), num_classes,
                    batch_size, device)
    if world > 1:
        part = part.to(device)
        dist.all_reduce(part)
    return part.cpu()
