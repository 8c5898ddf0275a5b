"""What the real-client tests share: finding each tool where CI installs it, and the servers they meet.

``.ci/run`` installs npm tools into ``.ci/tools/node_modules`` and Python ones into
``.ci/tools/py``; a test whose tool is missing is skipped, with the reason.
"""

from __future__ import annotations

import shutil
from contextlib import contextmanager
from pathlib import Path

from support import ROOT, thread_server

TOOLS = ROOT / ".ci" / "tools"
READ_WRITE, READ_ONLY, WRONG = "rw-token-0123456789", "ro-token-0123456789", "no-such-token-0123"


def find_tool(name: str) -> str | None:
    """The tool CI installed for this checkout, else one on PATH."""
    for local in (TOOLS / "node_modules" / ".bin" / name, TOOLS / "py" / "bin" / name):
        if local.exists():
            return str(local)
    return shutil.which(name)


@contextmanager
def secured_server(tmp_path: Path):
    """A real server with a read-write and a read token, letting anyone read."""
    tokens = tmp_path / "tokens"
    tokens.write_text(f"read-write {READ_WRITE}\nread {READ_ONLY}\n")
    with thread_server(tmp_path / "secured-store", token_file=tokens, allow_anonymous_read=True) as (port, app):
        yield port, app


def uploads(app) -> int:
    return app.metrics.stats()["uploads"]


def fresh_copy(source: Path, dest: Path) -> Path:
    """A clean checkout of a test project (no build outputs, no local cache)."""
    shutil.copytree(source, dest, symlinks=True)
    return dest
