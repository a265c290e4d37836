"""benchmarks/scale.py's arguments (its /proc helpers are tested in test_localcluster.py)."""

import argparse
import importlib.util

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
