"""`cnnx classify` on small folders: whole-process wall seconds by file count and --decode mode,
in the same interleaved rounds. What decides PROCESS_DECODE_MIN_FILES (cnnx.runtime.workers):
up to how many files threads finish before decode processes would (their start costs the
server's imports and the model opened in each worker), and what --decode auto gives.

    flock /tmp/cnnx-cpu.lock python benchmarks/small_jobs.py --rounds 7

Folders of the first N CIFAR JPEGs (hard links, else copies; made once under the benchmark
cache) for each --files count; each run is a fresh `python -m cnnx classify FOLDER --model
<seed-cnn export> -o OUT --device cpu --topk 1 --decode MODE` (as classify_startup.py runs it:
its wall time to its own end, the decode server not waited for). Median and best of --rounds
per (files, mode), the ratio of each mode to threads (median of the rounds' own ratios), and
the smallest count where processes beat threads in the median. Writes
benchmarks/results/small_jobs.json.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from _results import RESULTS, write_result  # noqa: E402
from bench_classify import CACHE, build_model, log  # noqa: E402
from classify_startup import classify  # noqa: E402

MODES = ("threads", "processes", "auto")
FILES = (1, 64, 256, 1024, 4096, 8192, 16384)


def small_folder(cifar: Path, n: int) -> Path:
    """CACHE/small-jobs/n<N>: the first n JPEGs of the CIFAR folder (sorted), flat."""
    folder = CACHE / "small-jobs" / f"n{n}"
    if folder.is_dir() and sum(1 for _ in folder.iterdir()) == n:
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    work = folder.with_name(folder.name + ".partial")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    for i, src in enumerate(sorted(cifar.rglob("*.jpg"))[:n]):
        dst = work / f"{i:05d}-{src.name}"
        try:
            os.link(src, dst)
        except OSError:
            shutil.copyfile(src, dst)
    work.rename(folder)
    return folder


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--files", type=int, action="append", help=f"file counts (repeatable; default {FILES})")
    ap.add_argument("--cifar", type=Path, default=Path(os.environ.get("CNNX_CIFAR_DIR", "/tmp/cifar10/train")))
    ap.add_argument("--out", type=Path, default=RESULTS / "small_jobs.json")
    a = ap.parse_args(argv)
    if not a.cifar.is_dir():
        raise SystemExit(f"no CIFAR folder at {a.cifar}: make one with `python benchmarks/cifar_jpegs.py {a.cifar}`")
    counts = sorted(a.files or FILES)
    model = build_model()
    folders = {n: small_folder(a.cifar, n) for n in counts}
    root = HERE.parent
    walls = {(n, m): [] for n in counts for m in MODES}
    for r in range(a.rounds):
        for n in counts:
            order = MODES if r % 2 == 0 else MODES[::-1]
            for mode in order:
                walls[(n, mode)].append(classify(root, model, folders[n], ["--decode", mode])["wall_s"])
            log(f"round {r + 1}/{a.rounds}, {n} files: " + ", ".join(f"{m} {walls[(n, m)][-1]:.3f} s" for m in MODES))
    rows = []
    for n in counts:
        row = {"files": n}
        for mode in MODES:
            row[f"{mode}_median_s"] = round(statistics.median(walls[(n, mode)]), 3)
            row[f"{mode}_best_s"] = round(min(walls[(n, mode)]), 3)
        for mode in ("processes", "auto"):
            row[f"{mode}_vs_threads"] = round(statistics.median(
                p / t for p, t in zip(walls[(n, mode)], walls[(n, "threads")])), 3)
        row["rounds"] = {m: [round(w, 3) for w in walls[(n, m)]] for m in MODES}
        rows.append(row)
    crossover = next((row["files"] for row in rows if row["processes_vs_threads"] < 1), None)
    write_result(a.out, {"model": str(model), "cifar": str(a.cifar), "rounds": a.rounds, "by_files": rows,
                         "processes_first_faster_at_files": crossover},
                 None if argv is None else [__file__, *argv])
    return 0


if __name__ == "__main__":
    sys.exit(main())
