"""What the benchmarks share: the machine line every report starts with, the load average,
finding an npm-installed tool, stopping a server, and the ``main`` that runs a benchmark in a
temporary folder and cleans up whatever happens."""

from __future__ import annotations

import contextlib
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Callable, Iterator

CHECKOUT = Path(__file__).resolve().parent.parent


def cpu_model() -> str:
    """The CPU model as /proc/cpuinfo names it."""
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return platform.processor() or platform.machine()
    for name in ("model name", "Hardware", "cpu model", "Processor"):
        match = re.search(rf"^{name}\s*:\s*(.+)$", text, re.MULTILINE)
        if match:
            return match.group(1).strip()
    return platform.machine()


def usable_cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def machine_line() -> str:
    """CPU, cores, Python and OS: start-up, hashing and I/O speed depend on all of these."""
    return (f"machine: {cpu_model()}, {os.cpu_count()} cores ({usable_cpus()} usable), "
            f"{platform.python_implementation()} {platform.python_version()}, {platform.system()} {platform.release()}")


def load_average() -> str:
    """The 1-minute load average: other work on the machine shows up in every figure, so say how much there was."""
    try:
        return f"{os.getloadavg()[0]:.2f}"
    except OSError:
        return "unknown"


def find_node_tool(explicit: str | None, package: str, relative: str) -> Path | None:
    """A tool from ``explicit`` (an ``npm install --prefix`` folder), the checkout's ``.ci/tools``, or PATH."""
    for prefix in ([Path(explicit)] if explicit else []) + [CHECKOUT / ".ci" / "tools"]:
        candidate = prefix / "node_modules" / package / relative
        if candidate.is_file():
            return candidate
    found = shutil.which(package) if package == "turbo" else None
    return Path(found) if found else None


def node_server_env(port: int, storage: Path, token: str, body_limit: int | None = None) -> dict[str, str]:
    """The environment that runs turborepo-remote-cache (its ``dist/env.js`` reads these) on loopback.

    Local storage under ``storage`` itself (not the system temp folder), one static bearer
    token, warnings only in its log; ``body_limit`` raises its 100 MiB default for bigger uploads
    (it buffers a whole upload in memory before it writes it).
    """
    env = dict(os.environ, PORT=str(port), HOST="127.0.0.1", STORAGE_PROVIDER="local", STORAGE_PATH=str(storage),
               STORAGE_PATH_USE_TMP_FOLDER="false", TURBO_TOKEN=token, LOG_LEVEL="warn")
    if body_limit is not None:
        env["BODY_LIMIT"] = str(body_limit)
    return env


def stop_process(proc: subprocess.Popen | None, timeout: float) -> None:
    """SIGTERM (a server's clean stop), then SIGKILL if it does not go in time."""
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


class BenchError(Exception):
    """A run did not do what the scenario requires; its figures would be meaningless."""


def _terminate(signum: int, frame: object) -> None:
    """SIGTERM takes the same clean-up path as Ctrl-C."""
    raise KeyboardInterrupt


@contextlib.contextmanager
def interrupts_as_keyboard() -> Iterator[None]:
    """SIGTERM cleans up like Ctrl-C does: the servers are stopped and the folders removed."""
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def run_in_workdir(prefix: str, tmp_dir: str | None, measure: Callable[[Path], int],
                   stop: Callable[[], None] = lambda: None) -> int:
    """A benchmark's ``main``: ``measure(workdir)`` in a fresh temporary folder.

    Returns what ``measure`` returns, 1 after a :class:`BenchError` (printed), 130 on Ctrl-C or
    SIGTERM. Whatever happens, ``stop`` (the servers it started) runs, then the folder is
    removed, with Ctrl-C ignored meanwhile so that a second one cannot leave them behind.
    """
    workdir = Path(tempfile.mkdtemp(prefix=prefix, dir=tmp_dir))
    try:
        with interrupts_as_keyboard():
            return measure(workdir)
    except KeyboardInterrupt:
        print("interrupted; stopping the servers and removing temporary files", file=sys.stderr)
        return 130
    except BenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            stop()
            shutil.rmtree(workdir, ignore_errors=True)
        finally:
            signal.signal(signal.SIGINT, previous)
