"""The CPU decode workers: how many (one a core), threads or processes, and the multiprocessing
forkserver the processes are forked from. Standard library only, so that `cnnx classify` can
start the server before it imports numpy and onnxruntime itself: the server's own imports then
run on another core while this process does its own, instead of after them.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal
import sys
import types

from cnnx.runtime.files import sigint_held, signals_blocked

DECODE_MODES = ("auto", "threads", "processes")
# decode="auto" decodes in processes for models up to this input side (px): measured faster at
# 32 px on 2 cores, decode alone and cnnx classify as a whole process (benchmarks/results/
# bench_classify.json: "pipeline_decode", and the "bound" rounds with --decode threads beside).
# Large photos were not measured with processes: threads stay theirs.
PROCESS_DECODE_MAX_SIDE = 64
# ... and for jobs of more than this many files to decode: on fewer, starting the processes (the
# server's imports, the model opened in each) costs more wall time than they save, and threads
# finish first (whole `cnnx classify` processes on 2 cores by file count: benchmarks/results/
# small_jobs.json). A Classifier whose processes already run (an earlier call) uses them anyway.
PROCESS_DECODE_MIN_FILES = 4096
# Imported once by the server, before it forks a worker: a worker starts in milliseconds.
SERVER_PRELOAD = ["cnnx.runtime.forkserver_preload", "cnnx.runtime.procdecode", "onnxruntime"]
# multiprocessing's temporary folder, as cnnx makes it (own_temp_folder): "pymp-" as
# multiprocessing's own (what forkserver_preload removes), then the pid of the process it is for
# and a "-" (never in multiprocessing's own names)
MP_TEMP_PREFIX = "pymp-"
# The longest path of a Unix socket (sun_path, less its NUL): the forkserver's listener is
# <folder>/listener-<8 characters>
UNIX_PATH_MAX = 107


def _forget_the_parent_s_forkserver():
    """In a process forked (os.fork) from one that started multiprocessing's forkserver: that
    server is the parent's (not this process's child: a Classifier opened here found its decode
    processes "could not start ... run again", every time), and so is the folder of its socket
    (removed when the parent exits). This process starts its own, in a folder of its own."""
    forkserver = sys.modules.get("multiprocessing.forkserver")  # never an import here: another thread of the
    if forkserver is None:  # parent may have held its lock at the fork; and not imported, none started
        return
    server = forkserver._forkserver
    if getattr(server, "_forkserver_pid", None) is None:  # none started (or this is the server itself)
        return
    with contextlib.suppress(OSError, TypeError):
        os.close(server._forkserver_alive_fd)  # the parent's server ends with the parent, not with us
    server._forkserver_pid = server._forkserver_alive_fd = server._forkserver_address = None
    multiprocessing.current_process()._config.pop("tempdir", None)


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_the_parent_s_forkserver)


def check_decode_mode(decode) -> str:
    """decode itself, or ValueError naming the modes."""
    if decode not in DECODE_MODES:
        raise ValueError(f"decode must be one of {', '.join(DECODE_MODES)}, got {decode!r}")
    return decode


def cores() -> int:
    """The cores this process may run on (cgroups, taskset), at least 1."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return os.cpu_count() or 1


def decodes_in_processes(decode: str, size, workers: int) -> bool:
    """decode "auto": processes for models of at most PROCESS_DECODE_MAX_SIDE px with 2 or more
    workers (a small JPEG's decode is mostly Python under the GIL, which threads take turns
    at), threads otherwise (libjpeg-turbo and Pillow release the GIL on large photos, and there
    is no process to start). size: the model's input (H, W); workers: the resolved count."""
    if decode != "auto":
        return decode == "processes"
    return max(size) <= PROCESS_DECODE_MAX_SIDE and workers >= 2


def context():
    """The forkserver context: workers are never forks of the caller, which runs onnxruntime's
    and numpy's threads."""
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(SERVER_PRELOAD)
    return ctx


@contextlib.contextmanager
def starting_workers():
    """Around a start of the forkserver or of a worker. Workers run cnnx code only, but
    multiprocessing's start-up would run the caller's main script again in each (as
    `__mp_main__`): slow for the `cnnx` console script, an error in a script without a
    `__main__` guard; it is hidden for the moment the start-up is prepared. And a Ctrl-C waits
    for the start (files.sigint_held). The program's default start method is left unset where
    it was: the start-up's preparation fixes it ("fork"), after which the program's own
    multiprocessing.set_start_method raised "context has already been set"."""
    from multiprocessing import resource_tracker

    own_temp_folder()  # before the forkserver's socket is made in it
    # Started first, if it is not running: its start unblocks SIGINT (CPython's own guard for
    # its child), which the forkserver's start must find blocked.
    resource_tracker.ensure_running()
    unset = multiprocessing.get_start_method(allow_none=True) is None
    main = sys.modules["__main__"]
    sys.modules["__main__"] = types.ModuleType("__main__")
    try:
        # SIGTERM blocked too: the forkserver inherits the mask and keeps it, so a SIGTERM to the
        # whole process group (systemd stopping a service, `timeout`) is left to the caller, which
        # ends the run and stops its workers (they ignore it); a forkserver the signal killed was
        # read as every worker dead, exit 1.
        with sigint_held(), signals_blocked({signal.SIGTERM}):
            yield
    finally:
        sys.modules["__main__"] = main
        if unset:
            multiprocessing.set_start_method(None, force=True)  # unset again


def warm_up():
    """Start the forkserver (and its imports) now, in the background; at once if it runs."""
    from multiprocessing import forkserver

    context()
    with starting_workers():
        forkserver.ensure_running()


def own_temp_folder():
    """Make multiprocessing's temporary folder (the forkserver's socket goes there) one that
    names this process, `<TMPDIR>/pymp-<pid>-*`, held (files.hold_as_writer), and remove
    those of processes gone: multiprocessing's own `pymp-*` of a caller killed (kill -9, a group
    kill that takes the forkserver too) stayed in /tmp for ever, one a kill. Left alone where the
    program made one already (it removes its own, as multiprocessing does: at exit)."""
    import shutil
    import tempfile
    from multiprocessing import util

    from cnnx.runtime.files import held_temp_folder

    config = multiprocessing.current_process()._config
    if config.get("tempdir") is not None:
        return
    root = tempfile.gettempdir()
    if len(os.path.join(root, f"{MP_TEMP_PREFIX}{os.getpid()}-" + "x" * 8, "listener-" + "x" * 8)) > UNIX_PATH_MAX:
        return  # no socket there: multiprocessing's shorter name may still fit
    folder, held = held_temp_folder(MP_TEMP_PREFIX, root)
    config["tempdir"] = folder
    # what multiprocessing.util.get_temp_dir registers for its own (shutil.rmtree bound now: the
    # finalizer may run late in the interpreter's shutdown)
    util.Finalize(None, _remove_temp_folder, args=(shutil.rmtree, folder, held), exitpriority=-100)


def _remove_temp_folder(rmtree, folder, held):
    rmtree(folder, ignore_errors=True)
    with contextlib.suppress(OSError):
        os.close(held)
    process = multiprocessing.current_process()
    if process is not None and process._config.get("tempdir") == folder:
        process._config["tempdir"] = None


def warm_up_for(model, *, decode: str, workers: int) -> bool:
    """Start the forkserver now if the CPU decoder will run in processes for this model (its
    input size read from the file's metadata, cnnx.runtime.contract.peek_preprocess_size);
    whether it did. Never an error: an unreadable model is the loader's to report."""
    from cnnx.runtime.contract import peek_preprocess_size

    size = peek_preprocess_size(model)
    if size is None or not decodes_in_processes(decode, size, workers or cores()):
        return False
    try:
        warm_up()
    except Exception:  # noqa: BLE001 - the Classifier tries again and falls back to threads
        return False
    return True
