"""Data sources for training: an image folder or CIFAR-10 through torchvision, each decoded
once into one uint8 tensor (N, 3, H, W) and kept on disk so a second run starts in seconds.

Image files are decoded by `cnnx.runtime.preprocess.load_image` (the one implementation of
the preprocess spec), so train-time evaluation and `cnnx classify` see identical arrays.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import os
import re
import shutil
import signal
import stat
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from cnnx.runtime.contract import is_hidden_name, is_image_name
from cnnx.runtime.files import (cache_root, escaped_name, first_line, name_text, names_line, remove_stale_temps,
                                sha256_of, shown, signals_blocked)
from cnnx.runtime.preprocess import PREPROCESS_VERSION, ImageError, load_image
from cnnx.train.cache import CacheError, build_disk_cache, read_disk_cache, take, use_disk

SPLIT_NAMES = ("train", "val", "test")
# The names a split folder goes by (any case): DIR/{train,valid}/<class>/* is the split layout too.
SPLIT_FOLDERS = {"train": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}
CACHE_FORMAT = 1  # bump when the cached file's layout changes


class DataError(Exception):
    """A data source that cannot be used; the message is one line for the user."""


@dataclass
class ImageFolderData:
    images: torch.Tensor  # uint8 (N, 3, H, W), RGB
    labels: torch.Tensor  # int64 (N,), index into class_names
    class_names: list
    paths: list  # str, sorted per class, in the order of images
    skipped: list = field(default_factory=list)  # (path, reason) of files not used: not decoded, not listed
    ignored: int = 0  # hidden names and files whose names are not image names
    notes: list = field(default_factory=list)  # lines for the user about the layout (nothing is wrong)
    # (path, st_dev, st_ino, is a symlink) of the files another name can reach: through a symlink,
    # or by other hard links (Listing.linked)
    linked: list = field(default_factory=list)


def cache_dir(explicit=None) -> Path:
    """--cache-dir, else $CNNX_CACHE, else $XDG_CACHE_HOME/cnnx, else ~/.cache/cnnx."""
    return cache_root(explicit)


def _visible(entries):
    return sorted(_no_folder_link_to_nowhere(e) for e in entries if not is_hidden_name(e.name))


def _no_folder_link_to_nowhere(entry: Path) -> Path:
    """entry, or DataError where it is a link to nothing under a name that is not an image's: a
    class or split folder on a drive not mounted, which was dropped as a non-image file (a
    class the model silently lacked)."""
    if entry.is_symlink() and not entry.exists() and not is_image_name(entry.name):
        raise DataError(f"{escaped_name(entry)} is a link to {escaped_name(os.readlink(entry))}, which is not there "
                        f"(a folder on a drive not mounted?): mount it, or remove the link")
    return entry


def folder_layout(root) -> dict:
    """{split: folder}: {"all": root} for DIR/<class>/*, or the present subset of
    train/val/test for DIR/{train,val,test}/<class>/* (SPLIT_FOLDERS: valid/ and validation/
    are val/). DataError for a missing/empty path, and for a split folder of that layout that
    holds no class folders (an unlabelled test/ of loose files, an empty val/): not a class."""
    root = Path(root).expanduser()
    if not root.exists():
        raise DataError(f"data folder not found: {root}")
    if not root.is_dir():
        raise DataError(f"data path is not a folder: {root}")
    subdirs = [e for e in _visible(root.iterdir()) if e.is_dir()]
    if not subdirs:
        raise DataError(f"no class folders in {root} (expected DIR/<class>/* or DIR/train/<class>/*)")
    # The split layout: a train/ holding folders itself (a dataset whose classes happen to be
    # called "train"/"test" holds files in them), beside nothing but splits, or beside a val/ or
    # test/ too. Then every folder beside it must be a split: an unlabelled/ or a second val/
    # taken as classes named train, val, ... trains a wrong model. A train/ of subfolders beside
    # other folders and no val/ or test/ is a class (car/ ship/ train/, each of years).
    trains = [d for d in subdirs if SPLIT_FOLDERS.get(d.name.lower()) == "train" and class_folders(d)]
    kinds = [SPLIT_FOLDERS.get(d.name.lower()) for d in subdirs]
    if not trains or (None in kinds and not {"val", "test"} & set(kinds)):
        return {"all": root}
    layout = f"the layout is {root}/{{train,val,test}}/<class>/*"
    splits, seen = {}, {}
    for d in subdirs:
        split = SPLIT_FOLDERS.get(d.name.lower())
        if split is None:
            raise DataError(f"{d} is not a split folder, beside {trains[0].name}/ and its class folders: {layout}; "
                            f"move {d.name}/ out of {root}")
        if split in splits:
            raise DataError(f"{splits[split].name}/ and {d.name}/ are both the {split} split of {root}: keep one")
        st = d.stat()
        same = seen.setdefault((st.st_dev, st.st_ino), d)
        if same is not d:
            link, target = (same, d) if same.is_symlink() else (d, same)
            raise DataError(f"{link.name}/ is {target.name}/ (a link) in {root}: the {SPLIT_FOLDERS[link.name.lower()]} "
                            f"split would be {SPLIT_FOLDERS[target.name.lower()]} images; each image belongs to one split")
        splits[split] = d
    for split, d in splits.items():
        if not class_folders(d):
            raise DataError(f"{d} holds no class folders, beside {splits['train'].name}/ (an unlabelled "
                            f"{split} split?): {layout}; move {d.name}/ out of {root}")
    return splits


def class_folders(folder: Path) -> list:
    """The visible subfolders of `folder`, sorted: the classes list_image_folder finds there."""
    return [e for e in _visible(Path(folder).iterdir()) if e.is_dir()]


@dataclass
class Listing:
    class_names: list
    # (path relative to the root, class index, mtime_ns, size, ctime_ns, inode), sorted per class: the
    # cache key. ctime and inode too: a file rewritten in place with its size and mtime put back
    # (touch -r, a copy that keeps times) keeps those two, and its cached pixels would be stale.
    files: list
    ignored: int = 0  # hidden names, and files whose names are not image names (a README beside the photos)
    unlisted: list = field(default_factory=list)  # (path, reason) of what the walk cannot or will not take
    # (path, st_dev, st_ino, is a symlink) of the files reached through a symlink (to a file, or
    # in a symlinked folder) or with other hard links
    linked: list = field(default_factory=list)
    nested: list = field(default_factory=list)  # class folders whose images are all in subfolders


def _walk_images(top: str, listing: Listing, class_index: int, root: str, walked: set):
    """Append the image files under `top` to the listing: a folder's files (sorted by name)
    before its subfolders, depth-first. A stack, not recursion, so a tree nested thousands of
    levels deep cannot raise RecursionError. Hidden names (contract.is_hidden_name) and names
    that are not image names are counted, not read. Symlinks, to files and to folders, are
    followed (as `cnnx classify --follow-symlinks` follows them); a folder is walked once
    (`walked`: (st_dev, st_ino) of those walked), so a loop or a second link to it is listed in
    `unlisted` with why, as is a link that points nowhere and a file that is not a regular one."""
    stack = [(top, os.path.islink(top))]
    while stack:
        folder, in_link = stack.pop()
        try:
            with os.scandir(folder) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as e:
            listing.unlisted.append((folder, f"cannot list folder: {e.strerror or first_line(e)}"))
            continue
        subfolders = []
        own = 0
        for e in entries:
            if is_hidden_name(e.name):
                listing.ignored += 1
                continue
            try:
                is_dir = e.is_dir()  # follows a symlink
            except OSError:
                is_dir = False
            if not is_dir and not is_image_name(e.name):
                listing.ignored += 1
                continue
            try:
                st = e.stat()
                link = in_link or e.is_symlink()
            except OSError as err:  # a link that points nowhere, or to itself; a file gone meanwhile
                listing.unlisted.append((e.path, f"cannot stat: {err.strerror or first_line(err)}"))
                continue
            if stat.S_ISDIR(st.st_mode):
                if (st.st_dev, st.st_ino) in walked:
                    listing.unlisted.append((e.path, "a folder walked already (a symlink loop, or a second link "
                                                     "to it); not followed"))
                else:
                    walked.add((st.st_dev, st.st_ino))
                    subfolders.append((e.path, link))
                continue
            if not stat.S_ISREG(st.st_mode):
                listing.unlisted.append((e.path, "not a regular file (a FIFO, socket or device); not opened"))
                continue
            if link or st.st_nlink > 1:
                listing.linked.append((e.path, st.st_dev, st.st_ino, e.is_symlink()))
            own += 1
            listing.files.append((os.path.relpath(e.path, root), class_index, st.st_mtime_ns, st.st_size,
                                  st.st_ctime_ns, st.st_ino))
        if folder == top and not own and subfolders:
            listing.nested.append(top)
        stack.extend(reversed(subfolders))


def _beside_folders(entry: Path, reason: str, unlisted: list) -> int:
    """An entry beside the class (or split) folders: an image name is appended to `unlisted`
    with `reason` (it belongs to no class); 1 where it is ignored (a hidden name, a name that is
    not an image's: AppleDouble's ._photo.jpg, a README), else 0."""
    if is_image_name(entry.name) and not is_hidden_name(entry.name):
        unlisted.append((str(entry), reason))
        return 0
    return 1


def list_image_folder(root: Path) -> Listing:
    """Classes are the sorted visible subfolders of root; a class folder holding no image file
    is a DataError (not a silent class the model can never learn), as is a class folder that is
    the root or another class (a symlink), a class name that is not UTF-8 (it travels in the
    model's metadata), and one file under two classes (through links). Image files beside the
    class folders belong to no class: they are listed in `unlisted`."""
    classes, listing = [], Listing([], [])
    for e in sorted(root.iterdir()):
        if not is_hidden_name(e.name) and _no_folder_link_to_nowhere(e).is_dir():
            classes.append(e)
        else:
            listing.ignored += _beside_folders(e, "not in a class folder; not used", listing.unlisted)
    if not classes:
        raise DataError(f"no class folders in {root} (expected {root}/<class>/<image files>)")
    st = root.stat()
    walked, idents = {(st.st_dev, st.st_ino)}, {(st.st_dev, st.st_ino): root}
    for c in classes:
        st = c.stat()
        same = idents.get((st.st_dev, st.st_ino))
        if same is not None:
            raise DataError(f"class folder {escaped_name(c)} is {'the data folder itself' if same == root else escaped_name(same)} "
                            f"(a symlink): each image needs one class; remove the link")
        idents[(st.st_dev, st.st_ino)] = c
        walked.add((st.st_dev, st.st_ino))
    names = [name_text(c.name) for c in classes]  # the folders' bytes as UTF-8, whatever the locale
    for c, name in zip(classes, names):
        try:
            name.encode("utf-8")
        except UnicodeEncodeError:
            raise DataError(f"class folder {escaped_name(c)}: its name is not UTF-8 text (class names travel in the "
                            f"model's metadata); rename it") from None
    _check_spelt_once(classes, names)
    listing.class_names = names
    for ci, c in enumerate(classes):
        before, listed = len(listing.files), len(listing.unlisted)
        _walk_images(str(c), listing, ci, str(root), walked)
        if len(listing.files) == before:
            unread = [reason for path, reason in listing.unlisted[listed:] if path == str(c)]
            if unread:  # the folder itself could not be listed (its permissions): not an empty class
                raise DataError(f"class folder {escaped_name(c)}: {unread[0]}")
            raise DataError(f"class folder {escaped_name(c)} holds no image files; add images to it or remove it")
    if listing.linked:
        _one_entry_a_file(listing, root)
    return listing


def _one_entry_a_file(listing: Listing, root: Path):
    """Links can name one file twice: once in its class is once too many (the later one is
    listed in `unlisted`), in two classes it is two labels for one image (a DataError)."""
    known = {path: (dev, ino) for path, dev, ino, _symlink in listing.linked}
    inodes = {ino for _dev, ino in known.values()}
    seen, kept = {}, []
    for f in listing.files:
        if f[5] not in inodes:  # f[5]: its file's inode (a symlink's target's): no other entry can be it
            kept.append(f)
            continue
        path = str(root / f[0])
        ident = known.get(path)
        if ident is None:  # a plain file with a link to it elsewhere (or an inode number on another device)
            try:
                st = os.stat(path)
            except OSError as err:
                listing.unlisted.append((path, f"cannot stat: {err.strerror or first_line(err)}"))
                continue
            ident = (st.st_dev, st.st_ino)
        first = seen.setdefault(ident, f)
        if first is f:
            kept.append(f)
        elif first[1] == f[1]:
            listing.unlisted.append((str(root / f[0]), f"the same file as {escaped_name(first[0])} (a link); used once"))
        else:
            raise DataError(f"{shown(root / first[0])} and {shown(root / f[0])} are one file (a link) in two classes, "
                            f"{names_line([listing.class_names[first[1]]])} and {names_line([listing.class_names[f[1]]])}: "
                            f"each image needs one class; remove one")
    listing.files = kept


def _decode_chunk(paths, spec, out):
    """Decode `paths` into the front rows of `out` (uint8 (len(paths), 3, H, W), or _FileRows);
    returns (indices of the decoded paths in the list, [(path, reason)] of the others)."""
    idx, errors = [], []
    for i, p in enumerate(paths):
        try:
            arr, _ = load_image(p, spec)
        except ImageError as e:
            errors.append((p, f"{e.stage}: {e}"))
            continue
        out[len(idx)] = arr
        idx.append(i)
    return idx, errors


def _end_with_parent(parent: int):
    """In a forked decode worker: the kernel ends it when its parent dies, SIGKILL included
    (Linux's PR_SET_PDEATHSIG). A fork holds copies of the parent's files: the run folder's lock
    (so a killed run stayed locked) and the parent's ends of the workers' pipes (so it never read
    EOF), and lived on. A parent gone before the call: exit now."""
    if sys.platform.startswith("linux"):
        import ctypes
        import signal

        try:
            ctypes.CDLL(None).prctl(1, int(signal.SIGKILL))  # 1: PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass
    if os.getppid() != parent:
        os._exit(1)


def _decode_worker(conn, paths, jobs, spec, cache_file=None, parent=None):
    """A decode process: for each job number it receives ((start, count) in `jobs`; None: no
    more) it decodes those paths and sends a header (job, indices, errors) over its own pipe,
    then the decoded rows as raw bytes from its buffer; with `cache_file` (the disk cache) it
    writes each row into the file itself (_FileRows) instead, and sends only the header.
    parent: the parent's pid, whose death ends this process (_end_with_parent)."""
    import signal

    import numpy as np

    if parent is not None:
        _end_with_parent(parent)
    # Ctrl-C, and a SIGTERM to the process group, are the parent's to handle; it ends us
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    h, w = spec["size"]
    fd = buf = None
    if cache_file is not None:
        fd = os.open(cache_file, os.O_WRONLY)
    else:
        buf = np.empty((max((c for _, c in jobs), default=0), 3, h, w), dtype=np.uint8)
    try:
        while (j := conn.recv()) is not None:
            start, count = jobs[j]
            if fd is not None:
                conn.send((j, *_decode_chunk(paths[start:start + count], spec, _FileRows(fd, start, 3 * h * w))))
                continue
            idx, errors = _decode_chunk(paths[start:start + count], spec, buf)
            conn.send((j, idx, errors))
            if len(idx):  # none of a job's files decoded (a run of HEIC photos): no rows (an empty view cannot cast)
                conn.send_bytes(memoryview(buf[:len(idx)]).cast("B"))
    except BaseException as e:  # MemoryError and the like: say what, then end
        try:
            conn.send(("error", f"{type(e).__name__}: {first_line(e)}"))
        except OSError:
            pass
    finally:
        if fd is not None:
            os.close(fd)
        conn.close()


class _FileRows:
    """Rows start, start+1, ... of the disk cache's file as a write-only sequence: `rows[k] = arr`
    is one pwrite, one copy into the page cache (writing through a mapping adds a page fault per
    4 KiB page to that copy)."""

    def __init__(self, fd: int, start: int, row_bytes: int):
        self.fd, self.start, self.row_bytes = fd, start, row_bytes

    def __setitem__(self, k: int, arr):
        import numpy as np

        data, offset = memoryview(np.ascontiguousarray(arr)).cast("B"), (self.start + k) * self.row_bytes
        while data:
            n = os.pwrite(self.fd, data, offset)
            data, offset = data[n:], offset + n


JOB_SHARE = 4  # a job is 1/(workers x JOB_SHARE) of the images not yet handed out: big jobs first, small ones last
MIN_JOB = 8  # images; a tiny JPEG decodes in tens of microseconds (load_image_steps.json): a message a job must not come more often
MAX_JOB_BYTES = 32 << 20  # decoded rows per job: a worker's buffer must not grow with the dataset
JOBS_AHEAD = 2  # jobs a worker holds, so it never waits for the parent between two


def decode_jobs(n: int, workers: int, row_bytes: int) -> list:
    """(start, count) of each decode job, in file order. Sizes shrink as the images left do
    (guided scheduling): with jobs handed out as workers finish them, all workers end within
    a small job of each other, whatever the images cost."""
    cap = max(1, MAX_JOB_BYTES // row_bytes)
    jobs, start = [], 0
    while start < n:
        count = min(n - start, cap, max(MIN_JOB, -(-(n - start) // (max(workers, 1) * JOB_SHARE))))
        jobs.append((start, count))
        start += count
    return jobs


class _WorkerDied(Exception):
    pass


def _worker_death(proc, n, spec, *, to_file: bool) -> str:
    """One line on a decode process that ended before sending all its results (to_file: they
    were decoded into the disk cache's file, not into memory)."""
    import signal

    proc.join(timeout=5)
    code = proc.exitcode
    h, w = spec["size"]
    need = n * 3 * h * w
    if code is not None and code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        line = f"a decode worker process was killed by {name} while decoding {n} images"
        if -code == signal.SIGKILL and to_file:  # the images go to the file: the processes' own memory ran out
            line += "; the usual cause is running out of memory: free memory, or lower --workers"
        elif -code == signal.SIGKILL:
            line += (f"; the usual cause is running out of memory (the decoded images alone need "
                     f"{need / 2**30:.2f} GiB = {n} x 3 x {h} x {w} bytes): free memory, lower --image-size "
                     f"or --workers, split the data, or --cache disk")
        return line
    return f"a decode worker process ended unexpectedly (exit status {code}) while decoding {n} images"


def _decode_all(paths, spec, *, workers, progress, out=None):
    """Decode paths in worker processes into `out` (uint8 (len(paths), 3, H, W); a new array
    when None, or the disk cache's mapping); returns (uint8 tensor of the decoded rows, packed
    to the front, kept indices, skipped).

    Jobs (decode_jobs) are handed out as workers finish them, JOBS_AHEAD at a time. Each worker
    has its own pipe, whose other end only it holds: a worker that dies (the OOM killer's
    SIGKILL) even half-way through a message gives EOF here, and the run ends with one line.
    (concurrent.futures' pool shares one result pipe among its workers; a worker killed
    mid-message leaves a partial message that its manager thread waits on forever.)"""
    import multiprocessing as mp

    import numpy as np
    from tqdm import tqdm

    n = len(paths)
    workers = workers if workers is not None else min(os.cpu_count() or 1, 8)
    h, w = spec["size"]
    jobs = decode_jobs(n, workers, 3 * h * w)
    if out is None:
        try:
            out = np.empty((n, 3, h, w), dtype=np.uint8)  # job j's decoded rows land at its start, packed
        except MemoryError:
            raise DataError(f"not enough memory for {n:,} decoded images of {h}x{w} px ({n * 3 * h * w / 2**20:,.0f} "
                            f"MiB): --cache disk keeps them in a file") from None
    # A disk cache's file: workers write their rows into it themselves, by name.
    cache_file = out.filename if isinstance(out, np.memmap) and out.filename else None
    kept_by_job, errors_by_job = {}, {}
    bar = tqdm(total=n, desc="decoding images", unit="img", file=sys.stderr, disable=not progress, leave=False)
    workers = min(workers, len(jobs))
    procs = {}
    try:
        if workers <= 1:
            for j, (start, count) in enumerate(jobs):
                kept_by_job[j], errors_by_job[j] = _decode_chunk(paths[start:start + count], spec, out[start:])
                bar.update(count)
        else:
            # fork, not spawn: spawn re-runs the caller's __main__ (breaking scripts without a main
            # guard). The children touch only Pillow and numpy, never torch's thread pools.
            ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
            for _ in range(workers):
                mine, theirs = ctx.Pipe(duplex=True)
                proc = ctx.Process(target=_decode_worker, args=(theirs, paths, jobs, spec, cache_file, os.getpid()),
                                   daemon=True)
                with signals_blocked({signal.SIGINT, signal.SIGTERM}):  # the workers ignore both
                    proc.start()
                theirs.close()  # the worker holds the only other end: its death is EOF here
                procs[mine] = proc
            _run_jobs(procs, jobs, out, cache_file is None, kept_by_job, errors_by_job, bar, n, spec)
    except _WorkerDied as e:
        raise DataError(str(e)) from None
    finally:
        bar.close()
        for conn, proc in procs.items():
            if proc.is_alive():
                proc.kill()
            proc.join()
            conn.close()
    # Pack the rows of all jobs to the front, in file order (every move is to a lower index).
    kept, skipped, filled = [], [], 0
    for j, (start, _) in enumerate(jobs):
        skipped.extend(errors_by_job[j])
        idx = kept_by_job[j]
        if filled != start:
            out[filled:filled + len(idx)] = out[start:start + len(idx)]
        filled += len(idx)
        kept.extend(start + i for i in idx)
    return torch.from_numpy(out[:filled]), kept, skipped


def _run_jobs(procs, jobs, out, rows_by_pipe, kept_by_job, errors_by_job, bar, n, spec):
    """Hand the jobs to the workers (JOBS_AHEAD each, then one per finished job) and collect
    their headers (and rows when rows_by_pipe) into out / kept_by_job / errors_by_job."""
    import multiprocessing as mp
    from multiprocessing.connection import wait

    given = 0
    busy = {conn: 0 for conn in procs}  # jobs handed to a worker and not yet back
    stopped = set()  # workers told there are no more jobs

    def hand_out(conn):
        nonlocal given
        if conn in stopped:
            return
        if given < len(jobs):
            conn.send(given)
            given += 1
            busy[conn] += 1
        else:
            conn.send(None)
            stopped.add(conn)

    def collect(conn):
        header = conn.recv()
        if header[0] == "error":
            raise DataError(f"a decode worker process failed: {header[1]}")
        j, idx, errors = header
        start = jobs[j][0]
        if rows_by_pipe and len(idx):  # as the worker sends them
            conn.recv_bytes_into(memoryview(out[start:start + len(idx)]).cast("B"))
        kept_by_job[j], errors_by_job[j] = idx, errors
        bar.update(jobs[j][1])
        busy[conn] -= 1
        hand_out(conn)

    conn = None
    try:
        for _ in range(JOBS_AHEAD):
            for conn in procs:
                hand_out(conn)
        while any(busy.values()):
            for conn in wait([c for c, b in busy.items() if b]):
                collect(conn)
    except (EOFError, OSError, mp.BufferTooShort):
        raise _WorkerDied(_worker_death(procs[conn], n, spec, to_file=not rows_by_pipe)) from None


def ignored_line(n: int) -> str:
    """What train and evaluate say of the files a folder's walk passed over."""
    return f"ignored {n} file(s) that are hidden or not image names"


def load_image_folder(root, spec, *, progress=True, cache=None, workers=None, use_cache=True,
                      cache_mode="memory", listing: Listing | None = None) -> ImageFolderData:
    """Decode DIR/<class>/<files> into uint8 (N, 3, H, W) through the preprocess spec.

    Classes are the sorted visible subfolders (label id = index); the image files (by name,
    as `cnnx classify` picks them) are sorted per class; unreadable files are skipped and
    listed in `.skipped` as (path, reason). The result is cached under the cache dir, keyed
    by the folder, its file list with mtimes, sizes, ctimes and inodes, the spec and PREPROCESS_VERSION.
    cache_mode (memory | disk | auto, see cnnx.train.cache.use_disk): disk keeps the images in a
    memory-mapped cache file and `.images` is a cnnx.train.cache.Rows (rows read when asked).
    listing: list_image_folder of the resolved root, where the caller has made it already."""
    root = Path(root).expanduser().resolve()
    if not root.exists():
        raise DataError(f"data folder not found: {root}")
    if not root.is_dir():
        raise DataError(f"data path is not a folder: {root}")
    listing = listing if listing is not None else list_image_folder(root)
    class_names, files = listing.class_names, listing.files
    cache_file = _cache_file(cache_dir(cache) / "folders", root, spec, files)
    unlisted = [(str(p), r) for p, r in listing.unlisted]
    h, w = spec["size"]
    if use_disk(cache_mode, len(files) * 3 * h * w):
        data = _disk_cache_data(cache_file.with_suffix(".u8"), root, listing, spec, workers=workers, progress=progress)
    else:
        data = _read_cache(cache_file, root) if use_cache else None
        if data is None and use_cache:
            _drop_stale_decodings(cache_file, root, spec)
    if data is None:
        abs_paths = [str(root / f[0]) for f in files]
        images, kept, skipped = _decode_all(abs_paths, spec, workers=workers, progress=progress)
        labels = torch.tensor([files[i][1] for i in kept], dtype=torch.int64)
        paths = [files[i][0] for i in kept]
        skipped_rel = [(os.path.relpath(p, root), r) for p, r in skipped]
        if use_cache:
            _write_cache(cache_file, {"images": images, "labels": labels, "class_names": class_names,
                                      "paths": paths, "skipped": skipped_rel})
        data = ImageFolderData(images, labels, class_names, [str(root / p) for p in paths],
                               [(str(root / p), r) for p, r in skipped_rel])
    data.skipped = unlisted + data.skipped
    data.ignored = listing.ignored
    data.linked = listing.linked
    if len(listing.nested) == len(class_names):
        data.notes.append(f"every class folder of {escaped_name(root)} holds its images in subfolders only: the classes are "
                          f"the folders directly under it ({names_line(class_names, 5)}), each with all its subfolders")
    counts = torch.bincount(data.labels, minlength=len(class_names)).tolist()
    empty = [c for c, k in zip(class_names, counts) if k == 0]
    if empty:
        raise DataError(f"class folder {shown(root / empty[0])} holds no image that can be decoded "
                        f"({len(empty)} such class(es)); fix or remove it")
    return data


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def _decoding(root: Path, spec, preprocess_version: int = PREPROCESS_VERSION) -> str:
    return _digest({"root": str(root), "spec": spec, "preprocess_version": preprocess_version,
                    "cache_format": CACHE_FORMAT})


# Cache entries are named <decoding>-<content> from this PREPROCESS_VERSION on; before, one digest.
FIRST_NAMED_VERSION = 2
UNNAMED_ENTRY = re.compile(r"[0-9a-f]{32}\.(pt|u8)")


def _cache_file(cache_folder: Path, root: Path, spec, files) -> Path:
    """`<decoding>-<content>.pt` in cache_folder: the decoding names the folder and how it is
    decoded (one cache entry each), the content its files with their mtimes, sizes, ctimes and
    inodes. A folder whose files changed gets a new entry, which replaces the old one."""
    return cache_folder / f"{_decoding(root, spec)}-{_digest(files)}.pt"


def _drop_stale_decodings(cache_file: Path, root: Path, spec):
    """Remove the cache entries of cache_file's folder and decoding for other contents (.pt files
    and .u8 folders), and those of an earlier PREPROCESS_VERSION, before its own is written:
    decodings of a folder as it was before its files changed, or by an older load_image, are
    never read again, and each can be gigabytes; so are the entries of every folder that cnnx
    named before 60d4e8d (<32 hex digits>.pt and .u8), whichever folder they were of. A run
    reading one now keeps its open file; temp files of running builds have other names."""
    prefixes = [_decoding(root, spec, v) for v in range(FIRST_NAMED_VERSION, PREPROCESS_VERSION + 1)]
    named = (old for prefix in prefixes for old in cache_file.parent.glob(f"{prefix}-*"))
    unnamed = (old for old in cache_file.parent.glob("*") if UNNAMED_ENTRY.fullmatch(old.name))
    for old in itertools.chain(named, unnamed):
        if old.stem == cache_file.stem:
            continue
        if old.is_dir():
            shutil.rmtree(old, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):  # gone already (another run), or not ours to remove
                old.unlink()


def _disk_cache_data(folder: Path, root: Path, listing: Listing, spec, *, workers, progress) -> ImageFolderData:
    """The folder's images from its disk cache (built first when absent): Rows over its file."""
    got = read_disk_cache(folder)
    if got is None:
        _drop_stale_decodings(folder, root, spec)
        files = listing.files

        def decode_into(out):
            _, kept, skipped = _decode_all([str(root / f[0]) for f in files], spec, workers=workers,
                                           progress=progress, out=out)
            return len(kept), (kept, skipped)

        def meta_of(extra):
            kept, skipped = extra
            return {"labels": [files[i][1] for i in kept], "class_names": listing.class_names,
                    "paths": [files[i][0] for i in kept],
                    "skipped": [(os.path.relpath(p, root), r) for p, r in skipped]}

        try:
            got = build_disk_cache(folder, len(files), spec["size"], decode_into, meta_of)
        except CacheError as e:
            raise DataError(str(e)) from None
    rows, meta = got
    return ImageFolderData(rows, torch.tensor(meta["labels"], dtype=torch.int64), list(meta["class_names"]),
                           [str(root / p) for p in meta["paths"]], [(str(root / p), r) for p, r in meta["skipped"]])


def _read_cache(cache_file: Path, root: Path):
    import zipfile

    if not cache_file.exists():
        return None
    try:
        with zipfile.ZipFile(cache_file) as z:  # torch.load does not check its entries' CRCs: bytes zeroed in place
            if z.testzip() is not None:  # were images of zeros, trained on
                return None
        c = torch.load(cache_file, map_location="cpu", weights_only=True)
        return ImageFolderData(c["images"], c["labels"], list(c["class_names"]), [str(root / p) for p in c["paths"]],
                               [(str(root / p), r) for p, r in c["skipped"]])
    except Exception:  # a damaged cache file is rebuilt, never trusted
        return None


def _write_cache(cache_file: Path, obj: dict):
    """Complete or absent (files.atomic_file); temp files of killed runs are removed first."""
    from cnnx.train.checkpoint import save_torch_file  # torch's writer turns ENOSPC into a RuntimeError; this says OSError

    try:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(cache_file.parent)
        save_torch_file(cache_file, lambda f: torch.save(obj, f))
    except OSError as e:  # a read-only or full cache costs speed, not correctness
        print(f"warning: cannot write the data cache {cache_file}: {first_line(e)}", file=sys.stderr)


# --- CIFAR-10 through torchvision ---------------------------------------------------------

CIFAR10_HOST = "www.cs.toronto.edu"


def _online(host, timeout=3.0) -> bool:
    import socket

    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _cifar10_present(root: Path) -> bool:
    """Every batch file of the python version is there with its published md5."""
    from torchvision.datasets import CIFAR10
    from torchvision.datasets.utils import check_integrity

    return all(check_integrity(str(root / CIFAR10.base_folder / name), md5)
               for name, md5 in CIFAR10.train_list + CIFAR10.test_list)


def load_cifar10(data_root, *, train: bool, download=True):
    """(images uint8 (N,3,32,32), labels int64, class_names) of the CIFAR-10 train or test split."""
    from torchvision.datasets import CIFAR10

    root = Path(data_root).expanduser()
    if not _cifar10_present(root):
        if not download or not _online(CIFAR10_HOST):
            raise DataError(
                f"CIFAR-10 is not in {root} (it holds no complete cifar-10-batches-py) and cannot be downloaded "
                f"(offline); pass --data-root with a folder holding cifar-10-batches-py, or --data DIR with an "
                f"image folder (DIR/<class>/*)"
            )
        try:
            root.mkdir(parents=True, exist_ok=True)
            CIFAR10(str(root), train=True, download=True)
        except Exception as e:  # network errors arrive in many types
            raise DataError(f"downloading CIFAR-10 into {root} failed: {first_line(e, 200)}") from None
    ds = CIFAR10(str(root), train=train, download=False)
    images = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()
    return images, torch.tensor(ds.targets, dtype=torch.int64), list(ds.classes)


# --- splits ---------------------------------------------------------------------------------

SPLIT_BY_NAME = 3  # the split a run records as its "split" (a config without one: SPLIT_BY_GENERATOR)
SPLIT_BY_FIRST_NAME = 2  # runs before it: a file's name as its str's UTF-8; copies take the first's in path order
SPLIT_BY_GENERATOR = 1
SPLIT_METHODS = (SPLIT_BY_GENERATOR, SPLIT_BY_FIRST_NAME, SPLIT_BY_NAME)


def split_method(config: dict) -> int:
    """The split a run's config records (a config without one: SPLIT_BY_GENERATOR's run)."""
    return config.get("split", SPLIT_BY_GENERATOR)


def name_bytes(text: str, method: int) -> bytes:
    """A file name (or a list of them) as a split `method` hashes it: its bytes on disk whatever
    the locale (SPLIT_BY_NAME), or, for the runs before it, the str's UTF-8 (other bytes under a
    locale not UTF-8)."""
    return os.fsencode(text) if method >= SPLIT_BY_NAME else text.encode("utf-8", "surrogateescape")


def stratified_split(labels: torch.Tensor, fraction: float, seed: int, keys=None, method: int = SPLIT_BY_NAME,
                     copies=()):
    """(train_idx, val_idx): `fraction` of each class (at least one image when a class has two
    or more) held out; both sorted. SPLIT_BY_NAME: each class's images ranked by a hash of the
    seed and their key (`keys[i]`: the file's path under the data folder, as its bytes on disk
    whatever the locale; default its index), the first held out, so a photo added to a class
    moves at most one other file of that class (to the other side) and none of any other.
    `copies` (groups of indices: identical_files): in each class, the copies of one file are one
    image, ranked where the first-ranked of them is and counted once, so a copy added to a class
    is no new image there: it goes to its original's side, and where it ranks first and takes
    its original into the held-out images, one other image leaves them.
    SPLIT_BY_FIRST_NAME, the split of runs before it: keys as the str's UTF-8 (another locale's
    file system encoding gave other bytes), the copies keyed as the first in path order
    (run_split) and counted each. SPLIT_BY_GENERATOR, the split of runs before that: one
    generator drawn class by class (one new file re-drew every class after it)."""
    g = torch.Generator().manual_seed(int(seed))
    if method != SPLIT_BY_GENERATOR:
        def key_bytes(i) -> bytes:
            return f"{seed}\0".encode() + name_bytes(str(i if keys is None else keys[i]), method)

        digest = {i: hashlib.sha256(key_bytes(i)).digest() for i in range(len(labels))}
    image_of = {}  # a copy's index -> the first index of its copies in its class (one image)
    for group in copies if method == SPLIT_BY_NAME else ():
        first = {}
        for i in group:
            image_of[i] = first.setdefault(int(labels[i]), i)
        for i in group:
            digest[image_of[i]] = min(digest[image_of[i]], digest[i])
    val = []
    for c in torch.unique(labels).tolist():
        idx = torch.nonzero(labels == c).flatten()
        if method == SPLIT_BY_GENERATOR:
            val.append(idx[torch.randperm(len(idx), generator=g)[:_held_out_count(fraction, len(idx))]])
            continue
        if method == SPLIT_BY_FIRST_NAME:
            k = _held_out_count(fraction, len(idx))
            rank = sorted(idx.tolist(), key=digest.get)
            while 0 < k < len(rank) and digest[rank[k]] == digest[rank[k - 1]]:
                k -= 1  # images of one key (copies of one file) stay on one side: the training side
            val.append(torch.tensor(rank[:k], dtype=torch.int64))
            continue
        images = {}
        for i in idx.tolist():
            images.setdefault(image_of.get(i, i), []).append(i)
        rank = sorted(images, key=digest.get)
        held = rank[:_held_out_count(fraction, len(rank))]
        val.append(torch.tensor([i for image in held for i in images[image]], dtype=torch.int64))
    val_idx = torch.sort(torch.cat(val)).values if val else torch.empty(0, dtype=torch.int64)
    mask = torch.ones(len(labels), dtype=torch.bool)
    mask[val_idx] = False
    return torch.nonzero(mask).flatten(), val_idx


def _held_out_count(fraction: float, n: int) -> int:
    """Of n images of a class: `fraction` of them, rounded; at least one and at most n - 1 where n >= 2."""
    return min(max(int(round(fraction * n)), 1), n - 1) if n >= 2 else 0


@dataclass
class Splits:
    train: tuple  # (images, labels)
    val: tuple
    test: tuple | None
    class_names: list
    skipped: list
    source: str  # a one-line description for the log
    val_paths: list | None = None  # source file of each validation image (image folders)
    ignored: int = 0  # hidden names and files whose names are not image names
    notes: list = field(default_factory=list)  # ImageFolderData.notes of each split, and the splits' own
    train_paths: list | None = None  # source file of each training image (image folders)
    # the folders holding the class folders of val_paths and train_paths (what their paths are
    # recorded relative to: a data folder moved elsewhere is still the run's)
    val_root: str | None = None
    train_root: str | None = None


def _copies_across_splits(groups, named) -> list:
    """Notes for the val/ and test/ images that are byte-identical copies of train/ images
    (their figures are not of unseen images); `named`: (split, path) of every split's files,
    `groups`: identical_files of those paths."""
    counts = {}
    for group in groups:
        splits = {named[i][0] for i in group}
        if "train" in splits:
            for i in group:
                if named[i][0] != "train":
                    counts[named[i][0]] = counts.get(named[i][0], 0) + 1
    return [f"{n} {name}/ image(s) are byte-identical copies of train/ images: their {name} figures are not of "
            f"unseen images" for name, n in sorted(counts.items(), key=lambda kv: kv[0] != "val")]


def _check_classes(names, where):
    if len(names) < 2:
        raise DataError(f"{where} has {len(names)} class ({names_line(names) or 'none'}); training needs at least 2")


def _copy_rows(images, idx):
    """take(images, idx): DataError where the memory cannot hold the copy (`--cache memory`
    beyond what is free: the decoded images fit, their split copies did not)."""
    try:
        return take(images, idx)
    except (MemoryError, RuntimeError):  # the copy's allocation: nothing else fails indexing decoded rows
        raise DataError(f"not enough memory for a copy of {len(idx):,} decoded images: --cache disk keeps them in a "
                        f"file") from None


def run_split(config: dict, labels, folder=None, paths=None, copies=None):
    """(train_idx, val_idx) of the held-out split a run config names (val_fraction, split_seed,
    split) over the images `labels`, `paths` of `folder` (none: CIFAR-10's arrays). `copies`
    (identical_files of `paths`): the copies of a file in its class take its key, so they are
    held out, or trained on, together (a copy validated on its trained original is no
    held-out image: photo folders hold "IMG_1 (1).jpg", an album exported twice)."""
    method = split_method(config)
    if method not in SPLIT_METHODS:
        raise DataError(f"the run held its images out by a method this cnnx does not know (split {method!r}): use the "
                        f"cnnx that began it")
    keys = None if folder is None else [os.path.relpath(p, Path(folder).expanduser().resolve()) for p in paths]
    copies = copies if keys is not None and copies else ()
    if method == SPLIT_BY_FIRST_NAME:  # its runs' rule: the first copy's key, in path order
        for group in copies:
            first = {}
            for i in group:
                keys[i] = keys[first.setdefault(int(labels[i]), i)]
        copies = ()
    return stratified_split(labels, config["val_fraction"], config["split_seed"], keys, method, copies)


def identical_files(paths) -> list:
    """Groups (lists of indices into `paths`, two or more) of files with the same bytes: the
    sizes first, then a sha256 of each file whose size another has. Unreadable files are left out."""
    import collections

    by_size = collections.defaultdict(list)
    for i, p in enumerate(paths):
        with contextlib.suppress(OSError):
            by_size[os.stat(p).st_size].append(i)
    by_bytes = collections.defaultdict(list)
    for same in by_size.values():
        if len(same) > 1:
            for i in same:
                with contextlib.suppress(OSError):
                    by_bytes[sha256_of(paths[i])].append(i)
    return [group for group in by_bytes.values() if len(group) > 1]


def copies_notes(groups, labels, paths) -> list:
    """What the copies among a folder's files mean for the user: copies in one class (kept on
    one side of the split) and copies under two classes (one image, two labels)."""
    import itertools

    notes, crossed = [], [g for g in groups if len({int(labels[i]) for i in g}) > 1]
    same = sum(len(g) - len({int(labels[i]) for i in g}) for g in groups)
    if same:
        notes.append(f"{same} file(s) are byte-identical copies of another in their class: each on the same side of "
                     f"the validation split as it")
    if crossed:
        a, b = next((i, j) for i, j in itertools.combinations(crossed[0], 2) if int(labels[i]) != int(labels[j]))
        notes.append(f"{len(crossed)} image(s) are filed, as byte-identical copies, under two or more classes "
                     f"({escaped_name(paths[a])} = {escaped_name(paths[b])}): the model is taught two labels for one "
                     f"image; keep each in one class folder")
    return notes


def load_splits(config: dict, *, progress=True, workers=None, cache_mode="memory", train_spec=None) -> Splits:
    """Train/val(/test) splits of the data a resolved run config names (keys: data, data_root,
    cache_dir, preprocess, val_fraction, split_seed, split: SPLIT_BY_GENERATOR where absent, as
    the runs before it). Validation is the folder's val split when it
    has one, else a stratified `val_fraction` of train; the test split is never used to select.
    train_spec: the training images decoded through another spec (stored larger for random-resized-
    crop); validation and test always go through `preprocess` exactly, as export and classify do.
    cache_mode: see load_image_folder (the images of a disk cache are Rows, read per batch)."""
    spec = config["preprocess"]
    data = config["data"]

    if data == "cifar10":
        root = config.get("data_root") or str(cache_dir(config.get("cache_dir")) / "datasets")
        x, y, names = load_cifar10(root, train=True)
        xt, yt, _ = load_cifar10(root, train=False, download=False)
        if list(spec["size"]) != [32, 32]:
            raise DataError(f"CIFAR-10 images are 32x32; this arch wants {spec['size']}: use an image folder")
        tr, va = run_split(config, y)
        return Splits((x[tr], y[tr]), (x[va], y[va]), (xt, yt), names, [], f"CIFAR-10 from {root}")
    layout = folder_layout(data)
    listed = {}  # folder -> its Listing, where made before any decoding (the split layout)

    def load(folder, decode_spec=spec):
        return load_image_folder(folder, decode_spec, progress=progress, cache=config.get("cache_dir"),
                                 workers=workers, cache_mode=cache_mode, listing=listed.get(folder))

    def train_images(folder, d):
        """The training split's images: d's own, or the same files decoded through train_spec."""
        if train_spec is None or train_spec == spec:
            return d.images
        t = load(folder, train_spec)
        if t.paths != d.paths:
            raise DataError(f"{folder} changed while it was decoded twice (for training and validation); run again")
        return t.images

    if "all" in layout:
        d = load(layout["all"])
        _check_classes(d.class_names, data)
        copies = identical_files(d.paths)
        tr, va = run_split(config, d.labels, layout["all"], d.paths, copies)
        xtr = train_images(layout["all"], d)
        in_val = torch.bincount(d.labels[va], minlength=len(d.class_names)).tolist()
        unseen = [c for c, k in zip(d.class_names, in_val) if k == 0]
        notes = d.notes + copies_notes(copies, d.labels, d.paths) + ([f"{len(unseen)} class(es) too small for a validation image: {names_line(unseen, 5)} (their val top-1 is not measured)"] if unseen else [])
        return Splits((_copy_rows(xtr, tr), d.labels[tr]), (_copy_rows(d.images, va), d.labels[va]), None, d.class_names, d.skipped,
                      f"{len(d.labels)} images in {len(d.class_names)} classes from {data}",
                      [d.paths[i] for i in va.tolist()], d.ignored, notes, [d.paths[i] for i in tr.tolist()],
                      layout["all"], layout["all"])
    if "train" not in layout:
        raise DataError(f"{data} has {'/'.join(sorted(layout))} but no train/ split to train on")
    # Every split is listed, and checked for files another split holds too (cp -al train val),
    # before any is decoded: that mistake is found in a second, not after the decoding.
    listed.update({folder: list_image_folder(Path(folder).expanduser().resolve()) for folder in layout.values()})
    _check_apart(layout, {name: listed[folder] for name, folder in layout.items()})
    # With a val/ folder the training files are decoded once, through the training spec.
    d = load(layout["train"], train_spec if "val" in layout and train_spec is not None else spec)
    _check_classes(d.class_names, layout["train"])
    skipped, ignored, paths, notes = list(d.skipped), d.ignored, {}, list(d.notes)
    # Files beside the split folders belong to no split: listed as the flat layout lists files
    # beside its class folders (they were passed over without a word)
    for e in sorted(Path(data).expanduser().iterdir()):
        if not e.is_dir():
            ignored += _beside_folders(e, "not in a split's class folder; not used", skipped)

    def other(name):
        nonlocal ignored
        if name not in layout:
            return None
        o = load(layout[name])
        skipped.extend(o.skipped)
        ignored += o.ignored
        notes.extend(o.notes)
        paths[name] = o.paths
        if o.class_names != d.class_names:
            extra = sorted(set(o.class_names) - set(d.class_names))
            if extra:
                raise DataError(f"{layout[name]} has classes that train/ lacks: {names_line(extra)}"
                                f"{respelt_note(extra, d.class_names, 'train/')}")
            missing = [c for c in d.class_names if c not in o.class_names]
            notes.append(f"{layout[name]} has no folder for {len(missing)} class(es) of train/: "
                         f"{names_line(missing, 5)} (no {name} images of them)")
            remap = torch.tensor([d.class_names.index(c) for c in o.class_names])
            return o.images, remap[o.labels]
        return o.images, o.labels

    val = other("val")
    test = other("test")
    # one pass over every split's files: the copies across splits, and train/'s own
    named = [("train", p) for p in d.paths] + [(name, p) for name, ps in paths.items() for p in ps]
    groups = identical_files([p for _, p in named])
    notes.extend(_copies_across_splits(groups, named))
    xtr = d.images if "val" in layout else train_images(layout["train"], d)
    if val is None:
        copies = [g for g in ([i for i in group if i < len(d.paths)] for group in groups) if len(g) > 1]
        notes.extend(copies_notes(copies, d.labels, d.paths))
        tr, va = run_split(config, d.labels, layout["train"], d.paths, copies)
        train, val = (_copy_rows(xtr, tr), d.labels[tr]), (_copy_rows(d.images, va), d.labels[va])
        paths["val"] = [d.paths[i] for i in va.tolist()]
        train_paths = [d.paths[i] for i in tr.tolist()]
    else:
        train, train_paths = (xtr, d.labels), d.paths
    return Splits(train, val, test, d.class_names, skipped,
                  f"{len(train[1])} train / {len(val[1])} val images in {len(d.class_names)} classes from {data}",
                  paths["val"], ignored, notes, train_paths, layout["val" if "val" in layout else "train"],
                  layout["train"])


def _check_spelt_once(classes, names) -> None:
    """DataError for two class folders whose names are the same letters in other Unicode code
    points (café composed and decomposed: one folder copied from macOS beside one typed here):
    they were two classes of the same name, and every output showed two identical labels.
    names: the folders' class names (name_text)."""
    import unicodedata

    seen = {}
    for c, name in zip(classes, names):
        other = seen.setdefault(unicodedata.normalize("NFC", name), c)
        if other is not c:
            raise DataError(f"class folders {escaped_name(other)} and {escaped_name(c)} are the same name in other "
                            "Unicode code points (composed vs decomposed accents): they would be two classes; "
                            "merge them, or rename one")


def respelt_note(names, known, where: str) -> str:
    """' (café: the same letters as in WHERE, ...)' for the names of `names` that are names of
    `known` in other Unicode code points (a folder copied from macOS: decomposed accents), else ''."""
    import unicodedata

    nfc = {unicodedata.normalize("NFC", c) for c in known}
    respelt = [c for c in names if unicodedata.normalize("NFC", c) in nfc]
    return (f" ({', '.join(respelt)}: the same letters as in {where}, in other Unicode code points (composed vs "
            f"decomposed accents); rename one folder)" if respelt else "")


def _check_apart(layout: dict, listed: dict) -> None:
    """DataError where a file of one split is a file of another: a hard link, or a symlink into
    the other split's folder (cp -al train val, val/cat -> ../train/cat) would score images the
    model trained on (or was chosen on) as unseen ones. `listed`: split -> its Listing. Only files
    another name can reach (Listing.linked) are looked at, with what the listing's walk found: a plain tree costs
    nothing, and a folder's real path is resolved once, not once a file."""
    def shared(path, a, b):
        return DataError(f"{escaped_name(path)} is a file of {layout[a].name}/ too (a link): the {b} split would "
                         f"hold {a} images; each image belongs to one split")

    first = {}  # (st_dev, st_ino) -> split
    folders = {name: os.path.join(os.path.realpath(layout[name]), "") for name in listed}
    real_dirs = {}
    for b, listing in listed.items():
        for path, dev, ino, symlink in listing.linked:
            a = first.setdefault((dev, ino), b)
            if a != b:
                raise shared(path, a, b)
            if symlink:
                real = os.path.realpath(path)
            else:
                parent, name = os.path.split(path)
                if parent not in real_dirs:
                    real_dirs[parent] = os.path.realpath(parent)
                real = os.path.join(real_dirs[parent], name)
            for a, folder in folders.items():
                if a != b and real.startswith(folder):
                    raise shared(path, a, b)


def validation_split(config: dict):
    """Re-create the exact validation split of a run from its checkpoint's `config`:
    (images uint8 (N,3,H,W), labels int64, class_names). DataError when the source is gone."""
    need = [k for k in ("data", "preprocess", "val_fraction", "split_seed") if k not in config]
    if need:
        raise DataError(f"the checkpoint's config lacks {need}: it was not written by `cnnx train`")
    s = load_splits(config, progress=False)
    return s.val[0], s.val[1], s.class_names
