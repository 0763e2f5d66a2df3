"""A real S3 API server on 127.0.0.1 for the object-store tests: moto's server mode in its own process,
with authentication on (a wrong key or a user without a policy is refused, as by S3 itself).

Tests reach it through s3fs with the ordinary AWS environment (`S3.env`): endpoint, key, secret.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

# The IAM calls that make the two users run before authentication starts: (user, policy, key) + (user, key).
_SETUP_CALLS = 5


@dataclass
class S3:
    endpoint: str
    env: dict[str, str]  # the AWS environment a process needs to use the server

    @contextlib.contextmanager
    def environment(self, **overrides: str | None) -> Iterator[None]:
        """This process's environment pointed at the server (overrides: None removes a variable)."""
        import fsspec

        wanted = {**self.env, **overrides}
        saved = {key: os.environ.get(key) for key in wanted}
        for key, value in wanted.items():
            _set(key, value)
        fsspec.filesystem("s3").clear_instance_cache()  # s3fs keeps a client per option set: start afresh
        try:
            yield
        finally:
            for key, value in saved.items():
                _set(key, value)
            fsspec.filesystem("s3").clear_instance_cache()

    def upload(self, local: Path, url: str) -> None:
        """A file, or a folder's files under the prefix `url`."""
        import fsspec

        with self.environment():
            fs = fsspec.filesystem("s3")
            files = [local] if local.is_file() else sorted(p for p in local.rglob("*") if p.is_file())
            for path in files:
                target = url if local.is_file() else f"{url}/{path.relative_to(local).as_posix()}"
                fs.put_file(str(path), target.removeprefix("s3://"))


def _set(key: str, value: str | None) -> None:
    if value is None:
        os.environ.pop(key, None)
    else:
        os.environ[key] = value


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_until_up(port: int, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the S3 server exited with {process.returncode}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
            return
        time.sleep(0.1)
    raise RuntimeError("the S3 server did not start within 60 s")


def _iam_user(endpoint: str, name: str, policy: dict | None) -> tuple[str, str]:
    """A user with an access key (and an inline policy, if given), made with the server's IAM API."""
    import boto3

    iam = boto3.client("iam", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="setup",
                       aws_secret_access_key="setup")
    iam.create_user(UserName=name)
    if policy is not None:
        iam.put_user_policy(UserName=name, PolicyName="s3", PolicyDocument=json.dumps(policy))
    key = iam.create_access_key(UserName=name)["AccessKey"]
    return key["AccessKeyId"], key["SecretAccessKey"]


@contextlib.contextmanager
def running_s3_server() -> Iterator[tuple[S3, dict[str, str]]]:
    """The server, and a second user's AWS environment: one without any permission."""
    port = _free_port()
    endpoint = f"http://127.0.0.1:{port}"
    process = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        env={**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": str(_SETUP_CALLS)},
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        _wait_until_up(port, process)
        allow_all = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}
        key, secret = _iam_user(endpoint, "curate", allow_all)
        denied_key, denied_secret = _iam_user(endpoint, "nobody", None)
        common = {"AWS_ENDPOINT_URL": endpoint, "AWS_DEFAULT_REGION": "us-east-1",
                  # No instance-metadata lookups: nothing may leave the loopback.
                  "AWS_EC2_METADATA_DISABLED": "true"}
        server = S3(endpoint, {**common, "AWS_ACCESS_KEY_ID": key, "AWS_SECRET_ACCESS_KEY": secret})
        yield server, {**common, "AWS_ACCESS_KEY_ID": denied_key, "AWS_SECRET_ACCESS_KEY": denied_secret}
    finally:
        process.terminate()
        process.wait(timeout=30)


@pytest.fixture(scope="session")
def s3_server() -> Iterator[tuple[S3, dict[str, str]]]:
    pytest.importorskip("moto", reason="the object-store tests need the dev extra (moto[server], s3fs)")
    pytest.importorskip("s3fs", reason="the object-store tests need the dev extra (moto[server], s3fs)")
    with running_s3_server() as server:
        yield server


@pytest.fixture(scope="session")
def s3(s3_server: tuple[S3, dict[str, str]]) -> S3:
    return s3_server[0]
