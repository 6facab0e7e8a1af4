"""Filesystem helpers for the tests: a real small tmpfs for full-disk cases."""

from __future__ import annotations

import contextlib
import subprocess
from pathlib import Path

import pytest


@contextlib.contextmanager
def mounted_tmpfs(path: Path, size: str):
    """A real tmpfs of `size` (mount's syntax: 16k, 24m) at `path`, for full-disk tests; the
    test is skipped with the reason where mounting is not allowed (not root, no privilege)."""
    path.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True,
                       text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({(r.stderr.strip() or str(r.returncode))[:100]})")
    try:
        yield path
    finally:
        if subprocess.run(["umount", str(path)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(path)], capture_output=True)
