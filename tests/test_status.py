"""The server's history and the figures of the status page, /v1/stats and /metrics, through the WSGI app."""

from __future__ import annotations

import base64
import json
import sqlite3

import pytest

from polykit_cache.history import DAY, HOUR, History
from support import KEY, call, key_for, new_app, pack_tree

COMPONENTS = {
    "format": "polykit-cache-key/1", "package": {"name": "web", "path": "packages/web"}, "task": "build",
    "command": "npm run build", "env": {"NODE_ENV": "ab" * 32, "UNSET": None}, "inputs": {"src/a.ts": "cd" * 32},
    "dependencies": {"lib:build": "ef" * 32}, "toolchain": {"language": "ts", "version": "v20"}, "outputs": ["dist/**"],
}


class Clock:
    """A clock the test moves by hand."""

    def __init__(self, now: float = 1_800_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def upload(app, tmp_path, package="web", task="build", duration=1000, key=None, **meta):
    key = key or key_for(f"{package}:{task}:{duration}")
    body = pack_tree(tmp_path, {"out.txt": key.encode()}, key,
                     meta={"package": package, "task": task, "duration_ms": duration, **meta})
    reply = call(app, "PUT", f"/v1/artifacts/{key}", body)
    assert reply.status == 201, reply.body
    return key


# --- history --------------------------------------------------------------------------------


def test_buckets_fill_the_hour_day_and_month_windows_and_age_out(tmp_path):
    clock = Clock()
    history = History(tmp_path / "h.sqlite3", clock)
    history.count("polykit", hits=3, misses=1, bytes_out=30)
    clock.now += 2 * HOUR
    history.count("turbo", hits=1, misses=1)
    summary = history.summary()
    assert summary["windows"]["hour"]["hits"] == 1 and summary["windows"]["hour"]["hit_rate"] == 0.5
    assert summary["windows"]["day"]["hits"] == 4 and summary["windows"]["day"]["hit_rate"] == round(4 / 6, 4)
    assert summary["windows"]["day"]["by_protocol"]["polykit"] == {"hits": 3, "misses": 1, "hit_rate": 0.75}
    clock.now += 2 * DAY
    history.count("polykit", misses=1)
    summary = history.summary()
    assert summary["windows"]["day"]["hits"] == 0
    assert summary["windows"]["month"]["hits"] == 4 and summary["all_time"]["hits"] == 4
    assert len(summary["minutes"]) == 1, "minute buckets older than a day are kept"
    clock.now += 31 * DAY
    history.count("polykit", hits=1)
    summary = history.summary()
    assert summary["windows"]["month"]["hits"] == 1 and summary["all_time"]["hits"] == 5
    assert [row["hits"] for row in summary["hours"]] == [1]


def test_a_restart_keeps_the_history(tmp_path):
    clock = Clock()
    first = History(tmp_path / "h.sqlite3", clock)
    first.count("polykit", hits=2, saved_ms=4000)
    first.stored(KEY, {"package": "web", "task": "build", "duration_ms": 2000, "components": COMPONENTS})
    first.close()  # the last seconds are written when the server stops
    second = History(tmp_path / "h.sqlite3", clock)
    summary = second.summary()
    assert summary["all_time"]["hits"] == 2 and summary["all_time"]["saved_seconds"] == 4.0
    assert second.newest("web", "build")["components"] == COMPONENTS
    assert second.served(KEY, lambda: pytest.fail("the index knew this artifact")) == 2000


def test_tasks_and_artifacts_are_bounded_in_rows(tmp_path):
    clock = Clock()
    history = History(tmp_path / "h.sqlite3", clock, max_tasks=3, max_artifacts=5)
    for n in range(10):
        clock.now += 1
        history.stored(key_for(str(n)), {"package": f"p{n}", "task": "build", "duration_ms": n})
    history.flush()
    db = sqlite3.connect(tmp_path / "h.sqlite3")
    assert db.execute("SELECT count(*) FROM tasks").fetchone()[0] == 3
    assert db.execute("SELECT count(*) FROM newest").fetchone()[0] == 3
    assert db.execute("SELECT count(*) FROM artifacts").fetchone()[0] == 5
    assert history.newest("p9", "build") is not None and history.newest("p0", "build") is None


def test_names_past_the_bound_are_not_indexed(tmp_path):
    history = History(":memory:")
    history.stored(KEY, {"package": "p" * 201, "task": "build", "duration_ms": 5})
    assert history.summary()["top_missing"] == []


def test_an_unusable_history_file_leaves_the_history_in_memory(tmp_path, caplog):
    (tmp_path / "status.sqlite3").mkdir()  # a folder where the database should be
    history = History.open(tmp_path)
    history.count("polykit", hits=1)
    assert history.summary()["all_time"]["hits"] == 1
    assert "cannot be kept" in caplog.text


# --- the app's figures ------------------------------------------------------------------------


def test_hits_save_each_artifact_s_duration_in_stats_and_metrics(tmp_path):
    app = new_app(tmp_path / "store")
    web = upload(app, tmp_path, "web", "build", 5120)
    api = upload(app, tmp_path, "api", "test", 800)
    for key in (web, web, api):
        assert call(app, "GET", f"/v1/artifacts/{key}").status == 200
    assert call(app, "HEAD", f"/v1/artifacts/{web}").status == 200  # an existence check saves nothing
    stats = call(app, "GET", "/v1/stats").json()
    assert stats["saved_seconds"] == 11.04  # 2 x 5.12 s + 0.8 s
    assert stats["history"]["windows"]["day"]["saved_seconds"] == stats["saved_seconds"]
    top = stats["history"]["top_saving"]
    assert [(t["package"], t["task"], t["hits"], t["misses"], t["saved_seconds"]) for t in top] == [
        ("web", "build", 2, 1, 10.24), ("api", "test", 1, 1, 0.8)]
    assert top[0]["hit_rate"] == round(2 / 3, 4)
    metrics = call(app, "GET", "/metrics").body.decode()
    assert "polykit_cache_saved_seconds_total 11.04" in metrics
    assert 'polykit_cache_window_saved_seconds{window="day"} 11.04' in metrics
    assert 'polykit_cache_hit_ratio{window="hour"} 1.0' in metrics


def test_an_artifact_stored_before_the_index_knew_it_is_read_once(tmp_path):
    app = new_app(tmp_path / "store")
    key = upload(app, tmp_path, "web", "build", 3000)
    app.metrics.history.close()
    (tmp_path / "store" / "status.sqlite3").unlink()
    restarted = new_app(tmp_path / "store")  # a new history: it reads the manifest on the first hit
    assert call(restarted, "GET", f"/v1/artifacts/{key}").status == 200
    assert call(restarted, "GET", "/v1/stats").json()["saved_seconds"] == 3.0


def test_the_history_survives_a_server_restart(tmp_path):
    app = new_app(tmp_path / "store")
    key = upload(app, tmp_path)
    call(app, "GET", f"/v1/artifacts/{key}")
    call(app, "GET", f"/v1/artifacts/{'0' * 64}")
    app.metrics.history.close()
    stats = call(new_app(tmp_path / "store"), "GET", "/v1/stats").json()
    assert stats["hits"] == 0, "since start begins again"
    assert stats["history"]["all_time"]["hits"] == 1 and stats["history"]["all_time"]["misses"] == 1
    assert stats["history"]["windows"]["day"]["saved_seconds"] == 1.0


def test_refusals_are_counted_by_reason_and_in_the_buckets(tmp_path):
    app = new_app(tmp_path / "store")
    assert call(app, "PUT", f"/v1/artifacts/{KEY}", b"not an artifact").status == 422
    stats = call(app, "GET", "/v1/stats").json()
    assert stats["uploads_rejected"] == {"bad_zstd": 1}
    assert stats["history"]["windows"]["hour"]["rejected"] == 1


# --- the newest artifact of each task -------------------------------------------------------------


def test_the_newest_artifact_of_a_task_carries_its_components(tmp_path):
    app = new_app(tmp_path / "store")
    upload(app, tmp_path, duration=1, components=COMPONENTS)
    newer = dict(COMPONENTS, command="npm run build:prod")
    key = upload(app, tmp_path, duration=2, components=newer)
    reply = call(app, "GET", "/v1/tasks?package=web&task=build")
    assert reply.status == 200
    found = reply.json()
    assert found["key"] == key and found["components"] == newer and found["duration_ms"] == 2
    assert call(app, "GET", "/v1/tasks?package=web&task=lint").status == 404
    assert call(app, "GET", "/v1/tasks?package=web").status == 400
    assert call(app, "HEAD", "/v1/tasks?package=web&task=build").status == 200


@pytest.mark.parametrize("bad", [
    {**COMPONENTS, "env": {"NODE_ENV": "production"}},  # a value, not its digest
    {**COMPONENTS, "extra": 1},
    {**COMPONENTS, "inputs": {"a": "not a digest"}},
    {k: v for k, v in COMPONENTS.items() if k != "inputs"},
    {**COMPONENTS, "toolchain": {"language": "ts"}},
    {**COMPONENTS, "outputs": "dist"},
    {**COMPONENTS, "inputs": {f"src/{n:06}.ts": "ab" * 32 for n in range(8000)}},  # over the bound
    "components",
])
def test_manifest_components_are_checked_before_an_upload_is_stored(tmp_path, bad):
    app = new_app(tmp_path / "store")
    key = key_for(json.dumps(bad)[:100] + str(len(json.dumps(bad))))
    with pytest.raises(ValueError):  # the packer refuses to write it
        pack_tree(tmp_path, {"a": b"a"}, key, meta={"components": bad})
    from support import craft  # a hand-made artifact with the same manifest reaches the server

    body = craft({"a": b"a"}, key=key, meta={"components": bad})
    reply = call(app, "PUT", f"/v1/artifacts/{key}", body)
    assert reply.status == 422 and reply.json()["reason"] == "bad_metadata"


# --- the page and its access rule -------------------------------------------------------------------


def test_the_page_has_the_access_rule_of_stats_and_asks_browsers_for_the_token(tmp_path):
    tokens = tmp_path / "tokens"
    tokens.write_text("read reader-token-1\n")
    app = new_app(tmp_path / "store", token_file=tokens)
    for path in ("/", "/v1/stats", "/v1/tasks?package=a&task=b"):
        refused = call(app, "GET", path)
        assert refused.status == 401
    assert call(app, "GET", "/").headers["www-authenticate"].startswith('Basic realm="polykit-cache"')
    basic = "Basic " + base64.b64encode(b"anyone:reader-token-1").decode()
    for header in (basic, "Bearer reader-token-1"):
        page = call(app, "GET", "/", headers={"Authorization": header})
        assert page.status == 200 and b"polykit cache" in page.body
        assert call(app, "GET", "/v1/stats", headers={"Authorization": header}).status == 200
    wrong = "Basic " + base64.b64encode(b"anyone:wrong-token-1").decode()
    for header in (wrong, "Basic !!!", "Basic " + base64.b64encode(b"reader-token-1").decode()):
        assert call(app, "GET", "/", headers={"Authorization": header}).status == 401
    # Basic carries the token for every route, as bearer does.
    assert call(app, "PUT", f"/v1/artifacts/{KEY}", b"x", headers={"Authorization": basic}).status == 403


def test_the_page_escapes_what_clients_named(tmp_path):
    app = new_app(tmp_path / "store")
    key = upload(app, tmp_path, package="<script>alert(1)</script>", task="b&d")
    call(app, "GET", f"/v1/artifacts/{key}")
    page = call(app, "GET", "/").body.decode()
    assert "<script>" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;:b&amp;d" in page


def test_the_refresh_is_optional_and_bounded(tmp_path):
    app = new_app(tmp_path / "store")
    assert b"http-equiv" not in call(app, "GET", "/").body
    assert b'content="3600"' in call(app, "GET", "/?refresh=99999").body
    assert b"http-equiv" not in call(app, "GET", "/?refresh=soon").body


def test_a_full_disk_never_fails_a_request_and_the_sums_are_written_later(small_tmpfs, tmp_path, caplog):
    clock = Clock()
    history = History(small_tmpfs / "status.sqlite3", clock)
    history.count("polykit", hits=1)
    history.flush()
    filler = small_tmpfs / "filler"
    with open(filler, "wb") as fh:  # take every free block
        try:
            while True:
                fh.write(b"\0" * 65536)
                fh.flush()
        except OSError:
            pass
    for n in range(200):  # enough rows to need new pages
        clock.now += 60
        history.count("polykit", hits=1)
        history.stored(key_for(str(n)), {"package": f"p{n}" * 40, "task": "build", "duration_ms": 1})
        history.flush()
    assert "could not be written" in caplog.text or "could not index" in caplog.text
    assert history.summary()["windows"]["hour"]["hits"] >= 0  # still answers
    filler.unlink()
    history.flush()
    assert history.summary()["all_time"]["hits"] == 201


def test_namespaces_keep_their_own_tasks_and_newest_artifacts(tmp_path):
    app = new_app(tmp_path / "store")
    key = key_for("team-a web build")
    body = pack_tree(tmp_path, {"out.txt": b"a"}, key, meta={"duration_ms": 700, "components": COMPONENTS})
    assert call(app, "PUT", f"/team-a/v1/artifacts/{key}", body).status == 201
    assert call(app, "GET", f"/team-a/v1/artifacts/{key}").status == 200
    assert call(app, "GET", "/team-a/v1/tasks?package=web&task=build").json()["key"] == key
    assert call(app, "GET", "/v1/tasks?package=web&task=build").status == 404
    stats = call(app, "GET", "/v1/stats").json()
    assert stats["saved_seconds"] == 0.7
    assert stats["history"]["top_saving"][0]["namespace"] == "team-a"
    assert "web:build (/team-a)" in call(app, "GET", "/").body.decode()
    assert call(app, "GET", "/team-a/").status == 404  # one status page, at /


def test_what_a_download_saved_is_kept_per_upload_and_read_anew_for_another(tmp_path):
    """Two workers share the history file; one keeps an artifact's row in memory for the upload
    it read it for, and a new upload of the key (another version) is read anew."""
    first, second = History(tmp_path / "h.sqlite3"), History(tmp_path / "h.sqlite3")
    second.stored(KEY, {"package": "web", "task": "build", "duration_ms": 2000})
    assert first.served(KEY, lambda: pytest.fail("indexed"), version=1.0) == 2000
    db = sqlite3.connect(tmp_path / "h.sqlite3")
    db.execute("DELETE FROM artifacts")  # what the first worker answers now comes from its memory
    db.commit()
    assert [first.served(KEY, lambda: pytest.fail("kept"), version=1.0) for _ in range(2)] == [2000, 2000]
    second.stored(KEY, {"package": "web", "task": "build", "duration_ms": 3000})  # uploaded again
    assert first.served(KEY, lambda: pytest.fail("indexed"), version=2.0) == 3000
    first.stored(KEY, {"package": "web", "task": "test", "duration_ms": 500})  # by this worker: forgotten
    assert first.served(KEY, lambda: pytest.fail("indexed"), version=2.0) == 500
    first.flush()
    tasks = dict(((r[0], r[1]), r[2:]) for r in db.execute("SELECT package, task, hits, saved_ms FROM tasks"))
    assert tasks[("web", "build")] == (4, 9000) and tasks[("web", "test")] == (1, 500)
