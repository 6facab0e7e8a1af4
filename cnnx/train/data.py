"""Data sources for training: an image folder or CIFAR-10 through torchvision, each decoded
once into one uint8 tensor (N, 3, H, W) and kept on disk so a second run starts in seconds.

Image files are decoded by `cnnx.runtime.preprocess.load_image` (the one implementation of
the preprocess spec), so train-time evaluation and `cnnx classify` see identical arrays.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from cnnx.runtime.preprocess import PREPROCESS_VERSION, ImageError, load_image

SPLIT_NAMES = ("train", "val", "test")
CACHE_FORMAT = 1  # bump when the cached file's layout changes


class DataError(Exception):
    """A data source that cannot be used; the message is one line for the user."""


@dataclass
class ImageFolderData:
    images: torch.Tensor  # uint8 (N, 3, H, W), RGB
    labels: torch.Tensor  # int64 (N,), index into class_names
    class_names: list
    paths: list  # str, sorted per class, in the order of images
    skipped: list = field(default_factory=list)  # (path, reason) of files that could not be decoded


def cache_dir(explicit=None) -> Path:
    """--cache-dir, else $CNNX_CACHE, else $XDG_CACHE_HOME/cnnx, else ~/.cache/cnnx."""
    if explicit:
        return Path(explicit).expanduser()
    if os.environ.get("CNNX_CACHE"):
        return Path(os.environ["CNNX_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "cnnx"


def _visible(entries):
    return sorted(e for e in entries if not e.name.startswith("."))


def folder_layout(root) -> dict:
    """{split: folder}: {"all": root} for DIR/<class>/*, or the present subset of
    train/val/test for DIR/{train,val,test}/<class>/*. DataError for a missing/empty path."""
    root = Path(root).expanduser()
    if not root.exists():
        raise DataError(f"data folder not found: {root}")
    if not root.is_dir():
        raise DataError(f"data path is not a folder: {root}")
    subdirs = [e for e in _visible(root.iterdir()) if e.is_dir()]
    if not subdirs:
        raise DataError(f"no class folders in {root} (expected DIR/<class>/* or DIR/train/<class>/*)")
    names = {d.name for d in subdirs}
    # A folder is the split layout when its subfolders are split names that hold folders
    # themselves; a dataset whose classes happen to be called "train"/"test" holds files.
    if names <= set(SPLIT_NAMES) and all(any(e.is_dir() for e in d.iterdir()) for d in subdirs):
        return {d.name: d for d in subdirs}
    return {"all": root}


def _list_files(root: Path):
    classes = [e for e in _visible(root.iterdir()) if e.is_dir()]
    if not classes:
        raise DataError(f"no class folders in {root} (expected {root}/<class>/<image files>)")
    files = []  # (relative path, class index, mtime_ns, size)
    for ci, c in enumerate(classes):
        for dirpath, dirnames, filenames in os.walk(c):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for name in sorted(filenames):
                if name.startswith("."):
                    continue
                p = os.path.join(dirpath, name)
                try:
                    st = os.stat(p)
                except OSError:
                    continue
                files.append((os.path.relpath(p, root), ci, st.st_mtime_ns, st.st_size))
    if not files:
        raise DataError(f"no files in the class folders of {root}")
    return [c.name for c in classes], files


def _decode_chunk(args):
    """Worker: decode a list of paths; returns (uint8 bytes of the good ones, their indices in
    the list, [(path, reason)] of the bad ones)."""
    import numpy as np

    paths, spec = args
    good, idx, errors = [], [], []
    for i, p in enumerate(paths):
        try:
            arr, _ = load_image(p, spec)
        except ImageError as e:
            errors.append((p, f"{e.stage}: {e}"))
            continue
        good.append(arr)
        idx.append(i)
    blob = np.stack(good).tobytes() if good else b""
    return blob, idx, errors


def _decode_all(paths, spec, *, workers, progress):
    """Decode paths in parallel worker processes; returns (uint8 tensor, kept indices, skipped)."""
    import numpy as np
    from concurrent.futures import ProcessPoolExecutor
    import multiprocessing as mp

    from tqdm import tqdm

    n = len(paths)
    workers = workers if workers is not None else min(os.cpu_count() or 1, 8)
    # Big chunks: a tiny JPEG decodes in ~30 us, so per-task overhead must stay small.
    chunk = max(256, -(-n // (max(workers, 1) * 8)))
    jobs = [(paths[i:i + chunk], spec) for i in range(0, n, chunk)]
    h, w = spec["size"]
    out = np.empty((n, 3, h, w), dtype=np.uint8)
    kept, skipped, filled = [], [], 0
    bar = tqdm(total=n, desc="decoding images", unit="img", file=sys.stderr, disable=not progress, leave=False)
    if workers <= 1 or len(jobs) == 1:
        results = map(_decode_chunk, jobs)
        pool = None
    else:
        # fork, not spawn: spawn re-runs the caller's __main__ (breaking scripts without a main
        # guard). The children touch only Pillow and numpy, never torch's thread pools.
        ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
        pool = ProcessPoolExecutor(max_workers=workers, mp_context=ctx)
        results = pool.map(_decode_chunk, jobs)
    try:
        for j, (blob, idx, errors) in enumerate(results):
            base = j * chunk
            if idx:
                block = np.frombuffer(blob, dtype=np.uint8).reshape(len(idx), 3, h, w)
                out[filled:filled + len(idx)] = block
                filled += len(idx)
                kept.extend(base + i for i in idx)
            skipped.extend(errors)
            bar.update(len(jobs[j][0]))
    finally:
        bar.close()
        if pool is not None:
            pool.shutdown(cancel_futures=True)
    return torch.from_numpy(out[:filled].copy()), kept, skipped


def load_image_folder(root, spec, *, progress=True, cache=None, workers=None, use_cache=True) -> ImageFolderData:
    """Decode DIR/<class>/<files> into uint8 (N, 3, H, W) through the preprocess spec.

    Classes are the sorted visible subfolders (label id = index); files are sorted per
    class; unreadable files are skipped and listed in `.skipped` as (path, reason). The
    result is cached under the cache dir, keyed by the folder, its file list with mtimes
    and sizes, the spec and PREPROCESS_VERSION."""
    root = Path(root).expanduser().resolve()
    if not root.exists():
        raise DataError(f"data folder not found: {root}")
    if not root.is_dir():
        raise DataError(f"data path is not a folder: {root}")
    class_names, files = _list_files(root)
    key_src = json.dumps(
        {"root": str(root), "files": files, "spec": spec, "preprocess_version": PREPROCESS_VERSION,
         "cache_format": CACHE_FORMAT},
        sort_keys=True,
    )
    key = hashlib.sha256(key_src.encode()).hexdigest()[:32]
    cache_file = cache_dir(cache) / "folders" / f"{key}.pt"
    if use_cache and cache_file.exists():
        try:
            c = torch.load(cache_file, map_location="cpu", weights_only=True)
            return ImageFolderData(c["images"], c["labels"], list(c["class_names"]),
                                   [str(root / p) for p in c["paths"]],
                                   [(str(root / p), r) for p, r in c["skipped"]])
        except Exception:  # a damaged cache file is rebuilt, never trusted
            pass
    abs_paths = [str(root / f[0]) for f in files]
    images, kept, skipped = _decode_all(abs_paths, spec, workers=workers, progress=progress)
    labels = torch.tensor([files[i][1] for i in kept], dtype=torch.int64)
    paths = [files[i][0] for i in kept]
    skipped_rel = [(os.path.relpath(p, root), r) for p, r in skipped]
    if use_cache:
        from cnnx.train.checkpoint import save_checkpoint  # atomic: temp file, fsync, rename

        try:
            save_checkpoint({"images": images, "labels": labels, "class_names": class_names,
                                "paths": paths, "skipped": skipped_rel}, cache_file)
        except OSError as e:  # a read-only cache costs speed, not correctness
            print(f"warning: cannot write the data cache {cache_file}: {e}", file=sys.stderr)
    return ImageFolderData(images, labels, class_names, [str(root / p) for p in paths],
                           [(str(root / p), r) for p, r in skipped_rel])


# --- CIFAR-10 through torchvision ---------------------------------------------------------

CIFAR10_HOST = "www.cs.toronto.edu"


def _online(host, timeout=3.0) -> bool:
    import socket

    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def load_cifar10(data_root, *, train: bool, download=True):
    """(images uint8 (N,3,32,32), labels int64, class_names) of the CIFAR-10 train or test split."""
    from torchvision.datasets import CIFAR10

    root = Path(data_root).expanduser()
    probe = CIFAR10.__new__(CIFAR10)  # only to ask whether the files are already there
    probe.root = str(root)
    if not probe._check_integrity():
        if not download or not _online(CIFAR10_HOST):
            raise DataError(
                f"CIFAR-10 is not in {root} and cannot be downloaded (offline); pass --data-root with a "
                f"folder holding cifar-10-batches-py, or --data DIR with an image folder (DIR/<class>/*)"
            )
        try:
            root.mkdir(parents=True, exist_ok=True)
            CIFAR10(str(root), train=True, download=True)
        except Exception as e:  # network errors arrive in many types
            raise DataError(f"downloading CIFAR-10 into {root} failed: {str(e).splitlines()[0][:200]}") from None
    ds = CIFAR10(str(root), train=train, download=False)
    images = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()
    return images, torch.tensor(ds.targets, dtype=torch.int64), list(ds.classes)


# --- splits ---------------------------------------------------------------------------------

def stratified_split(labels: torch.Tensor, fraction: float, seed: int):
    """(train_idx, val_idx): `fraction` of each class (at least one image when a class has two
    or more) held out, chosen by a generator seeded with `seed`; both sorted."""
    g = torch.Generator().manual_seed(int(seed))
    val = []
    for c in torch.unique(labels).tolist():
        idx = torch.nonzero(labels == c).flatten()
        k = int(round(fraction * len(idx)))
        if len(idx) >= 2:
            k = min(max(k, 1), len(idx) - 1)
        else:
            k = 0
        val.append(idx[torch.randperm(len(idx), generator=g)[:k]])
    val_idx = torch.sort(torch.cat(val)).values if val else torch.empty(0, dtype=torch.int64)
    mask = torch.ones(len(labels), dtype=torch.bool)
    mask[val_idx] = False
    return torch.nonzero(mask).flatten(), val_idx


@dataclass
class Splits:
    train: tuple  # (images, labels)
    val: tuple
    test: tuple | None
    class_names: list
    skipped: list
    source: str  # a one-line description for the log


def _check_classes(names, where):
    if len(names) < 2:
        raise DataError(f"{where} has {len(names)} class ({', '.join(names) or 'none'}); training needs at least 2")


def load_splits(config: dict, *, progress=True, workers=None) -> Splits:
    """Train/val(/test) splits of the data a resolved run config names (keys: data, data_root,
    cache_dir, preprocess, val_fraction, split_seed). Validation is the folder's val split when it
    has one, else a stratified `val_fraction` of train; the test split is never used to select."""
    spec = config["preprocess"]
    data = config["data"]
    if data == "cifar10":
        root = config.get("data_root") or str(cache_dir(config.get("cache_dir")) / "datasets")
        x, y, names = load_cifar10(root, train=True)
        xt, yt, _ = load_cifar10(root, train=False, download=False)
        if list(spec["size"]) != [32, 32]:
            raise DataError(f"CIFAR-10 images are 32x32; this arch wants {spec['size']}: use an image folder")
        tr, va = stratified_split(y, config["val_fraction"], config["split_seed"])
        return Splits((x[tr], y[tr]), (x[va], y[va]), (xt, yt), names, [], f"CIFAR-10 from {root}")
    layout = folder_layout(data)

    def load(folder):
        return load_image_folder(folder, spec, progress=progress, cache=config.get("cache_dir"), workers=workers)

    if "all" in layout:
        d = load(layout["all"])
        _check_classes(d.class_names, data)
        tr, va = stratified_split(d.labels, config["val_fraction"], config["split_seed"])
        return Splits((d.images[tr], d.labels[tr]), (d.images[va], d.labels[va]), None, d.class_names, d.skipped,
                      f"{len(d.labels)} images in {len(d.class_names)} classes from {data}")
    if "train" not in layout:
        raise DataError(f"{data} has {'/'.join(sorted(layout))} but no train/ split to train on")
    d = load(layout["train"])
    _check_classes(d.class_names, layout["train"])
    skipped = list(d.skipped)

    def other(name):
        if name not in layout:
            return None
        o = load(layout[name])
        skipped.extend(o.skipped)
        if o.class_names != d.class_names:
            extra = sorted(set(o.class_names) - set(d.class_names))
            if extra:
                raise DataError(f"{layout[name]} has classes that train/ lacks: {', '.join(extra)}")
            remap = torch.tensor([d.class_names.index(c) for c in o.class_names])
            return o.images, remap[o.labels]
        return o.images, o.labels

    val = other("val")
    test = other("test")
    if val is None:
        tr, va = stratified_split(d.labels, config["val_fraction"], config["split_seed"])
        train, val = (d.images[tr], d.labels[tr]), (d.images[va], d.labels[va])
    else:
        train = (d.images, d.labels)
    return Splits(train, val, test, d.class_names, skipped,
                  f"{len(train[1])} train / {len(val[1])} val images in {len(d.class_names)} classes from {data}")


def validation_split(config: dict):
    """Re-create the exact validation split of a run from its checkpoint's `config`:
    (images uint8 (N,3,H,W), labels int64, class_names). DataError when the source is gone."""
    need = [k for k in ("data", "preprocess", "val_fraction", "split_seed") if k not in config]
    if need:
        raise DataError(f"the checkpoint's config lacks {need}: it was not written by `cnnx train`")
    s = load_splits(config, progress=False)
    return s.val[0], s.val[1], s.class_names
