"""Shared test fixtures: a local S3 endpoint (moto) and free ports."""

import os
import sys
from pathlib import Path

import pytest

from hrhf.distributed.localcluster import free_port

# The `ray` command of this interpreter's environment, also for Ray's own helpers that call `ray`.
os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"


@pytest.fixture(scope="module")
def s3_endpoint():
    """A moto S3 server on 127.0.0.1, with AWS variables pointing every client at it."""
    pytest.importorskip("moto")
    import s3fs
    from moto.server import ThreadedMotoServer

    s3fs.S3FileSystem.clear_instance_cache()  # fsspec caches instances, with an endpoint read from the environment

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    env = {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    patcher = pytest.MonkeyPatch()
    for key, value in env.items():
        patcher.setenv(key, value)
    yield env
    patcher.undo()
    server.stop()
    s3fs.S3FileSystem.clear_instance_cache()


def make_bucket(env: dict, name: str) -> None:
    """Create a bucket on the moto endpoint."""
    import boto3

    boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], aws_access_key_id="testing",
                 aws_secret_access_key="testing", region_name="us-east-1").create_bucket(Bucket=name)


def storage_options(env: dict) -> dict:
    """s3fs options for the moto endpoint of ``s3_endpoint``."""
    return {"key": env["AWS_ACCESS_KEY_ID"], "secret": env["AWS_SECRET_ACCESS_KEY"],
            "client_kwargs": {"endpoint_url": env["AWS_ENDPOINT_URL"]}}


PYTHON = sys.executable
