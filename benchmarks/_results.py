"""The one way a benchmark writes benchmarks/results/<name>.json: the payload plus the command
that produced it and the machine it ran on, so every README figure can name both
(benchmarks/readme_figures.py reads them; tests/test_readme.py fails on a result without them).

Nothing here imports torch or onnxruntime: versions come from the installed distributions.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
# Distributions whose versions decide the figures; the first installed name of each group is recorded.
VERSIONED = {"torch": ("torch",), "onnxruntime": ("onnxruntime", "onnxruntime-gpu")}


# Environment variables that change what a benchmark measures (its data, its caches).
ENV_INPUTS = ("CNNX_CIFAR_DIR", "CNNX_BENCH_CACHE", "CNNX_CACHE")


def command_line(argv: list[str] | None = None) -> str:
    """How this process was started, as a shell line a reader can paste from the project root
    (with the ENV_INPUTS that were set)."""
    argv = list(sys.argv if argv is None else argv)
    script = Path(argv[0]).resolve()
    if script.is_relative_to(ROOT):
        argv[0] = str(script.relative_to(ROOT))
    env = [f"{k}={shlex.quote(os.environ[k])}" for k in ENV_INPUTS if os.environ.get(k)]
    return " ".join([*env, "python", shlex.join(argv)])


def processor_model() -> str | None:
    """The CPU's model name from /proc/cpuinfo (platform.processor() is only "x86_64" on Linux)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name":
                    return value.strip()
    except OSError:
        pass
    return None


def _version(names: tuple[str, ...]) -> str | None:
    """The version of the module this process imported under names[0], when it did (a wheel
    installed with --target on the GPU machine shadows another copy there), else of the first
    of `names` installed."""
    module = sys.modules.get(names[0].replace("-", "_"))
    if getattr(module, "__version__", None):
        return module.__version__.split("+")[0]
    for name in names:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return None


def _git(*args, tree: Path = ROOT) -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(tree), *args], capture_output=True, text=True, timeout=10)
    except OSError:
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def git_commit(tree: Path = ROOT) -> str | None:
    """The commit checked out in `tree` (this repository, or a worktree of it)."""
    return _git("rev-parse", "HEAD", tree=tree) or None


# --- versions compared in interleaved rounds (--tree DIR, repeatable) -----------------------------

def compile_bytecode(*trees: Path) -> str:
    """Write the .pyc files of each tree's cnnx package (default: this checkout's), as `pip
    install` leaves an installed package. Where PYTHONDONTWRITEBYTECODE is set (this machine's
    environment sets it) every cnnx process would otherwise compile its modules from source at
    start, a cost no installed cnnx pays. Returns what the results record."""
    import compileall

    for tree in trees or (ROOT,):
        compileall.compile_dir(str(Path(tree) / "cnnx"), quiet=2)
    return "cnnx's .pyc files written first (compileall), as pip install leaves an installed package"


def tree_env(tree: Path) -> dict:
    """os.environ with `tree` (a checkout of this repository) first on PYTHONPATH: a `python`
    started with it imports that version's cnnx."""
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(tree).resolve()), os.environ.get("PYTHONPATH", "")])}


def tree_arguments(description: str, rounds: int, out_name: str):
    """The command line of a script that measures versions side by side on the CIFAR JPEGs:
    --tree (repeatable), --rounds, --cifar, --out (default results/<out_name>)."""
    import argparse

    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--tree", type=Path, action="append", required=True, help="a checkout of cnnx (repeatable)")
    ap.add_argument("--rounds", type=int, default=rounds)
    ap.add_argument("--cifar", type=Path, help="CIFAR-10 JPEG folder (default $CNNX_CIFAR_DIR or /tmp/cifar10/train)")
    ap.add_argument("--out", type=Path, default=RESULTS / out_name)
    return ap


def best_and_median(rows: list, keys) -> dict:
    """{"best": the least of each key over the rounds, "median": its median}, 4 decimals."""
    return {"best": {k: round(min(row[k] for row in rows), 4) for k in keys},
            "median": {k: round(statistics.median(row[k] for row in rows), 4) for k in keys}}


def _git_dirty() -> bool | None:
    """Whether tracked files differ from that commit: the figures then come from other code (the
    GPU machine gets a copy of the working tree whose git metadata may be older than its files).
    The results folder is no code: a batch of benchmarks writes its JSONs one after another."""
    status = _git("status", "--porcelain", "--untracked-files=no", "--", ".", ":(exclude)benchmarks/results")
    return None if status is None else bool(status)


def machine() -> dict:
    """Where the figures were measured: what readme_figures.py prints beside each of them."""
    from cnnx.runtime.contract import cuda_driver_present

    return {
        "processor": processor_model(),
        "platform": platform.platform(),
        "cores": len(os.sched_getaffinity(0)),
        "python": platform.python_version(),
        **{key: _version(names) for key, names in VERSIONED.items()},
        "nvidia_driver": cuda_driver_present(),
    }


def provenance(argv: list[str] | None = None) -> dict:
    """The fields every results JSON carries: command, machine, when and at which commit."""
    return {
        "command": command_line(argv),
        "machine": machine(),
        "recorded_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "git_commit": git_commit(),
        "git_dirty": _git_dirty(),
        # The commit whose files ran, as the caller states it where the .git copy is older than
        # the files (the GPU machine: benchmarks/gpu_run.sh).
        **({"tree_commit": os.environ["CNNX_TREE_COMMIT"]} if os.environ.get("CNNX_TREE_COMMIT") else {}),
    }


def write_result(path: Path, payload: dict, argv: list[str] | None = None) -> Path:
    """Write provenance() + payload to `path` through cnnx's atomic writer; say where on stderr."""
    from cnnx.runtime.files import atomic_write

    path = Path(path)
    doc = {**provenance(argv), **payload}
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, json.dumps(doc, indent=2) + "\n")
    print(f"wrote {path}", file=sys.stderr, flush=True)
    return path
