"""Coverage-aware synthesis budgets: per-class image counts, the targets they make, presence counts."""

import pytest
import torch

from hrhf.config import load_config
from hrhf.inversion import allocate_images, make_targets
from hrhf.metrics import images_showing
from hrhf.pipeline import run


def test_a_uniform_count_per_class_gives_the_uniform_targets():
    assert make_targets([1, 2, 3], [0.1, 0.4], [2, 2, 2], base_seed=5) == make_targets([1, 2, 3], [0.1, 0.4], 2, base_seed=5)


def test_per_class_counts_keep_each_class_first_images_and_seeds():
    uniform = make_targets([1, 2, 3], [0.1, 0.4], 2, base_seed=5)
    skewed = make_targets([1, 2, 3], [0.1, 0.4], [1, 4, 1], base_seed=5)
    per_class = {c: sum(t.class_index == c for t in skewed) for c in (1, 2, 3)}
    assert per_class == {1: 2, 2: 8, 3: 2}  # counts x 2 scales
    for c in (1, 3):  # one image per scale: the first of the uniform targets
        assert {t for t in skewed if t.class_index == c} <= {t for t in uniform if t.class_index == c}
    assert {t for t in uniform if t.class_index == 2} <= set(skewed)  # class 2 keeps its first two images per scale
    assert len({t.seed for t in skewed}) == len(skewed)
    with pytest.raises(ValueError, match="2 image counts for 3 classes"):
        make_targets([1, 2, 3], [0.1], [1, 2], base_seed=0)


def test_the_budget_goes_to_the_classes_the_new_images_lack():
    counts = allocate_images([0.30, 0.01, 0.0, 0.25], images_per_scale=4, target_presence=0.2)
    assert sum(counts) == 16 and min(counts) >= 1
    assert counts[0] == 1 and counts[3] == 1  # seen often enough: the floor only
    assert counts[2] >= counts[1] > 4  # the absent class gets the most
    assert allocate_images([0.5, 0.3], 3, 0.2) == [3, 3]  # nobody lacks: uniform
    assert allocate_images([0.0, 0.0, 0.0], 3, 0.2) == [3, 3, 3]  # all lack equally: uniform
    with pytest.raises(ValueError):
        allocate_images([1.5], 2, 0.2)


def test_images_showing_counts_an_image_once_and_needs_the_minimum_share():
    predicted = torch.zeros(3, 10, 10, dtype=torch.long)
    predicted[0, :5] = 1  # half of image 0
    predicted[1, 0, 0] = 1  # one pixel of image 1
    predicted[2, :2] = 2  # a fifth of image 2
    assert images_showing(predicted, 3, 0.05).tolist() == [3, 1, 1]
    assert images_showing(predicted, 3, 0.005).tolist() == [3, 2, 1]


def test_allocation_settings_are_checked():
    assert load_config("smoke").inversion.allocation == "uniform"
    with pytest.raises(ValueError, match="inversion.allocation"):
        load_config("smoke", overrides=["inversion.allocation=greedy"])
    with pytest.raises(ValueError, match="coverage_target"):
        load_config("smoke", overrides=["inversion.coverage_target=0"])
    with pytest.raises(ValueError, match="inversion.keep_images=false to allocate by coverage"):
        load_config("smoke", overrides=["inversion.allocation=coverage"])  # kept images invert each class once


def test_a_coverage_run_synthesises_the_allocated_images_per_class():
    cfg = load_config("smoke", overrides=["inversion.keep_images=false", "inversion.allocation=coverage",
                                          "inversion.images_per_scale=3",
                                          "inversion.coverage_target=1.0", "inversion.iterations=2"])
    report = run(cfg, log=lambda *args, **kwargs: None)
    for step in report["steps"][1:]:
        budget = step["synthesis_budget"]
        n_old = len(step["seen_classes"]) - len(step["new_classes"])
        assert len(budget["presence"]) == len(budget["images_per_scale"]) == n_old
        assert sum(budget["images_per_scale"]) == 3 * n_old
        assert budget["images_per_scale"] == allocate_images(budget["presence"], 3, 1.0)
        assert step["num_fake"] == sum(budget["images_per_scale"]) * len(cfg.inversion.scales)
    assert report["steps"][0]["synthesis_budget"] is None
