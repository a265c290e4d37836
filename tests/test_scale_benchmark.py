"""benchmarks/scale.py's arguments (its /proc helpers are tested in test_localcluster.py)."""

import argparse
import importlib.util
import json

import pytest

from conftest import ROOT


def load_scale_benchmark():
    """The benchmark script as a module (benchmarks/ is not a package)."""
    spec = importlib.util.spec_from_file_location("scale_benchmark", ROOT / "benchmarks" / "scale.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_parse_sizes_wants_two_distinct_positive_sizes():
    scale = load_scale_benchmark()
    assert scale.parse_sizes("2000,200") == [200, 2000]
    for text in ("200", "200,200", "0,200", "1,2,3"):
        with pytest.raises(argparse.ArgumentTypeError):
            scale.parse_sizes(text)


def test_the_table_of_a_saved_run_shows_both_sizes_and_the_growth(tmp_path, capsys):
    scale = load_scale_benchmark()
    figures = {"image_size": 64, "sizes": [100, 300], "settings": ["--preset", "smoke"], "driver_growth": 1.2}
    for size, driver in ((100, 500.0), (300, 600.0)):
        figures.update({f"driver_peak_mb_{size}": driver, f"worker_peak_mb_{size}": 900.0,
                        f"images_per_s_{size}": 10.0, f"wall_s_{size}": 60.0})
    saved = tmp_path / "scale.json"
    saved.write_text(json.dumps(figures))
    assert scale.main(["--table", str(saved)]) == 0
    printed = capsys.readouterr().out
    assert "| 100 | 64 | 500 | 900 | 10.0 | 60 |" in printed and "| 300 | 64 | 600 |" in printed
    assert "= 1.200 (target < 1.1: NOT met)" in printed
