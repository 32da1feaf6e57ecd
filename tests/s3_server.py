"""A real S3-compatible server on loopback for the tests: moto's server mode in a child process.

Credentials are enforced (``INITIAL_NO_AUTH_ACTION_COUNT``: only the first
requests, which create the IAM users, go unauthenticated), so wrong keys are
refused exactly as AWS refuses them: ``InvalidAccessKeyId`` for an unknown
key id, ``SignatureDoesNotMatch`` for a wrong secret, ``AccessDenied`` for a
missing permission.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

SETUP_REQUESTS = 6  # 2 users x (create_user, create_access_key, put_user_policy)


@dataclass
class Keys:
    access_key_id: str
    secret_access_key: str


@dataclass
class S3Server:
    url: str
    proc: subprocess.Popen[bytes]
    full: Keys  # s3:* on everything
    put_only: Keys  # s3:PutObject only: what an upload needs

    def client(self, keys: Keys | None = None) -> Any:
        import boto3

        k = keys or self.full
        return boto3.client(
            "s3",
            endpoint_url=self.url,
            region_name="us-east-1",
            aws_access_key_id=k.access_key_id,
            aws_secret_access_key=k.secret_access_key,
        )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _binary() -> str:
    here = Path(sys.executable).parent / "moto_server"
    found = str(here) if here.exists() else shutil.which("moto_server")
    if not found:
        pytest.skip("moto_server is not installed (pip install 'moto[server]')")
    return found


def start() -> S3Server:
    import boto3

    port = _free_port()
    env = dict(os.environ, INITIAL_NO_AUTH_ACTION_COUNT=str(SETUP_REQUESTS))
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE"):
        env.pop(var, None)
    proc = subprocess.Popen(
        [_binary(), "-H", "127.0.0.1", "-p", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 60
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            break
        except OSError:
            if time.monotonic() > deadline or proc.poll() is not None:
                proc.kill()
                raise RuntimeError("moto_server did not start") from None
            time.sleep(0.1)
    url = f"http://127.0.0.1:{port}"
    iam = boto3.client(
        "iam",
        endpoint_url=url,
        region_name="us-east-1",
        aws_access_key_id="setup",
        aws_secret_access_key="setup",
    )
    keys = []
    for user, actions in (("archiver", ["s3:*"]), ("uploader", ["s3:PutObject"])):
        iam.create_user(UserName=user)
        k = iam.create_access_key(UserName=user)["AccessKey"]
        policy = {
            "Version": "2012-10-17",
            "Statement": [{"Effect": "Allow", "Action": actions, "Resource": "*"}],
        }
        iam.put_user_policy(UserName=user, PolicyName="p", PolicyDocument=json.dumps(policy))
        keys.append(Keys(k["AccessKeyId"], k["SecretAccessKey"]))
    return S3Server(url, proc, keys[0], keys[1])


def stop(server: S3Server) -> None:
    server.proc.terminate()
    try:
        server.proc.wait(10)
    except subprocess.TimeoutExpired:
        server.proc.kill()
