"""The application over the in-memory store: routes and protocols need no disk, only the interface."""

from __future__ import annotations

import pytest

from polykit_cache.app import make_app
from polykit_cache.config import Config
from polykit_cache.memstore import Backing, MemoryStore
from polykit_cache.store import StorageUnavailable
from support import KEY, call, pack_tree, sha


def memory_app(tmp_path, store=None):
    return make_app(Config(storage_dir=tmp_path / "unused"), store or MemoryStore())


def test_artifacts_round_trip_in_memory_and_first_write_wins(tmp_path):
    app = memory_app(tmp_path)
    blob = pack_tree(tmp_path, {"a.txt": b"hello"})
    assert call(app, "PUT", f"/v1/artifacts/{KEY}", blob).status == 201
    got = call(app, "GET", f"/v1/artifacts/{KEY}")
    assert got.status == 200 and got.body == blob and got.headers["x-artifact-hash"] == sha(blob)
    assert call(app, "PUT", f"/v1/artifacts/{KEY}", blob).status == 409
    assert call(app, "GET", f"/v1/artifacts/{KEY}", headers={"If-None-Match": f'"{sha(blob)}"'}).status == 304
    assert not (tmp_path / "unused").exists()


def test_every_protocol_runs_on_the_memory_store(tmp_path):
    app = memory_app(tmp_path)
    assert call(app, "PUT", "/v8/artifacts/abc?team=t", b"tb", headers={"x-artifact-duration": "7", "x-artifact-tag": "tg"}).status == 202
    turbo = call(app, "GET", "/v8/artifacts/abc?team=t")
    assert turbo.body == b"tb" and turbo.headers["x-artifact-duration"] == "7" and turbo.headers["x-artifact-tag"] == "tg"
    assert call(app, "POST", "/v8/artifacts?team=t", b'{"hashes": ["abc", "zzz"]}').json() == {
        "abc": {"size": 2, "taskDurationMs": 7, "tag": "tg"}, "zzz": None}
    assert call(app, "PUT", "/v1/cache/h1", b"nx").status == 200 and call(app, "PUT", "/v1/cache/h1", b"x").status == 409
    assert call(app, "PUT", "/kv/ccache/ab/cd", b"kv").status == 201 and call(app, "GET", "/kv/ccache/ab/cd").body == b"kv"
    ac = "/ac/" + "1" * 64
    assert call(app, "PUT", ac, b"one").status == 200 and call(app, "PUT", ac, b"two").status == 200
    assert call(app, "GET", ac).body == b"two"
    assert call(app, "PUT", f"/cas/{sha(b'c')}", b"not c").status == 400
    assert app.storage.stat("bazel-cas", sha(b"c")) is None


def test_a_commit_lost_to_another_server_is_a_409(tmp_path):
    backing = Backing()
    app = memory_app(tmp_path, MemoryStore(backing))
    other = MemoryStore(backing)

    class Racing(MemoryStore):
        """Another server commits the same key between this upload's check and its commit."""

        def commit(self, space, name, staged, meta=None):
            winner = other.stage()
            winner.write(b"theirs")
            other.commit(space, name, winner)
            return super().commit(space, name, staged, meta)

    app.storage = Racing(backing)
    reply = call(app, "PUT", f"/v1/artifacts/{KEY}", pack_tree(tmp_path, {"a": b"x"}))
    assert reply.status == 409 and reply.json()["error"] == "exists"


class Unreachable(MemoryStore):
    def stat(self, *args, **kwargs):
        raise StorageUnavailable("the bucket is down")

    open = stat


@pytest.mark.parametrize("path, shape", [
    (f"/v1/artifacts/{KEY}", lambda r: r.json()["error"] == "unavailable"),
    ("/v8/artifacts/abc", lambda r: r.json()["error"]["code"] == "unavailable"),
    ("/v1/cache/abc", lambda r: b"cannot be reached" in r.body),
    ("/kv/ns/key", lambda r: r.json()["error"] == "unavailable"),
])
def test_an_unreachable_store_is_a_503_in_each_protocol_s_shape(tmp_path, path, shape):
    app = memory_app(tmp_path, Unreachable())
    reply = call(app, "GET", path)
    assert reply.status == 503 and shape(reply) and reply.headers["retry-after"] == "5"
