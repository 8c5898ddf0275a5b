"""Access control: bearer tokens with roles, anonymous reads, reloads, and no token in any log."""

import signal
import time

import pytest

from polykit_cache.app import make_app
from polykit_cache.auth import KEPT_ROLES, Access, TokenError, parse_tokens
from polykit_cache.config import Config
from polykit_cache.storage import Storage
from sample import Polykit, copy_workspace, make_tools, make_workspace
from support import KEY, ServerProcess, call, pack_tree, request

ART = f"/v1/artifacts/{KEY}"
READER, WRITER = "read-token-123456", "write-token-abcdef"
TOKENS = f"# team tokens\nread {READER}\nread-write {WRITER}  # CI\n"


def secured_app(tmp_path, anonymous_read=False):
    token_file = tmp_path / "tokens"
    token_file.write_text(TOKENS)
    storage = Storage(tmp_path / "store")
    storage.recover()
    config = Config(storage_dir=storage.root, token_file=token_file, allow_anonymous_read=anonymous_read)
    return make_app(config, storage, access=Access(token_file, {}, anonymous_read))


def bearer(token):
    return {"Authorization": f"Bearer {token}"}


def test_every_auth_case(tmp_path):
    app = secured_app(tmp_path)
    blob = pack_tree(tmp_path, {"a": b"x"})
    no_token = call(app, "PUT", ART, blob)
    assert no_token.status == 401 and no_token.json()["error"] == "unauthorized"
    assert no_token.all("www-authenticate") == ['Bearer realm="polykit-cache"', 'Basic realm="polykit-cache", charset="UTF-8"']
    bad = call(app, "PUT", ART, blob, headers=bearer("not-a-known-token"))
    assert bad.status == 401 and 'error="invalid_token"' in bad.all("www-authenticate")[0]
    assert call(app, "PUT", ART, blob, headers={"Authorization": f"Basic {WRITER}"}).status == 401
    read_write = call(app, "PUT", ART, blob, headers=bearer(READER))
    assert read_write.status == 403 and read_write.json()["error"] == "forbidden"
    assert call(app, "PUT", ART, blob, headers=bearer(WRITER)).status == 201
    assert call(app, "GET", ART).status == 401
    assert call(app, "HEAD", ART).status == 401
    assert call(app, "GET", ART, headers=bearer(READER)).body == blob
    assert call(app, "HEAD", ART, headers=bearer(WRITER)).status == 200
    for path in ("/metrics", "/v1/stats"):
        assert call(app, "GET", path).status == 401
        assert call(app, "GET", path, headers=bearer(READER)).status == 200
    assert call(app, "GET", "/healthz").status == 200  # always open
    assert call(app, "GET", "/v1/stats", headers=bearer(READER)).json()["uploads_rejected"] == {"unauthorized": 3, "forbidden": 1}


def test_anonymous_read_lets_reads_through_but_not_writes(tmp_path):
    app = secured_app(tmp_path, anonymous_read=True)
    blob = pack_tree(tmp_path, {"a": b"x"})
    assert call(app, "PUT", ART, blob).status == 401
    assert call(app, "PUT", ART, blob, headers=bearer(WRITER)).status == 201
    assert call(app, "GET", ART).body == blob
    assert call(app, "HEAD", ART).status == 200
    assert call(app, "GET", ART, headers=bearer("wrong-token-000")).status == 401


def test_without_tokens_the_server_is_open(app, tmp_path):
    assert call(app, "PUT", ART, pack_tree(tmp_path, {"a": b"x"})).status == 201


@pytest.mark.parametrize("text,problem", [
    ("admin sometoken123", "the first word must be a role"),
    ("sometoken123 read-write", "the first word must be a role"),  # swapped words: the token comes first
    ("read", "expected 'role token'"),
    ("read short", "at least 8 characters"),
])
def test_bad_token_lines_are_named_without_the_token(text, problem):
    with pytest.raises(TokenError) as err:
        parse_tokens(text, "tokens.txt")
    assert problem in str(err.value) and "line 1" in str(err.value)
    assert "sometoken123" not in str(err.value)


def test_an_empty_token_file_never_opens_the_server(tmp_path):
    token_file = tmp_path / "tokens"
    token_file.write_text("# nothing yet\n")
    with pytest.raises(TokenError, match="holds no tokens"):
        Access(token_file, {}, False)
    token_file.write_text(f"read-write {WRITER}\n")
    access = Access(token_file, {}, False)
    token_file.write_text("")  # truncated by an editor when SIGHUP arrives
    access.reload()
    assert not access.open and access.check(None, write=True)[0] == 401


def test_a_hash_inside_a_token_is_part_of_it():
    assert parse_tokens("read-write abcdefgh#ijkl  # CI", "f") == [("read-write", b"abcdefgh#ijkl")]
    assert parse_tokens("read abcdefgh,ijkl", "f") == [("read", b"abcdefgh,ijkl")]


def test_tokens_from_the_environment(tmp_path):
    access = Access(None, {"POLYKIT_CACHE_TOKENS": f"read {READER}, read-write {WRITER}"}, False)
    assert access.role(f"Bearer {READER}") == "read" and access.role(f"bearer {WRITER}") == "read-write"
    assert access.role("Bearer nope-nope-nope") is None


def test_a_role_kept_for_a_header_never_outlives_its_token_and_stays_bounded(tmp_path):
    import base64

    token_file = tmp_path / "tokens"
    token_file.write_text(TOKENS)
    access = Access(token_file, {}, False)
    for _ in range(2):  # the second answer comes from the role kept for the header
        assert access.role(f"Bearer {READER}") == "read" and access.role(f"Bearer {WRITER}") == "read-write"
    for n in range(50):  # refused values are never kept: they cannot push the valid ones out
        assert access.role(f"Bearer wrong-token-{n:04}") is None
    assert access.role(f"Bearer {WRITER}x") is None and access.role(f"Bearer {WRITER[:-1]}") is None
    assert access.check(f"Bearer {READER}", write=True)[0] == 403  # the kept role, not a looser one
    token_file.write_text(f"read-write {READER}\n")
    access.reload()
    assert access.role(f"Bearer {WRITER}") is None and access.role(f"Bearer {READER}") == "read-write"
    for n in range(KEPT_ROLES + 10):  # any user name is accepted with basic: one kept role per header
        header = "Basic " + base64.b64encode(f"user{n}:{READER}".encode()).decode()
        assert access.role(header) == "read-write"
    assert len(access._state[1]) <= KEPT_ROLES


def test_real_server_reloads_tokens_on_sighup_and_never_logs_them(tmp_path):
    token_file = tmp_path / "tokens"
    token_file.write_text(TOKENS)
    server = ServerProcess(tmp_path / "store", tmp_path / "server.log", "--token-file", str(token_file))
    try:
        blob = pack_tree(tmp_path, {"a": b"x"})
        assert request(server.port, "PUT", ART, blob, bearer(WRITER))[0] == 201
        assert request(server.port, "GET", ART, headers=bearer(READER))[0] == 200
        token_file.write_text("read-write new-token-777777\n")
        server.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while request(server.port, "HEAD", ART, headers=bearer(READER))[0] != 401:
            assert time.monotonic() < deadline, "tokens were not reloaded"
            time.sleep(0.05)
        assert request(server.port, "HEAD", ART, headers=bearer("new-token-777777"))[0] == 200
        token_file.write_text("swapped-token-888888 read-write\n")  # a broken file keeps the tokens in force
        server.proc.send_signal(signal.SIGHUP)
        time.sleep(0.5)
        assert request(server.port, "HEAD", ART, headers=bearer("new-token-777777"))[0] == 200
    finally:
        server.stop()
    log = (tmp_path / "server.log").read_text()
    assert "access tokens: 1 read, 1 read-write" in log and "tokens not reloaded" in log
    assert "line 1: the first word must be a role" in log
    for secret in (READER, WRITER, "new-token-777777", "swapped-token-888888"):
        assert secret not in log


def test_a_bad_token_file_stops_the_server_with_a_clear_error(tmp_path):
    import subprocess
    import sys

    for line in ("owner secret-secret", "secret-secret read-write"):  # a swapped line puts the token first
        (tmp_path / "tokens").write_text(f"# tokens\n{line}\n")
        out = subprocess.run([sys.executable, "-m", "polykit_cache", "--port", "0", "--storage-dir", str(tmp_path / "s"),
                              "--token-file", str(tmp_path / "tokens")], capture_output=True, text=True, timeout=30)
        assert out.returncode == 2 and "line 2: the first word must be a role" in out.stderr
        assert "secret-secret" not in out.stderr


def test_the_client_sends_its_token_and_degrades_without_one(tmp_path):
    from support import thread_server

    ws = make_workspace(tmp_path / "ws")
    pk = Polykit(ws, make_tools(tmp_path / "tools"), tmp_path / "marker")
    token_file = tmp_path / "tokens"
    token_file.write_text(TOKENS)
    with thread_server(tmp_path / "store", token_file=token_file) as (port, app):
        url = f"http://127.0.0.1:{port}"
        denied = pk.run("build", "--remote-cache-url", url)
        assert "warning:" in denied.stderr and "401" in denied.stderr
        pk.ran()
        assert app.metrics.stats()["uploads"] == 0
        writer = pk.run("build", "--remote-cache-url", url, cwd=copy_workspace(ws, tmp_path / "second"),
                        POLYKIT_REMOTE_CACHE_TOKEN=WRITER)
        assert writer.stderr == "" and app.metrics.stats()["uploads"] == 3
        out = pk.run("build", cwd=copy_workspace(ws, tmp_path / "third"), POLYKIT_REMOTE_CACHE_URL=url,
                     POLYKIT_REMOTE_CACHE_TOKEN=READER)
        assert "3 remote hits" in out.stdout and READER not in out.stdout + out.stderr


def basic(user: str, password: str) -> dict:
    import base64

    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


@pytest.mark.parametrize("path,created", [(ART, 201), ("/kv/gradle/k1", 201), ("/v1/cache/nx1", 200),
                                          ("/cache-v2/kv/gradle/k1", 201)])
def test_basic_authentication_carries_the_token_as_its_password(tmp_path, path, created):
    """Gradle and URLs with user:password@ know only basic authentication (RFC 7617); any user name."""
    app = secured_app(tmp_path)
    body = pack_tree(tmp_path, {"a": b"x"}) if path == ART else b"entry"
    assert call(app, "PUT", path, body, headers=basic("gradle", READER)).status == 403
    assert call(app, "PUT", path, body, headers=basic("anyone", "not-a-known-token")).status == 401
    assert call(app, "PUT", path, body, headers=basic("", WRITER)).status == created
    assert call(app, "GET", path, headers=basic("ci", READER)).body == body
    assert call(app, "GET", path, headers=basic("ci", WRITER)).status == 200


@pytest.mark.parametrize("header", [
    "Basic " + "bm90LWEtdG9rZW4=",  # base64 of a user name without a colon: no password
    "Basic " + "dXNlcjo=",  # "user:" (an empty password)
    "Basic %%%not-base64%%%",
    "Basic",
    "Digest username=x",
    "Bearer",
])
def test_malformed_credentials_are_401_with_both_challenges(tmp_path, header):
    reply = call(secured_app(tmp_path), "GET", ART, headers={"Authorization": header})
    assert reply.status == 401 and reply.json()["error"] == "unauthorized"
    schemes = [challenge.split()[0] for challenge in reply.all("www-authenticate")]
    assert schemes == ["Bearer", "Basic"]


def test_a_basic_password_with_colons_is_whole(tmp_path):
    token_file = tmp_path / "tokens"
    token_file.write_text("read-write tok:with:colons\n")
    storage = Storage(tmp_path / "store")
    storage.recover()
    app = make_app(Config(storage_dir=storage.root, token_file=token_file), storage, access=Access(token_file, {}, False))
    assert call(app, "PUT", "/kv/g/k", b"x", headers=basic("u", "tok:with:colons")).status == 201


def test_nx_and_webdav_uploads_without_a_token_are_403_where_anyone_may_read(tmp_path):
    """Nx takes 401 as fatal but 403 on PUT as "may not write here": cold tasks still run.
    sccache takes 403 on its start-up write as "read only" but 401 as a broken cache."""
    app = secured_app(tmp_path, anonymous_read=True)
    nx = call(app, "PUT", "/v1/cache/nxhash1", b"output")
    assert nx.status == 403 and nx.headers["content-type"] == "text/plain"
    assert b"read-write token" in nx.body
    assert call(app, "PUT", ART, pack_tree(tmp_path, {"a": b"x"})).status == 401  # others ask for a token
    assert call(app, "PUT", "/kv/sccache/.sccache_check", b"ok").status == 403
    assert call(app, "MKCOL", "/kv/sccache/a/").status == 403
    assert call(app, "PUT", "/v1/cache/nxhash1", b"x", headers=bearer("wrong-token-000")).status == 401
    assert call(app, "PUT", "/v1/cache/nxhash1", b"output", headers=bearer(WRITER)).status == 200
    assert call(app, "GET", "/v1/cache/nxhash1").body == b"output"
