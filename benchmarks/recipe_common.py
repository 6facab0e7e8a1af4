"""Shared pieces of the recipe benchmarks (recipe_seed_cnn.py, recipe_airnet.py).

`cnnx_train` runs the real `cnnx train` and reads its metrics.csv: the reported figures come
from it. The rest is the prototype loop the recipes were explored with (`Recipe`, `train`): the
same data path, augmentation, schedule and optimizer as cnnx.train.loop, but with CIFAR-10
decoded once into a uint8 tensor cached at /tmp/cnnx-recipe-cache.pt, so a variant can be
tried from a Python prompt. Both use the stratified 10% hold-out of cnnx.train.data (seed 0);
recipes are selected on it only.

Timing: training seconds count optimizer steps and batch augmentation only; decoding, the
cache build and hold-out evaluation are excluded and reported separately, as in metrics.csv.
"""

from __future__ import annotations

import json
import math
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

CIFAR_DIR = Path(os.environ.get("CNNX_CIFAR_DIR", "/tmp/cifar10/train"))
CACHE = Path(os.environ.get("CNNX_RECIPE_CACHE", "/tmp/cnnx-recipe-cache.pt"))
RESULTS = Path(__file__).resolve().parent / "results"
SPLIT_SEED = 0  # fixed: every recipe sees the same 45,000 / 5,000 split
VAL_FRACTION = 0.10


def load_cifar(cifar_dir: Path = CIFAR_DIR, cache: Path = CACHE):
    """(images uint8 (N,3,32,32), labels int64 (N,), class_names); decoded through the one
    preprocess implementation and cached (decoding 50k tiny JPEGs takes ~10 s)."""
    if cache.exists():
        d = torch.load(cache, weights_only=True)
        return d["images"], d["labels"], list(d["classes"])
    from cnnx.runtime.preprocess import load_image, make_spec
    from cnnx.train.zoo import CIFAR_MEAN, CIFAR_STD

    spec = make_spec(32, CIFAR_MEAN, CIFAR_STD)
    classes = sorted(p.name for p in cifar_dir.iterdir() if p.is_dir())
    files = [(f, i) for i, c in enumerate(classes) for f in sorted((cifar_dir / c).iterdir())]
    images = torch.empty((len(files), 3, 32, 32), dtype=torch.uint8)
    for k, (f, _) in enumerate(files):
        images[k] = torch.from_numpy(load_image(f, spec)[0])
    labels = torch.tensor([i for _, i in files], dtype=torch.int64)
    tmp = cache.with_suffix(".tmp")
    torch.save({"images": images, "labels": labels, "classes": classes}, tmp)
    os.replace(tmp, cache)
    return images, labels, classes


def augment_batch(x: torch.Tensor, aug, pad: int, g: torch.Generator) -> torch.Tensor:
    """Whole-batch random crop after reflect padding ("crop") and horizontal flip ("flip") of
    uint8 (B, C, H, W) as one gather, the same semantics as cnnx.train.loop.augment_batch."""
    b, c, h, w = x.shape
    rows = torch.arange(h).expand(b, h)
    cols = torch.arange(w).expand(b, w)
    if "crop" in aug and pad > 0:
        dy = torch.randint(-pad, pad + 1, (b, 1), generator=g)
        dx = torch.randint(-pad, pad + 1, (b, 1), generator=g)
        rows, cols = _reflect(rows + dy, h), _reflect(cols + dx, w)
    if "flip" in aug:
        flip = torch.rand((b, 1), generator=g) < 0.5
        cols = torch.where(flip, w - 1 - cols, cols)
    if ("crop" in aug and pad > 0) or "flip" in aug:
        n = torch.arange(b)[:, None, None]
        x = x.permute(0, 2, 3, 1)[n, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)
    return x


def _reflect(i: torch.Tensor, n: int) -> torch.Tensor:
    i = torch.where(i < 0, -i, i)
    return torch.where(i > n - 1, 2 * (n - 1) - i, i)


@torch.no_grad()
def evaluate(wrapped, x_val: torch.Tensor, y_val: torch.Tensor, *, channels_last: bool, batch: int = 1000):
    """Top-1 and mean cross-entropy of a Uint8Input-wrapped model on uint8 images, in eval mode
    (so AirNet's flip TTA is included) and float32 (as cnnx train evaluates: the metrics
    describe the exported function; bf16 is for training speed only)."""
    wrapped.eval()
    correct, loss_sum = 0, 0.0
    for i in range(0, len(y_val), batch):
        xb, yb = x_val[i:i + batch], y_val[i:i + batch]
        if channels_last:
            xb = xb.contiguous(memory_format=torch.channels_last)
        logits = wrapped(xb).float()
        loss_sum += F.cross_entropy(logits, yb, reduction="sum").item()
        correct += (logits.argmax(1) == yb).sum().item()
    wrapped.train()
    return correct / len(y_val), loss_sum / len(y_val)


def lr_at(step: int, total: int, *, peak: float, schedule: str, warmup: float, final: float = 0.0) -> float:
    """Same function as cnnx.train.loop.lr_at: linear warm-up over the first `warmup` fraction
    of the steps, then linear (onecycle) or cosine decay to final*peak, or constant."""
    up = int(round(warmup * total))
    if step < up:
        return peak * (step + 1) / up
    if schedule == "constant":
        return peak
    t = min(1.0, (step - up) / max(1, total - up))
    low = final * peak
    if schedule == "onecycle":
        return low + (peak - low) * (1.0 - t)
    if schedule == "cosine":
        return low + (peak - low) * 0.5 * (1.0 + math.cos(math.pi * t))
    raise ValueError(f"unknown schedule {schedule!r}; valid: onecycle, cosine, constant")


@dataclass(frozen=True)
class Recipe:
    """The hyperparameters a recipe sets; names and units as in cnnx.train.config.TrainConfig,
    so a recipe found here is copied field by field into RECIPES."""

    arch: str = "airnet"
    arch_kwargs: tuple = ()          # (name, value) pairs for the zoo constructor
    epochs: int = 10                 # passes over the 45,000 training images
    batch_size: int = 512            # images per optimizer step
    lr: float = 0.1                  # peak learning rate
    optimizer: str = "sgd"           # sgd (Nesterov) | adamw | adam
    momentum: float = 0.9            # sgd momentum; adam beta1
    weight_decay: float = 5e-4       # on every parameter, as cnnx.train.loop does
    label_smoothing: float = 0.0     # probability mass spread over the other classes
    schedule: str = "onecycle"       # onecycle | cosine | constant
    warmup: float = 0.1              # fraction of steps ramping lr up linearly
    final_lr: float = 0.0            # fraction of the peak at the last step
    aug: tuple = ("crop", "flip")    # whole-batch augmentations
    crop_pad: int = 4                # pixels of reflect padding before the random crop
    bf16: bool = True                # bf16 autocast (this CPU has avx512_bf16)
    channels_last: bool = True       # memory format of activations
    seed: int = 0                    # init, batch order and augmentation


def make_optimizer(params, r: Recipe):
    if r.optimizer == "sgd":
        return torch.optim.SGD(params, lr=r.lr, momentum=r.momentum, nesterov=r.momentum > 0, weight_decay=r.weight_decay)
    if r.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=r.lr, betas=(r.momentum, 0.999), weight_decay=r.weight_decay)
    if r.optimizer == "adam":
        return torch.optim.Adam(params, lr=r.lr, betas=(r.momentum, 0.999), weight_decay=r.weight_decay)
    raise ValueError(f"unknown optimizer {r.optimizer!r}; valid: sgd, adamw, adam")


def train(r: Recipe, data, *, threads: int = 2, max_seconds: float | None = None) -> dict:
    """Train `r` on the split in `data` = (x_train, y_train, x_val, y_val) (uint8 / int64);
    evaluate the hold-out after every epoch. Returns the per-epoch history with cumulative
    training seconds (steps only: evaluation is timed separately)."""
    from cnnx.train.zoo import Uint8Input, create_model, get_arch

    torch.set_num_threads(threads)
    torch.manual_seed(r.seed)
    x_tr, y_tr, x_va, y_va = data
    arch = get_arch(r.arch)
    model = create_model(r.arch, 10, **dict(r.arch_kwargs))
    wrapped = Uint8Input(model, arch.mean, arch.std)
    if r.channels_last:
        wrapped = wrapped.to(memory_format=torch.channels_last)
    opt = make_optimizer(wrapped.parameters(), r)
    loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=r.label_smoothing)
    n = len(y_tr)
    steps_per_epoch = n // r.batch_size
    total = steps_per_epoch * r.epochs
    step, train_s, history = 0, 0.0, []
    g = torch.Generator().manual_seed(r.seed)
    wrapped.train()
    for epoch in range(r.epochs):
        t0 = time.perf_counter()
        perm = torch.randperm(n, generator=g)
        for i in range(steps_per_epoch):
            idx = perm[i * r.batch_size:(i + 1) * r.batch_size]
            x = augment_batch(x_tr[idx], r.aug, r.crop_pad, g)
            x = x.contiguous(memory_format=torch.channels_last) if r.channels_last else x.contiguous()
            lr = lr_at(step, total, peak=r.lr, schedule=r.schedule, warmup=r.warmup, final=r.final_lr)
            for group in opt.param_groups:
                group["lr"] = lr
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=r.bf16):
                logits = wrapped(x)
            loss = loss_fn(logits.float(), y_tr[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
        train_s += time.perf_counter() - t0
        t1 = time.perf_counter()
        top1, vloss = evaluate(wrapped, x_va, y_va, channels_last=r.channels_last)
        eval_s = time.perf_counter() - t1
        history.append({"epoch": epoch + 1, "train_seconds": round(train_s, 2), "eval_seconds": round(eval_s, 2),
                        "val_top1": round(top1, 4), "val_loss": round(vloss, 4), "train_loss": round(loss.item(), 4)})
        log(f"  epoch {epoch + 1}/{r.epochs}  train {train_s:6.1f}s  val top-1 {top1:.4f}  loss {vloss:.3f}  "
            f"(eval {eval_s:.1f}s)")
        if max_seconds is not None and train_s > max_seconds:
            log(f"  stopped: {train_s:.0f}s of training exceeds the {max_seconds:.0f}s budget")
            break
    return {"recipe": asdict(r), "history": history, "images_per_second": round(step * r.batch_size / train_s, 1)}


def load_split():
    """(x_train, y_train, x_val, y_val) of the fixed stratified split."""
    from cnnx.train.data import stratified_split  # the split cnnx train uses: same seed, same images

    images, labels, _ = load_cifar()
    tr, va = stratified_split(labels, VAL_FRACTION, SPLIT_SEED)
    return images[tr], labels[tr], images[va], labels[va]


def machine() -> dict:
    return {
        "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": sys.version.split()[0],
    }


def write_result(name: str, payload: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(payload, indent=2) + "\n")
    os.replace(tmp, path)
    return path


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
