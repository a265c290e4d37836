"""Sweep plumbing that needs no running Tune: trial configs and the results files."""

import csv

from PIL import Image

from hrhf.config import load_config
from hrhf.distributed.tuning import base_dict, trial_config, write_results


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
