"""Issue 2 goal (a): the tutorial's two-conv net (`seed-cnn`, architecture fixed) reaches the
tutorial's 69% val top-1 within 60 s of training on this CPU, through a better recipe.

Baseline (measured in the same run): the tutorial's recipe, Adam 1e-3, batch 128, no
augmentation, fp32, 3 epochs. Candidate: the recipe in cnnx/train/config.py RECIPES["seed-cnn"]
(copied below as RECIPE; the script checks they agree). Both train on the fixed stratified
45,000 / 5,000 split of the real CIFAR-10 training JPEGs and evaluate the hold-out after each
epoch. Seconds are training steps only (evaluation and decoding excluded).

    flock /tmp/cnnx-cpu.lock python benchmarks/recipe_seed_cnn.py

Prints a summary on stdout and writes benchmarks/results/recipe_seed_cnn.json.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from recipe_common import Recipe, load_split, log, machine, train, write_result  # noqa: E402

TARGET = 0.69        # val top-1 of the tutorial after 3 epochs
BUDGET_S = 60.0      # seconds of training allowed for the target

TUTORIAL = Recipe(
    arch="seed-cnn", epochs=3, batch_size=128, lr=1e-3, optimizer="adam", momentum=0.9, weight_decay=0.0,
    label_smoothing=0.0, schedule="constant", warmup=0.0, aug=(), bf16=False, channels_last=False,
)

# Why each choice (measured on the 2-core AMD EPYC with avx512_bf16):
# - bf16 autocast + channels_last: ~3x the fp32 images/s of this net (oneDNN bf16 convs).
# - batch 256, SGD Nesterov lr 0.05: batch 512 (lr 0.1) ran ~10% faster per image but
#   reached 1.7 points less top-1 after 4 epochs (71.1% vs 72.8%) in exploration.
# - one linear warm-up/decay cycle over 3 epochs: the run ends at lr 0, which is worth
#   several points of top-1 over a constant lr at the same epoch count.
# - flip only: crops regularise but slow the first epochs, and 3 epochs do not overfit.
# - label smoothing 0.1: a small, free gain in top-1.
RECIPE = replace(
    TUTORIAL, epochs=3, batch_size=256, lr=0.05, optimizer="sgd", momentum=0.9, weight_decay=5e-4,
    label_smoothing=0.1, schedule="onecycle", warmup=0.15, aug=("flip",), bf16=True, channels_last=True,
)


def seconds_to(history, target):
    for h in history:
        if h["val_top1"] >= target:
            return h["train_seconds"], h["epoch"]
    return None, None


def check_against_config(r: Recipe) -> list[str]:
    """Fields where cnnx/train/config.py's recipe differs from the one measured here."""
    try:
        from cnnx.train.config import resolve_config
    except ImportError:
        return ["cnnx.train.config not importable"]
    cfg = resolve_config(r.arch)
    return [f"{k}: config {getattr(cfg, k)!r} != benchmark {v!r}" for k, v in
            [(k, getattr(r, k)) for k in ("epochs", "batch_size", "lr", "optimizer", "momentum", "weight_decay",
                                          "label_smoothing", "schedule", "warmup", "aug", "bf16", "channels_last")]
            if getattr(cfg, k, v) != v]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--skip-baseline", action="store_true", help="only the candidate recipe (for iteration)")
    args = ap.parse_args(argv)

    data = load_split()
    runs = {}
    for name, r in ([] if args.skip_baseline else [("tutorial", TUTORIAL)]) + [("recipe", RECIPE)]:
        log(f"{name}: {r}")
        res = train(r, data)
        res["seconds_to_target"], res["epoch_to_target"] = seconds_to(res["history"], TARGET)
        runs[name] = res
    rec = runs["recipe"]
    final = rec["history"][-1]
    summary = {
        "goal": f"seed-cnn val top-1 >= {TARGET} within {BUDGET_S:.0f} s of training",
        "val_top1": final["val_top1"],
        "train_seconds": final["train_seconds"],
        "met": final["val_top1"] >= TARGET and final["train_seconds"] <= BUDGET_S,
        "recipe_seconds_to_target": rec["seconds_to_target"],
        "recipe_images_per_second": rec["images_per_second"],
    }
    if "tutorial" in runs:
        tut = runs["tutorial"]
        summary["tutorial_val_top1"] = tut["history"][-1]["val_top1"]
        summary["tutorial_seconds_to_target"] = tut["seconds_to_target"]
        summary["tutorial_images_per_second"] = tut["images_per_second"]
        if tut["seconds_to_target"] and rec["seconds_to_target"]:
            summary["speedup_to_target"] = round(tut["seconds_to_target"] / rec["seconds_to_target"], 2)
    summary["config_mismatch"] = check_against_config(RECIPE)
    payload = {"summary": summary, "runs": runs, "machine": machine(),
               "command": "flock /tmp/cnnx-cpu.lock python benchmarks/recipe_seed_cnn.py"}
    path = write_result("recipe_seed_cnn", payload)
    print(json.dumps(summary, indent=2))
    log(f"wrote {path}")


if __name__ == "__main__":
    main()
