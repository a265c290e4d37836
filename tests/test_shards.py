import hashlib
import json
import os
import stat

import pyarrow.parquet as pq
import pytest
import s3fs
import torch

from conftest import storage_options
from hrhf.inversion import NonFiniteError, SyntheticSet, make_targets
from hrhf.shards import NO_MARKER, SCHEMA, ShardStore, from_table, make_shards, to_table
from hrhf.storage import write_bytes_atomic


def fake_set(seeds, size=16):
    g = torch.Generator().manual_seed(seeds[0])
    n = len(seeds)
    images = torch.randint(0, 256, (n, 3, size, size), generator=g, dtype=torch.uint8)
    masks = torch.randint(0, 11, (n, size, size), generator=g, dtype=torch.uint8)
    meta = [{"class": 1 + i % 3, "scale": 0.25, "seed": s, "loss": 0.5, "area": 0.125, "retried": i == 1}
            for i, s in enumerate(seeds)]
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


def test_shards_written_before_the_retried_column_still_read():
    synthetic = fake_set([7, 8])
    table = to_table(synthetic, "abc123", 2, "step2-00000").drop_columns(["retried"])
    back = from_table(table)
    assert [m["retried"] for m in back.meta] == [False, False]
    assert torch.equal(back.images, synthetic.images)


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


def write(store, shard_id, seeds, model="m", step=1):
    store.write_shard(shard_id, to_table(fake_set(seeds), model, step, shard_id))


def test_empty_garbled_and_incomplete_markers_count_as_absent(tmp_path):
    store = ShardStore(str(tmp_path))
    write(store, "step1-00000", [1, 2])
    for shard_id in ("step1-00001", "step1-00002", "step1-00003"):
        write(store, shard_id, [3, 4])
    (tmp_path / "_done" / "step1-00001.json").write_bytes(b"")
    (tmp_path / "_done" / "step1-00002.json").write_bytes(b'{"shard_id": "step1-00002", "rows": 2, "se')
    (tmp_path / "_done" / "step1-00003.json").write_text(json.dumps({"shard_id": "step1-00003", "rows": 2}))
    assert set(store.manifest()) == {"step1-00000"}
    assert store.done() == {"step1-00000"}
    for shard_id in ("step1-00001", "step1-00002", "step1-00003"):
        assert store.verify(shard_id, [3, 4], "m") == "commit marker empty, garbled or incomplete"
        with pytest.raises(FileNotFoundError, match=shard_id):
            store.read_shard(shard_id)
    assert store.verify("step1-00009", [3, 4], "m") == NO_MARKER


def test_verify_names_what_is_wrong_with_a_shard(tmp_path):
    store = ShardStore(str(tmp_path))
    shard = "step1-00000"
    write(store, shard, [1, 2, 3])
    data_path = tmp_path / "shards" / f"{shard}.parquet"
    marker_path = tmp_path / "_done" / f"{shard}.json"
    good_data, good_marker = data_path.read_bytes(), json.loads(marker_path.read_text())
    assert store.verify(shard, [1, 2, 3], "m") is None
    assert "another teacher" in store.verify(shard, [1, 2, 3], "other")
    assert "other targets" in store.verify(shard, [1, 2, 4], "m")

    data_path.write_bytes(good_data[: len(good_data) // 2])  # truncated by a crash
    half = len(good_data) // 2
    assert store.verify(shard, [1, 2, 3], "m") == f"data is {half} bytes, its marker says {len(good_data)}"
    damaged = bytearray(good_data)
    damaged[len(damaged) // 2] ^= 0xFF
    data_path.write_bytes(bytes(damaged))
    assert store.verify(shard, [1, 2, 3], "m") == "data does not match the checksum in its marker"
    data_path.unlink()
    assert store.verify(shard, [1, 2, 3], "m") == "data file missing"

    def with_data(data, **marker_changes):
        data_path.write_bytes(data)
        marker = {**good_marker, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        marker_path.write_text(json.dumps({**marker, **marker_changes}))
        return store.verify(shard, marker_changes.get("seeds", [1, 2, 3]), "m")

    assert with_data(b"PAR1 not really parquet PAR1").startswith("unreadable Parquet")
    # a sound Parquet file whose rows are not the seeds its marker lists
    other = ShardStore(str(tmp_path / "other"))
    write(other, shard, [7, 8, 9])
    other_data = (tmp_path / "other" / "shards" / f"{shard}.parquet").read_bytes()
    assert with_data(other_data) == "seed column differs from its marker"
    assert with_data(good_data) is None


def test_local_write_syncs_the_file_then_the_directory(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append("fsync dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "fsync file")
        real_fsync(fd)

    def replace(src, dst):
        events.append("replace")
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    write_bytes_atomic(str(tmp_path / "a" / "file.bin"), b"payload")
    assert events == ["fsync file", "replace", "fsync dir"]
    assert (tmp_path / "a" / "file.bin").read_bytes() == b"payload"
    events.clear()
    write(ShardStore(str(tmp_path / "synth")), "step1-00000", [1, 2])  # data, then marker
    assert events == ["fsync file", "replace", "fsync dir"] * 2


def test_step_manifest_leaves_out_shards_of_an_earlier_shard_size(tmp_path):
    store = ShardStore(str(tmp_path))
    seeds = list(range(100, 112))
    for i in range(3):  # shards of 4
        write(store, f"step2-{i:05d}", seeds[4 * i : 4 * i + 4], step=2)
    store.write_step_manifest(2, ["step2-00000", "step2-00001", "step2-00002"])
    assert [m["seed"] for m in store.read_step(2).meta] == seeds
    for i in range(2):  # the same step again in shards of 6, over the same names
        write(store, f"step2-{i:05d}", seeds[6 * i : 6 * i + 6], step=2)
    with pytest.raises(ValueError, match="step2-00000 .* has changed since step 2's manifest"):
        store.read_step(2)
    store.write_step_manifest(2, ["step2-00000", "step2-00001"])
    assert store.done() == {"step2-00000", "step2-00001", "step2-00002"}  # the stale shard stays on disk
    assert [m["seed"] for m in store.read_step(2).meta] == seeds
    paths = store.parquet_paths(step=2)
    assert paths == [store.data_path("step2-00000"), store.data_path("step2-00001")]
    assert pq.read_table(paths).column("seed").to_pylist() == seeds
    assert len(store.parquet_paths()) == 3  # all finished shards: what a step's reader must not use
    saved = json.loads((tmp_path / "manifests" / "step-2.json").read_text())
    assert [e["rows"] for e in saved["shards"]] == [6, 6]
    assert saved["shards"][0]["sha256"] == store.manifest()["step2-00000"]["sha256"]
    with pytest.raises(FileNotFoundError, match="step 3"):
        store.parquet_paths(step=3)


def test_non_finite_float_images_are_not_written(tmp_path):
    synthetic = fake_set([5, 6, 7])
    synthetic.images = synthetic.images.float()
    synthetic.images[1, 0, 2, 3] = float("nan")
    with pytest.raises(NonFiniteError, match=r"seeds \[6\]"):
        to_table(synthetic, "m", 1, "step1-00000")
    synthetic.images[1, 0, 2, 3] = 0.0
    with pytest.raises(TypeError, match="uint8"):
        to_table(synthetic, "m", 1, "step1-00000")


def test_gallery_rows_pick_the_first_image_of_each_class_and_scale_shard_by_shard():
    from hrhf.shards import gallery_rows

    shard_meta = [
        [{"class": 1, "scale": 0.1}, {"class": 2, "scale": 0.1}, {"class": 1, "scale": 0.1}],
        [{"class": 1, "scale": 0.4}, {"class": 2, "scale": 0.1}],
        [{"class": 2, "scale": 0.4}],
    ]
    assert gallery_rows(shard_meta) == [(0, [0, 1]), (1, [0]), (2, [0])]
    assert gallery_rows([]) == []
