"""scripts/demo end to end, and the deployment files checked against the real server.

The demo runs as a new user runs it: a subprocess, its own server on a free loopback port. The
deployment files cannot be exercised here under systemd, nginx, Caddy or a container engine, so
what can be checked cheaply is: every documented command line parses with the server's own
options, the paths and limits in the files agree with each other and with the server's defaults,
and the image's start command and health check work against a live server.
"""

from __future__ import annotations

import json
import os
import queue
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path, PurePosixPath

import pytest

from polykit_cache import cli
from polykit_cache import config as cfg

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "scripts" / "demo"
DOCS = ROOT / "docs"
SUMMARY = re.compile(r"^\s*(\d+) tasks: (\d+) local hits, (\d+) remote hits, (\d+) misses, (\d+) failed", re.M)
SERVER_URL = re.compile(r"Cache server: http://127\.0\.0\.1:(\d+)")
DEMO_TIMEOUT = 120


def demo_env(tmpdir: Path) -> dict[str, str]:
    """The caller's environment with a private TMPDIR, so what the demo leaves behind is visible."""
    tmpdir.mkdir()
    return {**os.environ, "TMPDIR": str(tmpdir)}


def refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    except OSError:
        return True
    return False


# --- scripts/demo -----------------------------------------------------------------------------


def test_demo_second_checkout_is_all_remote_hits(tmp_path):
    folder, tmpdir = tmp_path / "demo", tmp_path / "tmp"
    started = time.monotonic()
    out = subprocess.run([str(DEMO), str(folder)], env=demo_env(tmpdir), stdin=subprocess.DEVNULL,
                         capture_output=True, text=True, timeout=DEMO_TIMEOUT)
    elapsed = time.monotonic() - started
    assert out.returncode == 0, f"scripts/demo exited {out.returncode}\n{out.stdout}\n{out.stderr}"

    summaries = [tuple(int(n) for n in m) for m in SUMMARY.findall(out.stdout)]
    assert len(summaries) == 2, out.stdout
    first, second = summaries
    tasks = first[0]
    assert tasks >= 4
    assert first == (tasks, 0, 0, tasks, 0), f"the first build should run every task:\n{out.stdout}"
    assert second == (tasks, 0, tasks, 0, 0), f"the second build should be all remote hits:\n{out.stdout}"

    # The server is stopped, its temporary storage removed; the checkouts asked for are kept.
    port = int(SERVER_URL.search(out.stdout).group(1))
    assert refused(port)
    assert list(tmpdir.iterdir()) == []
    assert (folder / "checkout-2" / "packages" / "gateway" / "bin" / "gateway").is_file()
    assert elapsed < 60, f"the demo took {elapsed:.1f} s"


def test_demo_interrupted_stops_its_server_and_cleans_up(tmp_path):
    """Ctrl-C reaches the demo's whole process group, as from a terminal."""
    tmpdir = tmp_path / "tmp"
    proc = subprocess.Popen([str(DEMO)], env=demo_env(tmpdir), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout], daemon=True).start()
    seen: list[str] = []
    try:
        deadline = time.monotonic() + DEMO_TIMEOUT
        while not any("polykit build" in line for line in seen):  # the first build is starting
            seen.append(lines.get(timeout=max(0.1, deadline - time.monotonic())))
        os.killpg(proc.pid, signal.SIGINT)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    time.sleep(0.2)  # let the reader thread drain
    while not lines.empty():
        seen.append(lines.get())
    text = "".join(seen)
    assert proc.returncode == 130, text
    assert "Interrupted" in text
    assert refused(int(SERVER_URL.search(text).group(1)))
    assert list(tmpdir.iterdir()) == [], "the temporary storage and checkouts should be removed"


# --- deployment files -------------------------------------------------------------------------


def parse_server_command(argv: list[str]) -> cfg.Config:
    """What `polykit-cache ARGS` would run with, through the console script's own parser."""
    args = list(argv)
    if args and args[0].startswith("-"):
        args.insert(0, "serve")
    namespace = cli.build_parser().parse_args(args)
    assert namespace.command == "serve", argv
    return cfg.from_sources(namespace, {})


def documented_commands(markdown: str) -> list[list[str]]:
    """Every `polykit-cache ...` line (with its continuations) in the page's code blocks."""
    commands, in_block, pending = [], False, ""
    for line in markdown.splitlines():
        if line.lstrip().startswith("```"):
            in_block = not in_block
            continue
        if not in_block:
            continue
        text = pending + line.strip()
        pending = ""
        if text.endswith("\\"):
            pending = text[:-1] + " "
            continue
        if text.startswith("polykit-cache "):
            commands.append(shlex.split(text, comments=True)[1:])
    return commands


def unit_file() -> dict[str, list[str]]:
    """The unit's settings; a key given several times keeps every value, as systemd does."""
    settings: dict[str, list[str]] = {}
    for line in (DOCS / "polykit-cache.service").read_text().splitlines():
        line = line.strip()
        if line and not line.startswith(("#", ";", "[")):
            key, _, value = line.partition("=")
            settings.setdefault(key.strip(), []).append(value.strip())
    return settings


def dockerfile() -> str:
    return (ROOT / "Dockerfile").read_text().replace("\\\n", " ")


def docker_instruction(name: str) -> list[str]:
    """The exec-form (JSON) argument list of a Dockerfile instruction (for HEALTHCHECK: its CMD)."""
    match = re.search(rf"^{name} (?:.*?CMD )?(\[.*\])\s*$", dockerfile(), re.M)
    assert match, f"no exec-form {name} in the Dockerfile"
    return json.loads(match.group(1))


def test_deploy_page_commands_parse_with_the_server_options():
    page = (DOCS / "deploy.md").read_text()
    assert "polykit-cache --bind 0.0.0.0 --port 8080 --storage-dir /var/cache/polykit\n" in page
    commands = documented_commands(page)
    assert len(commands) >= 3, commands
    for argv in commands:
        config = parse_server_command(argv)
        assert config.storage_dir == Path("/var/cache/polykit"), argv
        assert config.port == 8080


def test_unit_file_command_and_paths_agree():
    unit = unit_file()
    exec_start = shlex.split(unit["ExecStart"][0])
    assert exec_start[0].endswith("/polykit-cache")
    config = parse_server_command(exec_start[1:])
    storage = PurePosixPath(str(config.storage_dir))
    assert config.bind == "127.0.0.1" and config.trusted_proxy == "127.0.0.1"
    assert config.token_file is not None
    assert unit["User"][0] not in ("", "root")

    # waitress spools uploads in TMPDIR: on the storage disk, in a place the unit may write to.
    env = dict(item.split("=", 1) for value in unit["Environment"] for item in shlex.split(value))
    spool = PurePosixPath(env["TMPDIR"])
    assert spool.is_relative_to(storage)
    writable = [PurePosixPath(p.lstrip("-")) for value in unit["ReadWritePaths"] for p in value.split()]
    assert any(storage.is_relative_to(w) for w in writable)
    # systemd makes each listed cache folder owned by the service user, but an unlisted folder
    # between them owned by root: every folder from the storage down to the spool is listed.
    created = {PurePosixPath("/var/cache", d) for value in unit["CacheDirectory"] for d in value.split()}
    chain = [spool, *[p for p in spool.parents if p.is_relative_to(storage)]]
    assert set(chain) <= created, f"{sorted(map(str, chain))} not all in CacheDirectory={sorted(map(str, created))}"
    assert unit["KillSignal"] == ["SIGTERM"]


def test_proxy_limits_and_upstreams_match_the_server():
    default = cfg.Config()
    nginx = (DOCS / "nginx.conf").read_text()
    caddy = (DOCS / "Caddyfile").read_text()
    nginx_limit = re.search(r"^\s*client_max_body_size\s+(\S+);", nginx, re.M).group(1)
    caddy_limit = re.search(r"^\s*max_size\s+(\S+)\s*$", caddy, re.M).group(1)
    # nginx sizes: k/m/g are powers of 1024, as in the server's parse_size.
    assert cfg.parse_size(nginx_limit) == default.max_artifact_size
    assert cfg.parse_size(caddy_limit) == default.max_artifact_size
    assert "proxy_request_buffering off;" in nginx

    served = parse_server_command(shlex.split(unit_file()["ExecStart"][0])[1:])
    address = f"{served.bind}:{served.port}"
    assert re.search(rf"^\s*server {re.escape(address)};", nginx, re.M)
    assert re.search(rf"^\s*reverse_proxy {re.escape(address)} ", caddy, re.M)


def test_docker_start_command_and_health_check(tmp_path):
    """The image's ENTRYPOINT + CMD and HEALTHCHECK, run outside a container on loopback."""
    bin_dir = Path(sys.executable).parent
    if shutil.which("polykit-cache", path=str(bin_dir)) is None:
        pytest.skip("polykit-cache is not installed beside this interpreter")
    entry, command, health = docker_instruction("ENTRYPOINT"), docker_instruction("CMD"), docker_instruction("HEALTHCHECK")
    config = parse_server_command(command)
    assert config.bind == "0.0.0.0" and config.storage_dir == Path("/var/cache/polykit")
    assert "VOLUME /var/cache/polykit" in dockerfile() and "EXPOSE 8080" in dockerfile()

    storage = tmp_path / "volume"
    argv = entry + [{"0.0.0.0": "127.0.0.1", "/var/cache/polykit": str(storage)}.get(a, a) for a in command]
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
           "TMPDIR": str(storage / "tmp" / "spool"), "POLYKIT_CACHE_PORT": "0"}
    log_path = tmp_path / "server.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        deadline, found = time.monotonic() + 20, None
        while found is None and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.05)
            found = re.search(r"serving on http://127\.0\.0\.1:(\d+)", log_path.read_text(errors="replace"))
        assert found, log_path.read_text()
        port = int(found.group(1))
        assert (storage / "tmp" / "spool").is_dir()  # made by the entrypoint before the server started

        check = [sys.executable if health[0] == "python" else health[0], *health[1:]]
        healthy = subprocess.run(check, env={**env, "POLYKIT_CACHE_PORT": str(port)}, capture_output=True, timeout=30)
        assert healthy.returncode == 0, healthy.stderr

        proc.send_signal(signal.SIGTERM)  # what `docker stop` sends; the shell exec'd the server
        assert proc.wait(timeout=15) == 0, log_path.read_text()
        down = subprocess.run(check, env={**env, "POLYKIT_CACHE_PORT": str(port)}, capture_output=True, timeout=30)
        assert down.returncode != 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
