"""The one learning-rate schedule of the project: linear warm-up, then cosine decay to zero."""

from __future__ import annotations

import math
from collections.abc import Callable


def warmup_cosine(base_lr: float, total_iters: int, warmup_divisor: int) -> Callable[[int], float]:
    """Learning rate at iteration i: linear warm-up over 1/``warmup_divisor`` of the run, then cosine decay."""
    total = max(total_iters, 1)
    warmup = max(1, total // warmup_divisor)

    def lr_at(i: int) -> float:
        if i < warmup:
            return base_lr * (i + 1) / warmup
        return base_lr * 0.5 * (1 + math.cos(math.pi * (i - warmup) / max(1, total - warmup)))

    return lr_at
