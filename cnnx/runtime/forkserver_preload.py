"""Imported by the decode processes' forkserver, and only there (workers.SERVER_PRELOAD), before
it forks anything.

The forkserver starts with SIGINT and SIGTERM blocked (workers.starting_workers), so that a
Ctrl-C, or a SIGTERM to the whole process group, neither cuts its imports short nor kills it:
the caller ends the run and then its workers. The mask is inherited by every process it forks,
and it is multiprocessing's one forkserver of the caller's process: a program's own forkserver
processes (Python 3.14's default start method) could then not be terminated, and its
`with Pool():` hung. Each child unblocks both as it is forked; cnnx's decode workers then ignore
them (procdecode._worker).
"""

import os
import signal


def _unblock_in_child():
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM})


if hasattr(os, "register_at_fork") and hasattr(signal, "pthread_sigmask"):
    os.register_at_fork(after_in_child=_unblock_in_child)
