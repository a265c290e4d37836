"""The run directory's write probe, run where the work runs: on a node that a synthesis actor or a
train worker with the same resources would be placed on.

The driver's own check (``ShardStore.check_access``) proves only the head's credentials. GPU worker
nodes may hold other credentials (another instance profile, missing environment variables), and a
failure there would otherwise surface only when the first actor writes its first shard, after step 0
has trained. Asking for a GPU on a cluster whose head has none also makes the autoscaler start a GPU
node, so the check covers the node type the work will really run on.
"""

from __future__ import annotations

import ray
from ray.exceptions import GetTimeoutError

from hrhf.shards import ShardStore


@ray.remote(max_retries=0)
def _probe(uri: str, storage_options: dict | None) -> tuple[str, str | None]:
    """This node's IP and, when the directory cannot be written from here, what went wrong."""
    node_ip = ray.util.get_node_ip_address()
    try:
        ShardStore(uri, storage_options).check_access()
    except Exception as err:  # an unknown protocol or a missing s3fs fails here as surely as a denied PUT
        return node_ip, f"{type(err).__name__}: {err}"
    return node_ip, None


def check_storage_where_work_runs(
    uri: str,
    num_cpus: float = 1.0,
    num_gpus: float = 0,
    storage_options: dict | None = None,
    timeout_s: float | None = None,
) -> str:
    """Write-probe ``uri`` from a Ray task asking for ``num_cpus`` / ``num_gpus``; return the node's IP.

    Raises OSError naming the URI and the node when the probe fails there, and TimeoutError (an
    OSError too) when no node with those resources took the task within ``timeout_s`` seconds.
    """
    ref = _probe.options(num_cpus=num_cpus, num_gpus=num_gpus).remote(uri, storage_options)
    try:
        node_ip, error = ray.get(ref, timeout=timeout_s)
    except GetTimeoutError:
        ray.cancel(ref, force=True)
        raise TimeoutError(
            f"no node with {num_cpus} CPU and {num_gpus} GPU ran the write probe of {uri} "
            f"within {timeout_s} s"
        ) from None
    if error is not None:
        raise OSError(f"{uri} is not writable from node {node_ip}, where the work runs ({error})")
    return node_ip
