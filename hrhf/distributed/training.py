"""Distillation of one step with Ray Train: DDP workers fed by Ray Data, per-epoch checkpoints.

The loop is hrhf.train's epoch driver; this module only feeds it on the workers and makes it
restartable. No image passes through the driver:
- real images: the driver builds, per worker, a Ray Dataset of item references (epoch, global batch,
  item index) in hrhf.train's order; the worker decodes and augments its items itself, with the
  step dataset's own transforms and hrhf.train's seeding rule, afresh every epoch;
- synthetic images: every worker streams the step's committed Parquet shards (or the object-store
  tables) itself, cyclically, one record batch at a time, and decodes only the rows of its share of
  each batch.
Each epoch ends with a checkpoint from rank 0; a restarted worker group (FailureConfig) or a re-run
with the same storage resumes from it. Epoch progress reaches the driver through a queue while the
fit runs.
"""

from __future__ import annotations

import os
import queue as queue_lib
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray
import ray.data
import ray.train
import ray.train.torch
import torch
from ray.util.queue import Queue
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
from torch.utils.data import Dataset

from hrhf.batchnorm import synchronise_batchnorm
from hrhf.distributed import peak_rss_mb
from hrhf.distributed.devices import compute_device
from hrhf.inversion import NonFiniteError, SyntheticParts, SyntheticSet
from hrhf.models import ModelSpec
from hrhf.progress import Log, as_progress
from hrhf.shards import ShardStore, StoredSynthetic, decode_png, encode_png
from hrhf.train import (
    StepJob,
    StepPlan,
    TrainedStep,
    epoch_batches,
    evaluate_share,
    item_batches,
    iters_per_epoch,
    make_optimizer,
    mixed_batches,
    old_model_logits,
    prediction_batch_size,
    real_batches,
    run_epochs,
    share,
)

STATE_FILE = "state.pt"


def load_train_state(checkpoint: ray.train.Checkpoint) -> dict[str, Any]:
    """The training state a rank-0 worker saved: model, optimizer, epoch, iteration, outputs, history."""
    with checkpoint.as_directory() as directory:
        return torch.load(os.path.join(directory, STATE_FILE), map_location="cpu", weights_only=True)


@dataclass
class WorkerJob:
    """What every worker of a step needs; the images themselves are read by the workers."""

    plan: StepPlan
    student: ModelSpec
    teacher: ModelSpec | None
    real: Dataset  # the step's real training set: sources and transforms, not images
    iters: int  # global batches per epoch
    fake: FakeRows | None  # the step's synthetic rows, None without a fake half
    threads: int
    loader_workers: int  # processes decoding and augmenting each worker's real images (train.num_workers)
    sync_bn: bool
    progress: Any = None  # a ray.util.queue.Queue receiving rank 0's per-epoch metrics
    use_gpu: bool = False  # whether each worker reserves a GPU
    val: Dataset | None = None  # scored after the last epoch, each worker on its share (items, not images)
    val_batch_size: int = 1  # images per prediction batch (hrhf.train.prediction_batch_size)


def real_schedule(num_items: int, plan: StepPlan, world: int) -> list[pa.Table]:
    """Per worker, the (epoch, batch, item) references of its share of every global batch of the step."""
    columns: list[dict[str, list[int]]] = [{"epoch": [], "batch": [], "item": []} for _ in range(world)]
    for epoch in range(plan.epochs):
        for b, batch in enumerate(epoch_batches(num_items, plan.batch_size, plan.seed, epoch)):
            for rank in range(world):
                items = batch[share(len(batch), rank, world)]
                columns[rank]["epoch"] += [epoch] * len(items)
                columns[rank]["batch"] += [b] * len(items)
                columns[rank]["item"] += items
    return [pa.table({k: pa.array(v, pa.int64()) for k, v in c.items()}) for c in columns]


class RealStream:
    """A worker's real batches, epoch by epoch, from its stream of item references."""

    def __init__(self, shard: ray.data.DataIterator, real: Dataset, seed: int, loader_workers: int = 0) -> None:
        self.real, self.seed, self.loader_workers = real, seed, loader_workers
        self.groups = self._groups(shard)
        self.pending: tuple[int, list[int]] | None = None

    @staticmethod
    def _groups(shard: ray.data.DataIterator) -> Iterator[tuple[int, list[int]]]:
        key, items = None, []
        for block in shard.iter_batches(batch_size=4096, batch_format="numpy", prefetch_batches=1):
            for epoch, batch, item in zip(block["epoch"].tolist(), block["batch"].tolist(), block["item"].tolist()):
                if (epoch, batch) != key and items:
                    yield key[0], items
                    items = []
                key = (epoch, batch)
                items.append(item)
        if items:
            yield key[0], items

    def epoch(self, epoch: int) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
        """Decoded, augmented batches of ``epoch`` (by hrhf.train's loader); earlier epochs' references are skipped."""
        batches = []
        while True:
            if self.pending is None:
                self.pending = next(self.groups, None)
                if self.pending is None:
                    break
            group_epoch, items = self.pending
            if group_epoch > epoch:
                break
            self.pending = None
            if group_epoch == epoch:
                batches.append([(epoch, item) for item in items])
        return item_batches(self.real, self.seed, batches, self.loader_workers)


@dataclass
class FakeRows:
    """Where the workers read a step's synthetic images: committed Parquet shards of a store, or Arrow tables
    in Ray's object store. Each worker reads them itself, one record batch or shard at a time."""

    count: int
    store: ShardStore | None = None
    paths: list[str] = field(default_factory=list)  # within store.arrow_filesystem()
    table_refs: list[ray.ObjectRef] = field(default_factory=list)
    table: pa.Table | None = None  # an in-memory set, shipped with the job

    @classmethod
    def of(cls, fake: Any) -> FakeRows:
        """The rows of a step's synthetic data, as the synthesizer left them."""
        if isinstance(fake, SyntheticParts):  # inversion.keep_images: several steps' rows, one after the other
            return cls.joined([cls.of(part) for part in fake.parts])
        if isinstance(fake, StoredSynthetic):
            return cls(len(fake), store=fake.store, paths=fake.parquet_paths())
        if hasattr(fake, "table_refs"):  # synthetic tables in Ray's object store
            return cls(len(fake), table_refs=list(fake.table_refs))
        if isinstance(fake, SyntheticSet):  # an in-memory set (tests, benchmarks): shipped with the job
            # not ray.put: a reference the driver holds in a cycle can be collected after ray.shutdown(),
            # and Ray ends the process when that happens
            images = fake.images.permute(0, 2, 3, 1).contiguous().numpy()
            return cls(len(fake), table=pa.table({"image": [encode_png(image) for image in images]}))
        raise TypeError(f"cannot stream synthetic images from {type(fake).__name__}")

    @classmethod
    def joined(cls, parts: list[FakeRows]) -> FakeRows:
        """Rows of one kind (shards of one store, object-store tables, or in-memory tables) read one part after another."""
        kinds = {(part.store.uri if part.store is not None else None, part.table is not None) for part in parts}
        if len(kinds) > 1:
            raise TypeError("cannot stream synthetic rows from different kinds of storage as one set")
        tables = [part.table for part in parts if part.table is not None]
        return cls(sum(part.count for part in parts), store=parts[0].store if parts else None,
                   paths=[path for part in parts for path in part.paths],
                   table_refs=[ref for part in parts for ref in part.table_refs],
                   table=pa.concat_tables(tables) if tables else None)

    def images(self) -> Iterator[bytes]:
        """One pass over the PNG-encoded images, in the step's order."""
        if self.store is not None:
            filesystem = self.store.arrow_filesystem()
            for path in self.paths:
                with filesystem.open_input_file(path) as file:
                    for batch in pq.ParquetFile(file).iter_batches(batch_size=64, columns=["image"]):
                        yield from batch.column(0).to_pylist()
        elif self.table is not None:
            yield from self.table.column("image").to_pylist()
        else:
            for table_ref in self.table_refs:
                yield from ray.get(table_ref).column("image").to_pylist()


class StreamedFake:
    """A FakeSource over a step's synthetic rows, the set repeated end to end: only the current batch of rows is held.

    Not Ray Data: its Parquet reader lists files with tasks of a whole CPU each, which never start while
    the train workers hold every CPU of the cluster (as they do on one machine).
    """

    def __init__(self, rows: FakeRows) -> None:
        self.size = rows.count
        self.rows = self._repeated(rows)
        self.position = -1  # position of the last row read
        self.image: bytes | None = None

    @staticmethod
    def _repeated(rows: FakeRows) -> Iterator[bytes]:
        while True:
            yield from rows.images()

    def __len__(self) -> int:
        return self.size

    def take(self, positions: Sequence[int]) -> torch.Tensor:
        """uint8 images at ``positions`` of the repeated stream (non-decreasing: the stream only moves forward)."""
        images = []
        for position in positions:
            if position < self.position:
                raise ValueError(f"synthetic stream asked for position {position} after {self.position}")
            while self.position < position:
                self.image = next(self.rows)
                self.position += 1
            images.append(decode_png(self.image).transpose(2, 0, 1))
        return torch.from_numpy(np.ascontiguousarray(np.stack(images)))


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """One Ray Train worker: DDP student, local frozen teacher, hrhf.train's epochs, checkpoints."""
    job: WorkerJob = config["job"]
    plan = job.plan
    torch.set_num_threads(job.threads)
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    compute_device(job.use_gpu, "train")  # Ray Train picks the device; this checks and records the worker's request

    net = job.student.build()
    if job.sync_bn and world > 1:
        net = synchronise_batchnorm(net, device)
    teacher = None
    if job.teacher is not None:
        teacher = job.teacher.build()
        teacher.to(device).eval().requires_grad_(False)
    student = ray.train.torch.prepare_model(net)  # wraps the same module: net's parameters are the student's
    optimizer = make_optimizer(net, plan.lr, plan.weight_decay, plan.head_lr_mult)

    start_epoch, history = 0, []
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        state = load_train_state(checkpoint)
        net.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start_epoch, history = state["epoch"] + 1, state["history"]

    fake = StreamedFake(job.fake) if job.fake is not None else None
    old_logits = old_model_logits(teacher, len(fake), plan, str(device)) if fake is not None else None
    real = RealStream(ray.train.get_dataset_shard(f"real-{rank}"), job.real, plan.seed, job.loader_workers)
    epoch_start = time.perf_counter()

    def batches_of_epoch(epoch: int) -> Iterator:
        return mixed_batches(real.epoch(epoch), fake, plan, epoch, job.iters, rank, world, old_logits)

    progress = job.progress

    def on_epoch(epoch: int, iteration: int, stats: dict[str, float]) -> None:
        nonlocal epoch_start, progress
        seconds = time.perf_counter() - epoch_start
        metrics = {"epoch": epoch, "iteration": iteration, **stats, "seconds_per_step": seconds / job.iters,
                   "peak_rss_mb": peak_rss_mb()}
        history.append(metrics)
        confusion = None
        if epoch == plan.epochs - 1 and job.val is not None:  # every rank scores its share; the sum reaches all
            confusion = evaluate_share(net, job.val, job.student.num_outputs, job.val_batch_size, str(device), rank,
                                       world)
        if rank == 0:
            if progress is not None:
                progress = report_progress(progress, metrics)
            state = {"model": net.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch,
                     "iteration": iteration, "num_outputs": job.student.num_outputs, "history": history,
                     "confusion": confusion}
            with tempfile.TemporaryDirectory() as directory:
                torch.save(state, os.path.join(directory, STATE_FILE))
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory))
        else:
            ray.train.report(metrics)
        epoch_start = time.perf_counter()

    try:
        run_epochs(student, teacher, plan, batches_of_epoch, job.iters, optimizer, str(device), start_epoch, on_epoch,
                   threshold_batches=lambda: real_batches(job.real, plan, 0, rank=rank, world=world))
    except NonFiniteError as err:
        raise NonFiniteError(f"step {plan.step}, rank {rank}, {err}") from None


def report_progress(progress: Queue, metrics: dict[str, float]) -> Queue | None:
    """Put ``metrics`` on the progress queue; returns None once the queue is gone, so that training goes on without it."""
    try:
        progress.put(metrics)
    except ray.exceptions.RayActorError as err:
        print(f"progress queue lost ({type(err).__name__}); training goes on without epoch progress", flush=True)
        return None
    return progress


class RayTrainer:
    """Trains a step's student with Ray Train's TorchTrainer (the Trainer protocol of hrhf.pipeline).

    The global batch is the config's, split evenly over the workers, and every global batch holds the
    same images whatever the number of workers (see hrhf.train). Each run is named ``step-<step>``
    under ``storage_path``, so a re-run with the same storage resumes from its last checkpoint; without
    ``storage_path`` the checkpoints go to a temporary local folder (single node) and nothing resumes.
    ``train_loop`` replaces the worker loop (for instance to wrap it).
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

    def train(self, job: StepJob) -> TrainedStep:
        """Fit ``job.student`` on the Ray cluster: it gets the last checkpoint's weights, scored on ``job.val``
        by the workers when given (None when the checkpoint predates scoring)."""
        if self.storage_path is not None:
            return self._fit(job, self.storage_path)
        with tempfile.TemporaryDirectory(prefix="hrhf-train-") as directory:
            return self._fit(job, directory)

    def worker_job(self, job: StepJob, progress: Any = None) -> WorkerJob:
        """The job handed to every worker."""
        plan = job.plan
        return WorkerJob(
            plan=plan,
            student=ModelSpec.of(job.student, job.cfg.model.name, job.cfg.model.width),
            teacher=None if job.teacher is None else ModelSpec.of(job.teacher, job.cfg.model.name, job.cfg.model.width),
            real=job.real,
            iters=iters_per_epoch(len(job.real), plan.batch_size),
            fake=FakeRows.of(job.fake) if _uses_fake(job) else None,
            threads=max(1, int(self.cpus_per_worker)),
            loader_workers=job.cfg.train.num_workers,
            sync_bn=job.cfg.train.sync_bn,
            progress=progress,
            use_gpu=bool(self.scaling_config().use_gpu),
            val=job.val,
            val_batch_size=prediction_batch_size(job.cfg),
        )

    def progress_queue(self) -> Queue:
        """The queue of rank 0's epoch metrics, kept on the driver's node so that losing a worker node spares it."""
        driver_node = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
        return Queue(actor_options={"num_cpus": 0, "scheduling_strategy": driver_node})

    def scaling_config(self) -> ray.train.ScalingConfig:
        """The workers' resources: one CPU share each, and one GPU each with ``use_gpu``."""
        return ray.train.ScalingConfig(
            num_workers=self.num_workers, use_gpu=self.use_gpu, resources_per_worker={"CPU": self.cpus_per_worker}
        )

    def _check(self, job: StepJob) -> None:
        plan = job.plan
        if plan.batch_size % self.num_workers:
            raise ValueError(f"the global batch of {plan.batch_size} images does not split evenly over "
                             f"{self.num_workers} workers; choose a batch size divisible by the worker count")
        if len(job.real) < self.num_workers:
            raise ValueError(
                f"step {plan.step} has {len(job.real)} training images, fewer than the {self.num_workers} workers"
            )

    def _fit(self, job: StepJob, storage_path: str) -> TrainedStep:
        self._check(job)
        plan = job.plan
        # from_items builds the block and its metadata here; from_arrow would start a task (a process) for them
        datasets = {f"real-{rank}": ray.data.from_items(table.to_pylist(), override_num_blocks=1)
                    for rank, table in enumerate(real_schedule(len(job.real), plan, self.num_workers))}
        progress = self.progress_queue()
        trainer = ray.train.torch.TorchTrainer(
            self.train_loop,
            train_loop_config={"job": self.worker_job(job, progress)},
            scaling_config=self.scaling_config(),
            run_config=ray.train.RunConfig(
                name=f"step-{plan.step}",
                storage_path=storage_path,
                storage_filesystem=self.storage_filesystem,
                failure_config=ray.train.FailureConfig(max_failures=self.max_failures),
                checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
            ),
            datasets=datasets,
            dataset_config=ray.train.DataConfig(
                datasets_to_split=[],  # each worker reads its own references
                execution_options=ray.data.ExecutionOptions(preserve_order=True),
            ),
        )
        done = threading.Event()
        relay = threading.Thread(target=self._relay, args=(progress, job, done), daemon=True)
        relay.start()
        try:
            result = trainer.fit()
        except ray.train.TrainingFailedError as err:
            for failure in getattr(err, "worker_failures", {}).values():
                cause = getattr(failure, "cause", failure)  # a RayTaskError carries the worker's exception
                if isinstance(cause, NonFiniteError) or isinstance(failure, NonFiniteError):
                    raise NonFiniteError(f"{cause}; nothing of this step was saved") from err
            message = f"[step {plan.step}] Ray training failed after {self.max_failures} restarts: {err}"
            raise RuntimeError(message) from err
        finally:
            done.set()
            relay.join()
            ray.kill(progress.actor)
        if result.checkpoint is None:
            raise RuntimeError(f"[step {plan.step}] Ray training ended without a checkpoint")
        state = load_train_state(result.checkpoint)
        job.student.load_state_dict(state["model"])
        self.history = state["history"]
        return TrainedStep(job.student, state.get("confusion"))

    def _relay(self, progress: Queue, job: StepJob, done: threading.Event) -> None:
        """Log rank 0's epoch metrics as they arrive, until the fit has returned and the queue is drained."""
        while True:
            try:
                metrics = progress.get(timeout=0.5)
            except (queue_lib.Empty, ray.util.queue.Empty):
                if done.is_set():
                    return
                continue
            except Exception:  # the queue actor is gone: nothing more will arrive
                return
            stats = {k: v for k, v in metrics.items() if k not in ("epoch", "iteration")}
            self.log.event("training", job.step, done=metrics["epoch"] + 1, total=job.plan.epochs, unit="epoch", **stats)


def _uses_fake(job: StepJob) -> bool:
    return job.fake is not None and len(job.fake) > 0 and job.plan.method.fake
