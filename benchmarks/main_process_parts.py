"""The parts of `cnnx classify`'s own per-file work (its one main process, which bounds the
steady state on a GPU machine) timed on their own, for two versions of cnnx in the same
interleaved rounds: writing CSV rows, discovering the files, and waiting on the decode processes.

    python benchmarks/main_process_parts.py --tree /tmp/base --tree . --rounds 5

A tree is a checkout of this repository (git worktree add /tmp/base <commit>); each part runs
in a fresh `python` with that tree first on its path:
  writer_topk1_s / writer_topk5_s  PredictionWriter.write_batch on 50,000 rows in batches of 256
                                   (10 class names, CIFAR-like paths), to a file
  discovery_s                      every Found of --folder, as classify takes them (Discovery.runs
                                   where the tree has it, else iterating Discovery)
  loop_us_per_file                 the GPU path's main-process CPU (getrusage of the process, its
                                   threads included, children not) per file for a whole classify
                                   of --folder to CSV: Classifier(io_binding=True, decode processes)
                                   with a tiny model on the CPU provider, so the model's compute is
                                   ~nothing and what is left is cnnx's own work a file
  loop_main_thread_us_per_file     the same run's CPU of the caller's one thread alone (thread_time):
                                   on a GPU machine its work a file bounds the steady state
  wait_us (tree-independent)       one message through one of 16 pipes and the wait for it:
                                   multiprocessing.connection.wait over the 16 pipes and 16
                                   sentinels at each call vs a selector registered once
Best and median of --rounds. Writes benchmarks/results/main_process_parts.json.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from _results import RESULTS, best_and_median, git_commit, tree_env, write_result  # noqa: E402
from bench_classify import log  # noqa: E402

PARTS = r"""
import json, os, sys, tempfile, time
import numpy as np
from cnnx.runtime.discover import Discovery
from cnnx.runtime.output import PredictionWriter

folder = sys.argv[1]
names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
paths = [f"{folder}/{names[i % 10]}/{i:05d}.jpg" for i in range(50_000)]
rng = np.random.default_rng(0)
out = {}
for k in (1, 5):
    idx = np.argsort(-rng.random((50_000, 10)), 1)[:, :k]
    scores = np.sort(rng.random((50_000, k)).astype(np.float32), 1)[:, ::-1]
    target = os.path.join(tempfile.mkdtemp(), "p.csv")
    writer = PredictionWriter(target, "csv", names, k)
    t0 = time.perf_counter()
    for i in range(0, 50_000, 256):
        writer.write_batch(paths[i:i + 256], idx[i:i + 256], scores[i:i + 256])
    writer.close()
    out[f"writer_topk{k}_s"] = time.perf_counter() - t0
    os.unlink(target)
d = Discovery([folder])
t0 = time.perf_counter()
n = sum(map(len, d.runs())) if hasattr(d, "runs") else sum(1 for _ in d)
out["discovery_s"] = time.perf_counter() - t0
out["files"] = n
print(json.dumps(out))
"""

LOOP = r"""
import json, os, resource, sys, tempfile, time
sys.path.insert(0, sys.argv[3])  # tests/, for tiny_onnx_model
from _runtime_util import tiny_onnx_model
from pathlib import Path
from cnnx.runtime import command
from cnnx.runtime.api import Classifier

folder, workers = sys.argv[1], int(sys.argv[2])
work = Path(tempfile.mkdtemp())
model = tiny_onnx_model(work / "tiny.onnx")
with Classifier(model, "cpu", io_binding=True, decode="processes", workers=workers, threads=1, topk=1) as clf:
    for _ in range(2):  # the first starts the decode processes
        out = work / "p.csv"
        for f in (out, work / "p.errors.csv"):
            f.unlink(missing_ok=True)
        r0, t0, m0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter(), time.thread_time()
        rows = clf.classify([folder])
        tally = command._write_rows(rows, str(out), "csv", str(work / "p.errors.csv"), clf, append=False, t0=t0)
        main = time.thread_time() - m0
        wall, r1 = time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_SELF)
cpu = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
print(json.dumps({"loop_us_per_file": 1e6 * cpu / rows.found, "loop_main_thread_us_per_file": 1e6 * main / rows.found,
                  "loop_wall_s": wall, "loop_files": rows.found}))
"""

WAIT = r"""
import json, os, selectors, time
import multiprocessing as mp
from multiprocessing.connection import wait

pairs = [mp.Pipe() for _ in range(16)]
ours, theirs = [a for a, _ in pairs], [b for _, b in pairs]
sentinels = [os.pipe()[0] for _ in range(16)]  # stand-ins for the 16 workers' sentinels
n = 3000
t0 = time.perf_counter()
for i in range(n):
    theirs[i % 16].send(i)
    for conn in wait(ours + sentinels):
        while conn in ours and conn.poll():
            conn.recv()
each_call = time.perf_counter() - t0
selector = selectors.DefaultSelector()
for i, conn in enumerate(ours):
    selector.register(conn, selectors.EVENT_READ, i)
for fd in sentinels:
    selector.register(fd, selectors.EVENT_READ, None)
t0 = time.perf_counter()
for i in range(n):
    theirs[i % 16].send(i)
    for key, _ in selector.select():
        conn = ours[key.data]
        while conn.poll():
            conn.recv()
registered_once = time.perf_counter() - t0
print(json.dumps({"connection_wait_us": 1e6 * each_call / n, "selector_once_us": 1e6 * registered_once / n}))
"""


def _run(code: str, tree: Path | None, *args) -> dict:
    import json

    r = subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True,
                       env=dict(os.environ) if tree is None else tree_env(tree), check=True, cwd=tree or HERE)
    return json.loads(r.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tree", type=Path, action="append", required=True, help="a checkout of cnnx (repeatable)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--folder", type=Path, default=Path(os.environ.get("CNNX_CIFAR_DIR", "/tmp/cifar10/train")),
                    help="an image folder to discover (default $CNNX_CIFAR_DIR or /tmp/cifar10/train)")
    ap.add_argument("--loop-workers", type=int, default=1, help="decode processes for loop_us_per_file")
    ap.add_argument("--out", type=Path, default=RESULTS / "main_process_parts.json")
    a = ap.parse_args(argv)
    if not a.folder.is_dir():
        raise SystemExit(f"no image folder at {a.folder}: make one with `python benchmarks/cifar_jpegs.py {a.folder}`")
    rounds = {str(t): [] for t in a.tree}
    waits = []
    for r in range(a.rounds):
        for tree in a.tree:
            got = _run(PARTS, tree, a.folder)
            got.update(_run(LOOP, tree, a.folder, a.loop_workers, HERE.parent / "tests"))
            rounds[str(tree)].append(got)
            log(f"round {r + 1}/{a.rounds} {tree}: {got}")
        waits.append(_run(WAIT, None))
        log(f"round {r + 1}/{a.rounds} wait: {waits[-1]}")
    keys = ("writer_topk1_s", "writer_topk5_s", "discovery_s", "loop_us_per_file", "loop_main_thread_us_per_file",
            "loop_wall_s")
    trees = {str(t): {"git_commit": git_commit(t), "files": rounds[str(t)][0]["files"],
                      **best_and_median(rounds[str(t)], keys), "rounds": rounds[str(t)]} for t in a.tree}
    wait_summary = {k: {"best": round(min(w[k] for w in waits), 1), "median": round(statistics.median(w[k] for w in waits), 1)}
                    for k in waits[0]}
    write_result(a.out, {"folder": str(a.folder), "loop_workers": a.loop_workers, "trees": trees, "wait_us_16_workers": wait_summary, "wait_rounds": waits},
                 None if argv is None else [__file__, *argv])
    return 0


if __name__ == "__main__":
    sys.exit(main())
