"""Run storage on a local path or any fsspec URI (s3://...): atomic writes, pyarrow filesystems, the run directory."""

from __future__ import annotations

import os
import tempfile
from typing import Any

import fsspec
import pyarrow.fs
import yaml

from hrhf import config as config_lib
from hrhf.config import Config


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


# Settings that change how a run executes, not what it computes: a resumed run may change them.
RUNTIME_KEYS = {"device", "threads", "train.num_workers"}


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(tree, dict):
        return {prefix.rstrip("."): tree}
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        flat.update(_flatten(value, f"{prefix}{key}."))
    return flat


class RunDir:
    """A run's files under a local path or fsspec URI: config, per-step checkpoints, report."""

    def __init__(self, uri: str | None) -> None:
        self.uri = uri.rstrip("/") if uri else None
        self.fs = fsspec.core.url_to_fs(self.uri)[0] if self.uri else None

    def path(self, name: str) -> str:
        """URI of a file in the run directory."""
        return f"{self.uri}/{name}"

    def exists(self, name: str) -> bool:
        """Whether a file exists in the run directory."""
        return self.uri is not None and self.fs.exists(self.path(name))

    def read_text(self, name: str) -> str:
        """Read a text file of the run directory."""
        with fsspec.open(self.path(name), "r") as f:
            return f.read()

    def read_bytes(self, name: str) -> bytes:
        """Read a binary file of the run directory."""
        with fsspec.open(self.path(name), "rb") as f:
            return f.read()

    def write_text(self, name: str, text: str) -> None:
        """Atomically write a text file of the run directory."""
        self.write_bytes(name, text.encode())

    def write_bytes(self, name: str, data: bytes) -> None:
        """Atomically write a binary file of the run directory (nothing without a run directory)."""
        if self.uri is not None:
            write_bytes_atomic(self.path(name), data)

    def existing_config(self) -> dict[str, Any] | None:
        """The config recorded in the run directory, or None for a new one; OSError when it cannot be reached."""
        if self.uri is None:
            return None
        try:
            return yaml.safe_load(self.read_text("config.yaml")) if self.exists("config.yaml") else None
        except Exception as err:  # botocore's connection errors are not OSErrors
            raise OSError(f"run directory {self.uri} is not reachable: {err}") from err

    def check(self, cfg: Config) -> None:
        """Raise ValueError if the run directory holds another run's config; reads only."""
        existing = self.existing_config()
        if existing is None:
            return
        try:  # a key added to the config since that run was made holds its default there
            existing = config_lib.to_dict(config_lib.from_dict(existing))
        except ValueError:
            pass  # compared as it is: the difference is then reported key by key
        theirs, ours = _flatten(existing), _flatten(config_lib.to_dict(cfg))
        diff = sorted(k for k in set(theirs) | set(ours) if theirs.get(k) != ours.get(k) and k not in RUNTIME_KEYS)
        if diff:
            raise ValueError(
                f"run directory {self.uri} holds another run's config (differs in: {', '.join(diff)}); "
                "use a new run directory or the same config"
            )

    def claim(self, cfg: Config) -> None:
        """Record the config, or check that an existing run directory holds the same one."""
        if self.uri is None:
            return
        self.check(cfg)
        if not self.exists("config.yaml"):
            try:
                self.write_text("config.yaml", yaml.safe_dump(config_lib.to_dict(cfg), sort_keys=False))
            except Exception as err:  # botocore's connection errors are not OSErrors
                raise OSError(f"run directory {self.uri} is not writable: {err}") from err
