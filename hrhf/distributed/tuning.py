"""Ray Tune sweeps over the distillation weights, the real:fake ratio and the SAA scale set.

Each trial runs one full incremental step (synthesis + distillation + evaluation) of the configured
protocol from a shared step-0 checkpoint, reporting validation mIoU after every epoch so that ASHA can
stop weak trials early. The last report carries a checkpoint (the step's result and the trained model),
so that a sweep resumed with ``resume_tuner`` never retrains a finished trial; an interrupted trial
starts its step again.
"""

from __future__ import annotations

import csv
import io
import copy
import json
import os
import tempfile
from typing import Any

import pyarrow.fs
import torch
import yaml
from ray import tune
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search import BasicVariantGenerator

from hrhf import config as config_lib
from hrhf.config import Config
from hrhf.distributed.devices import compute_device
from hrhf.metrics import summarize
from hrhf.models import save_checkpoint
from hrhf.pipeline import LocalTrainer, StepJob, evaluate_step, run, sources_of, step_datasets, task_of
from hrhf.plots import scored_rows, sweep_png
from hrhf.report import sweep_html, sweep_markdown
from hrhf.storage import pyarrow_filesystem, write_bytes_atomic

OBJECTIVE = "all"
EXPERIMENT = "sweep"  # Tune's experiment folder in the run directory: fixed, so a resubmitted sweep finds it
RESULT_FILE = "result.json"  # in a trial checkpoint: the last report of the finished step
MODEL_FILE = "step-1.pt"  # in a trial checkpoint: the trained model, an hrhf checkpoint
TRIAL_LOG_ENV = "HRHF_TRIAL_LOG"  # when set, each trial appends its id to this file when it starts training

# Sweepable settings: search-space key -> dotted config key.
SWEPT = {
    "w_kd_real": "method.w_kd_real",
    "w_fake": "method.w_fake",
    "w_ce_fake": "method.w_ce_fake",
    "fake_ratio": "method.fake_ratio",
    "scales": "inversion.scales",
}


def default_search_space() -> dict[str, Any]:
    """The distillation weights, the real:fake ratio and the SAA scale set."""
    return {
        "w_kd_real": tune.loguniform(1.0, 30.0),
        "w_fake": tune.loguniform(0.3, 3.0),
        "w_ce_fake": tune.uniform(0.0, 2.0),
        "fake_ratio": tune.choice([0.25, 0.5, 0.67]),
        "scales": tune.choice([[0.05, 0.1, 0.2, 0.4, 0.6], [0.1, 0.3, 0.5], [0.2, 0.4, 0.6], [0.05, 0.1, 0.2]]),
    }


def trial_config(base: dict[str, Any], params: dict[str, Any]) -> Config:
    """The run config of one trial: the base config with the sampled parameters applied."""
    overrides = [f"{SWEPT[k]}={json.dumps(v)}" for k, v in params.items() if k in SWEPT]
    return config_lib.apply_overrides(config_lib.from_dict(base), overrides)


def base_dict(cfg: Config, base_checkpoint: str) -> dict[str, Any]:
    """The config every trial starts from, as a dict, with the shared step-0 checkpoint."""
    data = config_lib.to_dict(cfg)
    data["train"]["init_checkpoint"] = base_checkpoint
    return data


def train_base(cfg: Config, run_dir: str, use_gpu: bool = False) -> None:
    """Step 0 of a sweep, in the Ray task that reserved its resources, on its GPU with ``use_gpu``."""
    cfg = copy.deepcopy(cfg)
    cfg.device = compute_device(use_gpu, "base")
    run(cfg, run_dir=run_dir, log=print, last_step=0)


def run_trial(params: dict[str, Any], base_config: dict[str, Any], threads: int = 1, use_gpu: bool = False) -> None:
    """Tune function trainable: step 1 of the protocol from the shared base model, reporting each epoch.

    With ``use_gpu`` the trial computes on the GPU it reserved (``gpus_per_trial``).

    A trial restored from its checkpoint has finished its step already: it reports the saved result again
    (a snapshot of the experiment taken before the trial ended may lack it) and trains nothing.
    """
    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as directory, open(os.path.join(directory, RESULT_FILE)) as f:
            tune.report(json.load(f))
        return
    log_path = os.environ.get(TRIAL_LOG_ENV)
    if log_path:
        with open(log_path, "a") as f:
            f.write(tune.get_context().get_trial_id() + "\n")
    cfg = trial_config(base_config, params)
    cfg.device = compute_device(use_gpu, "trial")
    torch.set_num_threads(threads)
    task = task_of(cfg)
    _, val = step_datasets(cfg, task, 1, sources_of(cfg))
    old, new = task.old_indices(1), task.new_indices(1)

    def report_epoch(job: StepJob, epoch: int, stats: dict[str, float]) -> None:
        metrics = summarize(evaluate_step(cfg, job.student, val, task.num_seen(1) + 1), old, new)
        job.student.train()
        result = {"epoch": epoch + 1, "loss": stats["loss"], **{k: metrics[k] for k in ("old", "new", "all", "background")}}
        if epoch + 1 < job.plan.epochs:
            tune.report(result)
            return
        with tempfile.TemporaryDirectory() as directory:
            with open(os.path.join(directory, RESULT_FILE), "w") as f:
                json.dump(result, f)
            save_checkpoint(os.path.join(directory, MODEL_FILE), job.student, model_name=cfg.model.name,
                            width=cfg.model.width, classes=[list(task.steps[s]) for s in range(2)], step=1,
                            config=config_lib.to_dict(cfg), extra={"result": result})
            tune.report(result, checkpoint=tune.Checkpoint.from_directory(directory))

    run(cfg, trainer=LocalTrainer(log=lambda _msg: None, after_epoch=report_epoch), log=lambda _msg: None, last_step=1)


def experiment_location(run_dir: str) -> tuple[str, pyarrow.fs.FileSystem | None]:
    """(path, pyarrow filesystem or None) of the sweep's Tune experiment folder in a run directory (path or URI)."""
    path, filesystem = pyarrow_filesystem(run_dir)
    return f"{path.rstrip('/')}/{EXPERIMENT}", filesystem


def run_config(run_dir: str) -> tune.RunConfig:
    """Tune's RunConfig for a sweep in ``run_dir``: on its storage (S3 endpoint included), one checkpoint per trial.

    ``num_to_keep=1`` also makes Tune save the experiment state right after each trial's checkpoint, so
    that an interrupted sweep knows about every checkpoint but the last moment's.
    """
    path, filesystem = pyarrow_filesystem(run_dir)
    return tune.RunConfig(name=EXPERIMENT, storage_path=path, storage_filesystem=filesystem, verbose=0,
                          checkpoint_config=tune.CheckpointConfig(num_to_keep=1))


def sweep_trainable(cfg: Config, base_checkpoint: str, cpus_per_trial: float = 1.0, gpus_per_trial: float = 0.0) -> Any:
    """The trial function with the base config bound and the trial's resources attached."""
    trainable = tune.with_parameters(run_trial, base_config=base_dict(cfg, base_checkpoint), threads=max(1, int(cpus_per_trial)),
                                     use_gpu=gpus_per_trial > 0)
    return tune.with_resources(trainable, {"CPU": cpus_per_trial, "GPU": gpus_per_trial})


def can_resume(run_dir: str) -> bool:
    """Whether ``run_dir`` holds a sweep that Tune can resume."""
    path, filesystem = experiment_location(run_dir)
    return tune.Tuner.can_restore(path, storage_filesystem=filesystem)


def resume_tuner(run_dir: str, trainable: Any) -> tune.Tuner:
    """The sweep of ``run_dir`` restored: finished trials are kept, unfinished and errored ones run on."""
    path, filesystem = experiment_location(run_dir)
    return tune.Tuner.restore(path, trainable, resume_unfinished=True, resume_errored=True, storage_filesystem=filesystem)


def finished_trials(tuner: tune.Tuner) -> int:
    """How many trials of a restored tuner had finished (0 when its experiment state cannot be read)."""
    try:
        return tuner.get_results().num_terminated
    except RuntimeError:
        return 0


def new_tuner(
    trainable: Any,
    run_dir: str,
    max_epochs: int,
    num_samples: int = 8,
    search_space: dict[str, Any] | None = None,
    seed: int = 0,
) -> tune.Tuner:
    """A new sweep in ``run_dir`` with ASHA early stopping on validation mIoU over all classes."""
    scheduler = ASHAScheduler(time_attr="training_iteration", max_t=max_epochs, grace_period=1, reduction_factor=2)
    return tune.Tuner(
        trainable,
        param_space=search_space or default_search_space(),
        tune_config=tune.TuneConfig(
            metric=OBJECTIVE,
            mode="max",
            scheduler=scheduler,
            num_samples=num_samples,
            search_alg=BasicVariantGenerator(random_state=seed),
        ),
        run_config=run_config(run_dir),
    )


def results_table(results: tune.ResultGrid) -> list[dict[str, Any]]:
    """One row per trial: the swept parameters, epochs run and the final metrics."""
    rows = []
    for result in results:
        if result.metrics is None:
            continue
        params = {k: result.config[k] for k in SWEPT if k in result.config}
        metrics = result.metrics
        rows.append(
            {
                "trial": result.path.rstrip("/").rsplit("/", 1)[-1],
                **params,
                "epochs": metrics.get("epoch"),
                **{k: metrics.get(k) for k in ("old", "new", "all")},
                "error": str(result.error) if result.error else "",
            }
        )
    rows.sort(key=lambda r: -(r["all"] if r["all"] is not None else -1.0))
    return rows


def write_results(rows: list[dict[str, Any]], best: Config, out_uri: str) -> None:
    """Write results.csv, results.md, sweep.png, results.html and best_config.yaml into ``out_uri`` (path or URI).

    sweep.png scatters the objective against each swept parameter; results.html holds the table and the
    scatter (when some trial reported the objective).
    """
    if not rows:
        raise RuntimeError("the sweep produced no results")
    columns = list(rows[0])
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)
    write_bytes_atomic(f"{out_uri}/results.csv", buffer.getvalue().encode())
    write_bytes_atomic(f"{out_uri}/results.md", sweep_markdown(rows, OBJECTIVE).encode())
    params = [k for k in SWEPT if k in columns]
    scatter = sweep_png(rows, params, OBJECTIVE) if params and scored_rows(rows, OBJECTIVE) else None
    if scatter is not None:
        write_bytes_atomic(f"{out_uri}/sweep.png", scatter)
    write_bytes_atomic(f"{out_uri}/results.html", sweep_html(rows, OBJECTIVE, scatter).encode())
    write_bytes_atomic(f"{out_uri}/best_config.yaml", yaml.safe_dump(config_lib.to_dict(best), sort_keys=False).encode())
