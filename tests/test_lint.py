"""Static checks that catch what tests can miss: undefined names, lost imports, unused code paths."""

import subprocess
import sys

from support import ROOT


def test_pyflakes_finds_nothing():
    out = subprocess.run([sys.executable, "-m", "pyflakes", "polykit_cache", "polykit_client", "tests"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
