import json

import pytest
import torch

from hrhf.config import load_config
from hrhf.methods import METHODS
from hrhf.pipeline import WEAK_HIT_RATIO, LocalSynthesizer, run


def quiet(_msg: str) -> None:
    pass


@pytest.mark.parametrize("method", sorted(METHODS))
def test_smoke_run_of_every_method(method, tmp_path):
    cfg = load_config("smoke", method=method)
    messages = []
    report = run(cfg, run_dir=str(tmp_path / "run"), log=messages.append)
    steps = report["steps"]
    assert [s["step"] for s in steps] == [0, 1, 2]
    for s in steps:
        m = s["metrics"]
        assert 0.0 <= m["all"] <= 1.0 and len(m["per_class"]) == len(s["seen_classes"]) + 1
    assert len(steps[-1]["seen_classes"]) == 10
    fakes = [s["num_fake"] for s in steps]
    if method == "hrhf":
        scales, per_scale = cfg.inversion.scales, cfg.inversion.images_per_scale
        assert fakes == [0, 6 * len(scales) * per_scale, 8 * len(scales) * per_scale]
        for s in steps[1:]:  # a warning where, and only where, the report shows a barely made class
            warned = [m for m in messages if m.startswith(f"[step {s['step']}]") and "barely replayed" in m]
            assert len(warned) == (s["synthesis"]["weakest_hit_ratio"] < WEAK_HIT_RATIO), (warned, s["synthesis"])
    else:
        assert fakes == [0, 0, 0]
    saved = json.loads((tmp_path / "run" / "report.json").read_text())
    assert saved["steps"] == steps
    assert (tmp_path / "run" / "report.md").read_text().count("\n| ") >= 3
    assert sorted(p.name for p in (tmp_path / "run").glob("step-*.pt")) == ["step-0.pt", "step-1.pt", "step-2.pt"]


class Forbidden:
    """A synthesizer / trainer that fails the test if the pipeline calls it."""

    def synthesize(self, *args):
        raise AssertionError("synthesis was redone")

    def train(self, *args):
        raise AssertionError("training was redone")


def test_rerun_resumes_without_recomputing(tmp_path):
    cfg = load_config("smoke", method="hrhf")
    first = run(cfg, run_dir=str(tmp_path), log=quiet)
    messages = []
    second = run(cfg, run_dir=str(tmp_path), synthesizer=Forbidden(), trainer=Forbidden(), log=messages.append)
    assert second["steps"] == first["steps"]
    assert sum("not recomputed" in m for m in messages) == 3


def test_partial_run_continues_from_last_checkpoint(tmp_path):
    # HRHF synthesises in every incremental step; with kept images a resume would also redo step 1's (tested below)
    cfg = load_config("smoke", method="hrhf", overrides=["inversion.keep_images=false"])
    calls = []

    class RecordingSynth(LocalSynthesizer):
        def synthesize(self, teacher, targets, step):
            calls.append(step)
            return super().synthesize(teacher, targets, step)

    run(cfg, run_dir=str(tmp_path), synthesizer=RecordingSynth(cfg, quiet), log=quiet, last_step=1)
    assert calls == [1]
    calls.clear()
    report = run(cfg, run_dir=str(tmp_path), synthesizer=RecordingSynth(cfg, quiet), log=quiet)
    assert [s["step"] for s in report["steps"]] == [0, 1, 2]
    assert calls == [2]  # steps 0 and 1 come from their checkpoints; only the new step 2 synthesises
    assert report["steps"][2]["num_fake"] > 0


def test_kept_images_invert_each_class_once_and_a_resumed_run_inverts_them_again(tmp_path):
    cfg = load_config("smoke", method="hrhf", overrides=["inversion.keep_images=true"])
    inverted = []

    class RecordingSynth(LocalSynthesizer):
        def synthesize(self, teacher, targets, step):
            inverted.append((step, sorted({t.class_index for t in targets})))
            result = super().synthesize(teacher, targets, step)
            sets.append(result)
            return result

    sets = []
    straight = run(cfg, synthesizer=RecordingSynth(cfg, quiet), log=quiet)
    assert inverted == [(1, [1, 2, 3, 4, 5, 6]), (2, [7, 8])]  # step 2 inverts only the classes step 1 learnt
    per_class = len(cfg.inversion.scales) * cfg.inversion.images_per_scale
    assert [s["num_fake"] for s in straight["steps"]] == [0, 6 * per_class, 8 * per_class]
    inverted.clear()
    run(cfg, run_dir=str(tmp_path), synthesizer=RecordingSynth(cfg, quiet), log=quiet, last_step=1)
    resumed = run(cfg, run_dir=str(tmp_path), synthesizer=RecordingSynth(cfg, quiet), log=quiet)
    # step 1's images are inverted again from the step-0 checkpoint, then step 2's own
    assert inverted == [(1, [1, 2, 3, 4, 5, 6]), (1, [1, 2, 3, 4, 5, 6]), (2, [7, 8])]
    assert torch.equal(sets[-2].images, sets[0].images)
    assert resumed["steps"][2]["metrics"] == straight["steps"][2]["metrics"]


def test_run_dir_with_another_config_is_refused(tmp_path):
    run(load_config("smoke", method="ft"), run_dir=str(tmp_path), log=quiet, last_step=0)
    before = (tmp_path / "config.yaml").read_text()
    other = load_config("smoke", method="ft", overrides=["train.epochs_step=2"])
    with pytest.raises(ValueError, match="another run's config.*train.epochs_step"):
        run(other, run_dir=str(tmp_path), log=quiet)
    assert (tmp_path / "config.yaml").read_text() == before


def test_init_checkpoint_with_other_classes_is_refused(tmp_path):
    base = load_config("smoke", method="ft")
    run(base, run_dir=str(tmp_path / "base"), log=quiet, last_step=0)
    ckpt = str(tmp_path / "base" / "step-0.pt")
    reordered = load_config("smoke", method="ft", overrides=[f"train.init_checkpoint={ckpt}", "data.order_seed=3"])
    with pytest.raises(ValueError, match="checkpoint classes"):
        run(reordered, log=quiet)
    same = load_config("smoke", method="mib", overrides=[f"train.init_checkpoint={ckpt}"])
    assert len(run(same, log=quiet)["steps"]) == 3
