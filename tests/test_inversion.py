import math

import pytest
import torch

from hrhf.config import InversionConfig
from hrhf.data import make_source
from hrhf.data.incremental import StepDataset
from hrhf.data.transforms import normalize
from hrhf.pixels import denormalize, pixel_bounds
from hrhf.inversion import (
    ImageAdam,
    NonFiniteError,
    SegInversion,
    SyntheticSet,
    aggregation_loss,
    channel_moments,
    make_targets,
    top_k_mean,
)
from hrhf.methods import METHODS
from hrhf.models import build_model
from hrhf.tasks import label_lut, make_task_from_steps
from hrhf.train import StepPlan, fit


@pytest.fixture(scope="module")
def teacher():
    """A small network trained for a few seconds on shapes of classes 1-3."""
    torch.manual_seed(0)
    task = make_task_from_steps("shapes", [[1, 2, 3]], overlap=True)
    source = make_source("shapes", "train", image_size=48, size=800, seed=5)
    keep = [i for i, labels in enumerate(source.all_labels_present()) if labels & {1, 2, 3}]
    data = StepDataset(source, keep, label_lut(task, 0, "train"), None)
    model = build_model("small", 4, width=16)
    plan = StepPlan(step=0, method=METHODS["ft"], n_old=0, epochs=20, lr=0.05, batch_size=16, weight_decay=0.0, seed=0)
    return fit(model, None, data, None, plan).eval()


def _cfg(**kw):
    base = dict(iterations=60, batch_size=24, jitter=2)
    base.update(kw)
    return InversionConfig(**base)


def test_saa_loss_is_smallest_at_the_true_area():
    # class 1 fills exactly the top 25% of an 8x8 map with near-certainty, background the rest
    logits = torch.full((1, 3, 8, 8), -10.0)
    logits[0, 1, :2] = 10.0
    logits[0, 0, 2:] = 10.0
    losses = {r: float(aggregation_loss(logits, torch.tensor([1]), torch.tensor([r]), "saa")) for r in (0.1, 0.25, 0.5)}
    assert losses[0.25] < 1e-3
    assert losses[0.5] > 1 and losses[0.1] > 1
    # GAP wants the class everywhere, GMP at one pixel only
    assert float(aggregation_loss(logits, torch.tensor([1]), torch.tensor([0.1]), "gap")) > 5
    assert float(aggregation_loss(logits, torch.tensor([1]), torch.tensor([0.1]), "gmp")) < 1e-3


def test_top_k_mean_matches_a_sort_with_ties_and_gradients():
    torch.manual_seed(0)
    values = torch.randn(6, 50).round(decimals=1)  # rounding makes ties at the thresholds
    k = torch.tensor([0, 1, 7, 7, 25, 50])
    leaf = values.clone().requires_grad_(True)
    got = top_k_mean(leaf, k)
    ranked = values.sort(dim=1, descending=True).values
    expected = torch.stack([ranked[i, :n].mean() if n else torch.tensor(0.0) for i, n in enumerate(k.tolist())])
    assert torch.allclose(got, expected, atol=1e-6)
    # without ties, the gradient is the sort's: 1/k on each of the k largest entries
    distinct = torch.randn(6, 50, requires_grad=True)
    top_k_mean(distinct, k).sum().backward()
    reference = distinct.detach().clone().requires_grad_(True)
    ranked = reference.sort(dim=1, descending=True).values
    rank = torch.arange(50)
    ((ranked * (rank < k[:, None])).sum(1) / k.clamp(min=1)).sum().backward()
    assert torch.allclose(distinct.grad, reference.grad)


def test_channel_moments_match_autograd_through_var():
    torch.manual_seed(0)
    x = torch.randn(4, 5, 6, 7, dtype=torch.float64, requires_grad=True)
    weights = torch.randn(2, 5, dtype=torch.float64)
    mean, var = channel_moments(x)
    (weights[0] @ mean + weights[1] @ var).backward()
    ours = x.grad.clone()
    x.grad = None
    ref_mean, ref_var = x.mean(dim=(0, 2, 3)), x.var(dim=(0, 2, 3), unbiased=False)
    (weights[0] @ ref_mean + weights[1] @ ref_var).backward()
    assert torch.allclose(mean, ref_mean) and torch.allclose(var, ref_var)
    assert torch.allclose(ours, x.grad)


def test_targets_mix_classes_and_scales():
    targets = make_targets([1, 2, 3], [0.1, 0.5], 2, base_seed=7)
    assert len(targets) == 12 and len({t.seed for t in targets}) == 12
    assert {t.class_index for t in targets[:3]} == {1, 2, 3}
    assert {(t.class_index, t.scale) for t in targets} == {(c, r) for c in (1, 2, 3) for r in (0.1, 0.5)}


def test_bn_prior_decreases(teacher):
    targets = make_targets([1, 2, 3], [0.2], 4, base_seed=0)

    def prior_after(iterations: int) -> float:
        with SegInversion(teacher, _cfg(iterations=iterations, w_bn=1.0), image_size=48) as inverter:
            images = inverter.invert(targets).images
            return float(inverter.bn_prior(normalize(images))[1])

    start, end = prior_after(0), prior_after(60)  # iterations=0 returns the initial noise
    assert end < 0.7 * start


def test_inversion_output_and_determinism(teacher):
    targets = make_targets([1, 2], [0.1, 0.4], 2, base_seed=3)
    bn_layers = [m for m in teacher.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    with SegInversion(teacher, _cfg(iterations=10), image_size=48) as inverter:
        assert bn_layers and all(m._forward_hooks for m in bn_layers)
        first = inverter.invert(targets)
        second = inverter.invert(targets)
    assert first.images.shape == (8, 3, 48, 48) and first.images.dtype == torch.uint8
    assert first.masks.shape == (8, 48, 48)
    assert torch.equal(first.images, second.images) and torch.equal(first.masks, second.masks)
    meta = first.meta[0]
    assert set(meta) == {"class", "scale", "seed", "loss", "area", "retried"}
    assert 0.0 <= meta["area"] <= 1.0 and math.isfinite(meta["loss"])
    # the hooks are removed on exit: no module of the teacher keeps one
    assert not [m for m in teacher.modules() if m._forward_hooks or m._forward_pre_hooks]


def test_saa_area_rises_with_ratio(teacher):
    small, large = 0.1, 0.6
    targets = make_targets([1, 2, 3], [small, large], 4, base_seed=1)
    with SegInversion(teacher, _cfg(iterations=60), image_size=48) as inverter:
        result = inverter.invert(targets)
    area = {r: sum(m["area"] for m in result.meta if m["scale"] == r) / 12 for r in (small, large)}
    # a small teacher trained for seconds; benchmarks/quality.py --ablation measures area against r in full
    assert area[large] > area[small] + 0.03
    # and the teacher labels the target class, not some other one, on most images
    hits = sum(m["area"] > 0.01 for m in result.meta)
    assert hits >= 0.75 * len(result.meta)


def test_starting_noise_has_the_configured_spread(teacher):
    targets = make_targets([1], [0.2], 3, base_seed=3)
    low, high = pixel_bounds()
    noise = torch.stack([torch.randn(3, 48, 48, generator=torch.Generator().manual_seed(t.seed)) for t in targets])
    for std in (1.0, 0.1):
        # one update at a negligible learning rate: the stored images are the starting point, quantised
        cfg = _cfg(iterations=1, lr=1e-12, init_std=std, jitter=0, flip=False, retry_below=0)
        with SegInversion(teacher, cfg, 48) as inverter:
            images = inverter.invert_batch(targets).images
        start = denormalize((noise * std).clamp(low, high))
        assert (images.int() - start.int()).abs().max() <= 1, std


def _set_with_areas(targets, areas, fill):
    """A SyntheticSet of constant images ``fill`` whose metadata gives each target the area asked."""
    n = len(targets)
    meta = [{"class": t.class_index, "scale": t.scale, "seed": t.seed, "loss": 0.0, "area": a, "retried": False}
            for t, a in zip(targets, areas)]
    return SyntheticSet(torch.full((n, 3, 4, 4), fill, dtype=torch.uint8), torch.full((n, 4, 4), fill, dtype=torch.uint8), meta)


def test_only_weak_images_are_retried_without_jitter_from_quieter_noise(teacher, monkeypatch):
    targets = make_targets([1, 2, 3], [0.2], 1, base_seed=3)
    calls = []

    def optimise(self, batch, cfg):
        calls.append((list(batch), cfg))
        if len(calls) == 1:  # target 0 under 0.25 * 0.2, target 1 just above, target 2 under
            return _set_with_areas(batch, [0.01, 0.06, 0.02], fill=1)
        return _set_with_areas(batch, [0.18, 0.005], fill=2)  # the retry helps target 0, not target 2

    monkeypatch.setattr(SegInversion, "_optimise", optimise)
    with SegInversion(teacher, _cfg(jitter=4, init_std=1.0, retry_below=0.25, retry_init_std=0.1), 48) as inverter:
        result = inverter.invert_batch(targets)
    assert [t for t in calls[1][0]] == [targets[0], targets[2]]
    assert calls[0][1].jitter == 4 and calls[0][1].init_std == 1.0
    assert calls[1][1].jitter == 0 and calls[1][1].init_std == 0.1
    assert [m["area"] for m in result.meta] == [0.18, 0.06, 0.02]
    assert [m["retried"] for m in result.meta] == [True, False, True]
    assert result.images[:, 0, 0, 0].tolist() == [2, 1, 1] and result.masks[:, 0, 0].tolist() == [2, 1, 1]

    calls.clear()
    with SegInversion(teacher, _cfg(retry_below=0), 48) as inverter:
        inverter.invert_batch(targets)
    assert len(calls) == 1


def test_a_retry_keeps_the_larger_object_of_the_two_tries(teacher):
    targets = make_targets([1, 2], [0.1, 0.4], 1, base_seed=5)
    with SegInversion(teacher, _cfg(iterations=20, retry_below=0), 48) as inverter:
        once = inverter.invert_batch(targets)
    # retry_below far above 1: every image is tried a second time
    with SegInversion(teacher, _cfg(iterations=20, retry_below=100.0), 48) as inverter:
        twice = inverter.invert_batch(targets)
    assert all(m["retried"] for m in twice.meta) and not any(m["retried"] for m in once.meta)
    assert all(b["area"] >= a["area"] for a, b in zip(once.meta, twice.meta))
    kept_first = [i for i, (a, b) in enumerate(zip(once.meta, twice.meta)) if a["area"] == b["area"]]
    for i in kept_first:
        assert torch.equal(once.images[i], twice.images[i])


def test_teacher_without_batchnorm_is_rejected():
    with pytest.raises(ValueError, match="BatchNorm"):
        SegInversion(torch.nn.Conv2d(3, 2, 1), _cfg(), image_size=8)


def test_bf16_autocast_inverts_with_finite_losses(teacher):
    targets = make_targets([1, 2], [0.2], 1, base_seed=3)
    with SegInversion(teacher, _cfg(iterations=3, bf16=True), image_size=48) as inverter:
        synthetic = inverter.invert(targets)
    assert synthetic.images.shape == (2, 3, 48, 48)
    assert all(math.isfinite(m["loss"]) for m in synthetic.meta)


def test_image_adam_follows_torch_adam():
    torch.manual_seed(0)
    target = torch.randn(2, 3, 5, 5)
    ours, theirs = (torch.randn(2, 3, 5, 5, generator=torch.Generator().manual_seed(1)).requires_grad_(True) for _ in range(2))
    adam = ImageAdam(ours, betas=(0.5, 0.9))
    reference = torch.optim.Adam([theirs], lr=0.1, betas=(0.5, 0.9), foreach=False)
    for step in range(20):
        lr = 0.1 * (1 + step) / 20
        for group in reference.param_groups:
            group["lr"] = lr
        for x in (ours, theirs):
            x.grad = None
            ((x - target) ** 4).sum().backward()
        adam.step(lr)
        reference.step()
    assert torch.allclose(ours, theirs, atol=1e-6)
    assert not torch.allclose(ours, torch.randn(2, 3, 5, 5, generator=torch.Generator().manual_seed(1)))


class NaNLogitsForRow(torch.nn.Module):
    """A teacher whose logits, and their gradients, are NaN for one position of the batch."""

    def __init__(self, inner: torch.nn.Module, row: int) -> None:
        super().__init__()
        self.inner, self.row = inner, row

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.inner(x)
        poisoned = torch.zeros(logits.shape[0], 1, 1, 1, dtype=torch.bool)
        poisoned[self.row] = True
        return logits + torch.where(poisoned, float("nan"), 0.0)  # unlike masked_fill, lets NaN flow back to the image


def test_nan_loss_names_the_first_bad_target_and_iteration():
    torch.manual_seed(0)
    teacher = NaNLogitsForRow(build_model("small", 4, width=4).eval(), row=1)
    targets = make_targets([1, 2, 3], [0.1], 1, base_seed=4)
    # 30 iterations, looked at on the 25th: NaN has spread to the whole batch by then, and the first
    # iteration is still the one reported
    with SegInversion(teacher, _cfg(iterations=30), image_size=32) as inverter:
        with pytest.raises(NonFiniteError) as err:
            inverter.invert(targets)
    message = str(err.value)
    bad = targets[1]
    assert f"iteration 1/30 for class {bad.class_index} scale 0.1 seed {bad.seed} " in message
    assert str(targets[0].seed) not in message and str(targets[2].seed) not in message


def test_nan_images_are_refused_before_quantisation():
    torch.manual_seed(0)
    teacher = build_model("small", 4, width=4).eval()
    targets = make_targets([1, 2], [0.4], 1, base_seed=2)
    # A NaN learning rate makes every pixel NaN in the one update, after the only loss was computed:
    # only the check of the final images stands between that and uint8 images.
    with SegInversion(teacher, _cfg(iterations=1, lr=float("nan")), image_size=32) as inverter:
        with pytest.raises(NonFiniteError, match="non-finite pixels after iteration 1/1") as err:
            inverter.invert(targets)
    for t in targets:
        assert f"class {t.class_index} scale 0.4 seed {t.seed}" in str(err.value)
