"""cluster.yaml against Ray's own schema, and autoscaling driven by synthesis demand."""

import os
import threading
import time
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


def test_cluster_yaml_validates_against_rays_schema():
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    config = prepare_config(raw)
    validate_config(config)
    worker = config["available_node_types"]["gpu_worker"]
    assert worker["min_workers"] == 0 and worker["max_workers"] >= 1
    assert config["idle_timeout_minutes"] > 0
    text = (ROOT / "cluster.yaml").read_text().lower()
    assert "aws_secret_access_key" not in text and "aws_access_key_id" not in text


def test_a_typo_fails_the_schema():
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    raw["available_node_types"]["gpu_worker"]["min_worker"] = 0
    with pytest.raises(Exception):
        validate_config(prepare_config(raw))


def fake_provider_config(worker_types: dict, head_resources: dict) -> dict:
    """A cluster config for Ray's fake multi-node provider (the wheel does not ship its example)."""
    types = dict(worker_types)
    types["ray.head.default"] = {"resources": head_resources, "node_config": {}, "max_workers": 0}
    return {
        "cluster_name": "fake_multinode",
        "max_workers": 4,
        "provider": {
            "type": "fake_multinode",
            "use_node_id_as_ip": True,
            "disable_node_updaters": True,
            "disable_launch_config_check": True,
        },
        "auth": {"ssh_user": "ubuntu"},
        "available_node_types": types,
        "head_node_type": "ray.head.default",
        "upscaling_speed": 1.0,
        "idle_timeout_minutes": 0.1,
        "file_mounts": {},
        "cluster_synced_files": [],
        "file_mounts_sync_continuously": False,
        "rsync_exclude": [],
        "rsync_filter": [],
        "initialization_commands": [],
        "setup_commands": [],
        "head_setup_commands": [],
        "worker_setup_commands": [],
        "head_start_ray_commands": [],
        "worker_start_ray_commands": [],
    }


@pytest.mark.slow
def test_synthesis_demand_adds_nodes_that_leave_when_idle():
    """Runs alone: AutoscalingCluster.start/shutdown call `ray stop --force`."""
    import ray
    from ray.cluster_utils import AutoscalingCluster

    from hrhf.config import load_config
    from hrhf.distributed.synthesis import RaySynthesizer
    from hrhf.inversion import make_targets
    from hrhf.models import build_model

    class Cluster(AutoscalingCluster):
        def _generate_config(self, head_resources, worker_node_types, autoscaler_v2=False, **kwargs):
            return fake_provider_config(worker_node_types, head_resources)

    workers = {"cpu_worker": {"resources": {"CPU": 1}, "node_config": {}, "min_workers": 0, "max_workers": 2}}
    cluster = Cluster(head_resources={"CPU": 1}, worker_node_types=workers)
    cluster.start()
    try:
        ray.init("auto")

        def alive() -> int:
            return sum(1 for n in ray.nodes() if n["Alive"])

        assert alive() == 1
        peak = [1]
        done = threading.Event()

        def watch() -> None:
            while not done.is_set():
                peak[0] = max(peak[0], alive())
                time.sleep(0.5)

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        cfg = load_config("smoke", overrides=["inversion.iterations=30", "data.image_size=32"])
        teacher = build_model("small", 4, width=cfg.model.width)
        targets = make_targets([1, 2, 3], [0.2, 0.5], 4, base_seed=0)
        # two actors of one CPU each cannot both fit on the one-CPU head: the autoscaler must add a node
        synthesizer = RaySynthesizer(cfg, num_actors=2, cpus_per_actor=1.0, shard_size=4, log=lambda _m: None)
        result = synthesizer.synthesize(teacher, targets, step=1)
        done.set()
        watcher.join()
        assert len(result) == len(targets)
        assert peak[0] >= 2, "no worker node was added for the pending synthesis actor"
        deadline = time.time() + 90
        while alive() > 1 and time.time() < deadline:
            time.sleep(1)
        assert alive() == 1, "idle worker nodes were not removed"
    finally:
        ray.shutdown()
        cluster.shutdown()
        os.environ.pop("RAY_ADDRESS", None)
