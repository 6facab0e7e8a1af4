"""Issue 2 goal (b): the default arch (`airnet`) reaches >= 88% val top-1 within 10 minutes of
training on this 2-core CPU.

Two parts, both measured in this run:
1. Throughput (images/s of a training step, batch 512, fast-quartile of 8 steps) of AirNet at
   airbench94's widths 64/256/256 (the baseline) and at the widths of the default recipe, each
   in fp32 / contiguous (the baseline settings) and bf16 autocast / channels_last. This is why
   the default widths are narrower: at 64/256/256 ten minutes buy under 7 epochs.
2. The default recipe, as in cnnx/train/config.py RECIPES["airnet"] (copied below as RECIPE;
   checked against it), trained on the fixed stratified 45,000 / 5,000 split of the real
   CIFAR-10 training JPEGs, the hold-out evaluated (with flip TTA) after each epoch. Seconds
   are training steps only (evaluation and decoding excluded).

    flock /tmp/cnnx-cpu.lock python benchmarks/recipe_airnet.py

Prints a summary on stdout and writes benchmarks/results/recipe_airnet.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from recipe_common import Recipe, load_split, log, machine, train, write_result  # noqa: E402

TARGET = 0.88        # val top-1 asked by issue 2
BUDGET_S = 600.0     # seconds of training allowed for the target
AIRBENCH_WIDTHS = (64, 256, 256)

RECIPE = Recipe(
    arch="airnet", arch_kwargs=(), epochs=15, batch_size=512, lr=0.4, optimizer="sgd", momentum=0.9,
    weight_decay=5e-4, label_smoothing=0.2, schedule="onecycle", warmup=0.2, aug=("crop", "flip"), crop_pad=2,
    bf16=True, channels_last=True,
)


def step_throughput(widths, *, bf16: bool, channels_last: bool, batch: int = 512, steps: int = 8) -> float:
    """Images/s of one SGD training step of AirNet(widths) on random input (fast quartile of
    `steps` timed steps after 3 warm-up steps, so a burst of other load does not decide it)."""
    import torch
    import torch.nn.functional as F

    from cnnx.train.zoo import AirNet

    torch.set_num_threads(2)
    model = AirNet(10, widths=list(widths))
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True)
    x = torch.randn(batch, 3, 32, 32)
    y = torch.randint(0, 10, (batch,))
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    times = []
    for i in range(steps + 3):
        t = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = F.cross_entropy(model(x).float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if i >= 3:
            times.append(time.perf_counter() - t)
    times.sort()
    return round(batch / times[len(times) // 4], 1)


def default_widths():
    import inspect

    from cnnx.train.zoo import AirNet

    return tuple(inspect.signature(AirNet).parameters["widths"].default)


def check_against_config(r: Recipe) -> list[str]:
    try:
        from cnnx.train.config import resolve_config
    except ImportError:
        return ["cnnx.train.config not importable"]
    cfg = resolve_config(r.arch)
    keys = ("epochs", "batch_size", "lr", "optimizer", "momentum", "weight_decay", "label_smoothing", "schedule",
            "warmup", "aug", "crop_pad", "bf16", "channels_last")
    return [f"{k}: config {getattr(cfg, k)!r} != benchmark {getattr(r, k)!r}" for k in keys
            if getattr(cfg, k, getattr(r, k)) != getattr(r, k)]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--skip-throughput", action="store_true", help="only the training run (for iteration)")
    ap.add_argument("--skip-train", action="store_true", help="only the throughput table")
    args = ap.parse_args(argv)

    widths = default_widths()
    throughput = []
    if not args.skip_throughput:
        for w in (AIRBENCH_WIDTHS, widths):
            for bf16, cl in ((False, False), (True, True)):
                ips = step_throughput(w, bf16=bf16, channels_last=cl)
                throughput.append({"widths": list(w), "bf16": bf16, "channels_last": cl, "images_per_second": ips})
                log(f"  widths {w} bf16={bf16} channels_last={cl}: {ips:.0f} images/s")
    summary = {"goal": f"airnet val top-1 >= {TARGET} within {BUDGET_S:.0f} s of training", "widths": list(widths)}
    if throughput:
        base = throughput[0]["images_per_second"]
        summary["throughput_vs_airbench94_fp32"] = {
            f"{t['widths']} {'bf16+channels_last' if t['bf16'] else 'fp32'}": round(t["images_per_second"] / base, 2)
            for t in throughput}
    run = None
    if not args.skip_train:
        log(f"recipe: {RECIPE}")
        run = train(RECIPE, load_split())
        final = run["history"][-1]
        reached = next((h for h in run["history"] if h["val_top1"] >= TARGET), None)
        summary.update({
            "val_top1": final["val_top1"],
            "train_seconds": final["train_seconds"],
            "met": final["val_top1"] >= TARGET and final["train_seconds"] <= BUDGET_S,
            "first_epoch_at_target": reached and {"epoch": reached["epoch"], "train_seconds": reached["train_seconds"]},
            "train_images_per_second": run["images_per_second"],
        })
    summary["config_mismatch"] = check_against_config(RECIPE)
    payload = {"summary": summary, "throughput": throughput, "run": run, "machine": machine(),
               "command": "flock /tmp/cnnx-cpu.lock python benchmarks/recipe_airnet.py"}
    path = write_result("recipe_airnet", payload)
    print(json.dumps(summary, indent=2))
    log(f"wrote {path}")


if __name__ == "__main__":
    main()
