import json
import os

import pytest
import s3fs
import torch

from conftest import storage_options
from hrhf.inversion import SyntheticSet, make_targets
from hrhf.shards import SCHEMA, ShardStore, from_table, make_shards, to_table


def fake_set(seeds, size=16):
    g = torch.Generator().manual_seed(seeds[0])
    n = len(seeds)
    images = torch.randint(0, 256, (n, 3, size, size), generator=g, dtype=torch.uint8)
    masks = torch.randint(0, 11, (n, size, size), generator=g, dtype=torch.uint8)
    meta = [{"class": 1 + i % 3, "scale": 0.25, "seed": s, "loss": 0.5, "area": 0.125} for i, s in enumerate(seeds)]
    return SyntheticSet(images, masks, meta)


def assert_same(a, b):
    assert torch.equal(a.images, b.images) and torch.equal(a.masks, b.masks)
    assert a.meta == b.meta


def test_table_roundtrip_is_lossless():
    synthetic = fake_set([7, 8, 9])
    table = to_table(synthetic, "abc123", 2, "step2-00000")
    assert table.schema == SCHEMA and table.num_rows == 3
    assert set(table.column("model_id").to_pylist()) == {"abc123"}
    assert table.column("step").to_pylist() == [2, 2, 2]
    back = from_table(table)
    assert back.images.dtype == torch.uint8 and back.masks.dtype == torch.uint8
    assert_same(back, synthetic)  # the metadata values chosen are exact in float32


def test_make_shards_covers_every_target_once():
    targets = make_targets([1, 2, 3], [0.1, 0.4], 3, base_seed=5)
    shards = make_shards(targets, 5, step=1)
    assert [s for s, _ in shards] == [f"step1-{i:05d}" for i in range(4)]
    assert [t for _, part in shards for t in part] == targets
    assert [len(part) for _, part in shards] == [4, 5, 4, 5]
    assert make_shards(targets, 5, step=1) == shards
    sizes = [len(t) for _, t in make_shards(make_targets([1, 2, 3, 4, 5, 6], [0.1, 0.2, 0.4, 0.6, 0.8], 4, base_seed=0), 32, step=1)]
    assert sizes == [30, 30, 30, 30]
    assert make_shards([], 5, step=1) == []
    with pytest.raises(ValueError):
        make_shards(targets, 0, step=1)


def test_local_write_and_read(tmp_path):
    store = ShardStore(str(tmp_path / "synth"))
    store.check_access()
    a, b = fake_set([1, 2]), fake_set([3, 4, 5])
    store.write_shard("step1-00001", to_table(b, "m", 1, "step1-00001"))
    store.write_shard("step1-00000", to_table(a, "m", 1, "step1-00000"))
    assert store.done() == {"step1-00000", "step1-00001"}
    entry = store.manifest()["step1-00001"]
    assert entry["rows"] == 3 and entry["seeds"] == [3, 4, 5] and entry["model_id"] == "m"
    assert entry["bytes"] == os.path.getsize(tmp_path / "synth" / "shards" / "step1-00001.parquet")
    assert_same(store.read_all(), SyntheticSet.concat([a, b]))
    assert_same(store.read_all(["step1-00001"]), b)
    assert store.parquet_paths() == [store.data_path("step1-00000"), store.data_path("step1-00001")]
    with pytest.raises(FileNotFoundError, match="step1-00002"):
        store.read_shard("step1-00002")


def test_failed_data_write_leaves_no_marker_and_no_partial_file(tmp_path, monkeypatch):
    store = ShardStore(str(tmp_path))

    def crash(src, dst):
        raise OSError("disk died")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="disk died"):
        store.write_shard("step1-00000", to_table(fake_set([1, 2]), "m", 1, "step1-00000"))
    monkeypatch.undo()
    assert store.done() == set()
    assert not (tmp_path / "_done").exists() or not list((tmp_path / "_done").iterdir())
    assert list((tmp_path / "shards").iterdir()) == []


def test_checksum_mismatch_is_detected(tmp_path):
    store = ShardStore(str(tmp_path))
    store.write_shard("step1-00000", to_table(fake_set([1, 2]), "m", 1, "step1-00000"))
    # Replace the data behind the marker's back with another valid Parquet file.
    other = ShardStore(str(tmp_path / "other"))
    other.write_shard("step1-00000", to_table(fake_set([3, 4]), "m", 1, "step1-00000"))
    os.replace(other.data_path("step1-00000"), store.data_path("step1-00000"))
    with pytest.raises(ValueError, match="step1-00000"):
        store.read_shard("step1-00000")


def test_check_access_on_unwritable_dir(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(OSError, match=str(blocker)):
        ShardStore(str(blocker / "synth")).check_access()


@pytest.fixture(scope="module")
def s3(s3_endpoint):
    options = storage_options(s3_endpoint)
    s3fs.S3FileSystem(**options).mkdir("hrhf-test")
    return options


def test_s3_write_read_and_idempotent_overwrite(s3):
    store = ShardStore("s3://hrhf-test/run1/synth", s3)
    store.check_access()
    a, b = fake_set([1, 2]), fake_set([3, 4])
    store.write_shard("step1-00000", to_table(a, "m", 1, "step1-00000"))
    store.write_shard("step1-00001", to_table(b, "m", 1, "step1-00001"))
    assert store.done() == {"step1-00000", "step1-00001"}
    assert_same(store.read_all(), SyntheticSet.concat([a, b]))
    store.write_shard("step1-00001", to_table(b, "m", 1, "step1-00001"))  # a retry of the same shard
    fs = s3fs.S3FileSystem(**s3)
    fs.invalidate_cache()
    assert sorted(fs.ls("hrhf-test/run1/synth/shards")) == [
        "hrhf-test/run1/synth/shards/step1-00000.parquet",
        "hrhf-test/run1/synth/shards/step1-00001.parquet",
    ]
    assert len(fs.ls("hrhf-test/run1/synth/_done")) == 2
    assert json.loads(fs.cat_file("hrhf-test/run1/synth/_done/step1-00001.json"))["seeds"] == [3, 4]
    assert_same(store.read_all(), SyntheticSet.concat([a, b]))


def test_s3_missing_bucket_is_reported(s3):
    with pytest.raises(OSError, match="s3://no-such-bucket/synth"):
        ShardStore("s3://no-such-bucket/synth", s3).check_access()


def test_s3_reader_sees_shards_written_after_its_listing(s3):
    # separate file-system instances, as in separate processes (fsspec shares one per set of options)
    writer = ShardStore("s3://hrhf-test/late", {**s3, "skip_instance_cache": True})
    reader = ShardStore("s3://hrhf-test/late", s3)
    writer.write_shard("step1-00000", to_table(fake_set([5, 6]), "m", 1, "step1-00000"))
    assert reader.done() == {"step1-00000"}  # lists, and caches, the markers folder
    writer.write_shard("step2-00000", to_table(fake_set([7, 8]), "m", 2, "step2-00000"))
    assert [m["seed"] for m in reader.read_all(["step2-00000"]).meta] == [7, 8]
