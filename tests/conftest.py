"""Store fixtures for every part of dagcraft's test suite.

- ``local_store``: a LocalStore in a fresh tmp dir.
- ``moto_store``: an S3Store on in-process moto (``mock_aws``), bucket created. Functional tests
  only: subprocesses cannot see it, and stock moto is not atomic under concurrency.
- ``moto_server`` (session): endpoint URL (``http://127.0.0.1:<port>``) of a moto S3 server
  running in a subprocess, whose WSGI app serializes requests behind one lock (so conditional
  writes are atomic, as on real S3). Dummy AWS credentials and region are set in ``os.environ``
  for this session, so subprocesses inherit them.
- ``s3_server_store``: an S3Store on a fresh bucket of that server, per test. ``store.url``
  (``s3://<bucket>/<prefix>?endpoint=http://127.0.0.1:<port>``) can be passed to a subprocess as
  ``--store`` or ``DAGCRAFT_STORE``.
- ``store``: parametrized over ``local``, ``moto``, ``s3server``.
- ``server_store_url(moto_server, prefix)`` / ``new_server_bucket(moto_server)``: helpers to
  build a fresh bucket and its store URL yourself.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

# Tests must never reach real AWS, and must not depend on the developer's AWS setup.
for _var in ("AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_SESSION_TOKEN",
             "AWS_SECURITY_TOKEN", "DAGCRAFT_STORE", "DAGCRAFT_RUN_ID", "DAGCRAFT_AGENT", "DAGCRAFT_STEP"):
    os.environ.pop(_var, None)
os.environ["AWS_ACCESS_KEY_ID"] = "testing"
os.environ["AWS_SECRET_ACCESS_KEY"] = "testing"
os.environ["AWS_DEFAULT_REGION"] = "us-east-1"
os.environ["AWS_CONFIG_FILE"] = os.devnull
os.environ["AWS_SHARED_CREDENTIALS_FILE"] = os.devnull
os.environ["AWS_EC2_METADATA_DISABLED"] = "true"

_SERVER_SCRIPT = Path(__file__).with_name("moto_server.py")


@pytest.fixture
def local_store(tmp_path: Path):
    from dagcraft.primitives.local import LocalStore

    return LocalStore(tmp_path / "store")


@pytest.fixture
def moto_store():
    from moto import mock_aws

    from dagcraft.primitives.s3 import S3Store, make_client

    with mock_aws():
        client = make_client(None, "us-east-1")
        client.create_bucket(Bucket="dagcraft-test")
        yield S3Store("dagcraft-test", "pfx", client=client)


@pytest.fixture(scope="session")
def moto_server() -> Iterator[str]:
    proc = subprocess.Popen([sys.executable, str(_SERVER_SCRIPT)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdin is not None
    line = proc.stdout.readline()  # blocks until the server is listening
    if not line.strip().isdigit():
        proc.kill()
        raise RuntimeError(f"moto server did not start: {line!r}")
    try:
        yield f"http://127.0.0.1:{int(line)}"
    finally:
        proc.stdin.close()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def new_server_bucket(endpoint: str) -> str:
    """Create a fresh bucket on the moto server and return its name."""
    from dagcraft.primitives.s3 import make_client
    from dagcraft.primitives.ulid import new_ulid

    name = "t-" + new_ulid().lower()
    make_client(endpoint, "us-east-1").create_bucket(Bucket=name)
    return name


def server_store_url(endpoint: str, prefix: str = "pfx") -> str:
    """``s3://<fresh bucket>/<prefix>?endpoint=<endpoint>`` for subprocesses' ``--store``."""
    from dagcraft.primitives.url import s3_url

    return s3_url(new_server_bucket(endpoint), prefix, endpoint=endpoint)


@pytest.fixture
def s3_server_store(moto_server: str):
    from dagcraft.primitives.s3 import S3Store

    return S3Store(new_server_bucket(moto_server), "pfx", endpoint_url=moto_server)


@pytest.fixture(params=["local", "moto", "s3server"])
def store(request):
    name = {"local": "local_store", "moto": "moto_store", "s3server": "s3_server_store"}[request.param]
    return request.getfixturevalue(name)
