"""Sweep plumbing that needs no running Tune: trial configs, storage, trial checkpoints and the results files."""

import csv
import json

import pyarrow.fs
import pytest
from PIL import Image

from hrhf.config import load_config
from hrhf.distributed import tuning
from hrhf.distributed.tuning import EXPERIMENT, base_dict, experiment_location, run_config, trial_config, write_results


def test_trial_config_applies_the_sampled_parameters():
    base = base_dict(load_config("smoke"), "/tmp/base/step-0.pt")
    cfg = trial_config(base, {"w_fake": 2.0, "fake_ratio": 0.25, "scales": [0.1, 0.3], "other": 1})
    assert cfg.method.w_fake == 2.0 and cfg.method.fake_ratio == 0.25 and cfg.inversion.scales == [0.1, 0.3]
    assert cfg.train.init_checkpoint == "/tmp/base/step-0.pt"


def test_results_files(tmp_path):
    rows = [
        {"trial": "a", "fake_ratio": 0.5, "epochs": 3, "old": 0.8, "new": 0.5, "all": 0.75, "error": ""},
        {"trial": "b", "fake_ratio": 0.25, "epochs": 1, "old": 0.7, "new": 0.4, "all": 0.6, "error": ""},
    ]
    write_results(rows, load_config("smoke"), str(tmp_path))
    with open(tmp_path / "results.csv") as f:
        assert [r["trial"] for r in csv.DictReader(f)] == ["a", "b"]
    table = (tmp_path / "results.md").read_text()
    assert "| a | 0.5 | 3 | 80.0 | 50.0 | 75.0 |  |" in table  # parameters as given, mIoU in percent
    assert (tmp_path / "best_config.yaml").read_text().startswith("data:")
    page = (tmp_path / "results.html").read_text()
    assert "<td>75.0</td>" in page and page.count("data:image/png;base64,") == 1
    with Image.open(tmp_path / "sweep.png") as image:
        assert image.size == (320, 320)  # one panel: fake_ratio is the only swept parameter in the rows


def test_run_config_of_an_s3_run_dir_carries_its_filesystem(monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # never contacted: building the config reads nothing
    config = run_config("s3://bucket/sweeps/a")
    assert isinstance(config.storage_filesystem, pyarrow.fs.PyFileSystem)
    assert "s3" in config.storage_filesystem.handler.fs.protocol
    assert config.storage_path == "bucket/sweeps/a" and config.name == EXPERIMENT
    assert experiment_location("s3://bucket/sweeps/a/")[0] == f"bucket/sweeps/a/{EXPERIMENT}"


def test_run_config_of_a_local_run_dir_has_no_filesystem(tmp_path):
    config = run_config(str(tmp_path / "run"))
    assert config.storage_filesystem is None and config.storage_path == str(tmp_path / "run")


def test_a_trial_restored_from_its_checkpoint_reports_the_saved_result_and_trains_nothing(tmp_path, monkeypatch):
    result = {"epoch": 1, "loss": 0.5, "old": 0.8, "new": 0.4, "all": 0.7, "background": 0.9}
    (tmp_path / tuning.RESULT_FILE).write_text(json.dumps(result))
    reported = []
    monkeypatch.setattr(tuning.tune, "get_checkpoint", lambda: tuning.tune.Checkpoint.from_directory(str(tmp_path)))
    monkeypatch.setattr(tuning.tune, "report", lambda metrics, checkpoint=None: reported.append((metrics, checkpoint)))
    monkeypatch.setattr(tuning, "run", lambda *args, **kwargs: pytest.fail("a finished trial was trained again"))
    tuning.run_trial({"w_fake": 1.0}, base_dict(load_config("smoke"), "/tmp/base/step-0.pt"))
    assert reported == [(result, None)]
