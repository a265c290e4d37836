"""The epoch driver gives the same batches and the same weights on one process and on two (gloo, DDP)."""

import dataclasses
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import Dataset

from conftest import free_port as _free_port
from hrhf.batchnorm import synchronise_batchnorm
from hrhf.config import load_config
from hrhf.data import make_source
from hrhf.data.incremental import StepDataset
from hrhf.inversion import SyntheticSet
from hrhf.models import build_model, widen_classifier
from hrhf.pixels import normalize
from hrhf.tasks import IGNORE_INDEX, label_lut, make_task_from_steps
from hrhf.train import (
    InMemoryFake,
    OldModelLogits,
    SeededItems,
    collate_items,
    epoch_batches,
    fake_share,
    forward,
    iters_per_epoch,
    make_optimizer,
    mixed_batches,
    plan_step,
    run_epochs,
    share,
)


class _IgnoredBands(Dataset):
    """Each item's mask with a band of ignored rows whose height depends on the item, as VOC's object borders
    leave the workers' shares of a batch with different numbers of labelled pixels."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, item: int) -> tuple[torch.Tensor, torch.Tensor]:
        image, mask = self.dataset[item]
        mask = mask.clone()
        mask[: (item * 7) % 29] = IGNORE_INDEX
        return image, mask


def _setup(ignored_bands: bool = False):
    """Step 1 of a 3+2 protocol on 40 shapes images with augmentation, a widened width-4 student, 10 fake images."""
    task = make_task_from_steps("shapes", [[1, 2, 3], [4, 5]], overlap=True)
    source = make_source("shapes", "train", image_size=32, size=40, seed=0)
    real = StepDataset(source, range(len(source)), label_lut(task, 1, "train"), None)
    if ignored_bands:
        real = _IgnoredBands(real)
    torch.manual_seed(0)
    teacher = build_model("small", 4, width=4)
    student = widen_classifier(build_model("small", 4, width=4), 2)
    images = torch.randint(0, 256, (10, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(3))
    fake = SyntheticSet(images, torch.zeros(10, 32, 32, dtype=torch.uint8), [{}] * 10)
    cfg = load_config("smoke", method="hrhf", overrides=["train.batch_size=8", "train.epochs_step=2"])
    plan = plan_step(cfg, 1, n_old=3, incremental=True)
    return real, fake, teacher, student, plan


def _train(
    rank: int, world: int, ignored_bands: bool = False, cached_logits: bool = False, bf16: bool = False
) -> torch.nn.Module:
    real, fake, teacher, student, plan = _setup(ignored_bands)
    plan = dataclasses.replace(plan, bf16=bf16)
    teacher.eval().requires_grad_(False)
    source = InMemoryFake(fake.images)
    old_logits = OldModelLogits(teacher, len(fake), bf16=bf16) if cached_logits else None
    iters = iters_per_epoch(len(real), plan.batch_size)
    items = SeededItems(real, plan.seed)
    net = synchronise_batchnorm(student, torch.device("cpu")) if world > 1 else student
    model = DistributedDataParallel(net) if world > 1 else net
    optimizer = make_optimizer(net, plan.lr, plan.weight_decay, plan.head_lr_mult)

    def batches_of_epoch(epoch):
        real_batches = (collate_items([items[(epoch, i)] for i in batch[share(len(batch), rank, world)]])
                        for batch in epoch_batches(len(real), plan.batch_size, plan.seed, epoch))
        return mixed_batches(real_batches, source, plan, epoch, iters, rank, world, old_logits)

    run_epochs(model, teacher, plan, batches_of_epoch, iters, optimizer)
    return net


def _worker(rank: int, port: int, out_dir: str, ignored_bands: bool) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        net = _train(rank, 2, ignored_bands)
        torch.save(net.state_dict(), f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_shares_of_a_global_batch_do_not_depend_on_the_worker_count():
    real, fake, teacher, _, plan = _setup()
    teacher.eval().requires_grad_(False)
    for epoch in range(2):
        batches = epoch_batches(len(real), plan.batch_size, plan.seed, epoch)
        assert len(batches) == iters_per_epoch(len(real), plan.batch_size) == 5
        for batch in batches:
            assert sum((batch[share(len(batch), r, 2)] for r in range(2)), []) == batch
        items = SeededItems(real, plan.seed)
        first, again = items[(epoch, batches[0][0])], items[(epoch, batches[0][0])]
        assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    assert epoch_batches(len(real), plan.batch_size, plan.seed, 0) != epoch_batches(len(real), plan.batch_size, plan.seed, 1)
    source = InMemoryFake(fake.images)
    for old_logits in (None, OldModelLogits(teacher, len(fake))):
        whole, whole_logits = fake_share(source, plan, 7, 0, 1, old_logits)
        halves = [fake_share(source, plan, 7, r, 2, old_logits) for r in range(2)]
        assert torch.equal(torch.cat([images for images, _ in halves]), whole)
        assert len(whole) == plan.fake_per_batch
        if old_logits is None:
            assert whole_logits is None and all(logits is None for _, logits in halves)
        else:
            assert torch.equal(torch.cat([logits for _, logits in halves]), whole_logits)


@pytest.mark.parametrize("bf16", [False, True], ids=["float32", "bfloat16 autocast"])
def test_cached_logits_are_the_old_models_on_each_synthetic_image_as_flipped(bf16):
    _, fake, teacher, _, plan = _setup()
    teacher.eval().requires_grad_(False)
    source, old_logits = InMemoryFake(fake.images), OldModelLogits(teacher, len(fake), bf16=bf16)
    passes = []
    hook = teacher.register_forward_hook(lambda _, inputs, __: passes.append(len(inputs[0])))
    flipped_somewhere = False
    try:
        for global_batch in range(6):
            images, logits = fake_share(source, plan, global_batch, 0, 1, old_logits)
            first = global_batch * plan.fake_per_batch
            flipped_somewhere |= not torch.equal(images, normalize(source.take(range(first, first + len(images)))))
            seen = len(passes)
            with torch.no_grad():
                torch.testing.assert_close(logits, forward(teacher, images, bf16), rtol=0, atol=1e-5)
            del passes[seen:]  # the reference pass above is not the keeper's
    finally:
        hook.remove()
    visited = min(len(fake), 6 * plan.fake_per_batch)
    assert sum(passes) == 2 * visited  # each row once as it is and once flipped, however often it is visited
    assert 6 * plan.fake_per_batch > len(fake)  # rows were visited again
    assert logits.dtype == torch.float32 and flipped_somewhere


def test_old_model_logits_over_budget_leave_the_old_models_pass_to_every_batch():
    _, fake, teacher, _, plan = _setup()
    teacher.eval().requires_grad_(False)
    source = InMemoryFake(fake.images)
    row_bytes = 2 * 4 * 32 * 32 * 4  # two orientations of (n_old + 1) x H x W float32
    within = OldModelLogits(teacher, len(fake), budget=len(fake) * row_bytes)
    over = OldModelLogits(teacher, len(fake), budget=len(fake) * row_bytes - 1)
    assert fake_share(source, plan, 0, 0, 1, within)[1] is not None
    assert fake_share(source, plan, 0, 0, 1, over)[1] is None and over.logits is None
    assert fake_share(source, plan, 1, 0, 1, over)[1] is None


def test_cached_old_model_logits_train_the_weights_of_live_ones():
    torch.set_num_threads(1)
    live, cached = _train(0, 1).state_dict(), _train(0, 1, cached_logits=True).state_dict()
    for name, value in live.items():
        assert torch.allclose(cached[name].float(), value.float(), atol=1e-5), name


def test_bf16_training_runs_the_network_in_bfloat16_and_follows_float32():
    torch.set_num_threads(1)
    initial = _setup()[3].state_dict()
    float32 = _train(0, 1, cached_logits=True).state_dict()
    conv_outputs = []
    hook = torch.nn.modules.module.register_module_forward_hook(
        lambda module, _, out: conv_outputs.append(out.dtype) if isinstance(module, torch.nn.Conv2d) else None)
    try:
        bfloat16 = _train(0, 1, cached_logits=True, bf16=True).state_dict()
    finally:
        hook.remove()
    assert conv_outputs and set(conv_outputs) == {torch.bfloat16}
    moved = sum((float32[k] - initial[k]).float().norm() ** 2 for k in initial if initial[k].is_floating_point())
    apart = sum((bfloat16[k] - float32[k]).float().norm() ** 2 for k in initial if initial[k].is_floating_point())
    assert all(bfloat16[k].dtype == float32[k].dtype for k in float32)  # the weights stay float32
    assert 0 < apart < 1e-3 * moved  # rounding, not a different training (2e-6 measured)


@pytest.mark.parametrize("ignored_bands", [False, True], ids=["every pixel labelled", "ignored pixels differ per worker"])
def test_two_ddp_workers_reach_the_weights_of_one_process(tmp_path, ignored_bands):
    torch.set_num_threads(1)
    single = _train(0, 1, ignored_bands).state_dict()
    mp.start_processes(_worker, args=(_free_port(), str(tmp_path), ignored_bands), nprocs=2, start_method="spawn")
    for rank in range(2):
        state = torch.load(tmp_path / f"rank{rank}.pt")
        for name, value in single.items():
            if value.is_floating_point():
                torch.testing.assert_close(state[name], value, rtol=1e-3, atol=1e-4, msg=name)
