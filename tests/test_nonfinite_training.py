"""Training stops at the first non-finite loss or gradient, naming where, before any checkpoint is written."""

import importlib.util

import pytest
import torch

from conftest import ROOT
from hrhf.config import load_config
from hrhf.inversion import NonFiniteError
from hrhf.pipeline import run
from hrhf.schedule import warmup_cosine
from hrhf.train import make_optimizer, plan_step, train_steps


def test_exploding_step_zero_names_step_epoch_and_iteration(tmp_path):
    cfg = load_config("smoke", overrides=["train.lr_base=1e30"])
    with pytest.raises(NonFiniteError, match=r"step 0, epoch 1/1, iteration \d+: non-finite"):
        run(cfg, run_dir=str(tmp_path), log=lambda *_: None)
    assert not list(tmp_path.glob("step-*.pt"))


def test_non_finite_gradient_stops_before_the_weights_change():
    from hrhf.models import build_model

    cfg = load_config("smoke")
    model = build_model("small", 3, width=4)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    images = torch.randn(4, 3, 16, 16)
    labels = torch.zeros(4, 16, 16, dtype=torch.long)
    # A hook that poisons one gradient: the loss stays finite, the gradient does not.
    first = next(model.parameters())
    first.register_hook(lambda grad: grad * float("nan"))
    optimizer = make_optimizer(model, 0.1, 0.0)
    with pytest.raises(NonFiniteError, match="iteration 5: non-finite gradient"):
        train_steps(model, None, [(images, labels, None, None)], optimizer, warmup_cosine(0.1, 10, 30), 5,
                    plan_step(cfg, 0, n_old=0, incremental=False))
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before if "running" not in k and "num_batches" not in k)


def test_job_reports_it_without_a_traceback(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("incremental_job", ROOT / "jobs" / "incremental.py")
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    code = job.main(["--preset", "smoke", "--in-process", "--quiet", "--run-dir", str(tmp_path / "run"),
                     "--set", "train.lr_base=1e30"])
    err = capsys.readouterr().err
    assert code == 1 and err.startswith("error: step 0, epoch 1/1, iteration") and "Traceback" not in err
    assert not list((tmp_path / "run").glob("step-*.pt")) and not (tmp_path / "run" / "_lease.json").exists()
