"""The incremental pipeline, written once: for each step, synthesise (HRHF) -> train -> evaluate.

Synthesis and training sit behind two small interfaces, ``Synthesizer`` and ``Trainer``; the local
implementations here run in-process, and the Ray layer supplies distributed ones.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import copy
import json
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from hrhf import config as config_lib
from hrhf.config import Config
from hrhf.data import build_step_datasets, make_source
from hrhf.data.transforms import eval_transform, train_transform
from hrhf.inversion import (
    NonFiniteError,
    SegInversion,
    SyntheticData,
    SyntheticSet,
    Target,
    allocate_images,
    join_synthetic,
    make_targets,
)
from hrhf.losses import predicted_classes
from hrhf.metrics import images_showing, summarize
from hrhf.lease import RunLease
from hrhf.methods import METHODS
from hrhf.models import (build_model, check_architecture, load_checkpoint, num_outputs, save_checkpoint,
                         widen_classifier)
from hrhf.plots import gallery_png
from hrhf.progress import Log, Progress, as_progress
from hrhf.report import gallery_name, percent, synthesis_summary, write_report
from hrhf.storage import RunDir
from hrhf.tasks import Task, make_task
from hrhf.train import (SeededItems, StepJob, TrainedStep, collate_items, evaluate, fit, plan_step,
                        prediction_batch_size)

REFERENCES_DIR = "references"  # inside a run directory: one folder per reference method
BASE_CHECKPOINT = "step-0.pt"  # the step-0 model every incremental method starts from
WEAK_HIT_RATIO = 0.25  # a class whose synthetic objects the old model sees at under this share of their asked size


class Synthesizer(Protocol):
    """Turns a frozen old model and a list of targets into a synthetic set."""

    def synthesize(self, teacher: nn.Module, targets: list[Target], step: int) -> SyntheticData:
        """Invert ``teacher`` for every target."""
        ...


class Trainer(Protocol):
    """Trains the student of one step and returns it, scored on the job's validation set when it has one."""

    def train(self, job: StepJob) -> TrainedStep:
        """Train ``job.student`` on the step's real (and fake) data; with ``job.val``, its confusion matrix too."""
        ...


class Evaluator(Protocol):
    """Counts over a model's predictions: the confusion matrix on a validation set, the classes images show."""

    def evaluate(self, cfg: Config, model: nn.Module, val: Dataset, num_classes: int) -> torch.Tensor:
        """Rows = truth, columns = prediction."""
        ...

    def images_showing(
        self, cfg: Config, model: nn.Module, dataset: Dataset, num_classes: int, min_share: float
    ) -> torch.Tensor:
        """Per class, how many images of ``dataset`` the model gives at least ``min_share`` of their pixels."""
        ...


class LocalEvaluator:
    """Evaluation in this process (evaluate_step)."""

    def evaluate(self, cfg: Config, model: nn.Module, val: Dataset, num_classes: int) -> torch.Tensor:
        """Confusion matrix by evaluate_step."""
        return evaluate_step(cfg, model, val, num_classes)

    @torch.no_grad()
    def images_showing(
        self, cfg: Config, model: nn.Module, dataset: Dataset, num_classes: int, min_share: float
    ) -> torch.Tensor:
        """Per class, how many images of ``dataset`` the model gives at least ``min_share`` of their pixels."""
        model.to(cfg.device).eval()
        total = torch.zeros(num_classes, dtype=torch.long)
        for images, _ in DataLoader(dataset, batch_size=prediction_batch_size(cfg), collate_fn=collate_items):
            total += images_showing(predicted_classes(model(images.to(cfg.device))), num_classes, min_share)
        return total


@dataclass
class Workers:
    """Who synthesises, trains and evaluates: in this process, or on Ray."""

    synthesizer: Synthesizer
    trainer: Trainer
    evaluator: Evaluator


class LocalSynthesizer:
    """In-process SegInversion."""

    def __init__(self, cfg: Config, log: Log = print) -> None:
        self.cfg = cfg
        self.log = as_progress(log)

    def synthesize(self, teacher: nn.Module, targets: list[Target], step: int) -> SyntheticSet:
        """Invert all targets in this process, batch by batch."""
        start = time.perf_counter()
        self.log.event("synthesis", step, done=0, total=len(targets), unit="images")

        def progress(done: int, total: int) -> None:
            rate = done / max(time.perf_counter() - start, 1e-9)
            self.log.event("synthesis", step, done=done, total=total, unit="images", images_per_s=round(rate, 2))

        with SegInversion(teacher, self.cfg.inversion, self.cfg.data.image_size, self.cfg.device) as inverter:
            return inverter.invert(targets, on_batch=progress)


EpochHook = Callable[[StepJob, int, dict[str, float]], None]


class LocalTrainer:
    """In-process training with the plain loop of hrhf.train; ``after_epoch(job, epoch, stats)`` is called per epoch."""

    def __init__(self, log: Log = print, after_epoch: EpochHook | None = None) -> None:
        self.log = as_progress(log)
        self.after_epoch = after_epoch

    def train(self, job: StepJob) -> TrainedStep:
        """Fit the student for the step's epochs, then score it on ``job.val`` (evaluate_step)."""

        def on_epoch(epoch: int, _iteration: int, stats: dict[str, float]) -> None:
            self.log.event("training", job.step, done=epoch + 1, total=job.plan.epochs, unit="epoch", **stats)
            if self.after_epoch is not None:
                self.after_epoch(job, epoch, stats)

        try:
            model = fit(job.student, job.teacher, job.real, job.fake, job.plan, device=job.cfg.device,
                        num_workers=job.cfg.train.num_workers, on_epoch=on_epoch)
        except NonFiniteError as err:
            raise NonFiniteError(f"step {job.step}, {err}; nothing of this step was saved") from None
        confusion = None if job.val is None else evaluate_step(job.cfg, model, job.val, num_outputs(model))
        return TrainedStep(model, confusion)


def task_of(cfg: Config) -> Task:
    """The protocol instance a config describes."""
    data = cfg.data
    return make_task(data.dataset, data.protocol, overlap=data.overlap, order=data.class_order, order_seed=data.order_seed)


def sources_of(cfg: Config) -> tuple[Dataset, Dataset]:
    """Training and validation sources of the configured dataset."""
    data = cfg.data
    if data.dataset == "shapes":
        shapes = {"image_size": data.image_size, "seed": data.data_seed, "shapes_version": data.shapes_version}
        train = make_source("shapes", "train", size=data.train_size, **shapes)
        val = make_source("shapes", "val", size=data.val_size, **shapes)
    else:
        splits = {"voc": ("train", "val"), "ade": ("training", "validation")}[data.dataset]
        train = make_source(data.dataset, splits[0], root=data.root)
        val = make_source(data.dataset, splits[1], root=data.root)
    return train, val


def step_datasets(cfg: Config, task: Task, step: int, sources: tuple[Dataset, Dataset]) -> tuple[Dataset, Dataset]:
    """Real training data of a step (joint: every seen class labelled) and the validation set."""
    data = cfg.data
    if data.dataset == "shapes":
        train_tf, eval_tf = train_transform(data.image_size, scale=(1.0, 1.0)), eval_transform(None)
    else:
        train_tf, eval_tf = train_transform(data.image_size), eval_transform(None)
    mode = "joint" if cfg.method.joint else "train"
    return build_step_datasets(sources[0], sources[1], task, step, mode, train_tf, eval_tf, cache_dir=data.cache_dir)


def incremental_epochs(cfg: Config, step: int) -> int:
    """Epochs incremental ``step`` of the configured protocol trains for, ``train.min_iters_step`` included."""
    task = task_of(cfg)
    real, _ = step_datasets(cfg, task, step, sources_of(cfg))
    return plan_step(cfg, step, n_old=len(task.old_classes(step)), incremental=True, num_real=len(real)).epochs


def evaluate_step(cfg: Config, model: nn.Module, val: Dataset, num_classes: int) -> torch.Tensor:
    """Confusion matrix on a step's validation set, on the config's device; real images (mixed sizes) one at a time."""
    return evaluate(model, val, num_classes, batch_size=prediction_batch_size(cfg), device=cfg.device)


def step_targets(cfg: Config, task: Task, step: int, images_per_class: Sequence[int] | None = None) -> list[Target]:
    """The synthesis targets of a step: old classes x SAA scales x seeds (per class when given)."""
    inv = cfg.inversion
    counts = inv.images_per_scale if images_per_class is None else images_per_class
    return make_targets(task.old_indices(step), inv.scales, counts, base_seed=cfg.seed * 100 + step)


def kept_targets(cfg: Config, task: Task, step: int) -> list[Target]:
    """inversion.keep_images: what ``step`` inverts, the classes learnt at the step before (at step 1 every base class)."""
    inv = cfg.inversion
    return make_targets(task.new_indices(step - 1), inv.scales, inv.images_per_scale, base_seed=cfg.seed * 100 + step)


def kept_synthesis(
    cfg: Config, task: Task, step: int, teacher: nn.Module, kept: SyntheticData | None, rundir: RunDir,
    synthesizer: Synthesizer,
) -> SyntheticData:
    """inversion.keep_images: the synthetic set of ``step``, the images ``kept`` from earlier steps and the
    teacher's images of the classes it learnt from real images at the step before.

    A run resumed after finished steps has kept nothing: each earlier step's images are asked of the
    synthesizer again with the checkpoint of that step's teacher, which gives the same images (the inversion
    is seeded); a synthesizer with a shard store finds them there, by teacher, and inverts nothing.
    """

    def invert(model: nn.Module, at_step: int) -> SyntheticData:
        return synthesizer.synthesize(model, kept_targets(cfg, task, at_step), at_step)

    if kept is None and step > 1:
        if rundir.uri is None:
            raise ValueError(f"inversion.keep_images from step {step} needs the run directory of the earlier steps")
        kept = join_synthetic([invert(load_checkpoint(rundir.path(f"step-{earlier - 1}.pt"), cfg.device)[0], earlier)
                               for earlier in range(1, step)])
    new = invert(teacher, step)
    return new if kept is None else join_synthetic([kept, new])


def synthesis_budget(
    cfg: Config, teacher: nn.Module, real: Dataset, n_old: int, evaluator: Evaluator
) -> dict[str, list]:
    """Images per scale for each old class (``inversion.allocation``), and the share of the step's real
    images in which the old model sees each (coverage only; measured on the evaluator's workers)."""
    inv = cfg.inversion
    if inv.allocation == "uniform":
        return {"images_per_scale": [inv.images_per_scale] * n_old}
    seen = evaluator.images_showing(cfg, teacher, SeededItems(real, cfg.seed), n_old + 1, inv.coverage_min_pixels)
    presence = [round(float(count) / max(len(real), 1), 4) for count in seen[1:]]
    return {"images_per_scale": allocate_images(presence, inv.images_per_scale, inv.coverage_target),
            "presence": presence}


def _warn_of_weak_synthesis(progress: Progress, step: int, summary: dict[str, float] | None, old_names: list[str]) -> None:
    """Warn when the old model sees a class's synthetic objects at under WEAK_HIT_RATIO of the asked size."""
    if summary and summary["weakest_hit_ratio"] < WEAK_HIT_RATIO:
        name = old_names[summary["weakest_class"] - 1]
        progress.event("synthesis", step, f"the old model labels {name} on only {summary['weakest_hit_ratio']:.0%} of "
                       f"the area asked of its synthetic images, a second try included, so {name} is barely replayed (see "
                       f"inversion.retry_below, inversion.retry_init_std, inversion.jitter and inversion.iterations)", level="warning")


def _check_checkpoint(payload: dict[str, Any], cfg: Config, task: Task, upto: int, uri: str) -> None:
    """Raise ValueError unless a checkpoint holds the configured architecture and the task's classes of steps 0..upto."""
    check_architecture(payload, cfg.model.name, cfg.model.width, uri)
    expected = [list(task.steps[s]) for s in range(upto + 1)]
    if payload["classes"][: upto + 1] != expected:
        raise ValueError(
            f"checkpoint classes {payload['classes']} do not match protocol {task.name!r} "
            f"steps 0..{upto}: {expected}"
        )


def check_source(source: Dataset, threads: int = 8) -> None:
    """Decode every image and mask of a file-backed source; ValueError / FileNotFoundError names the first bad file.

    Catches truncated or empty files, masks of another size and labels out of range before any step
    trains, instead of at the image's first use hours in.
    """
    with concurrent.futures.ThreadPoolExecutor(threads) as pool:  # PIL decodes and fsspec reads release the GIL
        for _ in pool.map(source.load, range(len(source))):
            pass


def preflight(cfg: Config, run_dir: str | None, check_data: bool = True, references: Sequence[str] = ()) -> Task:
    """Every check that can fail before work starts: config, run directory, base checkpoint, data, references.

    Raises ValueError / FileNotFoundError / OSError with a message naming the culprit. ``check_data``
    decodes every real image and mask once (the procedural dataset needs no check). Each reference
    method must be valid for the run (``check_references``) and its folder in the run directory must
    hold its own config, if any. Writes nothing.
    """
    config_lib.validate(cfg)
    task = task_of(cfg)
    RunDir(run_dir).check(cfg)
    for name in check_references(cfg, references):
        if run_dir is None:
            raise ValueError("reference methods need a run directory")
        RunDir(reference_dir(run_dir, name)).check(reference_config(cfg, name))
    if cfg.train.init_checkpoint and not cfg.method.joint:
        _, payload = load_checkpoint(cfg.train.init_checkpoint)
        _check_checkpoint(payload, cfg, task, 0, cfg.train.init_checkpoint)
    sources = sources_of(cfg)
    if check_data and cfg.data.dataset != "shapes":
        for source in sources:
            check_source(source)
    return task


def run(
    cfg: Config,
    run_dir: str | None = None,
    synthesizer: Synthesizer | None = None,
    trainer: Trainer | None = None,
    log: Log = print,
    last_step: int | None = None,
    first_step: int = 0,
    lease: RunLease | None = None,
    evaluator: Evaluator | None = None,
) -> dict[str, Any]:
    """Run the steps of the configured protocol (``first_step`` to ``last_step``) and return the report.

    With a ``run_dir``, each finished step is checkpointed there and a rerun resumes after it; the run
    directory also receives each synthesis step's gallery and, at the end, the report files
    (``write_report``). The run directory is leased for the whole run: pass the ``lease`` a job took
    before its checks, or ``run`` takes one itself (LeaseHeldError when another job holds it). Only
    joint training, whose steps are independent, may start after step 0. ``log`` is a plain log
    function or a ``Progress`` receiving structured events. The defaults synthesise, train and evaluate
    in this process.
    """
    config_lib.validate(cfg)
    if first_step and not cfg.method.joint:
        raise ValueError("only joint training can skip steps: every other method starts from the previous model")
    with _leased(run_dir, lease) as held:
        workers = Workers(synthesizer or LocalSynthesizer(cfg, log), trainer or LocalTrainer(log),
                          evaluator or LocalEvaluator())
        return _run_steps(cfg, RunDir(run_dir), workers, as_progress(log), first_step, last_step, held)


@contextlib.contextmanager
def _leased(run_dir: str | None, lease: RunLease | None) -> Iterator[RunLease | None]:
    """``lease`` itself, or a lease of ``run_dir`` taken for the block (none without a run directory)."""
    if run_dir is None or lease is not None:
        yield lease
        return
    with RunLease(run_dir).acquire() as taken:
        yield taken


def reference_dir(run_dir: str, name: str) -> str:
    """Where reference method ``name`` keeps its steps: ``references/<name>`` inside the run directory."""
    return f"{run_dir.rstrip('/')}/{REFERENCES_DIR}/{name}"


def reference_config(cfg: Config, name: str) -> Config:
    """The config of reference method ``name`` beside a run of ``cfg``: that method's preset, all else the run's."""
    ref_cfg = copy.deepcopy(cfg)
    ref_cfg.method = copy.deepcopy(METHODS[name])
    return config_lib.validate(ref_cfg)


def check_references(cfg: Config, names: Sequence[str]) -> list[str]:
    """The reference methods, each once and in order; ValueError for an unknown one, the run's own, or a joint run."""
    unique = list(dict.fromkeys(names))
    unknown = [name for name in unique if name not in METHODS]
    if unknown:
        raise ValueError(f"unknown reference method {', '.join(map(repr, unknown))}; methods: {', '.join(METHODS)}")
    if cfg.method.name in unique:
        raise ValueError(f"reference {cfg.method.name!r} is the run's own method")
    if unique and cfg.method.joint:
        raise ValueError("a joint run has no incremental step-0 model for reference methods to start from")
    return unique


def run_reference(
    cfg: Config,
    name: str,
    run_dir: str,
    synthesizer: Synthesizer | None = None,
    trainer: Trainer | None = None,
    evaluator: Evaluator | None = None,
    log: Log = print,
    lease: RunLease | None = None,
) -> list[dict[str, Any]]:
    """Run reference method ``name`` beside the run of ``cfg`` in ``run_dir``; return its step results.

    An incremental reference starts from the run's step-0 model (``run_dir``/step-0.pt, which must
    exist; step 0 is not trained again) and keeps its steps under ``references/<name>`` as a run of
    its own, so a rerun resumes it. Joint training, the upper bound trained from scratch, runs the last
    step only. ``synthesizer``, ``trainer`` and ``evaluator`` default to this process, as in ``run``.
    """
    check_references(cfg, [name])
    ref_cfg = reference_config(cfg, name)
    progress = as_progress(log)
    with _leased(run_dir, lease) as held:
        rundir = RunDir(reference_dir(run_dir, name))
        if ref_cfg.method.joint:
            first_step = task_of(cfg).num_steps - 1
            progress.event("reference", None, f"{name}: last step trained from scratch, in {rundir.uri}")
        else:
            first_step = 0
            _share_base_model(RunDir(run_dir), rundir, progress)
            progress.event("reference", None, f"{name}: from the run's step-0 model, in {rundir.uri}")
        workers = Workers(synthesizer or LocalSynthesizer(ref_cfg, log), trainer or LocalTrainer(log),
                          evaluator or LocalEvaluator())
        return _run_steps(ref_cfg, rundir, workers, progress, first_step, None, held)["steps"]


def _share_base_model(run: RunDir, reference: RunDir, progress: Progress) -> None:
    """Make the reference's step-0.pt a byte copy of the run's; a reference of another step-0 model starts over."""
    if not run.exists(BASE_CHECKPOINT):
        raise ValueError(f"{run.path(BASE_CHECKPOINT)} not found: a reference starts from the run's step-0 model")
    base = run.read_bytes(BASE_CHECKPOINT)
    if reference.exists(BASE_CHECKPOINT) and reference.read_bytes(BASE_CHECKPOINT) == base:
        return
    if reference.fs.glob(reference.path("step-*.pt")):  # the run's step 0 was recomputed since: all here is stale
        reference.fs.rm(reference.uri, recursive=True)
        progress.event("reference", 0, f"{reference.uri} was not made from the run's step-0 model; starting it over",
                       level="warning")
    reference.write_bytes(BASE_CHECKPOINT, base)


def add_references(
    report: Mapping[str, Any],
    run_dir: str | None,
    references: Mapping[str, Sequence[Mapping[str, Any]]],
    log: Log = print,
    lease: RunLease | None = None,
) -> dict[str, Any]:
    """The run's report with ``references`` ({method: step results}) beside it, rewritten to the run directory."""
    report = {**report, "references": {name: list(steps) for name, steps in references.items()}}
    rundir = RunDir(run_dir)
    if rundir.uri is not None:
        if lease is not None:
            lease.check()
        written = write_report(rundir, report)
        as_progress(log).event("report", None, f"{', '.join(written)} written to {rundir.uri}, with references "
                               f"{', '.join(references)}")
    return report


def _load_finished_step(rundir: RunDir, step: int, task: Task, cfg: Config, progress: Progress) -> tuple[nn.Module, dict] | None:
    """The checkpoint of a finished step, or None when there is none or it is damaged (then set aside)."""
    name = f"step-{step}.pt"
    if not rundir.exists(name):
        return None
    try:
        model, payload = load_checkpoint(rundir.path(name), cfg.device)
    except ValueError as err:
        rundir.fs.mv(rundir.path(name), rundir.path(f"{name}.damaged"))
        progress.event("run", step, f"{err}; moved it to {name}.damaged and recomputing the step", level="warning")
        return None
    _check_checkpoint(payload, cfg, task, step, rundir.path(name))
    return model, payload


def _run_steps(
    cfg: Config,
    rundir: RunDir,
    workers: Workers,
    progress: Progress,
    first_step: int,
    last_step: int | None,
    lease: RunLease | None,
) -> dict[str, Any]:
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    task = task_of(cfg)
    rundir.claim(cfg)
    sources = sources_of(cfg)
    names, palette = sources[0].class_names, sources[0].palette
    report: dict[str, Any] = {"task": {"dataset": task.dataset, "protocol": task.name, "overlap": task.overlap,
                                       "steps": [list(s) for s in task.steps]},
                              "method": cfg.method.name, "config": config_lib.to_dict(cfg), "steps": []}
    model: nn.Module | None = None
    kept: SyntheticData | None = None  # inversion.keep_images: the synthetic images of the steps run so far
    recomputed = False  # once a step is trained again, later checkpoints came from another model
    for step in range(first_step, task.num_steps if last_step is None else last_step + 1):
        ckpt_name = f"step-{step}.pt"
        if recomputed and rundir.exists(ckpt_name):
            rundir.fs.rm_file(rundir.path(ckpt_name))
            progress.event("run", step, f"removed {ckpt_name}: an earlier step was recomputed", level="warning")
        if recomputed and rundir.exists(f"train/step-{step}"):  # a Ray Train run that started from the old model
            rundir.fs.rm(rundir.path(f"train/step-{step}"), recursive=True)
            progress.event("run", step, f"removed train/step-{step}: an earlier step was recomputed", level="warning")
        finished = None if recomputed else _load_finished_step(rundir, step, task, cfg, progress)
        if finished is not None:
            model, payload = finished
            report["steps"].append(payload["extra"]["result"])
            progress.event("run", step, f"found {ckpt_name} in the run directory, not recomputed")
            continue
        recomputed = rundir.uri is not None and not cfg.method.joint
        torch.manual_seed(cfg.seed * 100 + step)
        real, val = step_datasets(cfg, task, step, sources)
        n_old, n_seen = len(task.old_classes(step)), task.num_seen(step)
        fake, synth_seconds, synthesis = None, 0.0, None
        teacher, budget = None, None
        start = time.perf_counter()
        if cfg.method.joint or step == 0:
            if step == 0 and cfg.train.init_checkpoint and not cfg.method.joint:
                model, payload = load_checkpoint(cfg.train.init_checkpoint, cfg.device)
                _check_checkpoint(payload, cfg, task, 0, cfg.train.init_checkpoint)
                progress.event("training", 0, f"starting from {cfg.train.init_checkpoint}")
                student = None
            else:
                student = build_model(cfg.model.name, n_seen + 1, cfg.model.width, cfg.model.backbone_weights)
            plan = plan_step(cfg, step, n_old=0, incremental=False)
        else:
            teacher = copy.deepcopy(model).eval().requires_grad_(False)
            student = widen_classifier(copy.deepcopy(model), len(task.new_classes(step)), cfg.method.init)
            plan = plan_step(cfg, step, n_old=n_old, incremental=True, num_real=len(real))
            if cfg.method.fake:
                synth_start = time.perf_counter()
                if cfg.inversion.keep_images:
                    kept = fake = kept_synthesis(cfg, task, step, teacher, kept, rundir, workers.synthesizer)
                else:
                    budget = synthesis_budget(cfg, teacher, real, n_old, workers.evaluator)
                    if "presence" in budget:
                        shown = zip(task.old_classes(step), budget["presence"], budget["images_per_scale"])
                        progress.event("synthesis", step, "coverage allocation (share of real images -> images per "
                                       "scale): " + ", ".join(f"{names[c]} {p:.0%} -> {k}" for c, p, k in shown))
                    targets = step_targets(cfg, task, step, budget["images_per_scale"])
                    fake = workers.synthesizer.synthesize(teacher, targets, step)
                synth_seconds = time.perf_counter() - synth_start
                synthesis = synthesis_summary(fake)
                _warn_of_weak_synthesis(progress, step, synthesis, [names[c] for c in task.old_classes(step)])
        train_start = time.perf_counter()
        if student is not None:
            progress.event("training", step, done=0, total=plan.epochs, unit="epoch", real_images=len(real),
                           synthetic_images=len(fake) if fake else 0)
            trained = workers.trainer.train(StepJob(step, student, teacher, real, fake, plan, cfg, val=val))
            model, matrix = trained.model, trained.confusion
        else:
            matrix = None
        train_seconds = time.perf_counter() - train_start
        if matrix is None:  # a step-0 model loaded from a checkpoint, or a trainer that could not score it
            progress.event("evaluation", step, f"on {len(val)} validation images")
            matrix = workers.evaluator.evaluate(cfg, model, val, n_seen + 1)
        metrics = summarize(matrix, task.old_indices(step), task.new_indices(step))
        result = {
            "step": step,
            "new_classes": [names[c] for c in task.new_classes(step)],
            "seen_classes": [names[c] for c in task.seen_classes(step)],
            "method": cfg.method.name,
            "metrics": metrics,
            "num_real": len(real),
            "num_fake": len(fake) if fake else 0,
            "synthesis": synthesis,
            "synthesis_budget": budget,
            "synthesis_seconds": round(synth_seconds, 3),
            "training_seconds": round(train_seconds, 3),
            "step_seconds": round(time.perf_counter() - start, 3),
        }
        progress.event("evaluation", step, "mIoU (%)",
                       **{k: percent(metrics[k]) for k in ("old", "new", "all", "background")})
        report["steps"].append(result)
        if lease is not None:
            lease.check()
        if rundir.uri is not None and fake:
            classes = task.old_classes(step)
            rundir.write_bytes(gallery_name(step), gallery_png(
                fake.gallery_sample(), ["background", *(names[c] for c in classes)], [palette[0], *(palette[c] for c in classes)],
                title=f"Step {step}: synthetic image | old model's label",
            ))
        if rundir.uri is not None:
            save_checkpoint(rundir.path(ckpt_name), model, model_name=cfg.model.name, width=cfg.model.width,
                            classes=[list(task.steps[s]) for s in range(step + 1)], step=step,
                            config=config_lib.to_dict(cfg), extra={"result": json.loads(json.dumps(result))})
    if rundir.uri is not None:
        if lease is not None:
            lease.check()
        written = write_report(rundir, report)
        progress.event("report", None, f"{', '.join(written)} written to {rundir.uri}")
    return report
