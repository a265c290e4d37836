import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from hrhf.tasks import (
    NUM_CLASSES,
    PROTOCOLS,
    cached_split,
    filter_step,
    label_lut,
    make_task,
    make_task_from_steps,
)

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
VOC = DATA / "voc_mini" / "VOCdevkit" / "VOC2012"
needs_voc = pytest.mark.skipif(not VOC.is_dir(), reason=f"shared VOC sample data not found at {VOC}")


@pytest.mark.parametrize("dataset,name", [(d, n) for d in PROTOCOLS for n in PROTOCOLS[d]])
def test_protocol_sizes_cover_all_classes(dataset, name):
    sizes = PROTOCOLS[dataset][name]
    assert sum(sizes) == NUM_CLASSES[dataset]
    assert all(s > 0 for s in sizes)
    task = make_task(dataset, name)
    assert [len(s) for s in task.steps] == sizes
    assert task.order == tuple(range(1, NUM_CLASSES[dataset] + 1))


def test_step_counts_of_published_protocols():
    assert len(PROTOCOLS["voc"]["15-1"]) == 6
    assert len(PROTOCOLS["voc"]["10-1"]) == 11
    assert len(PROTOCOLS["ade"]["50-50"]) == 3
    assert len(PROTOCOLS["ade"]["100-5"]) == 11


def test_task_class_lists_voc_15_1():
    task = make_task("voc", "15-1", overlap=False)
    assert task.num_steps == 6 and not task.overlap
    assert task.new_classes(0) == tuple(range(1, 16))
    assert task.new_classes(3) == (18,)
    assert task.old_classes(0) == ()
    assert task.old_classes(3) == tuple(range(1, 18))
    assert task.seen_classes(3) == tuple(range(1, 19))
    assert task.num_seen(3) == 18
    assert task.old_indices(3) == list(range(1, 18))
    assert task.new_indices(3) == [18]
    assert task.new_indices(0) == list(range(1, 16))
    with pytest.raises(IndexError):
        task.new_classes(6)


@pytest.mark.parametrize("overlap", [True, False])
def test_shapes_5_1_mirrors_voc_15_1(overlap):
    task = make_task("shapes", "5-1", overlap=overlap)
    assert task.num_steps == 6 == make_task("voc", "15-1").num_steps
    assert task.overlap is overlap
    assert task.steps == ((1, 2, 3, 4, 5), (6,), (7,), (8,), (9,), (10,))
    assert task.old_classes(5) == tuple(range(1, 10)) and task.new_indices(5) == [10]
    # overlapped keeps images showing future classes, disjoint drops them
    present = [frozenset(s) for s in ({6}, {6, 2}, {6, 9}, {9, 1})]
    assert filter_step(present, task, 1) == ([0, 1, 2] if overlap else [0, 1])
    assert filter_step(present, task, 0) == ([1, 3] if overlap else [])

def test_task_indices_follow_order_not_label_ids():
    task = make_task_from_steps("voc", [[7, 3], [12, 1, 5]], overlap=True)
    assert task.order == (7, 3, 12, 1, 5)
    assert task.old_indices(1) == [1, 2]
    assert task.new_indices(1) == [3, 4, 5]
    assert task.model_index(12) == 3
    with pytest.raises(ValueError, match="not part of task"):
        task.model_index(20)


@pytest.mark.parametrize(
    "steps,match",
    [
        ([[1, 2, 5], [3, 4], [5]], "class 5 appears in step 0 and step 2"),
        ([[1, 2], [0]], "class 0 in step 1 is out of range 1..20"),
        ([[1, 21]], "class 21 in step 0 is out of range"),
        ([[1, 2], []], "step 1 is empty"),
        ([], "at least one step"),
        ([[1, 2.5]], "must be integers"),
    ],
)
def test_make_task_from_steps_rejects_bad_steps(steps, match):
    with pytest.raises(ValueError, match=match):
        make_task_from_steps("voc", steps, overlap=True)


def test_unknown_names_list_known_ones():
    with pytest.raises(ValueError, match=r"unknown dataset 'coco'.*'ade'.*'shapes'.*'voc'"):
        make_task("coco", "15-1")
    with pytest.raises(ValueError, match=r"unknown protocol '15-2' for 'voc'.*'19-1'"):
        make_task("voc", "15-2")
    with pytest.raises(ValueError, match="unknown dataset"):
        make_task_from_steps("cityscapes", [[1]], overlap=True)


def test_explicit_order_is_used():
    order = list(range(20, 0, -1))
    task = make_task("voc", "15-5", order=order)
    assert task.order == tuple(order)
    assert task.new_classes(0) == tuple(order[:15])
    assert task.new_classes(1) == tuple(order[15:])


@pytest.mark.parametrize(
    "order,match",
    [
        (list(range(1, 20)), r"permutation of 1..20.*missing \[20\]"),
        (list(range(1, 20)) + [19], r"repeated \[19\]"),
        (list(range(0, 20)), r"out of range \[0\]"),
    ],
)
def test_bad_order_rejected(order, match):
    with pytest.raises(ValueError, match=match):
        make_task("voc", "15-1", order=order)


def test_order_and_seed_are_exclusive():
    with pytest.raises(ValueError, match="not both"):
        make_task("voc", "15-1", order=list(range(1, 21)), order_seed=3)


def test_seeded_order_is_a_deterministic_permutation():
    a = make_task("ade", "100-50", order_seed=1)
    b = make_task("ade", "100-50", order_seed=1)
    c = make_task("ade", "100-50", order_seed=2)
    assert a.order == b.order
    assert a.order != c.order
    assert sorted(a.order) == list(range(1, 151))
    assert a.order != tuple(range(1, 151))
    assert a.new_classes(1) == a.order[100:]


def test_train_lut_labels_only_new_classes():
    task = make_task_from_steps("voc", [[3, 1], [2, 7]], overlap=True)
    mask = torch.tensor([[0, 1, 2], [3, 7, 9], [255, 20, 2]], dtype=torch.uint8)
    lut = label_lut(task, 1, "train")
    assert lut.shape == (256,) and lut.dtype == torch.long
    expected = torch.tensor([[0, 0, 3], [0, 4, 0], [255, 0, 3]])
    assert torch.equal(lut[mask.long()], expected)
    expected0 = torch.tensor([[0, 2, 0], [1, 0, 0], [255, 0, 0]])
    assert torch.equal(label_lut(task, 0, "train")[mask.long()], expected0)


@pytest.mark.parametrize("mode", ["eval", "joint"])
def test_eval_lut_ignores_unseen_classes(mode):
    task = make_task_from_steps("voc", [[3, 1], [2, 7]], overlap=True)
    mask = torch.tensor([[0, 1, 2], [3, 7, 9], [255, 20, 2]], dtype=torch.uint8)
    expected0 = torch.tensor([[0, 2, 255], [1, 255, 255], [255, 255, 255]])
    assert torch.equal(label_lut(task, 0, mode)[mask.long()], expected0)
    expected1 = torch.tensor([[0, 2, 3], [1, 4, 255], [255, 255, 3]])
    assert torch.equal(label_lut(task, 1, mode)[mask.long()], expected1)


def test_unknown_lut_mode():
    with pytest.raises(ValueError, match="unknown label mode 'test'"):
        label_lut(make_task("voc", "19-1"), 0, "test")


def test_filter_step_on_hand_made_label_sets():
    task_o = make_task_from_steps("shapes", [[1, 2], [3], [4]], overlap=True)
    task_d = make_task_from_steps("shapes", [[1, 2], [3], [4]], overlap=False)
    present = [frozenset(s) for s in ({1}, {3}, {1, 3}, {3, 4}, {4}, set(), {3, 5})]
    assert filter_step(present, task_o, 0) == [0, 2]
    assert filter_step(present, task_d, 0) == [0]
    assert filter_step(present, task_o, 1) == [1, 2, 3, 6]
    assert filter_step(present, task_d, 1) == [1, 2]
    assert filter_step(present, task_d, 2) == [3, 4]


def _read_voc_labels(split: str) -> list[frozenset[int]]:
    ids = (VOC / "ImageSets" / "Segmentation" / f"{split}.txt").read_text().split()
    out = []
    for i in ids:
        mask = np.array(Image.open(VOC / "SegmentationClass" / f"{i}.png"))
        out.append(frozenset(int(v) for v in np.unique(mask)) - {0, 255})
    return out


@needs_voc
def test_filter_step_on_real_voc_masks():
    present = _read_voc_labels("train")
    assert len(present) > 0
    overlapped = make_task("voc", "15-1", overlap=True)
    disjoint = make_task("voc", "15-1", overlap=False)
    for step in range(overlapped.num_steps):
        kept_o = filter_step(present, overlapped, step)
        kept_d = filter_step(present, disjoint, step)
        new = set(overlapped.new_classes(step))
        future = set(range(1, 21)) - set(overlapped.seen_classes(step))
        assert set(kept_d) <= set(kept_o)
        assert kept_o == [i for i, p in enumerate(present) if p & new]
        assert kept_d == [i for i, p in enumerate(present) if p & new and not p & future]
    # the base step of 15-1 is where disjoint drops images holding later classes in this sample
    base_o, base_d = filter_step(present, overlapped, 0), filter_step(present, disjoint, 0)
    dropped = set(base_o) - set(base_d)
    assert dropped, "expected some base images with classes 16..20 in the VOC sample"
    assert all(present[i] & set(range(16, 21)) for i in dropped)


def test_cached_split_reuses_file(tmp_path):
    calls = []

    def compute():
        calls.append(1)
        return [3, 1, 4]

    key = {"dataset": "voc", "data": {"root": "/x", "split": "train"}, "step": 2, "order": [1, 2, 3]}
    assert cached_split(str(tmp_path), key, compute) == [3, 1, 4]
    assert cached_split(str(tmp_path), dict(reversed(list(key.items()))), compute) == [3, 1, 4]
    assert len(calls) == 1
    files = list(tmp_path.glob("*.json"))
    assert len(files) == 1
    stored = json.loads(files[0].read_text())
    assert stored["indices"] == [3, 1, 4]
    assert stored["key"] == key
    assert not [p for p in tmp_path.iterdir() if p.suffix != ".json"]


def test_cached_split_recomputes_on_key_change(tmp_path):
    results = iter([[1], [2], [3]])
    key = {"dataset": "voc", "step": 1, "order": [1, 2]}
    assert cached_split(str(tmp_path), key, lambda: next(results)) == [1]
    assert cached_split(str(tmp_path), {**key, "order": [2, 1]}, lambda: next(results)) == [2]
    assert len(list(tmp_path.glob("*.json"))) == 2
    # a file whose stored key disagrees with its name is not trusted
    path = next(p for p in tmp_path.glob("*.json") if json.loads(p.read_text())["indices"] == [1])
    path.write_text(json.dumps({"key": {"dataset": "other"}, "indices": [9]}))
    assert cached_split(str(tmp_path), key, lambda: next(results)) == [3]
    assert json.loads(path.read_text())["indices"] == [3]


def test_cached_split_without_dir_always_computes(tmp_path):
    calls = []
    for _ in range(2):
        assert cached_split(None, {"a": 1}, lambda: calls.append(1) or [5]) == [5]
    assert len(calls) == 2
