"""A small polyglot sample workspace whose commands are plain shell, and a way to run polykit on it.

Every command appends ``package:task`` to the file named by ``POLYKIT_TEST_MARKER`` (a variable
that is not on the allow-list, so it does not enter any key): the marker proves what ran.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT_TOML = """\
[workspace]
packages_dir = "packages"
default_parallel = 4

[remote_cache]
env_vars = ["NODE_ENV"]
"""

PACKAGES = {
    "shared-utils": """\
name = "shared-utils"
language = "python"

[tasks]
build = { command = "mkdir -p dist && cat src/*.py > dist/utils.txt && echo built shared-utils && echo shared-utils:build >> \\"$POLYKIT_TEST_MARKER\\"", outputs = ["dist/**"] }
test = { command = "echo testing shared-utils && echo shared-utils:test >> \\"$POLYKIT_TEST_MARKER\\"", depends_on = ["build"] }
""",
    "api-server": """\
name = "api-server"
language = "rust"

[deps]
internal = ["shared-utils"]

[tasks]
build = { command = "mkdir -p target/release && cat ../shared-utils/dist/utils.txt src/main.rs > target/release/api && chmod +x target/release/api && echo built api-server && echo api-server:build >> \\"$POLYKIT_TEST_MARKER\\"", outputs = ["target/release/**"] }
test = "echo testing api-server && echo api-server:test >> \\"$POLYKIT_TEST_MARKER\\""
"test.depends_on" = ["build"]
""",
    "web": """\
name = "web"
language = "ts"

[deps]
internal = ["shared-utils"]

[tasks]
build = { command = "mkdir -p dist/assets/empty && cat ../shared-utils/dist/utils.txt src/app.ts > dist/app.js && printf '%s' \\"$NODE_ENV\\" > dist/env.txt && ln -sf app.js dist/latest.js && echo built web && echo web:build >> \\"$POLYKIT_TEST_MARKER\\"", outputs = ["dist"], env = ["WEB_FLAVOUR"] }
lint = "echo linting web && echo web:lint >> \\"$POLYKIT_TEST_MARKER\\""
"lint.depends_on" = ["build"]
""",
}

SOURCES = {
    "shared-utils/src/utils.py": "def helper():\n    return 42\n",
    "api-server/src/main.rs": "fn main() { println!(\"api\"); }\n",
    "web/src/app.ts": "console.log('web');\n",
    "web/package.json": '{"name": "web"}\n',
}

FAKE_TOOLS = {"node": "v20.11.0", "rustc": "rustc 1.80.0 (fake)", "go": "go version go1.22 fake"}


def make_workspace(root: Path) -> Path:
    """Write the sample workspace under ``root``; returns ``root``."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "polykit.toml").write_text(ROOT_TOML)
    for name, toml in PACKAGES.items():
        (root / "packages" / name).mkdir(parents=True, exist_ok=True)
        (root / "packages" / name / "polykit.toml").write_text(toml)
    for rel, text in SOURCES.items():
        path = root / "packages" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


def make_tools(folder: Path, versions: dict[str, str] | None = None) -> Path:
    """Fake toolchain commands that print a version, so tests control the toolchain marker."""
    folder.mkdir(parents=True, exist_ok=True)
    for tool, version in {**FAKE_TOOLS, **(versions or {})}.items():
        path = folder / tool
        path.write_text(f"#!/bin/sh\necho '{version}'\n")
        path.chmod(0o755)
    return folder


class Polykit:
    """Runs ``python -m polykit_client`` in a workspace with a controlled environment."""

    def __init__(self, workspace: Path, tools: Path, marker: Path, **env: str) -> None:
        self.workspace = workspace
        self.marker = marker
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("POLYKIT_")}
        self.env.update(PATH=f"{tools}{os.pathsep}{os.environ.get('PATH', '')}", POLYKIT_TEST_MARKER=str(marker))
        self.env.pop("NODE_ENV", None)
        self.env.pop("WEB_FLAVOUR", None)
        self.env.update(env)

    def run(self, *args: str, check: bool = True, cwd: Path | None = None, **env: str) -> subprocess.CompletedProcess:
        merged = {**self.env, **env}
        out = subprocess.run([sys.executable, "-m", "polykit_client", *args], cwd=cwd or self.workspace,
                             env=merged, capture_output=True, text=True, timeout=120)
        if check and out.returncode != 0:
            raise AssertionError(f"polykit {' '.join(args)} exited {out.returncode}\n{out.stdout}\n{out.stderr}")
        return out

    def keys(self, *args: str, **env: str) -> dict[str, str]:
        out = self.run("build", "--dry-run", "--json", *args, **env)
        return {t["task"]: t["key"] for t in json.loads(out.stdout)["tasks"]}

    def ran(self) -> list[str]:
        """Tasks whose commands ran since the last call (and forget them)."""
        if not self.marker.exists():
            return []
        lines = self.marker.read_text().split()
        self.marker.unlink()
        return sorted(lines)


def copy_workspace(src: Path, dst: Path) -> Path:
    """A second checkout: the sources only, no outputs and no local cache."""
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(".polykit", "dist", "target"))
    return dst
