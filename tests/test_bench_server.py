"""scripts/bench_server.py: the targets it prints beside the figures, its bare baselines (the token check, the
durable and the journal floors); scripts/bench_sync.py: each way of syncing a small upload."""

from __future__ import annotations

import hashlib
import json
import os
import sys
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from wsgiref.util import FileWrapper

import pytest
from support import ROOT, call

sys.path.insert(0, str(ROOT / "scripts"))
import _journal  # noqa: E402
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


def test_the_journal_floor_logs_small_uploads_and_files_large_ones(tmp_path):
    (tmp_path / "index.json").write_text(json.dumps({}))
    storage = tmp_path / "storage"
    storage.mkdir()
    journal = bench_server.Journal(storage / "journal.log", 1024 * 1024)
    app = bench_server.BareApp(tmp_path, tmp_path, storage, journal)
    small, large = "ab" * 32, "cd" * 32
    for key, body in ((small, b"first"), (small, b"second"), (large, b"x" * (64 * 1024 + 1))):
        assert call(app, "PUT", f"/v8/artifacts/{key}", body, headers=bench_server.AUTH).status == 201
    journal.close()
    # First write wins: the second upload of a key is answered, not logged.
    assert list(_journal.entries(storage / "journal.log")) == [(bytes.fromhex(small), b"first")]
    assert (storage / large[:2] / large).stat().st_size == 64 * 1024 + 1


def test_the_files_floor_also_writes_each_logged_upload_to_its_file(tmp_path):
    (tmp_path / "index.json").write_text(json.dumps({}))
    journal = bench_server.Journal(tmp_path / "journal.log", 1024 * 1024)
    app = bench_server.BareApp(tmp_path, tmp_path, tmp_path, journal, files_too=True)
    key = "ef" * 32
    for body in (b"first", b"second"):
        assert call(app, "PUT", f"/v8/artifacts/{key}", body, headers=bench_server.AUTH).status == 201
    journal.close()
    assert (tmp_path / key[:2] / key).read_bytes() == b"first"
    assert list(_journal.entries(tmp_path / "journal.log")) == [(bytes.fromhex(key), b"first")]


def test_a_full_log_refuses_the_upload(tmp_path):
    (tmp_path / "index.json").write_text(json.dumps({}))
    journal = bench_server.Journal(tmp_path / "journal.log", _journal.entry_size(10))
    app = bench_server.BareApp(tmp_path, tmp_path, tmp_path, journal)
    assert call(app, "PUT", f"/v8/artifacts/{'01' * 32}", b"x" * 10, headers=bench_server.AUTH).status == 201
    assert call(app, "PUT", f"/v8/artifacts/{'02' * 32}", b"y", headers=bench_server.AUTH).status == 507
    journal.close()
    assert [body for _, body in _journal.entries(tmp_path / "journal.log")] == [b"x" * 10]


@pytest.mark.parametrize("mode", _journal.MODES)
def test_concurrent_appends_are_each_logged_whole_once(tmp_path, mode):
    journal = _journal.Journal(tmp_path / "journal.log", 1024 * 1024, mode)
    expected = {hashlib.sha256(b"%d" % n).digest(): os.urandom(100 + n) for n in range(64)}
    keys = list(expected) * 2  # each key twice: the second waits for the first, logs nothing
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda key: journal.append(key, expected[key]), keys))
    journal.close()
    logged = list(_journal.entries(tmp_path / "journal.log"))
    assert sorted(logged) == sorted(expected.items())


def test_replay_stops_at_a_torn_entry(tmp_path):
    path = tmp_path / "journal.log"
    journal = _journal.Journal(path, 4096)
    journal.append(b"k" * 32, b"whole")
    journal.append(b"l" * 32, b"torn")
    journal.close()
    data = bytearray(path.read_bytes())
    data[_journal.entry_size(5) + _journal.HEADER.size] ^= 1  # a bit of the second body
    path.write_bytes(bytes(data))
    assert list(_journal.entries(path)) == [(b"k" * 32, b"whole")]


def test_the_journal_floors_are_measured_beside_the_durable_one():
    args = bench_server.parse_args(["--bare-durable", "--bare-journal"])
    args.node_cli = "cli.js"
    assert bench_server.chosen_servers(args) == ["ours", "node", "durable", "journal", "bare"]
    args = bench_server.parse_args(["--bare-journal", "group,dsync,range,files"])
    args.node_cli = None
    assert bench_server.chosen_servers(args) == ["ours", "journal", "journal-dsync", "journal-range", "journal-files",
                                                 "bare"]
    for wrong in (["--bare-journal", "fsync"], ["--bare-journal", "group", "--no-baseline"]):
        with pytest.raises(SystemExit):
            bench_server.parse_args(wrong)


def test_the_log_has_room_for_every_small_upload_measured():
    small = [bench_server.Item(f"s{n}", "pool", 60_000, "sha") for n in range(30)]
    large = bench_server.Item("m", "pool", 1024 * 1024, "sha")
    corpus = bench_server.Corpus(small[:10], small[10:], small[:5], [large], [large], large)
    assert bench_server.journal_bytes_needed(corpus, 1.0, ["PUT 4 KiB"]) == 30 * _journal.entry_size(60_000)
    # Keys used by several measurements are counted once; 1 MiB uploads are not entries.
    assert bench_server.journal_bytes_needed(corpus, 1.0, []) == 30 * _journal.entry_size(60_000)
    assert bench_server.journal_bytes_needed(corpus, 1.0, ["GET 4 KiB"]) == 1024 * 1024  # the least log


def test_the_sync_measurement_reports_every_way(tmp_path, capsys):
    import bench_sync

    assert bench_sync.main(["--count", "3", "--rounds", "2", "--tmp-dir", str(tmp_path)]) == 0
    table = capsys.readouterr().out
    assert row(table, "new file")[4] == "1.00"
    for way in ("log, fdatasync", "log, O_DSYNC", "log, sync_file_range", "append, fdatasync", "flush alone"):
        assert float(row(table, way)[1]) > 0
    assert list(tmp_path.iterdir()) == []  # its temporary folder is removed
