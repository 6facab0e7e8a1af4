"""Streaming discovery of image files under the PATHs given to `cnnx classify`.

Yields in sorted path order without ever listing the whole tree: each directory is read
with os.scandir and sorted on its own (by the bytes of the name, so non-UTF-8 names sort
consistently), then walked depth-first. Only one directory's names per level of depth are
held at a time. Nothing is opened here: the type comes from the directory entry, so a FIFO
is reported, never read.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass

from cnnx.runtime.contract import is_image_name as _is_image_name


@dataclass(frozen=True)
class Found:
    """A path to classify (reason None) or one that is skipped, with the reason."""

    path: str
    reason: str | None = None


def _key(name: str) -> bytes:
    return os.fsencode(name)


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISFIFO, "FIFO"), (stat.S_ISSOCK, "socket"), (stat.S_ISCHR, "character device"),
                       (stat.S_ISBLK, "block device")):
        if test(mode):
            return name
    return "special file"


class Discovery:
    """Iterate over Found items for the given roots. Counts what it ignores (`ignored`)."""

    def __init__(self, roots, *, follow_symlinks: bool = False):
        self.roots = roots
        self.follow_symlinks = follow_symlinks
        self.ignored = 0  # files with a non-image extension inside walked folders

    def __iter__(self):
        for root in sorted(dict.fromkeys(os.fspath(r) for r in self.roots), key=_key):
            try:
                st = os.stat(root)  # a root named by the user is followed even if a symlink
            except OSError as e:
                yield Found(root, f"cannot stat: {e.strerror or e}")
                continue
            if stat.S_ISDIR(st.st_mode):
                yield from self._walk(root, {(st.st_dev, st.st_ino)})
            elif stat.S_ISREG(st.st_mode):
                yield Found(root)
            else:
                yield Found(root, f"not a regular file ({_kind(st.st_mode)}); not opened")

    def _walk(self, directory: str, ancestors: set):
        try:
            with os.scandir(directory) as it:
                entries = sorted(it, key=lambda e: _key(e.name))
        except OSError as e:
            yield Found(directory, f"cannot list folder: {e.strerror or e}")
            return
        for entry in entries:
            path = entry.path
            try:
                if entry.is_symlink():
                    if not self.follow_symlinks:
                        yield Found(path, "symlink not followed (use --follow-symlinks)")
                        continue
                    mode_st = os.stat(path)  # ELOOP for a symlink cycle lands in the except below
                elif entry.is_file(follow_symlinks=False):
                    # The common case answered from the directory entry's type: no stat call.
                    if _is_image_name(entry.name):
                        yield Found(path)
                    else:
                        self.ignored += 1
                    continue
                else:
                    mode_st = entry.stat(follow_symlinks=False)
            except OSError as e:
                yield Found(path, f"cannot stat: {e.strerror or e}")
                continue
            if stat.S_ISDIR(mode_st.st_mode):
                ident = (mode_st.st_dev, mode_st.st_ino)
                if ident in ancestors:
                    yield Found(path, "symlink loop (folder contains itself); not followed")
                    continue
                ancestors.add(ident)
                yield from self._walk(path, ancestors)
                ancestors.discard(ident)
            elif not _is_image_name(entry.name):
                self.ignored += 1
            elif stat.S_ISREG(mode_st.st_mode):
                yield Found(path)
            else:
                yield Found(path, f"not a regular file ({_kind(mode_st.st_mode)}); not opened")
