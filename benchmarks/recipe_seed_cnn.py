"""Issue 2 goal (a): the tutorial's two-conv net (`seed-cnn`, architecture fixed) reaches the
tutorial's 69% val top-1 within 60 s of training on this CPU, through a better recipe.

Both runs go through the real `cnnx train` on the 50,000 CIFAR-10 training JPEGs with its fixed
stratified 10% hold-out (split seed 0), and this script reads their metrics.csv:
  baseline  the tutorial's recipe: Adam 1e-3, batch 128, no augmentation, constant lr, fp32,
            3 epochs (given as command-line overrides);
  recipe    `cnnx train --arch seed-cnn` with no overrides, i.e. RECIPES["seed-cnn"] in
            cnnx/train/config.py.
Seconds are metrics.csv's training seconds (optimizer steps and batch augmentation only;
decoding and evaluation are excluded, as cnnx train times them separately).

Why the recipe is what it is (explored on the development CPU, with avx512_bf16; the figures
of that exploration came from a prototype loop since removed, so only the reasons are kept
here; this script's JSON holds what is measured now):
- bf16 autocast + channels_last: oneDNN's bf16 convolutions are much faster per image there.
- batch 256, SGD Nesterov lr 0.05: batch 512 was faster per image but ended lower after the
  same epochs.
- one linear warm-up/decay cycle over 3 epochs: ending at lr 0 is worth several points over a
  constant lr at the same epoch count.
- flip only: crops regularise but slow the first epochs, and 3 epochs do not overfit.
- label smoothing 0.1.

    flock /tmp/cnnx-cpu.lock python benchmarks/recipe_seed_cnn.py

Prints a summary on stdout and writes benchmarks/results/recipe_seed_cnn.json.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _results import RESULTS, write_result  # noqa: E402
from recipe_common import cnnx_train, images_per_second  # noqa: E402

TARGET = 0.69        # val top-1 of the tutorial after 3 epochs
BUDGET_S = 60.0      # seconds of training allowed for the target

TUTORIAL_ARGS = ["--arch", "seed-cnn", "--epochs", "3", "--batch-size", "128", "--optimizer", "adam", "--lr", "1e-3",
                 "--weight-decay", "0", "--label-smoothing", "0", "--schedule", "constant", "--warmup", "0",
                 "--aug", "none", "--no-bf16", "--no-channels-last"]
RECIPE_ARGS = ["--arch", "seed-cnn"]


def seconds_to(history, target):
    return next((h["train_seconds"] for h in history if h["val_top1"] >= target), None)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--skip-baseline", action="store_true", help="only the recipe (for iteration)")
    ap.add_argument("--results", type=Path, default=RESULTS, help="folder for the JSON (default benchmarks/results)")
    args = ap.parse_args(argv)

    runs = {}
    if not args.skip_baseline:
        runs["tutorial"] = cnnx_train("recipe-seed-cnn-tutorial", TUTORIAL_ARGS)
    runs["recipe"] = cnnx_train("recipe-seed-cnn", RECIPE_ARGS)
    rec = runs["recipe"]
    final = rec["history"][-1]
    summary = {
        "goal": f"seed-cnn val top-1 >= {TARGET} within {BUDGET_S:.0f} s of training",
        "val_top1": final["val_top1"],
        "train_seconds": final["train_seconds"],
        "met": final["val_top1"] >= TARGET and final["train_seconds"] <= BUDGET_S,
        "recipe_seconds_to_target": seconds_to(rec["history"], TARGET),
        "recipe_images_per_second": images_per_second(rec),
    }
    if "tutorial" in runs:
        tut = runs["tutorial"]
        summary["tutorial_val_top1"] = tut["history"][-1]["val_top1"]
        summary["tutorial_train_seconds"] = tut["history"][-1]["train_seconds"]
        summary["tutorial_seconds_to_target"] = seconds_to(tut["history"], TARGET)
        summary["tutorial_images_per_second"] = images_per_second(tut)
        if summary["tutorial_seconds_to_target"] and summary["recipe_seconds_to_target"]:
            summary["speedup_to_target"] = round(summary["tutorial_seconds_to_target"] /
                                                 summary["recipe_seconds_to_target"], 2)
    print(json.dumps(summary, indent=2))
    write_result(args.results / "recipe_seed_cnn.json", {"summary": summary, "runs": runs},
                 None if argv is None else [__file__, *argv])


if __name__ == "__main__":
    main()
