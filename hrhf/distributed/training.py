"""Distillation of one step with Ray Train: DDP workers, Ray Data shards, per-epoch checkpoints.

The step logic is hrhf.train's (train_steps, make_optimizer, cosine_lr, mixed_batches); this module
only feeds it from Ray Data and makes it restartable: each epoch ends with a checkpoint from rank 0,
and a restarted worker group (FailureConfig) or a re-run with the same storage resumes from it.
"""

from __future__ import annotations

import math
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import ray
import ray.data
import ray.train
import ray.train.torch
import torch
from torch import nn
from torch.utils.data import Dataset

from hrhf.distributed import peak_rss_mb
from hrhf.inversion import NonFiniteError, SyntheticSet
from hrhf.models import build_model, num_outputs
from hrhf.pipeline import Log, StepJob, step_train_options
from hrhf.progress import as_progress
from hrhf.train import cosine_lr, make_optimizer, mixed_batches, train_steps

STATE_FILE = "state.pt"


def load_train_state(checkpoint: ray.train.Checkpoint) -> dict[str, Any]:
    """The training state a rank-0 worker saved: model, optimizer, epoch, iteration, outputs, history."""
    with checkpoint.as_directory() as directory:
        return torch.load(os.path.join(directory, STATE_FILE), map_location="cpu", weights_only=True)


@dataclass
class _FakeShard:
    """This worker's synthetic images, all that hrhf.train.sample_fake reads of a SyntheticSet."""

    images: torch.Tensor

    def __len__(self) -> int:
        return len(self.images)


def _real_batches(
    shard: ray.data.DataIterator, batch_size: int, drop_last: bool, seed: int, generator: torch.Generator
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Shuffled (images, labels) batches of this worker's real shard, each sample flipped with probability 1/2."""
    for batch in shard.iter_torch_batches(
        batch_size=batch_size, drop_last=drop_last, local_shuffle_buffer_size=4 * batch_size, local_shuffle_seed=seed
    ):
        images, labels = batch["image"], batch["mask"].long()
        # The real rows were augmented once, when materialised; flipping here varies them per epoch.
        flip = (torch.rand(len(images), generator=generator) < 0.5).to(images.device)
        images = torch.where(flip[:, None, None, None], images.flip(-1), images)
        labels = torch.where(flip[:, None, None], labels.flip(-1), labels)
        yield images, labels


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """One Ray Train worker: DDP student, local frozen teacher, half-real half-fake epochs, checkpoints."""
    torch.set_num_threads(config["threads"])
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()

    spec = config["model"]
    net = build_model(spec["name"], spec["num_outputs"], spec["width"])
    net.load_state_dict(config["student_state"])
    teacher = None
    if config["teacher_state"] is not None:
        teacher = build_model(spec["name"], config["teacher_outputs"], spec["width"])
        teacher.load_state_dict(config["teacher_state"])
        teacher.to(device).eval().requires_grad_(False)
    student = ray.train.torch.prepare_model(net)  # wraps the same module: net's parameters are the student's
    optimizer = make_optimizer(net, config["lr"], config["weight_decay"], config["head_lr_mult"])

    start_epoch, it, history = 0, 0, []
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        state = load_train_state(checkpoint)
        net.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start_epoch, it, history = state["epoch"] + 1, state["iteration"], state["history"]

    fake = None
    if config["use_fake"]:
        rows = list(ray.train.get_dataset_shard("fake").iter_batches(batch_size=None, batch_format="numpy"))
        fake = _FakeShard(torch.from_numpy(np.concatenate([r["image"] for r in rows])))
    real = ray.train.get_dataset_shard("real")
    method = config["method"]
    epochs = config["epochs"]
    lr_at = cosine_lr(config["lr"], epochs * config["iters_per_epoch"])
    for epoch in range(start_epoch, epochs):
        seed = (config["seed"] * 1_000 + epoch) * world + rank
        generator = torch.Generator().manual_seed(seed)
        real_batches = _real_batches(real, config["batch_size"], config["drop_last"], seed, generator)
        batches = mixed_batches(real_batches, fake, method.fake_ratio, generator)
        epoch_start, first_it = time.perf_counter(), it
        try:
            it, stats = train_steps(student, teacher, batches, optimizer, lr_at, it, method, config["n_old"],
                                    str(device), config["freeze_bn"], config["clip_grad"])
        except NonFiniteError as err:
            raise NonFiniteError(f"step {config['step']}, epoch {epoch + 1}/{epochs}, rank {rank}, {err}") from None
        seconds = time.perf_counter() - epoch_start
        metrics = {"epoch": epoch, "iteration": it, **stats, "seconds_per_step": seconds / max(1, it - first_it),
                   "peak_rss_mb": peak_rss_mb()}
        history.append(metrics)
        if rank == 0:
            state = {"model": net.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch,
                     "iteration": it, "num_outputs": spec["num_outputs"], "history": history}
            with tempfile.TemporaryDirectory() as directory:
                torch.save(state, os.path.join(directory, STATE_FILE))
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory))
        else:
            ray.train.report(metrics)


class RayTrainer:
    """Trains a step's student with Ray Train's TorchTrainer (the Trainer protocol of hrhf.pipeline).

    The step's real images are materialised once (augmented when drawn) into a Ray Dataset held in the
    object store, which suits the small images of the procedural benchmark; real data of big datasets
    would be read by Ray Data from files. Real and fake rows are split evenly over the workers (up to
    ``num_workers - 1`` rows left out). Each run is named ``step-<step>`` under ``storage_path``, so a
    re-run with the same storage resumes from its last checkpoint; without ``storage_path`` the
    checkpoints go to a temporary local folder (single node) and nothing resumes. The per-epoch lines
    are logged when the fit returns, from the history kept in the last checkpoint. ``train_loop``
    replaces the worker loop (for instance to wrap it).
    """

    def __init__(
        self,
        num_workers: int = 2,
        use_gpu: bool = False,
        cpus_per_worker: float = 1.0,
        storage_path: str | None = None,
        storage_filesystem: Any = None,
        max_failures: int = 2,
        log: Log = print,
        train_loop: Callable[[dict[str, Any]], None] = train_loop_per_worker,
    ) -> None:
        self.num_workers = num_workers
        self.use_gpu = use_gpu
        self.cpus_per_worker = cpus_per_worker
        self.storage_path = storage_path
        self.storage_filesystem = storage_filesystem
        self.max_failures = max_failures
        self.log = as_progress(log)
        self.train_loop = train_loop
        self.history: list[dict[str, float]] = []  # per-epoch metrics of the last step trained

    def train(self, job: StepJob) -> nn.Module:
        """Fit ``job.student`` on the Ray cluster and return it with the last checkpoint's weights."""
        if self.storage_path is not None:
            return self._fit(job, self.storage_path)
        with tempfile.TemporaryDirectory(prefix="hrhf-train-") as directory:
            return self._fit(job, directory)

    def loop_config(self, job: StepJob) -> dict[str, Any]:
        """The config handed to every worker's train loop."""
        cfg = job.cfg
        batch_size = max(1, cfg.train.batch_size // self.num_workers)
        rows = len(job.real) // self.num_workers  # streaming_split(equal=True) gives every worker as many
        drop_last = rows > batch_size
        return {
            "model": {"name": cfg.model.name, "width": cfg.model.width, "num_outputs": num_outputs(job.student)},
            "student_state": _cpu_state(job.student),
            "teacher_state": None if job.teacher is None else _cpu_state(job.teacher),
            "teacher_outputs": None if job.teacher is None else num_outputs(job.teacher),
            "method": cfg.method,
            "use_fake": _uses_fake(job),
            "n_old": job.n_old,
            "epochs": job.epochs,
            "lr": job.lr,
            "weight_decay": cfg.train.weight_decay,
            "batch_size": batch_size,
            "drop_last": drop_last,
            "iters_per_epoch": rows // batch_size if drop_last else math.ceil(rows / batch_size),
            **step_train_options(cfg, incremental=job.teacher is not None),
            "step": job.step,
            "seed": cfg.seed * 100 + job.step,
            "threads": max(1, int(self.cpus_per_worker)),
        }

    def _fit(self, job: StepJob, storage_path: str) -> nn.Module:
        if len(job.real) < self.num_workers:
            raise ValueError(
                f"step {job.step} has {len(job.real)} training images, fewer than the {self.num_workers} workers"
            )
        datasets = {"real": real_dataset(job.real)}
        if _uses_fake(job):
            if len(job.fake) < self.num_workers:
                raise ValueError(f"step {job.step}: {len(job.fake)} synthetic images for {self.num_workers} workers")
            datasets["fake"] = fake_dataset(job.fake)
        trainer = ray.train.torch.TorchTrainer(
            self.train_loop,
            train_loop_config=self.loop_config(job),
            scaling_config=ray.train.ScalingConfig(
                num_workers=self.num_workers, use_gpu=self.use_gpu, resources_per_worker={"CPU": self.cpus_per_worker}
            ),
            run_config=ray.train.RunConfig(
                name=f"step-{job.step}",
                storage_path=storage_path,
                storage_filesystem=self.storage_filesystem,
                failure_config=ray.train.FailureConfig(max_failures=self.max_failures),
                checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
            ),
            datasets=datasets,
        )
        try:
            result = trainer.fit()
        except ray.train.TrainingFailedError as err:
            for failure in getattr(err, "worker_failures", {}).values():
                cause = getattr(failure, "cause", failure)  # a RayTaskError carries the worker's exception
                if isinstance(cause, NonFiniteError) or isinstance(failure, NonFiniteError):
                    raise NonFiniteError(f"{cause}; nothing of this step was saved") from err
            message = f"[step {job.step}] Ray training failed after {self.max_failures} restarts: {err}"
            raise RuntimeError(message) from err
        if result.checkpoint is None:
            raise RuntimeError(f"[step {job.step}] Ray training ended without a checkpoint")
        state = load_train_state(result.checkpoint)
        job.student.load_state_dict(state["model"])
        self.history = state["history"]
        for metrics in self.history:  # replayed after the fit: no ETA
            stats = {k: v for k, v in metrics.items() if k not in ("epoch", "iteration")}
            self.log.event("training", job.step, done=metrics["epoch"] + 1, total=job.epochs, unit="epoch",
                           estimate=False, **stats)
        return job.student


def real_dataset(real: Dataset) -> ray.data.Dataset:
    """A step's real training images as Ray Data rows {image: float32 (3, H, W), mask: uint8 (H, W)}."""
    rows = []
    for i in range(len(real)):
        image, mask = real[i]
        rows.append({"image": image.numpy().astype(np.float32), "mask": mask.numpy().astype(np.uint8)})
    return ray.data.from_items(rows)


def fake_dataset(fake: SyntheticSet) -> ray.data.Dataset:
    """Synthetic images as Ray Data rows {image: uint8 (3, H, W)}."""
    return ray.data.from_items([{"image": image} for image in fake.images.numpy()])


def _uses_fake(job: StepJob) -> bool:
    return job.fake is not None and len(job.fake) > 0 and job.cfg.method.fake


def _cpu_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}
