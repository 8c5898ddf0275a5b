"""``bench_client.py --vs-turbo``: polykit and turbo on the same generated trees, in the same run.

Each shape is generated once by ``gen_workspace.py`` (npm workspaces that both tools build, every
task ``npm run build``, committed to git so that ``git clone`` gives a fresh checkout). turbo runs
against a local turborepo-remote-cache (``STORAGE_PROVIDER=local``), polykit against a local
``polykit-cache``; both servers start empty for each repetition. Each repetition times, per tool,
as a whole process with the tool's defaults (turbo's concurrency of 10, polykit's default):

- cold: a fresh clone, empty caches: every task runs and uploads;
- warm: the same folder again: every task a local hit;
- remote: another fresh clone: every task a remote hit;
- dry: ``turbo run build --dry=json`` against ``polykit build --dry-run --json`` in the warm folder.

Both tools get the same small environment (the variables in TASK_ENV, and Python's own for the
client): turbo's strict environment mode hides the rest from its tasks, polykit passes the whole
environment on, and a machine's variables can change what a task costs (``NODE_EXTRA_CA_CERTS``
makes every node start read a certificate bundle: a fifth more CPU per ``npm run build`` here).

The tools alternate A B, B A, ... within each phase, the ratio polykit/turbo is taken per pair
and the median is quoted. Every run is checked: exit 0, the expected hit and miss counts, and,
after the cold and remote phases, every package's output equal to what its build makes. The
1-minute load average is printed beside every figure: other work on the machine lands in them.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from _bench import BenchError, find_node_tool, load_average, node_server_env, run_in_workdir
from bench_client import (Run, client_env, console_script, dry_run_keys, expect,
                          progress, run_process, settle, start_server, stop_server)

SCRIPTS = Path(__file__).resolve().parent
SHAPES = {"50x200": (50, 200), "500x20": (500, 20), "10x5000": (10, 5000)}
PHASES = ("cold", "warm", "remote", "dry")
TARGET = 1.0  # polykit/turbo at most this in every phase
TOKEN = "bench-token"
# The generated commit leaves thousands of loose objects, and git's automatic gc, detached into
# the background, would pack and delete them while `git clone` copies them.
NO_AUTO_GC = dict(os.environ, GIT_CONFIG_COUNT="1", GIT_CONFIG_KEY_0="gc.auto", GIT_CONFIG_VALUE_0="0")
TASK_ENV = ("PATH", "HOME", "LANG", "LC_ALL", "TERM", "SHELL", "TMPDIR", "USER")
SERVER_READY_TIMEOUT = 30.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class TurboServer:
    proc: subprocess.Popen
    url: str


def start_turbo_server(cli: Path, storage: Path, log: Path) -> TurboServer:
    """turborepo-remote-cache on a free loopback port, storing under ``storage``."""
    port = free_port()
    env = node_server_env(port, storage, TOKEN)
    with open(log, "wb") as out:
        proc = subprocess.Popen(["node", str(cli)], stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                env=env, cwd=storage.parent)
    deadline = time.monotonic() + SERVER_READY_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            break
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return TurboServer(proc, f"http://127.0.0.1:{port}")
        except OSError:
            time.sleep(0.05)
    stop_server(proc)
    raise BenchError(f"turborepo-remote-cache did not start:\n{log.read_text(errors='replace')[-2000:]}")


@dataclass
class Pair:
    """One phase of one shape: each tool's times, in repetition order, and the load beside each."""

    turbo: list[float] = field(default_factory=list)
    polykit: list[float] = field(default_factory=list)
    load: list[str] = field(default_factory=list)

    def ratios(self) -> list[float]:
        return [p / t for p, t in zip(self.polykit, self.turbo)]


def expected_outputs(root: Path) -> dict[str, bytes]:
    """What ``cat src/* > dist/out.txt`` makes in each package (the glob is sorted)."""
    found = {}
    for pkg in sorted((root / "packages").iterdir()):
        found[pkg.name] = b"".join(p.read_bytes() for p in sorted((pkg / "src").iterdir()))
    return found


def check_outputs(root: Path, expected: dict[str, bytes], what: str) -> None:
    for name, data in expected.items():
        path = root / "packages" / name / "dist" / "out.txt"
        if not path.is_file() or path.read_bytes() != data:
            raise BenchError(f"{what}: {name}/dist/out.txt is missing or not what the build makes")


def turbo_cached(run: Run, what: str, tasks: int, cached: int) -> None:
    """turbo's closing lines: ``Tasks: N successful, N total`` and ``Cached: C cached, N total``."""
    text = run.stdout + run.stderr
    if run.returncode != 0 or f"{tasks} successful, {tasks} total" not in text or f"{cached} cached, {tasks} total" not in text:
        raise BenchError(f"{what}: expected {tasks} tasks with {cached} cached\n{run.text()}")


class SideBySide:
    """Runs the phases of one shape for both tools, alternating."""

    def __init__(self, workdir: Path, turbo: Path, turbo_server: Path, timeout: float, module: bool) -> None:
        self.workdir, self.turbo, self.turbo_server, self.timeout = workdir, turbo, turbo_server, timeout
        self.polykit, _ = console_script("polykit", "polykit_client", module)
        self.module = module
        self.env = {k: v for k, v in client_env(workdir / "pycache", True).items()
                    if k in TASK_ENV or k.startswith("PYTHON")}

    def generate(self, name: str, packages: int, files: int) -> Path:
        source = self.workdir / name / "source"
        source.parent.mkdir(parents=True)
        progress(f"generating {name}: {packages} packages x {files} files")
        out = subprocess.run([sys.executable, str(SCRIPTS / "gen_workspace.py"), str(source), "--packages", str(packages),
                              "--files", str(files), "--chain", str(min(10, packages)), "--polykit-cmd", "npm"],
                             capture_output=True, text=True, timeout=900, env=NO_AUTO_GC)
        if out.returncode != 0:
            raise BenchError(f"gen_workspace.py failed\n{out.stdout}\n{out.stderr}")
        return source

    def clone(self, source: Path, dst: Path) -> Path:
        out = subprocess.run(["git", "clone", "--quiet", str(source), str(dst)], capture_output=True, text=True, timeout=600,
                             env=NO_AUTO_GC)
        if out.returncode != 0:
            raise BenchError(f"git clone failed\n{out.stderr}")
        return dst

    def turbo_env(self, url: str) -> dict[str, str]:
        return dict(self.env, TURBO_API=url, TURBO_TOKEN=TOKEN, TURBO_TEAM="bench", TURBO_TELEMETRY_DISABLED="1",
                    DO_NOT_TRACK="1", TURBO_NO_UPDATE_NOTIFIER="1")

    def command(self, tool: str, phase: str, url: str) -> list[str]:
        if tool == "turbo":
            return [str(self.turbo), "run", "build"] + (["--dry=json"] if phase == "dry" else [])
        return [*self.polykit, "build", "--remote-cache-url", url] + (["--dry-run", "--json"] if phase == "dry" else [])

    def check(self, tool: str, phase: str, run: Run, tasks: int) -> None:
        what = f"{tool} {phase}"
        if tool == "turbo":
            if phase == "dry":
                try:
                    listed = len(json.loads(run.stdout)["tasks"])
                except (ValueError, KeyError, TypeError):
                    raise BenchError(f"{what}: no JSON\n{run.text()}") from None
                if run.returncode != 0 or listed != tasks:
                    raise BenchError(f"{what}: expected {tasks} tasks\n{run.text()}")
                return
            turbo_cached(run, what, tasks, 0 if phase == "cold" else tasks)
            return
        if phase == "dry":
            dry_run_keys(run, tasks)
            return
        counts = {"cold": {"misses": tasks}, "warm": {"local": tasks}, "remote": {"remote": tasks}}[phase]
        expect(run, what, tasks=tasks, **counts)

    def measure(self, name: str, source: Path, repeat: int) -> dict[str, Pair]:
        tasks = len(list((source / "packages").iterdir()))
        expected = expected_outputs(source)
        pairs = {phase: Pair() for phase in PHASES}
        for rep in range(repeat):
            folder = self.workdir / name / f"rep-{rep + 1}"
            folder.mkdir()
            progress(f"{name}: repetition {rep + 1}/{repeat}: cloning, starting both servers")
            trees = {(tool, kind): self.clone(source, folder / f"{tool}-{kind}")
                     for tool in ("polykit", "turbo") for kind in ("cold", "remote")}
            (folder / "turbo-store").mkdir()
            pk_server = turbo_server = None
            try:
                pk_server = start_server(folder, self.module, self.env)
                turbo_server = start_turbo_server(self.turbo_server, folder / "turbo-store", folder / "turbo-server.log")
                urls = {"polykit": pk_server.url, "turbo": turbo_server.url}
                order = ("polykit", "turbo") if rep % 2 == 0 else ("turbo", "polykit")
                for phase in PHASES:
                    settle()
                    progress(f"{name}: {phase} ({' then '.join(order)})")
                    pairs[phase].load.append(load_average())
                    for tool in order:
                        cwd = trees[(tool, "remote" if phase == "remote" else "cold")]
                        env = self.turbo_env(urls["turbo"]) if tool == "turbo" else self.env
                        run = run_process(self.command(tool, phase, urls[tool]), cwd, env, self.timeout)
                        self.check(tool, phase, run, tasks)
                        if phase in ("cold", "remote"):
                            check_outputs(cwd, expected, f"{tool} {phase}")
                        getattr(pairs[phase], tool).append(run.seconds)
            finally:
                stop_server(pk_server.proc if pk_server else None)
                stop_server(turbo_server.proc if turbo_server else None)
            shutil.rmtree(folder, ignore_errors=True)
        return pairs


def render(results: dict[str, dict[str, Pair]]) -> str:
    headers = ["shape", "phase", "turbo", "polykit", "ratio", "target", "verdict", "ratios per pair", "load (1 min)"]
    rows = []
    for shape, pairs in results.items():
        for phase, pair in pairs.items():
            ratio = statistics.median(pair.ratios())
            rows.append([shape, phase, f"{statistics.median(pair.turbo):.3f} s", f"{statistics.median(pair.polykit):.3f} s",
                         f"{ratio:.2f}", f"<= {TARGET:.2f}", "ok" if ratio <= TARGET else "over",
                         " ".join(f"{r:.2f}" for r in pair.ratios()), " ".join(pair.load)])
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in [headers, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def run(args) -> int:
    """The ``--vs-turbo`` mode of bench_client.py: 0 when every run did what it should, 1 when one
    did not (its figures would be meaningless), 130 on Ctrl-C; temporary folders are removed."""
    return run_in_workdir("polykit-bench-vs-turbo-", args.tmp_dir, lambda workdir: _measure(args, workdir))


def _measure(args, workdir: Path) -> int:
    turbo = find_node_tool(args.turbo_dir, "turbo", "bin/turbo")
    server = find_node_tool(args.turbo_dir, "turborepo-remote-cache", "dist/cli.js")
    if turbo is None or server is None or shutil.which("node") is None or shutil.which("npm") is None:
        raise BenchError("--vs-turbo needs node, npm, turbo and turborepo-remote-cache: "
                         "npm install --prefix DIR turbo@2 turborepo-remote-cache@2, then --turbo-dir DIR")
    version = subprocess.run([str(turbo), "--version"], capture_output=True, text=True, timeout=60).stdout.strip()
    side = SideBySide(workdir, turbo, server, args.timeout, args.module)
    shapes = args.shapes.split(",") if args.shapes else ["50x200", "10x5000", "500x20"]
    results = {}
    load_at_start = load_average()
    for name in shapes:
        if name not in SHAPES:
            raise BenchError(f"unknown shape {name!r} (shapes: {', '.join(SHAPES)})")
        source = side.generate(name, *SHAPES[name])
        results[name] = side.measure(name, source, args.repeat)
        shutil.rmtree(workdir / name, ignore_errors=True)
        print(render({name: results[name]}) + "\n", file=sys.stderr, flush=True)  # a long run keeps what it has
    print(f"turbo {version} against turborepo-remote-cache; polykit ({' '.join(side.polykit)}) against polykit-cache;"
          f" both servers on 127.0.0.1, emptied for each repetition; every task `npm run build`;"
          f" environment: {', '.join(k for k in TASK_ENV if k in side.env)} only, for both")
    print(f"figures: wall time of a whole process, median of {args.repeat} per tool; ratio = polykit/turbo per pair"
          f" (tools alternated A B, B A), median; load: 1-minute load average before each pair"
          f" ({os.cpu_count()} cores; {load_at_start} at the start, {load_average()} at the end)")
    print()
    print(render(results))
    over = [f"{shape} {phase}" for shape, pairs in results.items() for phase, pair in pairs.items()
            if statistics.median(pair.ratios()) > TARGET]
    print("\ntargets: " + ("all met" if not over else "over for " + ", ".join(over)))
    return 0
