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
"""

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
