"""The ``polykit`` command: scan, graph, build, test and run, with the local and remote caches."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Sequence

from . import __version__, timing
from .timing import phase

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
UPLOAD_WAIT_SECONDS = 120.0
# Tasks run at once by default: at least as many as turbo's default of 10, more on machines with
# more cores. Tasks are mostly short processes that wait on the disk and on their own start-up
# (npm, node), so one per core would leave the cores idle; cache I/O has threads of its own.
DEFAULT_PARALLEL = 10


def default_parallel(ws) -> int:
    """``[workspace] default_parallel``, else the larger of DEFAULT_PARALLEL and the CPU count."""
    return ws.default_parallel or max(DEFAULT_PARALLEL, os.cpu_count() or 1)


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-C", "--cwd", default=None, metavar="DIR", help="run as if started in DIR")
    parser.add_argument("--json", action="store_true", help="print machine-readable JSON")


def _build_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("packages", nargs="*", metavar="PACKAGE", help="packages to run (default: every package with the task)")
    parser.add_argument("-j", "--parallel", type=int, default=None, metavar="N",
                        help=f"tasks run at once (default: [workspace] default_parallel, else {DEFAULT_PARALLEL} or the CPU count if more)")
    parser.add_argument("--continue-on-error", action="store_true", help="after a failure, go on with tasks that do not depend on it")
    parser.add_argument("--dry-run", action="store_true", help="compute and print every task's cache key; run nothing")
    parser.add_argument("--no-cache", action="store_true", help="run every command; neither read nor write any cache")
    parser.add_argument("--remote-cache-url", default=None, metavar="URL", help="remote cache server [env: POLYKIT_REMOTE_CACHE_URL]")
    parser.add_argument("--remote-cache-readonly", action="store_true",
                        help="download from the remote cache, never upload [env: POLYKIT_REMOTE_CACHE_READONLY]")
    parser.add_argument("--no-remote-cache", action="store_true", help="do not use the remote cache at all")
    parser.add_argument("--summary", default=None, metavar="FILE",
                        help="write the run as JSON to FILE: per task its key, outcome, durations, bytes moved, time saved")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="polykit", description="Polyglot monorepo task runner with a shared build cache.")
    parser.add_argument("--version", action="version", version=f"polykit {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, text in (("scan", "list the packages of the workspace"), ("graph", "show packages and their dependencies")):
        _common(sub.add_parser(name, help=text))
    for name in ("build", "test"):
        p = sub.add_parser(name, help=f"run the {name} task of packages, with caching")
        _common(p)
        _build_flags(p)
    p = sub.add_parser("run", help="run any task of packages, with caching")
    p.add_argument("task", metavar="TASK")
    _common(p)
    _build_flags(p)
    p = sub.add_parser("why", help="say what changed in tasks' cache keys since their last build")
    p.add_argument("tasks", nargs="*", metavar="PACKAGE:TASK", help="tasks to explain (default: every task built here)")
    _common(p)
    p.add_argument("--show-values", action="store_true", help="print the SHA-256 of environment variables' values, not only their names")
    p.add_argument("--remote", action="store_true",
                   help="compare with the newest artifact the remote cache holds for each task (from another machine, CI)")
    p.add_argument("--remote-cache-url", default=None, metavar="URL", help="remote cache server [env: POLYKIT_REMOTE_CACHE_URL]")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the console script; returns the exit status."""
    timing.add("start-up: the client's imports", time.perf_counter() - timing.STARTED)
    try:
        return _main(argv)
    finally:
        timing.report()


def _main(argv: Sequence[str] | None) -> int:
    args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    from .graph import GraphError
    from .workspace import ConfigError, load

    try:
        start = Path(args.cwd or os.getcwd())
        git = _start_git(start) if args.command not in ("scan", "graph") else None
        with phase("workspace: configuration"):
            ws = load(start)
        if git is not None and git.root != ws.root:
            git.close()
            git = None
        if args.command == "scan":
            return _scan(ws, args)
        if args.command == "graph":
            return _graph(ws, args)
        if args.command == "why":
            return _why(ws, args, git)
        task = args.task if args.command == "run" else args.command
        return _build(ws, task, args, git)
    except (ConfigError, GraphError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except BrokenPipeError:  # e.g. piped into `head`
        sys.stderr.close()
        return EXIT_OK


def _start_git(start: Path):
    """``git ls-files`` for the keys, started before the workspace's configuration is read so the
    two overlap (with the untracked files: which tasks take the default inputs is not known yet)."""
    from .gitindex import GitIndex
    from .workspace import ConfigError, find_root

    try:
        return GitIndex(find_root(start), untracked=True)
    except ConfigError:
        return None  # reported by the workspace's loading


def _scan(ws, args) -> int:
    rows = [{"name": p.name, "path": p.path, "language": p.language, "tasks": sorted(p.tasks),
             "internal_deps": list(p.internal_deps)} for p in ws.packages.values()]
    if args.json:
        print(json.dumps({"root": str(ws.root), "packages": rows}, indent=2))
        return EXIT_OK
    for row in rows:
        print(f"{row['name']:<24} {row['path']:<32} {row['language'] or '-':<8} {', '.join(row['tasks'])}")
    print(f"{len(rows)} packages in {ws.root}")
    return EXIT_OK


def _graph(ws, args) -> int:
    from .graph import GraphError, package_cycle

    cycle = package_cycle(ws)
    if cycle:
        raise GraphError("dependency cycle between packages: " + " -> ".join(cycle))
    tasks = {f"{p.name}:{t.name}": sorted(
        [f"{p.name}:{d}" for d in t.depends_on] + [f"{d}:{t.name}" for d in p.internal_deps if t.name in ws.packages[d].tasks])
        for p in ws.packages.values() for t in p.tasks.values()}
    if args.json:
        print(json.dumps({"packages": {p.name: list(p.internal_deps) for p in ws.packages.values()}, "tasks": tasks}, indent=2))
        return EXIT_OK
    for p in ws.packages.values():
        print(f"{p.name} -> {', '.join(p.internal_deps) or '(none)'}")
    for name, deps in tasks.items():
        if deps:
            print(f"  {name} <- {', '.join(deps)}")
    return EXIT_OK


def _remote(ws, args, console):
    """The remote backend for this run, or None; a bad URL is a warning, never a failed build."""
    if args.no_remote_cache or args.no_cache:
        return None
    url = args.remote_cache_url or ws.remote.url
    if not url:
        return None
    from .artifact import DEFAULT_MAX_ARTIFACT_SIZE
    from .remote import RemoteCache

    try:
        return RemoteCache(url, token=ws.remote.token, read_only=ws.remote.read_only or args.remote_cache_readonly,
                           timeout=ws.remote.timeout, deadline=ws.remote.deadline, warn=console.warn,
                           max_artifact_size=ws.remote.max_artifact_size or DEFAULT_MAX_ARTIFACT_SIZE)
    except ValueError as exc:  # a bad URL, token or proxy: the build goes on without the remote cache
        console.warn(f"{exc}; building without the remote cache")
        return None


def _why(ws, args, git=None) -> int:
    from . import why

    remote = None
    if args.remote:
        from .remote import RemoteCache

        url = args.remote_cache_url or ws.remote.url
        if not url:
            print("error: --remote needs a remote cache: [remote_cache] url, --remote-cache-url or "
                  "POLYKIT_REMOTE_CACHE_URL", file=sys.stderr)
            return EXIT_USAGE
        try:
            remote = RemoteCache(url, token=ws.remote.token, timeout=ws.remote.timeout, deadline=ws.remote.deadline)
        except ValueError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return EXIT_USAGE
    try:
        return why.command(ws, args.tasks, as_json=args.json, show_values=args.show_values, remote=remote, git=git)
    except ValueError as exc:  # the server could not answer
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    finally:
        if remote is not None:
            remote.close()


def _build(ws, task: str, args, git=None) -> int:
    from .cachekey import KeyMaker
    from .graph import plan, run_graph

    started = time.monotonic()
    with phase("graph: plan"):
        order, deps = plan(ws, task, args.packages)
    with phase("keys: all of them"):
        keymaker = KeyMaker(ws, git=git)
        keys = keymaker.compute(order, deps)
    if args.dry_run:
        with phase("dry run: printing"):
            return _dry_run(order, keys, keymaker, args.json)
    from .components import save_records
    from .localcache import LocalCache
    from .runner import Console, Summary, TaskRunner
    from .summary import Timings

    parallel = args.parallel if args.parallel is not None else default_parallel(ws)
    if parallel < 1:
        print("error: --parallel must be at least 1", file=sys.stderr)
        return EXIT_USAGE
    console = Console(prefix_logs=parallel > 1 and len(order) > 1)
    local = None if args.no_cache else LocalCache(ws.cache_dir, ws.cache_max_size)
    summary = Summary()
    runner = TaskRunner(ws, keys, console, local=local, remote_factory=lambda: _remote(ws, args, console), summary=summary,
                        components=keymaker.parts)
    timings = Timings()
    wall_started = time.time()
    runner.prefetch(order)
    try:
        with phase("tasks: scheduling to the last end"):
            outcome = run_graph(order, deps, timings.wrap(runner.run), parallel, args.continue_on_error,
                                quick=timings.wrap(runner.quick), before_wait=console.flush)
    finally:
        runner.finish_prefetch()
        with phase("tasks: packing, waiting for the last"):
            runner.finish_packing()
        console.flush()  # what the hits in place printed, if the scheduler stopped before it did
    def save() -> None:
        with phase("records: saving (beside the last uploads)"):
            runner.save_records()
            # What `polykit why` compares with: the key components of every task that built or restored.
            save_records(ws.root, {str(n): {"key": keys[n], "components": keymaker.parts[n]} for n in order
                                   if summary.statuses.get(n) in ("hit (local)", "hit (remote)", "miss")})

    # Written while the last uploads go (a cold build's records of 50,000 inputs are megabytes).
    import threading

    saving = threading.Thread(target=save, name="polykit-records")
    saving.start()
    remote, uploader = runner.remote, runner.uploader
    for node in order:
        if outcome[node] == "skipped":
            console.line(f"{node}  skipped (a dependency failed)")
    if uploader is not None:
        with phase("uploads: waiting for the last"):
            uploader.finish(UPLOAD_WAIT_SECONDS)
    saving.join()
    if remote is not None:
        remote.close()  # the kept-alive connections: the server need not keep them until its idle timeout
    if local is not None and summary.misses:
        local.trim()
    moved = (remote.bytes_down + remote.bytes_up) if remote is not None else 0
    elapsed = time.monotonic() - started
    failed = sum(1 for v in outcome.values() if v == "failed")
    skipped = sum(1 for v in outcome.values() if v == "skipped")
    console.line(
        f"\n{len(order)} tasks: {summary.local_hits} local hits, {summary.remote_hits} remote hits, "
        f"{summary.misses} misses, {failed} failed" + (f", {skipped} skipped" if skipped else "")
        + f"; {_size(moved)} moved; {summary.saved_ms / 1000:.1f} s saved; {elapsed:.2f} s"
    )
    if args.summary:
        from . import summary as run_summary

        document = run_summary.document(
            order, keys, deps, outcome, summary.statuses, summary.saved_by_task, summary.moved, timings,
            command=f"{args.command} {task}" if args.command == "run" else args.command,
            started=wall_started, elapsed_ms=int(elapsed * 1000))
        try:
            run_summary.write(Path(args.summary), document)
        except OSError as exc:
            console.warn(f"cannot write the summary to {args.summary}: {exc.strerror or exc}")
    if args.json:
        print(json.dumps({"tasks": {str(n): {"key": keys[n], "status": summary.statuses.get(n, outcome[n])} for n in order},
                          "local_hits": summary.local_hits, "remote_hits": summary.remote_hits, "misses": summary.misses,
                          "failed": failed, "skipped": skipped, "bytes_moved": moved, "saved_ms": summary.saved_ms}))
    return EXIT_FAILED if failed or skipped else EXIT_OK


def _dry_run(order, keys, keymaker, as_json: bool) -> int:
    if as_json:
        from .components import hashed_env

        # One task a line: json's C encoder serves only output without indentation, and with
        # every input file's digest listed, the pure-Python one took longer than hashing them.
        # Environment values are shown as their SHA-256 only: a dry run's output lands in CI logs.
        tasks = (json.dumps({"task": str(n), "package": n.package, "name": n.task, "key": keys[n],
                             "components": {**keymaker.parts[n], "env": hashed_env(keymaker.parts[n]["env"])}})
                 for n in order)
        sys.stdout.write('{"tasks": [\n' + ",\n".join(tasks) + "\n]}\n")
    else:
        for node in order:
            print(f"{str(node):<40} {keys[node]}")
    return EXIT_OK


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
