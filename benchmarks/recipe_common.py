"""Shared pieces of the recipe benchmarks (recipe_seed_cnn.py, recipe_airnet.py).

`cnnx_train` runs the real `cnnx train` and reads its metrics.csv: the reported figures come
from it, on the stratified 10% hold-out of cnnx.train.data (split seed 0); recipes are selected
on it only. (The recipes were explored with a copy of cnnx.train.loop's data path; that copy
was removed once `cnnx train` could run them itself.)

Timing: training seconds count optimizer steps and batch augmentation only; decoding, the
cache build and hold-out evaluation are excluded and reported separately, as in metrics.csv.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

CIFAR_DIR = Path(os.environ.get("CNNX_CIFAR_DIR", "/tmp/cifar10/train"))


def images_per_second(run) -> float:
    """Training images per second of a `cnnx_train` run (whole batches only, as the loop drops the rest)."""
    c = run["config"]
    steps = c["train_images"] // c["batch_size"]
    return round(steps * c["batch_size"] * len(run["history"]) / run["history"][-1]["train_seconds"], 1)


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def cnnx_train(name: str, args: list[str], *, out: Path = Path("/tmp/cnnx-recipe-runs"),
               cache_dir: Path = Path("/tmp/cnnx-recipe-cnnx-cache")) -> dict:
    """Run the real `cnnx train --data CIFAR_DIR <args>` into out/name (replaced if present) and
    return its per-epoch metrics.csv rows plus the command line. Its `seconds` column is
    training steps only; evaluation is `eval_seconds` and decoding happens before epoch 1."""
    import csv
    import shutil
    import subprocess

    run_dir = out / name
    if run_dir.exists():
        shutil.rmtree(run_dir)
    cmd = ["cnnx", "train", "--data", str(CIFAR_DIR), "--cache-dir", str(cache_dir), "--out", str(out),
           "--name", name, "--quiet", *args]
    log("$ " + " ".join(cmd))
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "cnnx", *cmd[1:]], check=True, stdout=sys.stderr)
    wall = time.perf_counter() - t0
    with open(run_dir / "metrics.csv", newline="") as f:
        rows = [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f)]
    history = [{"epoch": int(r["epoch"]), "train_seconds": round(r["train_seconds_total"], 2),
                "eval_seconds": round(r["eval_seconds"], 2), "val_top1": r["val_top1"], "val_loss": round(r["val_loss"], 4),
                "train_top1": r["train_top1"], "lr": r["lr"]} for r in rows]
    config = json.loads((run_dir / "config.json").read_text())
    return {"command": " ".join(cmd), "history": history, "config": config, "wall_seconds": round(wall, 1)}
