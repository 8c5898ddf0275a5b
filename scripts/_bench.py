"""What the benchmarks share: the machine line every report starts with, and stopping a server."""

from __future__ import annotations

import os
import platform
import re
import signal
import subprocess
from pathlib import Path


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
