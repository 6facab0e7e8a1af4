"""The decoded-image cache on disk, for datasets larger than memory (DESIGN.md "Data larger
than memory"): one uint8 (N, 3, H, W) array in a raw file beside a JSON header, memory-mapped
for reading, and a prefetching reader that gathers the next batch's rows while the current
one trains.

The cache is a folder `<key>.u8/` holding `images.u8` and `meta.json`. It is built in a temp
folder beside it (space for all rows reserved up front with posix_fallocate, so a full disk is
one error before any decoding, never a SIGBUS from a mapped page) and renamed into place when
complete: a cache folder that exists is whole; a killed build leaves only a temp folder that
the next run removes.

Nothing here holds the images in the process's anonymous memory: decoded rows are written
into the mapping (file-backed page cache), and `Rows` reads only the rows a batch asks for.
"""

from __future__ import annotations

import json
import os
import queue
import shutil
import threading
from pathlib import Path

import numpy as np
import torch

from cnnx.runtime.files import TEMP_PREFIX, first_line, is_disk_full, remove_stale_temps

DISK_CACHE_FORMAT = 1
IMAGES_FILE, META_FILE = "images.u8", "meta.json"
MEMORY_SHARE = 0.5  # --cache auto: the disk cache when decoded images need more than this share of free memory


class CacheError(Exception):
    """A disk cache that cannot be written; one line for the user."""


class Rows:
    """Rows of a memory-mapped uint8 (N, 3, H, W) array, picked by an index (int64 tensor) and
    read only when asked: `rows[idx]` (a tensor of indices or a slice) gathers a uint8 tensor,
    `rows[i]` one image as a numpy array, `take(idx)` another Rows without reading anything."""

    def __init__(self, base: np.ndarray, rows: torch.Tensor | None = None):
        self.base = base
        self.rows = torch.arange(len(base)) if rows is None else rows

    device = torch.device("cpu")

    def __len__(self):
        return len(self.rows)

    @property
    def shape(self):
        return (len(self.rows), *self.base.shape[1:])

    def take(self, idx) -> "Rows":
        return Rows(self.base, self.rows[idx])

    def __getitem__(self, key):
        if isinstance(key, (int, np.integer)):
            return np.asarray(self.base[int(self.rows[key])])
        return torch.from_numpy(gather(self.base, self.rows[key].numpy()))


def take(images, idx):
    """images[idx] for a tensor; the same rows, not yet read, for Rows."""
    return images.take(idx) if isinstance(images, Rows) else images[idx]


def gather(base: np.ndarray, rows: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """base[rows] into `out` (a new array when None), read in ascending row order: a memory-mapped
    file is read front to back, which the kernel's readahead serves best."""
    order = np.argsort(rows, kind="stable")
    if out is None:
        out = np.empty((len(rows), *base.shape[1:]), dtype=base.dtype)
    for i in order:
        out[i] = base[rows[i]]
    return out


# --- choosing and building --------------------------------------------------------------------

def available_memory() -> int:
    """Bytes this process may still take: MemAvailable, lowered by the memory limit of its
    cgroup (v2: memory.max; v1: the memory controller's memory.limit_in_bytes)."""
    avail = 1 << 62
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    avail = int(line.split()[1]) * 1024
    except OSError:
        pass
    room = _cgroup_room()
    return avail if room is None else min(avail, room)


def _cgroup_room():
    """limit - usage of this process's memory cgroup, None when unlimited or unknown."""
    try:
        for line in open("/proc/self/cgroup"):
            _, controllers, path = line.strip().split(":", 2)
            if controllers == "":  # v2
                base, limit_f, usage_f = Path("/sys/fs/cgroup") / path.lstrip("/"), "memory.max", "memory.current"
            elif "memory" in controllers.split(","):
                base = Path("/sys/fs/cgroup/memory") / path.lstrip("/")
                limit_f, usage_f = "memory.limit_in_bytes", "memory.usage_in_bytes"
            else:
                continue
            try:
                limit = (base / limit_f).read_text().strip()
                usage = int((base / usage_f).read_text())
            except OSError:
                continue
            if limit.isdigit() and int(limit) < 1 << 60:
                return max(0, int(limit) - usage)
    except (OSError, ValueError):
        return None
    return None


def use_disk(mode: str, nbytes: int) -> bool:
    """--cache memory|disk|auto: auto keeps images in memory when they take at most MEMORY_SHARE
    of the memory available now (the rest is for the model, the batches and other programs)."""
    if mode in ("memory", "disk"):
        return mode == "disk"
    return nbytes > MEMORY_SHARE * available_memory()


def read_disk_cache(folder: Path):
    """(Rows, meta dict) of a complete cache folder, else None (absent or damaged: rebuilt)."""
    try:
        meta = json.loads((folder / META_FILE).read_text())
        if meta.get("format") != DISK_CACHE_FORMAT:
            return None
        shape = tuple(int(s) for s in meta["shape"])
        if os.path.getsize(folder / IMAGES_FILE) != int(np.prod(shape)):
            return None
        if shape[0] == 0:
            return Rows(np.zeros(shape, dtype=np.uint8)), meta
        return Rows(np.memmap(folder / IMAGES_FILE, dtype=np.uint8, mode="r", shape=shape)), meta
    except (OSError, ValueError, KeyError, TypeError):
        return None


def build_disk_cache(folder: Path, n: int, size, decode_into, meta_of) -> tuple:
    """Build the cache folder: reserve n rows of 3 x size on disk, `decode_into(out)` fills
    them and returns (rows filled, what `meta_of` turns into the header's extra fields); the
    file is cut to the filled rows, the header written, both synced, the folder renamed in.
    CacheError (one line) when the disk is full or not writable; nothing half-written stays."""
    h, w = size
    parent = folder.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(parent)
        tmp = parent / f"{TEMP_PREFIX}{os.getpid()}-{folder.name}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    except OSError as e:
        raise CacheError(f"cannot create the image cache in {parent}: {first_line(e)}") from None
    try:
        row = 3 * h * w
        path = tmp / IMAGES_FILE
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            if n:
                os.posix_fallocate(fd, 0, n * row)  # a full disk fails here, not as SIGBUS in a mapped write
        finally:
            os.close(fd)
        out = np.memmap(path, dtype=np.uint8, mode="r+", shape=(n, 3, h, w)) if n else np.zeros((0, 3, h, w), np.uint8)
        filled, extra = decode_into(out)
        if n:
            out.flush()
        del out
        os.truncate(path, filled * row)
        meta = {"format": DISK_CACHE_FORMAT, "shape": [filled, 3, h, w], **meta_of(extra)}
        with open(tmp / META_FILE, "w") as f:
            json.dump(meta, f)
            f.flush()
            os.fsync(f.fileno())
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.rename(tmp, folder)
        except OSError:
            if read_disk_cache(folder) is None:  # not a racing run's complete cache
                raise
        _fsync_dir(parent)
    except OSError as e:
        if is_disk_full(e):
            raise CacheError(f"no space left for the decoded-image cache in {parent} ({n} images need "
                             f"{n * 3 * h * w / 2**30:.2f} GiB): free space or pass --cache-dir on a larger disk"
                             ) from None
        raise CacheError(f"cannot write the decoded-image cache in {parent}: {first_line(e)}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    got = read_disk_cache(folder)
    if got is None:
        raise CacheError(f"the decoded-image cache {folder} could not be read back")
    return got


def _fsync_dir(path: Path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# --- reading batches ----------------------------------------------------------------------------

PREFETCH = 2  # batches gathered ahead of the one training


def batches(images, labels, index_batches, device):
    """(x, y) per batch of indices, in order. Resident tensors are indexed on their device (as
    always); Rows are gathered by a background thread PREFETCH batches ahead, into pinned
    memory on CUDA, and copied with non_blocking=True."""
    if not isinstance(images, Rows):
        for idx in index_batches:
            yield images[idx.to(images.device)], labels[idx.to(labels.device)]
        return
    dev = torch.device(device)
    pin = dev.type == "cuda"
    q: queue.Queue = queue.Queue(maxsize=PREFETCH)
    stop = threading.Event()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False  # the training loop left early

    def work():
        try:
            for idx in index_batches:
                rows = images.rows[idx].numpy()
                buf = torch.empty((len(rows), *images.base.shape[1:]), dtype=torch.uint8, pin_memory=pin)
                gather(images.base, rows, buf.numpy())
                if not put((buf, idx)):
                    return
            put(None)
        except BaseException as e:  # raised again in the training thread
            put(e)

    t = threading.Thread(target=work, name="cnnx-prefetch", daemon=True)
    t.start()
    try:
        while True:
            item = q.get()
            if item is None:
                return
            if isinstance(item, BaseException):
                raise item
            buf, idx = item
            yield buf.to(dev, non_blocking=pin), labels[idx.to(labels.device)]
    finally:
        stop.set()
        t.join()
