"""Old-class co-occurrence figures: the statistics, shapes version 2 within VOC's bands, the tool end to end."""

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from hrhf.data import ShapesDataset
from hrhf.data.cooccurrence import class_sets_of, count_pixels, protocol_statistics, step_statistics
from hrhf.tasks import make_task, make_task_from_steps

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
VOC_LISTS = DATA / "voc_stats" / "train_aug_image_classes.csv"
VOC_ROOT = DATA / "voc_mini"
needs_voc_lists = pytest.mark.skipif(not VOC_LISTS.is_file(), reason=f"VOC class lists not found at {VOC_LISTS}")
needs_voc = pytest.mark.skipif(not (VOC_ROOT / "VOCdevkit").is_dir(), reason=f"VOC sample not found at {VOC_ROOT}")


def test_statistics_on_hand_made_images():
    task = make_task_from_steps("shapes", [[1, 2, 3], [4], [5]], overlap=True)
    # label 0..5 pixel counts of eight 10-pixel images
    counts = np.array([
        [10, 0, 0, 0, 0, 0],  # nothing
        [5, 0, 0, 0, 5, 0],  # {4}
        [4, 3, 0, 0, 3, 0],  # {1, 4}
        [2, 0, 0, 0, 4, 4],  # {4, 5}
        [6, 0, 0, 0, 0, 4],  # {5}
        [0, 0, 0, 0, 0, 10],  # {5}
        [5, 3, 0, 0, 0, 2],  # {1, 5}
        [8, 0, 0, 0, 0, 2],  # {5}
    ])  # fmt: skip
    sets = class_sets_of(counts)
    assert sets[:4] == [frozenset(), frozenset({4}), frozenset({1, 4}), frozenset({4, 5})]

    step1 = step_statistics(sets, task, 1, counts)
    assert step1["images"] == 3 and step1["old_classes"] == 3
    assert step1["any_old"] == pytest.approx(1 / 3)
    assert step1["top_old_class"] == 1 and step1["top_old"] == pytest.approx(1 / 3)
    assert step1["median_old"] == 0.0
    assert step1["old_above"] == [1, 1, 1]
    assert step1["old_pixels"] == pytest.approx(3 / 30)

    step2 = step_statistics(sets, task, 2, counts)
    assert step2["images"] == 5  # overlapped: {4, 5} counts for the step of 5
    assert step2["old_share"] == {1: pytest.approx(0.2), 2: 0.0, 3: 0.0, 4: pytest.approx(0.2)}
    assert step2["any_old"] == pytest.approx(0.4)
    assert step2["median_old"] == pytest.approx(0.1)  # mean of the middle two of 0, 0, 0.2, 0.2
    assert step2["old_pixels"] == pytest.approx(7 / 50)

    stats = protocol_statistics(sets, task, 5, counts)
    assert stats["later_mean"]["any_old"] == pytest.approx((1 / 3 + 0.4) / 2)
    assert stats["later_mean"]["top_old"] == pytest.approx((1 / 3 + 0.2) / 2)
    assert stats["later_mean"]["old_above"] == [1.5, 1.5, 0.5]  # 0.2 is not above 20%
    assert stats["base_rare_every_later_step"] == [2, 3]
    data = stats["dataset"]
    assert data["foreground_pixels"] == pytest.approx(1 - 40 / 80)
    assert data["images_with_classes"] == pytest.approx([4 / 8, 3 / 8, 0, 0])
    assert data["class_frequency"][5] == pytest.approx(5 / 8)

    disjoint = make_task_from_steps("shapes", [[1, 2, 3], [4], [5]], overlap=False)
    assert step_statistics(sets, disjoint, 1)["images"] == 2  # {4, 5} shows a future class


@needs_voc_lists
def test_voc_15_1_figures_from_the_class_lists():
    with open(VOC_LISTS, newline="") as f:
        sets = [frozenset(int(c) for c in row["classes"].split()) for row in csv.DictReader(f)]
    stats = protocol_statistics(sets, make_task("voc", "15-1"), 20)
    mean = stats["later_mean"]
    assert mean["images"] == pytest.approx(508.2)
    assert round(100 * mean["any_old"]) == 57 and round(100 * mean["top_old"]) == 33
    assert round(100 * mean["median_old"], 1) == 1.1
    assert [round(100 * s) for s in mean["old_above_share"]] == [41, 25, 8]
    assert stats["base_rare_every_later_step"] == [1, 6, 10]  # aeroplane, bus, cow
    assert [s["top_old_class"] for s in stats["steps"][1:]] == [9, 15, 15, 15, 15]  # chair, then person


@pytest.mark.parametrize("data_seed", [0, 1])
def test_shapes_version_2_within_voc_bands_on_5_1(data_seed):
    data = ShapesDataset("train", size=2000, image_size=64, seed=data_seed, version=2)
    counts = count_pixels((data.render(i)[1] for i in range(len(data))), data.num_classes)
    stats = protocol_statistics(class_sets_of(counts), make_task("shapes", "5-1"), 10, counts)
    mean = stats["later_mean"]
    assert 0.25 <= mean["top_old"] <= 0.45
    assert mean["median_old"] <= 0.03
    assert 0.40 <= mean["any_old"] <= 0.75
    assert len(stats["base_rare_every_later_step"]) >= 2
    assert 0.15 <= stats["dataset"]["foreground_pixels"] <= 0.35


def test_shapes_version_1_outside_voc_bands_on_5_1():
    data = ShapesDataset("train", size=2000, image_size=64, seed=0, version=1)
    counts = count_pixels((data.render(i)[1] for i in range(len(data))), data.num_classes)
    stats = protocol_statistics(class_sets_of(counts), make_task("shapes", "5-1"), 10, counts)
    # every old class in about 9% of a step's images, and little foreground
    assert stats["later_mean"]["top_old"] < 0.15 and stats["later_mean"]["median_old"] > 0.06
    assert stats["base_rare_every_later_step"] == []
    assert stats["dataset"]["foreground_pixels"] < 0.15


@needs_voc_lists
@needs_voc
def test_tool_end_to_end(tmp_path):
    out = tmp_path / "cooc.json"
    run = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "cooccurrence.py"), "--train-size", "300", "--image-size", "32",
         "--shapes-version", "1", "2", "--voc-stats", str(VOC_LISTS), "--voc-root", str(VOC_ROOT), "--json", str(out)],
        capture_output=True, text=True, timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    header = next(line for line in run.stdout.splitlines() if line.startswith("|  |"))
    assert header == "|  | shapes v1 5-1 | shapes v2 5-1 | VOC 15-1 | VOC 15-1 masks (28) |"
    assert "| any old class, % of a step's images | " in run.stdout
    assert "| median old class, % | " in run.stdout and "57.4" in run.stdout
    assert "Base classes under 1% of every later step's images: aeroplane, bus, cow." in run.stdout
    figures = json.loads(out.read_text())
    labels = [s["label"] for s in figures["sources"]]
    assert labels == ["shapes v1 5-1", "shapes v2 5-1", "VOC 15-1", "VOC 15-1 masks (28)"]
    shapes_v2, voc_lists, voc_masks = figures["sources"][1], figures["sources"][2], figures["sources"][3]
    assert shapes_v2["input"]["version"] == 2 and shapes_v2["dataset"]["images"] == 300
    assert len(shapes_v2["steps"]) == 6 and 0 < shapes_v2["dataset"]["foreground_pixels"] < 1
    assert voc_lists["dataset"]["images"] == 10582 and voc_lists["dataset"]["foreground_pixels"] is None
    assert 0 < voc_masks["dataset"]["foreground_pixels"] < 1
