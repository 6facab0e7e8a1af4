"""File helpers every stage uses (torch-free): the one atomic writer and the one way to turn
an exception into a single line for the user; and what cnnx's processes show on their console
(names' bytes, Pillow's warnings) and let a Ctrl-C cut.

Atomic means: a reader (or a process started after a kill -9 or a power cut) sees the old
file or the complete new one, never a part. The data goes to a hidden temp file in the same
folder, is fsynced, renamed over the target, and the folder is fsynced so the rename itself
survives a crash. Temp files are named `.cnnx-tmp-<pid>-*` so that a later run can remove
those of dead processes (`remove_stale_temps`).
"""

from __future__ import annotations

import codecs
import contextlib
import errno
import fcntl
import functools
import os
import signal
import stat
import sys
import tempfile
import threading
import time
import warnings

TEMP_PREFIX = ".cnnx-tmp-"

# The error handlers cnnx's standard streams encode with (cli.main). A file name's bytes that
# are not UTF-8 are lone surrogates after os.fsdecode: stderr (messages) prints them as \xNN,
# not as \udcNN; stdout as the bytes themselves (surrogateescape), so that a path it prints is
# the path. Anything else that cannot be encoded (a lone surrogate from JSON) as backslashreplace
# prints it, where surrogateescape raised.
NAME_BYTES_ERRORS = "cnnx-name-bytes"
RAW_NAME_BYTES_ERRORS = "cnnx-raw-name-bytes"


def quiet_pillow_warnings():
    """Pillow's warnings about a file (corrupt EXIF, a large image) name no file and change no
    result: the file is decoded, or it gets its errors row with the reason. cnnx's own processes
    (the command line, its decode processes, Ray's workers) call this; the Python API leaves the
    filters of the user's process alone. (Pillow warns from its own modules; a
    filter by module name needs no import of Pillow.)"""
    warnings.filterwarnings("ignore", module=r"PIL(\.|$)")


@contextlib.contextmanager
def sigint_held():
    """Ctrl-C (SIGINT) held back for the block, and taken (KeyboardInterrupt) right after it.
    For what a Ctrl-C must not cut: a native module's import (onnxruntime's turns the interrupt
    into an ImportError, "initialization failed", that reads as a broken install), and a
    process being started (the forkserver inherits SIGINT blocked, so a Ctrl-C never kills it in
    the middle of its imports, with a traceback and its pool dead; it ignores SIGINT after them,
    as the decode processes do: the caller stops them). Python runs signal handlers in the main
    thread, whichever thread the signal reaches: there a handler notes it, and the handler set
    before (Python's own: KeyboardInterrupt; cnnx classify's; a program's) is called once after
    the block. (Not raised again: a signal's wakeup fd, asyncio's, has already heard of it.)"""
    main = threading.current_thread() is threading.main_thread() and callable(signal.getsignal(signal.SIGINT))
    noted = []
    old_handler = signal.signal(signal.SIGINT, lambda signum, frame: noted.append(signum)) if main else None
    old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT}) if hasattr(signal, "pthread_sigmask") else None
    try:
        yield
    finally:
        if old_mask is not None:
            signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
        if old_handler is not None:
            signal.signal(signal.SIGINT, old_handler)
            if noted:
                old_handler(signal.SIGINT, None)


@contextlib.contextmanager
def signals_blocked(signums):
    """The signals blocked for the block (pthread_sigmask; nothing where there is none), then
    delivered: for a process start, whose at-fork hooks are Python code that ignores what a
    handler raises there (a Ctrl-C or SIGTERM landing in one was lost). Processes started inside
    inherit the mask: they must ignore those signals or leave them blocked."""
    if not hasattr(signal, "pthread_sigmask"):
        yield
        return
    old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, set(signums))
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)


class Terminated(KeyboardInterrupt):
    """SIGTERM (docker stop, systemd, a batch job's end, `timeout`) ends a command as Ctrl-C
    does, by its own cleanup (classify: the batch in hand written, the output lock released, the
    decode processes stopped; train: a run folder without a checkpoint removed; export: its
    staging folder); then "terminated", exit 143 (cnnx.cli)."""

    signum = signal.SIGTERM


def interruption(signum: int) -> KeyboardInterrupt:
    return Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()


def ends_as_terminated(command):
    """A command function during which SIGTERM raises Terminated in the main thread, as Ctrl-C
    raises KeyboardInterrupt (where SIGTERM has its default action, which killed the process
    before any cleanup). cnnx classify has its own (runtime.command._ends_when_interrupted)."""

    @functools.wraps(command)
    def run(*args, **kwargs):
        if threading.current_thread() is not threading.main_thread() \
                or signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
            return command(*args, **kwargs)

        ended = threading.Event()

        def terminated(_signum, _frame):
            if not getattr(terminated, "resending", False):
                terminated.resending = True
                threading.Thread(target=_resend_sigterm, args=(ended,), daemon=True).start()
            raise Terminated()

        signal.signal(signal.SIGTERM, terminated)
        try:
            return command(*args, **kwargs)
        finally:
            ended.set()
            signal.signal(signal.SIGTERM, signal.SIG_DFL)

    return run


SIGTERM_RESEND_S = 5.0  # a command that raised Terminated has ended well within this


def _resend_sigterm(ended: threading.Event):
    """SIGTERM again every SIGTERM_RESEND_S while the command has not ended: an exception raised
    by a signal handler is lost where it lands in code whose exceptions Python ignores (an
    at-fork hook, a __del__), and the command went on to its end (a SIGTERM at the moment train
    forked its decode processes trained the whole run)."""
    while not ended.wait(SIGTERM_RESEND_S):
        os.kill(os.getpid(), signal.SIGTERM)


def _undecoded(c: str) -> bool:
    return 0xDC80 <= ord(c) <= 0xDCFF  # what surrogateescape decodes the bytes 0x80-0xFF to


def _name_bytes_raw(error: UnicodeEncodeError):
    bad = error.object[error.start:error.end]
    return b"".join(bytes([ord(c) - 0xDC00]) if _undecoded(c) else c.encode("ascii", "backslashreplace")
                    for c in bad), error.end


def _name_bytes_as_hex(error: UnicodeEncodeError):
    raw, end = _name_bytes_raw(error)
    return raw.decode("ascii", "backslashreplace"), end  # a byte 0xff as \xff


codecs.register_error(NAME_BYTES_ERRORS, _name_bytes_as_hex)
codecs.register_error(RAW_NAME_BYTES_ERRORS, _name_bytes_raw)


# Whether a path's str is its name's bytes read as UTF-8 (bytes that are not as \udcXX), what
# cnnx writes in its files: so in every UTF-8 locale, and in C/POSIX ones (Python's UTF-8 mode).
NAMES_ARE_UTF8 = sys.getfilesystemencoding() == "utf-8" and sys.getfilesystemencodeerrors() == "surrogateescape"


def name_text(path: str) -> str:
    """A path's text as cnnx writes it in a file (predictions, errors rows, class names): its
    bytes as UTF-8, whatever the locale decoded them to. In a Latin-1 locale café.jpg's UTF-8
    bytes were written as two characters each (Ã©), a name no file on disk has."""
    return path if NAMES_ARE_UTF8 else os.fsencode(path).decode("utf-8", "surrogateescape")


def path_of_text(text: str) -> str:
    """name_text's inverse: the path, as this locale spells it, of a name read back from a file."""
    return text if NAMES_ARE_UTF8 else os.fsdecode(text.encode("utf-8", "surrogateescape"))


def shown(path) -> str:
    """A path quoted for a one-line message as repr quotes it (a newline in a name stays on
    the line), but with bytes that are not UTF-8 as \\xNN, what the file's name holds."""
    text = os.fsdecode(path)
    if text.isprintable() and "'" not in text and "\\" not in text:
        return f"'{text}'"
    return "'" + "".join("\\'" if c == "'" else _escaped(c) for c in text) + "'"


def printable(text) -> str:
    """Text (a name, a model's metadata) for a line on a terminal: each character a line cannot
    show as it is (a newline, a tab, ESC, which starts the sequences that retitle a window or
    clear the screen) as Python escapes it, bytes that are not UTF-8 as \\xNN."""
    text = os.fsdecode(text) if isinstance(text, bytes) else str(text)
    return text if text.isprintable() else "".join(c if c.isprintable() else _escaped(c) for c in text)


def _escaped(c: str) -> str:
    return c.encode("utf-8", NAME_BYTES_ERRORS).decode() if _undecoded(c) else repr(c)[1:-1]


def names_line(names, limit=None) -> str:
    """Names (class names, labels) for a one-line message: 'cat, dog, ...', the first `limit`
    of them; a name a line cannot show as it is (a newline, a tab) quoted as shown() quotes it."""
    names = list(names)
    head = names if limit is None else names[:limit]
    text = ", ".join(n if n.isprintable() else shown(n) for n in head)
    return text + (", ..." if len(names) > len(head) else "")


def cache_root(explicit=None):
    """cnnx's cache folder: `explicit` (--cache-dir), else $CNNX_CACHE, else
    $XDG_CACHE_HOME/cnnx, else ~/.cache/cnnx."""
    from pathlib import Path

    if explicit:
        return Path(explicit).expanduser()
    if os.environ.get("CNNX_CACHE"):
        return Path(os.environ["CNNX_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "cnnx"


def umask() -> int:
    """The process's umask, for the mode of a file or folder made 0600/0700 (mkstemp, mkdtemp)
    that the user's own tools would have made by it. Read from /proc (Linux >= 4.7): os.umask
    reads it only by setting it, and a file another thread creates in between gets mode 0666."""
    with contextlib.suppress(OSError, ValueError):
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def quiet_stderr():
    """File descriptor 2 on /dev/null for the block: what a library prints from C or C++ (not
    through sys.stderr) is not shown, where cnnx says what matters in its own line."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def first_line(error, limit: int = 300) -> str:
    """The first non-empty line of an exception's message (or of a string), at most `limit`
    characters; the exception's type name when it has no message."""
    text = str(error).strip()
    line = text.splitlines()[0].strip() if text else ""
    if not line:
        line = type(error).__name__ if isinstance(error, BaseException) else "unknown error"
    return line if len(line) <= limit else line[: limit - 3] + "..."


def os_error_line(e: OSError, path=None) -> str:
    """'No space left on device: /out/model.onnx' for an OSError."""
    where = e.filename if e.filename is not None else path
    what = e.strerror or first_line(e)
    return f"{what}: {os.fsdecode(where)}" if where is not None else what


def fsync_dir(folder) -> None:
    try:
        fd = os.open(os.fspath(folder), os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return  # not every platform/filesystem lets a folder be opened; the rename still happened
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def open_lock_file(path) -> int:
    """A lock file's descriptor, opened (created) read-write: never through a symlink, and
    only a regular file. A link planted under a lock's name (a shared folder) would have had its
    target truncated to the holder's pid. OSError (EEXIST) naming `path` otherwise."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    except OSError as e:
        if e.errno != errno.ELOOP:
            raise
        raise OSError(errno.EEXIST, "is a symlink, not a lock file cnnx made; remove it", os.fspath(path)) from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise OSError(errno.EEXIST, "is not a regular file, not a lock file cnnx made; remove it", os.fspath(path))
    return fd


@contextlib.contextmanager
def atomic_file(path, mode: str = "wb", *, encoding: str | None = None, newline: str | None = None,
                keep_mode_of_target: bool = False, through_symlink: bool = False):
    """Open a temp file beside `path`; on a clean exit flush, fsync and rename it over `path`;
    on any exception (KeyboardInterrupt included) remove it and leave `path` as it was.

    keep_mode_of_target: give the new file the permission bits of the file it replaces (a
    rewrite should not reset a user's chmod). through_symlink: a symlinked `path` is written
    through (the link's target is replaced, the link stays): for a file the user named. A
    name cnnx chose (a run's files, a sidecar beside an output, a cache) that is a symlink is
    refused: someone who can write in the folder would otherwise have cnnx replace any file
    the user can write. (The rename replaces a link made after this check, never its target.)"""
    path = os.fspath(path)
    if os.path.islink(path):
        if not through_symlink:
            raise OSError(errno.EEXIST, "is a symlink, and cnnx writes this name itself: not replaced; remove it",
                          path)
        path = os.path.realpath(path)
    try:
        mode_there = os.stat(path).st_mode
    except FileNotFoundError:
        mode_there = None
    if mode_there is not None and not stat.S_ISREG(mode_there):
        # A rename would replace a device node (/dev/null, as root), a FIFO or a socket by a file.
        raise OSError(errno.EEXIST, "exists and is not a regular file; not replaced", path)
    folder = os.path.dirname(os.path.abspath(path))
    try:
        fd, tmp = tempfile.mkstemp(prefix=f"{TEMP_PREFIX}{os.getpid()}-", dir=folder)
    except OSError as e:  # named by its random temp name: the user knows the file asked for
        raise OSError(e.errno, e.strerror, path) from None
    try:
        hold_as_writer(fd)
        if keep_mode_of_target:
            try:
                os.fchmod(fd, os.stat(path).st_mode & 0o7777)
            except FileNotFoundError:
                pass
        else:
            os.fchmod(fd, 0o666 & ~umask())  # mkstemp's 0600 would make results private by surprise
        with os.fdopen(fd, mode, encoding=encoding, newline=newline) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(e, OSError) and e.filename is None and e.errno is not None:
            # a write's error names no file ("File too large" under ulimit -f): the one being written
            raise OSError(e.errno, e.strerror, os.fspath(path)) from None
        raise
    fsync_dir(folder)


def atomic_write(path, data, *, keep_mode_of_target: bool = False, through_symlink: bool = False) -> None:
    """Write bytes or str (UTF-8) to `path` atomically (atomic_file)."""
    how = {"keep_mode_of_target": keep_mode_of_target, "through_symlink": through_symlink}
    if isinstance(data, str):
        with atomic_file(path, "w", encoding="utf-8", newline="", **how) as f:
            f.write(data)
    else:
        with atomic_file(path, "wb", **how) as f:
            f.write(data)


def escaped_name(path) -> str:
    """A path as UTF-8 text: the bytes of a name that is not UTF-8 as \\xNN escapes (for a
    message, or a column that holds text only)."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def sha256_of(source) -> str:
    """Hex sha256 of a file: a path, or a binary file object read from where it stands."""
    import hashlib

    h = hashlib.sha256()
    with contextlib.ExitStack() as stack:
        f = source if hasattr(source, "read") else stack.enter_context(open(os.fspath(source), "rb"))
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def pid_alive(pid: int) -> bool:
    """Whether process `pid` runs: a zombie (ended, its parent not yet told: a killed torchrun
    rank for a moment) does not."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except (OSError, IndexError):  # no /proc: as kill(0) said
        return True


START_MARGIN_S = 0.05


def _started_after(pid: int, entry) -> bool:
    """Whether process `pid` started after `entry` last changed, so cannot have written it: its
    pid is another's now (reused on a host; in a container each run is pid 1, whose leftovers
    were never removed). False where it cannot be told (no /proc)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            started_ticks = int(f.read().rsplit(b")", 1)[1].split()[19])  # field 22, after the name
        boot = time.time() - time.clock_gettime(time.CLOCK_BOOTTIME)  # the ticks count from boot
        changed = entry.stat(follow_symlinks=False).st_mtime
    except (OSError, ValueError, IndexError, AttributeError):  # AttributeError: no CLOCK_BOOTTIME
        return False
    # whole ticks: never later than the real start; the margin covers the two clocks' reading
    return boot + started_ticks / os.sysconf("SC_CLK_TCK") > changed + START_MARGIN_S


def hold_as_writer(fd) -> None:
    """flock the temp file or folder open at `fd`, which this process is writing, for as long as
    that descriptor stays open: remove_stale_temps leaves it alone also when its pid names no
    process here (a container sharing the folder: another PID namespace; another host)."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # just made: nobody else holds it
    except OSError:  # a filesystem without locks (ENOSYS, ENOLCK, EOPNOTSUPP): the pid alone tells, as before
        pass


def held_by_a_writer(path) -> bool:
    """Whether a process holds `path` with hold_as_writer (a killed one holds nothing)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    except OSError:  # a filesystem without locks: the pid alone decides
        return False
    finally:
        os.close(fd)  # and with it the lock just taken


def remove_stale_temps(folder, prefixes=(TEMP_PREFIX,)) -> list:
    """Remove `<prefix><pid>-*` files and folders in `folder` whose process is gone (left by a
    kill -9), or is another process now (its pid reused: it started after the entry's last
    change). Returns what was removed. Entries of live processes (another run writing right
    now), entries a writer holds (hold_as_writer) and names without a pid and its "-" are left
    alone (multiprocessing's own pymp-<8 random characters>, which may be digits)."""
    import shutil

    removed = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for entry in entries:
        prefix = next((p for p in prefixes if entry.name.startswith(p)), None)
        if prefix is None:
            continue
        pid_text, dash, _ = entry.name[len(prefix):].partition("-")
        if not (dash and pid_text.isdigit()) or held_by_a_writer(entry.path):
            continue
        if pid_alive(int(pid_text)) and not _started_after(int(pid_text), entry):
            continue
        try:
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path)
            else:
                os.unlink(entry.path)
            removed.append(entry.path)
        except OSError:
            continue
    return removed


def held_temp_folder(prefix: str, root=None) -> tuple:
    """(a new folder `<root>/<prefix><pid>-*`, the descriptor by which this process holds it:
    hold_as_writer), after removing those of processes gone (remove_stale_temps): what a
    process killed (kill -9) left in its folder goes at the next start. root: the temporary
    folder (tempfile.gettempdir()) where not given."""
    root = tempfile.gettempdir() if root is None else root
    remove_stale_temps(root, (prefix,))
    folder = tempfile.mkdtemp(prefix=f"{prefix}{os.getpid()}-", dir=root)
    fd = os.open(folder, os.O_RDONLY)
    hold_as_writer(fd)
    return folder, fd


@contextlib.contextmanager
def temp_files_kept_apart():
    """tempfile's folder, for the duration, is a held folder of this process's own
    (held_temp_folder in the temporary folder), removed after: what a library makes in the
    temporary folder (onnxruntime's quantization: pre.quant.*, ort.quant.*, as large as the
    model) is not left there by a process killed meanwhile. For a command's process only:
    tempfile's folder is every thread's."""
    import shutil

    global _users_temp_folder
    folder, fd = held_temp_folder(TEMP_PREFIX)
    saved, _users_temp_folder = tempfile.tempdir, tempfile.gettempdir()
    tempfile.tempdir = folder
    try:
        yield folder
    finally:
        tempfile.tempdir, _users_temp_folder = saved, None
        shutil.rmtree(folder, ignore_errors=True)
        os.close(fd)


_users_temp_folder = None  # tempfile's folder before temp_files_kept_apart put its own in its place


def users_temp_folder() -> str:
    """The temporary folder the user has ($TMPDIR...), to name in a message: not the one of
    temp_files_kept_apart, gone with the command."""
    return _users_temp_folder or tempfile.gettempdir()


def remove_stale_temps_beside(*paths) -> None:
    """remove_stale_temps in the folder of each file a command writes with atomic_file (None and
    "-" skipped): a command killed while writing one left its temp there, which its next run
    removes, as train does in its run folder."""
    for folder in dict.fromkeys(os.path.dirname(os.path.abspath(p)) for p in paths if p not in (None, "-")):
        remove_stale_temps(folder)


def is_disk_full(e: BaseException) -> bool:
    return isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT)
