"""Bundles: many stored artifacts in one streamed answer (``POST /v1/bundles``), and the client
that downloads a fresh checkout's remote hits in a few of them."""

from __future__ import annotations

import io
import json
import os

import pytest

from polykit_cache import app as app_module
from polykit_cache.app import MAX_QUERY_KEYS, QUERY_BODY_LIMIT
from polykit_cache.store import StorageUnavailable
from polykit_cache.http import SEND_CHUNK
from polykit_cache.routes import Router
from polykit_client import bundle
from polykit_client.prefetch import BUNDLE_BYTES, bundles
from polykit_client.remote import RemoteCache
from sample import Polykit, copy_workspace, make_tools, make_workspace
from support import KEY, OTHER_KEY, ExplodingInput, call, key_for, make_environ, new_app, pack_tree, sha, thread_server
from test_auth import READER, bearer, secured_app

THIRD_KEY = key_for("third")
BUILDS = ["api-server:build", "shared-utils:build", "web:build"]


def ask(app, keys, path="/v1/bundles", headers=None):
    return call(app, "POST", path, json.dumps({"keys": keys}).encode(), headers)


def frames(body: bytes, keys: list[str], trailer: int | None = None) -> dict[str, bytes | None]:
    """The bundle read as a client reads it: each frame of the expected key, then the trailer
    (counting ``trailer`` frames: fewer than asked when the server ended the bundle early)."""
    stream = io.BytesIO(body)
    found: dict[str, bytes | None] = {}
    for key in keys:
        head = bundle.parse_head(stream.readline(bundle.MAX_HEAD + 1), key)
        if head is None:
            found[key] = None
            continue
        data = stream.read(head[0])
        assert len(data) == head[0] and sha(data) == head[1]
        found[key] = data
    bundle.parse_trailer(stream.readline(bundle.MAX_HEAD + 1), len(keys) if trailer is None else trailer)
    assert stream.read() == b""
    return found


def store(app, tmp_path, key: str, files: dict[str, bytes], prefix: str = "") -> bytes:
    blob = pack_tree(tmp_path, files, key=key)
    assert call(app, "PUT", f"{prefix}/v1/artifacts/{key}", blob).status == 201
    return blob


# --- the protocol, on the WSGI app --------------------------------------------------------------


def test_a_bundle_holds_the_keys_in_the_order_asked_and_says_which_are_not_stored(tmp_path):
    app = new_app(tmp_path / "store")
    one = store(app, tmp_path, KEY, {"a.txt": b"one"})
    three = store(app, tmp_path, THIRD_KEY, {"b.txt": os.urandom(3 * SEND_CHUNK)})  # sent in several chunks
    reply = ask(app, [THIRD_KEY, OTHER_KEY, KEY])
    assert reply.status == 200 and reply.headers["content-type"] == bundle.CONTENT_TYPE
    assert "content-length" not in reply.headers  # an entry may go before its turn: the trailer ends it
    assert frames(reply.body, [THIRD_KEY, OTHER_KEY, KEY]) == {THIRD_KEY: three, OTHER_KEY: None, KEY: one}
    assert ask(app, []).body == bundle.trailer(0)
    # Streamed a chunk at a time: nothing the size of the list, nor of an entry, is held at once.
    pieces = app(make_environ("POST", "/v1/bundles", json.dumps({"keys": [THIRD_KEY, KEY]}).encode()),
                 lambda status, headers: None)
    assert max(len(piece) for piece in pieces) <= SEND_CHUNK


def test_a_stream_cut_anywhere_is_told_from_a_whole_one(tmp_path):
    app = new_app(tmp_path / "store")
    store(app, tmp_path, KEY, {"a.txt": b"one"})
    body = ask(app, [KEY, OTHER_KEY]).body
    for cut in range(len(body)):
        with pytest.raises((bundle.BadFrame, AssertionError)):
            frames(body[:cut], [KEY, OTHER_KEY])
    with pytest.raises(bundle.BadFrame):  # another order than the one asked
        frames(body, [OTHER_KEY, KEY])


def test_an_entry_gone_before_its_turn_is_not_stored_never_torn(tmp_path):
    app = new_app(tmp_path / "store")
    one = store(app, tmp_path, KEY, {"a.txt": b"one"})
    store(app, tmp_path, OTHER_KEY, {"b.txt": b"two"})
    answer = app(make_environ("POST", "/v1/bundles", json.dumps({"keys": [KEY, OTHER_KEY]}).encode()),
                 lambda status, headers: None)
    pieces = iter(answer)
    first = next(pieces)  # the stream has reached the first entry, not the second
    assert app.storage.delete("polykit", OTHER_KEY)  # evicted meanwhile
    body = first + b"".join(pieces)
    assert frames(body, [KEY, OTHER_KEY]) == {KEY: one, OTHER_KEY: None}


def test_bundles_are_counted_as_the_gets_they_stand_for(tmp_path):
    app = new_app(tmp_path / "store")
    one = store(app, tmp_path, KEY, {"a.txt": b"one"})
    before = call(app, "GET", "/v1/stats").json()
    ask(app, [KEY, OTHER_KEY, KEY])
    after = call(app, "GET", "/v1/stats").json()
    assert after["hits"] - before["hits"] == 2 and after["misses"] - before["misses"] == 1
    assert after["bytes_out"] - before["bytes_out"] == 2 * len(one)
    assert 'polykit_cache_requests_total{protocol="polykit",method="POST",status="200"}' in call(app, "GET", "/metrics").body.decode()


def test_a_bundle_ends_early_at_its_bytes_and_counts_only_what_it_sent(tmp_path, monkeypatch):
    """A bundle carries at most BUNDLE_BYTES of artifacts, so the worker writing it never waits
    for a slow reader: it ends, before the first artifact that would take it over, with the
    trailer counting the frames sent; what it did not send is not counted."""
    app = new_app(tmp_path / "store")
    one = store(app, tmp_path, KEY, {"a.txt": b"one"})
    store(app, tmp_path, THIRD_KEY, {"b.txt": os.urandom(20_000)})
    monkeypatch.setattr(app_module, "BUNDLE_BYTES", len(one) + 100)
    before = call(app, "GET", "/v1/stats").json()
    body = ask(app, [KEY, OTHER_KEY, THIRD_KEY, KEY]).body
    assert frames(body, [KEY, OTHER_KEY], trailer=2) == {KEY: one, OTHER_KEY: None}
    after = call(app, "GET", "/v1/stats").json()
    assert after["hits"] - before["hits"] == 1 and after["misses"] - before["misses"] == 1
    assert after["bytes_out"] - before["bytes_out"] == len(one)
    # Even a first artifact over the bound is not sent: the client GETs it (from the I/O thread).
    assert frames(ask(app, [THIRD_KEY, KEY]).body, [], trailer=0) == {}


@pytest.mark.parametrize("fails", ["open", "read"])
def test_a_storage_failing_mid_bundle_ends_it_without_its_trailer(tmp_path, fails):
    """The 200 is sent before the entries are opened, so a storage that fails then (a bucket out
    of reach, a disk error) cannot become a 503: the bundle ends at the last whole frame, without
    its trailer, which the client reads as a bundle cut short."""
    app = new_app(tmp_path / "store")
    one = store(app, tmp_path, KEY, {"a.txt": b"one"})
    store(app, tmp_path, THIRD_KEY, {"c.txt": b"three"})
    opened = app.storage.open

    def failing(space, name, use=True):
        if not name.endswith(THIRD_KEY):
            return opened(space, name, use)
        if fails == "open":
            raise StorageUnavailable("the bucket cannot be reached")
        info, fh = opened(space, name, use)
        with fh:
            return info, io.BytesIO(fh.read()[:-1])  # the stored file ends short of its size

    app.storage.open = failing
    reply = ask(app, [KEY, THIRD_KEY, OTHER_KEY])
    assert reply.status == 200
    stream = io.BytesIO(reply.body)
    size, digest = bundle.parse_head(stream.readline(bundle.MAX_HEAD + 1), KEY)
    assert stream.read(size) == one
    rest = stream.read()
    if fails == "open":
        assert rest == b""  # nothing of the entry that could not be opened, and no trailer
    else:  # its head, then its body cut short: no trailer can follow
        head, _, body = rest.partition(b"\n")
        assert len(body) < bundle.parse_head(head + b"\n", THIRD_KEY)[0]
    assert call(app, "GET", "/healthz").status == 200


def test_bundles_are_per_namespace(tmp_path):
    app = new_app(tmp_path / "store")
    blob = store(app, tmp_path, KEY, {"a.txt": b"team"}, prefix="/team-a")
    assert frames(ask(app, [KEY]).body, [KEY]) == {KEY: None}
    assert frames(ask(app, [KEY], "/team-b/v1/bundles").body, [KEY]) == {KEY: None}
    assert frames(ask(app, [KEY], "/team-a/v1/bundles").body, [KEY]) == {KEY: blob}
    assert ask(app, [KEY], "/bad%2Fname/v1/bundles").status in (400, 404)


def test_a_bundle_is_a_read(tmp_path):
    app = secured_app(tmp_path)
    assert ask(app, [KEY]).status == 401
    assert ask(app, [KEY], headers=bearer("not-a-known-token")).status == 401
    reply = ask(app, [KEY], headers=bearer(READER))
    assert reply.status == 200 and frames(reply.body, [KEY]) == {KEY: None}


def test_bundle_requests_are_bounded_like_the_batch_query(tmp_path):
    app = new_app(tmp_path / "store")
    too_many = ask(app, [key_for(str(i)) for i in range(MAX_QUERY_KEYS + 1)])
    assert too_many.status == 400 and too_many.json()["error"] == "bad_request"
    assert ask(app, [KEY, "not-a-key"]).json()["error"] == "bad_key"
    for body in (b"[]", b"{}", b'{"keys": "x"}', b"[" * 100_000, b"\xff"):
        assert call(app, "POST", "/v1/bundles", body).status == 400
    huge = call(app, "POST", "/v1/bundles", headers={"Content-Length": str(QUERY_BODY_LIMIT + 1)},
                body_stream=ExplodingInput())  # refused from its length: the body is never read
    assert huge.status == 413
    for method in ("GET", "HEAD", "PUT"):
        refused = call(app, method, "/v1/bundles")
        assert refused.status == 405 and refused.headers["allow"] == "POST"


# --- the client, against a real server ----------------------------------------------------------


def collect(remote: RemoteCache, keys: list[str]) -> tuple[list[str] | None, dict[str, bytes | None]]:
    """fetch_bundle into memory: the keys left to fetch one by one, and what each ``done`` said."""
    files: dict[str, io.BytesIO] = {}
    seen: dict[str, bytes | None] = {}

    class Kept(io.BytesIO):
        def close(self) -> None:  # kept readable for the test
            pass

    def open_dest(key):
        files[key] = Kept()
        return files[key], None

    def done(key, ok):
        assert key not in seen
        seen[key] = files[key].getvalue() if ok else None

    return remote.fetch_bundle(keys, 0, open_dest, done), seen


def cut_after_frames(app, count: int) -> None:
    """Make the app's bundles break off (the connection dropped) after ``count`` frames."""
    whole = app._bundle_body

    def cut(environ, keys):
        body = whole(environ, keys[:count])
        for piece in body:
            if piece.startswith(b"end "):
                raise ConnectionAbortedError("cut off for the test")
            yield piece

    app._bundle_body = cut


def test_the_client_reads_a_bundle_and_says_once_when_one_breaks_off(tmp_path):
    warnings: list[str] = []
    with thread_server(tmp_path / "store") as (port, app):
        one = store(app, tmp_path, KEY, {"a.txt": b"one"})
        three = store(app, tmp_path, THIRD_KEY, {"c.txt": b"three"})
        remote = RemoteCache(f"http://127.0.0.1:{port}", environ={}, warn=warnings.append)
        assert collect(remote, [KEY, OTHER_KEY, THIRD_KEY]) == ([], {KEY: one, OTHER_KEY: None, THIRD_KEY: three})
        assert remote.bytes_down == len(one) + len(three) and warnings == []

        cut_after_frames(app, 1)
        assert collect(remote, [KEY, OTHER_KEY, THIRD_KEY]) == ([OTHER_KEY, THIRD_KEY], {KEY: one})
        assert collect(remote, [THIRD_KEY, KEY]) == ([KEY], {THIRD_KEY: three})
        assert len(warnings) == 1 and "bundle of downloads broke off" in warnings[0] and remote.enabled

        app.router = Router([route for route in app.router.routes if route.pattern != "/v1/bundles"])
        assert collect(remote, [KEY]) == (None, {})  # an older server: quiet
        assert len(warnings) == 1


def test_a_bundle_the_server_ends_early_leaves_the_rest_to_gets_quietly(tmp_path, monkeypatch):
    warnings: list[str] = []
    with thread_server(tmp_path / "store") as (port, app):
        one = store(app, tmp_path, KEY, {"a.txt": b"one"})
        store(app, tmp_path, THIRD_KEY, {"c.txt": os.urandom(20_000)})
        monkeypatch.setattr(app_module, "BUNDLE_BYTES", len(one))
        remote = RemoteCache(f"http://127.0.0.1:{port}", environ={}, warn=warnings.append)
        assert collect(remote, [KEY, OTHER_KEY, THIRD_KEY]) == ([THIRD_KEY], {KEY: one, OTHER_KEY: None})
        assert collect(remote, [THIRD_KEY, KEY]) == ([THIRD_KEY, KEY], {})
        assert warnings == [] and remote.enabled


def rot(folder, blob: bytes | None = None) -> None:
    """One stored artifact's bytes rot on the server's disk, its recorded digest and mtime kept:
    the one holding ``blob``, or the largest."""
    files = [p for p in folder.rglob("*.zst") if p.is_file()]
    victim = next(p for p in files if p.read_bytes() == blob) if blob else max(files, key=lambda p: p.stat().st_size)
    st = victim.stat()
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    with open(victim, "r+b") as fh:
        fh.write(data)
    os.utime(victim, ns=(st.st_atime_ns, st.st_mtime_ns))


def test_a_corrupt_frame_is_refused_alone_and_the_bundle_goes_on(tmp_path):
    warnings: list[str] = []
    with thread_server(tmp_path / "store") as (port, app):
        rot_me = store(app, tmp_path, KEY, {"a.txt": b"one"})
        three = store(app, tmp_path, THIRD_KEY, {"c.txt": b"three"})
        rot(tmp_path / "store", rot_me)
        remote = RemoteCache(f"http://127.0.0.1:{port}", environ={}, warn=warnings.append)
        assert collect(remote, [KEY, THIRD_KEY]) == ([], {KEY: None, THIRD_KEY: three})
    assert len(warnings) == 1 and "does not match the SHA-256 of its bundle frame" in warnings[0]


def test_bundles_follow_the_order_and_bound_their_size():
    sizes = {key_for(str(i)): 1000 for i in range(100)}
    keys = list(sizes)
    groups = bundles(keys, sizes)
    assert [key for group in groups for key in group] == keys and len(groups) == 4
    sizes[keys[10]] = BUNDLE_BYTES + 1  # too large for a bundle: its own GET
    sizes[keys[20]] = BUNDLE_BYTES // 2 + 1
    sizes[keys[21]] = BUNDLE_BYTES // 2 + 1
    groups = bundles(keys, sizes)
    assert [keys[10]] in groups and all(sum(sizes[k] for k in g) <= BUNDLE_BYTES for g in groups if len(g) > 1)
    assert [key for group in groups if group != [keys[10]] for key in group] == keys[:10] + keys[11:]
    assert bundles(keys[:3], sizes) == [keys[:3]]  # a few keys: one bundle


# --- whole builds ---------------------------------------------------------------------------------


def fresh_clone_against(tmp_path, prepare) -> tuple[Polykit, object, dict]:
    """Build the sample once against a real server, ``prepare(app)``, then build a fresh clone."""
    pk = Polykit(make_workspace(tmp_path / "ws"), make_tools(tmp_path / "tools"), tmp_path / "marker")
    with thread_server(tmp_path / "store") as (port, app):
        url = f"http://127.0.0.1:{port}"
        pk.run("build", "--remote-cache-url", url)
        assert pk.ran() == BUILDS
        prepare(app)
        before = {k: n for k, n in app.metrics.requests.items()}
        other = copy_workspace(pk.workspace, tmp_path / "clone")
        out = pk.run("build", "--remote-cache-url", url, cwd=other)
        seen = {k[1:]: n - before.get(k, 0) for k, n in app.metrics.requests.items() if n - before.get(k, 0)}
    for built in ("packages/shared-utils/dist/utils.txt", "packages/web/dist/index.html"):
        if (pk.workspace / built).exists():
            assert (other / built).read_bytes() == (pk.workspace / built).read_bytes()
    return pk, out, seen


def test_a_fresh_clone_restores_every_output_from_bundles(tmp_path):
    pk, out, seen = fresh_clone_against(tmp_path, lambda app: None)
    assert pk.ran() == [] and "3 remote hits, 0 misses" in out.stdout and out.stderr == ""
    assert seen.get(("POST", 200), 0) >= 2 and set(seen) <= {("POST", 200), ("GET", 200)}


def test_an_older_server_without_bundles_is_asked_artifact_by_artifact_quietly(tmp_path):
    def older(app):
        app.router = Router([route for route in app.router.routes if route.pattern != "/v1/bundles"])

    pk, out, seen = fresh_clone_against(tmp_path, older)
    assert pk.ran() == [] and "3 remote hits, 0 misses" in out.stdout and out.stderr == ""
    assert seen[("GET", 200)] == 3


def test_bundles_the_server_ends_early_are_completed_by_gets(tmp_path, monkeypatch):
    monkeypatch.setattr(app_module, "BUNDLE_BYTES", 1)  # not one artifact fits: all by GET
    pk, out, seen = fresh_clone_against(tmp_path, lambda app: None)
    assert pk.ran() == [] and "3 remote hits, 0 misses" in out.stdout and out.stderr == ""
    assert seen[("GET", 200)] == 3


def test_a_bundle_broken_part_way_keeps_what_came_and_fetches_the_rest(tmp_path):
    pk, out, seen = fresh_clone_against(tmp_path, lambda app: cut_after_frames(app, 1))
    assert pk.ran() == [] and "3 remote hits, 0 misses" in out.stdout
    assert out.stderr.count("warning:") <= 1 and "Traceback" not in out.stderr


def test_a_tampered_artifact_in_a_bundle_is_built_and_the_others_restored(tmp_path):
    pk, out, seen = fresh_clone_against(tmp_path, lambda app: rot(tmp_path / "store"))
    assert len(pk.ran()) == 1 and "2 remote hits, 1 miss" in out.stdout
    assert out.stderr.count("warning:") == 1 and "corrupt" in out.stderr


def test_bundles_are_served_from_the_s3_store(tmp_path):
    from polykit_cache.app import make_app
    from polykit_cache.config import Config
    from s3support import moto_server, s3_store

    with moto_server(tmp_path) as moto:
        bucket = moto.make_bucket()
        writer = make_app(Config(storage_dir=tmp_path / "one"), s3_store(moto, bucket, tmp_path / "tier-one"))
        blob = store(writer, tmp_path, KEY, {"a.txt": b"in the bucket"})
        # Another server on the bucket, its local tier empty: the entry comes from the bucket in its turn.
        reader = make_app(Config(storage_dir=tmp_path / "two"), s3_store(moto, bucket, tmp_path / "tier-two"))
        reply = ask(reader, [OTHER_KEY, KEY])
        assert frames(reply.body, [OTHER_KEY, KEY]) == {OTHER_KEY: None, KEY: blob}
        stats = call(reader, "GET", "/v1/stats").json()
        assert stats["hits"] == 1 and stats["misses"] == 1
