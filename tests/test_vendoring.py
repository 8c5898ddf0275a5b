"""polykit_client vendored: its folder copied into another repository's tree runs with the standard
library and zstandard alone. No import of the tests or of the server, and no data files: a file
found beside the code would be lost by the zipapp build (it packs ``.py`` files only) and is one
more thing a vendoring user must remember to copy.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from sample import Polykit, make_tools, make_workspace

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "polykit_client"
ALLOWED_THIRD_PARTY = {"zstandard", "compression"}
FORBIDDEN_MODULES = {"polykit_cache", "tests", "sample", "support", "conftest", "waitress", "pytest"}

# What a vendoring repository's own script does: put its third-party folder on the path, then run
# the package as ``python -m polykit_client`` would. It reports what it imported.
DRIVER = """\
import json, runpy, sys
vendor, zstd_dir, report = sys.argv[1:4]
sys.path[:0] = [vendor] + ([zstd_dir] if zstd_dir else [])
sys.argv = ["polykit", *sys.argv[4:]]
try:
    runpy.run_module("polykit_client", run_name="__main__", alter_sys=True)
finally:
    import polykit_client
    with open(report, "w") as fh:
        json.dump({"file": polykit_client.__file__, "modules": sorted({m.split(".")[0] for m in sys.modules})}, fh)
"""


def vendor_copy(tmp: Path) -> Path:
    """The package copied into another repository's ``third_party/`` folder; returns that folder."""
    third_party = tmp / "other-repo" / "third_party"
    shutil.copytree(PACKAGE, third_party / "polykit_client", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return third_party


def zstandard_only(tmp: Path) -> str:
    """A folder on which zstandard, and nothing else of this environment, can be imported ("" if not installed)."""
    spec = importlib.util.find_spec("zstandard")
    if spec is None or not spec.submodule_search_locations:
        return ""
    folder = tmp / "zstd-only"
    folder.mkdir()
    (folder / "zstandard").symlink_to(Path(next(iter(spec.submodule_search_locations))), target_is_directory=True)
    return str(folder)


class VendoredPolykit(Polykit):
    """The sample-workspace runner, on the vendored copy under ``python -I -S`` (no site-packages)."""

    def __init__(self, vendor: Path, zstd_dir: str, report: Path, workspace: Path, tools: Path, marker: Path) -> None:
        super().__init__(workspace, tools, marker)
        self.argv = [sys.executable, "-I", "-S", "-c", DRIVER, str(vendor), zstd_dir, str(report)]
        self.report = report

    def run(self, *args: str, check: bool = True, cwd: Path | None = None, **env: str) -> subprocess.CompletedProcess:
        out = subprocess.run([*self.argv, *args], cwd=cwd or self.workspace, env={**self.env, **env},
                             capture_output=True, text=True, timeout=120)
        if check and out.returncode != 0:
            raise AssertionError(f"vendored polykit {' '.join(args)} exited {out.returncode}\n{out.stdout}\n{out.stderr}")
        return out

    def imported(self) -> dict:
        return json.loads(self.report.read_text())


def test_the_package_imports_only_the_standard_library_and_zstd():
    stdlib = set(sys.stdlib_module_names)
    for path in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module or ""]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                assert top in stdlib or top in ALLOWED_THIRD_PARTY or top == "polykit_client", f"{path.name} imports {name}"


def test_the_package_has_no_data_files_and_never_locates_itself():
    extra = [p for p in PACKAGE.rglob("*") if p.is_file() and "__pycache__" not in p.parts
             and p.suffix != ".py" and p.name != "py.typed"]
    assert extra == [], "data files beside the code are not carried by a vendored copy's users or the zipapp"
    for path in PACKAGE.rglob("*.py"):
        text = path.read_text()
        assert "__file__" not in text and "importlib.resources" not in text, f"{path.name} locates files by its own path"


def test_a_vendored_copy_runs_a_build(tmp_path):
    vendor = vendor_copy(tmp_path)
    zstd_dir = zstandard_only(tmp_path)
    workspace = make_workspace(tmp_path / "workspace")
    pk = VendoredPolykit(vendor, zstd_dir, tmp_path / "report.json", workspace, make_tools(tmp_path / "tools"),
                         tmp_path / "marker")

    out = pk.run("--version")
    assert out.stdout.startswith("polykit ")
    out = pk.run("build")
    assert "0 local hits, 0 remote hits, 3 misses, 0 failed" in out.stdout, out.stdout
    assert pk.ran() == ["api-server:build", "shared-utils:build", "web:build"]
    imported = pk.imported()
    assert Path(imported["file"]).is_relative_to(vendor), imported["file"]
    assert not FORBIDDEN_MODULES & set(imported["modules"]), imported["modules"]
    assert {"zstandard", "compression"} & set(imported["modules"]), "the build packed artifacts without zstd?"

    out = pk.run("build")
    assert "3 local hits, 0 remote hits, 0 misses" in out.stdout, out.stdout
    assert pk.ran() == []
    assert (workspace / "packages" / "web" / "dist" / "app.js").is_file()


def test_a_vendored_copy_runs_with_python_m_and_pythonpath(tmp_path):
    """The plain way a vendoring repository calls it: ``PYTHONPATH=third_party python -m polykit_client``."""
    vendor = vendor_copy(tmp_path)
    zstd_dir = zstandard_only(tmp_path)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "POLYKIT_"))}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(vendor), zstd_dir) if p)
    out = subprocess.run([sys.executable, "-S", "-s", "-m", "polykit_client", "--version"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("polykit ")
    probe = subprocess.run([sys.executable, "-S", "-s", "-c", "import polykit_client.cli, sys; print(polykit_client.__file__);"
                            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('polykit_cache', 'waitress')))"],
                           cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert probe.returncode == 0, probe.stderr
    file, loaded = probe.stdout.splitlines()
    assert Path(file).is_relative_to(vendor) and loaded == "[]"
