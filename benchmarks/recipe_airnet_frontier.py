"""Issue 7 goal 1 (CPU, this machine's 2 cores): does a frontier technique lift the default
`airnet` recipe to >= 91.0% val top-1 within 600 s of training? Each candidate is today's
RECIPES["airnet"] plus `cnnx train` options (whitening, Muon, a weight average, 6 test-time
views, more epochs...), run as the real `cnnx train --data <CIFAR-10 train folder>` once per
seed on the fixed 5,000-image hold-out (benchmarks/recipe_common.py: seconds are training
steps only, as metrics.csv). Reports each run's epoch-by-epoch curve and each candidate's mean
over the seeds; a candidate that meets the goal is the evidence for changing RECIPES["airnet"].

Needs the machine to itself (about 10 minutes per run):

    flock /tmp/cnnx-cpu.lock python benchmarks/recipe_airnet_frontier.py \\
        --candidate "--whiten --tta 6" --candidate "--whiten --optimizer muon --tta 6"

`--candidate ""` is today's recipe (the baseline). Writes benchmarks/results/recipe_airnet_frontier.json.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _results import RESULTS, write_result  # noqa: E402
from recipe_common import cnnx_train, images_per_second  # noqa: E402

TARGET = 0.91
BUDGET_S = 600.0
GOAL = f"default airnet val top-1 >= {TARGET} within {BUDGET_S:.0f} s of training (mean of the seeds)"
DEFAULT_CANDIDATES = ("--whiten --tta 6",)


def candidate_summary(flags: str, runs: list) -> dict:
    finals = [r["history"][-1]["val_top1"] for r in runs]
    seconds = [r["history"][-1]["train_seconds"] for r in runs]
    return {
        "flags": flags, "seeds": len(runs),
        "mean_val_top1": round(statistics.mean(finals), 4), "val_top1": finals,
        "mean_train_seconds": round(statistics.mean(seconds), 1), "train_seconds": seconds,
        "met": statistics.mean(finals) >= TARGET and max(seconds) <= BUDGET_S,
        "train_images_per_second": [images_per_second(r) for r in runs],
        "mean_curve": [round(statistics.mean(r["history"][i]["val_top1"] for r in runs), 4)
                       for i in range(min(len(r["history"]) for r in runs))],
    }


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--candidate", action="append", metavar="FLAGS",
                    help=f"cnnx train options added to the default recipe (repeatable; default {DEFAULT_CANDIDATES[0]!r})")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds per candidate (0 1 2)")
    ap.add_argument("--results", type=Path, default=RESULTS, help="folder for the JSON (default benchmarks/results)")
    args = ap.parse_args(argv)
    candidates = args.candidate if args.candidate is not None else list(DEFAULT_CANDIDATES)
    out = []
    for i, flags in enumerate(candidates):
        runs = [cnnx_train(f"frontier-{i}-seed{s}", [*shlex.split(flags), "--seed", str(s)]) for s in args.seeds]
        out.append({"summary": candidate_summary(flags, runs), "runs": runs})
        print(json.dumps(out[-1]["summary"], indent=2), flush=True)
    write_result(args.results / "recipe_airnet_frontier.json",
                 {"goal": GOAL, "summary": [c["summary"] for c in out], "candidates": out},
                 None if argv is None else [__file__, *argv])


if __name__ == "__main__":
    main()
