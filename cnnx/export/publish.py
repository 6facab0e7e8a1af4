"""How an export reaches its output folder: whole, or not at all.

The export is built in a hidden staging folder beside the output folder (same filesystem,
named `.cnnx-export-<pid>-*` so `cnnx classify`'s search for the newest model skips it and
the next export can remove it when its process died), then swapped in:

- the output folder does not exist yet: one rename;
- it exists: Linux renameat2(RENAME_EXCHANGE) swaps the two folders in one step, then the
  old export (now in the staging folder's place) is removed. Where the filesystem cannot
  exchange, the old folder is renamed aside, the new one in, then the old one removed; a
  kill between those two renames leaves no output folder and the old export whole in a
  hidden `.cnnx-export-old-<pid>-*` folder, which is never removed automatically (never a
  mix, and nothing lost).

The new folder takes the replaced one's mode, owner and group (as far as this user may set
them). A mount point cannot be renamed over: it is refused before the export's work.

An existing output folder is replaced only when everything in it is a file an export
writes (cnnx.export.writers.EXPORT_FILES, by name, holding cnnx's metadata): the swap moves the whole folder, so a folder
holding anything else (a user's notes, a run's best.pt) is refused instead, and cnnx never
moves or deletes files it did not write. Publishing file by file into such a folder would
bring back the mixed folder a kill can leave, so it is not offered.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import shutil
import stat
import tempfile
import zipfile
from pathlib import Path

from cnnx.export.errors import ExportError
from cnnx.runtime.contract import EXTRA_FILE, peek_metadata_props
from cnnx.runtime.files import fsync_dir, hold_as_writer, os_error_line, remove_stale_temps, umask

STAGING_PREFIX = ".cnnx-export-"
_held = {}  # staging folder -> the descriptor by which this process holds it
_AT_FDCWD = -100
_RENAME_EXCHANGE = 2
MAX_PARITY_BYTES = 16 << 20  # a parity.json is a few KB: a larger file named so is not read whole


def resolve_out_dir(out_dir, export_files) -> Path:
    """The folder to publish to (a symlink's target: the link stays), checked up front: a
    new or empty folder, or one holding only `export_files` (a previous export)."""
    out_dir = Path(os.path.abspath(Path(out_dir).expanduser()))
    if out_dir.is_symlink():
        out_dir = Path(os.path.realpath(out_dir))
    if out_dir.exists() and not out_dir.is_dir():
        raise ExportError(f"output folder {out_dir} is a file, not a folder")
    if out_dir.is_dir():
        try:
            entries = list(os.scandir(out_dir))
        except OSError as e:
            raise ExportError(f"cannot read output folder: {os_error_line(e, out_dir)}") from None
        foreign = sorted(e.name for e in entries if e.name not in export_files or not e.is_file(follow_symlinks=False)
                         or not _written_by_cnnx(Path(e.path)))
        if foreign:
            shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
            raise ExportError(f"output folder {out_dir} holds files cnnx export did not write ({shown}); an export "
                              "replaces its whole folder: choose a new or empty folder, or a previous export's")
        if not os.access(out_dir, os.W_OK):
            # The swap needs only the parent's permission, but a folder its user may not write is
            # one they protected, and the old export swapped out of it could not be removed.
            read_only = bool(os.statvfs(out_dir).f_flag & os.ST_RDONLY)  # access() says only no
            raise ExportError(f"cannot write to output folder {out_dir}: "
                              f"{os.strerror(errno.EROFS if read_only else errno.EACCES)}")
        if os.path.ismount(out_dir):  # before the export's work: the swap's rename would fail after it
            raise ExportError(f"output folder {out_dir} is a mount point, which an export cannot replace whole (it is "
                              f"built beside it, then renamed into its place): export to a folder inside it, "
                              f"e.g. --out {out_dir / 'export'}")
    return out_dir


def _written_by_cnnx(path: Path) -> bool:
    """Whether a file with an export's name holds what an export writes there (a user's own
    model.onnx, or another tool's, has the name and not cnnx's metadata): ONNX models carry
    cnnx.* metadata, torch archives their cnnx.json, parity.json its verdict."""
    if path.suffix == ".onnx":
        props = peek_metadata_props(path)
        return props is not None and any(key.startswith("cnnx.") for key in props)
    try:
        if path.suffix in (".pt", ".pt2"):
            with zipfile.ZipFile(path) as z:
                return any(name.endswith("/extra/" + EXTRA_FILE) for name in z.namelist())
        with open(path, "rb") as f:
            data = f.read(MAX_PARITY_BYTES + 1)
        if len(data) > MAX_PARITY_BYTES:
            return False
        record = json.loads(data)
        return isinstance(record, dict) and "passed" in record and "results" in record
    except (OSError, ValueError, zipfile.BadZipFile):  # ValueError: not JSON, or not UTF-8
        return False


def make_staging(out_dir: Path):
    """(staging folder, folders created for it, outermost last). Removes the staging folders
    that exports killed earlier left beside out_dir."""
    parent = out_dir.parent
    created = [p for p in [parent, *parent.parents] if not p.exists()]
    try:
        parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(parent, (STAGING_PREFIX,))
        staging = Path(tempfile.mkdtemp(prefix=f"{STAGING_PREFIX}{os.getpid()}-", dir=parent))
        # Held (flock) until published or discarded: an export in another container sharing the
        # folder, as pid 1 too, took it for a killed export's (files.remove_stale_temps)
        _held[staging] = os.open(staging, os.O_RDONLY)
        hold_as_writer(_held[staging])
        os.chmod(staging, 0o777 & ~umask())  # it becomes the export folder: mkdtemp's 0700 would hide it
    except OSError as e:
        discard(None, created)
        raise ExportError(f"cannot write to output folder {out_dir}: {e.strerror or e}") from None
    return staging, created


def _let_go(staging: Path) -> None:
    fd = _held.pop(staging, None)
    if fd is not None:
        os.close(fd)


def discard(staging: Path | None, created) -> None:
    """Remove a staging folder and the folders made for it (innermost first, only when empty)."""
    if staging is not None:
        shutil.rmtree(staging, ignore_errors=True)
        _let_go(staging)
    for folder in created:
        try:
            folder.rmdir()
        except OSError:
            break


def _sync_tree(folder: Path) -> None:
    """The writers (onnx, torch) do not fsync: the swap must not publish files a power cut
    could still empty."""
    for entry in os.scandir(folder):
        fd = os.open(entry.path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    fsync_dir(folder)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (renameat2 RENAME_EXCHANGE); False where the platform or the
    filesystem cannot."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), os.fspath(b))


def _swap_by_renames(staging: Path, out_dir: Path) -> None:
    # not "<STAGING_PREFIX><pid>-": remove_stale_temps must never take a previous export
    aside = Path(tempfile.mkdtemp(prefix=f"{STAGING_PREFIX}old-{os.getpid()}-", dir=out_dir.parent))
    os.rename(out_dir, aside / "export")
    try:
        os.rename(staging, out_dir)
    except OSError:
        os.rename(aside / "export", out_dir)  # put the previous export back
        os.rmdir(aside)
        raise
    shutil.rmtree(aside, ignore_errors=True)


def _keep_attributes(old: Path, new: Path) -> None:
    """The replaced folder's mode, owner and group on its replacement (a folder kept private, a
    team's group folder; its group on the files too where the folder passes it on: setgid), as
    far as this user may set them."""
    st = old.stat()
    # OSError, not only PermissionError: another owner is for root only, a group for its members,
    # and in a user namespace an id that is not mapped there is EINVAL; none of it stops the export
    with contextlib.suppress(OSError):
        os.chown(new, st.st_uid, -1)
    for path in [new, *new.iterdir()] if st.st_mode & stat.S_ISGID else [new]:
        with contextlib.suppress(OSError):
            os.chown(path, -1, st.st_gid)
    os.chmod(new, stat.S_IMODE(st.st_mode))  # after chown, which clears the setgid bit


def publish(staging: Path, out_dir: Path, export_files) -> None:
    """Swap the complete export in `staging` in as `out_dir` (see the module doc), with the
    previous folder's mode, owner and group. On return `staging` is gone; on an exception
    out_dir is the previous export, untouched."""
    resolve_out_dir(out_dir, export_files)  # again: the folder may have changed while exporting
    try:
        _sync_tree(staging)
        if not out_dir.exists():
            os.rename(staging, out_dir)
        else:
            _keep_attributes(out_dir, staging)
            if _exchange(staging, out_dir):
                shutil.rmtree(staging, ignore_errors=True)  # now the previous export
            else:
                _swap_by_renames(staging, out_dir)
        fsync_dir(out_dir.parent)
    except OSError as e:
        raise ExportError(f"cannot publish the export: {os_error_line(e)}") from None
    _let_go(staging)
