"""Run storage on a local path or any fsspec URI (s3://...): atomic writes and pyarrow filesystems."""

from __future__ import annotations

import os
import tempfile

import fsspec
import pyarrow.fs


def is_local(uri: str) -> bool:
    """Whether a path or URI points at the local file system."""
    return "://" not in uri or uri.startswith("file://")


def absolute_uri(uri: str) -> str:
    """A local path made absolute (Ray workers may run in another directory); URIs unchanged, no trailing slash."""
    return uri.rstrip("/") if not is_local(uri) else os.path.abspath(uri.removeprefix("file://"))


def pyarrow_filesystem(uri: str) -> tuple[str, pyarrow.fs.FileSystem | None]:
    """(path, filesystem) for libraries that take pyarrow file systems (Ray Train, Tune, Ray Data).

    Local paths come back absolute with no filesystem; object stores go through fsspec (so the standard
    AWS credential chain and AWS_ENDPOINT_URL apply) and the path loses its scheme.
    """
    if is_local(uri):
        return os.path.abspath(uri.removeprefix("file://")), None
    fs, path = fsspec.core.url_to_fs(uri)
    return path, pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(fs))


def write_bytes_atomic(uri: str, data: bytes) -> None:
    """Write a whole file so that readers see either nothing or all of it.

    Locally: temporary file, fsync, rename, fsync of the directory, so that after a crash the name
    holds either the old or the new bytes, never a truncated file. On object stores: one PUT of the
    final key, which is atomic.
    """
    fs, path = fsspec.core.url_to_fs(uri)
    if is_local(uri):
        directory = os.path.dirname(os.path.abspath(path))
        os.makedirs(directory, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-")
        try:
            os.fchmod(fd, 0o644)  # mkstemp creates 0600; run files are meant to be read by others too
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.remove(tmp)
            raise
        # The rename itself is durable only once the directory entry is on disk.
        dir_fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    else:
        fs.pipe_file(path, data)
