"""The pieces of the training loop: `train_one_epoch` and `evaluate` (two small functions
that return plain metrics; cnnx.train.run.fit is the loop that calls them). Data stays one
uint8 tensor on the device; batches are slices of a seeded random permutation; augmentation
is one gather per batch; the learning rate is a pure function of the step (`lr_at`), so
resuming needs only the step number.

Randomness is reseeded from (seed, epoch, rank) at the start of every epoch, which makes a
resumed run take exactly the same batches and augmentations as an uninterrupted one.
"""

from __future__ import annotations

import math
import os
import sys
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from cnnx.train.config import TrainConfig
from cnnx.train.optim import group_lr


# --- schedule -------------------------------------------------------------------------------

def lr_at(step: int, total_steps: int, *, peak: float, schedule: str, warmup: float, final: float = 0.0) -> float:
    """Learning rate for optimizer step `step` (0-based) of `total_steps`. warmup and final are
    fractions (of the steps, of the peak). onecycle: linear up, linear down; cosine: linear up,
    cosine down; constant: linear up, then flat."""
    total = max(1, int(total_steps))
    up = int(round(warmup * total))
    if step < up:
        return peak * (step + 1) / up
    if schedule == "constant":
        return peak
    span = max(1, total - up)
    t = min(1.0, (step - up) / span)
    low = final * peak
    if schedule == "onecycle":
        return low + (peak - low) * (1.0 - t)
    if schedule == "cosine":
        return low + (peak - low) * 0.5 * (1.0 + math.cos(math.pi * t))
    raise ValueError(f"unknown schedule {schedule!r}")


# --- augmentation ---------------------------------------------------------------------------

def _reflect(i: torch.Tensor, n: int) -> torch.Tensor:
    """Index i in [-n+1, 2n-2] mirrored into [0, n-1] (numpy/torch 'reflect' padding)."""
    i = torch.where(i < 0, -i, i)
    return torch.where(i > n - 1, 2 * (n - 1) - i, i)


def augment_batch(x: torch.Tensor, *, aug, pad: int, cutout: int, generator: torch.Generator) -> torch.Tensor:
    """Whole-batch augmentation of uint8 (B, C, H, W) on its own device. Random crop after
    reflect padding and horizontal flip are one gather (the padded image is never built); the
    result is channels_last in memory because the gather yields (B, H, W, C)."""
    b, c, h, w = x.shape
    dev = x.device
    rows = torch.arange(h, device=dev).expand(b, h)
    cols = torch.arange(w, device=dev).expand(b, w)
    if "crop" in aug and pad > 0:
        dy = torch.randint(-pad, pad + 1, (b, 1), device=dev, generator=generator)
        dx = torch.randint(-pad, pad + 1, (b, 1), device=dev, generator=generator)
        rows = _reflect(rows + dy, h)
        cols = _reflect(cols + dx, w)
    if "flip" in aug:
        flip = torch.rand((b, 1), device=dev, generator=generator) < 0.5
        cols = torch.where(flip, w - 1 - cols, cols)
    if ("crop" in aug and pad > 0) or "flip" in aug:
        n = torch.arange(b, device=dev)[:, None, None]
        x = x.permute(0, 2, 3, 1)[n, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)
    if "cutout" in aug and cutout > 0:
        cy = torch.randint(0, h, (b, 1, 1), device=dev, generator=generator)
        cx = torch.randint(0, w, (b, 1, 1), device=dev, generator=generator)
        yy = torch.arange(h, device=dev)[None, :, None]
        xx = torch.arange(w, device=dev)[None, None, :]
        hole = ((yy - cy).abs() <= cutout // 2) & ((xx - cx).abs() <= cutout // 2)
        x = x.masked_fill(hole[:, None], 0)
    return x


# --- metrics --------------------------------------------------------------------------------


def top5_said(metrics: dict, num_classes: int) -> str:
    """The ' top5 0.1234' of a log line, or '' where there are 5 classes or fewer: their top-5
    is 1.0 by construction (every class is among the 5), a figure that says nothing each epoch
    (the metrics files keep it)."""
    return f" top5 {metrics['top5']:.4f}" if num_classes > 5 else ""


class Counts:
    """Summable evidence for loss/top-1/top-5/per-class/confusion, so ranks can all-reduce it."""

    def __init__(self, num_classes: int, device):
        self.c = num_classes
        self.loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        self.top5 = torch.zeros((), dtype=torch.int64, device=device)
        self.confusion = torch.zeros(num_classes * num_classes, dtype=torch.int64, device=device)
        self.nonfinite = torch.zeros((), dtype=torch.int64, device=device)  # images with a NaN/inf logit

    @torch.no_grad()
    def add(self, logits, labels, loss_sum):
        k = min(5, self.c)
        self.nonfinite += (~torch.isfinite(logits)).any(dim=1).sum()
        self.loss_sum += loss_sum.double()
        self.top5 += (logits.topk(k, dim=1).indices == labels[:, None]).any(dim=1).sum()
        # index_add_, not bincount: CUDA's bincount reads the max index back to the host (a sync per step).
        cells = labels * self.c + logits.argmax(1)
        self.confusion.index_add_(0, cells, torch.ones_like(cells))

    def all_reduce(self):
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            for t in (self.loss_sum, self.top5, self.confusion, self.nonfinite):
                dist.all_reduce(t)
        return self

    def metrics(self) -> dict:
        cm = self.confusion.view(self.c, self.c).cpu()
        n = int(cm.sum())
        per_class_n = cm.sum(1)
        per_class = (cm.diag().double() / per_class_n.clamp(min=1)).tolist()
        return {
            "loss": float(self.loss_sum) / max(n, 1),
            "top1": float(cm.diag().sum()) / max(n, 1),
            "top5": float(self.top5) / max(n, 1),
            "per_class": [p if m > 0 else float("nan") for p, m in zip(per_class, per_class_n.tolist())],
            "confusion": cm.tolist(),
            "n": n,
            "nonfinite": int(self.nonfinite),
        }


def per_class_json(per_class) -> list:
    """Counts.metrics' per_class for JSON: null where a class had no image (NaN is no JSON value;
    strict parsers refuse it)."""
    return [None if v != v else v for v in per_class]


def eval_counts(wrapped, images, labels, num_classes, *, batch_size, device, bf16=False, channels_last=False,
                keep_probs=False):
    """(Counts, softmax probabilities float32 (N, C) on the device when keep_probs, else None)
    of `wrapped` (a Uint8Input model) on uint8 images, in eval mode."""
    counts = Counts(num_classes, device)
    probs = []
    was_training = wrapped.training
    wrapped.eval()
    try:
        with torch.no_grad():
            for i in range(0, len(labels), batch_size):
                x = images[i:i + batch_size].to(device, non_blocking=True)
                y = labels[i:i + batch_size].to(device, non_blocking=True)
                if channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                with torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16, enabled=bf16):
                    logits = wrapped(x)
                logits = logits.float()
                counts.add(logits, y, F.cross_entropy(logits, y, reduction="sum"))
                if keep_probs:
                    probs.append(logits.softmax(dim=1))
    finally:
        wrapped.train(was_training)
    if not keep_probs:
        return counts, None
    return counts, torch.cat(probs) if probs else torch.zeros((0, num_classes), device=device)


def evaluate(model, images_uint8, labels, *, mean, std, batch_size=1024, device="cpu", num_classes=None,
             keep_probs=False) -> dict:
    """Loss (plain cross-entropy), top-1, top-5, per-class top-1 (list, NaN for a class with
    no images), the confusion matrix (list of lists, rows = true label) and `nonfinite` (the
    number of images with a NaN/inf logit) of `model` on uint8 images; with keep_probs also
    "probs", the softmax float32 (N, C) on the CPU. The model is wrapped in zoo.Uint8Input,
    exactly as in training and export."""
    from cnnx.train.zoo import Uint8Input

    model = getattr(model, "module", model)
    if isinstance(model, Uint8Input):
        wrapped = model
    else:
        wrapped = Uint8Input(model, mean, std)
    wrapped = wrapped.to(device)
    if num_classes is None:
        with torch.no_grad():
            was = wrapped.training
            wrapped.eval()
            num_classes = wrapped(images_uint8[:1].to(device)).shape[1]
            wrapped.train(was)
    labels = torch.as_tensor(labels, dtype=torch.int64)
    counts, probs = eval_counts(wrapped, images_uint8, labels, num_classes, batch_size=batch_size, device=device,
                                keep_probs=keep_probs)
    m = counts.metrics()
    if keep_probs:
        m["probs"] = probs.cpu()
    return m


# --- one epoch ------------------------------------------------------------------------------

def train_one_epoch(train_model, optimizer, images, labels, *, cfg: TrainConfig, epoch: int, step: int,
                    total_steps: int, num_classes: int, device, rank=0, world=1, bf16=False, progress=True,
                    frozen_modules=(), out_size=None, ema=None):
    """One pass over this rank's shard. Returns (metrics dict, new global step). `images`: a
    resident uint8 tensor, or cnnx.train.cache.Rows (read by a prefetching thread). frozen_modules
    stay in eval mode (a frozen backbone's batch norm); out_size: the model's input (H, W), which
    random-resized-crop ("rrc" in cfg.aug) cuts the larger stored images to. Each param group's lr
    is the schedule's times its "lr_mult" (cnnx.train.finetune.param_groups; optim.group_lr). ema: a
    cnnx.train.optim.WeightAverage of the trained net, updated after every optimizer step."""
    from tqdm import tqdm

    from cnnx.train.cache import batches
    from cnnx.train.resized_crop import random_resized_crop

    n = len(labels)
    per_rank = max(1, cfg.batch_size // world)
    g_cpu = torch.Generator().manual_seed(cfg.seed * 100_003 + epoch)  # same order on every rank
    perm = torch.randperm(n, generator=g_cpu)
    shard = perm[rank::world][: n // world]  # equal shard sizes keep DDP's collectives in step
    steps = len(shard) // per_rank
    if steps == 0:  # fewer images than one batch: train on what there is
        steps, per_rank = 1, len(shard)
    g_aug = torch.Generator(device=device).manual_seed(cfg.seed * 1_000_003 + epoch * 1009 + rank)
    counts = Counts(num_classes, device)
    loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    train_model.train()
    for m in frozen_modules:
        m.eval()
    dev_type = torch.device(device).type
    bar = tqdm(total=steps, desc=f"epoch {epoch + 1}/{cfg.epochs}", unit="batch", file=sys.stderr,
               disable=not progress, leave=False, dynamic_ncols=True)
    lr = 0.0
    if isinstance(images, torch.Tensor):  # resident data: the epoch's order goes to its device once, not one
        shard = shard.to(images.device)   # (host-synchronising) index copy per step
    index_batches = [shard[i * per_rank:(i + 1) * per_rank] for i in range(steps)]
    for i, (x, y) in enumerate(batches(images, labels, index_batches, device)):
        if "rrc" in cfg.aug:
            x = random_resized_crop(x, out_size, scale=cfg.rrc_scale, ratio=cfg.rrc_ratio, generator=g_aug)
        x = augment_batch(x, aug=cfg.aug, pad=cfg.crop_pad, cutout=cfg.cutout, generator=g_aug)
        # The augmentation gather already yields channels_last strides; make it explicit either way.
        x = x.contiguous(memory_format=torch.channels_last if channels_last_enabled(cfg, dev_type) else torch.contiguous_format)
        lr = lr_at(step, total_steps, peak=cfg.lr, schedule=cfg.schedule, warmup=cfg.warmup, final=cfg.final_lr)
        for group in optimizer.param_groups:
            group["lr"] = group_lr(group, lr, cfg.lr, step)
        with torch.autocast(device_type=dev_type, dtype=torch.bfloat16, enabled=bf16):
            logits = train_model(x)
            loss = loss_fn(logits.float(), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if ema is not None:
            ema.update(step + 1)
        counts.add(logits.detach().float(), y, loss.detach() * len(y))
        step += 1
        bar.update(1)
        if progress and (i % 10 == 0 or i == steps - 1):
            bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{lr:.3g}", refresh=False)
    bar.close()
    m = counts.all_reduce().metrics()
    m["lr"] = lr
    return m, step


def channels_last_enabled(cfg: TrainConfig, dev_type: str) -> bool:
    """The config's choice, else on for CUDA and off for CPU."""
    return cfg.channels_last if cfg.channels_last is not None else dev_type == "cuda"


def bf16_enabled(cfg: TrainConfig, dev_type: str) -> bool:
    """The config's choice, else on for CUDA and off for CPU."""
    return cfg.bf16 if cfg.bf16 is not None else dev_type == "cuda"


def make_optimizer(params, cfg: TrainConfig):
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.momentum > 0,
                               weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, betas=(cfg.momentum, 0.999), weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, betas=(cfg.momentum, 0.999), weight_decay=cfg.weight_decay)
    if cfg.optimizer == "muon":  # orthogonalised steps for the groups optim.param_groups marks orthogonal
        from cnnx.train.optim import Muon

        return Muon(params, lr=cfg.lr, momentum=cfg.momentum, nesterov=True, weight_decay=cfg.weight_decay)
    raise ValueError(f"unknown optimizer {cfg.optimizer!r}")


# --- distributed ----------------------------------------------------------------------------

@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    local_world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def dist_from_env() -> Dist:
    """torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE); one process otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    return Dist(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")),
                int(os.environ.get("LOCAL_WORLD_SIZE", str(world))))


def resolve_device(requested: str, d: Dist) -> str:
    cuda = torch.cuda.is_available()
    if requested == "cuda" and not cuda:
        raise ValueError("--device cuda: CUDA is not available on this machine (use --device cpu or auto)")
    if requested == "cuda" or (requested == "auto" and cuda):
        return f"cuda:{d.local_rank}"
    return "cpu"


def cpu_threads(cfg: TrainConfig, d: Dist) -> int:
    if cfg.threads:
        return cfg.threads
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return max(1, cores // d.local_world)


def timer_sync(device):
    if str(device).startswith("cuda"):
        torch.cuda.synchronize(device)
    return time.perf_counter()
