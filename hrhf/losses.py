"""Losses of incremental segmentation: plain / unbiased cross-entropy, output distillation, and PLOP's
entropy-based pseudo-labels and Local POD feature distillation.

Channel convention: index 0 is background, 1..n_old are the old classes, the rest are new.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterable, Sequence

import torch
import torch.nn.functional as F

from hrhf.tasks import IGNORE_INDEX

PixelMean = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""(a term summed over this process's pixels, how many pixels it sums) -> the term's mean over a batch.

None where a loss takes it means the mean over this process's pixels.

Data-parallel training passes one that divides by the pixels of the whole global batch, so that the
workers' averaged gradients equal one process's where the workers' shares hold different numbers of
labelled pixels (ignored object borders, uncertain pseudo-labels).
"""


def predicted_classes(logits: torch.Tensor) -> torch.Tensor:
    """Per-pixel class of (N, C, H, W) logits, the first maximum on ties.

    ``max(dim=1).indices`` rather than ``argmax(dim=1)``: the same result, and on CPU ``argmax`` over
    the channel dimension of an NCHW tensor is about 20 times slower.
    """
    return logits.max(dim=1).indices


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor, mean: PixelMean | None = None) -> torch.Tensor:
    """Pixel-wise cross-entropy, 255 ignored; zero (with a graph) when every pixel is ignored."""
    if mean is not None:
        total = F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="sum")
        return mean(total, (labels != IGNORE_INDEX).sum())
    if not bool((labels != IGNORE_INDEX).any()):
        return logits.sum() * 0.0
    return F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX)


def unbiased_cross_entropy(
    logits: torch.Tensor, labels: torch.Tensor, n_old: int, mean: PixelMean | None = None
) -> torch.Tensor:
    """MiB's unbiased CE: a pixel labelled background may be background or any old class.

    The background log-probability becomes log(sum of p over background and old classes).
    """
    # log_softmax first: one fused pass instead of a second logsumexp over every channel (half the CPU time)
    log_probs = F.log_softmax(logits, dim=1)
    log_bg_or_old = torch.logsumexp(log_probs[:, : n_old + 1], dim=1, keepdim=True)
    log_probs = torch.cat([log_bg_or_old, log_probs[:, n_old + 1 :]], dim=1)
    # After merging, channel 0 stands for bg+old and new class k sits at k - n_old.
    merged = torch.where((labels > n_old) & (labels != IGNORE_INDEX), labels - n_old, labels)
    merged = torch.where(labels <= n_old, torch.zeros_like(labels), merged)
    if mean is not None:
        total = F.nll_loss(log_probs, merged, ignore_index=IGNORE_INDEX, reduction="sum")
        return mean(total, (merged != IGNORE_INDEX).sum())
    if not bool((merged != IGNORE_INDEX).any()):
        return logits.sum() * 0.0
    return F.nll_loss(log_probs, merged, ignore_index=IGNORE_INDEX)


def knowledge_distillation(
    student: torch.Tensor,
    teacher: torch.Tensor,
    temperature: float = 1.0,
    keep: torch.Tensor | None = None,
    mean: PixelMean | None = None,
) -> torch.Tensor:
    """KD on the softmax over the teacher's channels (background + old), averaged over pixels.

    The student's extra (new-class) channels are left out, as in LwF / ILT output distillation.
    ``keep`` (N, H, W) bool zeroes the term where False; the mean stays over every pixel.
    """
    n = teacher.shape[1]
    log_q = F.log_softmax(student[:, :n] / temperature, dim=1)
    return _kd_mean(log_q, teacher, temperature, keep, mean)


def unbiased_knowledge_distillation(
    student: torch.Tensor,
    teacher: torch.Tensor,
    temperature: float = 1.0,
    keep: torch.Tensor | None = None,
    mean: PixelMean | None = None,
) -> torch.Tensor:
    """MiB's unbiased KD: the student's background probability is background + all new classes (``keep`` as in KD)."""
    n = teacher.shape[1]
    log_s = F.log_softmax(student / temperature, dim=1)  # as in unbiased_cross_entropy: one fused pass
    log_bg = torch.logsumexp(torch.cat([log_s[:, :1], log_s[:, n:]], dim=1), dim=1, keepdim=True)
    log_q = torch.cat([log_bg, log_s[:, 1:n]], dim=1)
    return _kd_mean(log_q, teacher, temperature, keep, mean)


def _kd_mean(
    log_q: torch.Tensor, teacher: torch.Tensor, temperature: float, keep: torch.Tensor | None, mean: PixelMean | None
) -> torch.Tensor:
    """KL(teacher || student) per pixel, times T^2, averaged over every pixel (zero where ``keep`` is False)."""
    p = F.softmax(teacher / temperature, dim=1)
    if keep is None and mean is None:
        return -(p * log_q).sum(dim=1).mean() * temperature**2 + (p * p.clamp_min(1e-12).log()).sum(1).mean() * temperature**2
    per_pixel = (p * (p.clamp_min(1e-12).log() - log_q)).sum(dim=1)
    kept = per_pixel if keep is None else per_pixel * keep
    if mean is not None:
        return mean(kept.sum(), torch.tensor(per_pixel.numel(), device=per_pixel.device)) * temperature**2
    return kept.mean() * temperature**2


def outside_new_classes(labels: torch.Tensor, n_old: int) -> torch.Tensor:
    """Pixels not labelled as a new class (background, old classes, ignored): where the old model may be right."""
    return (labels <= n_old) | (labels == IGNORE_INDEX)


def pseudo_labels(labels: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Fill pixels labelled background with the teacher's prediction (which may be an old class)."""
    return torch.where(labels == 0, predicted_classes(teacher), labels)


# PLOP (Douillard et al., CVPR 2021): pseudo-labels of the background from the old model, kept where the
# old model is certain, and Local POD distillation of intermediate feature maps.


def _check_teacher_logits(logits: torch.Tensor, n_old: int) -> None:
    if n_old < 1:
        raise ValueError(f"PLOP needs at least one old class, got n_old={n_old}")
    if logits.dim() != 4 or logits.shape[1] != n_old + 1:
        raise ValueError(f"expected old-model logits of shape (N, {n_old + 1}, H, W), got {tuple(logits.shape)}")


def normalized_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Per-pixel entropy of the softmax of (N, C, H, W) logits divided by log C: 0 when one-hot, 1 when uniform."""
    probs = F.softmax(logits.float(), dim=1)
    return -torch.special.xlogy(probs, probs).sum(dim=1) / math.log(logits.shape[1])


def entropy_histogram(
    teacher_logits_batches: Iterable[torch.Tensor | tuple[torch.Tensor, torch.Tensor]], n_old: int, bins: int = 1000
) -> torch.Tensor:
    """Per-class histogram (n_old + 1, bins) of the old model's normalised entropy, by predicted class.

    The batches are as for ``entropy_thresholds``; the counts (int64) are summable across batches and
    processes, and an empty iterable gives all zeros.
    """
    n_channels = n_old + 1
    histogram = torch.zeros(n_channels * bins, dtype=torch.long)
    for batch in teacher_logits_batches:
        logits, labels = batch if isinstance(batch, (tuple, list)) else (batch, None)
        _check_teacher_logits(logits, n_old)
        uncertainty = normalized_entropy(logits)
        predicted = predicted_classes(logits)
        if labels is not None:
            background = labels == 0
            uncertainty, predicted = uncertainty[background], predicted[background]
        bin_index = (uncertainty.flatten() * bins).long().clamp(0, bins - 1)
        counts = torch.bincount(predicted.flatten() * bins + bin_index, minlength=n_channels * bins)
        histogram = histogram.to(counts.device) + counts
    return histogram.view(n_channels, bins)


def histogram_quantiles(
    histogram: torch.Tensor, quantile: float = 0.5, min_threshold: float = 0.0, max_threshold: float = 1.0
) -> torch.Tensor:
    """The ``quantile`` of each row of an ``entropy_histogram``, clamped to [min_threshold, max_threshold].

    Read linearly inside a bin; an empty row gives min_threshold.
    """
    if not 0.0 <= quantile <= 1.0:
        raise ValueError(f"quantile must lie in [0, 1], got {quantile}")
    bins = histogram.shape[1]
    histogram = histogram.double()
    cumulative = histogram.cumsum(dim=1)
    total = cumulative[:, -1:]
    # A rank above zero always falls in a bin that holds at least one pixel.
    rank = (quantile * total).clamp_min(1e-9)
    bin_index = torch.searchsorted(cumulative, rank).clamp_max(bins - 1)
    in_bin = histogram.gather(1, bin_index)
    below = cumulative.gather(1, bin_index) - in_bin
    value = (bin_index + (rank - below) / in_bin.clamp_min(1.0)) / bins
    thresholds = torch.where(total > 0, value, torch.zeros_like(value)).squeeze(1).float()
    return thresholds.clamp(min_threshold, max_threshold)


def entropy_thresholds(
    teacher_logits_batches: Iterable[torch.Tensor | tuple[torch.Tensor, torch.Tensor]],
    n_old: int,
    quantile: float = 0.5,
    min_threshold: float = 0.0,
    max_threshold: float = 1.0,
    bins: int = 1000,
) -> torch.Tensor:
    """PLOP's per-class uncertainty thresholds: shape (n_old + 1,), background first.

    The batches are the old model's (N, n_old + 1, H, W) logits over the step's training images, or
    (logits, labels) pairs, in which case only pixels labelled background count. The threshold of class c
    is the ``quantile`` (the median by default) of the normalised entropy of the pixels the old model
    predicts as c, clamped to [min_threshold, max_threshold]; a class never predicted gets min_threshold.
    The quantile is read from a histogram of ``bins`` bins over [0, 1] (``entropy_histogram``),
    interpolated linearly inside a bin, so memory does not grow with the data set.
    """
    if not 0.0 <= quantile <= 1.0:
        raise ValueError(f"quantile must lie in [0, 1], got {quantile}")
    seen = 0

    def counted() -> Iterable[torch.Tensor | tuple[torch.Tensor, torch.Tensor]]:
        nonlocal seen
        for batch in teacher_logits_batches:
            seen += 1
            yield batch

    histogram = entropy_histogram(counted(), n_old, bins)
    if not seen:
        raise ValueError("no old-model logits to compute the thresholds from")
    return histogram_quantiles(histogram, quantile, min_threshold, max_threshold)


def plop_pseudo_labels(
    teacher_logits: torch.Tensor, labels: torch.Tensor, n_old: int, thresholds: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """PLOP's targets and per-image loss weights from the old model's (N, n_old + 1, H, W) logits.

    A pixel labelled background takes the old model's predicted class (background or old) when the
    normalised entropy of that prediction is below the threshold of the predicted class, and is ignored
    (255) otherwise; other pixels keep their label. The weight of an image is the share of its
    background pixels that got a pseudo-label (1 for an image without background); each image's
    per-pixel cross-entropy is scaled by it.
    """
    _check_teacher_logits(teacher_logits, n_old)
    if thresholds.shape != (n_old + 1,):
        raise ValueError(f"expected {n_old + 1} thresholds (background first), got shape {tuple(thresholds.shape)}")
    predicted = predicted_classes(teacher_logits)
    certain = normalized_entropy(teacher_logits) < thresholds.to(teacher_logits.device)[predicted]
    background = labels == 0
    accepted = background & certain
    targets = torch.where(accepted, predicted, labels)
    targets = torch.where(background & ~certain, torch.full_like(labels, IGNORE_INDEX), targets)
    n_background = background.flatten(1).sum(dim=1)
    n_accepted = accepted.flatten(1).sum(dim=1)
    share = n_accepted / n_background.clamp_min(1)
    weights = torch.where(n_background > 0, share, torch.ones_like(share))
    return targets, weights.float()


def weighted_cross_entropy(
    logits: torch.Tensor, labels: torch.Tensor, image_weights: torch.Tensor, mean: PixelMean | None = None
) -> torch.Tensor:
    """Pixel-wise cross-entropy with each image's pixels scaled by its weight, averaged over labelled pixels.

    255 is ignored; with all weights 1 this is ``cross_entropy``. Zero (with a graph) when every pixel is ignored.
    """
    labelled = labels != IGNORE_INDEX
    if mean is None and not bool(labelled.any()):
        return logits.sum() * 0.0
    per_pixel = F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="none")
    weights = image_weights.to(per_pixel.dtype).view(-1, *[1] * (per_pixel.dim() - 1))
    if mean is not None:
        return mean((per_pixel * weights).sum(), labelled.sum())
    return (per_pixel * weights).sum() / labelled.sum()


def fold_new_into_background(student_logits: torch.Tensor, n_old: int) -> torch.Tensor:
    """The student's logits on the old model's channels: new-class logits are added to the background's.

    Makes (N, n_old + 1 + n_new, H, W) logits comparable with the old model's for Local POD.
    """
    background = student_logits[:, :1] + student_logits[:, n_old + 1 :].sum(dim=1, keepdim=True)
    return torch.cat([background, student_logits[:, 1 : n_old + 1]], dim=1)


@functools.lru_cache(maxsize=64)
def _window_means(size: int, scales: tuple[int, ...]) -> torch.Tensor:
    """(sum(scales), size) matrix: for each scale s, s rows averaging the near-equal chunks ``tensor_split`` cuts."""
    chunks = [chunk for s in scales for chunk in torch.arange(size).tensor_split(s)]
    matrix = torch.zeros(len(chunks), size, dtype=torch.float64)
    for k, chunk in enumerate(chunks):
        matrix[k, chunk] = 1.0 / len(chunk)
    return matrix


@functools.lru_cache(maxsize=64)
def _pod_layout(channels: int, height: int, width: int, scales: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """Where each embedding entry sits in the pooled maps, and which profile it belongs to.

    The pooled maps are the width-pooled (C, H, sum(scales)) map and the height-pooled
    (C, sum(scales), W) map, flattened and concatenated. Returns (index into them, profile number).
    """
    windows = sum(scales)
    channel = torch.arange(channels)[:, None]
    by_height = channels * height * windows  # where the height-pooled map starts
    index, first = [], 0  # first: the scale's first window row / column in the pooled maps
    for s in scales:
        row_chunks, col_chunks = torch.arange(height).tensor_split(s), torch.arange(width).tensor_split(s)
        for i, rows in enumerate(row_chunks):
            for j, cols in enumerate(col_chunks):
                index.append((channel * height * windows + rows[None, :] * windows + first + j).flatten())
                index.append((by_height + channel * windows * width + (first + i) * width + cols[None, :]).flatten())
        first += s
    profile = torch.cat([torch.full((len(idx),), k) for k, idx in enumerate(index)])
    return torch.cat(index), profile


def local_pod_embedding(
    features: torch.Tensor, scales: Sequence[int] = (1, 2, 4), normalize: bool = False
) -> torch.Tensor:
    """Local POD embedding (N, D) of (N, C, H, W) features.

    At scale s the map is cut into an s x s grid of windows (sides 1/s of the map's; when s does not
    divide a side, windows differ by one pixel). Each window gives its width-pooled profile (mean over
    its columns: C x rows values) and its height-pooled profile (mean over its rows: C x columns
    values); with ``normalize`` each profile is L2-normalised. All profiles are concatenated, windows
    row-major within a scale, scales in order.
    """
    n, channels, height, width = features.shape
    if any(s < 1 or s > min(height, width) for s in scales):
        raise ValueError(f"scales {list(scales)} must lie in [1, {min(height, width)}] for a {height}x{width} map")
    scales = tuple(scales)
    # Every window of every scale from two matrix products: a mean per window, and its backward,
    # took about a third of a PLOP training step of the small model on CPU.
    by_width = features @ _window_means(width, scales).to(features).T  # (N, C, H, sum(scales))
    by_height = _window_means(height, scales).to(features) @ features  # (N, C, sum(scales), W)
    index, profile = _pod_layout(channels, height, width, scales)
    pooled = torch.cat([by_width.reshape(n, -1), by_height.reshape(n, -1)], dim=1)
    embedding = pooled.index_select(1, index.to(features.device))
    if normalize:
        profile = profile.to(features.device)
        norms = embedding.new_zeros(n, int(profile[-1]) + 1).index_add_(1, profile, embedding.square()).sqrt()
        embedding = embedding / norms.clamp_min(1e-12).index_select(1, profile)
    return embedding


def local_pod(
    student_features: Sequence[torch.Tensor],
    teacher_features: Sequence[torch.Tensor],
    scales: Sequence[int] = (1, 2, 4),
    layer_weights: Sequence[float] | None = None,
    normalize: bool = False,
) -> torch.Tensor:
    """PLOP's Local POD loss over matching lists of (N, C, H, W) student and teacher feature maps.

    Per layer, the squared activations are embedded by ``local_pod_embedding``; the layer's loss is the
    L2 distance between the student's and the teacher's embeddings of each image, averaged over the
    batch and multiplied by the layer's weight (1 by default). The result is the mean over layers.
    The teacher's maps are treated as constants.
    """
    if len(student_features) != len(teacher_features) or not student_features:
        raise ValueError(
            f"need as many student as teacher maps (at least one): {len(student_features)} and {len(teacher_features)}"
        )
    weights = [1.0] * len(student_features) if layer_weights is None else list(layer_weights)
    if len(weights) != len(student_features):
        raise ValueError(f"{len(weights)} layer weights for {len(student_features)} layers")
    total = student_features[0].new_zeros(())
    for student, teacher, weight in zip(student_features, teacher_features, weights):
        if student.shape != teacher.shape:
            raise ValueError(f"student map {tuple(student.shape)} does not match teacher map {tuple(teacher.shape)}")
        student_embedding = local_pod_embedding(student.pow(2), scales, normalize)
        teacher_embedding = local_pod_embedding(teacher.detach().pow(2), scales, normalize)
        total = total + weight * (student_embedding - teacher_embedding).norm(dim=1).mean()
    return total / len(student_features)


def plop_layer_weights(
    num_layers: int, num_outputs: int, num_new: int, feature_weight: float = 0.01, logits_weight: float = 0.0005
) -> list[float]:
    """PLOP's Local POD weights for feature maps followed by the logits (the last layer).

    Every weight is scaled by sqrt(num_outputs / num_new): the student's channel count (background
    included) over the classes new at this step.
    """
    if num_layers < 1 or num_new < 1:
        raise ValueError(f"need at least one layer and one new class, got {num_layers} and {num_new}")
    schedule = math.sqrt(num_outputs / num_new)
    return [feature_weight * schedule] * (num_layers - 1) + [logits_weight * schedule]
