"""Synthetic images as Parquet shards with commit markers, in a local directory or an object store.

Layout of a dataset directory (a path or an fsspec URI such as ``s3://bucket/prefix``)::

    shards/{shard_id}.parquet   one row per image: PNG image and pseudo-label mask, metadata
    _done/{shard_id}.json       commit marker and manifest entry, written only after the data
    manifests/step-{step}.json  the shards (ids in order, rows, sha256) that make up a finished step

Every file is published atomically (a local rename, or one PUT of the final key on an object store)
under a name fixed by the shard id or step, so a retried shard overwrites the same keys. Shards of a
step left over from an earlier run with another shard size keep their markers but are not in the
step's manifest: read a step through ``read_step`` or ``parquet_paths(step=...)``.
"""

from __future__ import annotations

import hashlib
import io
import json
import uuid

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.fs
import pyarrow.parquet as pq
import torch
from fsspec.implementations.local import LocalFileSystem
from PIL import Image

from hrhf.inversion import NonFiniteError, SyntheticSet, Target
from hrhf.storage import write_bytes_atomic

SCHEMA = pa.schema(
    [
        ("image", pa.binary()),  # PNG, RGB
        ("mask", pa.binary()),  # PNG, 8-bit grey: the teacher's pseudo-label
        ("class", pa.int32()),
        ("scale", pa.float32()),
        ("seed", pa.int64()),
        ("loss", pa.float32()),
        ("area", pa.float32()),
        ("retried", pa.bool_()),  # synthesised a second time (inversion.retry_below)
        ("model_id", pa.string()),
        ("step", pa.int32()),
        ("shard_id", pa.string()),
    ]
)

# Per-image metadata, also kept in each shard's commit marker so that a driver need not open the shard.
META_COLUMNS = ("class", "scale", "seed", "loss", "area", "retried")
# Keys every commit marker holds; a marker without them is treated as absent.
MARKER_KEYS = ("shard_id", "rows", "seeds", "bytes", "sha256", "model_id", "step")
# What ``ShardStore.verify`` says of a shard that was never committed (as opposed to a damaged one).
NO_MARKER = "no commit marker"


def encode_png(array: np.ndarray) -> bytes:
    """PNG bytes of a uint8 array, (H, W) grey or (H, W, 3) RGB."""
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def decode_png(data: bytes) -> np.ndarray:
    """The uint8 array stored in PNG bytes."""
    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image)


def to_table(synthetic: SyntheticSet, model_id: str, step: int, shard_id: str) -> pa.Table:
    """One row per synthetic image, in the order of the set; images must be uint8."""
    if synthetic.images.dtype != torch.uint8:
        if synthetic.images.is_floating_point():
            finite = synthetic.images.isfinite().flatten(1).all(1).tolist()
            bad = [m.get("seed") for m, ok in zip(synthetic.meta, finite) if not ok]
            if bad:
                raise NonFiniteError(f"shard {shard_id}: non-finite pixels in the images of seeds {bad[:5]}")
        raise TypeError(f"shard {shard_id}: images must be uint8, got {synthetic.images.dtype}")
    images = synthetic.images.permute(0, 2, 3, 1).contiguous().numpy()
    masks = synthetic.masks.numpy()
    meta = synthetic.meta
    columns = {
        "image": [encode_png(im) for im in images],
        "mask": [encode_png(m) for m in masks],
        "class": [m["class"] for m in meta],
        "scale": [m["scale"] for m in meta],
        "seed": [m["seed"] for m in meta],
        "loss": [m["loss"] for m in meta],
        "area": [m["area"] for m in meta],
        "retried": [bool(m.get("retried", False)) for m in meta],
        "model_id": [model_id] * len(meta),
        "step": [step] * len(meta),
        "shard_id": [shard_id] * len(meta),
    }
    return pa.table(columns, schema=SCHEMA)


def from_table(table: pa.Table) -> SyntheticSet:
    """Decode rows back into a set; images and masks are exact, float metadata is float32."""
    if table.num_rows == 0:
        return SyntheticSet.concat([])
    if "retried" not in table.column_names:  # shards written before the column existed
        table = table.append_column("retried", pa.array([False] * table.num_rows))
    columns = table.select(["image", "mask", *META_COLUMNS]).to_pydict()
    images = np.stack([decode_png(b) for b in columns["image"]]).transpose(0, 3, 1, 2)
    masks = np.stack([decode_png(b) for b in columns["mask"]])
    meta = [dict(zip(META_COLUMNS, row)) for row in zip(*(columns[k] for k in META_COLUMNS))]
    return SyntheticSet(torch.from_numpy(np.ascontiguousarray(images)), torch.from_numpy(masks), meta)


def make_shards(targets: list[Target], shard_size: int, step: int) -> list[tuple[str, list[Target]]]:
    """Consecutive runs of at most ``shard_size`` targets, as equal in size as possible, named ``step{step}-{index:05d}``.

    Equal sizes (120 targets in shards of at most 32: four of 30, not 32, 32, 32, 24) keep a pool of
    actors evenly loaded to the end.
    """
    if shard_size < 1:
        raise ValueError(f"shard_size must be at least 1, got {shard_size}")
    count = -(-len(targets) // shard_size)
    bounds = [len(targets) * i // count for i in range(count + 1)] if count else [0]
    return [(f"step{step}-{i:05d}", list(targets[a:b])) for i, (a, b) in enumerate(zip(bounds, bounds[1:]))]


class ShardStore:
    """Parquet shards and their commit markers under a local path or fsspec URI."""

    def __init__(self, uri: str, storage_options: dict | None = None) -> None:
        self.uri = uri.rstrip("/")
        self.storage_options = dict(storage_options or {})
        self.fs, self.root = fsspec.core.url_to_fs(self.uri, **self.storage_options)
        self.local = isinstance(self.fs, LocalFileSystem)

    def data_path(self, shard_id: str) -> str:
        """Path of a shard's Parquet file within ``self.fs``."""
        return f"{self.root}/shards/{shard_id}.parquet"

    def marker_path(self, shard_id: str) -> str:
        """Path of a shard's commit marker within ``self.fs``."""
        return f"{self.root}/_done/{shard_id}.json"

    def _put(self, path: str, data: bytes) -> None:
        if self.local:
            write_bytes_atomic(path, data)
        else:
            self.fs.pipe_file(path, data)

    def check_access(self) -> None:
        """Raise an OSError naming the URI unless the directory or bucket can be written."""
        probe = f"{self.root}/_probe-{uuid.uuid4().hex}"
        try:
            if self.local:
                self.fs.makedirs(self.root, exist_ok=True)
            self.fs.pipe_file(probe, b"")
            self.fs.rm_file(probe)
        except Exception as err:
            kind = type(err) if isinstance(err, (FileNotFoundError, PermissionError)) else OSError
            raise kind(f"shard store {self.uri} is not writable ({type(err).__name__}: {err})") from err

    def write_shard(self, shard_id: str, table: pa.Table) -> None:
        """Publish the shard's data, then its commit marker."""
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink, row_group_size=1)  # one row per row group: a reader fetches single images
        data = sink.getvalue().to_pybytes()
        self._put(self.data_path(shard_id), data)
        marker = {
            "shard_id": shard_id,
            "rows": table.num_rows,
            "seeds": table.column("seed").to_pylist(),
            "bytes": len(data),
            "sha256": hashlib.sha256(data).hexdigest(),
            "model_id": table.column("model_id")[0].as_py() if table.num_rows else None,
            "step": table.column("step")[0].as_py() if table.num_rows else None,
            "meta": table.select(list(META_COLUMNS)).to_pylist(),
        }
        self._put(self.marker_path(shard_id), json.dumps(marker).encode())

    def step_manifest_path(self, step: int) -> str:
        """Path of a step's manifest within ``self.fs``."""
        return f"{self.root}/manifests/step-{step}.json"

    def _read_json(self, path: str) -> dict | None:
        """The JSON object in a file, freshly read; None if it is empty or not a JSON object.

        Raises FileNotFoundError if the file is absent.
        """
        self.fs.invalidate_cache(path)  # written by another process since the last listing
        try:
            entry = json.loads(self.fs.cat_file(path))
        except ValueError:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            return None
        return entry if isinstance(entry, dict) else None

    def _read_marker(self, shard_id: str) -> dict | None:
        """A shard's commit marker; None if it is empty, garbled or lacks a key; FileNotFoundError if absent."""
        marker = self._read_json(self.marker_path(shard_id))
        if marker is None or any(key not in marker for key in MARKER_KEYS) or marker["shard_id"] != shard_id:
            return None
        return marker

    def read_marker(self, shard_id: str) -> dict | None:
        """A shard's commit marker, or None if it is absent, empty, garbled or lacks a key."""
        try:
            return self._read_marker(shard_id)
        except FileNotFoundError:
            return None

    def manifest(self) -> dict[str, dict]:
        """Commit markers of the finished shards, by shard id; an unreadable marker counts as absent."""
        self.fs.invalidate_cache()  # other processes write here; object-store listings are cached
        entries = {}
        for path in self.fs.glob(f"{self.root}/_done/*.json"):
            shard_id = path.rsplit("/", 1)[-1].removesuffix(".json")
            marker = self.read_marker(shard_id)
            if marker is not None:
                entries[shard_id] = marker
        return entries

    def done(self) -> set[str]:
        """Ids of the finished shards."""
        return set(self.manifest())

    def verify(self, shard_id: str, expected_seeds: list[int], model_id: str) -> str | None:
        """None if the shard is committed, intact and made by ``model_id`` for ``expected_seeds``; else why not.

        Reads the whole shard: size, checksum, Parquet footer and seed column are all checked.
        """
        try:
            marker = self._read_marker(shard_id)
        except FileNotFoundError:
            return NO_MARKER
        if marker is None:
            return "commit marker empty, garbled or incomplete"
        if marker["model_id"] != model_id:
            return f"made from another teacher ({marker['model_id']}, not {model_id})"
        if marker["seeds"] != list(expected_seeds):
            return "made for other targets (seeds differ)"
        self.fs.invalidate_cache(self.data_path(shard_id))
        try:
            data = self.fs.cat_file(self.data_path(shard_id))
        except FileNotFoundError:
            return "data file missing"
        if len(data) != marker["bytes"]:
            return f"data is {len(data)} bytes, its marker says {marker['bytes']}"
        if hashlib.sha256(data).hexdigest() != marker["sha256"]:
            return "data does not match the checksum in its marker"
        try:
            seeds = pq.read_table(pa.BufferReader(data), columns=["seed"]).column("seed").to_pylist()
        except Exception as err:  # pyarrow raises several types for a damaged file
            return f"unreadable Parquet ({type(err).__name__}: {err})"
        if seeds != marker["seeds"]:
            return "seed column differs from its marker"
        return None

    def read_shard(self, shard_id: str) -> pa.Table:
        """A finished shard's rows, checked against the checksum in its marker."""
        self.fs.invalidate_cache(self.data_path(shard_id))
        marker = self.read_marker(shard_id)
        if marker is None:
            raise FileNotFoundError(f"shard {shard_id} is not finished in {self.uri} (no readable commit marker)")
        data = self.fs.cat_file(self.data_path(shard_id))
        if hashlib.sha256(data).hexdigest() != marker["sha256"]:
            raise ValueError(f"shard {shard_id} in {self.uri} does not match the checksum in its marker")
        return pq.read_table(pa.BufferReader(data))

    def read_all(self, shard_ids: list[str] | None = None) -> SyntheticSet:
        """The images of the given shards in that order (default: every finished shard, sorted by id)."""
        ids = sorted(self.done()) if shard_ids is None else shard_ids
        return SyntheticSet.concat([from_table(self.read_shard(s)) for s in ids])

    def write_step_manifest(self, step: int, shard_ids: list[str]) -> None:
        """Record that exactly these committed shards, in this order, make up the step."""
        shards = []
        for shard_id in shard_ids:
            marker = self.read_marker(shard_id)
            if marker is None:
                raise FileNotFoundError(f"shard {shard_id} is not finished in {self.uri}")
            shards.append({"shard_id": shard_id, "rows": marker["rows"], "sha256": marker["sha256"]})
        self._put(self.step_manifest_path(step), json.dumps({"step": step, "shards": shards}).encode())

    def remove_step_manifest(self, step: int) -> None:
        """Withdraw a step's manifest (its shards are about to be rewritten); no error if there is none."""
        path = self.step_manifest_path(step)
        self.fs.invalidate_cache(path)
        if self.fs.exists(path):
            self.fs.rm_file(path)

    def step_shards(self, step: int) -> list[str]:
        """Ids of the shards in a step's manifest, in order, each checked to be still as committed then."""
        try:
            manifest = self._read_json(self.step_manifest_path(step))
        except FileNotFoundError:
            manifest = None
        if manifest is None or not isinstance(manifest.get("shards"), list):
            raise FileNotFoundError(f"step {step} has no readable manifest in {self.uri}")
        ids = []
        for entry in manifest["shards"]:
            if not isinstance(entry, dict) or "shard_id" not in entry or "sha256" not in entry:
                raise FileNotFoundError(f"step {step} has no readable manifest in {self.uri}")
            marker = self.read_marker(entry["shard_id"])
            if marker is None or marker["sha256"] != entry["sha256"]:
                raise ValueError(
                    f"shard {entry['shard_id']} in {self.uri} has changed since step {step}'s manifest was written"
                )
            ids.append(entry["shard_id"])
        return ids

    def read_meta(self, shard_id: str) -> list[dict]:
        """Per-image metadata of a finished shard, from its marker (or its metadata columns for older markers)."""
        marker = self.read_marker(shard_id)
        if marker is None:
            raise FileNotFoundError(f"shard {shard_id} is not finished in {self.uri} (no readable commit marker)")
        if isinstance(marker.get("meta"), list):
            return marker["meta"]
        with self.fs.open(self.data_path(shard_id), "rb") as f:
            parquet = pq.ParquetFile(f)
            return parquet.read(columns=[c for c in META_COLUMNS if c in parquet.schema_arrow.names]).to_pylist()

    def read_rows(self, shard_id: str, rows: list[int]) -> SyntheticSet:
        """Some rows of a finished shard, reading only their row groups (no checksum: for display)."""
        with self.fs.open(self.data_path(shard_id), "rb") as f:
            parquet = pq.ParquetFile(f)
            if parquet.metadata.num_row_groups == parquet.metadata.num_rows:
                table = parquet.read_row_groups(rows)
            else:  # a shard written with several rows per row group
                table = parquet.read().take(rows)
        return from_table(table)

    def read_step(self, step: int) -> SyntheticSet:
        """The images of the shards in a step's manifest, in order."""
        return self.read_all(self.step_shards(step))

    def parquet_paths(self, shard_ids: list[str] | None = None, step: int | None = None) -> list[str]:
        """Paths of finished shards within ``arrow_filesystem()``: the given ones, those of a step's manifest, or all.

        For readers elsewhere: ``pyarrow.parquet.ParquetFile(store.arrow_filesystem().open_input_file(path))``.
        Without ``shard_ids`` or ``step``: every finished shard, sorted by id, including shards of a step
        left over from a run with another shard size.
        """
        if step is not None:
            if shard_ids is not None:
                raise ValueError("give shard_ids or step, not both")
            return [self.data_path(s) for s in self.step_shards(step)]
        done = self.done()
        ids = sorted(done) if shard_ids is None else shard_ids
        missing = [s for s in ids if s not in done]
        if missing:
            raise FileNotFoundError(f"shards not finished in {self.uri}: {', '.join(missing)}")
        return [self.data_path(s) for s in ids]

    def arrow_filesystem(self) -> pyarrow.fs.FileSystem:
        """The store's filesystem (with its storage options) as a pyarrow filesystem."""
        if self.local:
            return pyarrow.fs.LocalFileSystem()
        return pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(self.fs))


def gallery_rows(shard_meta: list[list[dict]]) -> list[tuple[int, list[int]]]:
    """(shard index, rows within it) of the first image of each (class, scale): the images a gallery shows."""
    first: dict[tuple[int, float], tuple[int, int]] = {}
    for shard, meta in enumerate(shard_meta):
        for row, entry in enumerate(meta):
            first.setdefault((int(entry["class"]), float(entry["scale"])), (shard, row))
    rows: dict[int, list[int]] = {}
    for shard, row in sorted(first.values()):
        rows.setdefault(shard, []).append(row)
    return sorted(rows.items())


class StoredSynthetic:
    """A step's committed synthetic images, known by their metadata: images are read only where they are used.

    The driver keeps this handle; Ray Train workers stream the shards (``parquet_paths``) themselves.
    """

    def __init__(self, store: ShardStore, step: int) -> None:
        self.store = store
        self.step = step
        self.shard_ids = store.step_shards(step)
        self.shard_meta = [store.read_meta(shard_id) for shard_id in self.shard_ids]
        self.meta = [entry for meta in self.shard_meta for entry in meta]

    def __len__(self) -> int:
        return len(self.meta)

    def parquet_paths(self) -> list[str]:
        """The step's shard files within ``store.arrow_filesystem()``, in order."""
        return [self.store.data_path(shard_id) for shard_id in self.shard_ids]

    def read_all(self) -> SyntheticSet:
        """Every image of the step, checked against the shards' checksums (tests and tools; workers stream instead)."""
        return self.store.read_all(self.shard_ids)

    def gallery_sample(self) -> SyntheticSet:
        """The first image of each (class, scale), read from the few row groups that hold them."""
        return SyntheticSet.concat([self.store.read_rows(self.shard_ids[shard], rows)
                                    for shard, rows in gallery_rows(self.shard_meta)])
