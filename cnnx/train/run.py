"""One training run from a resolved TrainConfig to a run directory (DESIGN.md "Run directory").

Only rank 0 writes files or talks; every rank trains its shard of each batch and joins the
all-reduce of the metrics, so all ranks take the same early-stopping decision.
"""

from __future__ import annotations

import csv
import io
import json
import os
import sys
import time
from pathlib import Path

import torch

from cnnx import __version__
from cnnx.train import loop
from cnnx.train.checkpoint import build_checkpoint, save_checkpoint
from cnnx.train.config import TrainConfig, config_from_dict
from cnnx.train.data import load_splits

METRIC_COLUMNS = ("epoch", "lr", "train_loss", "train_top1", "train_top5", "val_loss", "val_top1", "val_top5",
                  "seconds", "eval_seconds", "train_seconds_total")


def say(msg: str, d=None):
    if d is None or d.main:
        print(msg, file=sys.stderr, flush=True)


def _write_text_atomic(path: Path, text: str):
    tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
    with open(tmp, "w", newline="") as f:
        f.write(text)
    os.replace(tmp, path)


def write_csvs(run_dir: Path, history: list, class_names: list):
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(METRIC_COLUMNS)
    for r in history:
        w.writerow([r["epoch"]] + [f"{r[c]:.6g}" for c in METRIC_COLUMNS[1:]])
    _write_text_atomic(run_dir / "metrics.csv", buf.getvalue())
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["epoch", "split", "class", "top1"])
    for r in history:
        for split in ("train", "val"):
            for name, v in zip(class_names, r[f"{split}_per_class"]):
                w.writerow([r["epoch"], split, name, f"{v:.6g}"])
    _write_text_atomic(run_dir / "per_class.csv", buf.getvalue())


def resolved_config(cfg: TrainConfig, *, preprocess: dict, arch_kwargs: dict, extra: dict) -> dict:
    d = cfg.to_dict()
    d["arch_kwargs"] = dict(arch_kwargs)
    d["preprocess"] = preprocess
    d.update(extra)
    return d


def model_spec(cfg: TrainConfig):
    """(arch_kwargs stored in the checkpoint, preprocess spec) for this config."""
    import inspect

    from cnnx.runtime.preprocess import make_spec
    from cnnx.train.zoo import get_arch

    arch = get_arch(cfg.arch)
    size = cfg.image_size or arch.image_size
    if cfg.data == "cifar10":
        size = cfg.image_size or 32
    kwargs = dict(cfg.arch_kwargs)
    params = inspect.signature(arch.build).parameters
    if "image_size" in params:
        kwargs.setdefault("image_size", size)
    return kwargs, make_spec(size, arch.mean, arch.std)


def fit(cfg: TrainConfig, run_dir, *, resume: dict | None = None, stop_after: int | None = None,
        progress: bool = True) -> dict:
    """Train; write the run directory; return a summary dict (rank 0's view)."""
    from cnnx.train.zoo import Uint8Input, create_model

    d = loop.dist_from_env()
    run_dir = Path(run_dir)
    device = loop.resolve_device(cfg.device, d)
    if d.world > 1:
        import torch.distributed as dist

        if device.startswith("cuda"):
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    try:
        return _fit(cfg, run_dir, d, device, resume, stop_after, progress, Uint8Input, create_model)
    finally:
        if d.world > 1:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()


def _barrier(d):
    if d.world > 1:
        import torch.distributed as dist

        dist.barrier()


def _fit(cfg, run_dir, d, device, resume, stop_after, progress, Uint8Input, create_model):
    dev_type = torch.device(device).type
    torch.set_num_threads(loop.cpu_threads(cfg, d))
    bf16 = loop._bf16(cfg, dev_type)
    channels_last = loop._channels_last(cfg, dev_type)
    arch_kwargs, spec = model_spec(cfg)
    base = {"data": cfg.data, "data_root": cfg.data_root, "cache_dir": cfg.cache_dir, "preprocess": spec,
            "val_fraction": cfg.val_fraction, "split_seed": cfg.split_seed}

    # Rank 0 decodes (and caches) first; the others then read the cache instead of decoding too.
    if d.main:
        splits = load_splits(base, progress=progress, workers=cfg.workers)
    _barrier(d)
    if not d.main:
        splits = load_splits(base, progress=False, workers=cfg.workers)
    class_names = splits.class_names
    nc = len(class_names)
    say(f"data: {splits.source}", d)
    if splits.skipped:
        say(f"skipped {len(splits.skipped)} unreadable file(s):", d)
        for p, why in splits.skipped[:20]:
            say(f"  {p}: {why}", d)
        if len(splits.skipped) > 20:
            say(f"  ... and {len(splits.skipped) - 20} more (all listed in {run_dir / 'skipped.txt'})", d)
    xtr, ytr = splits.train
    xva, yva = splits.val
    if len(ytr) == 0 or len(yva) == 0:
        raise ValueError(f"not enough images to train and validate ({len(ytr)} train, {len(yva)} val)")

    config = resolved_config(cfg, preprocess=spec, arch_kwargs=arch_kwargs, extra={
        "num_classes": nc, "class_names": class_names, "world_size": d.world, "device_resolved": device,
        "cnnx_version": __version__, "train_images": len(ytr), "val_images": len(yva),
        "test_images": 0 if splits.test is None else len(splits.test[1]), "skipped_files": len(splits.skipped),
    })
    if d.main:
        run_dir.mkdir(parents=True, exist_ok=True)
        _write_text_atomic(run_dir / "config.json", json.dumps(config, indent=2) + "\n")
        if splits.skipped:
            _write_text_atomic(run_dir / "skipped.txt", "".join(f"{p}\t{r}\n" for p, r in splits.skipped))

    torch.manual_seed(cfg.seed)
    net = create_model(cfg.arch, nc, **arch_kwargs, **({"pretrained": True} if cfg.pretrained else {}))
    wrapped = Uint8Input(net, spec["mean"], spec["std"]).to(device)
    if channels_last:
        wrapped = wrapped.to(memory_format=torch.channels_last)
    optimizer = loop.make_optimizer(wrapped.parameters(), cfg)

    history, start_epoch, step = [], 0, 0
    best_top1, best_epoch, since_best = -1.0, 0, 0
    if resume is not None:
        net.load_state_dict(resume["state_dict"])
        optimizer.load_state_dict(resume["optimizer"])
        history = list(resume["history"])
        start_epoch = int(resume["epoch"])
        step = int(resume["scheduler"]["step"])
        best_top1, best_epoch = float(resume["best"]["top1"]), int(resume["best"]["epoch"])
        since_best = int(resume["best"]["since"])
        say(f"resuming {run_dir} after epoch {start_epoch} (step {step})", d)

    train_model = wrapped
    if d.world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        train_model = DDP(wrapped, device_ids=[torch.device(device).index] if dev_type == "cuda" else None)
    if cfg.compile:
        train_model = torch.compile(train_model)

    xtr, ytr = xtr.to(device), ytr.to(device)
    # Validation is sharded across ranks and its counts all-reduced.
    xva_r, yva_r = xva[d.rank::d.world].to(device), yva[d.rank::d.world].to(device)
    per_rank = max(1, cfg.batch_size // d.world)
    steps_per_epoch = max(1, (len(ytr) // d.world) // per_rank)
    total_steps = cfg.epochs * steps_per_epoch
    say(f"{cfg.arch}: {sum(p.numel() for p in net.parameters()):,} parameters on {device} x{d.world}, "
        f"{len(ytr)} train / {len(yva)} val images, {steps_per_epoch} steps/epoch, "
        f"threads {torch.get_num_threads()}, bf16 {bf16}, channels_last {channels_last}", d)

    train_total = history[-1]["train_seconds_total"] if history else 0.0
    stopped = None
    epoch = start_epoch
    for epoch in range(start_epoch, cfg.epochs):
        if stop_after is not None and epoch - start_epoch >= stop_after:
            stopped = f"stopped after {stop_after} epoch(s) as asked; continue with --resume {run_dir}"
            break
        torch.manual_seed(cfg.seed * 7919 + epoch)  # dropout etc.: a resumed epoch draws the same
        t0 = loop.timer_sync(device)
        tm, step = loop.train_one_epoch(train_model, optimizer, xtr, ytr, cfg=cfg, epoch=epoch, step=step,
                                        total_steps=total_steps, num_classes=nc, device=device, rank=d.rank,
                                        world=d.world, bf16=bf16, progress=progress and d.main)
        t1 = loop.timer_sync(device)
        # Evaluation in float32 always: the metrics describe the function that export and
        # `cnnx classify` run, and best.pt is chosen by them (bf16 is for training speed only).
        vm = loop._eval_counts(wrapped, xva_r, yva_r, nc, batch_size=cfg.eval_batch_size, device=device,
                               channels_last=channels_last).all_reduce().metrics()
        t2 = loop.timer_sync(device)
        train_total += t1 - t0
        row = {"epoch": epoch + 1, "lr": tm["lr"],
               "train_loss": tm["loss"], "train_top1": tm["top1"], "train_top5": tm["top5"],
               "val_loss": vm["loss"], "val_top1": vm["top1"], "val_top5": vm["top5"],
               "seconds": t1 - t0, "eval_seconds": t2 - t1, "train_seconds_total": train_total,
               "train_per_class": tm["per_class"], "val_per_class": vm["per_class"]}
        history.append(row)
        improved = vm["top1"] > best_top1
        if improved:
            best_top1, best_epoch, since_best = vm["top1"], epoch + 1, 0
        else:
            since_best += 1
        if d.main:
            metrics = {"val_top1": vm["top1"], "val_top5": vm["top5"], "val_loss": vm["loss"],
                       "train_top1": tm["top1"], "val_per_class": vm["per_class"], "val_confusion": vm["confusion"]}
            ckpt = build_checkpoint(model=net, arch=cfg.arch, arch_kwargs=arch_kwargs, class_names=class_names,
                                    preprocess=spec, epoch=epoch + 1, metrics=metrics, config=config)
            if improved:
                save_checkpoint(ckpt, run_dir / "best.pt")
            save_checkpoint({**ckpt, "optimizer": optimizer.state_dict(),
                             "scheduler": {"step": step, "total_steps": total_steps, "kind": cfg.schedule},
                             "scaler": {}, "rng": {"torch": torch.get_rng_state()},
                             "history": history, "best": {"top1": best_top1, "epoch": best_epoch, "since": since_best}},
                            run_dir / "last.pt")
            write_csvs(run_dir, history, class_names)
        say(f"epoch {epoch + 1}/{cfg.epochs}  train loss {tm['loss']:.4f} top1 {tm['top1']:.4f}  "
            f"val loss {vm['loss']:.4f} top1 {vm['top1']:.4f} top5 {vm['top5']:.4f}  lr {tm['lr']:.3g}  "
            f"{t1 - t0:.1f}s (+{t2 - t1:.1f}s eval){'  *best' if improved else ''}", d)
        if cfg.patience and since_best >= cfg.patience and epoch + 1 < cfg.epochs:
            stopped = (f"early stop: val top-1 has not improved for {cfg.patience} epoch(s) "
                       f"(best {best_top1:.4f} at epoch {best_epoch})")
            break
    if stopped:
        say(stopped, d)

    summary = {"run_dir": str(run_dir), "best": str(run_dir / "best.pt"), "best_val_top1": best_top1,
               "best_epoch": best_epoch, "epochs_run": len(history), "train_seconds": train_total,
               "stopped": stopped}
    # The test split (when the data has one) is used once, on the best checkpoint, at the end.
    if splits.test is not None and not (stopped and stopped.startswith("stopped after")) and history:
        from cnnx.train.checkpoint import load_checkpoint

        best = load_checkpoint(run_dir / "best.pt") if d.main else None
        if d.main:
            net.load_state_dict(best["state_dict"])
        if d.world > 1:  # every rank evaluates its shard with rank 0's best weights
            import torch.distributed as dist

            for t in wrapped.state_dict().values():
                dist.broadcast(t, 0)
        xt, yt = splits.test
        tm_ = loop._eval_counts(wrapped, xt[d.rank::d.world].to(device), yt[d.rank::d.world].to(device), nc,
                                batch_size=cfg.eval_batch_size, device=device,
                                channels_last=channels_last).all_reduce().metrics()
        summary["test"] = {k: tm_[k] for k in ("loss", "top1", "top5", "per_class", "n")}
        if d.main:
            _write_text_atomic(run_dir / "test_metrics.json", json.dumps(
                {"checkpoint": "best.pt", "epoch": best_epoch, **{k: tm_[k] for k in
                 ("loss", "top1", "top5", "per_class", "confusion", "n")}, "class_names": class_names}, indent=1))
        say(f"test split ({tm_['n']} images), best checkpoint: top1 {tm_['top1']:.4f} top5 {tm_['top5']:.4f}", d)
    if d.main and history:
        _write_plots(run_dir, history, class_names, summary)
    return summary


def _write_plots(run_dir: Path, history, class_names, summary):
    from cnnx.train import plots
    from cnnx.train.checkpoint import load_checkpoint

    t = time.perf_counter()
    folder = run_dir / "plots"
    plots.plot_curves(history, folder)
    best_row = next(r for r in history if r["epoch"] == summary["best_epoch"])
    plots.plot_per_class(class_names, best_row["train_per_class"], best_row["val_per_class"],
                         folder / "per_class.png", title=f"per-class top-1 (epoch {summary['best_epoch']})")
    best = load_checkpoint(run_dir / "best.pt")
    plots.plot_confusion(best["metrics"]["val_confusion"], class_names, folder / "confusion.png",
                         title=f"confusion matrix, val, best checkpoint (epoch {best['epoch']})")
    say(f"plots in {folder} ({time.perf_counter() - t:.1f}s)")


def resume_state(path) -> tuple[TrainConfig, dict]:
    """(config, last.pt dict) for --resume of a run folder or its last.pt."""
    from cnnx.train.checkpoint import load_checkpoint

    p = Path(path)
    if p.is_dir():
        p = p / "last.pt"
    ckpt = load_checkpoint(p)
    missing = [k for k in ("optimizer", "scheduler", "history", "best") if k not in ckpt]
    if missing:
        from cnnx.train.checkpoint import CheckpointError

        raise CheckpointError(f"{p} cannot be resumed: it lacks {missing} (resume from last.pt, not best.pt)")
    return config_from_dict(ckpt["config"]), ckpt
