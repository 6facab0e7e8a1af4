"""The hyperparameters of `cnnx train`: one frozen dataclass of defaults (units beside each
value) and one dict of per-arch recipes that override them. Resolution order:
TrainConfig defaults < RECIPES[arch] < GPU_RECIPES[arch] (only when the device resolves to CUDA,
and not when fine-tuning) < FINETUNE_RECIPES[arch] (only when starting from weights) < what the
user passed on the command line. config.json's `recipe` names the recipes that were applied.

To change a recipe, edit RECIPES only; the CLI, checkpoints and config.json follow.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace

from cnnx.runtime.contract import DEVICES, MAX_INPUT_SIDE

OPTIMIZERS = ("sgd", "adamw", "adam", "muon")
SCHEDULES = ("onecycle", "cosine", "constant")
AUGMENTATIONS = ("crop", "flip", "cutout", "rrc")
CACHE_MODES = ("auto", "memory", "disk")
TTA_VIEWS = (1, 2, 6)  # zoo.TTA_VIEWS (this module imports no torch); a test keeps the two equal


@dataclass(frozen=True)
class TrainConfig:
    arch: str = "airnet"
    arch_kwargs: tuple = ()         # (name, value) pairs passed to the zoo constructor
    pretrained: bool = False        # torchvision ImageNet weights (from the local cache)
    data: str = "cifar10"           # "cifar10" or an image folder (absolute path once resolved)
    data_root: str | None = None    # where CIFAR-10 is looked for / downloaded; None = <cache>/datasets
    cache_dir: str | None = None    # decoded-tensor cache; None = $CNNX_CACHE or ~/.cache/cnnx
    image_size: int | None = None   # pixels (square); None = the arch's default (32 for CIFAR nets)
    val_fraction: float = 0.1       # share of each class held out when the data has no val split
    split_seed: int = 0             # seeds the held-out split only, so it stays fixed across runs
    epochs: int = 10                # passes over the training split
    batch_size: int = 512           # images per optimizer step, summed over all ranks
    lr: float = 0.1                 # peak learning rate (per step, loss averaged over the batch)
    optimizer: str = "sgd"          # sgd (Nesterov) | adamw | adam
    momentum: float = 0.9           # sgd momentum; adam(w) beta1
    weight_decay: float = 5e-4      # L2 (sgd, adam) or decoupled (adamw), per step, times lr
    label_smoothing: float = 0.0    # probability mass spread over the other classes
    schedule: str = "onecycle"      # lr as a function of the step: onecycle | cosine | constant
    warmup: float = 0.1             # fraction of all steps spent ramping lr up from 0 (linear)
    final_lr: float = 0.0           # lr at the last step, as a fraction of the peak
    aug: tuple = ("crop", "flip")   # whole-batch augmentations on the device
    crop_pad: int = 4               # pixels of reflect padding before the random crop
    cutout: int = 8                 # side in pixels of the square zeroed by "cutout"
    patience: int = 0               # epochs without a better val top-1 before stopping; 0 = never
    seed: int = 0                   # model init, batch order and augmentation
    eval_batch_size: int = 1024     # images per forward pass during evaluation
    device: str = "auto"            # auto (cuda when present) | cpu | cuda
    workers: int | None = None      # image-decoding processes; None = one per CPU core (max 8)
    threads: int | None = None      # torch CPU threads per process; None = cores / local ranks
    channels_last: bool | None = None  # memory format; None = on for CUDA, off for CPU (recipes turn it on where measured faster)
    bf16: bool | None = None        # bf16 autocast; None = on for CUDA, off for CPU
    compile: bool = False           # torch.compile the model (CUDA: faster after a warm-up)
    # Transfer learning (cnnx/train/finetune.py). The head = the tensors whose shape depends on num_classes.
    weights: str | None = None      # a cnnx checkpoint whose backbone tensors start the model (path)
    backbone_lr_mult: float = 1.0   # lr of the backbone's parameters / the scheduled lr (the head's)
    freeze_backbone_epochs: int = 0  # epochs at the start with the backbone frozen (no grads, BN in eval mode)
    # "rrc" (random-resized-crop, image folders): the training split is stored rrc_cache_scale x the
    # model's side (ImageNet's 256/224: the border the eval centre crop drops is there to crop from).
    rrc_scale: tuple = (0.25, 1.0)  # crop area as a fraction of the stored training image's area
    rrc_ratio: tuple = (3 / 4, 4 / 3)  # crop width / height, drawn log-uniformly
    rrc_cache_scale: float = 1.14   # side of a stored training image / the model's input side
    cache: str = "auto"             # decoded images: memory | disk (memory-mapped file) | auto (disk when
                                    # they would take more than a quarter of the available memory)
    # Frontier techniques (after airbench94 / airbench94_muon; cnnx/train/whiten.py, optim.py). Off by
    # default; recipes turn them on. See GPU_RECIPES for values that work together.
    whiten: bool = False            # first conv := PCA whitening of the training patches, filters frozen: decorrelated unit-variance inputs let every layer take large steps at once
    whiten_images: int = 5000       # training images (a seeded sample) whose patches estimate the covariance; more is slower, not better past a few thousand
    whiten_bias_epochs: float = 3.0  # epochs the whitening bias trains (its lr falling linearly to 0), fixed after: the first layer settles early
    dirac_init: bool = False        # identity (dirac) init of the later 3x3 convs: an implicit residual, so the deep stack starts as a shallow net
    head_std: float | None = None   # std of the head's initial weights; None = torch's (airbench: 1, with the logit scale 1/width in arch_kwargs)
    bn_scale_frozen: bool = False   # BatchNorm weights stay 1 (not trained): the next conv can scale anyway; fewer, better-conditioned parameters
    bn_bias_lr: float = 1.0         # lr of BatchNorm biases (and the whitening bias) / the scheduled lr; their weight decay is divided by it, so lr x decay stays the rest's
    muon_lr: float = 0.24           # --optimizer muon: step of the conv filters at the schedule's peak, relative to each filter tensor's norm (scale-free)
    muon_momentum: float = 0.6      # --optimizer muon: Nesterov momentum of the filters (the other groups use `momentum`)
    ema: float | None = None        # decay per optimizer step of a weight average that evaluation and best.pt use (None = off); averaging cancels the last steps' noise
    tta: int | None = None          # views per image at evaluation: 1 none, 2 mirror, 6 mirror x 1-px shifts (zoo.TTA_VIEWS); None = the arch's default (airnet: 2)
    recipe: str = ""                # which recipes were applied (set by resolve_config, kept in config.json): e.g. "airnet" or "airnet+gpu"

    def to_dict(self) -> dict:
        d = asdict(self)
        d["arch_kwargs"] = dict(self.arch_kwargs)
        d["aug"] = list(self.aug)
        d["rrc_scale"], d["rrc_ratio"] = list(self.rrc_scale), list(self.rrc_ratio)
        return d


# Per-arch recipes: only what differs from the defaults above. Tuned by benchmarks/recipe_*.py.
RECIPES: dict[str, dict] = {
    # Goal: >= 88% val top-1 on CIFAR-10 within 10 min of training on a 2-core CPU, with AirNet's
    # default widths. Measured by benchmarks/recipe_airnet.py (--epochs-sweep for the epoch count);
    # the figures are in benchmarks/results/ and the README's Results table.
    "airnet": dict(
        epochs=17, batch_size=512, lr=0.4, optimizer="sgd", weight_decay=5e-4,
        label_smoothing=0.2, schedule="onecycle", warmup=0.2, aug=("crop", "flip"), crop_pad=2,
        bf16=True, channels_last=True,
    ),
    # Goal: the tutorial's 69% val top-1 (its 3 Adam epochs) within 60 s of training on a 2-core
    # CPU; bf16 + channels_last for oneDNN's bf16 convolutions. Measured by benchmarks/recipe_seed_cnn.py.
    "seed-cnn": dict(
        epochs=3, batch_size=256, lr=0.05, optimizer="sgd", weight_decay=5e-4,
        label_smoothing=0.1, schedule="onecycle", warmup=0.15, aug=("flip",), bf16=True, channels_last=True,
    ),
    "seed-vgg": dict(
        epochs=30, batch_size=256, lr=0.05, optimizer="sgd", weight_decay=5e-4,
        label_smoothing=0.1, schedule="onecycle", warmup=0.15,
    ),
    "resnet18-cifar": dict(
        epochs=30, batch_size=256, lr=0.1, optimizer="sgd", weight_decay=5e-4,
        label_smoothing=0.1, schedule="onecycle", warmup=0.15,
    ),
    # eval_batch_size: a forward pass's activations at 224 px take megabytes an image (tens for
    # vgg16): the default 1024 of them would not fit most machines or GPUs
    "resnet18": dict(epochs=10, batch_size=128, lr=1e-3, optimizer="adamw", weight_decay=0.05, crop_pad=16,
                     eval_batch_size=256),
    "vgg16": dict(epochs=10, batch_size=64, lr=1e-3, optimizer="adamw", weight_decay=0.05, crop_pad=16,
                  eval_batch_size=64),
}

# Fine-tuning recipes of the ImageNet archs, applied over RECIPES[arch] when the run starts from
# weights (--pretrained or --weights): a head learning at the full lr over a backbone at a tenth of
# it, frozen for the first epoch so the fresh head's large early gradients do not wreck the
# pretrained features; random-resized-crop + flip at 224 px (the ImageNet training augmentation,
# scale range narrowed from 0.08 because users' folders are small and their objects large). Not
# tuned by a measurement yet: these are the field's usual starting values.
FINETUNE_RECIPES: dict[str, dict] = {
    "resnet18": dict(epochs=10, batch_size=64, lr=1e-3, optimizer="adamw", weight_decay=0.05, backbone_lr_mult=0.1,
                     freeze_backbone_epochs=1, aug=("rrc", "flip"), rrc_scale=(0.25, 1.0), schedule="cosine",
                     warmup=0.1),
    "vgg16": dict(epochs=10, batch_size=32, lr=5e-4, optimizer="adamw", weight_decay=0.05, backbone_lr_mult=0.1,
                  freeze_backbone_epochs=1, aug=("rrc", "flip"), rrc_scale=(0.25, 1.0), schedule="cosine",
                  warmup=0.1),
}
# Any other arch started from --weights (cnnx's own checkpoints): the whole network at the run's lr
# from the first step. On bench_transfer (airnet, animals -> vehicles, 3 seeds) it beat the ImageNet
# recipe's 0.1x backbone and frozen first epoch at every seed (results/bench_transfer.json runs both).
FINETUNE_DEFAULT = dict(backbone_lr_mult=1.0, freeze_backbone_epochs=0)

# GPU recipes: applied over RECIPES[arch] when the run's device resolves to CUDA (before training
# starts; config.json's `recipe` says "<arch>+gpu"). airnet: airbench94_muon's recipe (94.01% CIFAR-10
# test top-1 on 50,000 training images) in cnnx's units: its SGD lrs are per *summed* loss over 2,000
# images, cnnx's per mean loss, so lr = 0.67 x 2000 (the head), bn_bias_lr = 0.053 / 0.67, and weight
# decay = 0.004 / lr (its decay per step, lr x decay, is 0.004). 14 epochs of 22 steps on the 45,000-image
# split: the most that fits issue 7's 3 s of training on one H100, and more accurate there than airbench's
# 8 x 25 steps on 50,000 (benchmarks/gpu_train.py; results/gpu_train.json and gpu_train_9epochs.json).
GPU_RECIPES: dict[str, dict] = {
    "airnet": dict(
        arch_kwargs=(("widths", (64, 256, 256)), ("scale", 1 / 256), ("bn_eps", 1e-12), ("bn_momentum", 0.4)),
        epochs=14, batch_size=2000, optimizer="muon", lr=0.67 * 2000, momentum=0.85, weight_decay=0.004 / (0.67 * 2000),
        muon_lr=0.24, muon_momentum=0.6, bn_bias_lr=0.053 / 0.67, bn_scale_frozen=True, head_std=1.0,
        dirac_init=True, whiten=True, whiten_images=5000, whiten_bias_epochs=3.0, label_smoothing=0.2,
        schedule="onecycle", warmup=0.0, final_lr=0.0, aug=("crop", "flip"), crop_pad=2, tta=6,
        eval_batch_size=2000, bf16=True, channels_last=True, compile=True,
    ),
}

FIELD_NAMES = tuple(f.name for f in fields(TrainConfig))


class ConfigError(ValueError):
    pass


def resolve_config(arch: str, *, cuda: bool = False, **given) -> TrainConfig:
    """Defaults < RECIPES[arch] < GPU_RECIPES[arch] (when the run's device is CUDA: `cuda`) <
    `given` (None values mean "not given"). Unknown names and out-of-range values raise
    ConfigError with the valid choices."""
    unknown = sorted(set(given) - set(FIELD_NAMES))
    if unknown:
        raise ConfigError(f"unknown config name(s) {', '.join(unknown)}; valid: {', '.join(FIELD_NAMES)}")
    finetune = FINETUNE_RECIPES.get(arch, FINETUNE_DEFAULT) if given.get("pretrained") or given.get("weights") else {}
    gpu = GPU_RECIPES.get(arch, {}) if cuda and not finetune else {}
    recipe = "+".join([arch] * (arch in RECIPES) + ["gpu"] * bool(gpu) + ["finetune"] * bool(finetune))
    values = {**RECIPES.get(arch, {}), **gpu, **finetune, **{k: v for k, v in given.items() if v is not None},
              "arch": arch, "recipe": recipe}
    for k in ("aug", "arch_kwargs", "rrc_scale", "rrc_ratio"):
        if k in values and isinstance(values[k], (list, dict)):
            values[k] = tuple(values[k].items()) if isinstance(values[k], dict) else tuple(values[k])
    cfg = replace(TrainConfig(), **values)
    check_config(cfg)
    return cfg


def config_from_dict(d: dict) -> TrainConfig:
    """Rebuild a TrainConfig from config.json / a checkpoint's config (extra resolved keys ignored)."""
    values = {k: d[k] for k in FIELD_NAMES if k in d}
    defaults = TrainConfig()
    for k, v in values.items():  # a hand-edited config.json or last.pt: "2" where 2 belongs
        want = type(getattr(defaults, k))
        if want in (bool, int, float, str) and v is not None and not (
                isinstance(v, want) or (want is float and isinstance(v, int))) or (want is int and isinstance(v, bool)):
            what = {bool: "true or false", int: "whole number", float: "number", str: "text"}[want]
            raise ConfigError(f"--{k.replace('_', '-')}: the run's config holds {v!r:.40}, not a {what}")
    values["aug"] = tuple(values.get("aug", ()))
    values["arch_kwargs"] = tuple(dict(values.get("arch_kwargs", {})).items())
    for k in ("rrc_scale", "rrc_ratio"):
        if k in values:
            values[k] = tuple(values[k])
    cfg = replace(TrainConfig(), **values)
    check_config(cfg)
    return cfg


# Upper bounds of values no run needs more of: past them torch crashed (100,000 threads: a
# segfault), overflowed (an lr past float32's range), or a typo trained for ever.
MAX_EPOCHS = 100_000
MAX_BATCH = 1 << 20
MAX_THREADS = 1024
MAX_LR = 1e6


def check_config(c: TrainConfig) -> None:
    def bad(name, msg):
        raise ConfigError(f"--{name.replace('_', '-')}: {msg}")

    for f in fields(c):  # inf and NaN pass comparisons such as `< 0`, and train straight to NaN
        value = getattr(c, f.name)
        numbers = value if isinstance(value, tuple) else (value,)
        if any(isinstance(v, float) and not math.isfinite(v) for v in numbers):
            bad(f.name, f"must be a finite number, got {value}")
    if c.optimizer not in OPTIMIZERS:
        bad("optimizer", f"unknown {c.optimizer!r}; valid: {', '.join(OPTIMIZERS)}")
    if c.schedule not in SCHEDULES:
        bad("schedule", f"unknown {c.schedule!r}; valid: {', '.join(SCHEDULES)}")
    if c.device not in DEVICES:
        bad("device", f"unknown {c.device!r}; valid: {', '.join(DEVICES)}")
    for a in c.aug:
        if a not in AUGMENTATIONS:
            bad("aug", f"unknown augmentation {a!r}; valid: {', '.join(AUGMENTATIONS)} (or none)")
    if not 1 <= c.epochs <= MAX_EPOCHS:
        bad("epochs", f"must be 1 to {MAX_EPOCHS:,}, got {c.epochs}")
    if not 1 <= c.batch_size <= MAX_BATCH:
        bad("batch_size", f"must be 1 to {MAX_BATCH:,}, got {c.batch_size}")
    for name in ("seed", "split_seed"):  # torch and numpy take seeds below 2**63 (2**32 for numpy's legacy)
        if not 0 <= getattr(c, name) < 2**32:
            bad(name, f"must be 0 to {2**32 - 1}, got {getattr(c, name)}")
    if not c.lr <= MAX_LR:
        bad("lr", f"must be at most {MAX_LR:g}, got {c.lr}")
    if c.eval_batch_size < 1:
        bad("eval_batch_size", f"must be at least 1, got {c.eval_batch_size}")
    if not c.lr > 0:
        bad("lr", f"must be positive, got {c.lr}")
    if c.weight_decay < 0:
        bad("weight_decay", f"must be >= 0, got {c.weight_decay}")
    if not 0 <= c.label_smoothing < 1:
        bad("label_smoothing", f"must be in [0, 1), got {c.label_smoothing}")
    if not 0 <= c.warmup < 1:
        bad("warmup", f"must be a fraction in [0, 1), got {c.warmup}")
    if not 0 <= c.final_lr <= 1:
        bad("final_lr", f"must be a fraction in [0, 1], got {c.final_lr}")
    if not 0 < c.val_fraction < 1:
        bad("val_fraction", f"must be in (0, 1), got {c.val_fraction}")
    if c.patience < 0:
        bad("patience", f"must be >= 0, got {c.patience}")
    if c.crop_pad < 0 or c.cutout < 0:
        bad("crop_pad", "padding and cutout sizes must be >= 0")
    if c.crop_pad > MAX_INPUT_SIDE or c.cutout > MAX_INPUT_SIDE:
        bad("crop_pad", f"padding and cutout sizes must be at most {MAX_INPUT_SIDE}")
    if c.image_size is not None and not 8 <= c.image_size <= MAX_INPUT_SIDE:
        # above it: a decode cache of that size first, then a checkpoint no export takes
        bad("image_size", f"must be 8 to {MAX_INPUT_SIDE} pixels, got {c.image_size}")
    if c.workers is not None and c.workers < 0:
        bad("workers", f"must be >= 0, got {c.workers}")
    if c.threads is not None and not 1 <= c.threads <= MAX_THREADS:
        bad("threads", f"must be 1 to {MAX_THREADS}, got {c.threads}")
    check_transfer_config(c, bad)
    check_frontier_config(c, bad)


def check_frontier_config(c: TrainConfig, bad) -> None:
    """The whitening, init, BatchNorm, Muon, weight-average and test-time-view fields."""
    if c.ema is not None and not 0 < c.ema < 1:
        bad("ema", f"the weight average's decay per step must be in (0, 1), got {c.ema}")
    if c.tta is not None and c.tta not in TTA_VIEWS:
        bad("tta", f"views per image must be one of {', '.join(map(str, TTA_VIEWS))} "
                   f"(1 none, 2 mirror, 6 mirror x shifts), got {c.tta}")
    if c.whiten_images < 1:
        bad("whiten_images", f"must be at least 1, got {c.whiten_images}")
    if c.whiten_bias_epochs < 0:
        bad("whiten_bias_epochs", f"must be >= 0, got {c.whiten_bias_epochs}")
    if c.head_std is not None and not c.head_std > 0:
        bad("head_std", f"must be positive, got {c.head_std}")
    for name in ("bn_bias_lr", "muon_lr"):
        if not getattr(c, name) > 0:
            bad(name, f"must be positive, got {getattr(c, name)}")
    if not 0 <= c.muon_momentum < 1:
        bad("muon_momentum", f"must be in [0, 1), got {c.muon_momentum}")


def check_transfer_config(c: TrainConfig, bad) -> None:
    """The fine-tuning, random-resized-crop and cache fields."""
    if c.cache not in CACHE_MODES:
        bad("cache", f"unknown {c.cache!r}; valid: {', '.join(CACHE_MODES)}")
    if not c.backbone_lr_mult >= 0:
        bad("backbone_lr_mult", f"must be >= 0, got {c.backbone_lr_mult}")
    if c.freeze_backbone_epochs < 0:
        bad("freeze_backbone_epochs", f"must be >= 0, got {c.freeze_backbone_epochs}")
    if (c.weights or c.pretrained) and (c.optimizer == "muon" or c.whiten or c.bn_bias_lr != 1.0 or c.bn_scale_frozen):
        # Their parameter groups (frontier.wants_role_groups) replace the head/backbone groups:
        # the backbone would train at the full rate, and whitening would be overwritten.
        bad("weights" if c.weights else "pretrained",
            "fine-tuning keeps the backbone at --backbone-lr-mult with SGD/AdamW groups: it cannot be combined "
            "with --optimizer muon, --whiten or the BatchNorm recipe fields")
    if "rrc" in c.aug and "crop" in c.aug:
        bad("aug", "rrc and crop are two kinds of crop; choose one")
    lo, hi = c.rrc_scale
    if not 0 < lo <= hi <= 1:
        bad("rrc_scale", f"must be 0 < min <= max <= 1 (fractions of the area), got {lo}, {hi}")
    lo, hi = c.rrc_ratio
    if not 0 < lo <= hi:
        bad("rrc_ratio", f"must be 0 < min <= max (width / height), got {lo}, {hi}")
    if not c.rrc_cache_scale >= 1:
        bad("rrc_cache_scale", f"must be >= 1, got {c.rrc_cache_scale}")
