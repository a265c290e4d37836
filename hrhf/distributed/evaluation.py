"""Evaluation on the cluster: Ray Data streams item references to a pool of model actors.

Each actor decodes its items, predicts, and returns one count per batch: a confusion matrix on the
validation set, or how many images show each class (coverage-aware synthesis, on the step's training
images); the driver sums them. Batching follows hrhf.pipeline.evaluate_step (whole batches of
procedural images, real images of mixed sizes one at a time), so the result equals the in-process
count on the same weights.
"""

from __future__ import annotations

import numpy as np
import ray
import ray.data
import torch
from torch import nn
from torch.utils.data import Dataset

from hrhf.config import Config
from hrhf.distributed.devices import compute_device
from hrhf.losses import predicted_classes
from hrhf.metrics import ConfusionMatrix, images_showing
from hrhf.models import ModelSpec
from hrhf.train import collate_items, prediction_batch_size


class _Predictor:
    """A Ray Data actor holding the model: per batch of item references, the confusion matrix of its
    predictions, or (with ``min_share``) how many of its images show each class."""

    def __init__(self, model: ModelSpec, val: Dataset, num_classes: int, use_gpu: bool, threads: int,
                 min_share: float | None = None) -> None:
        torch.set_num_threads(threads)
        device = compute_device(use_gpu, "evaluation")
        self.net = model.build().to(device).eval()
        self.val = val
        self.num_classes = num_classes
        self.device = device
        self.min_share = min_share

    @torch.no_grad()
    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        images, labels = collate_items([self.val[int(i)] for i in batch["item"]])
        predicted = predicted_classes(self.net(images.to(self.device))).cpu()
        if self.min_share is not None:
            return {"counts": images_showing(predicted, self.num_classes, self.min_share).numpy().reshape(1, -1)}
        confusion = ConfusionMatrix(self.num_classes)
        confusion.update(predicted, labels)
        return {"counts": confusion.matrix.numpy().reshape(1, -1)}


class RayEvaluator:
    """The Evaluator of hrhf.pipeline on a pool of Ray Data actors (GPU actors with ``use_gpu``)."""

    def __init__(self, num_actors: int = 2, cpus_per_actor: float = 1.0, use_gpu: bool = False) -> None:
        self.num_actors = num_actors
        self.cpus_per_actor = cpus_per_actor
        self.use_gpu = use_gpu

    def evaluate(self, cfg: Config, model: nn.Module, val: Dataset, num_classes: int) -> torch.Tensor:
        """Confusion matrix (rows = truth) of ``model`` on ``val``, summed over the actors' batches."""
        total = self._summed_counts(cfg, model, val, num_classes, num_classes * num_classes, None)
        return total.reshape(num_classes, num_classes)

    def images_showing(
        self, cfg: Config, model: nn.Module, dataset: Dataset, num_classes: int, min_share: float
    ) -> torch.Tensor:
        """Per class, how many images of ``dataset`` ``model`` gives at least ``min_share`` of their pixels."""
        return self._summed_counts(cfg, model, dataset, num_classes, num_classes, min_share)

    def _summed_counts(self, cfg: Config, model: nn.Module, dataset: Dataset, num_classes: int, size: int,
                       min_share: float | None) -> torch.Tensor:
        batch_size = prediction_batch_size(cfg)
        spec = ModelSpec.of(model, cfg.model.name, cfg.model.width)
        items = ray.data.from_items([{"item": i} for i in range(len(dataset))])
        counts = items.map_batches(
            _Predictor,
            fn_constructor_kwargs={"model": spec, "val": dataset, "num_classes": num_classes,
                                   "use_gpu": self.use_gpu, "threads": max(1, int(self.cpus_per_actor)),
                                   "min_share": min_share},
            batch_size=batch_size,
            compute=ray.data.ActorPoolStrategy(size=max(1, min(self.num_actors, -(-len(dataset) // batch_size)))),
            # a GPU actor reserves its GPU only: Ray Data warns that CPUs and GPUs together are experimental
            **({"num_gpus": 1} if self.use_gpu else {"num_cpus": self.cpus_per_actor}),
        )
        total = np.zeros(size, dtype=np.int64)
        for row in counts.iter_rows():
            total += row["counts"]
        return torch.from_numpy(total)
