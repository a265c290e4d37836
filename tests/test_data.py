import hashlib
import shutil
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import tv_tensors

from hrhf.config import load_config
from hrhf.data import ADE20K, ShapesDataset, StepDataset, VOCSegmentation, build_step_datasets, make_source
from hrhf.data.transforms import (
    MEAN,
    STD,
    denormalize,
    eval_transform,
    normalize,
    pixel_bounds,
    reference_train_transform,
    train_transform,
)
from hrhf.pipeline import sources_of
from hrhf.tasks import label_lut, make_task

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
VOC_ROOT = DATA / "voc_mini"
VOC = VOC_ROOT / "VOCdevkit" / "VOC2012"
ADE_ROOT = DATA / "ade_mini"
needs_voc = pytest.mark.skipif(not VOC.is_dir(), reason=f"shared VOC sample data not found at {VOC}")
needs_ade = pytest.mark.skipif(not ADE_ROOT.is_dir(), reason=f"shared ADE20K sample data not found at {ADE_ROOT}")


@pytest.fixture(scope="module")
def shapes200():
    ds = ShapesDataset("train", size=200, image_size=64, seed=0)
    return ds, [ds.render(i) for i in range(len(ds))]


# ---------------------------------------------------------------- shapes


def test_shapes_item_format():
    ds = ShapesDataset("val", size=5, image_size=96, seed=1)
    img, mask = ds[3]
    assert img.dtype == torch.uint8 and img.shape == (3, 96, 96)
    assert mask.dtype == torch.uint8 and mask.shape == (96, 96)
    assert len(ds) == 5 and ds.item_id(3) == "shapes/val/3"
    assert ds.num_classes == 10 and len(ds.class_names) == 11 and ds.class_names[0] == "background"
    assert len(ds.palette) == 11 and len(set(ds.palette)) == 11
    assert int(mask.max()) <= 10
    assert ds.labels_present(3) == frozenset(np.unique(mask.numpy()).tolist()) - {0}
    with pytest.raises(IndexError):
        ds.load(5)
    with pytest.raises(ValueError, match="unknown split"):
        ShapesDataset("dev")


def test_shapes_deterministic_and_seeded():
    a, b = ShapesDataset(seed=0, size=4), ShapesDataset(seed=0, size=4)
    c = ShapesDataset(seed=1, size=4)
    v = ShapesDataset("val", seed=0, size=4)
    for i in range(4):
        assert torch.equal(a[i][0], b[i][0]) and torch.equal(a[i][1], b[i][1])
    assert any(not torch.equal(a[i][0], c[i][0]) for i in range(4))
    assert any(not torch.equal(a[i][1], v[i][1]) for i in range(4))
    # the memoised copy equals a fresh render, and callers cannot corrupt it
    img, _ = a[2]
    img.zero_()
    assert np.array_equal(a[2][0].permute(1, 2, 0).numpy(), a.render(2)[0])


def test_shapes_scans_its_labels_once_and_hands_out_copies(monkeypatch):
    ds = ShapesDataset(seed=0, size=6)
    first = ds.all_labels_present()
    first.clear()
    monkeypatch.setattr(ds, "render", lambda i: pytest.fail("labels were scanned again"))
    again = ds.all_labels_present()
    assert again == [ShapesDataset(seed=0, size=6).labels_present(i) for i in range(6)]


def test_shapes_class_statistics(shapes200):
    ds, samples = shapes200
    present = [frozenset(np.unique(m).tolist()) - {0} for _, m in samples]
    assert present == ds.all_labels_present()
    assert set().union(*present) == set(range(1, 11))
    counts = np.array([len(p) for p in present])
    assert counts.min() >= 1
    assert np.mean(counts == 1) > 0.45
    assert np.mean(counts <= 2) > 0.8
    assert np.mean(counts >= 3) < 0.2


def test_shapes_object_scales_vary(shapes200):
    _, samples = shapes200
    # area share of each class region in each image
    shares = [np.mean(m == c) for _, m in samples for c in np.unique(m) if c != 0]
    assert min(shares) < 0.01
    assert max(shares) > 0.4
    assert np.mean(np.array(shares) < 0.05) > 0.2 and np.mean(np.array(shares) > 0.15) > 0.1


def test_shapes_backgrounds_are_textured_and_differ(shapes200):
    _, samples = shapes200
    stds, means = [], []
    for img, mask in samples[:50]:
        bg = img[mask == 0].astype(np.float32)
        if len(bg) > 100:
            stds.append(bg.std(axis=0).mean())
            means.append(bg.mean(axis=0))
    assert np.median(stds) > 6.0
    assert np.std(np.array(means), axis=0).mean() > 10.0


def test_shapes_classes_differ_in_colour(shapes200):
    _, samples = shapes200
    mean_colour = {}
    for c in range(1, 11):
        pixels = np.concatenate([img[mask == c] for img, mask in samples])
        mean_colour[c] = pixels.astype(np.float32).mean(axis=0)
    dists = [np.abs(mean_colour[a] - mean_colour[b]).sum() for a in range(1, 11) for b in range(a + 1, 11)]
    assert min(dists) > 15


# images and masks of version 1 as generated before version 2 existed: old tables stay reproducible
SHAPES_V1_DIGESTS = [
    ("train", 64, 0, range(8), "f0f7389a03cefae6e8cd90d1c435a92db62c1f870df51eac45e135a54c9ae56d"),
    ("val", 48, 3, range(5), "598abc555efd69c00a1fc1ba7820cd797db1336f4ca609686d396cd4d55b1007"),
    ("test", 97, 7, [0, 11, 123], "ba6153b7e8fbc517b4b3228e79c4846d9f79b2f1adf454bb81ad957d938d3022"),
]


@pytest.mark.parametrize("version", [None, 1])
def test_shapes_version_1_is_unchanged(version):
    for split, side, seed, items, digest in SHAPES_V1_DIGESTS:
        ds = ShapesDataset(split, size=200, image_size=side, seed=seed, **({} if version is None else {"version": 1}))
        h = hashlib.sha256()
        for i in items:
            img, mask = ds.render(i)
            h.update(img.tobytes())
            h.update(mask.tobytes())
        assert h.hexdigest() == digest, (split, side, seed)
        assert ds.identity() == {"name": "shapes", "version": 1, "split": split, "seed": seed, "size": 200,
                                 "image_size": side}


def test_shapes_version_2_deterministic_and_distinct():
    a, b = ShapesDataset(size=6, version=2), ShapesDataset(size=6, version=2)
    other_seed, v1 = ShapesDataset(size=6, seed=1, version=2), ShapesDataset(size=6, version=1)
    for i in range(6):
        assert np.array_equal(a.render(i)[0], b.render(i)[0]) and np.array_equal(a.render(i)[1], b.render(i)[1])
    assert any(not np.array_equal(a.render(i)[1], other_seed.render(i)[1]) for i in range(6))
    assert any(not np.array_equal(a.render(i)[1], v1.render(i)[1]) for i in range(6))
    assert a.identity()["version"] == 2
    img, mask = a[0]
    assert img.dtype == torch.uint8 and img.shape == (3, 64, 64) and mask.shape == (64, 64)
    with pytest.raises(ValueError, match="known versions"):
        ShapesDataset(version=3)


def test_shapes_version_2_scene_structure():
    ds = ShapesDataset("train", size=1500, image_size=48, seed=0, version=2)
    masks = [ds.render(i)[1] for i in range(len(ds))]
    present = [frozenset(np.unique(m).tolist()) - {0} for m in masks]
    index = {name: k for k, name in enumerate(ds.class_names)}
    frequency = {c: np.mean([c in p for p in present]) for c in range(1, 11)}
    hub = index["cross"]
    # skewed frequencies: one hub in about 40% of the images, every other class far below it
    assert 0.3 < frequency[hub] < 0.5
    assert max(f for c, f in frequency.items() if c != hub) < 0.2
    assert min(frequency.values()) > 0.03

    def alone(c: int) -> float:
        return np.mean([p == {c} for p in present if c in p])

    def with_(c: int, other: int) -> float:
        return np.mean([other in p for p in present if c in p])

    # classes seen almost only alone, and never with an indoor or street class
    for name in ("disc", "triangle"):
        assert alone(index[name]) > 0.75
        assert all(with_(index[name], index[o]) == 0 for o in ("square", "ring", "diamond", "hexagon", "bar"))
    # the hub goes with most classes; an indoor group shares scenes
    assert sum(with_(hub, c) > 0.02 for c in range(1, 11) if c != hub) >= 6
    assert with_(index["hexagon"], index["square"]) > 0.2 and with_(index["bar"], index["square"]) > 0.2
    assert with_(index["ring"], index["square"]) < 0.05
    # foreground nearer VOC's 27% of pixels than version 1's 10%
    assert 0.2 < np.mean([np.mean(m > 0) for m in masks]) < 0.32


def test_shapes_version_reaches_the_sources():
    cfg = load_config(overrides=["data.shapes_version=1", "data.train_size=5", "data.val_size=3"])
    train, val = sources_of(cfg)
    assert train.identity()["version"] == 1 and val.identity()["version"] == 1
    assert len(train) == 5 and len(val) == 3
    assert sources_of(load_config())[0].identity()["version"] == 2
    with pytest.raises(ValueError, match="shapes_version"):
        load_config(overrides=["data.shapes_version=3"])


# ---------------------------------------------------------------- VOC


def _voc_ids(split):
    return (VOC / "ImageSets" / "Segmentation" / f"{split}.txt").read_text().split()


@needs_voc
@pytest.mark.parametrize("root", [str(VOC_ROOT), str(VOC), VOC_ROOT.as_uri()])
def test_voc_loader_reads_palette_indices(root):
    ds = VOCSegmentation(root, split="val")
    ids = _voc_ids("val")
    assert len(ds) == len(ids) and [ds.item_id(i) for i in range(len(ds))] == ids
    for i in (0, len(ds) - 1):
        img, mask = ds[i]
        png = Image.open(VOC / "SegmentationClass" / f"{ids[i]}.png")
        jpg = Image.open(VOC / "JPEGImages" / f"{ids[i]}.jpg")
        assert png.mode == "P"
        assert img.dtype == torch.uint8 and img.shape == (3, jpg.height, jpg.width)
        assert mask.dtype == torch.uint8 and mask.shape == (jpg.height, jpg.width)
        assert np.array_equal(mask.numpy(), np.array(png))
        values = set(np.unique(mask.numpy()).tolist())
        assert values <= set(range(21)) | {255} and values & set(range(1, 21))
    assert ds.num_classes == 20 and ds.class_names[15] == "person" and len(ds.class_names) == 21


@needs_voc
def test_voc_palette_matches_files():
    png = Image.open(VOC / "SegmentationClass" / f"{_voc_ids('train')[0]}.png")
    file_palette = np.array(png.getpalette()[: 3 * 21]).reshape(21, 3)
    assert [tuple(p) for p in file_palette.tolist()] == VOCSegmentation(str(VOC_ROOT)).palette


@needs_voc
def test_voc_labels_present_cover_all_classes():
    ds = VOCSegmentation(str(VOC_ROOT), split="train")
    present = ds.all_labels_present()
    assert set().union(*present) == set(range(1, 21))
    for i in (0, 5):
        expected = set(np.unique(np.array(Image.open(VOC / "SegmentationClass" / f"{ds.item_id(i)}.png"))).tolist())
        assert present[i] == frozenset(expected - {0, 255})


@needs_voc
def test_voc_identity_and_limit():
    full = make_source("voc", "train", root=str(VOC_ROOT))
    part = make_source("voc", "train", root=str(VOC_ROOT), size=3)
    assert len(part) == 3 and part.item_id(2) == full.item_id(2)
    assert full.identity() != part.identity()
    assert full.identity() == VOCSegmentation(str(VOC_ROOT), "train").identity()


def _mini_voc(tmp_path, n=3):
    """A VOC2012 folder in tmp_path with the first n val pairs."""
    base = tmp_path / "VOC2012"
    for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (base / sub).mkdir(parents=True)
    ids = _voc_ids("val")[:n]
    for i in ids:
        shutil.copy(VOC / "JPEGImages" / f"{i}.jpg", base / "JPEGImages")
        shutil.copy(VOC / "SegmentationClass" / f"{i}.png", base / "SegmentationClass")
    (base / "ImageSets" / "Segmentation" / "val.txt").write_text("\n".join(ids) + "\n")
    return base, ids


@needs_voc
def test_voc_errors_name_the_file(tmp_path):
    base, ids = _mini_voc(tmp_path)
    ds = VOCSegmentation(str(tmp_path), split="val")
    assert len(ds) == 3 and ds[0][1].shape[0] > 0

    (base / "JPEGImages" / f"{ids[0]}.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
    with pytest.raises(ValueError, match=rf"cannot decode .*{ids[0]}\.jpg"):
        ds.load(0)

    png = Image.open(VOC / "SegmentationClass" / f"{ids[1]}.png")
    png.resize((png.width // 2, png.height // 2), Image.NEAREST).save(base / "SegmentationClass" / f"{ids[1]}.png")
    with pytest.raises(ValueError, match=rf"{ids[1]}\.png is {png.width // 2}x{png.height // 2}.*{png.width}x{png.height}"):
        ds.load(1)

    bad = np.array(Image.open(VOC / "SegmentationClass" / f"{ids[2]}.png"))
    bad[:4, :4] = 42
    Image.fromarray(bad, mode="L").save(base / "SegmentationClass" / f"{ids[2]}.png")
    with pytest.raises(ValueError, match=rf"{ids[2]}\.png has label values \[42\]"):
        ds.load(2)
    with pytest.raises(ValueError, match=rf"{ids[2]}\.png"):
        ds.labels_present(2)

    (base / "SegmentationClass" / f"{ids[2]}.png").unlink()
    with pytest.raises(FileNotFoundError, match=rf"{ids[2]}\.png"):
        ds.load(2)


@needs_voc
def test_voc_missing_root_and_list(tmp_path):
    with pytest.raises(FileNotFoundError, match="VOCdevkit/VOC2012"):
        VOCSegmentation(str(tmp_path / "nowhere"))
    _mini_voc(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"ImageSets/Segmentation/train\.txt"):
        VOCSegmentation(str(tmp_path), split="train")
    with pytest.raises(FileNotFoundError, match=r"ImageSets/SegmentationAug/val\.txt"):
        VOCSegmentation(str(tmp_path), split="val", aug_list=True)


@needs_voc
def test_voc_aug_layout(tmp_path):
    base, ids = _mini_voc(tmp_path, n=2)
    (base / "SegmentationClassAug").mkdir()
    (base / "ImageSets" / "SegmentationAug").mkdir()
    for i in ids:
        grey = np.array(Image.open(VOC / "SegmentationClass" / f"{i}.png"))
        Image.fromarray(grey, mode="L").save(base / "SegmentationClassAug" / f"{i}.png")
    lines = [f"/JPEGImages/{i}.jpg /SegmentationClassAug/{i}.png" for i in ids]
    (base / "ImageSets" / "SegmentationAug" / "train.txt").write_text("\n".join(lines) + "\n")
    ds = VOCSegmentation(str(base), split="train", aug_list=True)
    assert [ds.item_id(i) for i in range(2)] == ids
    expected = np.array(Image.open(VOC / "SegmentationClass" / f"{ids[1]}.png"))
    assert np.array_equal(ds[1][1].numpy(), expected)


@pytest.fixture(scope="module")
def s3_voc():
    """A moto S3 server holding two VOC val pairs under s3://data/voc/VOC2012."""
    pytest.importorskip("s3fs")
    server_mod = pytest.importorskip("moto.server")
    boto3 = pytest.importorskip("boto3")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = server_mod.ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    creds = {"aws_access_key_id": "testing", "aws_secret_access_key": "testing", "region_name": "us-east-1"}
    client = boto3.client("s3", endpoint_url=endpoint, **creds)
    client.create_bucket(Bucket="data")
    ids = _voc_ids("val")[:2]
    prefix = "voc/VOC2012"
    client.put_object(Bucket="data", Key=f"{prefix}/ImageSets/Segmentation/val.txt", Body="\n".join(ids).encode())
    for i in ids:
        client.upload_file(str(VOC / "JPEGImages" / f"{i}.jpg"), "data", f"{prefix}/JPEGImages/{i}.jpg")
        client.upload_file(str(VOC / "SegmentationClass" / f"{i}.png"), "data", f"{prefix}/SegmentationClass/{i}.png")
    options = {"key": "testing", "secret": "testing", "client_kwargs": {"endpoint_url": endpoint, "region_name": "us-east-1"}}
    yield options, ids, client
    server.stop()


@needs_voc
def test_voc_loader_on_s3(s3_voc):
    options, ids, client = s3_voc
    ds = VOCSegmentation("s3://data/voc", split="val", storage_options=options)
    assert [ds.item_id(i) for i in range(len(ds))] == ids
    img, mask = ds[1]
    assert np.array_equal(mask.numpy(), np.array(Image.open(VOC / "SegmentationClass" / f"{ids[1]}.png")))
    assert img.shape[1:] == mask.shape
    client.delete_object(Bucket="data", Key=f"voc/VOC2012/SegmentationClass/{ids[0]}.png")
    with pytest.raises(FileNotFoundError, match=rf"s3://data/voc/VOC2012/SegmentationClass/{ids[0]}\.png"):
        ds.load(0)


# ---------------------------------------------------------------- ADE20K


@needs_ade
@pytest.mark.parametrize("root", [str(ADE_ROOT), ADE_ROOT.as_uri()])
def test_ade_loader(root):
    ds = ADE20K(root, split="validation")
    files = sorted(p.stem for p in (ADE_ROOT / "images" / "validation").glob("*.jpg"))
    assert [ds.item_id(i) for i in range(len(ds))] == files
    for i in range(len(ds)):
        img, mask = ds[i]
        expected = np.array(Image.open(ADE_ROOT / "annotations" / "validation" / f"{files[i]}.png"))
        assert img.dtype == torch.uint8 and img.shape[0] == 3 and img.shape[1:] == mask.shape
        assert np.array_equal(mask.numpy(), expected)
        assert int(mask.max()) <= 150
        assert ds.labels_present(i) == frozenset(np.unique(expected).tolist()) - {0}
    assert ds.num_classes == 150 and len(ds.class_names) == 151 and len(ds.palette) == 151
    assert ds.class_names[1] == "wall" and ds.class_names[150] == "flag"


@needs_ade
def test_ade_root_variants_and_errors(tmp_path):
    (tmp_path / "ADEChallengeData2016").symlink_to(ADE_ROOT)
    assert len(make_source("ade", "val", root=str(tmp_path))) == len(ADE20K(str(ADE_ROOT), "validation"))
    with pytest.raises(FileNotFoundError, match=r"images/training"):
        ADE20K(str(ADE_ROOT), split="training")
    with pytest.raises(FileNotFoundError, match="ADEChallengeData2016"):
        ADE20K(str(tmp_path / "nowhere"), split="validation")
    with pytest.raises(ValueError, match="unknown ADE20K split"):
        ADE20K(str(ADE_ROOT), split="test")


# ---------------------------------------------------------------- transforms


def test_normalize_round_trip_and_bounds():
    img = torch.randint(0, 256, (2, 3, 8, 8), dtype=torch.uint8)
    x = normalize(img)
    assert x.dtype == torch.float32
    assert torch.allclose(x[0, :, 0, 0], (img[0, :, 0, 0].float() / 255 - torch.tensor(MEAN)) / torch.tensor(STD))
    assert torch.equal(denormalize(x), img)
    assert torch.equal(denormalize(normalize(img[0])), img[0])
    low, high = pixel_bounds()
    assert low.shape == high.shape == (1, 3, 1, 1)
    assert torch.allclose(normalize(torch.zeros(1, 3, 1, 1, dtype=torch.uint8)), low)
    assert torch.allclose(normalize(torch.full((1, 3, 1, 1), 255, dtype=torch.uint8)), high)
    assert torch.equal(denormalize(high + 1.0), torch.full((1, 3, 1, 1), 255, dtype=torch.uint8))


def test_train_transform_pads_mask_with_ignore():
    torch.manual_seed(0)
    img = tv_tensors.Image(torch.full((3, 20, 30), 200, dtype=torch.uint8))
    mask = tv_tensors.Mask(torch.full((20, 30), 7, dtype=torch.uint8))
    t = train_transform(48, scale=(0.5, 0.6))
    out_img, out_mask = t(img, mask)
    assert out_img.shape == (3, 48, 48) and out_img.dtype == torch.float32
    assert out_mask.shape == (48, 48) and out_mask.dtype == torch.uint8
    assert set(torch.unique(out_mask).tolist()) == {7, 255}
    low, _ = pixel_bounds()
    padded = out_mask == 255
    assert torch.allclose(out_img[:, padded], low[0, :, :, 0].expand(3, int(padded.sum())))


def test_train_transform_matches_its_torchvision_composition():
    """TrainTransform calls v2's kernels directly: the same draws must give the same tensors as the v2.Compose."""
    sizes = torch.Generator().manual_seed(0)
    for scale in [(0.5, 2.0), (1.0, 1.0), (0.2, 0.4)]:
        fast, reference = train_transform(48, scale), reference_train_transform(48, scale)
        for trial in range(60):
            height, width = (int(v) for v in torch.randint(16, 120, (2,), generator=sizes))
            img = torch.randint(0, 256, (3, height, width), dtype=torch.uint8, generator=sizes)
            mask = torch.randint(0, 12, (height, width), dtype=torch.uint8, generator=sizes)
            torch.manual_seed(trial)
            want_img, want_mask = reference(tv_tensors.Image(img), tv_tensors.Mask(mask))
            next_draw_reference = torch.rand(1)
            torch.manual_seed(trial)
            got_img, got_mask = fast(tv_tensors.Image(img), tv_tensors.Mask(mask))
            assert torch.equal(torch.rand(1), next_draw_reference), "both must take the same number of draws"
            assert type(got_img) is torch.Tensor and type(got_mask) is torch.Tensor
            assert torch.equal(got_img, want_img.as_subclass(torch.Tensor)), (scale, height, width)
            assert torch.equal(got_mask, want_mask.as_subclass(torch.Tensor)), (scale, height, width)


def test_eval_transform_resizes_to_square():
    img = torch.randint(0, 256, (3, 40, 60), dtype=torch.uint8)
    mask = torch.randint(0, 3, (40, 60), dtype=torch.uint8)
    out_img, out_mask = eval_transform(32)(tv_tensors.Image(img), tv_tensors.Mask(mask))
    assert out_img.shape == (3, 32, 32) and out_mask.shape == (32, 32)
    assert set(torch.unique(out_mask).tolist()) <= {0, 1, 2}
    same_img, same_mask = eval_transform(None)(tv_tensors.Image(img), tv_tensors.Mask(mask))
    assert torch.allclose(same_img, normalize(img), atol=1e-5) and torch.equal(same_mask, mask)


# ---------------------------------------------------------------- step datasets


def test_step_dataset_applies_lut_and_transform():
    src = ShapesDataset(size=20, image_size=64)
    task = make_task("shapes", "6-2-2")
    lut = label_lut(task, 1, "train")
    ds = StepDataset(src, [0, 3, 5], lut, train_transform(48))
    img, mask = ds[1]
    assert img.dtype == torch.float32 and img.shape == (3, 48, 48) and type(img) is torch.Tensor
    assert mask.dtype == torch.int64 and mask.shape == (48, 48) and type(mask) is torch.Tensor
    plain = StepDataset(src, [3], lut, None)
    img, mask = plain[0]
    assert torch.equal(mask, lut[src[3][1].long()])
    assert torch.allclose(img, normalize(src[3][0]), atol=1e-5)
    assert ds.item_id(1) == "shapes/train/3"


@pytest.mark.parametrize("overlap", [True, False])
def test_build_step_datasets_on_shapes(tmp_path, overlap):
    train_src, val_src = ShapesDataset("train", size=150), ShapesDataset("val", size=30)
    task = make_task("shapes", "6-2-2", overlap=overlap)
    train, val = build_step_datasets(
        train_src, val_src, task, 1, "train", train_transform(64), eval_transform(None), cache_dir=str(tmp_path)
    )
    assert len(train) > 0 and len(val) == 30
    new = set(task.new_classes(1))
    future = set(task.new_classes(2))
    for i in train.indices:
        assert train_src.labels_present(i) & new
        if not overlap:
            assert not train_src.labels_present(i) & future
    allowed_train = {0, 255, *task.new_indices(1)}
    for k in range(min(len(train), 20)):
        assert set(train[k][1].unique().tolist()) <= allowed_train
    allowed_val = {0, 255, *range(1, task.num_seen(1) + 1)}
    for k in range(len(val)):
        assert set(val[k][1].unique().tolist()) <= allowed_val
    assert len(list(tmp_path.glob("*.json"))) == 1
    again, _ = build_step_datasets(train_src, val_src, task, 1, "train", None, None, cache_dir=str(tmp_path))
    assert again.indices == train.indices


def test_build_step_datasets_joint_and_order():
    train_src, val_src = ShapesDataset("train", size=100), ShapesDataset("val", size=10)
    task = make_task("shapes", "6-1", order_seed=4)
    train, _ = build_step_datasets(train_src, val_src, task, 2, "joint", None, None)
    seen = set(task.seen_classes(2))
    assert train.indices == [i for i in range(100) if train_src.labels_present(i) & seen]
    for k in range(10):
        _, mask = train[k]
        original = train_src[train.indices[k]][1].long()
        for c in seen:
            assert torch.all(mask[original == c] == task.model_index(c))
    with pytest.raises(ValueError, match="unknown mode"):
        build_step_datasets(train_src, val_src, task, 2, "eval", None, None)


@needs_voc
def test_build_step_datasets_on_voc(tmp_path):
    train_src = make_source("voc", "train", root=str(VOC_ROOT))
    val_src = make_source("voc", "val", root=str(VOC_ROOT))
    task = make_task("voc", "15-5", overlap=False)
    train, val = build_step_datasets(
        train_src, val_src, task, 1, "train", train_transform(64), eval_transform(64), cache_dir=str(tmp_path)
    )
    assert 0 < len(train) < len(train_src) and len(val) == len(val_src)
    for k in range(len(train)):
        img, mask = train[k]
        assert img.shape == (3, 64, 64)
        assert set(mask.unique().tolist()) <= {0, 255, *range(16, 21)}
    for k in range(3):
        assert set(val[k][1].unique().tolist()) <= {0, 255, *range(1, 21)}


def test_make_source_validates():
    assert isinstance(make_source("shapes", "val", image_size=72), ShapesDataset)
    assert len(make_source("shapes", "train")) == 2000
    with pytest.raises(ValueError, match="unknown dataset 'coco'"):
        make_source("coco", "train")
    with pytest.raises(ValueError, match="needs a root"):
        make_source("voc", "train")


def test_shapes_label_scan_keeps_no_image_and_a_pickled_source_carries_none():
    import pickle

    source = make_source("shapes", "train", size=50, image_size=32)
    labels = source.all_labels_present()
    assert source._cache == {} and labels == [frozenset(int(c) for c in source.render(i)[1].ravel().tolist()) - {0}
                                               for i in range(50)]
    image, mask = source.load(3)
    assert len(source._cache) == 1 and len(pickle.dumps(source)) < 1_000
    assert torch.equal(pickle.loads(pickle.dumps(source)).load(3)[0], image)
