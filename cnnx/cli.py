"""The `cnnx` command. Each subcommand lives in its stage's package and is imported only
when it runs (or when help lists it), so `cnnx --help` and `cnnx classify` never import torch.
Command modules import torch inside their functions, never at module level."""

from __future__ import annotations

import errno
import importlib
import os
import signal
import sys
import time

import click

from cnnx import __version__

# What the [train] extra installs (import names): train, evaluate and export need them; the
# base install (classify, info) does not.
TRAIN_EXTRA_MODULES = frozenset({"torch", "torchvision", "onnx", "onnxscript", "matplotlib", "tqdm"})

# name -> "module:attribute" of a click.Command; modules must be cheap to import.
COMMANDS = {
    "train": "cnnx.train.command:train",
    "evaluate": "cnnx.train.command:evaluate",
    "export": "cnnx.export.command:export",
    "info": "cnnx.export.command:info",
    "classify": "cnnx.runtime.command:classify",
}


class ExitNow(int):
    """What a command returns for an exit code after which its process may end at once
    (os._exit), skipping the interpreter's teardown (every module's objects, onnxruntime's
    sessions, a CUDA context): every file the command wrote is closed, and nothing it started
    needs an atexit handler but multiprocessing's, which _exit_now runs (its decode processes
    also stop when their pipes to it close).
    cnnx classify on the local engine returns one (benchmarks/results/classify_startup.json,
    "exit_s"); not Ray (its local cluster stops at exit), not train (DataLoader workers)."""


class LazyGroup(click.Group):
    def list_commands(self, ctx):
        return list(COMMANDS)

    def get_command(self, ctx, name):
        target = COMMANDS.get(name)
        if target is None:
            return None
        module, attr = target.split(":")
        return getattr(importlib.import_module(module), attr)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "--version", prog_name="cnnx", help="Show the version and exit.")
def cli():
    """Train a CNN image classifier, export it, classify folders of images.

    \b
      cnnx train                  train on CIFAR-10 (or an image folder), keep the best checkpoint
      cnnx export --format onnx   ONNX / TorchScript / pt2, checked against the checkpoint
      cnnx classify ./images      batch-classify a folder through onnxruntime
    """
    from cnnx.runtime.files import quiet_pillow_warnings

    quiet_pillow_warnings()  # in this process and the decode processes forked from it


def main(argv=None):
    """Run a command; exit 0, 1 (failure), 2 (usage) or 130 (SIGINT, as shells expect, where
    click's standalone mode would say "Aborted!" and exit 1)."""
    _hold_standard_streams()
    _check_current_folder()
    try:
        code = cli.main(args=argv, prog_name="cnnx", standalone_mode=False)
    except click.ClickException as e:
        # train is the command torchrun starts once per rank; any other says its own errors
        if isinstance(e, click.UsageError) and e.ctx is not None and e.ctx.info_name == "train" and _another_rank():
            leave_it_to_rank_0(e.exit_code)
        e.show()
        sys.exit(e.exit_code)
    except click.Abort as e:  # click turns KeyboardInterrupt (and EOF at a prompt) into Abort
        if isinstance(e.__cause__, KeyboardInterrupt):
            _interrupted(e.__cause__)
        click.echo("Aborted!", err=True)
        sys.exit(1)
    except KeyboardInterrupt as e:  # before or after click's own handling
        _interrupted(e)
    except OSError as e:  # what the command printed could not be written: stdout full (> /dev/full), gone or closed
        from cnnx.runtime.files import os_error_line

        why = "stdout is closed" if e.errno == errno.EBADF else os_error_line(e)
        click.echo(f"Error: cannot write the output: {why}", err=True)
        os.dup2(os.open(os.devnull, os.O_WRONLY), 1)  # the exit's flush of what is left then fails no more
        sys.exit(1)
    except ModuleNotFoundError as e:  # the runtime-only install running a training command
        top = (e.name or "").split(".")[0]
        if top == "onnxruntime":  # cnnx.runtime.cuda.onnxruntime()'s line says which and how to mend it
            from cnnx.runtime.files import first_line

            click.echo(f"Error: {first_line(e)}", err=True)
            sys.exit(1)
        if top not in TRAIN_EXTRA_MODULES:
            raise
        click.echo(f"Error: this command needs cnnx's training extra ({top} is not installed): "
                   f"pip install 'cnnx[train]' (PyTorch first for a CUDA build of your choice)", err=True)
        sys.exit(1)
    if isinstance(code, ExitNow):
        _exit_now(code)
    sys.exit(code if isinstance(code, int) else 0)


def _check_current_folder():
    """One line where the current folder was removed under the shell (a build folder wiped, a
    checkout switched): with it gone, classify failed to write an output in a folder that is
    there ("No such file or directory"), its decode processes "could not start", and train died
    inside torch's import (an MKL FATAL line, exit 2), every path given in full."""
    try:
        os.getcwd()
    except FileNotFoundError:
        click.echo("Error: the current folder no longer exists (removed after this shell entered it): "
                   "cd to a folder that does", err=True)
        sys.exit(1)


def launch_rank() -> int:
    """This process's rank in a torchrun launch, else 0. A launch sets WORLD_SIZE (> 1) and RANK;
    a RANK alone (a scheduler's, in the environment of every command of a job) is none
    (cnnx.train.loop.dist_from_env reads them so)."""
    world = os.environ.get("WORLD_SIZE", "1")
    if not (world.isdigit() and int(world) > 1):
        return 0
    rank = os.environ.get("RANK")
    if rank is None or not rank.isdigit():
        got = "none" if rank is None else repr(rank)
        raise click.UsageError(f"the environment's WORLD_SIZE is {world}, and its RANK must then be a whole number "
                               f"(torchrun sets both), got {got}")
    return int(rank)


def _another_rank() -> bool:
    """A process of a torchrun launch other than rank 0: usage errors and Ctrl-C come to every
    rank alike (the same command line, one process group), and rank 0 says them once."""
    try:
        return launch_rank() > 0
    except click.UsageError:
        return False


RANK_0_GRACE_S = 3.0


def leave_it_to_rank_0(code: int):
    """Exit with `code`, saying nothing, a moment after rank 0 has said the same error (torchrun
    ends every rank once one has ended: a rank that exits at once can have rank 0 killed
    before it printed anything)."""
    sys.stderr.flush()
    time.sleep(RANK_0_GRACE_S)
    sys.exit(code)


# What a command ended by a signal says last; it exits with 128 + the signal's number, as shells do.
INTERRUPTED_LINE = {signal.SIGINT: "interrupted", signal.SIGTERM: "terminated"}


def _interrupted(e: BaseException):
    """Ctrl-C, or a SIGTERM that the command turned into a clean end (a KeyboardInterrupt with
    its `signum`: cnnx.runtime.files.Terminated)."""
    signum = getattr(e, "signum", signal.SIGINT)
    if not _another_rank():
        click.echo(INTERRUPTED_LINE[signum], err=True)
    sys.exit(128 + signum)


def _hold_standard_streams():
    """Give a closed stdin, stdout or stderr (`cnnx classify >&-`) a /dev/null of its own. Else
    the first file cnnx opens takes its number, and whatever prints to it (a library's C code
    included) writes into that file, a CSV or a checkpoint. stdout's /dev/null is opened for
    reading only: a write to it fails (EBADF, one line below) rather than losing predictions."""
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            got = os.open(os.devnull, os.O_WRONLY if fd == 2 else os.O_RDONLY)  # the lowest free number
            if got != fd:
                os.dup2(got, fd)
                os.close(got)
    if sys.stdout is None:
        sys.stdout = open(1, "w", closefd=False)
    if sys.stderr is None:
        sys.stderr = open(2, "w", closefd=False)
    from cnnx.runtime.files import NAME_BYTES_ERRORS, RAW_NAME_BYTES_ERRORS

    for stream, errors in ((sys.stdout, RAW_NAME_BYTES_ERRORS), (sys.stderr, NAME_BYTES_ERRORS)):
        if hasattr(stream, "reconfigure"):  # names that are not UTF-8: files.NAME_BYTES_ERRORS
            stream.reconfigure(errors=errors)


def _exit_now(code: int):
    """os._exit(code) once stdout and stderr are flushed; returns if they cannot be (a closed
    pipe: Python's own exit then says so as usual)."""
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except (OSError, ValueError):
        return
    _end_multiprocessing()
    os._exit(int(code))


def _end_multiprocessing():
    """What multiprocessing does at a normal exit, in a process that used it: its processes are
    stopped (a DecodePool's Finalize) and its temporary folder is removed (/tmp/pymp-*, which
    holds the forkserver's socket: os._exit alone left one behind every run)."""
    util = sys.modules.get("multiprocessing.util")
    if util is not None:
        util._exit_function()  # what atexit would run: the pool has stopped, so it only removes the folder


if __name__ == "__main__":
    main()
