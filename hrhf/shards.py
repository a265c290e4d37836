"""Synthetic images as Parquet shards with commit markers, in a local directory or an object store.

Layout of a dataset directory (a path or an fsspec URI such as ``s3://bucket/prefix``)::

    shards/{shard_id}.parquet   one row per image: PNG image and pseudo-label mask, metadata
    _done/{shard_id}.json       commit marker and manifest entry, written only after the data

Both files are published atomically (a local rename, or one PUT of the final key on an object store)
under names fixed by the shard id, so a retried shard overwrites the same keys.
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

from hrhf.inversion import SyntheticSet, Target
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
        ("model_id", pa.string()),
        ("step", pa.int32()),
        ("shard_id", pa.string()),
    ]
)


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
    """One row per synthetic image, in the order of the set."""
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
        "model_id": [model_id] * len(meta),
        "step": [step] * len(meta),
        "shard_id": [shard_id] * len(meta),
    }
    return pa.table(columns, schema=SCHEMA)


def from_table(table: pa.Table) -> SyntheticSet:
    """Decode rows back into a set; images and masks are exact, float metadata is float32."""
    if table.num_rows == 0:
        return SyntheticSet.concat([])
    columns = table.select(["image", "mask", "class", "scale", "seed", "loss", "area"]).to_pydict()
    images = np.stack([decode_png(b) for b in columns["image"]]).transpose(0, 3, 1, 2)
    masks = np.stack([decode_png(b) for b in columns["mask"]])
    keys = ("class", "scale", "seed", "loss", "area")
    meta = [dict(zip(keys, row)) for row in zip(*(columns[k] for k in keys))]
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
        pq.write_table(table, sink)
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
        }
        self._put(self.marker_path(shard_id), json.dumps(marker).encode())

    def manifest(self) -> dict[str, dict]:
        """Commit markers of the finished shards, by shard id."""
        self.fs.invalidate_cache()  # other processes write here; object-store listings are cached
        entries = {}
        for path in self.fs.glob(f"{self.root}/_done/*.json"):
            entry = json.loads(self.fs.cat_file(path))
            entries[entry["shard_id"]] = entry
        return entries

    def done(self) -> set[str]:
        """Ids of the finished shards."""
        return set(self.manifest())

    def read_shard(self, shard_id: str) -> pa.Table:
        """A finished shard's rows, checked against the checksum in its marker."""
        self.fs.invalidate_cache(self.marker_path(shard_id))  # written by another process since the last listing
        self.fs.invalidate_cache(self.data_path(shard_id))
        try:
            marker = json.loads(self.fs.cat_file(self.marker_path(shard_id)))
        except FileNotFoundError as err:
            raise FileNotFoundError(f"shard {shard_id} is not finished in {self.uri}") from err
        data = self.fs.cat_file(self.data_path(shard_id))
        if hashlib.sha256(data).hexdigest() != marker["sha256"]:
            raise ValueError(f"shard {shard_id} in {self.uri} does not match the checksum in its marker")
        return pq.read_table(pa.BufferReader(data))

    def read_all(self, shard_ids: list[str] | None = None) -> SyntheticSet:
        """The images of the given shards in that order (default: every finished shard, sorted by id)."""
        ids = sorted(self.done()) if shard_ids is None else shard_ids
        return SyntheticSet.concat([from_table(self.read_shard(s)) for s in ids])

    def parquet_paths(self, shard_ids: list[str] | None = None) -> list[str]:
        """Paths of finished shards within ``arrow_filesystem()`` (default: all, sorted by id).

        For Ray Data: ``ray.data.read_parquet(store.parquet_paths(), filesystem=store.arrow_filesystem())``.
        """
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
