"""The decoded-image cache on disk, for datasets larger than memory (DESIGN.md "Data larger
than memory"): one uint8 (N, 3, H, W) array in a raw file beside a JSON header, memory-mapped
for its shape, read row by row with pread, and a prefetching reader that reads the next
batch's rows while the current one trains.

The cache is a folder `<key>.u8/` holding `images.u8` and `meta.json`. It is built in a temp
folder beside it (space for all rows reserved up front with posix_fallocate, so a full disk is
one error before any decoding, never a SIGBUS from a mapped page) and renamed into place when
complete: a cache folder that exists is whole; a killed build leaves only a temp folder that
the next run removes.

Nothing here holds the images in the process's memory: decode workers write rows into the file
(page cache), and `Rows` reads only the rows a batch asks for, into the batch.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import tempfile
import threading
from pathlib import Path

import numpy as np
import torch

from cnnx.runtime.files import (TEMP_PREFIX, atomic_write, first_line, hold_as_writer, is_disk_full, remove_stale_temps,
                                umask)
from cnnx.runtime.pipeline import ahead_in_thread

DISK_CACHE_FORMAT = 2  # 2: the header holds the images file's CRC-32 and stat (a damaged file was trained on)
IMAGES_FILE, META_FILE = "images.u8", "meta.json"
MEMORY_SHARE = 0.5  # --cache auto: the disk cache when decoded images need more than this share of free memory
# ... counted this many times: while the run's splits are made, the training rows are copied out of
# the decoded whole (cache.take), which is freed only after (a peak of about twice the images)
LOADING_COPIES = 2


class CacheError(Exception):
    """A disk cache that cannot be written; one line for the user."""


class Rows:
    """Rows of a uint8 (N, 3, H, W) array in a cache file, picked by an index (int64 tensor) and
    read only when asked: `rows[idx]` (a tensor of indices or a slice) reads a uint8 tensor,
    `rows[i]` one image as a numpy array, `take(idx)` another Rows without reading anything.
    `base` is the file's memory map (its shape; an array for whoever wants one); rows are read
    from `file` with pread (read_rows), not through the map."""

    def __init__(self, base: np.ndarray, rows: torch.Tensor | None = None, file=None):
        self.base = base
        self.rows = torch.arange(len(base)) if rows is None else rows
        self.file = file  # the cache file open for reading; None: base is an array in memory

    device = torch.device("cpu")

    def __len__(self):
        return len(self.rows)

    @property
    def shape(self):
        return (len(self.rows), *self.base.shape[1:])

    def take(self, idx) -> "Rows":
        return Rows(self.base, self.rows[idx], self.file)

    def read(self, idx, out: np.ndarray | None = None) -> np.ndarray:
        """These Rows' rows `idx` (indices or a slice) into `out` (a new array when None)."""
        return read_rows(self.base, self.file, self.rows[idx].numpy(), out)

    def __getitem__(self, key):
        if isinstance(key, (int, np.integer)):
            return self.read([int(key)])[0]
        return torch.from_numpy(self.read(key))


def take(images, idx):
    """images[idx] for a tensor; the same rows, not yet read, for Rows."""
    return images.take(idx) if isinstance(images, Rows) else images[idx]


def read_rows(base: np.ndarray, file, rows: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """base[rows] into `out` (a new array when None). From a cache file: one pread per row, in
    ascending row order. Not through the memory map: there each 4 KiB page costs a page fault,
    and when the cache does not fit in the memory the process may use, every batch waits for
    the kernel to reclaim mapped pages (bench_bigdata.json, "reader": the map against pread, per batch, under a memory cgroup and
    with the whole cache in the page cache)."""
    if out is None:
        out = np.empty((len(rows), *base.shape[1:]), dtype=base.dtype)
    if file is None:
        out[...] = base[rows]
        return out
    row_bytes = base.itemsize * int(np.prod(base.shape[1:]))
    fd = file.fileno()
    for i in np.argsort(rows, kind="stable"):
        buf, offset = memoryview(out[i]).cast("B"), int(rows[i]) * row_bytes
        while buf:
            n = os.preadv(fd, [buf], offset)
            if n == 0:
                raise OSError(errno.EIO, f"the decoded-image cache {file.name} is shorter than its header says "
                                         f"(changed while in use?): run again to rebuild it")
            buf, offset = buf[n:], offset + n
    return out


# --- choosing and building --------------------------------------------------------------------

def available_memory() -> int:
    """Bytes this process may still take: MemAvailable, lowered by the memory limit of its
    cgroup (v2: memory.max; v1: the memory controller's memory.limit_in_bytes) and by its
    address-space limit (ulimit -v)."""
    avail = 1 << 62
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    avail = int(line.split()[1]) * 1024
    except OSError:
        pass
    for room in (_cgroup_room(), _address_space_room()):
        if room is not None:
            avail = min(avail, room)
    return avail


def _address_space_room():
    """RLIMIT_AS's soft limit less the address space this process maps now (VmSize), None
    when unlimited or unknown. Mapped, not resident: what the limit counts."""
    import resource

    try:
        limit = resource.getrlimit(resource.RLIMIT_AS)[0]
        if limit == resource.RLIM_INFINITY:
            return None
        with open("/proc/self/status") as f:
            size = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))
    except (OSError, ValueError, StopIteration):
        return None
    return max(0, limit - size)


def _cgroup_room(proc_cgroup="/proc/self/cgroup", cgroup_fs=Path("/sys/fs/cgroup")):
    """The least limit - usage over this process's memory cgroup and its ancestors (a parent's
    limit binds too), None when unlimited or unknown. A container without its own cgroup
    namespace (Docker's default on a cgroup-v1 host) names in /proc/self/cgroup a path its
    /sys/fs/cgroup does not hold, its own cgroup mounted there at the top: the walk up finds it."""
    rooms = []
    try:
        for line in open(proc_cgroup):
            _, controllers, path = line.strip().split(":", 2)
            if controllers == "":  # v2
                mount, limit_f, usage_f = cgroup_fs, "memory.max", "memory.current"
            elif "memory" in controllers.split(","):
                mount, limit_f, usage_f = cgroup_fs / "memory", "memory.limit_in_bytes", "memory.usage_in_bytes"
            else:
                continue
            base = mount / path.lstrip("/")
            for folder in (base, *base.parents[:len(base.relative_to(mount).parts)]):
                try:
                    limit = (folder / limit_f).read_text().strip()
                    usage = int((folder / usage_f).read_text())
                except (OSError, ValueError):
                    continue
                if limit.isdigit() and int(limit) < 1 << 60:
                    rooms.append(max(0, int(limit) - usage))
    except (OSError, ValueError):
        return None
    return min(rooms, default=None)


def use_disk(mode: str, nbytes: int) -> bool:
    """--cache memory|disk|auto: auto keeps images in memory when, counted LOADING_COPIES times,
    they take at most MEMORY_SHARE of the memory available now (the rest is for the model, the
    batches and other programs)."""
    if mode in ("memory", "disk"):
        return mode == "disk"
    return nbytes * LOADING_COPIES > MEMORY_SHARE * available_memory()


def read_disk_cache(folder: Path):
    """(Rows, meta dict) of a complete cache folder, else None (absent or damaged: rebuilt).
    CacheError where it is there but this user may not read it (another user's, in a shared
    --cache-dir): rebuilding it would decode everything, then fail to replace it."""
    try:
        os.stat(folder / META_FILE)
    except PermissionError as e:
        raise CacheError(f"the decoded-image cache {folder} is not readable by this user ({first_line(e)}): "
                         f"ask its owner to make it readable, or pass your own --cache-dir") from None
    except OSError:
        return None
    try:
        meta = json.loads((folder / META_FILE).read_text())
        if meta.get("format") != DISK_CACHE_FORMAT:
            return None
        shape = tuple(int(s) for s in meta["shape"])
        if os.path.getsize(folder / IMAGES_FILE) != int(np.prod(shape)):
            return None
        if not _unchanged(folder, meta):  # bytes changed in place: rebuilt
            return None
        if shape[0] == 0:
            return Rows(np.zeros(shape, dtype=np.uint8)), meta
        file = open(folder / IMAGES_FILE, "rb", buffering=0)  # closed when the last Rows over it is gone
        if hasattr(os, "posix_fadvise"):  # batches pick rows at random: read just them, no readahead around them
            os.posix_fadvise(file.fileno(), 0, 0, os.POSIX_FADV_RANDOM)
        return Rows(np.memmap(file, dtype=np.uint8, mode="r", shape=shape), file=file), meta
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
        # pid and a random part (mkdtemp): two containers sharing the cache folder are often both
        # pid 1, and a name of the pid alone was the other run's temp folder too.
        tmp = Path(tempfile.mkdtemp(prefix=f"{TEMP_PREFIX}{os.getpid()}-", suffix=f"-{folder.name}", dir=parent))
        # mkdtemp's 0700 would make the cache this user's alone, where the memory cache's files
        # beside it follow the umask (a team's shared --cache-dir)
        with contextlib.suppress(OSError):  # a filesystem without modes (CIFS, FAT) keeps its own
            os.chmod(tmp, 0o777 & ~umask())
        held = os.open(tmp, os.O_RDONLY)  # ... and its pid alone cannot tell the other that it is live
        hold_as_writer(held)
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
        with _writing_back(path):
            filled, extra = decode_into(out)
        if n:
            out.flush()
        del out
        os.truncate(path, filled * row)
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        meta = {"format": DISK_CACHE_FORMAT, "shape": [filled, 3, h, w], "images_crc32": _crc32_of(path),
                "images_stat": _stat_key(path), **meta_of(extra)}
        with open(tmp / META_FILE, "w") as f:
            json.dump(meta, f)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.rename(tmp, folder)
        except OSError:
            if read_disk_cache(folder) is None:  # not a racing run's complete cache: a damaged one, replaced
                _replace_damaged(folder, tmp)
        _fsync_dir(parent)
    except OSError as e:
        if is_disk_full(e):
            raise CacheError(f"no space left for the decoded-image cache in {parent} ({n} images need "
                             f"{_size_text(n * 3 * h * w)}): "
                             f"free space, or point --cache-dir at a larger disk"
                             ) from None
        raise CacheError(f"cannot write the decoded-image cache in {parent}: {first_line(e)}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        os.close(held)
    got = read_disk_cache(folder)
    if got is None:
        raise CacheError(f"the decoded-image cache {folder} could not be read back")
    return got


def _stat_key(path) -> list:
    """What a write into the file changes (its inode, size, modification and change times)."""
    st = os.stat(path)
    return [st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]


def _unchanged(folder: Path, meta: dict) -> bool:
    """Whether the cache's images file holds the bytes its build wrote: at once where its stat is
    the one recorded; else (a write into it, a copy of the folder: cp -a, rsync, a restore) by
    its CRC-32, one read of the whole file (a cache of ImageNet's size is minutes of it), after
    which a good file's stat is recorded, so that a copy is read so once, not at every start."""
    path = folder / IMAGES_FILE
    stat = _stat_key(path)
    if stat == meta["images_stat"]:
        return True
    if _crc32_of(path) != meta["images_crc32"]:
        return False
    with contextlib.suppress(OSError):  # a folder this user cannot write: each start reads the CRC
        atomic_write(folder / META_FILE, json.dumps({**meta, "images_stat": stat}))
    return True


def _crc32_of(path) -> int:
    """zlib's CRC-32 of a file, read in blocks."""
    import zlib

    crc = 0
    with open(path, "rb") as f:
        while block := f.read(1 << 24):
            crc = zlib.crc32(block, crc)
    return crc


def _size_text(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{max(n / 2**20, 0.01):.2f} MiB"


def _replace_damaged(folder: Path, tmp: Path):
    """Rename the new cache `tmp` over a damaged cache folder (cut short, its header lost: a
    rename cannot replace a folder that holds files): the damaged one is moved aside first,
    then removed. A run racing to do the same may move it first, or put a complete cache there."""
    aside = Path(tempfile.mkdtemp(prefix=f"{TEMP_PREFIX}{os.getpid()}-", suffix="-damaged", dir=folder.parent))
    try:
        with contextlib.suppress(FileNotFoundError):
            os.rename(folder, aside / "cache")
        try:
            os.rename(tmp, folder)
        except OSError:
            if read_disk_cache(folder) is None:
                raise
    finally:
        shutil.rmtree(aside, ignore_errors=True)


WRITEBACK_EVERY = 0.25  # seconds between two syncs of the cache file while it is being filled


@contextlib.contextmanager
def _writing_back(path: Path):
    """Sync the file every WRITEBACK_EVERY seconds in a thread while the body fills it: rows go
    to disk while later ones are decoded, and the final sync (which waited for all of them,
    after all decoding) has only the last ones left. Errors are left to the final sync, which
    reports them."""
    fd = os.open(path, os.O_RDONLY)
    stop = threading.Event()
    sync = getattr(os, "fdatasync", os.fsync)

    def work():
        while not stop.wait(WRITEBACK_EVERY):
            try:
                sync(fd)
            except OSError:
                return

    t = threading.Thread(target=work, name="cnnx-cache-writeback", daemon=True)
    t.start()
    try:
        yield
    finally:
        stop.set()
        t.join()
        os.close(fd)


def _fsync_dir(path: Path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# --- reading batches ----------------------------------------------------------------------------

PREFETCH = 2  # batches read ahead of the one training


def batches(images, labels, index_batches, device):
    """(x, y) per batch of indices, in order. Resident tensors are indexed on their device (as
    always); Rows are read by a background thread PREFETCH batches ahead, into pinned
    memory on CUDA, and copied with non_blocking=True."""
    if not isinstance(images, Rows):
        for idx in index_batches:
            yield images[idx.to(images.device)], labels[idx.to(labels.device)]
        return
    dev = torch.device(device)
    pin = dev.type == "cuda"

    def read():
        for idx in index_batches:
            buf = torch.empty((len(idx), *images.base.shape[1:]), dtype=torch.uint8, pin_memory=pin)
            images.read(idx, buf.numpy())
            yield buf, idx

    with contextlib.closing(ahead_in_thread(read(), PREFETCH, name="cnnx-prefetch")) as ahead:
        for buf, idx in ahead:
            yield buf.to(dev, non_blocking=pin), labels[idx.to(labels.device)]
