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
