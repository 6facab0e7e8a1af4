"""What `cnnx classify` costs around its images, for versions of cnnx in the same interleaved
rounds: the start (to the first batch), the end (after the last line), and the onnxruntime
package check that stands before every --device cuda run.

    flock /tmp/cnnx-cpu.lock python benchmarks/classify_startup.py --tree /tmp/base --tree . --rounds 7

A tree is a checkout of this repository (git worktree add /tmp/base <commit>), optionally with
`cnnx classify` options after "::" (`--tree ".::--workers 3"`); each run is a fresh
`python -m cnnx` with that tree first on its path, on the CPU (seed-cnn export, decode
processes, --topk 1), its stderr read as it comes:
  one_file_s         wall seconds of a whole process classifying one CIFAR JPEG: start-up, one
                     batch, exit (waiting for that process only, as a shell does)
  first_batch_s      the summary's "first batch after" of that run (from the command's start)
  cifar_s            wall seconds of a whole process on the 50,000 CIFAR JPEGs (--cifar)
  exit_s             from the summary line of the 50,000-file run reaching the pipe to the
                     process's end (the interpreter's teardown, or none)
  ort_distributions_s  cnnx.runtime.cuda.clashing_ort_distributions() in a fresh process, on this
                     machine's environment (the first check of `--device cuda`)
  api_one_file_s     wall seconds of a whole process that opens a Python API Classifier on the
                     CPU and classifies that one JPEG, to the process's end (a decode server it
                     started is not waited for)
Best and median of --rounds. Writes benchmarks/results/classify_startup.json.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from _results import RESULTS, best_and_median, git_commit, tree_env, write_result  # noqa: E402
from bench_classify import CACHE, build_model, log  # noqa: E402

KEYS = ("one_file_s", "first_batch_s", "cifar_s", "exit_s", "ort_distributions_s", "api_one_file_s")

# The Python API's shortest job: a fresh process that opens a Classifier on the CPU and classifies
# one file (its options as the command's: decode auto, the workers by default).
API_ONE_FILE = """
import sys
from cnnx.runtime.api import Classifier
with Classifier(sys.argv[1], "cpu", topk=1) as clf:
    rows = list(clf.classify([sys.argv[2]]))
assert len(rows) == 1, rows
"""

DISTRIBUTIONS = """
import time
from cnnx.runtime.cuda import clashing_ort_distributions
t0 = time.perf_counter()
clashing_ort_distributions()
print(time.perf_counter() - t0)
"""


def classify(tree: Path, model: Path, folder: Path, extra=()) -> dict:
    """One whole `cnnx classify` process: wall seconds, the summary's first-batch seconds, and
    the seconds from its summary line to its end."""
    out = CACHE / "startup-out.csv"
    for f in (out, out.with_name(out.stem + ".errors.csv")):
        f.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "cnnx", "classify", str(folder), "--model", str(model), "-o", str(out),
           "--device", "cpu", "--topk", "1", *extra]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, env=tree_env(tree), cwd=tree)
    summary = summary_at = None
    for line in proc.stderr:  # until the summary: the decode server may hold the pipe open after
        if line.startswith("classified"):
            summary, summary_at = line.strip(), time.perf_counter()
            break
    code = proc.wait()
    end = time.perf_counter()
    proc.stderr.close()
    if code != 0 or summary is None:
        raise SystemExit(f"cnnx classify in {tree} failed ({code}): {summary}")
    first = float(summary.split("first batch after ")[1].split(" s")[0])
    return {"wall_s": end - t0, "first_batch_s": first, "exit_s": end - summary_at}


def one_round(spec: str, model: Path, one: Path, cifar: Path) -> dict:
    tree, extra = parse_tree(spec)
    small = classify(tree, model, one, extra)
    large = classify(tree, model, cifar, extra)
    dist = subprocess.run([sys.executable, "-c", DISTRIBUTIONS], capture_output=True, text=True, env=tree_env(tree),
                          cwd=tree, check=True)
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", API_ONE_FILE, str(model), str(one)], env=tree_env(tree), cwd=tree,
                   check=True)
    api = time.perf_counter() - t0
    return {"one_file_s": small["wall_s"], "first_batch_s": small["first_batch_s"], "cifar_s": large["wall_s"],
            "exit_s": large["exit_s"], "ort_distributions_s": float(dist.stdout.strip()), "api_one_file_s": api}


def parse_tree(spec: str) -> tuple[Path, list]:
    """"DIR" or "DIR::options" -> (the tree, cnnx classify options for it)."""
    tree, _, options = spec.partition("::")
    return Path(tree), options.split()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tree", action="append", required=True,
                    help="a checkout of cnnx, optionally with cnnx classify options after '::' (repeatable)")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--cifar", type=Path, default=Path(os.environ.get("CNNX_CIFAR_DIR", "/tmp/cifar10/train")),
                    help="the 50,000 CIFAR JPEGs as DIR/<class>/*.jpg (default $CNNX_CIFAR_DIR or /tmp/cifar10/train)")
    ap.add_argument("--out", type=Path, default=RESULTS / "classify_startup.json")
    a = ap.parse_args(argv)
    if not a.cifar.is_dir():
        raise SystemExit(f"no CIFAR folder at {a.cifar}: make one with `python benchmarks/cifar_jpegs.py {a.cifar}`")
    model = build_model()
    one = CACHE / "one-jpeg"
    if not one.is_dir():
        first = sorted(sorted(a.cifar.iterdir())[0].glob("*.jpg"))[0]
        (one / "a").mkdir(parents=True)
        shutil.copyfile(first, one / "a" / first.name)
    rounds = {t: [] for t in a.tree}
    for r in range(a.rounds):
        for tree in a.tree:
            rounds[tree].append(one_round(tree, model, one, a.cifar))
            log(f"round {r + 1}/{a.rounds} {tree}: " + ", ".join(f"{k} {v:.3f}" for k, v in rounds[tree][-1].items()))
    trees = {t: {"git_commit": git_commit(parse_tree(t)[0]), **best_and_median(rounds[t], KEYS), "rounds": rounds[t]}
             for t in a.tree}
    write_result(a.out, {"model": str(model), "cifar": str(a.cifar), "trees": trees},
                 None if argv is None else [__file__, *argv])
    return 0


if __name__ == "__main__":
    sys.exit(main())
