"""Helpers for the train tests: run `cnnx` in-process with separate stdout/stderr, and make
small image folders (corrupt files, single class, ...) from the real CIFAR-10 JPEGs."""

from __future__ import annotations

import shutil
from pathlib import Path

from click.testing import CliRunner

from cnnx.cli import cli


def run_cli(args, env=None):
    """Invoke `cnnx ARGS` in this process; result has exit_code, stdout, stderr."""
    return CliRunner().invoke(cli, [str(a) for a in args], env=env, catch_exceptions=False)


def copy_classes(src: Path, dest: Path, classes, n: int) -> Path:
    """dest/<class>/ with the first n real JPEGs of each class of src."""
    for c in classes:
        (dest / c).mkdir(parents=True, exist_ok=True)
        for f in sorted((src / c).iterdir())[:n]:
            shutil.copyfile(f, dest / c / f.name)
    return dest


def seed_args(data, out, name, cache, *extra):
    """Common, fast `cnnx train` arguments: seed-cnn, tiny batches, no progress bars."""
    return ["train", "--data", data, "--arch", "seed-cnn", "--out", out, "--name", name, "--cache-dir", cache,
            "--quiet", "--workers", "1", *extra]


def remove_deep_tree(top: Path) -> None:
    """Remove a folder tree of any depth without recursion (shutil.rmtree, and so pytest's
    cleanup of old temp folders, raises RecursionError past ~1,000 levels): walk down by
    relative names from an open folder, delete on the way back up."""
    import os

    fds = [os.open(top, os.O_RDONLY | os.O_DIRECTORY)]
    names = []
    try:
        while fds:
            fd = fds[-1]
            sub = None
            for entry in os.scandir(fd):
                if entry.is_dir(follow_symlinks=False):
                    sub = entry.name
                else:
                    os.unlink(entry.name, dir_fd=fd)
            if sub is not None:
                fds.append(os.open(sub, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd))
                names.append(sub)
                continue
            os.close(fds.pop())
            if names:
                os.rmdir(names.pop(), dir_fd=fds[-1])
    finally:
        for fd in fds:
            os.close(fd)
    os.rmdir(top)
