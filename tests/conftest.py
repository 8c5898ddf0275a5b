import os
import subprocess

import pytest

from support import new_app


@pytest.fixture
def app(tmp_path):
    """The WSGI application over a fresh storage folder."""
    return new_app(tmp_path / "store")


@pytest.fixture
def small_tmpfs(tmp_path):
    """A 1 MiB tmpfs (root only; skipped where mounting is not permitted); always unmounted."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    mount = tmp_path / "small"
    mount.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)],
                            capture_output=True, text=True, timeout=30)
    if result.returncode:
        pytest.skip(f"tmpfs mount not permitted here: {result.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True, timeout=30)
