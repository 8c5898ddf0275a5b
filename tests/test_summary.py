"""``polykit build --summary FILE``: the run as JSON, per task and in total."""

from __future__ import annotations

import json

from sample import Polykit, copy_workspace, make_tools, make_workspace
from support import thread_server

BUILDS = ["api-server:build", "shared-utils:build", "web:build"]


def test_the_summary_of_a_miss_run_and_of_a_hit_run(tmp_path):
    ws = make_workspace(tmp_path / "ws")
    pk = Polykit(ws, make_tools(tmp_path / "tools"), tmp_path / "marker")
    with thread_server(tmp_path / "store") as (port, _):
        url = f"http://127.0.0.1:{port}"
        pk.run("build", "--remote-cache-url", url, "--summary", str(tmp_path / "first.json"))
        other = copy_workspace(ws, tmp_path / "other")
        pk.run("build", "--summary", "run.json", cwd=other, POLYKIT_REMOTE_CACHE_URL=url)
    first = json.loads((tmp_path / "first.json").read_text())
    second = json.loads((other / "run.json").read_text())

    assert first["command"] == "build" and first["version"] == 1
    tasks = {t["task"]: t for t in first["tasks"]}
    assert sorted(tasks) == BUILDS
    for task in tasks.values():
        assert task["status"] == "miss" and task["source"] is None and task["saved_ms"] == 0
        assert len(task["key"]) == 64 and task["duration_ms"] >= 0 and task["started_at"] > 0
        assert task["bytes_up"] > 0 and task["bytes_down"] == 0
    assert tasks["web:build"]["dependencies"] == ["shared-utils:build"]
    assert first["totals"]["misses"] == 3 and first["totals"]["bytes_up"] == sum(t["bytes_up"] for t in tasks.values())

    hits = {t["task"]: t for t in second["tasks"]}
    for name, task in hits.items():
        assert task["status"] == "hit" and task["source"] == "remote"
        assert task["key"] == tasks[name]["key"]
        assert task["bytes_down"] > 0 and task["bytes_up"] == 0
        # What a hit saved is the duration its artifact recorded, the first run's build time of it.
        assert 0 < task["saved_ms"] <= tasks[name]["duration_ms"] + 1
    totals = second["totals"]
    assert (totals["hits"], totals["remote_hits"], totals["local_hits"], totals["misses"]) == (3, 3, 0, 0)
    assert totals["saved_ms"] == sum(t["saved_ms"] for t in hits.values())
    assert totals["bytes_down"] == sum(t["bytes_down"] for t in hits.values())


def test_failed_and_skipped_tasks_and_a_local_hit(tmp_path):
    ws = make_workspace(tmp_path / "ws")
    pk = Polykit(ws, make_tools(tmp_path / "tools"), tmp_path / "marker")
    pk.run("build", "shared-utils")
    toml = ws / "packages/shared-utils/polykit.toml"
    pk.run("build", "--summary", "s.json")
    local = json.loads((ws / "s.json").read_text())
    assert {t["task"]: (t["status"], t["source"]) for t in local["tasks"]}["shared-utils:build"] == ("hit", "local")
    toml.write_text(toml.read_text().replace("mkdir -p dist &&", "false &&"))
    out = pk.run("build", "--summary", "s.json", check=False)
    assert out.returncode == 1
    data = json.loads((ws / "s.json").read_text())
    statuses = {t["task"]: t["status"] for t in data["tasks"]}
    assert statuses == {"shared-utils:build": "failed", "web:build": "skipped", "api-server:build": "skipped"}
    assert (data["totals"]["failed"], data["totals"]["skipped"]) == (1, 2)


def test_an_unwritable_summary_is_a_warning(tmp_path):
    ws = make_workspace(tmp_path / "ws")
    pk = Polykit(ws, make_tools(tmp_path / "tools"), tmp_path / "marker")
    out = pk.run("build", "--summary", str(tmp_path / "no" / "such" / "folder" / "s.json"))
    assert "warning: cannot write the summary" in out.stderr
