import json
import os
from pathlib import Path

import pytest
import ray
import s3fs
import torch

from conftest import storage_options
from hrhf.config import Config, InversionConfig
from hrhf.distributed.synthesis import FAULT_DIR_ENV, RaySynthesizer, model_id
from hrhf.inversion import NonFiniteError, make_targets
from hrhf.models import build_model
from hrhf.shards import ShardStore, make_shards


@pytest.fixture(scope="module")
def faults(tmp_path_factory):
    """A Ray instance whose workers read fault-injection files from the returned directory."""
    directory = tmp_path_factory.mktemp("faults")
    os.environ[FAULT_DIR_ENV] = str(directory)  # workers inherit the environment of ray.init
    ray.init(address="local", num_cpus=2, include_dashboard=False)  # its own instance, not another test's cluster
    yield directory
    ray.shutdown()
    del os.environ[FAULT_DIR_ENV]


@pytest.fixture(scope="module")
def cfg():
    cfg = Config()
    cfg.model.width = 4
    cfg.data.image_size = 32
    cfg.inversion = InversionConfig(iterations=3, batch_size=8, scales=[0.1, 0.4])
    return cfg


@pytest.fixture(scope="module")
def teacher():
    torch.manual_seed(0)
    return build_model("small", 4, width=4).eval()


def targets():
    return make_targets([1, 2, 3], [0.1, 0.4], 2, base_seed=1)  # 12 targets, 3 shards of 4


def seeds(synthetic):
    return [m["seed"] for m in synthetic.meta]


def shard_files(root):
    return sorted(p.name for p in (root / "shards").iterdir())


def test_object_store_sink(faults, cfg, teacher):
    lines = []
    synth = RaySynthesizer(cfg, num_actors=2, cpus_per_actor=1.0, shard_size=4, log=lines.append)
    result = synth.synthesize(teacher, targets(), step=1)
    assert seeds(result) == [t.seed for t in targets()]
    assert result.read_all().images.shape == (12, 3, 32, 32) and result.read_all().masks.shape == (12, 32, 32)
    assert [m["class"] for m in result.meta] == [t.class_index for t in targets()]
    assert any("synthesis shards 3/3 images=12" in line for line in lines)


def test_parquet_sink_resumes_without_recomputing(faults, cfg, teacher, tmp_path):
    lines = []
    synth = RaySynthesizer(cfg, store_uri=str(tmp_path), shard_size=4, log=lines.append, max_retries=0)
    first = synth.synthesize(teacher, targets(), step=2)
    ids = ["step2-00000", "step2-00001", "step2-00002"]
    store = ShardStore(str(tmp_path))
    assert store.done() == set(ids)
    assert shard_files(tmp_path) == [f"{s}.parquet" for s in ids]
    assert {e["model_id"] for e in store.manifest().values()} == {model_id(teacher)}
    assert seeds(first) == [t.seed for t in targets()]

    # Resubmitted runs: any actor that starts an armed shard exits, and max_retries=0 fails the run.
    def resubmit(armed):
        for s in armed:
            (faults / s).write_text("9")
        lines.clear()
        try:
            return synth.synthesize(teacher, targets(), step=2)
        finally:
            for s in armed:
                (faults / s).unlink()

    os.remove(store.marker_path("step2-00001"))  # as if the run died between data and marker
    kept = {s: os.stat(store.data_path(s)).st_mtime_ns for s in (ids[0], ids[2])}
    second = resubmit(kept)
    assert any("2/3 shards found" in line for line in lines)
    assert any("synthesis shards 3/3 images=4" in line for line in lines)
    assert {s: os.stat(store.data_path(s)).st_mtime_ns for s in kept} == kept
    assert store.done() == set(ids)
    assert torch.equal(second.read_all().images, first.read_all().images) and torch.equal(second.read_all().masks, first.read_all().masks)

    third = resubmit(ids)
    assert any("3/3 shards found" in line for line in lines)
    assert not any("synthesis shards" in line for line in lines)
    assert torch.equal(third.read_all().images, first.read_all().images) and seeds(third) == seeds(first)


def test_dead_actors_are_retried(faults, cfg, teacher, tmp_path):
    # Three exits: Ray retries the shard on the restarted actor twice, then hrhf on a new actor.
    (faults / "step3-00002").write_text("3")
    lines = []
    synth = RaySynthesizer(cfg, store_uri=str(tmp_path), shard_size=4, log=lines.append)
    result = synth.synthesize(teacher, targets(), step=3)
    assert seeds(result) == [t.seed for t in targets()]
    assert (faults / "step3-00002").read_text() == "0"
    assert any("step3-00002 lost its actor" in line for line in lines)
    assert ShardStore(str(tmp_path)).done() == {"step3-00000", "step3-00001", "step3-00002"}
    assert shard_files(tmp_path) == ["step3-00000.parquet", "step3-00001.parquet", "step3-00002.parquet"]


@pytest.fixture(scope="module")
def s3(s3_endpoint):
    options = storage_options(s3_endpoint)
    s3fs.S3FileSystem(**options).mkdir("hrhf-synth")
    return options


def test_s3_sink(faults, cfg, teacher, s3):
    synth = RaySynthesizer(cfg, store_uri="s3://hrhf-synth/run/synthetic", storage_options=s3, shard_size=4,
                           log=lambda _: None)
    result = synth.synthesize(teacher, targets(), step=5)
    assert seeds(result) == [t.seed for t in targets()]
    store = ShardStore("s3://hrhf-synth/run/synthetic", s3)
    assert store.done() == {"step5-00000", "step5-00001", "step5-00002"}
    assert torch.equal(store.read_all().images, result.read_all().images)
    ds = ray.data.read_parquet(store.parquet_paths(), filesystem=store.arrow_filesystem())
    assert sorted(row["seed"] for row in ds.select_columns(["seed"]).take_all()) == sorted(seeds(result))


def test_unreachable_store_fails_before_any_work(cfg, s3):
    with pytest.raises(OSError, match="s3://missing-bucket/x"):
        RaySynthesizer(cfg, store_uri="s3://missing-bucket/x", storage_options=s3)


def test_teacher_that_actors_cannot_rebuild_fails_at_once(faults, cfg, teacher):
    wrong = build_model("small", 4, width=8)  # the config says width 4
    lines = []
    with pytest.raises(RuntimeError, match="step6-00000") as err:
        RaySynthesizer(cfg, shard_size=12, log=lines.append).synthesize(wrong, targets(), step=6)
    assert "size mismatch" in str(err.value)
    assert not any("lost its actor" in line for line in lines)  # no retries: a new actor would fail the same way


def test_damaged_and_stale_shards_are_recomputed(faults, cfg, teacher, tmp_path):
    lines = []
    synth = RaySynthesizer(cfg, store_uri=str(tmp_path), shard_size=4, log=lines.append)
    first = synth.synthesize(teacher, targets(), step=7)
    store = ShardStore(str(tmp_path))
    truncated, other_seeds, intact = "step7-00000", "step7-00001", "step7-00002"
    data = (tmp_path / "shards" / f"{truncated}.parquet").read_bytes()
    (tmp_path / "shards" / f"{truncated}.parquet").write_bytes(data[: len(data) - 100])
    marker = json.loads((tmp_path / "_done" / f"{other_seeds}.json").read_text())
    (tmp_path / "_done" / f"{other_seeds}.json").write_text(json.dumps({**marker, "seeds": [1, 2, 3, 4]}))
    kept = os.stat(store.data_path(intact)).st_mtime_ns

    lines.clear()
    second = synth.synthesize(teacher, targets(), step=7)
    warnings = [line for line in lines if "warning:" in line]
    assert len(warnings) == 2
    assert f"shard {truncated}" in warnings[0] and "bytes, its marker says" in warnings[0]
    assert f"shard {other_seeds}" in warnings[1] and "other targets" in warnings[1]
    assert any("1/3 shards found" in line for line in lines)
    assert any("synthesis shards 3/3 images=8" in line for line in lines)  # the two bad shards, redone
    assert os.stat(store.data_path(intact)).st_mtime_ns == kept
    assert seeds(second) == [t.seed for t in targets()]
    assert torch.equal(second.read_all().images, first.read_all().images) and torch.equal(second.read_all().masks, first.read_all().masks)
    for shard_id, part in make_shards(targets(), 4, step=7):
        assert store.verify(shard_id, [t.seed for t in part], model_id(teacher)) is None


def test_shard_size_change_reads_only_the_new_shards(faults, cfg, teacher, tmp_path):
    expected = [t.seed for t in targets()]
    RaySynthesizer(cfg, store_uri=str(tmp_path), shard_size=4, log=lambda _: None).synthesize(teacher, targets(), step=8)
    result = RaySynthesizer(cfg, store_uri=str(tmp_path), shard_size=6, log=lambda _: None).synthesize(
        teacher, targets(), step=8
    )
    store = ShardStore(str(tmp_path))
    assert store.done() == {"step8-00000", "step8-00001", "step8-00002"}  # the last shard of size 4 is stale
    assert seeds(result) == expected
    assert seeds(store.read_step(8)) == expected
    ds = ray.data.read_parquet(store.parquet_paths(step=8), filesystem=store.arrow_filesystem())
    assert sorted(row["seed"] for row in ds.select_columns(["seed"]).take_all()) == sorted(expected)


def test_nan_in_inversion_fails_the_step_and_writes_nothing(faults, cfg, teacher, tmp_path):
    broken = build_model("small", 4, width=4).eval()
    broken.load_state_dict(teacher.state_dict())
    with torch.no_grad():
        next(broken.parameters()).fill_(float("nan"))  # NaN logits everywhere
    lines = []
    synth = RaySynthesizer(cfg, store_uri=str(tmp_path), shard_size=12, log=lines.append)
    synth.synthesize(teacher, targets(), step=9)  # a finished step, then redone with the broken teacher

    def files():
        return {p.relative_to(tmp_path): p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file()}

    before = files()
    assert Path("manifests/step-9.json") in before
    lines.clear()
    first = targets()[0]
    with pytest.raises(NonFiniteError) as err:
        synth.synthesize(broken, targets(), step=9)
    assert str(err.value).startswith(
        "[step 9] synthesis of shard step9-00000 failed: inversion loss became non-finite at iteration 1/3 "
        f"for class {first.class_index} scale 0.1 seed {first.seed}"
    )
    assert not any("lost its actor" in line for line in lines)  # deterministic: not retried
    # No shard or marker written; the step's manifest is withdrawn, as its shards were to be redone.
    assert files() == {p: t for p, t in before.items() if p.name != "step-9.json"}
