"""scripts/bench_server.py: the targets it prints beside the figures, and its bare baseline's token check."""

from __future__ import annotations

import json
import sys
from collections import Counter
from wsgiref.util import FileWrapper

from support import ROOT, call

sys.path.insert(0, str(ROOT / "scripts"))
import bench_server  # noqa: E402  (a script, imported from its folder)
from bench_server import PhaseResult, TargetReport, target_table  # noqa: E402

LABELS = ["PUT 4 KiB, 8 connections", "PUT 1 MiB, 4 connections", "PUT one 512 MiB", "GET 4 KiB, 8 connections",
          "HEAD 4 KiB, 8 connections", "GET one 512 MiB"]


def result(label: str, value: float, server_cpu: float = 100.0) -> PhaseResult:
    return PhaseResult(label, "req/s", value, 1, 1.0, Counter(), Counter(), 0, 0, 0, server_cpu, 50.0, 0.0, False)


def server(name: str, values: dict[str, float], rss: float, cpu: dict[str, float] | None = None) -> TargetReport:
    return TargetReport(name, {label: result(label, values.get(label, 100.0), (cpu or {}).get(label, 100.0))
                               for label in LABELS}, rss, [])


def row(table: str, label: str) -> list[str]:
    for line in table.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if cells[0] == label:
            return cells
    raise AssertionError(f"no line {label!r} in\n{table}")


def test_each_target_is_judged_by_its_ratio_to_the_server_it_names():
    ours = server("ours", {"PUT 4 KiB, 8 connections": 120, "PUT one 512 MiB": 140, "GET 4 KiB, 8 connections": 90,
                           "GET one 512 MiB": 80},
                  rss=52.0, cpu={"PUT one 512 MiB": 50.0})
    node = server("node", {}, rss=1100.0)
    bare = server("bare", {}, rss=50.0)
    table = target_table([ours, node, bare], "512 MiB", sweep=False)
    assert row(table, "PUT 4 KiB, 8 connections")[1:5] == ["1.20", "1.20", ">= 1 x node", "met"]
    assert row(table, "PUT one 512 MiB")[1:5] == ["1.40", "1.40", ">= 1.5 x node", "not met"]
    # Per second of server CPU: the same rate with half the CPU is twice as efficient.
    assert row(table, "PUT one 512 MiB")[5:] == ["2.80", "2.80"]
    assert row(table, "GET 4 KiB, 8 connections")[3:5] == [">= 0.95 x bare", "not met"]
    assert row(table, "GET one 512 MiB")[3:5] == [">= 0.8 x bare", "met"]
    assert row(table, "peak RSS (ours 52.0 MiB)")[1:5] == ["0.05", "1.04", "< 100 MiB", "met"]


def test_without_the_node_server_its_targets_are_not_judged():
    ours = server("ours", {}, rss=120.0)
    table = target_table([ours, server("bare", {}, rss=50.0)], "512 MiB", sweep=False)
    assert row(table, "PUT 1 MiB, 4 connections")[1:5] == ["n/a", "1.00", ">= 1 x node", "n/a"]
    assert row(table, "HEAD 4 KiB, 8 connections")[4] == "met"
    assert row(table, "peak RSS (ours 120.0 MiB)")[4] == "not met"
    assert target_table([ours], "512 MiB", sweep=False) == ""


def test_a_workers_sweep_is_judged_against_one_worker():
    one = server("ours-w1", {}, rss=50.0)
    two = server("ours-w2", {"PUT 4 KiB, 8 connections": 160, "GET 4 KiB, 8 connections": 120}, rss=60.0)
    table = target_table([one, two], "512 MiB", sweep=True)
    assert row(table, "PUT 4 KiB, 8 connections: ours-w2/ours-w1")[1:] == ["1.60", ">= 1.5", "met"]
    assert row(table, "GET 4 KiB, 8 connections: ours-w2/ours-w1")[1:] == ["1.20", ">= 1.5", "not met"]
    assert row(table, "peak RSS per worker: ours-w2")[1:] == ["60.0 MiB", "< 100 MiB", "met"]


def test_the_bare_baseline_checks_the_token_on_both_paths(tmp_path):
    key = "ab" * 32
    (tmp_path / "index.json").write_text(json.dumps({key: [5, "00" * 32]}))
    (tmp_path / f"{key}.zst").write_bytes(b"hello")
    app = bench_server.BareApp(tmp_path, tmp_path)
    for path in (f"/v8/artifacts/{key}", f"/v1/artifacts/{key}"):
        assert call(app, "GET", path).status == 401
        assert call(app, "GET", path, headers={"Authorization": "Bearer wrong-token"}).status == 401
        assert call(app, "PUT", path, b"x" * 10, headers=bench_server.AUTH).status == 201
        got = call(app, "GET", path, headers=bench_server.AUTH, extra={"wsgi.file_wrapper": FileWrapper})
        assert (got.status, got.body) == (200, b"hello")


def test_the_durable_baseline_stores_each_upload_under_its_key(tmp_path):
    key = "cd" * 32
    (tmp_path / "index.json").write_text(json.dumps({}))
    durable = tmp_path / "durable"
    durable.mkdir()
    app = bench_server.BareApp(tmp_path, tmp_path, durable)
    assert call(app, "PUT", f"/v8/artifacts/{key}", b"payload", headers=bench_server.AUTH).status == 201
    assert (durable / key[:2] / key).read_bytes() == b"payload"
    assert call(app, "PUT", f"/v8/artifacts/{key}", b"x", headers={"Authorization": "Bearer wrong"}).status == 401


def test_the_floor_and_an_earlier_version_are_measured_beside_ours(tmp_path):
    args = bench_server.parse_args(["--bare-durable", "--compare-with", str(ROOT)])
    args.node_cli = None  # whether a Node server is installed here does not matter
    assert bench_server.chosen_servers(args) == ["ours", "before", "durable", "bare"]
    args.node_cli = "cli.js"
    assert bench_server.chosen_servers(args) == ["ours", "before", "node", "durable", "bare"]
    assert bench_server.chosen_servers(bench_server.parse_args(["--threads-sweep", "4,8"])) == ["ours-t4", "ours-t8"]


def test_only_keeps_the_named_lines_and_what_they_need():
    item = bench_server.Item("k", "pool", 1, "sha")
    corpus = bench_server.Corpus([item], [item], [item], [item], [item], item)

    def labels(only):
        return [(reported, phase.label) for reported, phase in bench_server.phases(corpus, 1.0, "512 MiB", only)]

    assert len(labels([])) == 11
    # Reads of small artifacts need the seeding uploads first; they are run, not reported.
    assert labels(["head 4 kib"]) == [(False, "seed reads"), (True, "HEAD 4 KiB, 1 connection"),
                                      (True, "HEAD 4 KiB, 8 connections")]
    # Uploads need nothing before them.
    assert labels(["PUT 4 KiB"]) == [(True, "PUT 4 KiB, 1 connection"), (True, "PUT 4 KiB, 8 connections")]
    # The big download reads what the big upload stored: the upload runs, unreported.
    assert labels(["GET one"]) == [(False, "PUT one 512 MiB"), (True, "GET one 512 MiB")]
