"""The Ray data plane: evaluation on Ray Data actors equals the local one; the driver reads no synthetic shard."""

import threading
from pathlib import Path

import pytest
import ray
import torch
from ray.util.placement_group import placement_group, remove_placement_group

from conftest import make_bucket, storage_options
from hrhf.config import load_config
from hrhf.data import make_source
from hrhf.data.incremental import StepDataset
from hrhf.data.transforms import eval_transform, train_transform
from hrhf.distributed.evaluation import RayEvaluator
from hrhf.distributed.synthesis import ObjectStoreSynthetic, RaySynthesizer
from hrhf.distributed.training import FakeRows, RayTrainer, RealStream, StreamedFake, real_schedule
from hrhf.inversion import SyntheticParts, SyntheticSet
from hrhf.models import build_model
from hrhf.pipeline import LocalEvaluator, evaluate_step, run
from hrhf.shards import ShardStore, StoredSynthetic, to_table
from hrhf.tasks import label_lut, make_task
from hrhf.train import SeededItems, iters_per_epoch, plan_step, real_batches

VOC_MINI = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "voc_mini"


@pytest.fixture(scope="module", autouse=True)
def ray_cluster():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def test_ray_evaluation_equals_local_evaluation_on_shapes():
    cfg = load_config("smoke", overrides=["train.batch_size=8", "model.width=4"])
    task = make_task("shapes", "6-2-2", overlap=True)
    source = make_source("shapes", "val", image_size=32, size=30, seed=1)
    val = StepDataset(source, range(len(source)), label_lut(task, 1, "eval"), eval_transform(None))
    torch.manual_seed(0)
    model = build_model("small", 9, width=4)
    model.eval()  # random BatchNorm statistics would make every pixel one class
    local = evaluate_step(cfg, model, val, 9)
    distributed = RayEvaluator(num_actors=2, cpus_per_actor=1.0).evaluate(cfg, model, val, 9)
    assert torch.equal(distributed, local)
    assert int(local.sum()) == sum(int((val[i][1] != 255).sum()) for i in range(len(val)))


def test_ray_presence_counts_equal_the_local_ones_on_augmented_training_images():
    """Coverage-aware synthesis counts, per class, the step's training images the old model sees it in."""
    cfg = load_config("smoke", overrides=["train.batch_size=8", "model.width=4"])
    task = make_task("shapes", "6-2-2", overlap=True)
    source = make_source("shapes", "train", image_size=32, size=30, seed=1)
    real = SeededItems(StepDataset(source, range(len(source)), label_lut(task, 1, "train"), train_transform(32)), 3)
    torch.manual_seed(0)
    model = build_model("small", 7, width=4)
    model.eval()
    local = LocalEvaluator().images_showing(cfg, model, real, 7, 0.01)
    distributed = RayEvaluator(num_actors=2, cpus_per_actor=1.0).images_showing(cfg, model, real, 7, 0.01)
    assert torch.equal(distributed, local)
    assert local.shape == (7,) and local.max() <= len(real) and local.sum() >= len(real)  # each image shows a class


@pytest.mark.skipif(not VOC_MINI.exists(), reason="the VOC sample is not beside the repository")
def test_ray_evaluation_equals_local_evaluation_on_voc_images_of_mixed_sizes():
    cfg = load_config("smoke", overrides=["data.dataset=voc", "data.protocol=15-5", "model.width=4",
                                         f"data.root={VOC_MINI}"])
    task = make_task("voc", "15-5", overlap=True)
    source = make_source("voc", "val", root=str(VOC_MINI / "VOCdevkit" / "VOC2012"))
    val = StepDataset(source, range(6), label_lut(task, 0, "eval"), eval_transform(None))
    torch.manual_seed(0)
    model = build_model("small", 16, width=4)
    local = evaluate_step(cfg, model, val, 16)
    distributed = RayEvaluator(num_actors=2, cpus_per_actor=1.0).evaluate(cfg, model, val, 16)
    assert torch.equal(distributed, local)
    assert int(local.sum()) == sum(int((val[i][1] != 255).sum()) for i in range(len(val)))


def test_a_run_on_s3_leaves_the_shards_to_the_workers(s3_endpoint, monkeypatch):
    make_bucket(s3_endpoint, "hrhf-plane")
    run_dir = "s3://hrhf-plane/run"
    cfg = load_config("smoke")
    read_rows = []

    def refuse(*_args, **_kwargs):
        raise AssertionError("the driver read a whole synthetic shard")

    original = ShardStore.read_rows

    def count_rows(self, shard_id, rows):
        read_rows.append(len(rows))
        return original(self, shard_id, rows)

    for name in ("read_shard", "read_all", "read_step"):
        monkeypatch.setattr(ShardStore, name, refuse)
    monkeypatch.setattr(ShardStore, "read_rows", count_rows)
    options = storage_options(s3_endpoint)
    synthesizer = RaySynthesizer(cfg, num_actors=1, store_uri=f"{run_dir}/synthetic", storage_options=options,
                                 shard_size=4, log=lambda _m: None)
    report = run(cfg, run_dir=run_dir, synthesizer=synthesizer,
                 trainer=RayTrainer(num_workers=2, cpus_per_worker=0.5, log=lambda _m: None),
                 evaluator=RayEvaluator(num_actors=1), log=lambda _m: None, last_step=1)
    cells = [len(cfg.inversion.scales) * len(step["seen_classes"][: -len(step["new_classes"])])
             for step in report["steps"][1:]]
    assert [s["num_fake"] for s in report["steps"][1:]] == [c * cfg.inversion.images_per_scale for c in cells]
    assert sum(read_rows) == sum(cells)  # one image per (class, scale) for the galleries, nothing more


def test_kept_images_on_ray_reuse_the_earlier_steps_shards_on_resume(tmp_path):
    cfg = load_config("smoke", method="hrhf", overrides=["inversion.keep_images=true"])
    run_dir, messages = str(tmp_path / "run"), []

    def workers() -> dict:
        synthesizer = RaySynthesizer(cfg, num_actors=1, store_uri=f"{run_dir}/synthetic", shard_size=8,
                                     log=messages.append)
        return {"synthesizer": synthesizer, "trainer": RayTrainer(num_workers=2, cpus_per_worker=0.5, log=lambda _m: None),
                "evaluator": RayEvaluator(num_actors=1)}

    run(cfg, run_dir=run_dir, log=lambda _m: None, last_step=1, **workers())
    store = ShardStore(f"{run_dir}/synthetic")
    step_one = {s: Path(store.data_path(s)).stat().st_mtime_ns for s in store.step_shards(1)}
    messages.clear()
    report = run(cfg, run_dir=run_dir, log=lambda _m: None, **workers())
    per_class = len(cfg.inversion.scales) * cfg.inversion.images_per_scale
    # step 2 replays step 1's images of the six base classes and its own of the two classes step 1 learnt
    assert [s["num_fake"] for s in report["steps"]] == [0, 6 * per_class, 8 * per_class]
    assert any(f"{len(step_one)}/{len(step_one)} shards found" in m for m in messages), messages
    assert {s: Path(store.data_path(s)).stat().st_mtime_ns for s in store.step_shards(1)} == step_one
    assert (tmp_path / "run" / "gallery-step-2.png").exists()


def _two_steps_of_shards(store: ShardStore) -> None:
    """Three shards of four random images: two of step 1, one of step 2."""
    for shard, step in enumerate([1, 1, 2]):
        images = torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8)
        synthetic = SyntheticSet(images, torch.zeros(4, 8, 8, dtype=torch.uint8),
                                 [{"class": step, "scale": 0.5, "seed": 4 * shard + i, "loss": 0.0, "area": 0.5}
                                  for i in range(4)])
        store.write_shard(f"s{shard}", to_table(synthetic, "m", step, f"s{shard}"))
    store.write_step_manifest(1, ["s0", "s1"])
    store.write_step_manifest(2, ["s2"])


@pytest.mark.parametrize("sink", ["parquet", "object store", "in memory"])
def test_kept_rows_of_several_steps_stream_one_step_after_another(tmp_path, sink):
    store = ShardStore(str(tmp_path / "shards"))
    _two_steps_of_shards(store)
    steps = [store.read_all(store.step_shards(step)) for step in (1, 2)]
    if sink == "parquet":
        parts = [StoredSynthetic(store, step) for step in (1, 2)]
    elif sink == "object store":
        parts = [ObjectStoreSynthetic([({"meta": store.read_meta(s)}, ray.put(store.read_shard(s)))
                                       for s in store.step_shards(step)]) for step in (1, 2)]
    else:
        parts = steps
    kept = SyntheticParts([SyntheticParts(parts[:1]), parts[1]])  # nested, as a later step joins its images
    rows = FakeRows.of(kept)
    assert len(kept) == rows.count == 12 and [m["class"] for m in kept.meta] == [1] * 8 + [2] * 4
    assert torch.equal(StreamedFake(rows).take(range(12)), torch.cat([s.images for s in steps]))
    assert [m["class"] for m in kept.gallery_sample().meta][-1] == 2  # every step's images reach the gallery


def test_rows_of_different_storage_are_refused(tmp_path):
    store = ShardStore(str(tmp_path / "shards"))
    _two_steps_of_shards(store)
    with pytest.raises(TypeError, match="different kinds of storage"):
        FakeRows.of(SyntheticParts([StoredSynthetic(store, 1), store.read_all(store.step_shards(2))]))


@pytest.mark.parametrize("sink", ["parquet", "object store", "in memory"])
def test_synthetic_rows_stream_in_order_while_train_workers_hold_every_cpu(tmp_path, sink):
    """The train workers may reserve every CPU of the cluster; the fake set must still stream to them, in order."""
    store = ShardStore(str(tmp_path / "shards"))
    ids = []
    for shard in range(3):
        images = torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8)
        synthetic = SyntheticSet(images, torch.zeros(4, 8, 8, dtype=torch.uint8),
                                 [{"class": 1, "scale": 0.5, "seed": 4 * shard + i, "loss": 0.0, "area": 0.5}
                                  for i in range(4)])
        ids.append(f"s{shard}")
        store.write_shard(ids[-1], to_table(synthetic, "m", 1, ids[-1]))
    store.write_step_manifest(1, ids)
    expected = store.read_all(ids)
    if sink == "parquet":
        rows = FakeRows.of(StoredSynthetic(store, 1))
    elif sink == "object store":  # one Arrow table per shard, as ObjectStoreSynthetic holds them
        rows = FakeRows(len(expected), table_refs=[ray.put(store.read_shard(shard_id)) for shard_id in ids])
    else:
        rows = FakeRows.of(expected)

    every_cpu = placement_group([{"CPU": 2}])  # what two train workers of one CPU hold on this cluster
    ray.get(every_cpu.ready())
    taken: list[torch.Tensor] = []
    stream = StreamedFake(rows)

    def read() -> None:
        for position in range(0, 2 * len(expected), 4):  # two passes over the set
            taken.append(stream.take(range(position, position + 4)))

    reader = threading.Thread(target=read, daemon=True)
    try:
        reader.start()
        reader.join(timeout=60)
        finished = not reader.is_alive()
    finally:
        remove_placement_group(every_cpu)  # lets a stuck read end
        reader.join(timeout=60)
    assert finished, "the synthetic rows did not stream while the train workers held every CPU"
    assert len(stream) == len(expected) == 12
    assert torch.equal(torch.cat(taken), torch.cat([expected.images, expected.images]))  # the set end to end, twice


def test_worker_real_stream_with_loader_processes_equals_the_local_batches():
    """A train worker's real batches (references through Ray Data, decoded by loader processes) are the local ones."""
    cfg = load_config("smoke", overrides=["train.batch_size=6", "train.epochs_step=2"])
    task = make_task("shapes", "6-2-2", overlap=True)
    source = make_source("shapes", "train", image_size=32, size=20, seed=1)
    real = StepDataset(source, range(len(source)), label_lut(task, 1, "train"), train_transform(32))
    plan = plan_step(cfg, 1, n_old=6, incremental=True)
    world = 2
    for rank, table in enumerate(real_schedule(len(real), plan, world)):
        stream = RealStream(ray.data.from_arrow(table).iterator(), real, plan.seed, loader_workers=2)
        for epoch in range(plan.epochs):
            local = list(real_batches(real, plan, epoch, num_workers=0, rank=rank, world=world))
            streamed = list(stream.epoch(epoch))
            assert len(streamed) == len(local) == iters_per_epoch(len(real), plan.batch_size)
            for (images, labels), (local_images, local_labels) in zip(streamed, local):
                assert torch.equal(images, local_images) and torch.equal(labels, local_labels)
