import pytest
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from hrhf import losses
from hrhf.features import FeatureTap, default_layers
from hrhf.models import SmallSegNet, build_model


# Local POD


def test_local_pod_zero_for_identical_maps_and_grows_with_shift():
    torch.manual_seed(0)
    teacher = [torch.randn(2, 8, 16, 16), torch.randn(2, 4, 8, 8)]
    student = [t.clone().requires_grad_() for t in teacher]
    same = losses.local_pod(student, teacher)
    assert float(same.detach()) == 0.0
    same.backward()
    assert all(bool(torch.isfinite(s.grad).all()) for s in student)

    direction = [torch.randn_like(t) for t in teacher]
    values = [
        float(losses.local_pod([t + d * shift for t, d in zip(teacher, direction)], teacher))
        for shift in (0.1, 0.5, 1.0, 2.0)
    ]
    assert values[0] > 0
    assert values == sorted(values) and len(set(values)) == len(values)


def test_local_pod_embedding_hand_computed_window_pyramid():
    x = torch.arange(16.0).view(1, 1, 4, 4)
    expected = [
        # scale 1: row means, then column means of the whole map
        1.5, 5.5, 9.5, 13.5, 6, 7, 8, 9,
        # scale 2: windows row-major; each gives its row means, then its column means
        0.5, 4.5, 2, 3,
        2.5, 6.5, 4, 5,
        8.5, 12.5, 10, 11,
        10.5, 14.5, 12, 13,
    ]
    assert losses.local_pod_embedding(x, scales=(1, 2)).tolist() == [expected]
    normalized = losses.local_pod_embedding(x, scales=(1, 2), normalize=True)
    assert torch.allclose(normalized[0, :4], torch.tensor(expected[:4]) / torch.tensor(expected[:4]).norm())


def test_local_windows_see_what_whole_map_pooling_misses():
    # Two checkerboards with the same row and column means everywhere: only the 2x2 windows tell them apart.
    board = torch.tensor([[1.0, 0.0], [0.0, 1.0]]).repeat_interleave(2, 0).repeat_interleave(2, 1)
    a, b = board.view(1, 1, 4, 4), board.flip(1).view(1, 1, 4, 4)
    assert float(losses.local_pod([a], [b], scales=(1,))) == 0.0
    assert float(losses.local_pod([a], [b], scales=(1, 2))) > 0.1


def test_local_pod_is_weighted_mean_of_per_image_distances_of_squared_maps():
    torch.manual_seed(1)
    student = [torch.randn(3, 2, 6, 6), torch.randn(3, 5, 4, 4)]
    teacher = [torch.randn(3, 2, 6, 6), torch.randn(3, 5, 4, 4)]
    weights = [0.3, 2.0]
    per_layer = [
        w * (losses.local_pod_embedding(s**2) - losses.local_pod_embedding(t**2)).norm(dim=1).mean()
        for s, t, w in zip(student, teacher, weights)
    ]
    expected = sum(per_layer) / 2
    assert torch.allclose(losses.local_pod(student, teacher, layer_weights=weights), expected)
    with pytest.raises(ValueError):
        losses.local_pod(student, [teacher[0], teacher[0]])


def test_plop_layer_weights_and_background_folding():
    assert losses.plop_layer_weights(3, num_outputs=16, num_new=4) == pytest.approx([0.02, 0.02, 0.001])
    logits = torch.arange(6.0).view(1, 6, 1, 1)  # background, 2 old, 3 new
    folded = losses.fold_new_into_background(logits, n_old=2)
    assert folded.flatten().tolist() == [0 + 3 + 4 + 5, 1, 2]


# Pseudo-labels and thresholds


def _pixels(*logits: list[float]) -> torch.Tensor:
    """(1, C, 1, P) logits from one list of C logits per pixel."""
    return torch.tensor(logits).T.reshape(1, len(logits[0]), 1, len(logits))


def test_normalized_entropy_bounds():
    assert torch.allclose(losses.normalized_entropy(torch.zeros(1, 5, 2, 2)), torch.ones(1, 2, 2))
    assert float(losses.normalized_entropy(_pixels([0.0, 50.0, 0.0])).max()) < 1e-6


def test_pseudo_labels_replace_background_only_where_old_model_is_certain():
    teacher = _pixels(
        [0.0, 9.0, 0.0],  # background label, certain class 1 -> 1
        [0.0, 0.1, 0.2],  # background label, uncertain class 2 -> ignored
        [9.0, 0.0, 0.0],  # background label, certain background -> 0
        [0.0, 9.0, 0.0],  # new class 3 -> kept
        [0.0, 0.0, 9.0],  # ignored -> stays ignored
    )
    labels = torch.tensor([[[0, 0, 0, 3, 255]]])
    targets, weights = losses.plop_pseudo_labels(teacher, labels, n_old=2, thresholds=torch.full((3,), 0.5))
    assert targets.tolist() == [[[1, 255, 0, 3, 255]]]
    assert weights.tolist() == pytest.approx([2 / 3])

    # an image without background pixels keeps its full weight
    _, weights = losses.plop_pseudo_labels(teacher, torch.full_like(labels, 3), 2, torch.full((3,), 0.5))
    assert weights.tolist() == [1.0]


def test_pseudo_labels_use_the_threshold_of_the_predicted_class():
    # the same moderate uncertainty, once predicted as class 1 and once as class 2
    teacher = _pixels([0.0, 2.0, 0.0], [0.0, 0.0, 2.0])
    uncertainty = float(losses.normalized_entropy(teacher)[0, 0, 0])
    thresholds = torch.tensor([1.0, uncertainty - 0.05, uncertainty + 0.05])
    targets, weights = losses.plop_pseudo_labels(teacher, torch.zeros(1, 1, 2, dtype=torch.long), 2, thresholds)
    assert targets.tolist() == [[[255, 2]]]
    assert weights.tolist() == [0.5]


def _teacher_batches(seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(3):
        sharpness = torch.rand(2, 1, 64, 64, generator=generator) * 6
        logits = torch.randn(2, 4, 64, 64, generator=generator) * sharpness
        labels = torch.randint(0, 2, (2, 64, 64), generator=generator) * 5  # background or new class 5
        batches.append((logits, labels))
    return batches


@pytest.mark.parametrize("quantile", [0.5, 0.25])
def test_thresholds_follow_per_class_entropy_quantile(quantile):
    batches = _teacher_batches(0)
    logits = torch.cat([b[0] for b in batches])
    labels = torch.cat([b[1] for b in batches])
    uncertainty = losses.normalized_entropy(logits)
    predicted = losses.predicted_classes(logits)

    # over all pixels
    thresholds = losses.entropy_thresholds([b[0] for b in batches], n_old=3, quantile=quantile)
    expected = torch.stack([torch.quantile(uncertainty[predicted == c], quantile) for c in range(4)])
    assert torch.allclose(thresholds, expected, atol=2e-3)

    # over background pixels only
    thresholds = losses.entropy_thresholds(batches, n_old=3, quantile=quantile)
    background = labels == 0
    expected = torch.stack([torch.quantile(uncertainty[background & (predicted == c)], quantile) for c in range(4)])
    assert torch.allclose(thresholds, expected, atol=2e-3)


def test_thresholds_of_unpredicted_class_and_clamping():
    # class 2 is never the old model's prediction
    logits = torch.randn(2, 3, 8, 8)
    logits[:, 2] = -100.0
    thresholds = losses.entropy_thresholds([logits], n_old=2, min_threshold=0.01, max_threshold=0.3)
    assert float(thresholds[2]) == pytest.approx(0.01)
    assert float(thresholds.max()) == pytest.approx(0.3)
    with pytest.raises(ValueError):
        losses.entropy_thresholds([torch.randn(1, 5, 4, 4)], n_old=2)


# FeatureTap


def test_feature_tap_captures_small_segnet_stages_and_removes_hooks():
    torch.manual_seed(0)
    model = SmallSegNet(3, width=4).eval()
    x = torch.randn(2, 3, 32, 32)
    with FeatureTap(model) as tap:
        assert tap.layers == ["backbone.1", "backbone.3", "backbone.5", "head"]
        model(x)
        assert [tuple(f.shape) for f in tap.features] == [(2, 4, 16, 16), (2, 8, 8, 8), (2, 16, 8, 8), (2, 16, 8, 8)]
        with torch.no_grad():
            assert torch.equal(tap.outputs["backbone.5"], model.backbone(x))
    kept = tap.features[0]
    assert all(not m._forward_hooks for m in model.modules())
    model(torch.randn(2, 3, 32, 32))
    assert tap.features[0] is kept


def test_feature_tap_rejects_unknown_layer_and_reports_missing_outputs():
    model = SmallSegNet(3, width=4)
    with pytest.raises(ValueError):
        FeatureTap(model, ["backbone.9"])
    with FeatureTap(model, ["head"]) as tap, pytest.raises(RuntimeError):
        tap.features


@pytest.mark.parametrize(
    "name, channels",
    [
        ("deeplabv3_resnet50", [256, 512, 1024, 2048, 256]),
        ("lraspp_mobilenet_v3_large", [16, 24, 40, 112, 960]),
    ],
)
def test_feature_tap_on_torchvision_models(name, channels):
    torch.manual_seed(0)
    model = build_model(name, 3).eval()
    with FeatureTap(model) as tap, torch.no_grad():
        model(torch.randn(1, 3, 64, 64))
        assert [f.shape[1] for f in tap.features] == channels
    assert all(not m._forward_hooks for m in model.modules())


def test_feature_tap_under_ddp_hooks_the_inner_module(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        model = DistributedDataParallel(SmallSegNet(3, width=4))
        assert default_layers(model) == default_layers(model.module)
        with FeatureTap(model) as tap:
            model(torch.randn(2, 3, 16, 16))
            assert len(tap.features) == 4
        assert all(not m._forward_hooks for m in model.modules())
    finally:
        dist.destroy_process_group()


def test_local_pod_on_tapped_features_of_a_copied_student_is_zero():
    torch.manual_seed(0)
    teacher = SmallSegNet(3, width=4).eval()
    student = SmallSegNet(3, width=4).eval()
    student.load_state_dict(teacher.state_dict())
    x = torch.randn(2, 3, 32, 32)
    with FeatureTap(teacher) as teacher_tap, FeatureTap(student) as student_tap:
        with torch.no_grad():
            teacher(x)
        student(x)
        assert losses.local_pod(student_tap.features, teacher_tap.features).item() == 0.0
        student(x + 0.5)
        assert losses.local_pod(student_tap.features, teacher_tap.features).item() > 0
