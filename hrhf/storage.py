"""Run storage on a local path or any fsspec URI (s3://...): atomic writes and pyarrow filesystems."""

from __future__ import annotations

import os

import fsspec
import pyarrow.fs


def is_local(uri: str) -> bool:
    """Whether a path or URI points at the local file system."""
    return "://" not in uri or uri.startswith("file://")


def pyarrow_filesystem(uri: str) -> tuple[str, pyarrow.fs.FileSystem | None]:
    """(path, filesystem) for libraries that take pyarrow file systems (Ray Train, Tune, Ray Data).

    Local paths come back absolute with no filesystem; object stores go through fsspec (so the standard
    AWS credential chain and AWS_ENDPOINT_URL apply) and the path loses its scheme.
    """
    if is_local(uri):
        return os.path.abspath(uri.removeprefix("file://")), None
    fs, path = fsspec.core.url_to_fs(uri)
    return path, pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(fs))
