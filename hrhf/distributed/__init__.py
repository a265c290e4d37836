"""The Ray layer: synthesis actors, Ray Train distillation and Tune sweeps over the pure hrhf modules."""

import logging
import resource


def peak_rss_mb() -> float:
    """Peak resident memory of this process in MiB (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def quiet_ray_output() -> None:
    """Keep Ray Data's execution plans and progress in Ray's log files, out of this process's console."""
    import ray.data

    context = ray.data.DataContext.get_current()
    context.print_on_execution_start = False
    for handler in logging.getLogger("ray.data").handlers:
        if type(handler).__name__ != "SessionFileHandler":  # the console handler; the session log keeps everything
            handler.setLevel(logging.WARNING)
