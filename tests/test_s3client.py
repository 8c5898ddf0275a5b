"""The S3 client's retries, breaker and credentials, and the start-up sentences moto cannot provoke.

moto checks neither the clock nor the region, answers no 5xx and honours If-None-Match, so these
cases use a small stdlib HTTP server that answers as a real store does in each case.
"""

from __future__ import annotations

import http.server

import pytest

from polykit_cache.s3client import Breaker, Endpoint, S3Client, Unreachable, load_credentials
from polykit_cache.s3store import S3Store, StoreMisconfigured
from polykit_cache.sigv4 import Credentials
from polykit_cache.storage import Storage
from support import serve_handler

CREDS = Credentials("AKIDEXAMPLE", "secret-key-never-shown")


def error_xml(code: str, message: str = "") -> bytes:
    return f'<?xml version="1.0"?><Error><Code>{code}</Code><Message>{message}</Message></Error>'.encode()


class Scripted(http.server.BaseHTTPRequestHandler):
    """Answers each request with the next (status, body) of ``server.script``; then 200 forever."""

    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def _answer(self):
        length = int(self.headers.get("Content-Length") or 0)
        self.rfile.read(length)
        self.server.seen.append((self.command, self.path, {k.lower(): v for k, v in self.headers.items()}))
        status, body = self.server.script.pop(0) if self.server.script else (200, b"")
        if callable(status):
            status, body = status(self)
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _answer


def client_for(server, **kwargs) -> S3Client:
    return S3Client(Endpoint.make(f"http://127.0.0.1:{server.server_port}", "eu-west-1", "bucket", "path"), CREDS, **kwargs)


def test_5xx_and_slowdown_are_retried_then_succeed():
    with serve_handler(Scripted, script=[(503, error_xml("SlowDown")), (500, error_xml("InternalError")), (200, b"ok")],
                       seen=[]) as server:
        answer = client_for(server).request("GET", "key")
        assert answer.body == b"ok" and len(server.seen) == 3


def test_a_dead_bucket_opens_the_breaker_and_requests_fail_at_once():
    with serve_handler(Scripted, script=[(503, b"")] * 100, seen=[]) as server:
        client = client_for(server, breaker=Breaker(failures=3, cooldown=60))
        with pytest.raises(Unreachable):
            client.request("GET", "key")
        asked = len(server.seen)
        assert asked == 3  # the breaker opened after three failures in a row
        with pytest.raises(Unreachable, match="failed repeatedly"):
            client.request("GET", "other")
        assert len(server.seen) == asked  # not asked at all while open


def test_a_final_4xx_is_not_retried():
    from polykit_cache.s3client import S3Error

    with serve_handler(Scripted, script=[(403, error_xml("AccessDenied", "no"))], seen=[]) as server:
        with pytest.raises(S3Error) as caught:
            client_for(server).request("GET", "key")
        assert caught.value.code == "AccessDenied" and len(server.seen) == 1


def test_requests_are_signed_for_the_region_and_carry_the_payload_hash():
    with serve_handler(Scripted, script=[], seen=[]) as server:
        client_for(server).request("PUT", "a b/c", body=b"data")
        method, path, headers = server.seen[0]
        assert (method, path) == ("PUT", "/bucket/a%20b/c")
        assert "/eu-west-1/s3/aws4_request" in headers["authorization"]
        assert headers["x-amz-content-sha256"] == __import__("hashlib").sha256(b"data").hexdigest()
        assert "secret-key-never-shown" not in str(headers)


@pytest.mark.parametrize("code, sentence", [
    ("RequestTimeTooSkewed", "clock differs too much"),
    ("AuthorizationHeaderMalformed", "is not in region 'eu-west-1'"),
    ("SignatureDoesNotMatch", "secret access key is wrong"),
    ("InvalidAccessKeyId", "access key is not known"),
    ("NoSuchBucket", "'bucket' does not exist"),
    ("AccessDenied", "access to bucket 'bucket' is denied"),
])
def test_start_up_explains_each_refusal_in_a_sentence(tmp_path, code, sentence):
    status = 404 if code == "NoSuchBucket" else 400 if code == "AuthorizationHeaderMalformed" else 403
    with serve_handler(Scripted, script=[(status, error_xml(code))], seen=[]) as server:
        store = S3Store(client_for(server), "cache", Storage(tmp_path / "tier"))
        with pytest.raises(StoreMisconfigured, match=sentence):
            store.check()


def test_a_store_that_ignores_if_none_match_is_refused_unless_accepted(tmp_path):
    with serve_handler(Scripted, script=[], seen=[]) as server:  # every write succeeds
        store = S3Store(client_for(server), "cache", Storage(tmp_path / "tier"))
        with pytest.raises(StoreMisconfigured, match="ignores If-None-Match"):
            store.check()
        assert [m for m, _, h in server.seen if m == "PUT" and h.get("if-none-match") == "*"]
        store.check(accept_last_writer_wins=True)
        assert store.conditional is False


def test_credentials_come_from_the_environment_then_the_profile(tmp_path):
    assert load_credentials({"AWS_ACCESS_KEY_ID": "A", "AWS_SECRET_ACCESS_KEY": "S", "AWS_SESSION_TOKEN": "T"}) == \
        Credentials("A", "S", "T")
    shared = tmp_path / "credentials"
    shared.write_text("[default]\naws_access_key_id = D\naws_secret_access_key = DS\n"
                      "[ci]\naws_access_key_id = C\naws_secret_access_key = CS\naws_session_token = CT\n")
    env = {"AWS_SHARED_CREDENTIALS_FILE": str(shared)}
    assert load_credentials(env) == Credentials("D", "DS")
    assert load_credentials({**env, "AWS_PROFILE": "ci"}) == Credentials("C", "CS", "CT")
    with pytest.raises(Exception, match="profile 'other'"):
        load_credentials({**env, "AWS_PROFILE": "other"})


def test_addressing_is_virtual_on_aws_and_by_path_elsewhere():
    aws = Endpoint.make(None, "eu-west-1", "my-bucket")
    assert aws.virtual_host and aws.host == "my-bucket.s3.eu-west-1.amazonaws.com" and aws.path("k/x") == "/k/x"
    minio = Endpoint.make("http://minio:9000", "us-east-1", "my-bucket")
    assert not minio.virtual_host and minio.host == "minio:9000" and minio.path("k/x") == "/my-bucket/k/x"
    assert Endpoint.make("http://minio:9000", "us-east-1", "b", "virtual").host == "b.minio:9000"


def test_an_oversized_answer_is_refused_not_held():
    from polykit_cache.s3client import MAX_ANSWER_BODY

    huge = (200, b"<" * (MAX_ANSWER_BODY + 10))
    with serve_handler(Scripted, script=[huge], seen=[]) as server:
        with pytest.raises(Unreachable, match="more than"):
            client_for(server).request("GET", "", params=[("list-type", "2")])


class Endless(http.server.BaseHTTPRequestHandler):
    """A broken store: GET answers with no length and sends until the connection is closed."""

    def log_message(self, *args):
        pass

    def do_GET(self):
        self.send_response(200)
        self.send_header("x-amz-meta-sha256", "0" * 64)
        self.end_headers()  # HTTP/1.0 without Content-Length: the body ends when the connection does
        try:
            for _ in range(1000):  # at most 64 MiB, though the reader should stop long before
                self.wfile.write(b"x" * 65536)
        except OSError:
            pass


def test_a_store_sending_more_than_it_announced_cannot_fill_the_tier(tmp_path):
    with serve_handler(Endless) as server:
        store = S3Store(client_for(server), "cache", Storage(tmp_path / "tier"))
        assert store.open("kv", "ns/key") is None  # never served
        assert not any((tmp_path / "tier" / "tmp").iterdir())
        assert store.tier.usage().count == 0
