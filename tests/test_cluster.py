"""cluster.yaml against Ray's own schema and its security settings, and autoscaling driven by synthesis demand."""

import json
import os
import shlex
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import jsonschema
import pytest
import yaml

from conftest import free_port

ROOT = Path(__file__).resolve().parents[1]
TOKEN_PATH = "/home/ubuntu/.ray/auth_token"


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
    with pytest.raises(jsonschema.ValidationError, match="'min_worker' was unexpected"):
        validate_config(prepare_config(raw))


def start_env(command: str) -> dict[str, str]:
    """The VAR=value assignments right in front of the `ray start` of a start command."""
    words = shlex.split(command)
    at = words.index("ray")
    assert words[at + 1] == "start", command
    env = {}
    for word in reversed(words[:at]):
        name, equals, value = word.partition("=")
        if not (equals and name.isidentifier()):
            break  # e.g. `set -a && . file && set +a &&` before them
        env[name] = value
    return env


def test_cluster_yaml_turns_on_token_auth_and_least_privilege():
    config = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    # every node starts with token authentication, from the same token file, mounted from a git-ignored one
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        starts = [start_env(c) for c in config[key] if "ray start" in c]
        assert starts, key
        for env in starts:
            assert env.get("RAY_AUTH_MODE") == "token" and env.get("RAY_AUTH_TOKEN_PATH") == TOKEN_PATH, key
    source = config["file_mounts"][TOKEN_PATH]
    assert source.startswith("./secrets/")
    ignored = (ROOT / ".gitignore").read_text().splitlines()
    assert "secrets/" in ignored and ".env" in ignored
    assert "RAY_AUTH_TOKEN=" not in (ROOT / "cluster.yaml").read_text()  # no token value in the file
    # an instance profile of its own for each node type, never the launcher's default role
    node_types = config["available_node_types"]
    profiles = {name: t["node_config"]["IamInstanceProfile"]["Arn"] for name, t in node_types.items()}
    assert set(profiles) == {"head", "gpu_worker"} and len(set(profiles.values())) == 2
    assert all(arn.startswith("arn:aws:iam::") and ":instance-profile/" in arn for arn in profiles.values())
    # nothing git-ignored or secret is copied to the nodes
    assert config["rsync_filter"] == [".gitignore"]
    assert {".env", "secrets/", ".git", ".venv", "runs"} <= set(config["rsync_exclude"])


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


class FakeAutoscalingCluster:
    """Ray's fake multi-node provider behind a head of its own (temp dir, ports), stopped alone.

    Ray's ``AutoscalingCluster`` does the same but runs `ray stop --force` in ``start`` and
    ``shutdown``, which ends every Ray process of the machine, other people's clusters included.
    """

    def __init__(self, head_cpus: int, worker_node_types: dict) -> None:
        import ray

        self.head_cpus = head_cpus
        # Ray's files go to <base>/ray; with RAY_TMPDIR=<base>, ray.init("auto") finds this cluster there
        self.base = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # short: socket paths must fit in 107 bytes
        self.host = ray.util.get_node_ip_address()
        self.config = fake_provider_config(worker_node_types, {"CPU": head_cpus})
        self._use_port(free_port())

    def _use_port(self, port: int) -> None:
        """The head's GCS port, which is also where the fake worker nodes connect (the provider's default is 6379)."""
        self.port = port
        self.config["provider"]["gcs_address"] = f"{self.host}:{port}"

    def start(self, attempts: int = 2) -> None:
        """Start the head with the fake provider's autoscaler.

        A failed `ray start` is tried again on fresh ports, and its output is kept for the error: in full
        test runs on 2 cores the head's start has failed now and then, and this test is about autoscaling.
        """
        from test_ray_job import stop_cluster

        config_file = Path(self.base, "autoscaling.json")
        env = {**os.environ, "AUTOSCALER_UPDATE_INTERVAL_S": "1", "RAY_FAKE_CLUSTER": "1", "RAY_AUTH_MODE": "token"}
        failures = []
        for _ in range(attempts):
            config_file.write_text(json.dumps(self.config))
            started = subprocess.run(
                ["ray", "start", "--head", f"--autoscaling-config={config_file}", f"--num-cpus={self.head_cpus}",
                 f"--port={self.port}", f"--temp-dir={self.base}/ray", "--include-dashboard=false",
                 f"--dashboard-agent-listen-port={free_port()}", "--disable-usage-stats"],
                env=env, capture_output=True, text=True, timeout=180,
            )
            if started.returncode == 0:
                return
            failures.append(f"ray start exited with {started.returncode}:\n{started.stdout[-2000:]}\n{started.stderr[-3000:]}")
            stop_cluster(self.base)
            self._use_port(free_port())
        raise RuntimeError("\n\n".join(failures))

    def shutdown(self) -> None:
        """Kill this cluster's processes (the fake worker nodes are children of its autoscaler)."""
        from test_ray_job import stop_cluster

        stop_cluster(self.base)
        shutil.rmtree(self.base, ignore_errors=True)


@pytest.mark.slow
def test_synthesis_demand_adds_nodes_that_leave_when_idle(monkeypatch):
    import ray

    from hrhf.config import load_config
    from hrhf.distributed.synthesis import RaySynthesizer
    from hrhf.inversion import make_targets
    from hrhf.models import build_model

    workers = {"cpu_worker": {"resources": {"CPU": 1}, "node_config": {}, "min_workers": 0, "max_workers": 2}}
    cluster = FakeAutoscalingCluster(head_cpus=1, worker_node_types=workers)
    try:
        cluster.start()
        monkeypatch.setenv("RAY_TMPDIR", cluster.base)  # "auto" is this cluster, not another one of the machine
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
