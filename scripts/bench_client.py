#!/usr/bin/env python3
"""Benchmark of the ``polykit`` client on a generated monorepo, against a real ``polykit-cache``.

A workspace of 50 packages x 200 files of 1 KiB is generated in a temporary folder (a chain of
10 packages, the other 40 each depending on one or two of the chain); every package's ``build``
is a fast shell command that writes a small ``dist/``. A ``polykit-cache`` server is started on
127.0.0.1 with an empty temporary storage folder, and each figure is the wall time of a fresh
client process, as a user or CI job would see it:

1. a cold build: empty local cache, empty server (one run; it seeds the server);
2. an all-local-hit build in the same checkout;
3. an all-remote-hit build in a fresh checkout (a copy of the sources: no ``.polykit``, no outputs),
   one copy per repetition, all made before anything is timed;
4. key computation alone (``polykit build --dry-run --json``) with the stat cache warm, and with
   ``.polykit/state.json`` deleted before each run.

    python scripts/bench_client.py             # the full shape, median of 5 runs each
    python scripts/bench_client.py --quick     # smoke run: 5 packages x 20 files, 1 run each
    python scripts/bench_client.py --git       # the workspace is a git checkout (inputs via git ls-files)
    python scripts/bench_client.py --shape 500x20     # or 10x5000: the shapes a workspace grows into
    python scripts/bench_client.py --vs-turbo --turbo-dir DIR   # turbo side by side (bench_vs_turbo.py)

Every run is checked while it is measured: the cold build must report only misses, the warm
build only local hits, the fresh checkout only remote hits (and its outputs must be there), and
the dry run's keys must not depend on the stat cache. Any other outcome is an error, not a
figure. Generated files get mtimes an hour in the past, because the stat cache deliberately
ignores files modified within the last two seconds.

The client is the ``polykit`` console script next to this interpreter (``--module`` runs
``python -m polykit_client`` instead); every package declares ``language = "python"`` by default,
so toolchain detection (``python3 --version``, remembered in the stat cache) is part of the cost.
Python start-up (``python -c pass``) and the client's import are measured too, since they are
part of every figure. The peak RSS comes from one extra run per scenario under GNU time, when
present. Standard library only; the temporary folder and the server are removed even on Ctrl-C.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

# scripts/ is on sys.path when a script runs
from _bench import BenchError, load_average, machine_line, run_in_workdir, stop_process

LOCALHOST = "127.0.0.1"
SERVER_READY_TIMEOUT = 30.0
SERVER_STOP_TIMEOUT = 10.0
BACKDATE_SECONDS = 3600
MIB = 1024 * 1024
SUMMARY = re.compile(
    r"^(?P<tasks>\d+) tasks: (?P<local>\d+) local hits, (?P<remote>\d+) remote hits, (?P<misses>\d+) misses, "
    r"(?P<failed>\d+) failed(?:, (?P<skipped>\d+) skipped)?; (?P<moved>[\d.]+ (?:B|KiB|MiB|GiB)) moved; "
    r"(?P<saved>[\d.]+) s saved; (?P<elapsed>[\d.]+) s$",
    re.MULTILINE,
)
SERVING = re.compile(r"serving on http://([\d.]+):(\d+)")


@dataclass(frozen=True)
class Target:
    """A performance goal, with what turbo 2.11 measured on the same shape."""

    limit: float
    turbo: str


TARGETS = {
    "fresh": Target(0.45, "0.30-0.47 s"),
    "local": Target(0.20, "0.15-0.20 s"),
    "dry": Target(0.17, "0.12-0.17 s"),
}


# --- the machine and the tools ------------------------------------------------------------------


def console_script(name: str, module: str, prefer_module: bool) -> tuple[list[str], str]:
    """The command that starts ``name``, and how to describe it.

    The console script next to this interpreter is what users run; ``python -m`` is the fallback
    when the project is importable but its scripts are not installed.
    """
    script = Path(sys.executable).parent / name
    if not prefer_module and script.is_file() and os.access(script, os.X_OK):
        return [str(script)], f"`{name}` console script"
    return [sys.executable, "-m", module], f"`python -m {module}`"


def client_env(pycache: Path, bytecode: bool) -> dict[str, str]:
    """The caller's environment without POLYKIT_* settings, which would change what is measured.

    Bytecode goes to a private folder (``PYTHONPYCACHEPREFIX``), so nothing is written next to
    the sources and an inherited PYTHONDONTWRITEBYTECODE cannot make every run recompile the
    client, which an installed client never does. With ``bytecode`` off nothing is written:
    existing .pyc files (the standard library's) are used, and a project that was never
    compiled is compiled from source at every run.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith("POLYKIT_")}
    env.pop("PYTHONPYCACHEPREFIX", None)
    if bytecode:
        env["PYTHONPYCACHEPREFIX"] = str(pycache)
        env.pop("PYTHONDONTWRITEBYTECODE", None)
    else:
        env["PYTHONDONTWRITEBYTECODE"] = "1"
    return env


WARM_IMPORTS = (
    "import importlib, pkgutil, polykit_client, polykit_cache\n"
    "for pkg in (polykit_client, polykit_cache):\n"
    "    for m in pkgutil.iter_modules(pkg.__path__):\n"
    "        if m.name != '__main__':\n"
    "            importlib.import_module(pkg.__name__ + '.' + m.name)\n"
)


# --- the workspace ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Shape:
    """What the generated workspace looks like."""

    packages: int
    files: int
    file_size: int
    chain: int
    language: str | None
    git: bool

    def names(self) -> list[str]:
        """Zero-padded, so sorted order is creation order and the chain comes first."""
        return [f"pkg-{i:03d}" for i in range(self.packages)]

    def describe(self) -> str:
        """One line for the report, so a reader can rebuild the same shape."""
        fan = self.packages - self.chain
        return (f"{self.packages} packages x {self.files} files x {self.file_size} B "
                f"({self.packages * self.files * self.file_size / MIB:.1f} MiB of sources), "
                f"a chain of {self.chain} plus {fan} fan-out packages depending on one or two of it")


def dependencies(shape: Shape) -> dict[str, list[str]]:
    """A chain of ``shape.chain`` packages, then fan-out packages hanging off it.

    The deepest path is the whole chain plus one, so scheduling must respect real depth, and
    half of the fan-out packages have two dependencies so the graph is not a tree.
    """
    names = shape.names()
    deps: dict[str, list[str]] = {}
    for i, name in enumerate(names):
        if i < shape.chain:
            deps[name] = [names[i - 1]] if i else []
            continue
        j = i - shape.chain
        first, second = names[j % shape.chain], names[(7 * j + 3) % shape.chain]
        deps[name] = [first] if j % 2 == 0 or first == second else sorted({first, second})
    return deps


def package_toml(name: str, deps: list[str], language: str | None) -> str:
    """A package whose build is a plain shell command, fast enough that polykit itself is what is timed."""
    command = (f"mkdir -p dist && echo {name} > dist/name.txt && cat polykit.toml > dist/config.txt "
               f"&& echo built {name}")
    lines = [f'name = "{name}"']
    if language:
        lines.append(f'language = "{language}"')
    lines += ["", "[deps]", "internal = [" + ", ".join(f'"{d}"' for d in deps) + "]", "", "[tasks]",
              f'build = {{ command = "{command}", outputs = ["dist/**"] }}', ""]
    return "\n".join(lines)


def file_body(name: str, index: int, size: int) -> bytes:
    """Distinct, deterministic content: every file hashes differently and runs are repeatable."""
    seed = f"{name}/{index:05d} the quick brown fox jumps over the lazy dog\n".encode()
    return (seed * (size // len(seed) + 1))[:size]


def backdate(root: Path, seconds: int) -> int:
    """Move every mtime under ``root`` into the past; the stat cache keeps no recently modified file."""
    when = time.time() - seconds
    count = 0
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if d != ".git"]
        for entry in files:
            os.utime(os.path.join(folder, entry), (when, when))
            count += 1
        os.utime(folder, (when, when))
    return count


def git_init(root: Path) -> None:
    """Commit the sources, so the client lists inputs with git as it does in a real checkout."""
    env = dict(os.environ, GIT_AUTHOR_NAME="bench", GIT_AUTHOR_EMAIL="bench@localhost",
               GIT_COMMITTER_NAME="bench", GIT_COMMITTER_EMAIL="bench@localhost")
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"], ["git", "commit", "-q", "-m", "sources"]):
        subprocess.run(cmd, cwd=root, env=env, check=True, capture_output=True, timeout=300)


def generate(root: Path, shape: Shape) -> int:
    """Write the workspace; returns the number of files written."""
    root.mkdir(parents=True)
    (root / "polykit.toml").write_text('[workspace]\npackages_dir = "packages"\n')
    if shape.git:
        (root / ".gitignore").write_text(".polykit/\ndist/\n")
    for name, deps in dependencies(shape).items():
        pkg = root / "packages" / name
        pkg.mkdir(parents=True)
        (pkg / "polykit.toml").write_text(package_toml(name, deps, shape.language))
        for index in range(shape.files):
            path = pkg / "src" / f"m{index // 50:02d}" / f"f{index:04d}.txt"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(file_body(name, index, shape.file_size))
    count = backdate(root, BACKDATE_SECONDS)
    if shape.git:
        git_init(root)
    return count


def fresh_copy(src: Path, dst: Path) -> Path:
    """A second checkout: the sources (and .git) only; copy2 keeps the backdated mtimes."""
    shutil.copytree(src, dst, symlinks=True, ignore=shutil.ignore_patterns(".polykit", "dist"))
    return dst


def folder_size(root: Path) -> int:
    """Bytes in regular files under ``root``; used for the cache and storage sizes."""
    total = 0
    for folder, _, files in os.walk(root):
        for entry in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(folder, entry)).st_size
    return total


# --- the server ---------------------------------------------------------------------------------


@dataclass
class Server:
    """A ``polykit-cache`` process on a free port of 127.0.0.1."""

    proc: subprocess.Popen
    url: str
    storage: Path
    log: Path


def start_server(workdir: Path, prefer_module: bool, env: dict[str, str]) -> Server:
    """Start the server with ``--port 0`` and learn its port from the log line it writes when ready.

    The log goes to a file, not a pipe: nobody reads a pipe during the runs, and a full one would
    block the server.
    """
    cmd, _ = console_script("polykit-cache", "polykit_cache", prefer_module)
    storage, log = workdir / "server-storage", workdir / "server.log"
    cmd += ["serve", "--bind", LOCALHOST, "--port", "0", "--storage-dir", str(storage), "--log-level", "info"]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                env=env, cwd=workdir)
    deadline = time.monotonic() + SERVER_READY_TIMEOUT
    match = None
    try:
        while time.monotonic() < deadline:
            match = SERVING.search(log.read_text(errors="replace"))
            if match:
                return Server(proc, f"http://{match.group(1)}:{match.group(2)}", storage, log)
            if proc.poll() is not None:
                break
            time.sleep(0.05)
    finally:
        if not match:
            stop_server(proc)
    tail = log.read_text(errors="replace")[-2000:]
    raise BenchError(f"polykit-cache did not start within {SERVER_READY_TIMEOUT:.0f} s:\n{tail}")


def stop_server(proc: subprocess.Popen | None) -> None:
    stop_process(proc, SERVER_STOP_TIMEOUT)


# --- running the client -------------------------------------------------------------------------


@dataclass
class Run:
    """One finished process: what it printed, how long it took, and its peak resident set size."""

    args: list[str]
    seconds: float
    maxrss_kib: int
    rss_clean: bool  # measured by GNU time rather than inherited-high-water os.wait4
    returncode: int
    stdout: str
    stderr: str

    def text(self) -> str:
        """What to show when a run did not do what it should: the command and the tail of its output."""
        return f"$ {' '.join(self.args)}\nexit {self.returncode}\n{self.stdout[-3000:]}\n{self.stderr[-3000:]}"


def gnu_time() -> str | None:
    """GNU time, when present and working: the one way to get a clean peak RSS of the client.

    A child started from this process inherits this process's memory high-water mark at exec
    (Linux records the old address space's peak in the child's ``ru_maxrss``), so ``os.wait4``
    alone reports at least this benchmark's own RSS. GNU time forks from a small process, so
    what it reports is the client's own peak.
    """
    program = shutil.which("time", path="/usr/bin:/bin")
    if program is None:
        return None
    try:
        ok = subprocess.run([program, "-f", "%M", "-o", os.devnull, "true"], capture_output=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return program if ok.returncode == 0 else None


def run_process(args: list[str], cwd: Path, env: dict[str, str], timeout: float, rss_via: str | None = None) -> Run:
    """Run one process to its end and time it.

    Output goes to temporary files, read after the end, so reading it costs nothing inside the
    timed span. A timer kills a process that overstays ``timeout``. With ``rss_via`` (GNU time)
    the peak RSS is the client's own; without, it is ``os.wait4``'s figure, an upper bound (see
    :func:`gnu_time`), and the timing is not disturbed by the extra process.
    """
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err, \
            tempfile.NamedTemporaryFile(prefix="rss-", suffix=".txt") as rss_file:
        command = [rss_via, "-f", "%M", "-o", rss_file.name, *args] if rss_via else args
        started = time.perf_counter()
        proc = subprocess.Popen(command, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=err)
        timer = threading.Timer(timeout, proc.kill)
        timer.start()
        try:
            _, status, usage = os.wait4(proc.pid, 0)
            seconds = time.perf_counter() - started
        except BaseException:
            proc.kill()
            proc.wait()
            raise
        finally:
            timer.cancel()
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        maxrss, clean = usage.ru_maxrss, False
        if rss_via:
            lines = Path(rss_file.name).read_text(errors="replace").split()
            if lines and lines[-1].isdigit():
                maxrss, clean = int(lines[-1]), True
        run = Run(args, seconds, maxrss, clean, proc.returncode,
                  out.read().decode("utf-8", "replace"), err.read().decode("utf-8", "replace"))
    if seconds >= timeout:
        raise BenchError(f"timed out after {timeout:.0f} s\n{run.text()}")
    return run


@dataclass(frozen=True)
class Summary:
    """The closing line of ``polykit build``."""

    tasks: int
    local: int
    remote: int
    misses: int
    failed: int
    skipped: int
    moved: str
    elapsed: float


def parse_summary(run: Run) -> Summary:
    """Read the summary line; a run without one failed in a way the figures must not hide."""
    match = SUMMARY.search(run.stdout)
    if run.returncode != 0 or match is None:
        raise BenchError(f"polykit did not finish cleanly\n{run.text()}")
    g = match.groupdict()
    return Summary(int(g["tasks"]), int(g["local"]), int(g["remote"]), int(g["misses"]), int(g["failed"]),
                   int(g["skipped"] or 0), g["moved"], float(g["elapsed"]))


def expect(run: Run, what: str, *, tasks: int, local: int = 0, remote: int = 0, misses: int = 0) -> Summary:
    """Fail loudly unless the build did exactly what the scenario is about."""
    got = parse_summary(run)
    want = (tasks, local, remote, misses, 0, 0)
    have = (got.tasks, got.local, got.remote, got.misses, got.failed, got.skipped)
    if have != want:
        raise BenchError(
            f"{what}: expected {tasks} tasks, {local} local hits, {remote} remote hits, {misses} misses, "
            f"nothing failed; got {got.tasks} tasks, {got.local} local hits, {got.remote} remote hits, "
            f"{got.misses} misses, {got.failed} failed, {got.skipped} skipped\n{run.text()}"
        )
    if "warning:" in run.stderr:
        raise BenchError(f"{what}: the client warned\n{run.text()}")
    return got


def dry_run_keys(run: Run, tasks: int) -> dict[str, str]:
    """The keys a dry run printed; the count must match the workspace."""
    if run.returncode != 0:
        raise BenchError(f"dry run failed\n{run.text()}")
    try:
        keys = {t["task"]: t["key"] for t in json.loads(run.stdout)["tasks"]}
    except (ValueError, KeyError, TypeError) as exc:
        raise BenchError(f"dry run printed no usable JSON ({exc})\n{run.text()}") from None
    if len(keys) != tasks:
        raise BenchError(f"dry run listed {len(keys)} tasks, expected {tasks}\n{run.text()}")
    return keys


# --- measurements -------------------------------------------------------------------------------


@dataclass
class Figure:
    """One row of the table: the wall times of the timed runs, and the run(s) that give the peak RSS."""

    label: str
    runs: list[Run] = field(default_factory=list)
    target: Target | None = None
    reported: list[float] = field(default_factory=list)
    note: str = ""
    rss_runs: list[Run] = field(default_factory=list)

    @property
    def times(self) -> list[float]:
        """Wall seconds of the timed runs only (the GNU time run is not among them)."""
        return [r.seconds for r in self.runs]

    @property
    def median(self) -> float:
        """The median resists the odd run that met a busy moment of the machine."""
        return statistics.median(self.times)

    def peak_rss(self) -> str:
        """The client's peak RSS: from the GNU time run when there is one, else an upper bound."""
        clean = [r.maxrss_kib for r in self.rss_runs + self.runs if r.rss_clean]
        if clean:
            return f"{max(clean) / 1024:.1f} MiB"
        return f"<= {max(r.maxrss_kib for r in self.runs + self.rss_runs) / 1024:.1f} MiB"


@dataclass
class Bench:
    """Everything one benchmark run needs: where, what to start, and how long to wait."""

    workdir: Path
    shape: Shape
    client: list[str]
    client_label: str
    jobs: int
    repeat: int
    timeout: float
    env: dict[str, str]
    rss_via: str | None
    server: Server | None = None

    def polykit(self, cwd: Path, *args: str, rss: bool = False) -> Run:
        """One fresh client process, as a user would start it."""
        return self.run([*self.client, *args], cwd, rss=rss)

    def run(self, args: list[str], cwd: Path, rss: bool = False) -> Run:
        """Any command with the benchmark's environment and time bound."""
        return run_process(args, cwd, self.env, self.timeout, self.rss_via if rss else None)

    def passes(self) -> list[bool]:
        """True for each timed run, then False for one more run under GNU time for the peak RSS."""
        return [True] * self.repeat + ([False] if self.rss_via else [])

    def build_args(self) -> list[str]:
        """The remote cache is named on every run, as a configured workspace would have it."""
        assert self.server is not None
        return ["build", "-j", str(self.jobs), "--remote-cache-url", self.server.url]


def settle() -> None:
    """Flush dirty pages before a timed scenario: tens of thousands of freshly written files are
    otherwise written back by the kernel in the middle of the runs, and that CPU time and I/O
    lands on whichever figure happens to be measured then."""
    if hasattr(os, "sync"):
        os.sync()


def progress(text: str) -> None:
    """Progress goes to stderr, so stdout is only the report."""
    print(f"  ... {text}", file=sys.stderr, flush=True)


def warm_bytecode(bench: Bench) -> None:
    """Compile every module of the project (and the standard library it uses) once, untimed,
    so the first timed run is not the one that pays for it."""
    run = bench.run([sys.executable, "-c", WARM_IMPORTS], bench.workdir)
    if run.returncode != 0:
        raise BenchError(f"cannot import the project\n{run.text()}")


def measure_reference(bench: Bench) -> list[Figure]:
    """Python's own start-up and the client's import cost: the floor under every figure."""
    python = sys.executable
    cases = [
        ("python -c pass", [python, "-c", "pass"]),
        ("python -S -c pass (no site, no .pth)", [python, "-S", "-c", "pass"]),
        ('python -c "import polykit_client.cli"', [python, "-c", "import polykit_client.cli"]),
        ("polykit --version", [*bench.client, "--version"]),
    ]
    figures = []
    for label, args in cases:
        figure = Figure(label)
        bench.run(args, bench.workdir)  # warms the page cache and .pyc files
        for timed in bench.passes():
            run = bench.run(args, bench.workdir, rss=not timed)
            if run.returncode != 0:
                raise BenchError(f"{label} failed\n{run.text()}")
            (figure.runs if timed else figure.rss_runs).append(run)
        figures.append(figure)
    return figures


def measure_builds(bench: Bench, source: Path, copies: list[Path]) -> tuple[list[Figure], dict[str, str]]:
    """Cold, warm (all local hits) and fresh-checkout (all remote hits) builds, each checked."""
    n = bench.shape.packages
    settle()
    progress("cold build (seeds the server)")
    cold = Figure("cold build: all misses, uploads (1 run)")
    run = bench.polykit(source, *bench.build_args(), rss=True)
    summary = expect(run, "cold build", tasks=n, misses=n)
    cold.runs.append(run)
    cold.reported.append(summary.elapsed)
    sizes = {"uploaded by the cold build": summary.moved}

    settle()
    progress(f"all-local-hit builds x{bench.repeat}")
    warm = Figure("all-local-hit build (same checkout)", target=TARGETS["local"])
    for timed in bench.passes():
        run = bench.polykit(source, *bench.build_args(), rss=not timed)
        summary = expect(run, "all-local-hit build", tasks=n, local=n)
        if timed:
            warm.reported.append(summary.elapsed)
        (warm.runs if timed else warm.rss_runs).append(run)

    settle()
    progress(f"all-remote-hit builds in {len(copies)} fresh checkouts")
    fresh = Figure("fresh checkout: all remote hits", target=TARGETS["fresh"])
    for copy, timed in zip(copies, bench.passes()):
        run = bench.polykit(copy, *bench.build_args(), rss=not timed)
        summary = expect(run, f"fresh-checkout build in {copy.name}", tasks=n, remote=n)
        missing = [name for name in bench.shape.names() if not (copy / "packages" / name / "dist" / "name.txt").is_file()]
        if missing:
            raise BenchError(f"fresh-checkout build in {copy.name} did not restore the outputs of {', '.join(missing[:5])}")
        if timed:
            fresh.reported.append(summary.elapsed)
        (fresh.runs if timed else fresh.rss_runs).append(run)
        sizes["downloaded by each fresh checkout"] = summary.moved
    return [cold, warm, fresh], sizes


def measure_dry_runs(bench: Bench, source: Path) -> list[Figure]:
    """Key computation alone, with the stat cache warm and with it deleted before each run."""
    n = bench.shape.packages
    state = source / ".polykit" / "state.json"
    args = ["build", "--dry-run", "--json", *bench.build_args()[1:]]
    entries = stat_cache_entries(state)
    expected = bench.shape.packages * (bench.shape.files + 1)
    if entries < expected:
        raise BenchError(f"the stat cache holds {entries} files, expected at least {expected}: "
                         "the backdated mtimes did not take, so the warm figures would measure hashing")

    settle()
    progress(f"dry runs, stat cache warm x{bench.repeat}")
    warm = Figure("--dry-run --json, stat cache warm", target=TARGETS["dry"])
    keys: dict[str, str] | None = None
    for timed in bench.passes():
        run = bench.polykit(source, *args, rss=not timed)
        keys = dry_run_keys(run, n)
        (warm.runs if timed else warm.rss_runs).append(run)

    settle()
    progress(f"dry runs, stat cache deleted x{bench.repeat}")
    cold = Figure("--dry-run --json, no state.json (rehash all)", target=TARGETS["dry"],
                  note="informative: target is for the warm case")
    for timed in bench.passes():
        state.unlink(missing_ok=True)
        run = bench.polykit(source, *args, rss=not timed)
        if dry_run_keys(run, n) != keys:
            raise BenchError("the dry run's keys changed when the stat cache was deleted")
        (cold.runs if timed else cold.rss_runs).append(run)
    return [warm, cold]


def stat_cache_entries(state: Path) -> int:
    """How many files the stat cache remembers (0 when it is missing or unreadable)."""
    try:
        folders = json.loads(state.read_text()).get("folders", {})
        return sum(len(names.split("\0")) for names, _, _ in folders.values())
    except (OSError, ValueError, AttributeError, TypeError):
        return 0


# --- the report ---------------------------------------------------------------------------------


def fmt_seconds(value: float) -> str:
    """Milliseconds matter at these sizes; more digits would be noise."""
    return f"{value:.3f} s"


def render(figures: list[Figure]) -> str:
    """A plain, fixed-width table that pastes into a README code block as it is."""
    headers = ["scenario", "runs", "median", "min-max", "in-client", "target", "turbo 2.11", "verdict", "peak RSS"]
    rows = []
    for f in figures:
        times = f.times
        spread = f"{min(times):.3f}-{max(times):.3f} s" if len(times) > 1 else "-"
        reported = fmt_seconds(statistics.median(f.reported)) if f.reported else "-"
        if f.target is None:
            target, turbo, verdict = "-", "-", "-"
        else:
            target, turbo = f"<= {f.target.limit:.2f} s", f.target.turbo
            verdict = "ok" if f.median <= f.target.limit else f"over x{f.median / f.target.limit:.1f}"
            if f.note:
                verdict += " (info)"
        rows.append([f.label, str(len(times)), fmt_seconds(f.median), spread, reported, target, turbo, verdict,
                     f.peak_rss()])
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in [headers, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def describe_setup(bench: Bench, files: int, toolchain: str, server_label: str) -> list[str]:
    """The lines under the machine line that say how the figures were obtained."""
    shape = bench.shape
    lang = f"language = \"{shape.language}\" ({toolchain})" if shape.language else "no language (no toolchain detection)"
    inputs = "git checkout (inputs listed by git ls-files)" if shape.git else "not a git checkout (inputs found by walking)"
    return [
        f"workspace: {shape.describe()}; {files} files; {lang}; {inputs}",
        f"client: {bench.client_label}, a fresh process per run, -j {bench.jobs}, --remote-cache-url on every run;"
        f" server: {server_label} on {LOCALHOST}, temporary storage, same machine",
        "bytecode: " + ("none written (--no-bytecode): existing .pyc files are used, modules without one are compiled"
                        " at every run" if bench.env.get("PYTHONDONTWRITEBYTECODE")
                        else "compiled once before timing, into a private PYTHONPYCACHEPREFIX, as an installed client has"),
        f"figures: wall time, median of {bench.repeat} run(s); in-client = the elapsed time the build's own summary"
        " prints (from after loading the workspace to the end), so median - in-client ~ start-up + workspace load",
        ("peak RSS: the client process's own, from one more run of each scenario under GNU time (the cold build"
         " is timed under it too)") if bench.rss_via else
        ("peak RSS: os.wait4's figure, an upper bound that includes this benchmark's own memory at the"
         " start of the child (no GNU time found)"),
    ]


def toolchain_note(language: str | None) -> str:
    """Which program toolchain detection runs, since its start-up is part of a cold stat cache."""
    tools = {"js": "node", "ts": "node", "rust": "rustc", "go": "go", "python": "python3"}
    if not language:
        return "none"
    tool = tools[language]
    found = shutil.which(tool)
    return f"{tool} --version via {found}" if found else f"{tool} not found: a fixed marker"


# --- the program --------------------------------------------------------------------------------


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    """Options; --quick only changes the defaults, so explicit sizes still win."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smoke run: 5 packages x 20 files, 1 run each")
    parser.add_argument("--shape", choices=["50x200", "500x20", "10x5000"], default=None,
                        help="packages x files per package (default: 50x200; --packages and --files win)")
    parser.add_argument("--vs-turbo", action="store_true",
                        help="polykit and turbo side by side on generated npm workspaces, with ratios (bench_vs_turbo.py)")
    parser.add_argument("--shapes", default=None, help="with --vs-turbo: which shapes, comma-separated (default: all three)")
    parser.add_argument("--turbo-dir", default=None,
                        help="with --vs-turbo: the folder of `npm install --prefix DIR turbo@2 turborepo-remote-cache@2`"
                             " (default: .ci/tools, else turbo on PATH)")
    parser.add_argument("--packages", type=int, default=None, help="packages (default: 50; --quick: 5)")
    parser.add_argument("--files", type=int, default=None, help="files per package (default: 200; --quick: 20)")
    parser.add_argument("--file-size", type=int, default=1024, help="bytes per file (default: 1024)")
    parser.add_argument("--chain", type=int, default=None,
                        help="packages in the dependency chain (default: packages/5, at least 2, at most 10)")
    parser.add_argument("--language", default="python", choices=["none", "python", "js", "ts", "go", "rust"],
                        help="language of every package; its toolchain detection is part of the cost (default: python)")
    parser.add_argument("--repeat", type=int, default=None, help="timed runs per scenario (default: 5; --quick: 1)")
    parser.add_argument("-j", "--jobs", type=int, default=4, help="polykit -j for the builds (default: 4)")
    parser.add_argument("--git", action="store_true", help="make the workspace a git checkout")
    parser.add_argument("--no-bytecode", action="store_true",
                        help="write no .pyc files: a client never compiled before is compiled at every run")
    parser.add_argument("--module", action="store_true", help="run `python -m polykit_client` instead of the console script")
    parser.add_argument("--timeout", type=float, default=None,
                        help="seconds one process may take before it is killed and the benchmark fails"
                             " (default: 120; 900 with --vs-turbo, whose cold builds run 500 npm commands)")
    parser.add_argument("--tmp-dir", default=None, help="where the temporary folder goes (default: the system's)")
    args = parser.parse_args(list(argv))
    shape = tuple(int(n) for n in args.shape.split("x")) if args.shape else (50, 200)
    if args.packages is None:
        args.packages = 5 if args.quick else shape[0]
    if args.files is None:
        args.files = 20 if args.quick else shape[1]
    if args.repeat is None:
        args.repeat = 1 if args.quick else 2 if args.vs_turbo else 5
    if args.timeout is None:
        args.timeout = 900.0 if args.vs_turbo else 120.0
    if args.chain is None:
        args.chain = min(args.packages, max(2, min(10, args.packages // 5)))
    for name in ("packages", "files", "file_size", "repeat", "jobs", "chain"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.chain > args.packages:
        parser.error("--chain cannot exceed --packages")
    if args.git and shutil.which("git") is None:
        parser.error("--git needs git on PATH")
    return args


def run_bench(args: argparse.Namespace, workdir: Path, holder: list[Server]) -> int:
    """Generate, start the server, measure, and print the report."""
    shape = Shape(args.packages, args.files, args.file_size, args.chain,
                  None if args.language == "none" else args.language, args.git)
    client, client_label = console_script("polykit", "polykit_client", args.module)
    _, server_label = console_script("polykit-cache", "polykit_cache", args.module)
    env = client_env(workdir / "pycache", not args.no_bytecode)
    bench = Bench(workdir, shape, client, client_label, args.jobs, args.repeat, args.timeout, env, gnu_time())

    load_at_start = load_average()
    progress(f"generating {shape.packages} packages x {shape.files} files")
    source = workdir / "checkout"
    files = generate(source, shape)
    copies = []
    for i in range(len(bench.passes())):
        progress(f"copying fresh checkout {i + 1}/{len(bench.passes())}")
        copies.append(fresh_copy(source, workdir / f"fresh-{i + 1}"))

    settle()
    progress("compiling bytecode, python start-up references")
    warm_bytecode(bench)
    figures = measure_reference(bench)
    progress("starting polykit-cache")
    bench.server = start_server(workdir, args.module, env)
    holder.append(bench.server)
    builds, sizes = measure_builds(bench, source, copies)
    dry = measure_dry_runs(bench, source)

    print("\n".join(describe_setup(bench, files, toolchain_note(shape.language), server_label)))
    print(f"load: 1-minute load average {load_at_start} at the start, {load_average()} at the end"
          f" ({os.cpu_count()} cores; the server runs on the same machine)")
    print()
    print(render([*figures, *builds, *dry]))
    print()
    sizes["server storage after seeding"] = f"{folder_size(bench.server.storage) / 1024:.1f} KiB"
    sizes["local cache (.polykit/cache)"] = f"{folder_size(source / '.polykit' / 'cache') / 1024:.1f} KiB"
    sizes["stat cache (.polykit/state.json)"] = f"{(source / '.polykit' / 'state.json').stat().st_size / 1024:.1f} KiB"
    print("sizes: " + "; ".join(f"{k} {v}" for k, v in sizes.items()))
    over = [f.label for f in builds + dry if f.target is not None and not f.note and f.median > f.target.limit]
    print("targets: " + ("all met" if not over else "over for " + ", ".join(over)))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; 0 when it completed (targets missed or not), 1 when a check failed, 130 on Ctrl-C."""
    args = parse_args(sys.argv[1:] if argv is None else argv)
    print(machine_line(), flush=True)
    if args.vs_turbo:
        import bench_vs_turbo

        return bench_vs_turbo.run(args)
    servers: list[Server] = []
    started = time.monotonic()

    def measure(workdir: Path) -> int:
        status = run_bench(args, workdir, servers)
        progress(f"done in {time.monotonic() - started:.1f} s")
        return status

    def stop() -> None:
        for server in servers:
            stop_server(server.proc)

    return run_in_workdir("polykit-bench-client-", args.tmp_dir, measure, stop)


if __name__ == "__main__":
    sys.exit(main())
