"""Ray Tune sweeps over the distillation weights, the real:fake ratio and the SAA scale set.

Each trial runs one full incremental step (synthesis + distillation + evaluation) of the configured
protocol from a shared step-0 checkpoint, reporting validation mIoU after every epoch so that ASHA can
stop weak trials early.
"""

from __future__ import annotations

import csv
import io
import json
from typing import Any

import torch
import yaml
from ray import tune
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search import BasicVariantGenerator

from hrhf import config as config_lib
from hrhf.config import Config
from hrhf.metrics import summarize
from hrhf.storage import write_bytes_atomic
from hrhf.pipeline import LocalTrainer, StepJob, run, sources_of, step_datasets, task_of
from hrhf.plots import scored_rows, sweep_png
from hrhf.report import sweep_html, sweep_markdown
from hrhf.train import evaluate

OBJECTIVE = "all"

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


def run_trial(params: dict[str, Any], base_config: dict[str, Any], threads: int = 1) -> None:
    """Tune function trainable: step 1 of the protocol from the shared base model, reporting each epoch."""
    cfg = trial_config(base_config, params)
    torch.set_num_threads(threads)
    task = task_of(cfg)
    _, val = step_datasets(cfg, task, 1, sources_of(cfg))
    old, new = task.old_indices(1), task.new_indices(1)

    def report_epoch(job: StepJob, epoch: int, stats: dict[str, float]) -> None:
        metrics = summarize(evaluate(job.student, val, task.num_seen(1) + 1, cfg.train.batch_size), old, new)
        job.student.train()
        tune.report({"epoch": epoch + 1, "loss": stats["loss"], **{k: metrics[k] for k in ("old", "new", "all", "background")}})

    run(cfg, trainer=LocalTrainer(log=lambda _msg: None, after_epoch=report_epoch), log=lambda _msg: None, last_step=1)


def sweep(
    cfg: Config,
    base_checkpoint: str,
    storage_path: str,
    num_samples: int = 8,
    cpus_per_trial: float = 1.0,
    gpus_per_trial: float = 0.0,
    search_space: dict[str, Any] | None = None,
    seed: int = 0,
    name: str = "sweep",
) -> tune.ResultGrid:
    """Run the sweep with ASHA early stopping on validation mIoU over all classes."""
    base = base_dict(cfg, base_checkpoint)
    trainable = tune.with_resources(
        tune.with_parameters(run_trial, base_config=base, threads=max(1, int(cpus_per_trial))),
        {"CPU": cpus_per_trial, "GPU": gpus_per_trial},
    )
    scheduler = ASHAScheduler(time_attr="training_iteration", max_t=cfg.train.epochs_step, grace_period=1, reduction_factor=2)
    tuner = tune.Tuner(
        trainable,
        param_space=search_space or default_search_space(),
        tune_config=tune.TuneConfig(
            metric=OBJECTIVE,
            mode="max",
            scheduler=scheduler,
            num_samples=num_samples,
            search_alg=BasicVariantGenerator(random_state=seed),
        ),
        run_config=tune.RunConfig(name=name, storage_path=storage_path, verbose=0),
    )
    return tuner.fit()


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
