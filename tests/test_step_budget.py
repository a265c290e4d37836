"""An incremental step with few images gets enough epochs to make train.min_iters_step optimiser updates."""

import pytest

from hrhf.config import load_config
from hrhf.train import iters_per_epoch, plan_step, step_epochs


def test_a_large_step_keeps_its_epochs():
    # 2000 images in batches of 32: 62 updates an epoch, 1240 in 20 epochs, past the budget
    assert step_epochs(20, 400, 2000, 32) == 20


@pytest.mark.parametrize("num_items", [181, 219, 315, 33, 5])
def test_a_small_step_gets_the_fewest_epochs_that_reach_the_budget(num_items):
    epochs = step_epochs(20, 400, num_items, 32)
    iters = iters_per_epoch(num_items, 32)
    assert epochs * iters >= 400
    assert (epochs - 1) * iters < 400


def test_a_zero_budget_changes_nothing():
    assert step_epochs(20, 0, 5, 32) == 20


def test_plan_step_applies_the_budget_to_incremental_steps_only():
    cfg = load_config(overrides=["train.epochs_step=20", "train.epochs_base=24", "train.min_iters_step=400",
                                 "train.batch_size=32"])
    assert plan_step(cfg, 1, n_old=5, incremental=True, num_real=181).epochs == 80  # 5 updates an epoch
    assert plan_step(cfg, 1, n_old=5, incremental=True, num_real=2000).epochs == 20
    assert plan_step(cfg, 1, n_old=5, incremental=True).epochs == 20  # step size unknown: the configured epochs
    assert plan_step(cfg, 0, n_old=0, incremental=False, num_real=181).epochs == 24


def test_a_negative_budget_is_rejected():
    with pytest.raises(ValueError, match="train.min_iters_step must be a finite value >= 0"):
        load_config(overrides=["train.min_iters_step=-1"])


def test_incremental_epochs_counts_the_images_of_the_step():
    from hrhf.pipeline import incremental_epochs, sources_of, step_datasets, task_of

    cfg = load_config("smoke", overrides=["train.min_iters_step=60", "data.protocol=6-2-2", "train.batch_size=8"])
    real, _ = step_datasets(cfg, task_of(cfg), 1, sources_of(cfg))
    iters = iters_per_epoch(len(real), cfg.train.batch_size)
    assert 1 < iters < 60  # a step of a few batches: the budget, not train.epochs_step, sets its epochs
    assert incremental_epochs(cfg, 1) == -(-60 // iters)
