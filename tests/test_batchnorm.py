"""GlobalBatchNorm2d over two gloo processes equals BatchNorm2d over their concatenated batch."""

import os

import pytest
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


def _worker(rank: int, port: int, out_dir: str, bf16: bool = False) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        net = synchronise_batchnorm(_net(), torch.device("cpu"))
        x = _batch()[rank * 4 : (rank + 1) * 4]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = net(x).float()
        out.pow(2).mean().backward()  # the mean over this half: the two halves average to the global mean
        grads = {name: p.grad for name, p in net.named_parameters()}
        torch.save({"out": out.detach(), "grads": grads, "state": net.state_dict()}, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("bf16", [False, True], ids=["float32", "bfloat16 autocast"])
def test_global_batchnorm_matches_one_process_on_the_whole_batch(tmp_path, bf16):
    mp.start_processes(_worker, args=(_free_port(), str(tmp_path), bf16), nprocs=2, start_method="spawn")
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    reference = _net()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        out = reference(_batch()).float()
    out.pow(2).mean().backward()
    # Under autocast both sides round the convolutions to bfloat16; the statistics are float32 on both.
    tol = {"rtol": 2e-2, "atol": 2e-2} if bf16 else {"rtol": 1e-5, "atol": 1e-5}
    torch.testing.assert_close(torch.cat([r["out"] for r in ranks]), out.detach(), **tol)
    for name, p in reference.named_parameters():  # DDP would average the two workers' gradients
        grad_tol = tol if bf16 else {"rtol": 1e-4, "atol": 1e-6}
        torch.testing.assert_close((ranks[0]["grads"][name] + ranks[1]["grads"][name]) / 2, p.grad, **grad_tol)
    for key in ("1.running_mean", "1.running_var", "1.num_batches_tracked"):
        stat_tol = {"rtol": 1e-3, "atol": 1e-4} if bf16 else {"rtol": 1e-5, "atol": 1e-6}
        assert ranks[0]["state"][key].dtype == reference.state_dict()[key].dtype
        torch.testing.assert_close(ranks[0]["state"][key], reference.state_dict()[key], **stat_tol)


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
