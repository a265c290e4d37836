"""GlobalBatchNorm2d over two gloo processes equals BatchNorm2d over their concatenated batch."""

import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from conftest import free_port as _free_port
from hrhf.batchnorm import GlobalBatchNorm2d, synchronise_batchnorm


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 2, 1))


def _batch() -> torch.Tensor:
    return torch.randn(8, 3, 10, 10, generator=torch.Generator().manual_seed(1)) * 2 + 1


def _worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        net = synchronise_batchnorm(_net(), torch.device("cpu"))
        x = _batch()[rank * 4 : (rank + 1) * 4]
        out = net(x)
        out.pow(2).mean().backward()  # the mean over this half: the two halves average to the global mean
        grads = {name: p.grad for name, p in net.named_parameters()}
        torch.save({"out": out.detach(), "grads": grads, "state": net.state_dict()}, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_global_batchnorm_matches_one_process_on_the_whole_batch(tmp_path):
    mp.start_processes(_worker, args=(_free_port(), str(tmp_path)), nprocs=2, start_method="spawn")
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    reference = _net()
    out = reference(_batch())
    out.pow(2).mean().backward()
    torch.testing.assert_close(torch.cat([r["out"] for r in ranks]), out.detach(), rtol=1e-5, atol=1e-5)
    for name, p in reference.named_parameters():  # DDP would average the two workers' gradients
        torch.testing.assert_close((ranks[0]["grads"][name] + ranks[1]["grads"][name]) / 2, p.grad, rtol=1e-4, atol=1e-6)
    for key in ("1.running_mean", "1.running_var", "1.num_batches_tracked"):
        torch.testing.assert_close(ranks[0]["state"][key], reference.state_dict()[key], rtol=1e-5, atol=1e-6)


def test_conversion_keeps_weights_and_only_touches_batchnorm():
    net = _net()
    net[1].running_mean.fill_(0.5)
    converted = synchronise_batchnorm(_net_with(net), torch.device("cpu"))
    assert type(converted[1]) is GlobalBatchNorm2d and type(converted[0]) is nn.Conv2d
    assert torch.equal(converted[1].running_mean, torch.full((4,), 0.5))
    converted.eval()
    x = _batch()
    torch.testing.assert_close(converted(x), net.eval()(x))  # no process group: plain BatchNorm


def _net_with(net: nn.Module) -> nn.Module:
    copy = _net()
    copy.load_state_dict(net.state_dict())
    return copy


def test_split_batch_statistics_keep_the_two_parts_apart():
    import copy

    from hrhf.batchnorm import SplitBatchStatistics

    net = _net()
    first_only, rest_only, whole = copy.deepcopy(net), copy.deepcopy(net), copy.deepcopy(net)
    x = _batch()
    x[5:] = x[5:] * 3 + 2  # the second part's statistics differ from the first's
    split = SplitBatchStatistics(net)
    split.rows = 5
    out = net(x)
    out.sum().backward()
    torch.testing.assert_close(out[:5], first_only(x[:5]))  # each part normalised with its own statistics
    torch.testing.assert_close(out[5:], rest_only(x[5:]))
    torch.testing.assert_close(net[1].running_mean, first_only[1].running_mean)  # only the first part moves them
    torch.testing.assert_close(net[1].running_var, first_only[1].running_var)
    assert net[1].momentum == first_only[1].momentum
    split.rows = None  # off: the usual layer over the whole batch
    whole[1].load_state_dict(net[1].state_dict())
    torch.testing.assert_close(net(x), whole(x))
    split.remove()
    assert "forward" not in vars(net[1])


def test_train_steps_with_split_bn_train_and_leave_the_model_as_it_was_built():
    import copy

    from hrhf.config import load_config
    from hrhf.models import build_model, widen_classifier
    from hrhf.schedule import warmup_cosine
    from hrhf.train import make_optimizer, plan_step, train_steps

    torch.manual_seed(0)
    teacher = build_model("small", 3, width=4).eval()
    real, fake = torch.randn(4, 3, 16, 16), torch.randn(4, 3, 16, 16) * 3 + 2
    labels = torch.randint(0, 4, (4, 16, 16))
    running = {}
    for split_bn in (True, False):
        cfg = load_config("smoke", method="hrhf", overrides=[f"train.split_bn={split_bn}"])
        plan = plan_step(cfg, 1, n_old=2, incremental=True)
        assert plan.split_bn is split_bn and not plan_step(cfg, 0, n_old=0, incremental=False).split_bn
        student = widen_classifier(copy.deepcopy(teacher), 1).train().requires_grad_(True)
        optimizer = make_optimizer(student, 0.0, 0.0)  # no weight moves: only the statistics differ
        train_steps(student, teacher, [(real, labels, fake)], optimizer, warmup_cosine(0.0, 1, 30), 0, plan)
        running[split_bn] = next(m for m in student.modules() if isinstance(m, nn.BatchNorm2d)).running_mean.clone()
        assert not any("forward" in vars(m) for m in student.modules())
    reference = copy.deepcopy(teacher).train()
    reference(real)  # a training forward of the real half alone
    torch.testing.assert_close(running[True], next(m for m in reference.modules()
                                                   if isinstance(m, nn.BatchNorm2d)).running_mean)
    assert not torch.allclose(running[True], running[False])
