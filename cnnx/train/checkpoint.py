"""Self-describing checkpoints (DESIGN.md): plain types and tensors only, readable with
torch.load(weights_only=True), written atomically so a killed run never leaves a corrupt file."""

from __future__ import annotations

import os
import pickle
import tempfile
import zipfile

import torch

from cnnx import __version__
from cnnx.runtime.preprocess import SpecError, validate_spec

FORMAT = "cnnx-checkpoint"
FORMAT_VERSION = 1
REQUIRED = ("format", "format_version", "arch", "arch_kwargs", "num_classes", "class_names",
            "preprocess", "state_dict", "epoch", "metrics", "config")


class CheckpointError(Exception):
    """A file that is not a usable cnnx checkpoint; the message is one line for the user."""


def build_checkpoint(*, model, arch, arch_kwargs, class_names, preprocess, epoch, metrics, config, **extra) -> dict:
    model = getattr(model, "module", model)  # DDP / compiled wrappers
    model = getattr(model, "_orig_mod", model)
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "cnnx_version": __version__,
        "arch": arch,
        "arch_kwargs": dict(arch_kwargs),
        "num_classes": len(class_names),
        "class_names": list(class_names),
        "preprocess": dict(preprocess),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "epoch": int(epoch),
        "metrics": dict(metrics),
        "config": dict(config),
        **extra,
    }


def save_checkpoint(obj: dict, path) -> None:
    """Write to a temp file in the same folder, fsync, then rename over `path`."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".pt", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def load_checkpoint(path, map_location="cpu") -> dict:
    """Load and validate a cnnx checkpoint with weights_only=True; CheckpointError otherwise."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise CheckpointError(f"checkpoint not found: {path}")
    if os.path.isdir(path):
        raise CheckpointError(f"checkpoint is a folder, not a file: {path}")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else "unpickling failed"
        raise CheckpointError(
            f"refused to load {path}: it holds objects that weights_only=True will not run ({first[:200]})"
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError, KeyError, IndexError) as e:
        # KeyError/IndexError: what the weights-only unpickler raises on some garbage files
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"cannot read checkpoint {path} (truncated or not a torch file): {msg[:200]}") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a cnnx checkpoint (no format={FORMAT!r} field)")
    if ckpt.get("format_version", 0) > FORMAT_VERSION:
        raise CheckpointError(f"{path} was written by a newer cnnx (format {ckpt['format_version']}); upgrade cnnx")
    missing = [k for k in REQUIRED if k not in ckpt]
    if missing:
        raise CheckpointError(f"{path} lacks checkpoint fields {missing}")
    try:
        validate_spec(ckpt["preprocess"])
    except SpecError as e:
        raise CheckpointError(f"{path}: {e}") from None
    return ckpt


def model_from_checkpoint(ckpt: dict):
    """Rebuild the module from the checkpoint's own arch fields and load its weights (eval mode)."""
    from cnnx.train.zoo import UnknownArch, create_model

    try:
        model = create_model(ckpt["arch"], ckpt["num_classes"], **ckpt["arch_kwargs"])
        model.load_state_dict(ckpt["state_dict"])
    except (UnknownArch, RuntimeError) as e:
        raise CheckpointError(f"checkpoint does not match its arch {ckpt['arch']!r}: {str(e).splitlines()[0][:200]}") from None
    return model.eval()
