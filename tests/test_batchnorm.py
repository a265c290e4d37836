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
