"""The Ray layer: synthesis actors, Ray Train distillation and Tune sweeps over the pure hrhf modules."""

import resource


def peak_rss_mb() -> float:
    """Peak resident memory of this process in MiB (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
