"""`cnnx train` and `cnnx evaluate`: thin click commands over cnnx.train.run / loop.

This module is imported by `cnnx --help`, so it imports nothing heavy at module level:
torch and the training code are imported inside the command functions.
"""

from __future__ import annotations

import functools
import json
import os
import sys
import time
from pathlib import Path

import click

from cnnx.cli import RANK_0_GRACE_S, launch_rank, leave_it_to_rank_0
from cnnx.runtime.files import ends_as_terminated
from cnnx.train.config import AUGMENTATIONS, DEVICES, OPTIMIZERS, SCHEDULES, TrainConfig

RECIPE = "default: the arch's recipe (cnnx/train/config.py)"

# Options that are part of the run's config; on --resume only RESUMABLE may change.
EVAL_BATCH = 512  # cnnx evaluate's images per forward pass, unless the arch needs fewer
CONFIG_OPTIONS = ("arch", "pretrained", "data", "data_root", "cache_dir", "image_size", "val_fraction",
                  "split_seed", "epochs", "batch_size", "lr", "optimizer", "weight_decay", "label_smoothing",
                  "schedule", "warmup", "aug", "crop_pad", "patience", "seed", "device", "workers", "threads",
                  "channels_last", "bf16", "compile", "weights", "backbone_lr_mult", "freeze_backbone_epochs",
                  "rrc_scale", "rrc_ratio", "cache", "ema", "tta", "whiten", "whiten_images")
RESUMABLE = ("epochs", "patience", "device", "workers", "threads", "cache_dir", "data_root", "compile", "cache")


def _parse_aug(value):
    if value is None:
        return None
    items = [a.strip() for a in value.split(",") if a.strip()]
    if items == ["none"]:
        return ()
    if not items:  # "" or ",": say none to mean none
        raise click.BadParameter(f"give augmentations ({', '.join(AUGMENTATIONS)}) or none", param_hint="--aug")
    bad = [a for a in items if a not in AUGMENTATIONS]
    if bad:
        raise click.BadParameter(f"unknown augmentation {bad[0]!r}; valid: {', '.join(AUGMENTATIONS)} or none",
                                 param_hint="--aug")
    return tuple(dict.fromkeys(items))  # each once: flip,flip is flip


@click.command()
@click.option("--data", default="cifar10", show_default=True,
              help="'cifar10' (torchvision) or an image folder: DIR/<class>/* or DIR/{train,val,test}/<class>/*.")
@click.option("--data-root", type=click.Path(file_okay=False),
              help="Folder holding (or to download) CIFAR-10's cifar-10-batches-py; default <cache>/datasets.")
@click.option("--arch", default=TrainConfig.arch, show_default=True,
              help="Model from the zoo (an unknown name lists the valid ones).")
@click.option("--pretrained", is_flag=True, default=None,
              help="Start from torchvision's ImageNet weights (resnet18, vgg16; must be in the local cache offline).")
@click.option("--image-size", type=int, help="Input side in pixels for image folders; default the arch's (32 for CIFAR nets), "
                                                   "or with --weights the checkpoint's.")
@click.option("--epochs", type=int, help=f"Passes over the training split, in whole batches (a remainder smaller than a batch waits for a "
                   f"later epoch); {RECIPE}.")
@click.option("--batch-size", type=int, help=f"Images per optimizer step, over all processes; {RECIPE}.")
@click.option("--lr", type=float, help=f"Peak learning rate; {RECIPE}.")
@click.option("--optimizer", type=click.Choice(OPTIMIZERS), help=f"Optimizer (sgd is Nesterov; muon: orthogonalised steps for conv filters, Nesterov SGD for the rest); {RECIPE}.")
@click.option("--weight-decay", type=float, help=f"Weight decay; {RECIPE}.")
@click.option("--label-smoothing", type=float, help=f"Label smoothing in [0, 1); {RECIPE}.")
@click.option("--schedule", type=click.Choice(SCHEDULES), help=f"Learning-rate schedule after the warm-up; {RECIPE}.")
@click.option("--warmup", type=float, help=f"Fraction of all steps spent warming the lr up; {RECIPE}.")
@click.option("--aug", help=f"Comma list of batch augmentations from {', '.join(AUGMENTATIONS)}, or 'none'; {RECIPE}.")
@click.option("--crop-pad", type=int, help=f"Reflect padding in pixels for the random crop; {RECIPE}.")
@click.option("--patience", type=int, help="Stop after this many epochs without a better val top-1 (or the same with a lower "
                   "val loss; 0 = never).")
@click.option("--val-fraction", type=float, help="Share of each class held out for validation when the data has no val split (0.1).")
@click.option("--split-seed", type=int, help="Seed of the held-out split (0); keep it to compare runs on the same split.")
@click.option("--seed", type=int, help="Seed of model init, batch order and augmentation (0).")
@click.option("--device", type=click.Choice(DEVICES), help="Where to train: auto (CUDA when present), cpu or cuda.")
@click.option("--workers", type=int, help="Processes decoding image files (default one per CPU core, at most 8).")
@click.option("--threads", type=int, help="torch CPU threads per process (default: cores / processes on this node).")
@click.option("--channels-last/--no-channels-last", default=None, help="channels_last memory format (default: the arch's recipe, else on for CUDA and off for CPU).")
@click.option("--bf16/--no-bf16", default=None, help="bf16 autocast for training steps (default: the arch's recipe, else on for CUDA and off for CPU).")
@click.option("--compile", "compile_", is_flag=True, default=None, help="torch.compile the model (worth it on CUDA).")
@click.option("--cache-dir", type=click.Path(file_okay=False),
              help="Cache of decoded images (default $CNNX_CACHE, else $XDG_CACHE_HOME/cnnx or ~/.cache/cnnx).")
@click.option("--cache", type=click.Choice(("auto", "memory", "disk")),
              help="Decoded images in memory, or in a cache file read per batch (for data larger than "
                   "memory); auto: disk when they need more than a quarter of the available memory (loading "
                   "them takes twice that).")
@click.option("--weights", type=click.Path(dir_okay=False),
              help="Start from a cnnx checkpoint: every backbone tensor by name, a new head for this data's classes "
                   "(--arch defaults to the checkpoint's).")
@click.option("--backbone-lr-mult", type=float,
              help="Learning rate of the backbone relative to the head (e.g. 0.1). Default 1, except 0.1 for "
                   "resnet18 and vgg16 from ImageNet weights or --weights.")
@click.option("--freeze-backbone-epochs", type=int,
              help="Epochs at the start that train only the head (backbone frozen, its batch norm in eval mode); "
                   "needs --weights or --pretrained. Default 0, except 1 for resnet18 and vgg16 from weights.")
@click.option("--rrc-scale", type=float, nargs=2,
              help="Random-resized-crop (--aug rrc): min and max crop area, fractions of the stored image (0.25 1).")
@click.option("--rrc-ratio", type=float, nargs=2,
              help="Random-resized-crop: min and max crop width/height (0.75 1.333).")
@click.option("--ema", type=float,
              help="Evaluate (and keep in best.pt) an exponential moving average of the weights with this decay "
                   "per step, in (0, 1), e.g. 0.99; default: the arch's recipe (off).")
@click.option("--tta", type=int,
              help="Views per image when evaluating: 1 none, 2 mirror, 6 mirror x 1-px shifts (airnet); "
                   "stored in the checkpoint (cnnx export --tta can change it); default the arch's (2).")
@click.option("--whiten/--no-whiten", default=None,
              help="First conv initialised as a frozen PCA whitening of training patches (airnet; on in the GPU recipe).")
@click.option("--whiten-images", type=int, help="Training images sampled for the whitening covariance (5000).")
@click.option("--out", default="runs", show_default=True, type=click.Path(file_okay=False), help="Folder of run folders.")
@click.option("--name", help="Run folder name under --out (default <arch>-<date>-<time>).")
@click.option("--resume", type=click.Path(), help="Continue a run exactly from its folder or its last.pt.")
@click.option("--stop-after", type=click.IntRange(min=1),
              help="Stop after this many epochs of this invocation (the schedule still plans --epochs); resume later.")
@click.option("--quiet", is_flag=True, help="No progress bars (the per-epoch lines stay).")
@click.pass_context
@ends_as_terminated
def train(ctx, out, name, resume, stop_after, quiet, compile_, aug, **opts):
    """Train a CNN; keep the best checkpoint, curves and per-class accuracy under OUT/NAME/.

    Writes best.pt, last.pt, metrics.csv, per_class.csv, config.json, report.html and plots/*.png.
    Under `torchrun --nproc-per-node N -m cnnx train ...` each process trains a shard and only rank 0 writes.
    """
    import contextlib

    from cnnx.runtime.files import first_line, os_error_line
    from cnnx.runtime.preprocess import SpecError
    from cnnx.train.checkpoint import CheckpointError
    from cnnx.train.config import ConfigError
    from cnnx.train.data import DataError
    from cnnx.train.run import EveryRankAlike, PeerStopped, RunFolderError, fit, reserve_run_dir
    from cnnx.train.zoo import UnknownArch

    opts["compile"] = compile_
    opts["aug"] = _parse_aug(aug)
    for k in ("data_root", "cache_dir"):  # stored in the run's config: a --resume from another folder finds them
        if opts.get(k):
            opts[k] = str(Path(opts[k]).expanduser().resolve())
    given = {k for k in CONFIG_OPTIONS
             if ctx.get_parameter_source(k if k != "compile" else "compile_") == click.core.ParameterSource.COMMANDLINE}
    if resume == "":  # falsy: it started a new run
        raise click.UsageError("--resume needs a run folder (or its last.pt)")
    placed = [f"--{p}" for p in ("out", "name") if ctx.get_parameter_source(p) == click.core.ParameterSource.COMMANDLINE]
    # --out alone: the command that began a run with a default name, if --out is the run's parent.
    if resume and placed and not _same_folder(Path(out) / (name or _run_folder(resume).name), resume):
        # they were ignored: the run went on in its own folder, the user looking elsewhere
        raise click.UsageError(f"--resume continues the run in its own folder; {' and '.join(placed)} "
                               f"{'does' if len(placed) == 1 else 'do'} not apply")
    try:
        with contextlib.ExitStack() as held:
            if resume:
                run_dir, given = _resume_dir(resume, given, opts)
                if launch_rank() == 0:  # the folder is rank 0's: one writer, and never beside a live run
                    held.enter_context(reserve_run_dir(run_dir, resume=True))
                cfg, resume_ckpt, end_only = _resume_config(resume, run_dir, given, opts)
            else:
                cfg, run_dir = _new_run_config(opts, out, name, arch_given="arch" in given)
                resume_ckpt, end_only = None, False
                if launch_rank() == 0:  # a default name taken (two runs in one second): NAME-2, ...
                    run_dir = held.enter_context(reserve_run_dir(run_dir, resume=False, unique=not name)).run_dir
            summary = fit(cfg, run_dir, resume=resume_ckpt, stop_after=stop_after, progress=not quiet,
                          end_only=end_only)
    except ConfigError as e:
        raise click.UsageError(str(e)) from None
    except (CheckpointError, DataError, RunFolderError, UnknownArch, SpecError) as e:
        raise click.ClickException(first_line(e)) from None
    except OSError as e:  # a full disk (ENOSPC), a read-only or vanished --out: every write is atomic
        raise click.ClickException(os_error_line(e)) from None
    except ValueError as e:  # device/config combinations only known at run time (e.g. --device cuda without CUDA)
        if isinstance(e, EveryRankAlike) and launch_rank() != 0:
            leave_it_to_rank_0(1)
        raise click.ClickException(first_line(e)) from None
    except PeerStopped as e:  # under torchrun: another process failed first and said why
        if e.peer == 0 and e.how == "error":  # rank 0's own line first (it writes, cleans up, then says it)
            time.sleep(RANK_0_GRACE_S)
        raise click.ClickException(str(e)) from None
    if launch_rank() == 0:
        line = (f"best val top-1 {summary['best_val_top1']:.4f} at epoch {summary['best_epoch']} "
                f"({summary['epochs_run']} epochs, {summary['train_seconds']:.1f}s training)")
        if "test" in summary:
            line += f"; test top-1 {summary['test']['top1']:.4f}"
        click.echo(f"{summary['best']}\t{line}")


def _option_names(names) -> str:
    return ", ".join("--" + c.replace("_", "-") for c in names)


def _resume_dir(resume, given, opts) -> tuple:
    """(the run's folder, the options given that --resume applies): those of RESUMABLE, as the
    others may only be given with the run's own values (the command that started the run, with
    --resume added, continues it)."""
    folder = _run_folder(resume)
    if not folder.is_dir():
        raise click.ClickException(f"run folder not found: {folder}")
    if not ((folder / "last.pt").is_file() or (folder / "config.json").is_file()):
        # checked before the folder is reserved: a lock file must not be left in a user's folder
        if Path(resume).is_file():  # a stray file: what is missing is a run around it
            raise click.ClickException(f"--resume {resume}: not in a run's folder (no last.pt, no config.json beside "
                                       "it); name a run's folder or its last.pt")
        raise click.ClickException(
            f"{folder} holds no last.pt and no config.json: not a run to continue, or one stopped before training "
            f"began; start it again with the same cnnx train options and --name (the folder is reused)")
    fixed = given - set(RESUMABLE)
    run_config = _run_config(folder) if fixed else {}
    same = {k for k in fixed if k in run_config and _normalised(k, opts[k]) == _normalised(k, run_config[k])}
    changed = sorted(fixed - same)
    if "data" in changed and _data_moved(run_config, opts["data"]):
        changed.remove("data")  # applied as a resumable option; fit checks its files are the run's
        if launch_rank() == 0:
            from cnnx.train.run import say

            say(f"note: the run's data folder {run_config['data']} is not there: continuing on {opts['data']} if "
                "its files are the run's")
    if changed:
        raise click.UsageError(f"--resume continues the run's own config; cannot change {_option_names(changed)} "
                               f"(only {_option_names(RESUMABLE)})")
    return folder, given - same


def _data_moved(run_config: dict, data) -> bool:
    """Whether a --resume's --data names where the run's data folder went: the folder its
    config names is gone, and the run recorded its files by their paths in the folder (so a
    folder elsewhere can be checked to hold them: run.check_same_data)."""
    began = run_config.get("data")
    if not isinstance(began, str) or "cifar10" in (began, data) or "val_relpaths_sha256" not in run_config:
        return False
    return not os.path.exists(os.path.expanduser(began))


def _run_folder(resume) -> Path:
    """The folder --resume names: the folder itself, or the one holding the last.pt given."""
    path = Path(resume)
    return path.parent if path.is_file() else path


def _same_folder(run_dir: Path, resume) -> bool:
    """Whether --out/--name name the folder --resume continues (the command that started the
    run, with --resume added)."""
    return run_dir.resolve() == _run_folder(resume).resolve()


PATH_OPTIONS = ("data", "weights")  # resolved to absolute paths in a run's config


def _run_config(folder: Path) -> dict:
    import json

    try:
        return json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return {}


def _normalised(key: str, value):
    """An option's value as a run's config.json holds it (lists for tuples, absolute paths)."""
    import json

    if key in PATH_OPTIONS and isinstance(value, str) and value != "cifar10":
        return str(Path(value).expanduser().resolve())
    return json.loads(json.dumps(value))


def _resume_config(resume, folder: Path, given, opts):
    """(config, last.pt or None, end_only) of the run in `folder` to continue, with the
    RESUMABLE options given now. end_only: it has ended, and only what a kill after its last
    checkpoint left unwritten is to be written (run.unwritten_end)."""
    from dataclasses import replace

    from cnnx.train.config import check_config
    from cnnx.train.run import resume_state, say, unwritten_end

    began, ckpt = resume_state(resume)
    cfg = replace(began, **{k: _normalised(k, opts[k]) if k in PATH_OPTIONS else opts[k] for k in given})
    check_config(cfg)
    if ckpt is None:
        if launch_rank() == 0:
            say(f"{resume} has no last.pt (its run was stopped before its first epoch ended): "
                f"training it again from epoch 1 with its config.json")
        return cfg, ckpt, False
    done, since = ckpt["epoch"], ckpt["best"]["since"]
    early = bool(began.patience and since >= began.patience)  # it stopped early
    # Not asked to train further: the values that end a run are its own (the command that began
    # it, --resume added, gives them again).
    further = {k for k in ("epochs", "patience") if k in given and getattr(cfg, k) != getattr(began, k)}
    if (done >= began.epochs or early) and not further:
        left = unwritten_end(folder, ckpt["config"])
        if left:  # stopped after its last checkpoint: what comes after it is written now
            if launch_rank() == 0:
                say(f"{resume} has ended but was stopped before it wrote {', '.join(left)}: writing them "
                    f"(no more training)")
            return cfg, ckpt, True
    if done >= cfg.epochs:
        raise click.UsageError(f"{resume} has trained {done} epochs, as many as --epochs {cfg.epochs} asks; "
                               f"pass a larger --epochs to train further")
    if early and cfg.patience and since >= cfg.patience:  # it would stop again after one epoch
        raise click.UsageError(f"{resume} stopped early after epoch {done}: val top-1 had not improved (nor its loss) for {since} "
                               f"epoch(s) (--patience {began.patience}); pass a --patience above {since}, "
                               f"or --patience 0 for none, to train further")
    return cfg, ckpt, False


def _new_run_config(opts, out, name, arch_given=True):
    """(config, run folder) of a new run from the command line's options."""
    from cnnx.train.config import resolve_config
    from cnnx.train.zoo import ARCHS

    if opts.get("weights") == "":
        raise click.UsageError("--weights needs a checkpoint file")
    if out == "":
        raise click.UsageError("--out needs a folder name")
    if opts.get("weights"):
        if opts.get("pretrained"):
            raise click.UsageError("--weights and --pretrained both say where the model starts; pass one")
        opts["weights"] = str(Path(opts["weights"]).expanduser().resolve())
        from cnnx.train.checkpoint import load_checkpoint

        source = load_checkpoint(opts["weights"])
        if not arch_given:
            opts["arch"] = source["arch"]
        h, w = source["preprocess"]["size"]
        if opts["arch"] == source["arch"]:
            # The backbone's own shape: its widths (a GPU recipe's airnet is wider than the CPU
            # one) and views at any size; its own size too unless --image-size asks for another,
            # where what follows the side is not kept (seed-cnn's dense layer: the load then
            # names the tensor that does not fit).
            kwargs = dict(source["arch_kwargs"])
            if h == w and opts.get("image_size") in (None, h):
                opts["image_size"] = h
            else:
                kwargs.pop("image_size", None)
            opts["arch_kwargs"] = kwargs
    elif (opts.get("freeze_backbone_epochs") or 0) > 0 and not opts.get("pretrained"):  # froze random weights
        raise click.UsageError("--freeze-backbone-epochs holds a backbone that starts from weights: "
                               "pass --weights or --pretrained")
    for k in ("rrc_scale", "rrc_ratio"):
        if not opts.get(k):  # click gives () for an absent nargs=2 option
            opts[k] = None

    if opts["arch"] not in ARCHS:
        raise click.BadParameter(f"unknown arch {opts['arch']!r}; valid: {', '.join(ARCHS)}", param_hint="--arch")
    data = opts["data"]
    if data != "cifar10":
        p = Path(data).expanduser()
        if not p.exists():
            raise click.BadParameter(f"no such folder: {data} (or pass --data cifar10)", param_hint="--data")
        if not p.is_dir():
            raise click.BadParameter(f"not a folder: {data}", param_hint="--data")
        opts["data"] = str(p.resolve())
    if opts.get("pretrained"):
        import inspect

        if "pretrained" not in inspect.signature(ARCHS[opts["arch"]].build).parameters:
            able = [n for n, a in ARCHS.items() if "pretrained" in inspect.signature(a.build).parameters]
            raise click.BadParameter(f"{opts['arch']} has no pretrained weights; archs that do: {', '.join(able)}",
                                     param_hint="--pretrained")
    arch = opts.pop("arch")
    cfg = resolve_config(arch, cuda=_runs_on_cuda(opts.get("device")), **opts)
    if name == "":
        raise click.UsageError("--name needs a folder name (leave it out for <arch>-<date>-<time>)")
    if name is None:
        name = f"{arch}-{time.strftime('%Y%m%d-%H%M%S')}"
    if "/" in name or name in (".", ".."):
        raise click.BadParameter(f"must be a plain folder name, got {name!r}", param_hint="--name")
    return cfg, Path(out) / name


def _runs_on_cuda(device) -> bool:
    """Whether the run will train on CUDA (config.GPU_RECIPES apply), decided as fit's
    loop.resolve_device will decide it."""
    if device == "cpu":
        return False
    if device == "cuda":
        return True
    import torch

    return torch.cuda.is_available()


def _pick_split(layout, split, data, ckpt) -> tuple:
    """(the split's name, its folder, its listing where this made it, else None): --split's, else
    test, else val; ("all", DIR, None) for a flat DIR, ("held-out", DIR, ...) for --split val of
    the flat DIR the checkpoint's run held images out of."""
    if "all" in layout:
        if split == "val" and _trained_on(ckpt, layout["all"]) == "all":
            return "held-out", layout["all"], None
        listing = _listing_if_it_may_be_the_runs(ckpt, layout["all"]) if split == "val" else None
        if listing is not None:  # a folder elsewhere: _held_out_part checks its files are the run's
            return "held-out", layout["all"], listing
        if split:
            raise click.BadParameter(f"{data} has no train/val/test folders"
                                     + (" (--split val: the images a run held out of the folder it trained on)"
                                        if split == "val" else ""), param_hint="--split")
        return "all", layout["all"], None
    if split:
        if split not in layout:
            raise click.BadParameter(f"{data} has no {split}/ folder (it has {', '.join(sorted(layout))})",
                                     param_hint="--split")
        return split, layout[split], None
    for s in ("test", "val"):
        if s in layout:
            return s, layout[s], None
    raise click.BadParameter(f"{data} has only {', '.join(sorted(layout))}/; pass --split train to evaluate on it",
                             param_hint="--split")


@click.command()
@click.argument("checkpoint", type=click.Path())
@click.option("--data", required=True, type=click.Path(), help="Labelled image folder: DIR/<class>/* or DIR/{train,val,test}/<class>/*.")
@click.option("--split", type=click.Choice(("train", "val", "test")), help="Which split of a DIR/{train,val,test} folder (default test, else val); val of the "
                   "flat DIR the checkpoint's run trained on: the images it held out.")
@click.option("--batch-size", type=click.IntRange(min=1),
              help=f"Images per forward pass [default: {EVAL_BATCH}, or the arch recipe's evaluation batch where "
                   f"smaller (vgg16 64, resnet18 256: their activations at 224 px)].")
@click.option("--device", default="auto", show_default=True, type=click.Choice(DEVICES), help="Where to run the model.")
@click.option("--workers", type=click.IntRange(min=0), help="Processes decoding image files (default one per core, at most 8).")
@click.option("--cache-dir", type=click.Path(file_okay=False), help="Cache of decoded images (default as for cnnx train).")
@click.option("--cache", default="auto", show_default=True, type=click.Choice(("auto", "memory", "disk")),
              help="Decoded images in memory, or in a cache file read per batch (a folder larger than "
                   "memory), as for cnnx train.")
@click.option("--plot", type=click.Path(dir_okay=False),
              help="Confusion-matrix PNG to write (default <checkpoint folder>/confusion_<data name>.png; "
                   "<data name>-<split> for a split folder such as test/).")
@click.option("--json", "as_json", is_flag=True, help="Print the metrics as one JSON object instead of a table.")
@click.option("--report", type=click.Path(dir_okay=False),
              help="Also write one self-contained HTML page: per-class, confusion and the image galleries.")
@ends_as_terminated
def evaluate(checkpoint, data, split, batch_size, device, workers, cache_dir, cache, plot, as_json, report):
    """Top-1, top-5, per-class accuracy and confusion matrix of CHECKPOINT on a labelled image folder."""
    from cnnx.runtime.files import first_line, os_error_line, printable
    from cnnx.runtime.preprocess import SpecError
    from cnnx.train import loop
    from cnnx.train.checkpoint import CheckpointError
    from cnnx.train.data import DataError

    _check_evaluation_files(checkpoint, report, plot)
    try:
        ev = _evaluate(checkpoint, data, split, batch_size, device, workers, cache_dir, cache, keep_probs=bool(report))
    except (CheckpointError, DataError, SpecError) as e:
        raise click.ClickException(first_line(e)) from None
    except OSError as e:
        raise click.ClickException(os_error_line(e)) from None
    m, names = ev["metrics"], ev["class_names"]
    if not as_json:  # the figures first, whatever becomes of the files (the JSON names the plot written)
        click.echo(f"images\t{m['n']}\ntop1\t{m['top1']:.4f}\ntop5\t{m['top5']:.4f}\nloss\t{m['loss']:.4f}")
        for c, v in zip(names, m["per_class"]):  # a class name is anyone's folder name: no escape sequences
            click.echo(f"top1[{printable(c)}]\t{'-' if v != v else f'{v:.4f}'}")
        sys.stdout.flush()
    plot_path, why_not = _write_evaluation_files(ev, checkpoint, plot, report)
    if as_json:
        click.echo(json.dumps({"checkpoint": str(checkpoint), "data": str(ev["folder"]), "n": m["n"], "loss": m["loss"],
                               "top1": m["top1"], "top5": m["top5"],
                               "per_class": dict(zip(names, loop.per_class_json(m["per_class"]))),
                               "confusion": m["confusion"], "class_names": names, "skipped": len(ev["data"].skipped),
                               "trained_on": ev["trained_on"] is not None, "split": ev["split"],
                               "plot": None if plot_path in why_not else str(plot_path)}))
        sys.stdout.flush()
    if plot is None and plot_path in why_not:
        click.echo(f"warning: no confusion plot: {why_not.pop(plot_path)} (pass --plot FILE)", err=True)
    elif plot_path not in why_not:
        click.echo(printable(f"confusion matrix: {plot_path}"), err=True)
    if report and report not in why_not:
        click.echo(f"report: {report}", err=True)
    if why_not:
        raise click.ClickException(f"cannot write: {'; '.join(why_not.values())}")  # each file not written


def _write_evaluation_files(ev: dict, checkpoint, plot, report) -> tuple[Path, dict]:
    """The plot (--plot, else the default beside the checkpoint) and the --report page, after
    the evaluation: (the plot's path, {file: one line of why it was not written}). The caller
    prints the figures before, whatever becomes of the files (--json's, which name the plot,
    after); the default plot is a courtesy, never written over a file that is not a plot."""
    from cnnx.runtime.files import os_error_line, remove_stale_temps_beside
    from cnnx.train.data import SPLIT_FOLDERS

    folder = Path(ev["folder"]).resolve()
    # a split folder by its data folder's name too: siteA/test and siteB/test shared one plot, the
    # second evaluation replacing the first's
    folder_name = f"{folder.parent.name}-{folder.name}" if folder.name.lower() in SPLIT_FOLDERS else folder.name
    if ev["split"] == "held-out":  # the images its run held out of the folder, not the whole folder's plot
        folder_name += "-val"
    scored = _scored_digest(folder, ev["split"])
    plot_path = Path(plot) if plot else _default_plot_path(Path(checkpoint).resolve().parent, folder_name, scored)
    why_not = {}
    if plot is None:
        why = _not_replaceable("--plot", plot_path, checkpoint)
        if why is not None:
            why_not[plot_path] = f"{plot_path} {why}"
    # a name the user gave is written through a symlink; the default plot's, cnnx's own, is not
    write_plot = functools.partial(_write_plot, scored=scored)
    for path, write, named in ((plot_path, write_plot, plot is not None), (report, _write_evaluation_report, True)):
        if path is not None and path not in why_not:
            try:
                remove_stale_temps_beside(path)
                write(ev, checkpoint, path, through_symlink=named)
            except OSError as e:
                why_not[path] = os_error_line(e, path)
    return plot_path, why_not


def _not_replaceable(label: str, path, checkpoint) -> str | None:
    """Why evaluate's --report or --plot file cannot be written (None: it can): the page
    replaces only a page cnnx wrote, the plot only a PNG (an earlier evaluation's)."""
    from cnnx.report import report_replaceable
    from cnnx.runtime.preprocess import PNG_SIGNATURE

    if os.path.realpath(path) == os.path.realpath(checkpoint):
        return "is the checkpoint"
    if not os.path.isdir(os.path.dirname(os.path.abspath(path))):
        return f"has no folder {os.path.dirname(os.path.abspath(path))} to go in"
    if label == "--report":
        return report_replaceable(path)
    if os.path.lexists(path):
        if not os.path.isfile(path):
            return "exists and is not a regular file"
        with open(path, "rb") as f:
            if f.read(len(PNG_SIGNATURE)) != PNG_SIGNATURE:
                return "exists and is not a PNG image (a plot would replace it)"
    return None


def _check_evaluation_files(checkpoint, report, plot):
    """Before the evaluation (the files are written after it, over what is there): --report
    replaces only a page cnnx wrote, --plot only a PNG (a plot of an earlier evaluation); neither
    is the checkpoint or the other, and each has a folder to go in. UsageError otherwise."""
    for label, path in (("--report", report), ("--plot", plot)):
        if path is None:
            continue
        if path == "":
            raise click.UsageError(f"{label} needs a file name")
        why = _not_replaceable(label, path, checkpoint)
        if why is not None:
            raise click.UsageError(f"{label} {path} {why}: remove it or name another file")
    if report and plot and os.path.realpath(report) == os.path.realpath(plot):
        raise click.UsageError("--report and --plot must be different files")


def _evaluate(checkpoint, data, split, batch_size, device, workers, cache_dir, cache_mode, *, keep_probs) -> dict:
    """Load, decode, run: {"ckpt", "folder", "data", "labels", "class_names", "metrics", "trained_on",
    "trained_note" (what the console says of it, for the report too)}."""
    import torch

    from cnnx.runtime.files import escaped_name, name_text, names_line, printable
    from cnnx.train import loop
    from cnnx.train.checkpoint import load_checkpoint, model_from_checkpoint
    from cnnx.train.data import class_folders, folder_layout, ignored_line, load_image_folder, respelt_note

    ckpt = load_checkpoint(checkpoint)
    model = model_from_checkpoint(ckpt)
    layout = folder_layout(data)
    picked, folder, listing = _pick_split(layout, split, data, ckpt)
    if split is None and picked != "all":  # which split the figures are of: not only in --json
        click.echo(f"note: scoring {folder}, the {picked} split (--split picks another)", err=True)
    names = list(ckpt["class_names"])
    # from the class folders' names, before minutes of decoding (load_image_folder's classes)
    unknown = [name for name in (name_text(f.name) for f in class_folders(folder)) if name not in names]
    if unknown:
        raise click.ClickException(f"{folder} has classes the checkpoint does not know: {names_line(unknown, 10)}"
                                   f" (it knows: {names_line(names)})"
                                   f"{respelt_note(unknown, names, 'the checkpoint')}")
    d = load_image_folder(folder, ckpt["preprocess"], progress=True, cache=cache_dir, workers=workers,
                          cache_mode=cache_mode, listing=listing)
    if picked == "held-out":
        d = _held_out_part(d, ckpt["config"], folder)
    trained_on = None if picked == "held-out" else _trained_on(ckpt, folder)
    if trained_on is None and picked == "all" and _held_out_recorded(ckpt) and _holds_the_runs_files(d, ckpt, folder):
        trained_on = "all"  # the folder it trained on, moved or copied elsewhere
    trained_note = None
    if trained_on:
        config = ckpt["config"]
        held_out = ("its validation images were in val/" if trained_on == "train" and _has_val(Path(folder).parent)
                    else f"the run held out {config.get('val_images', 'some')} of its images for validation")
        trained_note = (f"{escaped_name(folder)} is the folder this model was trained on: these figures include its "
                        f"{config.get('train_images', 'training')} training images ({held_out}; the validation "
                        f"figures are in its metrics.csv)")
        click.echo(printable(f"note: {trained_note}"), err=True)
    for note in d.notes:
        click.echo(printable(f"note: {note}"), err=True)
    if d.ignored:  # as cnnx train says it of the same folder
        click.echo(ignored_line(d.ignored), err=True)
    if d.skipped:
        click.echo(f"skipped {len(d.skipped)} file(s):", err=True)
        for p, why in d.skipped[:20]:
            click.echo(f"  {printable(f'{p}: {why}')}", err=True)
        if len(d.skipped) > 20:
            click.echo(f"  ... and {len(d.skipped) - 20} more", err=True)
    if len(d.labels) == 0:
        raise click.ClickException(f"no readable images in {folder}")
    labels = torch.tensor([names.index(c) for c in d.class_names])[d.labels]
    try:
        dev = loop.resolve_device(device, loop.Dist())
    except ValueError as e:
        raise click.UsageError(str(e)) from None
    spec = ckpt["preprocess"]
    batch_size = batch_size or _evaluation_batch(ckpt["arch"])
    try:
        m = loop.evaluate(model, d.images, labels, mean=spec["mean"], std=spec["std"], batch_size=batch_size,
                          device=dev, num_classes=len(names), keep_probs=keep_probs)
    except torch.OutOfMemoryError:  # CUDA's allocator
        raise click.ClickException(f"out of GPU memory on {dev} at --batch-size {batch_size}: a smaller "
                                   "--batch-size") from None
    if m["nonfinite"]:
        raise click.ClickException(f"{checkpoint} gives non-finite outputs (NaN or inf) for {m['nonfinite']} of "
                                   f"{m['n']} images: its weights are broken; no metrics")
    return {"ckpt": ckpt, "folder": folder, "data": d, "labels": labels, "class_names": names, "metrics": m,
            "trained_on": trained_on, "trained_note": trained_note, "split": picked}


def _evaluation_batch(arch: str) -> int:
    """EVAL_BATCH, or the arch recipe's evaluation batch where smaller (activations at 224 px)."""
    from cnnx.train.config import resolve_config

    try:
        return min(EVAL_BATCH, resolve_config(arch).eval_batch_size)
    except ValueError:  # an arch this cnnx does not know: model_from_checkpoint said so already
        return EVAL_BATCH


def _held_out_part(d, config: dict, folder):
    """The images of `d` (the run's whole folder) that its run held out for validation, as the
    run split them: ClickException where they are not the files the run recorded (files added,
    removed or renamed since; or a run of a cnnx before it recorded them)."""
    from dataclasses import replace

    from cnnx.train.cache import take
    from cnnx.train.data import identical_files, run_split
    from cnnx.train.run import held_out_changed

    _, va = run_split(config, d.labels, folder, d.paths, identical_files(d.paths))
    paths = [d.paths[i] for i in va.tolist()]
    if held_out_changed(config, paths, folder) is not None:
        raise click.ClickException(f"{folder}: the images its run held out cannot be told again (not the folder it "
                                   f"trained on, files added, removed or renamed since the run, or a run of an older "
                                   f"cnnx): evaluate a folder of images it never saw")
    return replace(d, images=take(d.images, va), labels=d.labels[va], paths=paths)


def _held_out_recorded(ckpt: dict) -> bool:
    """Whether the checkpoint's run recorded its held-out files by their paths in the folder
    (a folder elsewhere can then be checked to be the run's, moved or copied)."""
    config = ckpt.get("config")
    return isinstance(config, dict) and isinstance(config.get("val_relpaths_sha256"), str)


def _listing_if_it_may_be_the_runs(ckpt: dict, folder):
    """The listing of a flat folder other than the one the checkpoint's run names, where it may
    be that folder moved or copied (_holds_the_runs_files tells, once it is decoded: the listing
    is its, not made twice), else None: the run recorded its files by their paths in it, and the
    folder lists at least as many image files as the run used."""
    from cnnx.train.data import list_image_folder

    if not _held_out_recorded(ckpt):
        return None
    config = ckpt["config"]
    used = config.get("train_images", 0) + config.get("val_images", 0)
    listing = list_image_folder(Path(folder).expanduser().resolve())
    return listing if len(listing.files) >= used else None


def _holds_the_runs_files(d, ckpt: dict, folder) -> bool:
    """Whether the decoded flat folder `d` (in `folder`) holds the files the checkpoint's run
    trained on and held out, by their paths in it: the run's folder moved or copied elsewhere."""
    from cnnx.train.data import DataError, identical_files, run_split, split_method
    from cnnx.train.run import files_digest, held_out_changed

    config = ckpt["config"]
    if len(d.labels) != config.get("train_images", -1) + config.get("val_images", 0):
        return False  # another number of images: no split (nor the copies' hashing) needed to tell
    try:
        tr, va = run_split(config, d.labels, folder, d.paths, identical_files(d.paths))
    except (DataError, KeyError, TypeError, ValueError):  # a config this cnnx cannot split by
        return False
    return (held_out_changed(config, [d.paths[i] for i in va.tolist()], folder) is None
            and files_digest([d.paths[i] for i in tr.tolist()], folder, split_method(config))
            == config.get("train_relpaths_sha256"))


def _has_val(root) -> bool:
    """Whether the run's split layout, train/ in `root`, has its val/ (its validation images),
    else the run held them out of train/."""
    from cnnx.train.data import DataError, folder_layout

    try:
        return "val" in folder_layout(root)
    except DataError:
        return False


def _trained_on(ckpt: dict, folder) -> str | None:
    """"all" where `folder` is the flat DIR/<class>/* the checkpoint's run trained on (and held
    its validation images out of), "train" where it is the train/ of the run's split layout, else
    None: the figures of the first two are no held-out ones. Paths are compared; the folder the
    checkpoint names is not listed (it may be anyone's checkpoint)."""
    from cnnx.train.data import SPLIT_FOLDERS

    config = ckpt.get("config") if isinstance(ckpt.get("config"), dict) else {}
    data = config.get("data")
    if not isinstance(data, str) or data == "cifar10":
        return None
    trained, here = os.path.realpath(os.path.expanduser(data)), os.path.realpath(folder)
    if here == trained:
        return "all"
    parent, name = os.path.split(here)
    return "train" if parent == trained and SPLIT_FOLDERS.get(name.lower()) == "train" else None


def _scored(ev: dict) -> str:
    """What the figures are of, for a title: the folder, or the images its run held out of it."""
    from cnnx.runtime.files import escaped_name

    held = " (the images its run held out)" if ev["split"] == "held-out" else ""
    return f"{escaped_name(ev['folder'])}{held}"


SCORED_KEY = "cnnx-scored-sha256"  # the PNG text chunk naming what an evaluation plot scored (_scored_digest)


def _scored_digest(folder: Path, split: str) -> str:
    """What an evaluation scored, as text a PNG can hold (a folder's name may be any bytes)."""
    import hashlib

    return hashlib.sha256(os.fsencode(folder) + b"\0" + split.encode()).hexdigest()


def _default_plot_path(run_folder: Path, folder_name: str, scored: str) -> Path:
    """confusion_<folder>.png beside the checkpoint; where that holds the plot of another folder
    of the same name (data/ and other/data/: the second evaluation replaced the first's, without
    a word), the name gets a short digest of what this one scores."""
    from cnnx.train.plots import png_text

    path = run_folder / f"confusion_{folder_name}.png"
    if os.path.isfile(path) and png_text(path).get(SCORED_KEY, scored) != scored:
        path = run_folder / f"confusion_{folder_name}-{scored[:8]}.png"
    return path


def _write_plot(ev: dict, checkpoint, plot_path, through_symlink: bool, scored: str):
    from cnnx.runtime.files import escaped_name
    from cnnx.train import plots

    m = ev["metrics"]
    plots.plot_confusion(m["confusion"], ev["class_names"], plot_path,  # names that are not UTF-8: \xNN
                         title=f"{escaped_name(Path(checkpoint).name)} on {_scored(ev)} ({m['n']} images)",
                         through_symlink=through_symlink, text={SCORED_KEY: scored})


def _write_evaluation_report(ev: dict, checkpoint, report, through_symlink: bool):
    from cnnx.report import Predictions, write_training_report
    from cnnx.runtime.files import escaped_name
    from cnnx.train.cache import Rows

    m, d = ev["metrics"], ev["data"]
    write_training_report(
        report, title=f"cnnx evaluate: {escaped_name(Path(checkpoint).name)} on {_scored(ev)}",
        config=ev["ckpt"]["config"], history=[], class_names=ev["class_names"], confusion=m["confusion"],
        val=Predictions(images=d.images if isinstance(d.images, Rows) else d.images.numpy(),  # Rows: --cache disk
                        labels=ev["labels"].numpy(), probs=m["probs"].numpy(),
                        paths=d.paths),
        summary={"checkpoint": escaped_name(checkpoint), "epoch": ev["ckpt"]["epoch"], "data": escaped_name(ev["folder"]),
                 "images": m["n"], "top1": m["top1"], "top5": m["top5"], "loss": m["loss"],
                 "skipped": len(d.skipped), **({"note": ev["trained_note"]} if ev["trained_note"] else {})},
        through_symlink=through_symlink)
