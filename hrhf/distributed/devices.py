"""The device a Ray actor, task or trial computes on: the GPU Ray assigned to it, or the CPU.

Each process that does the work resolves its own device from the resources Ray gave it; the driver
only orchestrates and never calls this, so it needs no CUDA.
"""

from __future__ import annotations

import json
import os

import ray

# When set, names a file that receives one JSON line per call (role, device, pid, node id, GPU ids), and
# every caller computes on the CPU: placement tests on machines without CUDA, with fake GPU resources.
DEVICE_LOG_ENV = "HRHF_DEVICE_LOG"


def compute_device(use_gpu: bool, role: str) -> str:
    """The device to compute on: "cuda" when ``use_gpu`` (RuntimeError if Ray assigned no GPU), else "cpu"."""
    log_path = os.environ.get(DEVICE_LOG_ENV)
    if not use_gpu and not log_path:
        return "cpu"
    gpu_ids = [str(gpu_id) for gpu_id in ray.get_gpu_ids()]
    if use_gpu and not gpu_ids:
        raise RuntimeError(
            f"{role} was asked to compute on a GPU, but Ray assigned this process none: "
            "it must run in a Ray actor, task or trial that reserves a GPU (num_gpus=1)"
        )
    device = "cuda" if use_gpu else "cpu"
    if log_path:
        record = {"role": role, "device": device, "pid": os.getpid(),
                  "node_id": ray.get_runtime_context().get_node_id(), "gpu_ids": gpu_ids}
        with open(log_path, "a") as f:
            f.write(json.dumps(record) + "\n")  # one short write: lines from concurrent processes stay whole
        return "cpu"  # the reserved GPU may be a fake resource: the work itself runs on the CPU
    return device
