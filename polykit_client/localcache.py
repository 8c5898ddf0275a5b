"""The local cache: artifacts by key in a folder of the workspace, trimmed oldest-first to a size.

Same artifact format as the server, so what was downloaded once is reused offline, and a
local artifact can be uploaded as it is.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import BinaryIO


class LocalCache:
    """``<dir>/<k[0:2]>/<key>.zst``; writes go through a temporary file and an atomic rename."""

    def __init__(self, folder: Path, max_size: int) -> None:
        self.dir = folder
        self.max_size = max_size
        self.tmp = folder / "tmp"

    def path(self, key: str) -> Path:
        return self.dir / key[:2] / f"{key}.zst"

    def get(self, key: str) -> Path | None:
        """The artifact's path when present; its mtime is refreshed, which is what trimming orders by."""
        path = self.path(key)
        try:
            os.utime(path)
        except OSError:
            return None
        return path

    def has(self, key: str) -> bool:
        """Whether the artifact is present (without counting as a use)."""
        return os.path.exists(self.path(key))

    # Folders are made when a file cannot be made without them, not asked for before every file:
    # a fresh clone's hundreds of downloads would each pay a failing mkdir and its exception.

    def new_temp(self) -> tuple[BinaryIO, Path]:
        import tempfile  # a build of hits in place never makes one

        try:
            fd, name = tempfile.mkstemp(dir=self.tmp, suffix=".part")
        except FileNotFoundError:
            self.tmp.mkdir(parents=True, exist_ok=True)
            fd, name = tempfile.mkstemp(dir=self.tmp, suffix=".part")
        return os.fdopen(fd, "w+b"), Path(name)

    def put(self, key: str, temp: Path) -> Path:
        """Move a complete, verified temporary file into place (replacing is harmless: same key, same content)."""
        final = self.path(key)
        try:
            os.replace(temp, final)
        except FileNotFoundError:
            if not os.path.exists(temp):
                raise
            final.parent.mkdir(parents=True, exist_ok=True)
            os.replace(temp, final)
        return final

    def discard(self, key: str) -> None:
        self.path(key).unlink(missing_ok=True)

    def trim(self) -> int:
        """Delete the least recently used artifacts until the folder is under its bound; returns bytes freed."""
        if not self.dir.is_dir():
            return 0
        entries = []
        total = 0
        for path in self.dir.glob("*/*.zst"):
            try:
                st = path.stat()
            except OSError:
                continue
            entries.append((st.st_mtime_ns, st.st_size, path))
            total += st.st_size
        freed = 0
        for _, size, path in sorted(entries):
            if total - freed <= self.max_size:
                break
            path.unlink(missing_ok=True)
            freed += size
        return freed
