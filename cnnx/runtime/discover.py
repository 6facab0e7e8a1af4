"""Streaming discovery of image files under the PATHs given to `cnnx classify`.

Yields in sorted path order (the order of the paths' bytes, as `sorted(paths,
key=os.fsencode)` would give) without ever listing the whole tree. Each folder is read with
os.scandir and sorted on its own by the name's bytes, a folder's name followed by "/": that
is how its files compare inside full paths (`a/b-x.jpg` < `a/b/c.jpg` because "-" < "/").
The walk keeps an explicit stack (one sorted listing per level of depth), so folders nested
thousands deep need no recursion. Nothing is opened here: the type comes from the directory
entry, so a FIFO is reported, never read.
"""

from __future__ import annotations

import errno
import os
import re
import stat
import sys
from itertools import repeat
from operator import itemgetter, methodcaller
from typing import NamedTuple

from cnnx.runtime.contract import image_names, is_hidden_name, is_image_name
from cnnx.runtime.files import first_line


# scheme:// (s3, gs, file, ...): a location only --engine ray reads (through pyarrow.fs).
URI = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")


def is_uri(path: str) -> bool:
    return URI.match(path) is not None


class Found(NamedTuple):
    """A path to classify (reason None) or one that is skipped, with the reason. A named
    tuple: one is made for every file found, and a tuple is the cheapest immutable record."""

    path: str
    reason: str | None = None


_first = itemgetter(0)


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISFIFO, "FIFO"), (stat.S_ISSOCK, "socket"), (stat.S_ISCHR, "character device"),
                       (stat.S_ISBLK, "block device")):
        if test(mode):
            return name
    return "special file"


_FS_ENCODING = sys.getfilesystemencoding()  # os.fsencode's, without its call per name


_name_bytes = methodcaller("encode", _FS_ENCODING, "surrogateescape")  # _sort_key of a file, in C


def _sort_key(name: str, is_folder: bool) -> bytes:
    return _name_bytes(name) + (b"/" if is_folder else b"")


def _files_only(folder: str, entries: list) -> tuple:
    """A folder whose entries are all regular files (the common case), with no Python call
    a file: -> ([the run of its image files, in order] or [], how many names were not images)."""
    names = [e.name for e in entries]
    images = image_names(names)
    if all(map(str.isascii, images)):
        images.sort()  # ASCII names: the order of the str is the order of the bytes, with no key to make
    else:
        images.sort(key=_name_bytes)
    prefix = os.path.join(folder, "")  # DirEntry.path is os.path.join(folder, name)
    paths = [prefix + n for n in images]
    run = list(map(tuple.__new__, repeat(Found), zip(paths, repeat(None))))  # Found(path), no __new__ in Python
    return ([run] if run else []), len(names) - len(images)


def _lists_as_folder(entry: os.DirEntry, follow_symlinks: bool) -> bool:
    """Whether the walk will descend into this entry (decides its place in the order): a
    folder, or a symlink to one when symlinks are followed."""
    try:
        return entry.is_dir(follow_symlinks=follow_symlinks)
    except OSError:
        return False


class Discovery:
    """Iterate over Found items for the given roots (or over runs of them: `runs`). Counts
    what it ignores (`ignored`). spelt: {root: spelling} for roots whose items are named
    spelling(path) (--engine ray's file:// folders: their URIs): walked with the other roots, so
    a file under two of them is found once, as for any two roots that overlap."""

    def __init__(self, roots, *, follow_symlinks: bool = False, spelt: dict | None = None):
        self.roots = roots
        self.follow_symlinks = follow_symlinks
        self.spelt = spelt or {}
        self.ignored = 0  # files with a non-image extension inside walked folders
        self._root_reals, self._root_folders = set(), {}  # of the roots walked (runs)
        self._walked = set()  # (st_dev, st_ino) of the folders walked so far

    def __iter__(self):
        for run in self.runs():
            yield from run

    def runs(self):
        """The same Found items, in the same order, as lists: each either files to classify
        (reason None) or one skipped item. A folder's files come as one list, so a caller
        (pipeline.batched_runs) handles them by the list, not one Python step a file."""
        stated = []
        for root in dict.fromkeys(os.fspath(r) for r in self.roots):
            try:
                st = os.stat(root)  # a root named by the user is followed even if a symlink
            except OSError as e:
                stated.append((_sort_key(root, False), root, e))
                continue
            except ValueError:  # a NUL in a path the Python API was given: its row, the others go on
                stated.append((_sort_key(root, False), root, OSError(errno.EINVAL, "a name with a NUL byte")))
                continue
            stated.append((_sort_key(root, stat.S_ISDIR(st.st_mode)), root, st))
        stated.sort(key=_first)
        kept = _not_walked_twice(stated, self.follow_symlinks)
        self._root_reals = {os.path.realpath(root) for _key, root, st in kept if not isinstance(st, OSError)}
        self._root_folders = {os.path.realpath(root): None for _key, root, st in kept
                              if not isinstance(st, OSError) and stat.S_ISDIR(st.st_mode)}
        for _key, root, st in kept:
            runs = self._root_runs(root, st)
            spelling = self.spelt.get(root)
            if spelling is None:
                yield from runs
            else:
                for run in runs:
                    yield [Found(spelling(found.path), found.reason) for found in run]

    def _root_runs(self, root: str, st):
        if isinstance(st, OSError):
            yield [Found(root, f"cannot stat: {st.strerror or first_line(st)}")]
        elif stat.S_ISDIR(st.st_mode):
            yield from self._walk(root, (st.st_dev, st.st_ino))
        elif stat.S_ISREG(st.st_mode):
            yield [Found(root)]
        else:
            yield [Found(root, f"not a regular file ({_kind(st.st_mode)}); not opened")]

    def _walk(self, top: str, top_ident):
        """Depth-first over an explicit stack of (folder identity, its children's iterator).
        Each folder is walked once, whatever leads to it again (two symlinks followed, one into
        another root, a bind mount): its files once, under the first spelling."""
        if top_ident in self._walked:
            return
        self._walked.add(top_ident)
        ancestors = {top_ident}  # (st_dev, st_ino) of the folders being walked: a cycle check
        stack = [(top_ident, iter(self._children(top)))]
        while stack:
            ident, children = stack[-1]
            child = next(children, None)
            if child is None:
                stack.pop()
                ancestors.discard(ident)
            elif isinstance(child, list):
                yield child
            else:
                path, sub_ident = child
                if sub_ident in ancestors:
                    yield [Found(path, "symlink loop (folder contains itself); not followed")]
                    continue
                if sub_ident in self._walked:
                    continue
                self._walked.add(sub_ident)
                ancestors.add(sub_ident)
                stack.append((sub_ident, iter(self._children(path))))

    def _children(self, folder: str) -> list:
        """One folder's entries in order: runs (lists) of Found for files to classify, a
        skipped item as a list of its own, (path, identity) for subfolders to descend into."""
        follow = self.follow_symlinks
        try:
            with os.scandir(folder) as it:
                entries = list(it)
        except OSError as e:
            return [[Found(folder, f"cannot list folder: {e.strerror or first_line(e)}")]]
        # A regular file (told by the entry's type: no stat call) is the common case: its sort
        # key is its name's bytes, and an image name makes a Found with no more questions.
        try:
            plain = [e.is_file(follow_symlinks=False) for e in entries]
        except OSError:  # an entry of unknown type that cannot be stat'ed: each is asked below
            plain = [False] * len(entries)
        if all(plain):
            out, ignored = _files_only(folder, entries)
            self.ignored += ignored
            return out
        keyed = [(_sort_key(e.name, False), e, True) if p else (_sort_key(e.name, _lists_as_folder(e, follow)), e, False)
                 for e, p in zip(entries, plain)]
        keyed.sort(key=_first)  # names are unique in a folder: the keys never tie
        out, run = [], []
        for _key, entry, is_plain in keyed:
            if is_plain:
                if is_image_name(entry.name):
                    run.append(Found(entry.path))
                else:
                    self.ignored += 1
                continue
            if is_hidden_name(entry.name):  # a hidden folder, link or special file: passed over as a hidden file is
                self.ignored += 1
                continue
            path = entry.path
            try:
                if entry.is_symlink():
                    if not self.follow_symlinks:
                        if not self._walked_as_root(path):
                            run = _flush(out, run, Found(path, "symlink not followed (use --follow-symlinks)"))
                        continue
                    st = os.stat(path)  # ELOOP for a symlink cycle lands in the except below
                elif entry.is_file(follow_symlinks=False):
                    # Here only when the folder's type check above failed: each entry on its own.
                    if is_image_name(entry.name):
                        run.append(Found(path))
                    else:
                        self.ignored += 1
                    continue
                else:
                    st = entry.stat(follow_symlinks=False)
            except OSError as e:
                run = _flush(out, run, Found(path, f"cannot stat: {e.strerror or first_line(e)}"))
                continue
            if stat.S_ISDIR(st.st_mode):
                run = _flush(out, run, (path, (st.st_dev, st.st_ino)))
            elif not is_image_name(entry.name):
                self.ignored += 1
            elif stat.S_ISREG(st.st_mode):
                run.append(Found(path))
            else:
                run = _flush(out, run, Found(path, f"not a regular file ({_kind(st.st_mode)}); not opened"))
        if run:
            out.append(run)
        return out

    def _walked_as_root(self, link: str) -> bool:
        """Whether what a symlink this walk does not follow leads to gets its rows anyway: a
        root, a folder in a root folder's walk, or an image file the walk classifies there
        (not a file the walk passes over: the link is then the only name it has here)."""
        try:
            real = os.path.realpath(link, strict=True)
            st = os.stat(real)
        except OSError:  # it leads nowhere (dangling, a loop of links)
            return False
        if real in self._root_reals:
            return True
        walked = stat.S_ISDIR(st.st_mode) or stat.S_ISREG(st.st_mode) and is_image_name(os.path.basename(real))
        return walked and _reached(real, self._root_folders)


def _not_walked_twice(stated: list, follow_symlinks: bool) -> list:
    """The roots (sort key, root, stat result or OSError), in order, less those whose files
    another root already yields: a folder given twice (`DIR`, `DIR/`, `./DIR`, a symlink to
    it), a folder inside another given folder that its walk reaches (no hidden name on the way),
    a file inside one that the walk reaches (an image name, and a regular file, not a symlink,
    unless symlinks are followed). The first in
    the order is kept. Without this, each spelling would be walked and every file under it
    classified twice, the second row out of the sorted order."""
    folders = {}  # resolved folder -> its position in stated
    spelt = {}  # with symlinks followed: the folder as spelt (_spelt) -> its position
    spellings = [_spelt(root) if follow_symlinks else None for _key, root, _st in stated]
    for i, (_key, root, st) in enumerate(stated):
        if not isinstance(st, OSError) and stat.S_ISDIR(st.st_mode):
            folders.setdefault(os.path.realpath(root), i)
            if spellings[i] is not None:
                spelt.setdefault(spellings[i], i)
    files = PathKeys()
    seen_files = set()
    kept = []
    for i, item in enumerate(stated):
        _key, root, st = item
        if isinstance(st, OSError):
            kept.append(item)
            continue
        # With symlinks followed, a walk also reaches what lies under it through a symlinked
        # folder (DIR/link/sub): as spelt, not resolved.
        through_links = spellings[i] is not None and _reached(spellings[i], spelt)
        if stat.S_ISDIR(st.st_mode):
            real = os.path.realpath(root)
            if folders[real] != i or _reached(real, folders) or through_links:
                continue
        elif stat.S_ISREG(st.st_mode):
            real = files(root)
            if real in seen_files:
                continue
            seen_files.add(real)
            if is_image_name(os.path.basename(root)) and (through_links or _reached(real, folders) and
                                                          (follow_symlinks or not os.path.islink(root))):
                continue
        kept.append(item)
    return kept


def _spelt(root: str) -> str | None:
    """The root as an absolute path, its symlinks not resolved; None where it holds `..` (after
    a symlink, `..` is the link target's parent, which only resolving can tell)."""
    path = os.path.join(os.getcwd(), root)
    return None if os.pardir in path.split(os.sep) else os.path.normpath(path)


def _reached(path: str, folders: dict) -> bool:
    """Whether the walk of one of `folders` (resolved) reaches the resolved `path` below it: it
    lies under one, and no name on the way, its own included, is hidden (the walk passes over
    hidden names)."""
    while True:
        parent = os.path.dirname(path)
        if parent == path or is_hidden_name(os.path.basename(path)):
            return False
        if parent in folders:
            return True
        path = parent


def _flush(out: list, run: list, other) -> list:
    """End the current run of files (if any) before `other`: a skip (as a list of its own) or a
    subfolder; -> a new, empty run."""
    if run:
        out.append(run)
    out.append([other] if isinstance(other, Found) else other)
    return []


def holds_at_most(roots, files: int) -> bool:
    """Whether `roots` hold at most `files` files, told from at most `files` + 1 directory
    entries (a folder's entry counts as one): single files and small trees of folders and
    files. False wherever it cannot be told so cheaply (more entries, a symlink inside a folder,
    anything but files and folders, an error): the caller then plans for more."""
    entries, folders = 0, []
    for root in roots:
        try:
            st = os.stat(root)  # a root is followed if a symlink, as the walk does
        except (OSError, ValueError):  # ValueError: a NUL in the name
            return False
        if stat.S_ISDIR(st.st_mode):
            folders.append(root)
        elif stat.S_ISREG(st.st_mode):
            entries += 1
        else:
            return False
    while folders and entries <= files:
        try:
            with os.scandir(folders.pop()) as it:
                for entry in it:
                    entries += 1
                    if entries > files:
                        return False
                    if entry.is_dir(follow_symlinks=False):
                        folders.append(entry.path)
                    elif not entry.is_file(follow_symlinks=False):
                        return False
        except OSError:
            return False
    return entries <= files


class PathKeys:
    """Compare paths by the directory entry they name, not by their spelling: `DIR/a.jpg`,
    `./DIR/a.jpg` and `DIR/../DIR/a.jpg` are one key. The folder part is resolved
    (os.path.realpath, cached per folder: a million files live in few folders); the last
    component is kept, so a symlinked file stays its own entry, as the walk treats it."""

    def __init__(self):
        self._folders: dict = {}

    def __call__(self, path: str) -> str:
        folder, name = os.path.split(path)
        real = self._folders.get(folder)
        if real is None:
            real = self._folders[folder] = os.path.realpath(folder or ".")
        return os.path.join(real, name)
