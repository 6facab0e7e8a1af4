"""Self-describing checkpoints (DESIGN.md): plain types and tensors only, readable with
torch.load(weights_only=True), written atomically so a killed run never leaves a corrupt file.

Every checkpoint this user's cnnx writes has its sha256 appended to the own-checkpoints file
in the user's cache (`own_checkpoints_file`). `cnnx export` reads the data path stored in a
checkpoint only when the checkpoint is listed there: a file someone else made (or edited)
cannot be listed, because its bytes differ from everything this user's cnnx wrote.
"""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import sys
import warnings
import zipfile
from pathlib import Path

import torch

from cnnx import __version__
from cnnx.runtime.contract import ContractError, check_class_names, check_size
from cnnx.runtime.files import atomic_file, first_line, sha256_of
from cnnx.runtime.preprocess import SpecError, validate_spec

FORMAT = "cnnx-checkpoint"
FORMAT_VERSION = 1
REQUIRED = ("format", "format_version", "arch", "arch_kwargs", "num_classes", "class_names",
            "preprocess", "state_dict", "epoch", "metrics", "config")
OWN_CHECKPOINTS = "own-checkpoints.sha256"  # one lowercase hex sha256 a line, append-only


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


class _Writer(io.IOBase):
    """What torch's zip writers write through: passes bytes to `f`, hashes them when asked,
    and keeps the OSError a write raised. torch turns that error into a RuntimeError with an
    internal message (and aborts the whole process on a full disk when it opens the path
    itself), so writing through Python keeps the real one: ENOSPC is a full disk."""

    def __init__(self, f, hash_sha256: bool):
        super().__init__()
        self._f = f
        self.sha256 = hashlib.sha256() if hash_sha256 else None
        self.error: OSError | None = None

    def writable(self):
        return True

    def seekable(self):  # torch.export.save asks; it writes sequentially
        return True

    def tell(self):
        return self._f.tell()

    def seek(self, offset, whence=io.SEEK_SET):
        return self._f.seek(offset, whence)

    def write(self, data):
        try:
            n = self._f.write(data)
        except OSError as e:
            self.error = e
            raise
        if self.sha256 is not None:
            self.sha256.update(data)
        return n

    def flush(self):
        if not self._f.closed:  # IOBase.close flushes too, also once `f` is closed
            self._f.flush()


def save_torch_file(path, save, *, hash_sha256: bool = False) -> str | None:
    """Write what `save(file)` serialises (torch.save, torch.jit.save, torch.export.save) to
    `path` atomically (cnnx.runtime.files.atomic_file: temp file, fsync, rename). A failed
    write raises its OSError. Returns the file's sha256 (hex) when asked."""
    with atomic_file(path, "wb") as f:
        w = _Writer(f, hash_sha256)
        try:
            save(w)
        except RuntimeError as e:
            if w.error is not None:
                raise w.error from None
            if isinstance(e.__context__, KeyboardInterrupt):  # Ctrl-C inside torch's writer, which
                raise e.__context__ from None                # then fails on its own: an interrupt
            raise
    return w.sha256.hexdigest() if w.sha256 is not None else None


def own_checkpoints_file() -> Path:
    """This user's record of the checkpoints their cnnx wrote (in the user's default cache,
    never a folder named by a checkpoint)."""
    from cnnx.train.data import cache_dir

    return cache_dir(None) / OWN_CHECKPOINTS


_record_warned = False


def _record_own(sha256_hex: str) -> None:
    """Append one line with O_APPEND (concurrent runs interleave whole lines) and fsync it.
    The line starts with a newline too: a write cut short (a full disk) leaves a torn line
    that the next record would otherwise be glued to, and that checkpoint never recognised.
    A cache that cannot be written costs the export's automatic validation split, not the run."""
    global _record_warned
    path = own_checkpoints_file()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, ("\n" + sha256_hex + "\n").encode())
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as e:
        if not _record_warned:
            _record_warned = True
            print(f"warning: cannot record the checkpoint in {path} ({first_line(e)}); `cnnx export` will ask "
                  "for --verify-data to gate it on real images", file=sys.stderr)


def is_own_checkpoint(sha256_hex: str) -> bool:
    """Whether this user's cnnx wrote a checkpoint with these exact bytes (see the module doc)."""
    needle = sha256_hex.lower() + "\n"
    try:
        with open(own_checkpoints_file(), encoding="ascii", errors="replace") as f:
            return any(line == needle for line in f)
    except OSError:
        return False


def save_checkpoint(obj: dict, path) -> None:
    """Write atomically (save_torch_file). A cnnx checkpoint is then recorded as this user's
    own (own_checkpoints_file); one killed in between is treated by `cnnx export` as anyone
    else's (it asks for --verify-data), never the other way round."""
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    is_cnnx = obj.get("format") == FORMAT  # else e.g. the decoded-data cache: nothing to record
    sha256 = save_torch_file(path, lambda f: torch.save(obj, f), hash_sha256=is_cnnx)
    if is_cnnx:
        _record_own(sha256)


class UnreadableTorchFile(CheckpointError):
    """A file torch.load(weights_only=True) cannot read; its text is the reason alone (the
    caller names the file and what it was meant to be)."""


def load_tensors(f, map_location="cpu"):
    """torch.load of the open file `f` with weights_only=True: the one way cnnx reads a torch
    file (never with the weights-only load turned off: the file may run code).
    UnreadableTorchFile for a truncated file, one that is not a torch file, or one holding
    objects that a weights-only load refuses."""
    try:
        with warnings.catch_warnings():  # the weights-only unpickler's remarks on a file it then refuses
            warnings.simplefilter("ignore", UserWarning)
            return torch.load(f, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError:
        # torch's text here advises turning the weights-only load off: never repeated to the user
        raise UnreadableTorchFile("a safe, weights-only load refused it: not a torch file, or one holding other "
                                  "objects than tensors") from None
    except (KeyError, IndexError):  # what the weights-only unpickler raises on some garbage files: a bare key
        raise UnreadableTorchFile("truncated or not a torch file") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError) as e:
        kind = _archive_kind(f)
        if kind in ("torchscript", "pt2"):  # torch's text here advises turning the weights-only load off
            what = "a TorchScript archive (torch.jit.save)" if kind == "torchscript" else "a pt2 archive (torch.export)"
            raise UnreadableTorchFile(f"{what}, not a checkpoint: cnnx never loads those (they can run code); give "
                                      "a training run's best.pt or last.pt") from None
        raise UnreadableTorchFile(f"truncated or not a torch file: {first_line(e, 200)}") from None
    except (TypeError, AttributeError, AssertionError) as e:  # a damaged byte in data.pkl (the unpickler's own checks)
        raise UnreadableTorchFile(f"damaged (its pickled data cannot be read: {type(e).__name__}: "
                                  f"{first_line(e, 120)})") from None


def _archive_kind(f) -> str | None:
    """contract.torch_archive_kind of the open file `f` (its zip members' names), None where it
    is no zip archive."""
    from cnnx.runtime.contract import torch_archive_kind

    try:
        f.seek(0)
        with zipfile.ZipFile(f) as z:
            return torch_archive_kind(z.namelist())
    except (OSError, zipfile.BadZipFile, ValueError):
        return None


def load_checkpoint(path, map_location="cpu") -> dict:
    """Load and validate a cnnx checkpoint with weights_only=True; CheckpointError otherwise.
    Its fields must agree with each other: a preprocess spec this implementation applies (at
    most MAX_INPUT_SIDE a side), class names that are strings, one per class."""
    return load_checkpoint_and_sha256(path, map_location, digest=False)[0]


def load_checkpoint_and_sha256(path, map_location="cpu", *, digest: bool = True) -> tuple:
    """(load_checkpoint's dict, the sha256 of the very bytes it was loaded from): the file is
    opened once and hashed through that open file, so a best.pt that a run still training
    replaces meanwhile cannot give one epoch's weights and another's hash. digest False: None."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise CheckpointError(f"checkpoint not found: {path}")
    if os.path.isdir(path):
        raise CheckpointError(f"checkpoint is a folder, not a file: {path}")
    if not os.path.isfile(path):  # a FIFO would block the read for ever
        raise CheckpointError(f"checkpoint is not a regular file: {path}")
    try:
        with open(path, "rb") as f:
            sha256 = sha256_of(f) if digest else None
            f.seek(0)
            ckpt = load_tensors(f, map_location)
    except UnreadableTorchFile as e:
        raise CheckpointError(f"cannot read checkpoint {path}: {e}") from None
    except OSError as e:  # the path is said already
        raise CheckpointError(f"cannot read checkpoint {path}: {e.strerror or first_line(e, 200)}") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        bare = isinstance(ckpt, dict) and ckpt and all(isinstance(v, torch.Tensor) for v in ckpt.values())
        raise CheckpointError(f"{path} is not a cnnx checkpoint (no format={FORMAT!r} field)" + (
            ": it is a bare state_dict; cnnx train writes checkpoints, and --pretrained brings torchvision's "
            "ImageNet weights" if bare else ""))
    version = ckpt.get("format_version")  # present: REQUIRED, checked below
    if version is not None and (isinstance(version, bool) or not isinstance(version, int) or version < 1):
        raise CheckpointError(f"{path}: format_version must be a whole number from 1, got {version!r:.40}")
    if version is not None and version > FORMAT_VERSION:
        raise CheckpointError(f"{path} was written by a newer cnnx (format {version}); upgrade cnnx")
    missing = [k for k in REQUIRED if k not in ckpt]
    if missing:
        raise CheckpointError(f"{path} lacks checkpoint fields {missing}")
    try:
        check_size(validate_spec(ckpt["preprocess"]))
        names = check_class_names(ckpt["class_names"])
    except (SpecError, ContractError) as e:
        raise CheckpointError(f"{path}: {first_line(e, 200)}") from None
    if ckpt["num_classes"] != len(names):
        raise CheckpointError(f"{path}: {len(names)} class names but num_classes is {ckpt['num_classes']!r}")
    config = ckpt.get("config") if isinstance(ckpt.get("config"), dict) else {}
    for key, what in (("class_names", "class names (or their order)"), ("preprocess", "preprocess spec")):
        # cnnx train writes both from one value: they differ only in an edited checkpoint, whose
        # logits would be read with other labels or fed other pixels than it was trained on
        if key in config and config[key] != ckpt[key]:
            raise CheckpointError(f"{path}: its {what} differ from those of the run that trained it "
                                  f"(config.{key}): an edited checkpoint; refused")
    return ckpt, sha256


def model_from_checkpoint(ckpt: dict):
    """Rebuild the module from the checkpoint's own arch fields, load its weights (eval mode)
    and run one image of the preprocess size through it: the logits must be one per class name."""
    from cnnx.train.zoo import UnknownArch, create_model

    try:
        model = create_model(ckpt["arch"], ckpt["num_classes"], **ckpt["arch_kwargs"])
        model.load_state_dict(ckpt["state_dict"])
    except (UnknownArch, RuntimeError, TypeError, ValueError, KeyError, AttributeError) as e:
        raise CheckpointError(f"checkpoint does not fit its arch {ckpt['arch']!r}: {first_line(e, 200)}") from None
    model.eval()
    h, w = ckpt["preprocess"]["size"]
    try:
        with torch.no_grad():
            logits = model(torch.zeros(1, 3, h, w))
    except (RuntimeError, ValueError) as e:
        raise CheckpointError(f"the {ckpt['arch']!r} model of the checkpoint does not accept its preprocess size "
                              f"{h}x{w}: {first_line(e, 200)}") from None
    n = len(ckpt["class_names"])
    if tuple(logits.shape) != (1, n):
        raise CheckpointError(f"the {ckpt['arch']!r} model of the checkpoint gives logits of shape "
                              f"{list(logits.shape)} for one image, not one per each of its {n} class names")
    return model
