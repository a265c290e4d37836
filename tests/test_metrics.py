import math

import torch

from hrhf.metrics import ConfusionMatrix, class_iou, summarize


def test_iou_of_hand_made_matrix():
    # rows = truth, cols = prediction
    matrix = torch.tensor([[8, 2, 0], [1, 3, 0], [0, 0, 0]])
    iou = class_iou(matrix)
    assert math.isclose(iou[0].item(), 8 / (8 + 2 + 1))
    assert math.isclose(iou[1].item(), 3 / (3 + 1 + 2))
    assert math.isnan(iou[2].item())  # never occurs: left out of means


def test_summary_splits_old_and_new():
    matrix = torch.tensor([[10, 0, 0, 0], [0, 5, 5, 0], [0, 0, 10, 0], [0, 0, 0, 4]])
    s = summarize(matrix, old=[1, 2], new=[3])
    iou1, iou2 = 5 / 10, 10 / 15
    assert math.isclose(s["old"], (iou1 + iou2) / 2)
    assert math.isclose(s["new"], 1.0)
    assert math.isclose(s["background"], 1.0)
    assert math.isclose(s["all"], (1 + iou1 + iou2 + 1) / 4)
    assert s["per_class"][1] == iou1


def test_update_ignores_255_and_counts_pixels():
    cm = ConfusionMatrix(3)
    target = torch.tensor([[0, 1, 255], [2, 2, 1]])
    pred = torch.tensor([[0, 2, 1], [2, 1, 1]])
    cm.update(pred, target)
    assert int(cm.matrix.sum()) == 5
    assert cm.matrix[1, 2] == 1 and cm.matrix[2, 2] == 1 and cm.matrix[2, 1] == 1 and cm.matrix[1, 1] == 1


def test_update_rejects_labels_beyond_classes():
    cm = ConfusionMatrix(2)
    try:
        cm.update(torch.zeros(4, dtype=torch.long), torch.tensor([0, 1, 3, 0]))
    except ValueError as err:
        assert "3" in str(err)
    else:
        raise AssertionError("expected a ValueError")


def test_mean_over_no_class_is_none_not_nan():
    s = summarize(torch.tensor([[3, 0], [0, 2]]), old=[], new=[1])
    assert s["old"] is None and s["new"] == 1.0
