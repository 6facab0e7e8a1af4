"""The real images the parity gate (and int8 calibration) runs on: a --verify-data folder, or
the run's validation split re-created from the checkpoint's config, for this user's own
checkpoints only (see validation_images). Files are decoded by the one preprocess
implementation (cnnx.runtime.preprocess.load_image)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cnnx.export.errors import ExportError
from cnnx.runtime.contract import IMAGE_EXTENSIONS
from cnnx.runtime.files import first_line, names_line


@dataclass(frozen=True)
class ParityImages:
    images: np.ndarray  # uint8 (N, 3, H, W)
    labels: np.ndarray  # int64 (N,), -1 where the true class is unknown
    source: str  # one line for parity.json and stderr
    notes: tuple = field(default_factory=tuple)

    @property
    def labelled(self) -> bool:
        return bool(len(self.labels)) and bool((self.labels >= 0).all())


def spread(n_total: int, limit: int | None, groups=None) -> np.ndarray:
    """Indices (sorted) of `limit` of n_total items, or all of them: evenly spaced over the
    items, or, given `groups` (each item's class), over each class in turn, every class getting
    an even share (at least one while limit allows): evenly spaced over a class-sorted list, a
    small class between two large ones could get none."""
    if limit is None or n_total <= limit:
        return np.arange(n_total)
    if groups is None:
        return np.unique(np.linspace(0, n_total - 1, num=limit).round().astype(np.int64))
    members = {}
    for i, g in enumerate(groups):
        members.setdefault(g, []).append(i)
    classes = sorted(members, key=lambda g: members[g][0])
    share = {g: 0 for g in classes}
    left = limit
    while left > 0:  # round robin: each class one more while it has items left
        grew = False
        for g in classes:
            if left and share[g] < len(members[g]):
                share[g] += 1
                left -= 1
                grew = True
        if not grew:
            break
    picked = []
    for g in classes:
        idx = members[g]
        picked += [idx[j] for j in np.unique(np.linspace(0, len(idx) - 1, num=share[g]).round().astype(np.int64))]
    return np.array(sorted(picked), dtype=np.int64)


def _files(root: Path):
    """(path, class folder name or None) of every image under root, in sorted path order, hidden
    names left out. The walk is the runtime's (an explicit stack: any depth of folders), following
    symlinks as `cnnx train` does (a folder of links to the images was "no image files")."""
    from cnnx.runtime.discover import Discovery

    out = []
    for found in Discovery([root], follow_symlinks=True):
        if found.reason is not None:  # unreadable folders, special files: nothing to decode
            continue
        parts = Path(found.path).relative_to(root).parts
        if not any(p.startswith(".") for p in parts):
            out.append((Path(found.path), parts[0] if len(parts) > 1 else None))
    return out


def _split_of_layout(root: Path, class_names) -> Path:
    """The folder of labelled images in `root`: root itself, or, where root has cnnx train's
    split layout (DIR/{train,val,test}/<class>/*), its val/, else test/, else train/ (their
    folder names taken as classes, no image had a label and the gate had no accuracy)."""
    from cnnx.train.data import DataError, folder_layout

    try:
        layout = folder_layout(root)
    except DataError:
        return root
    if "all" in layout or set(layout) & set(class_names):
        return root
    return Path(next(layout[k] for k in ("val", "test", "train") if k in layout))


def load_verify_data(root, spec: dict, class_names, limit: int | None) -> ParityImages:
    """Images of DIR/<class>/* (labelled when <class> is one of the checkpoint's classes) or of
    a flat DIR/* (unlabelled: they count for agreement, not accuracy)."""
    from cnnx.runtime.preprocess import ImageError, load_image

    root = Path(root).expanduser()
    if not root.is_dir():
        raise ExportError(f"--verify-data {root}: {'not a folder' if root.exists() else 'no such folder'}")
    given, root = root, _split_of_layout(root, class_names)
    files = _files(root)
    if not files:
        raise ExportError(f"--verify-data {root}: no image files ({', '.join(sorted(IMAGE_EXTENSIONS))})")
    index = {c: i for i, c in enumerate(class_names)}
    images, labels, skipped = [], [], 0
    for i in spread(len(files), limit, [cls for _path, cls in files]):
        path, cls = files[i]
        try:
            arr, _ = load_image(path, spec)
        except ImageError:
            skipped += 1
            continue
        images.append(arr)
        labels.append(index.get(cls, -1) if cls is not None else -1)
    if not images:
        raise ExportError(f"--verify-data {root}: none of the {len(files)} image files could be decoded")
    notes = []
    if root != given:
        notes.append(f"{given} holds train/, val/ or test/ folders of classes (cnnx train's split layout): the "
                     f"images of {root.name}/ are used")
    if skipped:
        notes.append(f"{skipped} unreadable image files in {root} skipped")
    unknown = sorted({c for _, c in files if c is not None and c not in index})
    if unknown:
        notes.append(f"folders that are not classes of the checkpoint (no accuracy for them): {names_line(unknown, 10)}")
    if any(c is None for _, c in files):
        notes.append("images directly in the folder have no class: they count for agreement, not accuracy")
    labels = np.asarray(labels, dtype=np.int64)
    return ParityImages(np.stack(images), labels, f"--verify-data {root} ({len(images)} of {len(files)} images)",
                        tuple(notes))


def _own_validation_split(config: dict, spec: dict, cache_dir=None):
    """(images, labels, class names) of the validation split of the run `config` describes.
    Of the paths in config only the data is read; the decoded-image cache goes to cache_dir, as
    the caller names it, else this user's default cache (never the stored cache_dir), and
    CIFAR-10 is never downloaded here. The run's
    cache mode is kept: a run on data larger than memory (`--cache disk`, or auto that chose
    disk) reuses its disk cache, whose images are read per row (cache.Rows), not all at once."""
    from cnnx.train import data
    from cnnx.train.config import CACHE_MODES
    from cnnx.train.run import held_out_changed

    need = [k for k in ("data", "val_fraction", "split_seed") if k not in config]
    if need:
        raise data.DataError(f"the checkpoint's config lacks {need}: it was not written by `cnnx train`")
    if config["data"] == "cifar10":
        root = config.get("data_root") or str(data.cache_dir(cache_dir) / "datasets")
        x, y, names = data.load_cifar10(root, train=True, download=False)
        _, val = data.stratified_split(y, config["val_fraction"], config["split_seed"],
                                       method=data.split_method(config))
        return x[val], y[val], names
    s = data.load_splits({"data": config["data"], "data_root": None, "cache_dir": cache_dir, "preprocess": spec,
                          "val_fraction": config["val_fraction"], "split_seed": config["split_seed"],
                          "split": data.split_method(config)}, progress=False,
                         cache_mode=config.get("cache") if config.get("cache") in CACHE_MODES else "auto")
    # as `cnnx evaluate --split val` refuses: images added since would be scored as held out
    # while the run trained on some of the files they displace from the split
    why = None if s.val_paths is None else held_out_changed(config, s.val_paths, s.val_root)
    if why is not None:
        raise data.DataError(f"the images its run held out cannot be told again: {why}")
    return s.val[0], s.val[1], s.class_names


def validation_images(ckpt: dict, sha256: str, limit: int | None, cache_dir=None):
    """(ParityImages or None, why not): the run's validation split, re-created from the
    checkpoint's config only when the checkpoint is this user's own: its sha256 is in the
    own-checkpoints file this user's cnnx appends to (cnnx.train.checkpoint), which a
    checkpoint made or edited by someone else cannot be in. Anyone else's checkpoint gets
    None: the data path stored in it is never read."""
    from cnnx.train.cache import Rows
    from cnnx.train.checkpoint import is_own_checkpoint, own_checkpoints_file
    from cnnx.train.data import DataError

    registry = own_checkpoints_file()
    if not is_own_checkpoint(sha256):
        return None, (f"the checkpoint is not one this user's cnnx wrote (its sha256 is not in {registry}), "
                      "so the data path stored in it is not read")
    config = ckpt.get("config") or {}
    try:
        x, y, names = _own_validation_split(config, ckpt["preprocess"], cache_dir)
    except (DataError, KeyError, TypeError, ValueError, OSError) as e:
        return None, f"the run's validation split cannot be re-created ({first_line(e, 200)})"
    if len(y) == 0:
        return None, "the run's validation split is empty"
    if list(names) != list(ckpt["class_names"]):
        return None, "the run's data no longer has the checkpoint's classes"
    keep = spread(len(y), limit, np.asarray(y).tolist())
    images = x.read(keep) if isinstance(x, Rows) else np.asarray(x)[keep]  # Rows: only these rows are read
    images = np.ascontiguousarray(images, dtype=np.uint8)
    if list(images.shape[2:]) != list(ckpt["preprocess"]["size"]):
        return None, f"the validation images are {list(images.shape[2:])}, not the model's {ckpt['preprocess']['size']}"
    source = (f"validation split of {config['data']} ({len(keep)} of {len(y)} images; your own run: its sha256 "
              f"is in {registry})")
    return ParityImages(images, np.asarray(y)[keep].astype(np.int64), source), None


def random_images(n: int, size, seed: int) -> np.ndarray:
    h, w = size
    return np.random.default_rng(seed).integers(0, 256, size=(n, 3, h, w), dtype=np.uint8)
