"""A real S3-compatible server (moto, in a child process) and S3 stores on it, for the tests."""

from __future__ import annotations

import subprocess
import sys
import uuid
from contextlib import contextmanager
from pathlib import Path

import pytest

from polykit_cache.s3client import Breaker, Endpoint, S3Client
from polykit_cache.s3store import S3Store
from polykit_cache.sigv4 import Credentials
from polykit_cache.storage import Storage

HERE = Path(__file__).resolve().parent
KEYS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}
REGION = "us-east-1"


def need_moto() -> None:
    """Skip (with the reason) where moto's server cannot be imported."""
    import importlib.util

    for module in ("moto", "werkzeug", "flask", "flask_cors"):
        if importlib.util.find_spec(module) is None:
            pytest.skip(f"{module} is not installed (moto's server needs moto[s3,server], flask and flask-cors)")


class Moto:
    """``tests/moto_server.py`` as a child process on a free loopback port."""

    def __init__(self, log_path: Path, port: int = 0) -> None:
        need_moto()
        self.log = open(log_path, "ab")
        self.proc = subprocess.Popen([sys.executable, str(HERE / "moto_server.py"), str(port)], stdout=subprocess.PIPE,
                                     stderr=self.log, env={**__import__("os").environ, "S3_UPLOAD_PART_MIN_SIZE": str(5 << 20)})
        line = self.proc.stdout.readline()
        if not line.strip().isdigit():
            self.stop()
            raise RuntimeError(f"moto did not start: {log_path.read_text()[-2000:]}")
        self.port = int(line)
        self.url = f"http://127.0.0.1:{self.port}"

    def client(self, bucket: str, credentials: Credentials = Credentials("testing", "testing"), **kwargs) -> S3Client:
        return S3Client(Endpoint.make(self.url, REGION, bucket, "path"), credentials, **kwargs)

    def make_bucket(self, bucket: str | None = None) -> str:
        bucket = bucket or f"b-{uuid.uuid4().hex[:12]}"
        self.client(bucket).request("PUT", "")
        return bucket

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc.stdout.close()
        self.log.close()


@contextmanager
def moto_server(tmp_path: Path):
    server = Moto(tmp_path / "moto.log")
    try:
        yield server
    finally:
        server.stop()


def s3_store(moto: Moto, bucket: str, tier: Path, *, max_storage: int | None = None, breaker: Breaker | None = None,
             deadline: float = 10.0, **kwargs) -> S3Store:
    """An S3 store on a bucket of the moto server, with its own tier folder."""
    store = S3Store(moto.client(bucket, deadline=deadline, breaker=breaker), "cache", Storage(tier, max_storage), **kwargs)
    store.recover()
    return store


def _iam(moto: Moto, params: dict) -> bytes:
    """One call of moto's IAM query API, signed (moto counts it against the unauthenticated allowance)."""
    import hashlib
    import http.client
    import time
    from urllib.parse import urlencode

    from polykit_cache.sigv4 import authorization

    body = urlencode({**params, "Version": "2010-05-08"}).encode()
    payload = hashlib.sha256(body).hexdigest()
    amz_date = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    headers = {"host": f"127.0.0.1:{moto.port}", "x-amz-date": amz_date,
               "content-type": "application/x-www-form-urlencoded"}
    headers["authorization"] = authorization("POST", "/", [], headers, payload, Credentials("testing", "testing"),
                                             REGION, "iam", amz_date)
    conn = http.client.HTTPConnection("127.0.0.1", moto.port, timeout=30)
    try:
        conn.request("POST", "/", body=body, headers=headers)
        resp = conn.getresponse()
        data = resp.read()
        assert resp.status == 200, data
        return data
    finally:
        conn.close()


def enable_auth(moto: Moto, bucket: str) -> Credentials:
    """Switch on moto's IAM authentication; returns the key of a user allowed everything on S3.

    moto accepts any credentials for its first N requests after ``/moto-api/reset-auth`` and
    checks them (the key exists, the signature matches, the policy allows) from then on.
    """
    import http.client
    import re

    conn = http.client.HTTPConnection("127.0.0.1", moto.port, timeout=30)
    conn.request("POST", "/moto-api/reset-auth", body=b"3")
    assert conn.getresponse().status == 200
    conn.close()
    policy = '{"Version":"2012-10-17","Statement":[{"Effect":"Allow","Action":"s3:*","Resource":"*"}]}'
    _iam(moto, {"Action": "CreateUser", "UserName": "cache"})
    _iam(moto, {"Action": "PutUserPolicy", "UserName": "cache", "PolicyName": "s3", "PolicyDocument": policy})
    created = _iam(moto, {"Action": "CreateAccessKey", "UserName": "cache"}).decode()
    key = re.search(r"<AccessKeyId>([^<]+)</AccessKeyId>", created).group(1)
    secret = re.search(r"<SecretAccessKey>([^<]+)</SecretAccessKey>", created).group(1)
    return Credentials(key, secret)
