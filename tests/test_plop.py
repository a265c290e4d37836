import copy
import dataclasses
import importlib.util
import json
import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

import hrhf.train as train_module
from conftest import ROOT
from conftest import free_port as _free_port
from hrhf import losses
from hrhf.config import load_config
from hrhf.data import make_source
from hrhf.data.incremental import StepDataset
from hrhf.data.transforms import train_transform
from hrhf.features import FeatureTap, default_layers
from hrhf.methods import METHODS, PlopInputs, step_loss
from hrhf.models import SmallSegNet, build_model, widen_classifier
from hrhf.tasks import label_lut, make_task_from_steps
from hrhf.train import (
    collate_items,
    fit,
    make_optimizer,
    mixed_batches,
    plan_step,
    plop_thresholds,
    real_batches,
    run_epochs,
    train_steps,
)


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


def test_local_pod_embedding_uneven_windows_match_their_slices():
    # 7 x 9 maps at scales 1-3: windows differ by a pixel; each profile is the mean of its own slice.
    torch.manual_seed(0)
    x = torch.randn(2, 3, 7, 9, dtype=torch.float64)
    expected = []
    for s in (1, 2, 3):
        rows = [(0, 7)] if s == 1 else [(0, 4), (4, 7)] if s == 2 else [(0, 3), (3, 5), (5, 7)]
        cols = [(0, 9)] if s == 1 else [(0, 5), (5, 9)] if s == 2 else [(0, 3), (3, 6), (6, 9)]
        for r0, r1 in rows:
            for c0, c1 in cols:
                window = x[:, :, r0:r1, c0:c1]
                expected += [window.mean(dim=3).flatten(1), window.mean(dim=2).flatten(1)]
    embedding = losses.local_pod_embedding(x, scales=(1, 2, 3))
    assert torch.allclose(embedding, torch.cat(expected, dim=1), rtol=0, atol=1e-12)
    normalized = losses.local_pod_embedding(x, scales=(1, 2, 3), normalize=True)
    unit = torch.cat([torch.nn.functional.normalize(p, dim=1) for p in expected], dim=1)
    assert torch.allclose(normalized, unit, rtol=0, atol=1e-12)


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


# PLOP as a method of the step loss


def _tiny_step_inputs():
    """n_old = 2 (channels bg, 1, 2) and 2 new classes; one tapped map per model."""
    generator = torch.Generator().manual_seed(5)
    student = torch.randn(2, 5, 8, 8, generator=generator, requires_grad=True)
    teacher = torch.randn(2, 3, 8, 8, generator=generator) * 3
    labels = torch.randint(0, 5, (2, 8, 8), generator=generator)
    labels[labels.eq(1) | labels.eq(2)] = 0  # old classes are unlabelled on an incremental step
    labels[0, 0, :3] = 255
    inputs = PlopInputs(
        thresholds=torch.tensor([0.6, 0.5, 0.7]),
        student_features=[torch.randn(2, 4, 8, 8, generator=generator)],
        teacher_features=[torch.randn(2, 4, 8, 8, generator=generator)],
    )
    return student, teacher, labels, inputs


def test_step_loss_with_plop_equals_hand_built_sum_of_its_terms():
    student, teacher, labels, inputs = _tiny_step_inputs()
    method = dataclasses.replace(METHODS["plop"], w_pod=0.5)
    total, parts = step_loss(method, 2, student, labels, teacher_real=teacher, plop=inputs)

    targets, image_weights = losses.plop_pseudo_labels(teacher, labels, 2, inputs.thresholds)
    assert 0 < float(image_weights.min()) and float(image_weights.max()) < 1
    labelled = targets != 255
    log_probs = torch.log_softmax(student, dim=1)
    picked = -log_probs.gather(1, targets.clamp_max(4).unsqueeze(1)).squeeze(1)
    ce = (picked * image_weights.view(2, 1, 1))[labelled].sum() / labelled.sum()
    folded = torch.cat([student[:, :1] + student[:, 3:].sum(1, keepdim=True), student[:, 1:3]], dim=1)
    pod = losses.local_pod(
        [inputs.student_features[0], folded], [inputs.teacher_features[0], teacher], scales=(1, 2, 4),
        layer_weights=losses.plop_layer_weights(2, num_outputs=5, num_new=2),
    )
    assert set(parts) == {"ce_real", "pod"}
    assert parts["ce_real"] == pytest.approx(float(ce.detach()), rel=1e-6)
    assert parts["pod"] == pytest.approx(float(pod.detach()), rel=1e-6) and parts["pod"] > 0
    torch.testing.assert_close(total, ce + 0.5 * pod)
    total.backward()
    assert bool(student.grad[:, 3:].abs().sum() > 0)  # new channels get gradient through CE and the folded logits


def test_mib_loss_is_unchanged_by_plop_inputs():
    student, teacher, labels, inputs = _tiny_step_inputs()
    expected = losses.unbiased_cross_entropy(student, labels, 2) + 10.0 * losses.unbiased_knowledge_distillation(
        student, teacher, 1.0
    )
    for plop in (None, inputs):
        total, parts = step_loss(METHODS["mib"], 2, student, labels, teacher_real=teacher, plop=plop)
        assert torch.equal(total, expected)
        assert set(parts) == {"ce_real", "kd_real"}


def test_train_steps_of_mib_sets_no_taps_and_gives_the_hand_built_loss(monkeypatch):
    real, teacher, student, plan = _step_setup("mib")
    images, labels = collate_items([real[i] for i in range(4)])
    reference = copy.deepcopy(student).train()
    with torch.no_grad():
        expected, _ = step_loss(plan.method, plan.n_old, reference(images), labels, teacher_real=teacher(images))

    def no_tap(*args, **kwargs):
        raise AssertionError("mib must not tap feature maps")

    monkeypatch.setattr(train_module, "FeatureTap", no_tap)
    optimizer = make_optimizer(student, plan.lr, plan.weight_decay, plan.head_lr_mult)
    _, stats = train_steps(student, teacher, [(images, labels, None, None)], optimizer, lambda _: plan.lr, 0, plan)
    assert set(stats) == {"ce_real", "kd_real", "loss", "grad_norm"}
    assert stats["loss"] == float(expected)


def _step_setup(method: str, epochs: int = 1, size: int = 40):
    """Step 1 of a 3+2 shapes protocol: a random width-4 teacher, its widened (MiB-initialised) copy as student."""
    task = make_task_from_steps("shapes", [[1, 2, 3], [4, 5]], overlap=True)
    source = make_source("shapes", "train", image_size=32, size=size, seed=0)
    real = StepDataset(source, range(len(source)), label_lut(task, 1, "train"), train_transform(32))
    torch.manual_seed(0)
    teacher = build_model("small", 4, width=4).requires_grad_(False)
    # BatchNorm statistics of the data: without them an untrained net's logits are nearly uniform everywhere
    for module in teacher.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.momentum = None
    with torch.no_grad():
        teacher(torch.stack([real[i][0] for i in range(len(real))]))
    teacher.eval()
    student = widen_classifier(copy.deepcopy(teacher).requires_grad_(True), 2, "mib")
    cfg = load_config("smoke", method=method, overrides=["train.batch_size=8", f"train.epochs_step={epochs}"])
    return real, teacher, student, plan_step(cfg, 1, n_old=3, incremental=True)


def test_fit_with_plop_trains_on_pseudo_labels_and_local_pod(monkeypatch):
    torch.set_num_threads(1)
    real, teacher, student, plan = _step_setup("plop")
    assert plan.method.ce == "plop" and plan.method.pod and not plan.method.fake and plan.method.init == "mib"
    given = []

    def spy(*args, plop=None, **kwargs):
        given.append(plop)
        return step_loss(*args, plop=plop, **kwargs)

    monkeypatch.setattr(train_module, "step_loss", spy)
    history = []
    fit(student, teacher, real, None, plan, on_epoch=lambda epoch, it, stats: history.append((it, stats)))
    assert len(given) == 5 and given[0].thresholds.shape == (4,)
    channels = [f.shape[1] for f in given[0].student_features]
    assert channels == [f.shape[1] for f in given[0].teacher_features] == [4, 8, 16, 16]  # the default layers
    (iteration, stats), = history
    assert iteration == 5
    assert set(stats) == {"ce_real", "pod", "loss", "grad_norm"}
    assert stats["ce_real"] > 0 and stats["pod"] > 0
    assert stats["loss"] == pytest.approx(stats["ce_real"] + plan.method.w_pod * stats["pod"], rel=1e-5)
    assert all(not m._forward_hooks for m in [*student.modules(), *teacher.modules()])


def test_thresholds_are_recomputed_from_epoch_zero_on_resume(monkeypatch):
    real, teacher, student, plan = _step_setup("plop", epochs=2, size=44)  # 44 images: epochs drop different ones
    seen = []

    def record(student, teacher, batches, optimizer, lr_at, it, plan, device, thresholds):
        seen.append(thresholds)
        return it + 5, {"loss": 0.0}

    monkeypatch.setattr(train_module, "train_steps", record)
    optimizer = make_optimizer(student, plan.lr, plan.weight_decay)

    def batches_of_epoch(epoch):
        return mixed_batches(real_batches(real, plan, epoch), None, plan, epoch, 5)

    run_epochs(student, teacher, plan, batches_of_epoch, 5, optimizer)
    run_epochs(student, teacher, plan, batches_of_epoch, 5, optimizer, start_epoch=1)
    assert len(seen) == 3 and seen[0] is not None
    assert torch.equal(seen[0], seen[1]) and torch.equal(seen[0], seen[2])
    from_epoch_one = plop_thresholds(teacher, batches_of_epoch(1), 3, plan.method.plop_quantile)
    assert not torch.equal(seen[0], from_epoch_one)

    # a single-pass stream read by the threshold pass leaves epoch 0 empty: that must not pass silently
    monkeypatch.setattr(train_module, "train_steps", lambda *args: (args[5], {}))
    stream = batches_of_epoch(0)
    with pytest.raises(RuntimeError, match="fresh iterable"):
        run_epochs(student, teacher, plan, lambda epoch: stream, 5, optimizer)


def _threshold_worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        real, teacher, _, plan = _step_setup("plop")
        batches = real_batches(real, plan, 0, rank=rank, world=2)
        thresholds = plop_thresholds(teacher, batches, 3, plan.method.plop_quantile)
        alone = losses.histogram_quantiles(
            losses.entropy_histogram(((teacher(x), y) for x, y in real_batches(real, plan, 0, rank=rank, world=2)), 3),
            plan.method.plop_quantile,
        )
        torch.save({"thresholds": thresholds, "alone": alone}, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_thresholds_of_two_gloo_workers_equal_one_process_on_all_batches(tmp_path):
    torch.set_num_threads(1)
    mp.start_processes(_threshold_worker, args=(_free_port(), str(tmp_path)), nprocs=2, start_method="spawn")
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    real, teacher, _, plan = _step_setup("plop")
    single = plop_thresholds(teacher, real_batches(real, plan, 0), 3, plan.method.plop_quantile)
    assert torch.equal(ranks[0]["thresholds"], ranks[1]["thresholds"])
    # the workers run the teacher on half batches: float rounding may move a pixel by one histogram bin
    torch.testing.assert_close(ranks[0]["thresholds"], single, rtol=0, atol=1e-3)
    assert not torch.allclose(ranks[0]["alone"], single, rtol=0, atol=1e-3)  # each half alone differs


def test_plop_method_preset_and_config_validation():
    cfg = load_config("smoke", method="plop")
    assert (cfg.method.name, cfg.method.ce, cfg.method.kd_real, cfg.method.pod) == ("plop", "plop", "none", True)
    assert cfg.method.pod_scales == [1, 2, 4] and cfg.method.plop_quantile == 0.5
    assert load_config("smoke", overrides=["method.ce=plop", "method.pod=true"]).method.ce == "plop"
    for override, message in [
        ("method.plop_quantile=1.5", r"method\.plop_quantile must be in \[0, 1\]"),
        ("method.pod_scales=[]", r"method\.pod_scales must be"),
        ("method.pod_scales=[1, 0]", r"method\.pod_scales must be"),
        ("method.w_pod=-1", r"method\.w_pod must be"),
        ("method.ce=plopp", "is not one of"),
    ]:
        with pytest.raises(ValueError, match=message):
            load_config("smoke", method="plop", overrides=[override])


@pytest.mark.slow
def test_plop_on_one_ray_worker_gives_the_in_process_result():
    """The worker's threshold pass reads its own share of epoch 0, as the in-process pass reads the whole epoch."""
    spec = importlib.util.spec_from_file_location("parity", ROOT / "benchmarks" / "parity.py")
    parity = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(parity)
    figures = {}
    with tempfile.TemporaryDirectory() as directory:
        out = os.path.join(directory, "parity.json")
        assert parity.main(["--preset", "smoke", "--method", "plop", "--workers", "1", "--json", out]) == 0
        with open(out) as f:
            figures = json.load(f)
    assert set(figures["per_step"]) == {"in_process", "ray_1"}
    for ours, theirs in zip(figures["per_step"]["in_process"], figures["per_step"]["ray_1"], strict=True):
        assert abs(ours - theirs) < 0.005
