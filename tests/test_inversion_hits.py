"""benchmarks/inversion_hits.py: the per-class hit ratio table of a checkpoint's base classes."""

import sys
from pathlib import Path

import pytest
import torch

from hrhf.config import load_config
from hrhf.models import load_checkpoint
from hrhf.pipeline import run

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import inversion_hits  # noqa: E402


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """The smoke preset's step-0 model (6 shapes classes)."""
    run_dir = tmp_path_factory.mktemp("base")
    run(load_config("smoke", method="ft"), run_dir=str(run_dir), log=lambda _: None, last_step=0)
    return str(run_dir / "step-0.pt")


def test_table_has_a_row_per_checkpoint_and_variant(checkpoint, capsys):
    assert inversion_hits.main(["--checkpoint", checkpoint, "--variant", "", "--variant", "inversion.iterations=2"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    header, rows = lines[0], lines[1:]
    assert header == "| checkpoint | variant | disc | square | triangle | ring | cross | star | lowest | s |"
    assert [row.split(" | ")[1] for row in rows] == ["stored", "inversion.iterations=2"]
    for row in rows:
        hits = [float(cell) for cell in row.split(" | ")[2:8]]
        assert all(h >= 0 for h in hits) and float(row.split(" | ")[8]) == min(hits)


def test_a_bad_variant_is_refused_by_the_config(checkpoint):
    with pytest.raises(ValueError, match="inversion.init_std must be a finite value > 0"):
        inversion_hits.hit_ratios(checkpoint, ["inversion.init_std=0"])


def test_the_inverted_model_as_its_own_judge_gives_its_own_ratios(checkpoint, capsys):
    assert inversion_hits.main(["--checkpoint", checkpoint, "--variant", "inversion.iterations=3", "--judge", checkpoint]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")][1:]
    assert [row.split(" | ")[0] for row in rows] == [f"| {checkpoint}", f"| judged by {checkpoint}"]
    assert rows[0].split(" | ")[2:9] == rows[1].split(" | ")[2:9]


def test_a_judge_of_other_classes_is_refused(checkpoint, tmp_path):
    run_dir = tmp_path / "other"
    run(load_config("smoke", method="ft", overrides=["data.protocol=5-1"]), run_dir=str(run_dir), log=lambda _: None,
        last_step=0)
    with pytest.raises(ValueError, match="same classes in the same order"):
        inversion_hits.main(["--checkpoint", checkpoint, "--variant", "inversion.iterations=1", "--judge",
                             str(run_dir / "step-0.pt")])


def test_a_later_steps_model_is_judged_on_its_base_classes(checkpoint, tmp_path):
    run_dir = tmp_path / "later"
    cfg = load_config("smoke", method="ft", overrides=[f"train.init_checkpoint={checkpoint}"])
    run(cfg, run_dir=str(run_dir), log=lambda _: None, last_step=1)
    later = str(run_dir / "step-1.pt")
    names, hits, _, judged = inversion_hits.hit_ratios(later, ["inversion.iterations=2"], load_checkpoint(later))
    assert names == ["disc", "square", "triangle", "ring", "cross", "star"]  # step 0's classes, not step 1's
    assert judged == hits  # its own judge
    names, _, _, judged = inversion_hits.hit_ratios(later, ["inversion.iterations=2"], load_checkpoint(checkpoint))
    assert len(judged) == len(names) and all(j >= 0 for j in judged)


class _AlwaysClass(torch.nn.Module):
    """A judge that labels every pixel as one class."""

    def __init__(self, index: int, classes: int) -> None:
        super().__init__()
        self.index, self.classes = index, classes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = torch.zeros(x.shape[0], self.classes, *x.shape[2:])
        logits[:, self.index] = 1.0
        return logits


def test_judged_area_is_the_share_the_judge_gives_the_target_class():
    images = torch.zeros(3, 3, 8, 8, dtype=torch.uint8)
    meta = [{"class": 1, "scale": 0.2, "area": 0.1}, {"class": 2, "scale": 0.2, "area": 0.2}, {"class": 1, "scale": 0.4, "area": 0.0}]
    judged = inversion_hits.judged_meta(_AlwaysClass(1, 3), images, meta)
    assert [m["area"] for m in judged] == [1.0, 0.0, 1.0]
    assert [m["scale"] for m in judged] == [0.2, 0.2, 0.4] and meta[0]["area"] == 0.1
