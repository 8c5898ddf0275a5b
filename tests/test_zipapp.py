"""The zipapps: built by scripts/build_zipapp.py, run under ``python -I -S`` (no site-packages at all),
against each other end to end, each with a fresh per-user unpack cache.

Only the running interpreter's zstandard build is packed here (from the installed package), so the
tests never download anything.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import stat
import subprocess
import sys
import time
import zipfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pytest

from sample import Polykit, copy_workspace, make_tools, make_workspace

ROOT = Path(__file__).resolve().parent.parent
BUILD = ROOT / "scripts" / "build_zipapp.py"
BOOTSTRAP = ROOT / "scripts" / "zipapp_main.py"
DATA = "_polykit_zipapp"
MIB = 1024 * 1024
HAS_STDLIB_ZSTD = importlib.util.find_spec("compression") is not None and importlib.util.find_spec("compression.zstd") is not None


def build(out: Path) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, str(BUILD), "--out-dir", str(out)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"build failed\n{done.stdout}\n{done.stderr}"
    return done


@pytest.fixture(scope="module")
def dist(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    build(out)
    return out


def fresh_env(home: Path) -> dict[str, str]:
    """A user with an empty home, cache and temp folder: nothing unpacked yet, nothing shared with the machine."""
    (home / "tmp").mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("POLYKIT_", "PYTHON", "XDG_"))}
    env.update(HOME=str(home), XDG_CACHE_HOME=str(home / "cache"), TMPDIR=str(home / "tmp"))
    return env


def unpack_root(env: dict[str, str]) -> Path:
    return Path(env["XDG_CACHE_HOME"]) / "polykit" / "zipapp"


def run_pyz(pyz: Path, *args: str, env: dict[str, str], cwd: Path | None = None) -> subprocess.CompletedProcess:
    """The zipapp on the bare interpreter: ``-I`` (no environment, no user site) and ``-S`` (no site-packages)."""
    return subprocess.run([sys.executable, "-I", "-S", str(pyz), *args], env=env, cwd=cwd,
                          capture_output=True, text=True, timeout=120)


class ZipappPolykit(Polykit):
    """The sample-workspace runner of the other tests, with the client zipapp instead of ``-m polykit_client``."""

    def __init__(self, pyz: Path, workspace: Path, tools: Path, marker: Path, **env: str) -> None:
        super().__init__(workspace, tools, marker, **env)
        self.pyz = pyz

    def run(self, *args: str, check: bool = True, cwd: Path | None = None, **env: str) -> subprocess.CompletedProcess:
        out = run_pyz(self.pyz, *args, env={**self.env, **env}, cwd=cwd or self.workspace)
        if check and out.returncode != 0:
            raise AssertionError(f"polykit.pyz {' '.join(args)} exited {out.returncode}\n{out.stdout}\n{out.stderr}")
        return out


@contextmanager
def zipapp_server(pyz: Path, storage: Path, log_path: Path, env: dict[str, str], *args: str) -> Iterator[int]:
    """``polykit-cache.pyz`` on a free port; its log goes to a file that is polled for the port."""
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-I", "-S", str(pyz), "--port", "0", "--storage-dir", str(storage), *args],
                                stdout=log, stderr=subprocess.STDOUT, env=env)
        try:
            deadline = time.monotonic() + 20
            while True:
                text = log_path.read_text(errors="replace")
                found = re.findall(r"serving on http://127\.0\.0\.1:(\d+)", text)
                if found:
                    break
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(f"the server zipapp did not start:\n{text}")
                time.sleep(0.05)
            yield int(found[-1])
        finally:
            proc.terminate()
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)


def version() -> str:
    text = (ROOT / "polykit_client" / "__init__.py").read_text()
    return re.search(r'__version__ = "([^"]+)"', text).group(1)


def load_bootstrap():
    spec = importlib.util.spec_from_file_location("polykit_zipapp_main", BOOTSTRAP)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# --- what is inside ----------------------------------------------------------------------------


def test_sizes_are_a_few_mib(dist):
    for name in ("polykit.pyz", "polykit-cache.pyz"):
        size = (dist / name).stat().st_size
        assert 0.05 * MIB < size < 6 * MIB, f"{name} is {size / MIB:.1f} MiB"


def test_contents_are_only_what_runs(dist):
    client = zipfile.ZipFile(dist / "polykit.pyz")
    server = zipfile.ZipFile(dist / "polykit-cache.pyz")
    for zf in (client, server):
        names = zf.namelist()
        assert names == sorted(names)
        assert names[0] == "__main__.py"
        assert all(info.date_time == (1980, 1, 1, 0, 0, 0) for info in zf.infolist())
        assert not [n for n in names if "__pycache__" in n or n.endswith((".pyc", ".pyo"))]
        assert not [n for n in names if re.search(r"(^|/)(tests?|conftest)(/|\.py$)", n) or "/test_" in n]
        assert not [n for n in names if "cffi" in n]
        outside = [n for n in names if n.endswith((".so", ".pyd")) and not n.startswith(f"{DATA}/native/")]
        assert not outside, "compiled modules at the top of the zip can never be imported"
        manifest = json.loads(zf.read(f"{DATA}/manifest.json"))
        assert manifest["version"] == version()
        for tag, native in manifest["native"].items():
            for rel, meta in native["files"].items():
                data = zf.read(f"{DATA}/native/{tag}/{rel}")
                assert hashlib.sha256(data).hexdigest() == meta["sha256"]
    tops = {n.split("/")[0] for n in client.namelist()}
    assert tops == {"__main__.py", DATA, "polykit_client"}
    assert {n.split("/")[0] for n in server.namelist()} == {"__main__.py", DATA, "polykit_cache", "polykit_client", "waitress"}
    assert json.loads(client.read(f"{DATA}/manifest.json"))["entry"] == "polykit_client.cli:main"
    assert json.loads(server.read(f"{DATA}/manifest.json"))["entry"] == "polykit_cache.cli:main"
    assert f"{DATA}/licenses/zstandard.txt" in client.namelist()
    assert f"{DATA}/licenses/waitress.txt" in server.namelist()


def test_the_build_is_reproducible(dist, tmp_path):
    build(tmp_path)
    for name in ("polykit.pyz", "polykit-cache.pyz"):
        assert (tmp_path / name).read_bytes() == (dist / name).read_bytes(), f"{name} differs between two builds"


# --- running on a bare interpreter ---------------------------------------------------------------


def test_the_bare_interpreter_really_has_no_zstandard(tmp_path):
    done = subprocess.run([sys.executable, "-I", "-S", "-c", "import zstandard"], env=fresh_env(tmp_path),
                          capture_output=True, text=True, timeout=30)
    assert done.returncode != 0


def test_version_on_a_bare_interpreter_unpacks_once(dist, tmp_path):
    env = fresh_env(tmp_path)
    out = run_pyz(dist / "polykit.pyz", "--version", env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == f"polykit {version()}"
    out = run_pyz(dist / "polykit-cache.pyz", "--version", env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith(f"polykit-cache {version()} (")
    folders = [p.name for p in unpack_root(env).iterdir()] if unpack_root(env).exists() else []
    if HAS_STDLIB_ZSTD:
        assert "compression.zstd" in out.stdout and folders == []
    else:
        assert "zstandard" in out.stdout
        assert len(folders) == 1, "both zipapps carry the same bytes, so they share one unpacked folder"
        assert folders[0].startswith("zstandard-")


def test_end_to_end_build_between_the_zipapps(dist, tmp_path):
    env = fresh_env(tmp_path / "user")
    tools = make_tools(tmp_path / "tools")
    user = {k: env[k] for k in ("HOME", "XDG_CACHE_HOME", "TMPDIR")}
    with zipapp_server(dist / "polykit-cache.pyz", tmp_path / "store", tmp_path / "server.log", env) as port:
        url = f"http://127.0.0.1:{port}"
        first = ZipappPolykit(dist / "polykit.pyz", make_workspace(tmp_path / "one"), tools, tmp_path / "m1", **user)
        out = first.run("build", "--remote-cache-url", url)
        assert "0 remote hits, 3 misses, 0 failed" in out.stdout, out.stdout
        assert "warning:" not in out.stderr, out.stderr
        assert first.ran() == ["api-server:build", "shared-utils:build", "web:build"]

        second_ws = copy_workspace(tmp_path / "one", tmp_path / "two")
        second = ZipappPolykit(dist / "polykit.pyz", second_ws, tools, tmp_path / "m2", **user)
        out = second.run("build", "--remote-cache-url", url)
        assert "3 remote hits, 0 misses" in out.stdout, out.stdout
        assert second.ran() == []
        assert (second_ws / "packages" / "web" / "dist" / "app.js").is_file()
    assert len(list((tmp_path / "store").rglob("*.zst"))) == 3


def test_the_server_zipapp_serves_with_worker_processes(dist, tmp_path):
    from support import KEY, pack_tree, request

    blob = pack_tree(tmp_path, {"a": b"x" * 5000})
    env = fresh_env(tmp_path / "user")
    with zipapp_server(dist / "polykit-cache.pyz", tmp_path / "store", tmp_path / "server.log", env,
                       "--workers", "2") as port:
        assert request(port, "PUT", f"/v1/artifacts/{KEY}", blob)[0] == 201
        for _ in range(6):
            assert request(port, "GET", f"/v1/artifacts/{KEY}")[2] == blob
        stats = json.loads(request(port, "GET", "/v1/stats")[2])
        assert (stats["uploads"], stats["hits"], stats["artifacts"]) == (1, 6, 1)
    assert "with 2 worker processes" in (tmp_path / "server.log").read_text()


def test_processes_starting_at_once_share_one_unpack(dist, tmp_path):
    env = fresh_env(tmp_path)
    cmds = [[sys.executable, "-I", "-S", str(dist / name), "--version"]
            for name in ("polykit.pyz", "polykit-cache.pyz") * 3]
    procs = [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for cmd in cmds]
    results = [(*p.communicate(timeout=60), p.returncode) for p in procs]
    assert all(rc == 0 for _, _, rc in results), results
    if not HAS_STDLIB_ZSTD:
        assert len([p for p in unpack_root(env).iterdir() if not p.name.startswith(".")]) == 1
        assert not [p for p in unpack_root(env).iterdir() if p.name.startswith(".tmp-")], "a loser left its temp folder"


def test_an_unwritable_home_falls_back_to_a_private_temp_folder(dist, tmp_path):
    if HAS_STDLIB_ZSTD:
        pytest.skip("nothing is unpacked on an interpreter with compression.zstd")
    env = fresh_env(tmp_path)
    (tmp_path / "not-a-folder").write_text("")
    env["HOME"] = str(tmp_path / "not-a-folder")
    del env["XDG_CACHE_HOME"]
    out = run_pyz(dist / "polykit.pyz", "--version", env=env)
    assert out.returncode == 0, out.stderr
    [private] = (tmp_path / "tmp").iterdir()
    assert private.name.startswith("polykit-zipapp-")
    assert stat.S_IMODE(private.stat().st_mode) == 0o700
    assert [p.name for p in private.iterdir()][0].startswith("zstandard-")


def test_a_damaged_unpacked_folder_is_replaced(dist, tmp_path):
    if HAS_STDLIB_ZSTD:
        pytest.skip("nothing is unpacked on an interpreter with compression.zstd")
    env = fresh_env(tmp_path)
    assert run_pyz(dist / "polykit.pyz", "--version", env=env).returncode == 0
    [module] = unpack_root(env).rglob("backend_c*")
    size = module.stat().st_size
    module.write_bytes(b"")
    out = run_pyz(dist / "polykit.pyz", "--version", env=env)
    assert out.returncode == 0, out.stderr
    [module] = unpack_root(env).rglob("backend_c*")
    assert module.stat().st_size == size


def test_an_unsupported_platform_is_named_with_what_is_supported(dist, tmp_path):
    """A zipapp carrying builds for another CPU only: one clear error, no traceback."""
    if HAS_STDLIB_ZSTD:
        pytest.skip("an interpreter with compression.zstd needs no carried build")
    fake = tmp_path / "other-cpu.pyz"
    with zipfile.ZipFile(dist / "polykit.pyz") as src, open(fake, "wb") as fh:
        fh.write(b"#!/usr/bin/env python3\n")
        with zipfile.ZipFile(fh, "w") as out:
            for info in src.infolist():
                data = src.read(info)
                if info.filename == f"{DATA}/manifest.json":
                    manifest = json.loads(data)
                    manifest["native"] = {
                        tag.replace(os.uname().machine, "riscv64"): {**native, "platform": "Linux riscv64, glibc 2.31+"}
                        for tag, native in manifest["native"].items()
                    }
                    data = json.dumps(manifest).encode()
                out.writestr(info.filename.replace(os.uname().machine, "riscv64"), data)
    out = run_pyz(fake, "--version", env=fresh_env(tmp_path))
    assert out.returncode == 1
    assert "Traceback" not in out.stderr
    assert out.stderr.startswith("error: polykit cannot load zstd on CPython")
    py = f"{sys.version_info.major}.{sys.version_info.minor}"
    assert "carries zstandard" in out.stderr and f"CPython {py} on Linux riscv64, glibc 2.31+" in out.stderr
    assert "Python 3.14+" in out.stderr


# --- the bootstrap's race handling, step by step -------------------------------------------------


class FakeArchive:
    def __init__(self, files: dict[str, bytes]) -> None:
        self.files = files

    def get_data(self, name: str) -> bytes:
        try:
            return self.files[name]
        except KeyError:
            raise OSError(name) from None


def fake_build(boot) -> tuple[FakeArchive, dict]:
    files = {"zstandard/__init__.py": b"x = 1\n", "zstandard/backend_c.fake.so": b"\0" * 100}
    meta = {rel: {"sha256": hashlib.sha256(d).hexdigest(), "size": len(d)} for rel, d in files.items()}
    archive = FakeArchive({f"{boot.DATA}/native/fake/{rel}": d for rel, d in files.items()})
    return archive, {"key": "k" * 64, "files": meta}


def test_losing_the_unpack_race_uses_the_winners_folder(tmp_path, monkeypatch):
    boot = load_bootstrap()
    archive, build_meta = fake_build(boot)
    root = tmp_path / "root"
    final = root / "name"
    real_extract = boot.extract

    def extract_then_lose(archive, tag, build, dest):
        real_extract(archive, tag, build, dest)
        real_extract(archive, tag, build, str(final))  # another process publishes first

    monkeypatch.setattr(boot, "extract", extract_then_lose)
    assert boot.unpack(archive, str(root), "name", "fake", build_meta) == str(final)
    assert sorted(p.name for p in root.iterdir()) == ["name"]
    assert boot.is_complete(str(final), build_meta)


def test_an_incomplete_folder_is_set_aside_and_replaced(tmp_path):
    boot = load_bootstrap()
    archive, build_meta = fake_build(boot)
    final = tmp_path / "name" / "zstandard"
    final.mkdir(parents=True)
    (final / "__init__.py").write_bytes(b"")
    assert boot.unpack(archive, str(tmp_path), "name", "fake", build_meta) == str(tmp_path / "name")
    assert boot.is_complete(str(tmp_path / "name"), build_meta)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["name"]


def test_a_damaged_zipapp_is_refused(tmp_path):
    boot = load_bootstrap()
    archive, build_meta = fake_build(boot)
    archive.files[f"{boot.DATA}/native/fake/zstandard/__init__.py"] = b"y = 2\n"
    with pytest.raises(boot.BootError, match="damaged"):
        boot.unpack(archive, str(tmp_path), "name", "fake", build_meta)
    assert list(tmp_path.iterdir()) == []


def test_a_shared_temp_folder_of_someone_else_is_refused(tmp_path):
    boot = load_bootstrap()
    open_folder = tmp_path / "polykit-zipapp-x"
    open_folder.mkdir()
    open_folder.chmod(0o777)
    with pytest.raises(boot.BootError, match="another user or is writable by others"):
        boot.ensure_private(str(open_folder))
    boot.ensure_private(str(tmp_path / "fresh"))
    assert stat.S_IMODE((tmp_path / "fresh").stat().st_mode) == 0o700
