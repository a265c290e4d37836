import copy
import os
import re
import sys
import time

import pytest
import ray
import ray.cloudpickle
import ray.train
import torch
from ray.train import Result

from hrhf.config import load_config
from hrhf.data import make_source
from hrhf.data.incremental import StepDataset
from hrhf.distributed.training import RayTrainer, load_train_state, train_loop_per_worker
from hrhf.inversion import SyntheticSet
from hrhf.models import build_model, widen_classifier
from hrhf.pipeline import StepJob, evaluate_step
from hrhf.train import plan_step
from hrhf.tasks import label_lut, make_task_from_steps

# Train workers cannot import this test module; the crashing loop below travels by value.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


@pytest.fixture(scope="module", autouse=True)
def ray_cluster():
    ray.init(num_cpus=2, include_dashboard=False)
    yield
    ray.shutdown()


def make_job(method: str, epochs: int = 2, fake_images: int = 0) -> StepJob:
    """Step 1 of a 3+2 shapes protocol: 64 images of 32 px, a width-4 network widened MiB-style."""
    task = make_task_from_steps("shapes", [[1, 2, 3], [4, 5]], overlap=True)
    source = make_source("shapes", "train", image_size=32, size=64, seed=0)
    real = StepDataset(source, range(len(source)), label_lut(task, 1, "train"), transform=None)
    torch.manual_seed(0)
    teacher = build_model("small", 4, width=4)
    student = widen_classifier(copy.deepcopy(teacher), 2)
    fake = None
    if fake_images:
        images = torch.randint(0, 256, (fake_images, 3, 32, 32), dtype=torch.uint8)
        fake = SyntheticSet(images, torch.zeros(fake_images, 32, 32, dtype=torch.uint8), [{}] * fake_images)
    cfg = load_config("smoke", method=method, overrides=["model.width=4", f"train.epochs_step={epochs}",
                                                         "train.lr_step=0.01"])
    return StepJob(step=1, student=student, teacher=teacher, real=real, fake=fake,
                   plan=plan_step(cfg, 1, n_old=3, incremental=True), cfg=cfg)


def changed(before: dict, model: torch.nn.Module) -> bool:
    return any(not torch.equal(before[k], v) for k, v in model.state_dict().items() if v.is_floating_point())


def validation_set(size: int = 21) -> StepDataset:
    """A validation set of the step's classes (odd-sized: the two workers' shares differ by one image)."""
    task = make_task_from_steps("shapes", [[1, 2, 3], [4, 5]], overlap=True)
    source = make_source("shapes", "val", image_size=32, size=size, seed=0)
    return StepDataset(source, range(len(source)), label_lut(task, 1, "eval"), transform=None)


def test_mib_step_trains_with_ddp_and_keeps_the_last_checkpoint(tmp_path):
    job = make_job("mib")
    job.val = validation_set()
    before = copy.deepcopy(job.student.state_dict())
    messages = []
    trainer = RayTrainer(num_workers=2, cpus_per_worker=0.5, storage_path=str(tmp_path), log=messages.append)
    trained = trainer.train(job)
    model = trained.model
    assert model is job.student and changed(before, model)
    # the two workers' summed scores are the in-process evaluation of the returned weights
    assert torch.equal(trained.confusion, evaluate_step(job.cfg, model, job.val, 6))
    assert [re.match(r"\[step 1\] training epoch (\d/\d) .*\bloss=", m).group(1) for m in messages] == ["1/2", "2/2"]
    run = tmp_path / "step-1"
    assert run.is_dir() and len([p for p in run.glob("checkpoint_*") if p.is_dir()]) == 2
    state = load_train_state(Result.from_path(str(run)).checkpoint)
    assert state["epoch"] == 1 and state["num_outputs"] == 6
    assert state["iteration"] == 2 * 4  # 32 images per worker in batches of 16 // 2
    for name, value in model.state_dict().items():
        assert torch.equal(value, state["model"][name]), name


def test_hrhf_step_mixes_in_the_fake_half(tmp_path):
    job = make_job("hrhf", epochs=1, fake_images=8)
    before = copy.deepcopy(job.student.state_dict())
    trained = RayTrainer(num_workers=2, cpus_per_worker=0.5, storage_path=str(tmp_path), log=lambda _: None).train(job)
    assert changed(before, trained.model) and trained.confusion is None  # no validation set, no score
    history = load_train_state(Result.from_path(str(tmp_path / "step-1")).checkpoint)["history"]
    assert len(history) == 1 and history[0]["kd_fake"] > 0 and history[0]["ce_fake"] > 0


class LostProgressTrainer(RayTrainer):
    """A RayTrainer whose progress queue is gone before the fit starts, as when its node is lost."""

    def progress_queue(self):
        """A queue whose actor has been killed."""
        progress = super().progress_queue()
        ray.kill(progress.actor)
        return progress


def test_training_goes_on_without_its_progress_queue(tmp_path):
    job = make_job("mib", epochs=2)
    before = copy.deepcopy(job.student.state_dict())
    trainer = LostProgressTrainer(num_workers=1, cpus_per_worker=0.5, storage_path=str(tmp_path), max_failures=0,
                                  log=lambda _: None)
    assert changed(before, trainer.train(job).model)
    assert [h["epoch"] for h in trainer.history] == [0, 1]


def crash_once(flag, restored):
    """The real loop; rank 1 dies once, a few seconds after the epoch-0 report, i.e. during epoch 1."""

    def loop(config):
        rank = ray.train.get_context().get_world_rank()
        checkpoint = ray.train.get_checkpoint()
        if rank == 0:
            epoch = -1 if checkpoint is None else load_train_state(checkpoint)["epoch"]
            with open(restored, "a") as f:
                f.write(f"{epoch}\n")
        report = ray.train.report

        def report_then_crash(metrics, checkpoint=None):
            report(metrics, checkpoint=checkpoint)
            if rank == 1 and metrics["epoch"] == 0 and not os.path.exists(flag):
                open(flag, "w").close()
                time.sleep(3)  # lets the controller register the checkpoint first (it polls every 2 s)
                os._exit(1)

        ray.train.report = report_then_crash
        train_loop_per_worker(config)

    return loop


def test_killed_worker_resumes_from_the_last_checkpoint(tmp_path):
    job = make_job("mib", epochs=2)
    flag, restored = tmp_path / "crashed", tmp_path / "restored.txt"
    trainer = RayTrainer(num_workers=2, cpus_per_worker=0.5, storage_path=str(tmp_path / "runs"),
                         log=lambda _: None, train_loop=crash_once(str(flag), str(restored)))
    model = trainer.train(job).model
    assert flag.exists()
    assert restored.read_text().split() == ["-1", "0"]  # first attempt from scratch, then from epoch 0
    state = load_train_state(Result.from_path(str(tmp_path / "runs" / "step-1")).checkpoint)
    assert [h["epoch"] for h in state["history"]] == [0, 1] and state["iteration"] == 2 * 4
    for name, value in model.state_dict().items():
        assert torch.equal(value, state["model"][name]), name


def broken_loop(config):
    raise ValueError("no data today")


def exploding_loop(config):
    from hrhf.inversion import NonFiniteError

    raise NonFiniteError("step 1, epoch 1/1, rank 0, iteration 3: non-finite loss (loss=nan)")


def train_with_loop(tmp_path, loop) -> None:
    """One step through RayTrainer with a replaced worker loop and no restarts."""
    trainer = RayTrainer(num_workers=1, cpus_per_worker=0.5, storage_path=str(tmp_path), max_failures=0,
                         log=lambda _: None, train_loop=loop)
    trainer.train(make_job("ft", epochs=1))


def test_failed_training_raises_a_clear_error(tmp_path):
    with pytest.raises(RuntimeError, match=r"(?s)\[step 1\] Ray training failed.*no data today"):
        train_with_loop(tmp_path, broken_loop)


def test_non_finite_loss_in_a_worker_reaches_the_driver_as_such(tmp_path):
    from hrhf.inversion import NonFiniteError

    with pytest.raises(NonFiniteError, match=r"step 1, epoch 1/1, rank 0, iteration 3: non-finite loss"):
        train_with_loop(tmp_path, exploding_loop)
