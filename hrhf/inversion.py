"""SegInversion: synthesise images of old classes from a frozen segmentation model.

One class owns the BatchNorm hooks and the optimisation loop, in the manner of DeepInversion. The
class term is Scale-Aware Aggregation (SAA): the top ceil(r * H * W) log-probabilities of the target
class and the top remaining share of the background's are averaged, so about r of the image becomes
the object; global average / max pooling are kept for the ablation.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import nn

from hrhf.config import InversionConfig
from hrhf.losses import predicted_classes
from hrhf.schedule import warmup_cosine
from hrhf.pixels import denormalize, normalize, pixel_bounds


class NonFiniteError(ArithmeticError):
    """Inversion produced a NaN or infinite loss or image (a bad learning rate, bf16 overflow, a broken teacher)."""


@dataclass(frozen=True)
class Target:
    """One image to synthesise: a class (model output index), an object-area ratio and a seed."""

    class_index: int
    scale: float
    seed: int


def make_targets(
    classes: Sequence[int], scales: Sequence[float], images_per_scale: int | Sequence[int], base_seed: int
) -> list[Target]:
    """The product classes x scales x seeds, interleaved so that any run of targets mixes classes and scales.

    ``images_per_scale`` is one count for every class, or one count per class (``allocate_images``); a
    target's seed depends only on (base_seed, its index among its class's images, scale, class), so a
    class keeps its first images whatever the counts of the others.
    """
    counts = [images_per_scale] * len(classes) if isinstance(images_per_scale, int) else list(images_per_scale)
    if len(counts) != len(classes):
        raise ValueError(f"{len(counts)} image counts for {len(classes)} classes")
    targets = []
    for j in range(max(counts, default=0)):
        for si, scale in enumerate(scales):
            for c, count in zip(classes, counts):
                if j < count:
                    seed = ((base_seed * 1_000 + j) * 100 + si) * 1_000 + c
                    targets.append(Target(int(c), float(scale), seed))
    return targets


def allocate_images(presence: Sequence[float], images_per_scale: int, target_presence: float) -> list[int]:
    """Images per scale for each old class: the uniform budget, shifted to the classes the new data lacks.

    ``presence[i]`` is the share of the step's real images in which the old model sees class i. Every
    class keeps one image per scale; the rest of the budget (``images_per_scale`` per class in all) goes
    to the classes in proportion to how far their presence falls short of ``target_presence``. When no
    class falls short (or all fall short equally) the allocation is uniform. Largest remainders round it.
    """
    n = len(presence)
    if n == 0:
        return []
    if images_per_scale < 1 or not 0.0 < target_presence <= 1.0:
        raise ValueError(
            f"need images_per_scale >= 1 and target_presence in (0, 1], got {images_per_scale}, {target_presence}"
        )
    if any(not 0.0 <= p <= 1.0 for p in presence):
        raise ValueError(f"presence shares must lie in [0, 1], got {list(presence)}")
    shortfall = [max(0.0, target_presence - p) for p in presence]
    if sum(shortfall) == 0.0:
        return [images_per_scale] * n
    spare = n * (images_per_scale - 1)
    shares = [spare * s / sum(shortfall) for s in shortfall]
    counts = [1 + int(share) for share in shares]
    left = n * images_per_scale - sum(counts)
    by_remainder = sorted(range(n), key=lambda i: (-(shares[i] - int(shares[i])), i))
    for i in by_remainder[:left]:
        counts[i] += 1
    return counts


@dataclass
class SyntheticSet:
    """Synthetic images (uint8), the teacher's pseudo-label masks on them, and per-image metadata."""

    images: torch.Tensor  # (N, 3, H, W) uint8
    masks: torch.Tensor  # (N, H, W) uint8, the teacher's argmax on the stored image
    meta: list[dict] = field(default_factory=list)  # class, scale, seed, loss, area, retried

    def __len__(self) -> int:
        return len(self.meta)

    def gallery_sample(self) -> SyntheticSet:
        """The images a gallery may show: all of them, since they are in memory."""
        return self

    @staticmethod
    def concat(parts: Sequence[SyntheticSet]) -> SyntheticSet:
        """Join several sets into one, keeping their order."""
        parts = [p for p in parts if len(p)]
        if not parts:
            return SyntheticSet(torch.zeros(0, 3, 1, 1, dtype=torch.uint8), torch.zeros(0, 1, 1, dtype=torch.uint8), [])
        return SyntheticSet(
            torch.cat([p.images for p in parts]),
            torch.cat([p.masks for p in parts]),
            [m for p in parts for m in p.meta],
        )


def top_k_mean(values: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Mean of the ``k[i]`` largest entries of each row of ``values`` (0 where ``k[i]`` is 0).

    The k-th largest entry of each row comes from ``kthvalue`` (selection, O(n)), one call per distinct
    k, instead of a full sort; entries tied with it count as often as the rank k needs. Value and
    gradient equal those through a sort.
    """
    rows, length = values.shape
    position = torch.zeros(rows, dtype=torch.long, device=values.device)
    with torch.no_grad():
        for count in torch.unique(k).tolist():
            if count > 0:
                chosen = (k == count).nonzero().squeeze(1)
                position[chosen] = values[chosen].kthvalue(length - count + 1, dim=1).indices
    threshold = values.gather(1, position[:, None]).squeeze(1)  # the k-th largest entry, with its gradient
    above = values > threshold[:, None].detach()
    total = (values * above).sum(1) + (k - above.sum(1)) * threshold
    return torch.where(k > 0, total / k.clamp(min=1), torch.zeros_like(total))


def aggregation_loss(logits: torch.Tensor, classes: torch.Tensor, scales: torch.Tensor, mode: str) -> torch.Tensor:
    """Per-image class term: SAA with ratio r, or GAP / GMP of the target class's log-probability."""
    batch, _, height, width = logits.shape
    area = height * width
    # Only two channels of the log-softmax are read: one gather, whose backward is one scatter.
    channels = torch.stack([torch.zeros_like(classes), classes], dim=1)[:, :, None, None]
    picked = logits.float().log_softmax(dim=1).gather(1, channels.expand(batch, 2, height, width)).flatten(2)
    background_lp, class_lp = picked[:, 0], picked[:, 1]
    if mode == "gap":
        return -class_lp.mean(dim=1)
    if mode == "gmp":
        return -class_lp.amax(dim=1)
    if mode != "saa":
        raise ValueError(f"unknown aggregation {mode!r}")
    k = torch.ceil(scales * area).clamp(1, area).long()
    return -(top_k_mean(class_lp, k) + top_k_mean(background_lp, area - k))


class _ChannelMoments(torch.autograd.Function):
    """Per-channel mean and biased variance over (N, H, W), with a one-pass backward."""

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        dims = (0, 2, 3)
        mean = x.mean(dim=dims)
        var = (x * x).mean(dim=dims) - mean * mean
        ctx.save_for_backward(x, mean)
        return mean, var.clamp(min=0)

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad_mean: torch.Tensor, grad_var: torch.Tensor) -> torch.Tensor:
        x, mean = ctx.saved_tensors
        count = x.numel() // x.shape[1]
        # d/dx [mean, var] . [gm, gv] = gm / n + gv * 2 (x - mean) / n, written as one addcmul over x.
        slope = grad_var * (2.0 / count)
        offset = grad_mean / count - slope * mean
        shape = (1, -1, 1, 1)
        return torch.addcmul(offset.view(shape), x, slope.view(shape))


def channel_moments(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel batch mean and biased variance of an (N, C, H, W) tensor, differentiable.

    Autograd through ``Tensor.var`` over (0, 2, 3) costs several broadcast passes over the activation;
    this computes E[x], E[x^2] in the forward and the input gradient in a single fused pass.
    """
    return _ChannelMoments.apply(x)


def object_area(masks: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    """Per image, the share of its pixels a label map (N, H, W) gives the image's target class."""
    return (masks == classes[:, None, None]).flatten(1).float().mean(1)


def describe_targets(targets: Sequence[Target], limit: int = 3) -> str:
    """'class 2 scale 0.1 seed 1001, ...' for the first ``limit`` targets, and how many more."""
    named = ", ".join(f"class {t.class_index} scale {t.scale:g} seed {t.seed}" for t in targets[:limit])
    more = len(targets) - limit
    return f"{named} and {more} more" if more > 0 else named


def total_variation(x: torch.Tensor) -> torch.Tensor:
    """Per-image mean squared difference of horizontal and vertical neighbours."""
    dh = (x[:, :, 1:, :] - x[:, :, :-1, :]).pow(2).flatten(1).mean(1)
    dw = (x[:, :, :, 1:] - x[:, :, :, :-1]).pow(2).flatten(1).mean(1)
    return dh + dw


class ImageAdam:
    """Adam (no weight decay) on the one tensor of images that SegInversion optimises.

    The same update as ``torch.optim.Adam``. Not that class: its first construction in a process
    imports ``torch._dynamo`` (about 1 s), which every synthesis actor would pay again at every step.
    """

    def __init__(self, param: torch.Tensor, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8) -> None:
        self.param, self.betas, self.eps = param, betas, eps
        self.exp_avg = torch.zeros_like(param)
        self.exp_avg_sq = torch.zeros_like(param)
        self.steps = 0

    @torch.no_grad()
    def step(self, lr: float) -> None:
        """One update of the parameter from its ``.grad`` with learning rate ``lr``."""
        beta1, beta2 = self.betas
        grad = self.param.grad
        self.steps += 1
        self.exp_avg.lerp_(grad, 1 - beta1)
        self.exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        denom = (self.exp_avg_sq.sqrt() / math.sqrt(1 - beta2**self.steps)).add_(self.eps)
        self.param.addcdiv_(self.exp_avg, denom, value=-lr / (1 - beta1**self.steps))


class SegInversion:
    """Inverts a frozen segmentation model into images with objects of chosen classes and sizes.

    Use as a context manager (or call ``close``) so that the BatchNorm hooks are removed. A NaN or
    infinite loss (looked at every ``finite_check_every`` iterations and after the last) or final image
    raises ``NonFiniteError`` before anything is quantised.
    """

    # Reading the loss flag back costs a device synchronisation, so not every iteration.
    finite_check_every = 25

    def __init__(self, teacher: nn.Module, cfg: InversionConfig, image_size: int, device: str = "cpu") -> None:
        self.teacher = teacher.to(device).eval().requires_grad_(False)
        self.cfg = cfg
        self.image_size = image_size
        self.device = device
        self.low, self.high = (b.to(device) for b in pixel_bounds())
        self._bn_terms: list[torch.Tensor] = []
        self._recording = False
        bn_layers = [m for m in self.teacher.modules() if isinstance(m, nn.BatchNorm2d)]
        if not bn_layers:
            raise ValueError("SegInversion needs a teacher with BatchNorm2d layers (the BN-statistics prior)")
        self._hooks = [m.register_forward_hook(self._bn_hook) for m in bn_layers]

    def _bn_hook(self, module: nn.BatchNorm2d, inputs: tuple[torch.Tensor], output: torch.Tensor) -> None:
        if not self._recording:
            return
        mean, var = channel_moments(inputs[0].float())  # a no-op in float32; exact statistics under bf16
        self._bn_terms.append(torch.linalg.vector_norm(mean - module.running_mean) + torch.linalg.vector_norm(var - module.running_var))

    def bn_prior(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Teacher logits on ``x`` and the BN-statistics prior R_bn (first layer weighted by first_bn_mult)."""
        self._bn_terms = []
        self._recording = True
        try:
            logits = self.teacher(x)
        finally:
            self._recording = False
        weights = [self.cfg.first_bn_mult] + [1.0] * (len(self._bn_terms) - 1)
        prior = sum(w * t for w, t in zip(weights, self._bn_terms))
        self._bn_terms = []
        return logits, prior

    def invert_batch(self, targets: Sequence[Target]) -> SyntheticSet:
        """Optimise one batch of images from noise, then once more the images whose object came out too small.

        Deterministic for the same targets on CPU. An image is retried when the teacher labels under
        ``retry_below`` of its ratio r as its class (a class the jittered, noisy start did not make);
        the retry has no jitter and starts from quieter noise, and the image with the larger object is kept.
        """
        result = self._optimise(targets, self.cfg)
        if self.cfg.retry_below <= 0:
            return result
        weak = [i for i, m in enumerate(result.meta) if m["area"] < self.cfg.retry_below * m["scale"]]
        if not weak:
            return result
        retry_cfg = dataclasses.replace(self.cfg, jitter=0, init_std=self.cfg.retry_init_std)
        second = self._optimise([targets[i] for i in weak], retry_cfg)
        for j, i in enumerate(weak):
            if second.meta[j]["area"] > result.meta[i]["area"]:
                result.images[i], result.masks[i] = second.images[j], second.masks[j]
                result.meta[i] = second.meta[j]
            result.meta[i]["retried"] = True
        return result

    def _optimise(self, targets: Sequence[Target], cfg: InversionConfig) -> SyntheticSet:
        """One optimisation of ``targets`` from noise under ``cfg`` (the teacher's BN prior over this batch)."""
        size = self.image_size
        classes = torch.tensor([t.class_index for t in targets], device=self.device)
        scales = torch.tensor([t.scale for t in targets], device=self.device)
        noise = [torch.randn(3, size, size, generator=torch.Generator().manual_seed(t.seed)) for t in targets]
        x = (torch.stack(noise) * cfg.init_std).to(self.device)
        x = x.clamp(self.low, self.high).requires_grad_(True)
        rng = torch.Generator().manual_seed(targets[0].seed ^ len(targets))
        adam = ImageAdam(x, betas=(0.5, 0.9))
        lr_at = warmup_cosine(cfg.lr, cfg.iterations, warmup_divisor=20)
        # On the device, without a sync: the first iteration with a non-finite loss (-1: none yet) and
        # which images' class terms were non-finite then, to name the targets at fault before NaN spreads
        # to the whole batch through the BN prior.
        first_bad_it = torch.tensor(-1, device=self.device)
        image_bad = torch.zeros(len(targets), dtype=torch.bool, device=self.device)
        for it in range(cfg.iterations):
            view = x
            if cfg.jitter:
                dx, dy = torch.randint(-cfg.jitter, cfg.jitter + 1, (2,), generator=rng).tolist()
                view = torch.roll(view, shifts=(dy, dx), dims=(2, 3))
            flipped = cfg.flip and bool(torch.rand((), generator=rng) < 0.5)
            if flipped:
                view = view.flip(3)
            with torch.autocast(torch.device(self.device).type, dtype=torch.bfloat16, enabled=cfg.bf16):
                logits, prior = self.bn_prior(view)
            class_loss = aggregation_loss(logits, classes, scales, cfg.aggregation)
            loss = class_loss.mean() + cfg.w_bn * prior
            loss = loss + (cfg.w_tv * total_variation(x) + cfg.w_l2 * x.pow(2).flatten(1).mean(1)).mean()
            with torch.no_grad():
                turned_bad = (first_bad_it < 0) & ~loss.isfinite()
                image_bad = torch.where(turned_bad, ~class_loss.isfinite(), image_bad)
                first_bad_it = torch.where(turned_bad, it, first_bad_it)
            if (it + 1) % self.finite_check_every == 0 or it + 1 == cfg.iterations:
                self._check_loss(targets, int(first_bad_it), image_bad, cfg.iterations)
            x.grad = None
            loss.backward()
            adam.step(lr_at(it))
            with torch.no_grad():
                x.clamp_(self.low, self.high)  # keeps NaN, so a NaN update still reaches the final check
        image_finite = x.detach().isfinite().flatten(1).all(1).cpu()
        if not image_finite.all():
            raise NonFiniteError(
                f"inversion gave non-finite pixels after iteration {cfg.iterations}/{cfg.iterations} for "
                f"{describe_targets([t for t, ok in zip(targets, image_finite.tolist()) if not ok])}"
                f" (lower inversion.lr, or turn off inversion.bf16)"
            )
        images = denormalize(x.detach().cpu())
        with torch.no_grad():
            logits = self.teacher(normalize(images).to(self.device))
            final_loss = aggregation_loss(logits, classes, scales, cfg.aggregation).cpu()
        loss_finite = final_loss.isfinite()
        if not loss_finite.all():
            raise NonFiniteError(
                f"the teacher gives a non-finite loss on the final images of "
                f"{describe_targets([t for t, ok in zip(targets, loss_finite.tolist()) if not ok])}"
            )
        masks = predicted_classes(logits).cpu()
        area = object_area(masks, classes.cpu())
        meta = [
            {"class": t.class_index, "scale": t.scale, "seed": t.seed, "loss": float(final_loss[i]), "area": float(area[i]),
             "retried": False}
            for i, t in enumerate(targets)
        ]
        return SyntheticSet(images, masks.to(torch.uint8), meta)

    def _check_loss(self, targets: Sequence[Target], first_bad_it: int, image_bad: torch.Tensor, iterations: int) -> None:
        """Raise NonFiniteError if the loss has been non-finite (``first_bad_it`` >= 0)."""
        if first_bad_it < 0:
            return
        # The images whose own class term went bad; if none did (only the BN prior), the whole batch.
        blamed = [t for t, bad in zip(targets, image_bad.cpu().tolist()) if bad] or list(targets)
        raise NonFiniteError(
            f"inversion loss became non-finite at iteration {first_bad_it + 1}/{iterations} for "
            f"{describe_targets(blamed)} (lower inversion.lr, or turn off inversion.bf16)"
        )

    def invert(self, targets: Sequence[Target], on_batch: Callable[[int, int], None] | None = None) -> SyntheticSet:
        """Invert every target in batches of ``cfg.batch_size``; ``on_batch(done, total)`` reports progress."""
        parts = []
        for start in range(0, len(targets), self.cfg.batch_size):
            parts.append(self.invert_batch(targets[start : start + self.cfg.batch_size]))
            if on_batch is not None:
                on_batch(min(start + self.cfg.batch_size, len(targets)), len(targets))
        return SyntheticSet.concat(parts)

    def close(self) -> None:
        """Remove the BatchNorm hooks from the teacher."""
        for hook in self._hooks:
            hook.remove()
        self._hooks = []

    def __enter__(self) -> SegInversion:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class SyntheticData(Protocol):
    """A step's synthetic images as the driver sees them: their metadata and a sample for the gallery.

    In-process that is the SyntheticSet itself; on Ray a handle whose images stay in shards or the
    object store until the workers stream them.
    """

    meta: list[dict]

    def __len__(self) -> int: ...

    def gallery_sample(self) -> SyntheticSet:
        """The first image of each (class, scale), at least."""
        ...


class SyntheticParts:
    """Several steps' synthetic data read as one, in order (inversion.keep_images on Ray, where each part is a
    handle on that step's shards or object-store tables and no image comes to the driver)."""

    def __init__(self, parts: Sequence[SyntheticData]) -> None:
        self.parts: list[SyntheticData] = []
        for part in parts:
            self.parts.extend(part.parts if isinstance(part, SyntheticParts) else [part])
        self.meta = [entry for part in self.parts for entry in part.meta]

    def __len__(self) -> int:
        return len(self.meta)

    def gallery_sample(self) -> SyntheticSet:
        """Each part's gallery sample, one after the other."""
        return SyntheticSet.concat([part.gallery_sample() for part in self.parts])


def join_synthetic(parts: Sequence[SyntheticData]) -> SyntheticData:
    """Several synthetic sets as one: one SyntheticSet where all are in memory, else a SyntheticParts over the handles."""
    if all(isinstance(part, SyntheticSet) for part in parts):
        return SyntheticSet.concat(parts)
    return SyntheticParts(parts)
