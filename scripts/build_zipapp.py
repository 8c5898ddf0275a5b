#!/usr/bin/env python3
"""Build the single-file programs ``dist/polykit.pyz`` (the client) and ``dist/polykit-cache.pyz``
(the server) from this checkout and the installed dependencies.

Each runs with nothing but a CPython 3.11+ interpreter, even under ``python3 -I -S``: the
pure-Python code (``polykit_client``; for the server also ``polykit_cache`` and ``waitress``) sits
at the top of the zip where zipimport finds it, and zstandard's compiled module, which zipimport
cannot load, travels as data that ``scripts/zipapp_main.py`` (the zipapp's ``__main__``) unpacks
on first use into a per-user cache folder. Only what zstandard imports on CPython is carried:
``zstandard/__init__.py`` and the ``backend_c`` module, not the cffi backend (half the size).

The zstandard build for the running interpreter comes from the installed package; more CPython
versions for the same platform come from wheels fetched with ``pip download``
(``--python-versions 3.11,3.12,3.13``); a version pip cannot fetch is skipped with a warning.
Python 3.14+ needs none: its standard library has ``compression.zstd``.

The output is reproducible: sorted entries, fixed timestamps and modes, no bytecode caches, and a
manifest made only of content (names, sizes, SHA-256). Run it with the interpreter of an
environment where the project is installed, e.g. ``.venv/bin/python scripts/build_zipapp.py``.
Standard library only.
"""

from __future__ import annotations

import argparse
import base64
import csv
import hashlib
import importlib.machinery
import importlib.metadata
import importlib.util
import io
import json
import os
import re
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

ROOT = Path(__file__).resolve().parent.parent
BOOTSTRAP = Path(__file__).resolve().with_name("zipapp_main.py")
DATA = "_polykit_zipapp"
SHEBANG = b"#!/usr/bin/env python3\n"
EPOCH = (1980, 1, 1, 0, 0, 0)
MIB = 1024 * 1024
LEGACY_MANYLINUX = {"manylinux1": "2.5", "manylinux2010": "2.12", "manylinux2014": "2.17"}


@dataclass(frozen=True)
class App:
    """One zipapp: its file name, the function it runs, and the packages it carries."""

    filename: str
    entry: str
    local_packages: tuple[str, ...]
    installed_packages: tuple[str, ...] = ()


APPS = (
    App("polykit.pyz", "polykit_client.cli:main", ("polykit_client",)),
    App("polykit-cache.pyz", "polykit_cache.cli:main", ("polykit_cache", "polykit_client"), ("waitress",)),
)


@dataclass
class Native:
    """zstandard's files for one interpreter ABI, as the bootstrap unpacks them."""

    tag: str
    python: str
    platforms: tuple[str, ...]
    files: dict[str, bytes]
    license: bytes | None = None

    @property
    def platform(self) -> str:
        return describe_platform(self.platforms)


@dataclass
class Sources:
    """Everything the zipapps are made of, gathered once for both."""

    zstandard_version: str
    natives: list[Native] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


class BuildError(Exception):
    """The zipapps cannot be built here; the message says what is missing."""


# --- where things come from ---------------------------------------------------------------------


def package_dir(name: str) -> Path:
    """The folder of an importable package, found without importing it."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise BuildError(f"{name} is not installed for {sys.executable}; run this script with the "
                         "interpreter of an environment where polykit-cache is installed (e.g. .venv/bin/python)")
    return Path(next(iter(spec.submodule_search_locations)))


def package_files(src: Path, arcname: str) -> dict[str, bytes]:
    """The ``.py`` files of a package, by archive name: no bytecode caches, no test folders.

    Compiled modules cannot be imported from a zip, so a package that has one is refused here
    rather than failing on the build agent.
    """
    files: dict[str, bytes] = {}
    for path in sorted(src.rglob("*")):
        rel = path.relative_to(src)
        if any(part in ("__pycache__", "tests", "test") for part in rel.parts[:-1]) or not path.is_file():
            continue
        if path.suffix in (".so", ".pyd", ".dylib"):
            raise BuildError(f"{path} is a compiled module; {arcname} cannot run from a zip")
        if path.suffix == ".py":
            files[f"{arcname}/{rel.as_posix()}"] = path.read_bytes()
    if f"{arcname}/__init__.py" not in files:
        raise BuildError(f"{src} has no __init__.py")
    return files


def license_text(dist_name: str) -> bytes | None:
    """An installed distribution's licence file, which its licence asks us to ship with it."""
    try:
        dist = importlib.metadata.distribution(dist_name)
    except importlib.metadata.PackageNotFoundError:
        return None
    for item in sorted(dist.files or [], key=str):
        if re.search(r"(LICEN[CS]E|COPYING)", item.name, re.IGNORECASE) and ".dist-info" in str(item):
            return Path(dist.locate_file(item)).read_bytes()
    return None


def tag_of(module_name: str) -> str:
    """``backend_c.cpython-311-x86_64-linux-gnu.so`` -> ``cpython-311-x86_64-linux-gnu``."""
    parts = module_name.split(".")
    if len(parts) != 3:
        raise BuildError(f"unexpected extension module name {module_name}")
    return parts[1]


def python_of(tag: str) -> str:
    """``cpython-312-...`` -> ``3.12`` (``cpython-313t`` -> ``3.13t``)."""
    match = re.match(r"cpython-3(\d+)(t?)-", tag)
    return f"3.{match.group(1)}{match.group(2)}" if match else tag


def installed_native() -> Native:
    """zstandard as installed for the running interpreter: the simplest source that surely fits it."""
    pkg = package_dir("zstandard")
    dist = importlib.metadata.distribution("zstandard")
    suffix = importlib.machinery.EXTENSION_SUFFIXES[0]
    module = pkg / f"backend_c{suffix}"
    if not module.is_file():
        raise BuildError(f"{module} is missing: the installed zstandard has no C backend for this interpreter")
    wheel = dist.read_text("WHEEL") or ""
    platforms = sorted({p for line in wheel.splitlines() if line.startswith("Tag:")
                        for p in line.split("-")[-1].strip().split(".")})
    data = module.read_bytes()
    if b"libzstd.so" in data:
        print(f"warning: {module} links to the system's libzstd; the zipapp will need it on every machine",
              file=sys.stderr)
    tag = tag_of(module.name)
    return Native(tag=tag, python=python_of(tag), platforms=tuple(platforms) or (sysconfig_platform(),),
                  files={"zstandard/__init__.py": (pkg / "__init__.py").read_bytes(), f"zstandard/{module.name}": data},
                  license=license_text("zstandard"))


def sysconfig_platform() -> str:
    """The interpreter's own platform name, for a zstandard built from source (no wheel tags)."""
    import sysconfig

    return sysconfig.get_platform().replace("-", "_").replace(".", "_")


def record_hashes(wheel: zipfile.ZipFile) -> dict[str, str]:
    """The wheel's RECORD, name -> urlsafe-base64 SHA-256, to check what we take from it."""
    name = next((n for n in wheel.namelist() if n.endswith(".dist-info/RECORD")), None)
    if name is None:
        return {}
    rows = csv.reader(io.StringIO(wheel.read(name).decode()))
    return {row[0]: row[1].removeprefix("sha256=") for row in rows if len(row) >= 2 and row[1].startswith("sha256=")}


def wheel_native(path: Path) -> Native:
    """The C backend and its package ``__init__`` from a zstandard wheel, checked against RECORD."""
    platforms = tuple(sorted(path.stem.split("-")[-1].split(".")))
    with zipfile.ZipFile(path) as wheel:
        names = wheel.namelist()
        modules = [n for n in names if re.fullmatch(r"zstandard/backend_c\.[^/]+\.(so|pyd)", n)]
        if len(modules) != 1:
            raise BuildError(f"{path.name}: expected one C backend module, found {modules}")
        record = record_hashes(wheel)
        files: dict[str, bytes] = {}
        for name in ("zstandard/__init__.py", modules[0]):
            data = wheel.read(name)
            digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
            if record.get(name) not in (None, digest):
                raise BuildError(f"{path.name}: {name} does not match the wheel's RECORD")
            files[name] = data
        licences = [n for n in names if re.search(r"\.dist-info/(licenses/)?LICEN[CS]E", n)]
        licence = wheel.read(licences[0]) if licences else None
    tag = tag_of(modules[0].rsplit("/", 1)[1])
    return Native(tag=tag, python=python_of(tag), platforms=platforms, files=files, license=licence)


def download_wheel(version: str, python: str, platforms: Sequence[str], dest: Path) -> Path:
    """``pip download`` of the zstandard wheel for another CPython version, as pip is configured."""
    nodot = python.replace(".", "")
    cmd = [sys.executable, "-m", "pip", "download", f"zstandard=={version}", "--only-binary=:all:", "--no-deps",
           "--disable-pip-version-check", "--quiet", "--implementation", "cp", "--python-version", python,
           "--abi", f"cp{nodot}", "--dest", str(dest)]
    for plat in platforms:
        cmd += ["--platform", plat]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    found = sorted(dest.glob(f"zstandard-{version}-cp{nodot}-cp{nodot}-*.whl"))
    if out.returncode != 0 or not found:
        lines = [line for line in out.stderr.splitlines() if line.strip() and not line.startswith("WARNING")]
        raise BuildError(lines[-1].strip() if lines else f"pip exited {out.returncode}")
    return found[0]


def gather(python_versions: Sequence[str]) -> Sources:
    """The zstandard builds to carry: the running interpreter's, then each extra version's wheel."""
    try:
        version = importlib.metadata.version("zstandard")
    except importlib.metadata.PackageNotFoundError:
        raise BuildError(f"zstandard is not installed for {sys.executable}; run this script with the "
                         "interpreter of an environment where polykit-cache is installed (e.g. .venv/bin/python)") from None
    sources = Sources(zstandard_version=version)
    own = installed_native()
    sources.natives.append(own)
    wanted = [v for v in python_versions if v != own.python]
    if wanted:
        with tempfile.TemporaryDirectory(prefix="polykit-wheels-") as tmp:
            for python in wanted:
                try:
                    native = wheel_native(download_wheel(version, python, own.platforms, Path(tmp)))
                except (BuildError, OSError, subprocess.SubprocessError, zipfile.BadZipFile) as exc:
                    sources.warnings.append(f"no zstandard {version} wheel for CPython {python} on "
                                            f"{', '.join(own.platforms)}; skipped ({exc})")
                    continue
                if all(n.tag != native.tag for n in sources.natives):
                    sources.natives.append(native)
    sources.natives.sort(key=lambda n: n.tag)
    return sources


def describe_platform(tags: Sequence[str]) -> str:
    """Wheel platform tags as a person reads them: ``Linux x86_64, glibc 2.17+``."""
    best: dict[str, tuple[tuple[int, ...], str]] = {}
    plain = []
    for tag in tags:
        legacy = re.fullmatch(r"(manylinux1|manylinux2010|manylinux2014)_(\w+)", tag)
        modern = re.fullmatch(r"(manylinux|musllinux|macosx)_(\d+)_(\d+)_(\w+)", tag)
        if legacy:
            family, version, arch = "manylinux", LEGACY_MANYLINUX[legacy.group(1)], legacy.group(2)
        elif modern:
            family, version, arch = modern.group(1), f"{modern.group(2)}.{modern.group(3)}", modern.group(4)
        else:
            plain.append(tag)
            continue
        key = (family, arch)
        rank = tuple(int(x) for x in version.split("."))
        if key not in best or rank < best[key][0]:
            best[key] = (rank, version)
    names = {"manylinux": "Linux {arch}, glibc {v}+", "musllinux": "Linux {arch}, musl {v}+", "macosx": "macOS {v}+ {arch}"}
    described = [names[family].format(arch=arch, v=v) for (family, arch), (_, v) in sorted(best.items())]
    return " or ".join(described + sorted(plain))


# --- the archive -------------------------------------------------------------------------------


def digest(data: bytes) -> str:
    """Hex SHA-256: what the bootstrap checks every unpacked byte against."""
    return hashlib.sha256(data).hexdigest()


def manifest_for(app: App, sources: Sources) -> dict:
    """What the bootstrap reads: the entry point and, per interpreter tag, the files it unpacks.

    A build's key is the hash of its file list with their hashes, so the unpacked folder is
    shared by every zipapp that carries the same bytes and never by one that does not.
    """
    native = {}
    for n in sources.natives:
        files = {rel: {"sha256": digest(data), "size": len(data)} for rel, data in sorted(n.files.items())}
        key = digest(json.dumps(files, sort_keys=True, separators=(",", ":")).encode())
        native[n.tag] = {"python": n.python, "platform": n.platform, "platform_tags": list(n.platforms),
                         "key": key, "files": files}

    return {"format": 1, "name": app.filename.removesuffix(".pyz"), "entry": app.entry,
            "version": polykit_version(), "zstandard": sources.zstandard_version, "native": native}


def polykit_version() -> str:
    """The version string of the checkout, read from its source rather than an installed copy."""
    text = (ROOT / "polykit_client" / "__init__.py").read_text()
    match = re.search(r'^__version__\s*=\s*["\']([^"\']+)["\']', text, re.MULTILINE)
    return match.group(1) if match else "unknown"


def entries_for(app: App, sources: Sources) -> dict[str, bytes]:
    """Every file of one zipapp, by archive name."""
    bootstrap = BOOTSTRAP.read_bytes()
    compile(bootstrap, str(BOOTSTRAP), "exec")
    entries = {"__main__.py": bootstrap}
    for name in app.local_packages:
        entries.update(package_files(ROOT / name, name))
    for name in app.installed_packages:
        entries.update(package_files(package_dir(name), name))
        licence = license_text(name)
        if licence:
            entries[f"{DATA}/licenses/{name}.txt"] = licence
    if (ROOT / "LICENSE").is_file():
        entries[f"{DATA}/licenses/polykit.txt"] = (ROOT / "LICENSE").read_bytes()
    for n in sources.natives:
        for rel, data in n.files.items():
            entries[f"{DATA}/native/{n.tag}/{rel}"] = data
        if n.license is not None:
            entries[f"{DATA}/licenses/zstandard.txt"] = n.license
    manifest = manifest_for(app, sources)
    entries[f"{DATA}/manifest.json"] = (json.dumps(manifest, indent=1, sort_keys=True) + "\n").encode()
    return entries


def write_zipapp(path: Path, entries: dict[str, bytes]) -> None:
    """A zip with a shebang, entries sorted, fixed times and modes; published by an atomic rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(SHEBANG)
            with zipfile.ZipFile(fh, "w") as zf:
                for name in sorted(entries):
                    info = zipfile.ZipInfo(name, date_time=EPOCH)
                    info.create_system = 3
                    info.external_attr = 0o100644 << 16
                    info.compress_type = zipfile.ZIP_DEFLATED
                    zf.writestr(info, entries[name], compresslevel=6)
        os.chmod(tmp, 0o755)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# --- the command -------------------------------------------------------------------------------


def parse_versions(text: str) -> list[str]:
    """``3.11,3.12`` -> a list, refusing what pip could never match or polykit never runs on."""
    versions = [v.strip() for v in text.split(",") if v.strip()]
    for v in versions:
        match = re.fullmatch(r"3\.(\d+)", v)
        if not match or int(match.group(1)) < 11:
            raise argparse.ArgumentTypeError(f"{v!r} is not a CPython version 3.11 or newer (like 3.12)")
    return versions


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="build_zipapp.py",
        description="Build dist/polykit.pyz and dist/polykit-cache.pyz, runnable with only a CPython 3.11+ interpreter.",
    )
    parser.add_argument("--out-dir", type=Path, default=ROOT / "dist", metavar="DIR",
                        help="where to write the zipapps (default: dist/ of the checkout)")
    parser.add_argument("--python-versions", type=parse_versions, default=[], metavar="3.X,...",
                        help="also carry zstandard for these CPython versions (wheels fetched with pip download); "
                             "the running interpreter's is always carried")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Build both zipapps; print their sizes and what they serve."""
    args = build_parser().parse_args(argv)
    try:
        sources = gather(args.python_versions)
        for warning in sources.warnings:
            print(f"warning: {warning}", file=sys.stderr)
        for app in APPS:
            path = args.out_dir / app.filename
            write_zipapp(path, entries_for(app, sources))
            print(f"{path}  {path.stat().st_size / MIB:.2f} MiB")
    except BuildError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    carried = "; ".join(f"CPython {n.python} on {n.platform}" for n in sources.natives) or "none"
    print(f"zstd: compression.zstd on Python 3.14+; zstandard {sources.zstandard_version} for {carried}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
