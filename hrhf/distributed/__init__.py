"""The Ray layer: synthesis actors, Ray Train distillation and Tune sweeps over the pure hrhf modules."""

import logging
import os
import resource

# Ray starts its workers at nice 15 so that its own control processes stay responsive; on nodes that
# run this job alone the actors and train workers are the work, and at nice 15 they lose the CPU to
# any other process (a Ray Train worker then ran at half the speed of the same loop in the driver).
NORMAL_WORKER_PRIORITY = {"RAY_worker_niceness": "0"}


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


def normal_worker_priority() -> None:
    """Have a Ray started from this process run its workers at normal priority (must precede ray.init)."""
    for key, value in NORMAL_WORKER_PRIORITY.items():
        os.environ.setdefault(key, value)


# Ray Train settings for this project's fits, read by the driver and passed on to Ray Train's controller:
# - the controller sees a finished worker group at its next poll (every 2 s by default), once per step;
# - the preemption watcher (an actor per fit) only lets a train function ask whether its node is being
#   drained, which ours never does; on a small node its start-up competes with the workers'.
# - Ray Train's print patch doubles every line the driver prints.
RAY_TRAIN_SETTINGS = {
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5",
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
    "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
}


def ray_train_settings() -> None:
    """Apply RAY_TRAIN_SETTINGS where the environment does not set them already (before any fit)."""
    for key, value in RAY_TRAIN_SETTINGS.items():
        os.environ.setdefault(key, value)
