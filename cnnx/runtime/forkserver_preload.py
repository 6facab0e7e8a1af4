"""Imported by the decode processes' forkserver, and only there (workers.SERVER_PRELOAD), before
it forks anything.

The forkserver starts with SIGINT and SIGTERM blocked (workers.starting_workers), so that a
Ctrl-C, or a SIGTERM to the whole process group, neither cuts its imports short nor kills it:
the caller ends the run and then its workers. The mask is inherited by every process it forks,
and it is multiprocessing's one forkserver of the caller's process: a program's own forkserver
processes (Python 3.14's default start method) could then not be terminated, and its
`with Pool():` hung. So each process unblocks both as it starts to run its target, except
cnnx's decode workers, which ignore them (procdecode._worker) and keep them blocked: unblocked
at fork, a group SIGTERM in the milliseconds before a worker ignored it killed it, and the run
ended as a worker death, not as "terminated".

And the forkserver removes its socket's folder (multiprocessing's /tmp/pymp-*) as it ends: the
caller removes it at its exit, but a caller killed (SIGKILL, the OOM killer) left one in /tmp
each time; the forkserver ends then too, its pipe from the caller closed.
"""

import atexit
import contextlib
import os
import signal
from multiprocessing import process

_bootstrap = process.BaseProcess._bootstrap
DECODE_WORKER_MODULE = "cnnx.runtime.procdecode"


def _bootstrap_unblocked(self, *args, **kwargs):
    if getattr(self._target, "__module__", None) != DECODE_WORKER_MODULE:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM})
    return _bootstrap(self, *args, **kwargs)


if hasattr(signal, "pthread_sigmask"):
    process.BaseProcess._bootstrap = _bootstrap_unblocked


def _remove_socket_folder(server_pid=os.getpid(), caller_pid=os.getppid()):
    """At the forkserver's exit where its caller is gone (this process was handed to another
    parent): its listening socket, and the folder the caller made for it if nothing else is in
    it. Not while the caller lives (a server that ended on an error of its own, a fork refused:
    the caller's next server needs that folder), nor in the processes it forks (they inherit
    this handler, and end with os._exit anyway)."""
    from multiprocessing import forkserver

    address = getattr(forkserver._forkserver, "_forkserver_address", None)
    if os.getpid() != server_pid or os.getppid() == caller_pid or not isinstance(address, str):
        return
    folder = os.path.dirname(address)
    if os.path.basename(folder).startswith("pymp-"):
        with contextlib.suppress(OSError):
            os.unlink(address)
        with contextlib.suppress(OSError):
            os.rmdir(folder)  # only where it is empty: the caller may keep other files there


atexit.register(_remove_socket_folder)
