"""One training run from a resolved TrainConfig to a run directory (DESIGN.md "Run directory").

`fit` reads like torchvision's reference `main`: `setup`, then per epoch `train_epoch`,
`evaluate_epoch`, `save_epoch`, then `finish`. What stays fixed during a run lives in `Run`;
what changes per epoch (and what last.pt stores for an exact resume) lives in `State`.

Only rank 0 writes files or talks; every rank trains its shard of each batch and joins the
all-reduce of the metrics, so all ranks take the same early-stopping decision.
"""

from __future__ import annotations

import contextlib
import csv
import enum
import fcntl
import io
import json
import math
import os
import socket
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from cnnx import __version__
from cnnx.runtime import files
from cnnx.runtime.output import escape_cell
from cnnx.runtime.preprocess import PREPROCESS_VERSION
from cnnx.train import finetune, frontier, loop, optim
from cnnx.train.cache import Rows, take
from cnnx.train.checkpoint import build_checkpoint, save_checkpoint
from cnnx.train.config import TrainConfig, config_from_dict
from cnnx.train.data import SPLIT_BY_NAME, ignored_line, load_splits, name_bytes, split_method

METRIC_COLUMNS = ("epoch", "lr", "train_loss", "train_top1", "train_top5", "val_loss", "val_top1", "val_top5",
                  "seconds", "eval_seconds", "train_seconds_total")
LOCK_NAME = ".cnnx-run.lock"  # flock'ed by the process that owns the folder, for the whole run
RUN_FILES = frozenset({"config.json", "best.pt", "last.pt", "metrics.csv", "per_class.csv", "skipped.txt",
                       "test_metrics.json", "report.html", "plots", LOCK_NAME})
OLD_TEMP_PREFIX = ".tmp-"  # temp files of cnnx versions before cnnx.runtime.files


def say(msg: str, d=None):
    """A line on stderr (rank 0's only): the folders and names in it are the user's, so any
    escape sequence they hold is written escaped (files.printable)."""
    if d is None or d.main:
        print(files.printable(msg), file=sys.stderr, flush=True)


class Stop(enum.Enum):
    """Why the epoch loop ended."""

    FINISHED = "finished"  # all --epochs ran
    EARLY = "early"  # --patience epochs without a better val top-1
    PAUSED = "paused"  # --stop-after: the run continues later with --resume
    DIVERGED = "diverged"  # non-finite values: the best so far is finished (test split, plots), then exit 1


# --- the run folder ---------------------------------------------------------------------------

class RunFolderError(Exception):
    """A run folder that cannot be used (exists, in use, not writable); one line for the user."""


class RunLock:
    """An exclusive flock on OUT/NAME/.cnnx-run.lock, held until `release` (or process exit,
    so a killed run never leaves the folder locked). created: this run made the folder; one
    that fails before its first checkpoint then takes it back (__exit__), still holding the lock."""

    def __init__(self, fd: int, run_dir: Path, created: bool = False):
        self.fd, self.run_dir, self.created = fd, run_dir, created

    def release(self):
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *exc):
        try:
            if exc_type is not None and self.created:
                _remove_if_unstarted(self.run_dir)
        finally:
            self.release()


def _remove_if_unstarted(run_dir: Path):
    """Remove a run folder that holds only what a run writes before its first checkpoint (its
    lock, config.json, skipped.txt, temp files): a run that failed that early (no data, no
    network for the weights) leaves no folder to tell apart from real runs."""
    import shutil

    try:
        names = set(os.listdir(run_dir))
    except OSError:
        return
    early = {LOCK_NAME, "config.json", "skipped.txt"}
    if all(n in early or n.startswith((files.TEMP_PREFIX, OLD_TEMP_PREFIX)) for n in names):
        shutil.rmtree(run_dir, ignore_errors=True)


def reserve_run_dir(run_dir, *, resume: bool, unique: bool = False) -> RunLock:
    """Make `run_dir` this process's, before any data is read. A new run creates the folder
    (os.mkdir: exactly one of two racing runs creates it) and both a new run and --resume take
    the folder's flock without waiting: whoever holds it owns the folder, the other gets one
    line. A new run may reuse an existing folder only when it holds nothing a user could lose
    (no last.pt or best.pt, only a run's own files): that is how a run killed before its first
    epoch ended is started again with the same --name. Temp files of killed runs are removed.
    unique (a name the user did not choose: the arch and the second it started): a folder of
    that name already there means NAME-2, NAME-3, ... (the lock's run_dir), never a reuse."""
    run_dir = Path(run_dir)
    created = False
    if unique and not resume:
        run_dir = _new_unique_folder(run_dir)
        created = True
    elif not resume:
        try:
            run_dir.parent.mkdir(parents=True, exist_ok=True)
            os.mkdir(run_dir)
            created = True
        except FileExistsError:
            if not run_dir.is_dir():
                raise RunFolderError(f"{run_dir} exists and is not a folder; choose another --name") from None
        except OSError as e:
            raise RunFolderError(f"cannot create the run folder: {files.os_error_line(e, run_dir)}") from None
    elif not run_dir.is_dir():
        raise RunFolderError(f"run folder not found: {run_dir}")
    if not created and not resume and not (run_dir / LOCK_NAME).exists():
        _check_reusable(run_dir)  # a folder that is not a run's: refuse without writing into it
    lock = _lock(run_dir)
    lock.created = created
    try:
        if not created and not resume:
            _check_reusable(run_dir)
            _clear_unfinished_run(run_dir)
        with contextlib.suppress(OSError):  # the pid only names the holder in a message (a full disk)
            os.ftruncate(lock.fd, 0)
            os.pwrite(lock.fd, f"{os.getpid()}\n".encode(), 0)
    except BaseException:
        lock.release()
        raise
    remove_stale_temps(run_dir)
    return lock


def _new_unique_folder(run_dir: Path) -> Path:
    """Create run_dir, else the first of run_dir-2, -3, ... that is not there yet."""
    try:
        run_dir.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise RunFolderError(f"cannot create the run folder: {files.os_error_line(e, run_dir)}") from None
    for i in range(1, 1000):
        candidate = run_dir if i == 1 else run_dir.with_name(f"{run_dir.name}-{i}")
        try:
            os.mkdir(candidate)
            return candidate
        except FileExistsError:
            continue
        except OSError as e:
            raise RunFolderError(f"cannot create the run folder: {files.os_error_line(e, candidate)}") from None
    raise RunFolderError(f"{run_dir} and 998 folders named after it exist already; choose a --name")


def _lock(run_dir: Path) -> RunLock:
    path = run_dir / LOCK_NAME
    try:
        fd = files.open_lock_file(path)
    except OSError as e:
        raise RunFolderError(f"cannot use the run folder: {files.os_error_line(e, path)}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
        os.close(fd)
        raise RunFolderError(f"run folder {run_dir} is in use by another cnnx train"
                             f"{f' (pid {holder})' if holder.isdigit() else ''}; wait for it or choose another --name"
                             ) from None
    return RunLock(fd, run_dir)


def _check_reusable(run_dir: Path):
    names = {n for n in os.listdir(run_dir) if not n.startswith((files.TEMP_PREFIX, OLD_TEMP_PREFIX))}
    if "last.pt" in names:
        raise RunFolderError(f"run folder {run_dir} already exists; continue it with --resume {run_dir} "
                             f"or choose another --name")
    if "best.pt" in names:  # e.g. a finished run whose last.pt was deleted to save space
        raise RunFolderError(f"run folder {run_dir} already exists and holds best.pt; choose another --name")
    foreign = sorted(names - RUN_FILES)
    if foreign:
        raise RunFolderError(f"{run_dir} already exists and holds files that are not a cnnx run's "
                             f"({foreign[0]}{', ...' if len(foreign) > 1 else ''}); choose another --name")


def _clear_unfinished_run(run_dir: Path):
    """Remove what a run killed before its first last.pt left (a reusable folder holds only
    run files), so the new run's folder never mixes its files with the old run's."""
    import shutil

    old = sorted(n for n in os.listdir(run_dir) if n in RUN_FILES and n != LOCK_NAME)
    if not old:
        return
    for n in old:
        p = run_dir / n
        shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
    say(f"reusing {run_dir}: its earlier run stopped before its first epoch ended (no last.pt); "
        f"removed its {', '.join(old)}")


def remove_stale_temps(run_dir: Path) -> list:
    """Temp files that killed runs left in the run folder. `.cnnx-tmp-<pid>-*` of live
    processes stay (files.remove_stale_temps); the caller holds the folder's lock, so the
    pid-less `.tmp-*.pt` of older cnnx versions' checkpoint writer cannot be anyone's now."""
    removed = []
    for folder in (run_dir, run_dir / "plots"):
        removed += files.remove_stale_temps(folder, (files.TEMP_PREFIX, OLD_TEMP_PREFIX))
        with contextlib.suppress(OSError):
            for entry in os.scandir(folder):
                if entry.name.startswith(OLD_TEMP_PREFIX) and entry.name.endswith(".pt") and entry.is_file():
                    os.unlink(entry.path)
                    removed.append(entry.path)
    return removed


# --- what the run writes ----------------------------------------------------------------------

def write_csvs(run_dir: Path, history: list, class_names: list):
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(METRIC_COLUMNS)
    for r in history:
        w.writerow([r["epoch"]] + [f"{r[c]:.6g}" for c in METRIC_COLUMNS[1:]])
    files.atomic_write(run_dir / "metrics.csv", buf.getvalue())
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["epoch", "split", "class", "top1"])
    for r in history:
        for split in ("train", "val"):
            for name, v in zip(class_names, r[f"{split}_per_class"]):
                w.writerow([r["epoch"], split, escape_cell(name), f"{v:.6g}"])  # as classify's cells
    files.atomic_write(run_dir / "per_class.csv", buf.getvalue())


def resolved_config(cfg: TrainConfig, *, preprocess: dict, arch_kwargs: dict, extra: dict) -> dict:
    d = cfg.to_dict()
    d["arch_kwargs"] = dict(arch_kwargs)
    d["preprocess"] = preprocess
    d.update(extra)
    return d


def model_spec(cfg: TrainConfig):
    """(arch_kwargs stored in the checkpoint, preprocess spec) for this config."""
    import inspect

    from cnnx.runtime.preprocess import make_spec
    from cnnx.train.zoo import get_arch

    arch = get_arch(cfg.arch)
    size = cfg.image_size or arch.image_size
    if cfg.data == "cifar10":
        size = cfg.image_size or 32
    kwargs = dict(cfg.arch_kwargs)
    params = inspect.signature(arch.build).parameters
    if "image_size" in params:
        kwargs.setdefault("image_size", size)
    if cfg.tta is not None:  # the eval view count is the model's (and its checkpoint's) own
        if "tta" not in params:
            from cnnx.train.config import ConfigError

            raise ConfigError(f"--tta: arch {cfg.arch} has no test-time views (airnet has)")
        kwargs["tta"] = cfg.tta
    return kwargs, make_spec(size, arch.mean, arch.std)


# --- the run ----------------------------------------------------------------------------------

@dataclass
class Run:
    """What stays fixed while the epochs run."""

    cfg: TrainConfig
    d: loop.Dist
    device: str
    run_dir: Path
    progress: bool
    splits: object
    spec: dict
    arch_kwargs: dict
    config: dict
    net: torch.nn.Module  # the bare model (what checkpoints hold)
    wrapped: torch.nn.Module  # Uint8Input(net): what evaluation runs
    train_model: torch.nn.Module  # wrapped, under DDP / torch.compile when asked
    optimizer: object
    xtr: torch.Tensor
    ytr: torch.Tensor
    xva_r: torch.Tensor  # this rank's shard of the validation images, on the device
    yva_r: torch.Tensor
    total_steps: int
    bf16: bool
    channels_last: bool
    head: frozenset = frozenset()  # state_dict names of the head (cnnx.train.finetune.head_names)
    ema: optim.WeightAverage | None = None  # --ema: the average that evaluation and best.pt use
    averaged: torch.nn.Module | None = None  # Uint8Input(ema.module)
    whiten_seconds: float = 0.0  # the whitening init (training time, as in airbench; in the summary)
    compile_seconds: float = 0.0  # torch.compile's warm-up (reported apart, never in training time)
    config_pending: bool = False  # a resumed run's config.json, written with its first last.pt

    @property
    def eval_model(self) -> torch.nn.Module:
        """What validation runs: the weight average when there is one, else the trained model."""
        return self.averaged if self.averaged is not None else self.wrapped
    frozen: bool = False  # the backbone is frozen now (--freeze-backbone-epochs)

    @property
    def class_names(self) -> list:
        return self.splits.class_names


@dataclass
class State:
    """What changes per epoch; last.pt holds all of it, so a resumed run continues exactly."""

    epoch: int = 0  # epochs finished
    step: int = 0  # optimizer steps taken (the lr schedule's input)
    history: list = field(default_factory=list)
    best_top1: float = -1.0
    best_epoch: int = 0
    since_best: int = 0
    train_seconds: float = 0.0
    best_confusion: list | None = None  # of the best epoch, rows = true label (for the report)
    best_probs: torch.Tensor | None = None  # float32 (N val, C) softmax of the best epoch (rank 0)

    def record(self, row: dict, vm: dict, probs) -> bool:
        """Append the epoch's row; True when it is the best so far (best.pt's rule): a higher
        val top-1, or the same with a lower val loss (on a small validation set top-1 ties often,
        and the first of the tied epochs may be the untrained net that guesses one class)."""
        best_loss = next((r["val_loss"] for r in self.history if r["epoch"] == self.best_epoch), math.inf)
        self.history.append(row)
        self.epoch = row["epoch"]
        self.train_seconds = row["train_seconds_total"]
        improved = vm["top1"] > self.best_top1 or (vm["top1"] == self.best_top1 and vm["loss"] < best_loss)
        if improved:
            self.best_top1, self.best_epoch, self.since_best = vm["top1"], row["epoch"], 0
            self.best_confusion, self.best_probs = vm["confusion"], probs
        else:
            self.since_best += 1
        return improved

    def to_checkpoint(self) -> dict:
        return {"history": self.history, "scheduler_step": self.step,
                "best": {"top1": self.best_top1, "epoch": self.best_epoch, "since": self.since_best,
                         "confusion": self.best_confusion, "val_probs": self.best_probs}}


def fit(cfg: TrainConfig, run_dir, *, resume: dict | None = None, stop_after: int | None = None,
        progress: bool = True, end_only: bool = False) -> dict:
    """Train; write the run directory; return a summary dict (rank 0's view). The caller
    holds the run folder (reserve_run_dir) on rank 0. end_only: the resumed run has ended
    (all --epochs, or an early stop) but was stopped before it wrote what comes after its
    last checkpoint (unwritten_end): write that, train nothing."""
    d = loop.dist_from_env()
    device = loop.resolve_device(cfg.device, d)
    if resume is None and d.main:  # a caller that did not reserve the folder: never another run's checkpoints
        taken = [n for n in ("last.pt", "best.pt") if (Path(run_dir) / n).exists()]
        if taken:
            raise RunFolderError(f"run folder {run_dir} already holds {taken[0]} of another run; choose another "
                                 f"folder (or resume that run)")
    with _process_group(d, device), _gpu_memory_as_one_line(cfg, device):
        run = setup(cfg, Path(run_dir), d, device, progress, resume)
        state = start_state(run, resume)
        if end_only:
            if d.main:
                write_pending_config(run)  # a resume killed after its last last.pt, before config.json
                write_csvs(run.run_dir, state.history, run.class_names)
                write_report(run, state)
            return finish(run, state, Stop.FINISHED if state.epoch >= cfg.epochs else Stop.EARLY, None)
        stop, first = Stop.FINISHED, state.epoch
        for epoch in range(first, cfg.epochs):
            if stop_after is not None and epoch - first >= stop_after:
                stop = Stop.PAUSED
                break
            tm, seconds = train_epoch(run, state, epoch)
            vm, probs, eval_seconds = evaluate_epoch(run)
            try:
                check_finite(tm, vm, epoch)
            except Diverged:
                if state.history:  # best.pt of an earlier epoch stands: its test figures and plots, as at any end
                    finish(run, state, Stop.DIVERGED, None)
                    _barrier(d)  # rank 0 writes the plots: the others, exiting, would have torchrun end it mid-plot
                raise
            improved = state.record(history_row(epoch, tm, vm, seconds, eval_seconds, state), vm, probs)
            if d.main:
                save_epoch(run, state, improved, tm, vm)
            log_epoch(run, state, tm, vm, improved)
            if cfg.patience and state.since_best >= cfg.patience and epoch + 1 < cfg.epochs:
                stop = Stop.EARLY
                break
        return finish(run, state, stop, stop_after)


class OutOfGpuMemory(ValueError):
    """The GPU ran out of memory (torch.OutOfMemoryError): one line for the user (exit 1)."""


@contextlib.contextmanager
def _gpu_memory_as_one_line(cfg: TrainConfig, device: str):
    """torch.OutOfMemoryError (CUDA's allocator; the CPU's says it in a plain RuntimeError) ->
    OutOfGpuMemory naming the batch, the images and the card: the user's remedy is an option
    (images that do not fit at all are _resident's to say)."""
    try:
        yield
    except torch.OutOfMemoryError:
        card = ""
        with contextlib.suppress(Exception):  # the card's size is a courtesy: never a second failure
            props = torch.cuda.get_device_properties(torch.device(device))
            card = f" ({props.name}, {props.total_memory / 2**30:.0f} GiB)"
        size = "" if cfg.image_size is None else f" of {cfg.image_size} px"
        raise OutOfGpuMemory(f"out of GPU memory on {device}{card}: {cfg.arch} on batches of {cfg.batch_size} "
                             f"images{size}; a smaller --batch-size (or --image-size)") from None


class OutOfMemory(ValueError):
    """A training step on the CPU would need more memory than is free: one line (exit 1)."""


def _check_step_fits_memory(cfg: TrainConfig, arch_kwargs: dict, size):
    """Before the data is decoded: OutOfMemory where a training step's activations (the
    layers' outputs for a batch) need more than the memory free here. Else the CPU allocator's
    failure is a RuntimeError traceback at the first step, or the OOM killer's SIGKILL."""
    from cnnx.train.cache import available_memory
    from cnnx.train.zoo import MAX_ACTIVATION_RATIO, activation_bytes

    h, w = size
    free = available_memory()
    if cfg.batch_size * 3 * h * w * 4 * MAX_ACTIVATION_RATIO <= free:  # fits whatever the arch: not counted
        return
    need = activation_bytes(cfg.arch, arch_kwargs, size) * cfg.batch_size
    if need > free:
        # the batch asked for (the data is not listed yet: a split smaller than it is one smaller step)
        raise OutOfMemory(f"{cfg.arch} on batches of {cfg.batch_size} images of {h}x{w} px (--batch-size) needs about "
                          f"{need / 2**30:.1f} GiB for a training step, more than the {free / 2**30:.1f} GiB of memory "
                          f"free here: a smaller --batch-size (or --image-size)")


class EveryRankAlike(ValueError):
    """A failure that every process of a torchrun launch reaches alike, from what they share
    (the all-reduced loss, the same splits): rank 0 says it, once (exit 1)."""


class Diverged(EveryRankAlike):
    """Training reached non-finite values: one line for the user (exit 1)."""


def check_finite(tm: dict, vm: dict, epoch: int):
    """Diverged where this epoch's training loss is not finite or a validation image gets a
    non-finite logit: nothing of the epoch is saved (a NaN row's argmax is class 0, so its
    "top-1" could even look good and make best.pt of broken weights)."""
    if math.isfinite(tm["loss"]) and not vm.get("nonfinite"):
        return
    raise Diverged(f"training diverged in epoch {epoch + 1}: train loss {tm['loss']:.4g}, non-finite logits for "
                   f"{vm.get('nonfinite', 0)} of {vm.get('n', '?')} validation images; nothing of this epoch is "
                   f"saved (a lower --lr, or --warmup?)")


class PeerStopped(Exception):
    """Another process of the run stopped (with an error, which it says in its own line; by a
    signal; or killed without a word), and this one's collective then failed: one line here
    too, not gloo's or NCCL's traceback. `peer`, `how`: which, and a key of PEER_ENDS."""

    def __init__(self, message: str, *, peer: int, how: str):
        super().__init__(message)
        self.peer, self.how = peer, how


FAILED_KEY = "cnnx/failed/"  # + rank, in the process group's store: how that process stopped (PEER_ENDS)
PROCESS_KEY = "cnnx/process/"  # + rank: "host pid", to tell a peer killed without a word (SIGKILL) on this host
PEER_ENDS = {"error": "stopped with an error (its own line says which)", "interrupted": "was interrupted (Ctrl-C)",
             "terminated": "was terminated (SIGTERM)", "gone": "ended without a word (killed? out of memory?)"}


@contextlib.contextmanager
def _process_group(d: loop.Dist, device: str):
    """Every rank that fails says so in the process group's store (torchrun's agent holds it,
    so it outlives the rank) before it ends; a rank whose collective then fails with a
    RuntimeError raises PeerStopped where another rank had failed first. A RuntimeError with
    no failed peer is a failure of this rank's own, and keeps its traceback."""
    if d.world <= 1:
        yield
        return
    import torch.distributed as dist

    if device.startswith("cuda"):
        torch.cuda.set_device(device)
    backend = "nccl" if device.startswith("cuda") else "gloo"
    if os.environ.get("TORCHELASTIC_RUN_ID"):  # torchrun's agent did the rendezvous
        dist.init_process_group(backend)
    else:  # WORLD_SIZE and RANK set by hand: it waits for all of them
        _init_by_hand(d, backend)
    _store_set(f"{PROCESS_KEY}{d.rank}", f"{socket.gethostname()} {os.getpid()}")
    try:
        yield
    except BaseException as e:
        peer = _stopped_peer(d) if isinstance(e, RuntimeError) else None
        _store_set(f"{FAILED_KEY}{d.rank}", "terminated" if isinstance(e, files.Terminated) else
                   "interrupted" if isinstance(e, KeyboardInterrupt) else "error")
        if peer is not None:
            raise PeerStopped(f"process {peer[0]} of the run {PEER_ENDS[peer[1]]}; process {d.rank} "
                              f"stopped with it", peer=peer[0], how=peer[1]) from None
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


class NotAllJoined(ValueError):
    """A launch by hand (WORLD_SIZE and RANK set, no torchrun) whose processes did not all
    come within torch's rendezvous timeout: one line naming the missing ones (exit 1)."""


JOINED_KEY = "cnnx/joined/"  # + rank: set by each process of a launch by hand once it reached the store
JOIN_POLL_S = 0.2


def _hand_launch_store(d: loop.Dist):
    """The env:// rendezvous of a launch by hand, in steps short enough for Ctrl-C and SIGTERM
    to end it: torch's own waits inside C++ for up to 30 minutes, with Python's signal
    handlers held off all that time. Process 0 serves the store at MASTER_ADDR:MASTER_PORT;
    the others poll the port with a plain socket (each refused TCPStore attempt logs a C++
    traceback), then everyone polls the store for every process's key. (store, {rank: "host pid"})."""
    host, port = os.environ.get("MASTER_ADDR", ""), os.environ.get("MASTER_PORT", "")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise NotAllJoined(f"a launch with WORLD_SIZE and RANK set needs MASTER_ADDR and a MASTER_PORT of 1 to "
                           f"65535 (now {host or 'unset'}:{port or 'unset'}); torchrun sets all four")
    print(f"waiting for the run's {d.world} processes at {host}:{port} (this is process {d.rank}; torchrun "
          f"starts them together)", file=sys.stderr, flush=True)
    with files.quiet_stderr():  # torch's C++ logs a store connection refused or dropped with its stack
        return _meet(d, host, int(port))


def _meet(d: loop.Dist, host: str, port: int):
    """_hand_launch_store's wait: (the store, every process's JOINED_KEY value), once all are set."""
    import datetime

    from torch.distributed import DistError, TCPStore
    from torch.distributed.distributed_c10d import default_pg_timeout

    deadline = time.monotonic() + default_pg_timeout.total_seconds()
    minutes = f"{default_pg_timeout.total_seconds() / 60:g} minutes"
    timeout = datetime.timedelta(seconds=30)  # of one store request, once the store answers
    if d.rank == 0:
        try:
            store = TCPStore(host, port, d.world, True, timeout, wait_for_workers=False)
        except DistError as e:
            raise NotAllJoined(f"process 0 cannot serve the run's rendezvous at {host}:{port}: "
                               f"{files.first_line(e)}") from None
    else:
        while not _accepts(host, port):
            if time.monotonic() > deadline:
                raise NotAllJoined(f"process {d.rank} found no process 0 at {host}:{port} within {minutes}")
            time.sleep(JOIN_POLL_S)
        store = _join_store(d, host, port, timeout)
    try:
        store.set(f"{JOINED_KEY}{d.rank}", f"{socket.gethostname()} {os.getpid()}")
        while not store.check([f"{JOINED_KEY}{r}" for r in range(d.world)]):
            if time.monotonic() > deadline:
                missing = [r for r in range(d.world) if not store.check([f"{JOINED_KEY}{r}"])]
                raise NotAllJoined(f"process{'es' if len(missing) > 1 else ''} {', '.join(map(str, missing))} of "
                                   f"the run's {d.world} did not come within {minutes} (process {d.rank} waited "
                                   f"at {host}:{port})")
            time.sleep(JOIN_POLL_S)
        joined = {r: store.get(f"{JOINED_KEY}{r}").decode() for r in range(d.world)}
    except DistError:  # process 0, which serves the store, ended (Ctrl-C there) while this one waited
        raise PeerStopped(f"process 0 of the run ended before all {d.world} processes came; process {d.rank} "
                          f"stopped with it", peer=0, how="gone") from None
    except BaseException:  # Ctrl-C, SIGTERM, the timeout: the others must not count this one as come
        with contextlib.suppress(Exception):
            store.delete_key(f"{JOINED_KEY}{d.rank}")
        raise
    return store, joined


def _init_by_hand(d: loop.Dist, backend: str):
    """init_process_group on the hand launch's store, waited for with Ctrl-C and SIGTERM live
    (_in_thread): the backend's own rendezvous waits in C++ (up to 30 minutes) for every
    process, and one that came and then was killed (SIGKILL) is never there. A process of this
    host gone so ends the wait with one line."""
    import torch.distributed as dist

    store, joined = _hand_launch_store(d)

    def watch():
        gone = _gone_peer(joined, d)
        if gone is not None:
            raise PeerStopped(f"process {gone} of the run ended without a word after it came (killed?); process "
                              f"{d.rank} stopped with it", peer=gone, how="gone")

    with files.quiet_stderr():  # the C++ stack logs of a peer that went away
        try:
            _in_thread(lambda: dist.init_process_group(backend, store=store, rank=d.rank, world_size=d.world),
                       "cnnx-init-process-group", check=watch)
        except PeerStopped:
            raise
        except Exception as e:  # noqa: BLE001 - the backend's own types
            raise NotAllJoined(f"the run's {d.world} processes did not meet: {files.first_line(e)}") from None


def _in_thread(call, name: str, *, timeout_s: float | None = None, check=None):
    """call()'s result, run in a daemon thread that the main thread waits for with Ctrl-C and
    SIGTERM live (torch's C++ waits hold Python's signal handlers off, some for ever): its
    exception is raised here; TimeoutError after timeout_s; check() every second meanwhile (it
    raises to stop waiting). A thread given up on is left to its wait."""
    got = {}

    def run():
        try:
            got["result"] = call()
        except BaseException as e:  # noqa: BLE001 - raised in the main thread
            got["error"] = e

    thread = threading.Thread(target=run, name=name, daemon=True)
    thread.start()
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while thread.is_alive():
        thread.join(1.0 if deadline is None else max(0.0, min(1.0, deadline - time.monotonic())))
        if thread.is_alive():
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(f"{name} did not end in {timeout_s:g} s")
            if check is not None:
                check()
    if "error" in got:
        raise got["error"]
    return got["result"]


def _gone_peer(joined: dict, d: loop.Dist) -> int | None:
    """A process that came (joined: rank -> "host pid") from this host and is no longer alive,
    else None. (Read from the store before init_process_group: its client is the backend's
    then, a request beside the backend's waits behind it.)"""
    for r, value in joined.items():
        host, pid = value.rsplit(" ", 1)
        if r != d.rank and host == socket.gethostname() and not files.pid_alive(int(pid)):
            return r
    return None


def _join_store(d: loop.Dist, host: str, port: int, timeout):
    """A TCPStore client of process 0's store, made in a thread (_in_thread): torch's
    constructor waits without end where something other than a store accepts the connection
    and never answers (a MASTER_PORT another program uses)."""
    from torch.distributed import DistError, TCPStore

    try:
        return _in_thread(lambda: TCPStore(host, port, d.world, False, timeout), "cnnx-rendezvous",
                          timeout_s=timeout.total_seconds())
    except DistError as e:
        why = files.first_line(e)
    except TimeoutError:
        why = f"it accepts the connection but does not answer as a store in {timeout.total_seconds():g} s"
    raise NotAllJoined(f"process {d.rank} cannot join the run's rendezvous at {host}:{port}: {why} (is MASTER_PORT "
                       f"the port of process 0?)")


def _accepts(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


def _store_set(key: str, value: str):
    from torch.distributed import distributed_c10d

    try:
        distributed_c10d._get_default_store().set(key, value)
    except Exception:  # noqa: BLE001 - the store may be gone with the launcher: nothing to tell then
        pass


def _stopped_peer(d: loop.Dist) -> tuple | None:
    """(rank, how: a key of PEER_ENDS) of a peer that stopped first, else None: the error is
    this rank's own. A peer on this host whose process is gone without saying so was killed
    (SIGKILL, the OOM killer)."""
    from torch.distributed import distributed_c10d

    try:
        store = distributed_c10d._get_default_store()
        for r in range(d.world):
            if r != d.rank and store.check([f"{FAILED_KEY}{r}"]):
                how = store.get(f"{FAILED_KEY}{r}").decode()
                return r, how if how in PEER_ENDS else "error"
        for r in range(d.world):
            if r != d.rank and store.check([f"{PROCESS_KEY}{r}"]):
                host, pid = store.get(f"{PROCESS_KEY}{r}").decode().rsplit(" ", 1)
                if host == socket.gethostname() and not files.pid_alive(int(pid)):
                    return r, "gone"
    except Exception:  # noqa: BLE001 - no store to ask: the error is this rank's own
        return None
    return None


def _barrier(d):
    if d.world > 1:
        import torch.distributed as dist

        dist.barrier()


def setup(cfg: TrainConfig, run_dir: Path, d: loop.Dist, device: str, progress: bool,
          resume: dict | None = None) -> Run:
    """Data, config.json, model, optimizer, device placement. resume: the last.pt being
    continued, whose data must be the data found now (check_same_data), before anything is
    written."""
    from cnnx.train.config import ConfigError
    from cnnx.train.zoo import Uint8Input, batch_of_one_fails, create_model, pretrained_state_dict, smallest_side

    dev_type = torch.device(device).type
    torch.set_num_threads(loop.cpu_threads(cfg, d))
    arch_kwargs, spec = model_spec(cfg)
    side = min(spec["size"])
    smallest = smallest_side(cfg.arch, arch_kwargs, spec["size"])
    if smallest is not None:
        h, w = spec["size"]
        raise ConfigError(f"--image-size: {cfg.arch} cannot take {h}x{w} px images (its layers shrink them to "
                          f"nothing); " + (f"the smallest it takes is {smallest}" if smallest else "no size fits"))
    per_rank = max(1, cfg.batch_size // d.world)  # a process's batch (train_one_epoch's)
    if per_rank == 1 and batch_of_one_fails(cfg.arch, arch_kwargs, spec["size"]):
        h, w = spec["size"]  # else torch's "Expected more than 1 value per channel" at the first step
        raise ConfigError(f"--batch-size {cfg.batch_size}: {cfg.arch} at {h}x{w} px has batch norm over 1x1 maps, "
                          f"which cannot train on one image a {'process' if d.world > 1 else 'batch'}; pass "
                          f"--batch-size {2 * d.world} or more")
    if "crop" in cfg.aug and cfg.crop_pad >= side:  # reflect padding takes at most side - 1 pixels
        raise ConfigError(f"--crop-pad {cfg.crop_pad} (the {cfg.arch} recipe's, unless given) must be smaller than "
                          f"the image side ({side} px): pass a smaller --crop-pad, or --aug without crop")
    if dev_type == "cpu":  # CUDA's allocator says it in a torch.OutOfMemoryError (_gpu_memory_as_one_line)
        _check_step_fits_memory(cfg, arch_kwargs, spec["size"])
    if cfg.weights and resume is None:
        finetune.check_backbone(cfg.weights, cfg.arch, arch_kwargs)
    # A resume takes every weight from last.pt: the ImageNet file is needed (and read) only to start.
    pretrained = cfg.pretrained and resume is None
    if pretrained:  # read and checked now, before minutes of decoding, and again where the model is built
        pretrained_state_dict(cfg.arch)
    # a resumed run keeps the split it began with (runs before SPLIT_BY_FIRST_NAME recorded none)
    split = SPLIT_BY_NAME if resume is None else split_method(resume["config"])
    splits = load_run_data(cfg, spec, run_dir, d, progress, split)
    xtr, ytr = splits.train
    xva, yva = splits.val
    if cfg.whiten and cfg.whiten_images > len(ytr) and resume is None:  # frontier.initialise samples them all
        say(f"note: the whitening init samples all {len(ytr)} training images (whiten_images {cfg.whiten_images} "
            "is more than the split holds)", d)
    config = resolved_config(cfg, preprocess=spec, arch_kwargs=arch_kwargs, extra={
        "num_classes": len(splits.class_names), "class_names": splits.class_names, "world_size": d.world,
        "device_resolved": device, "threads_resolved": torch.get_num_threads(), "cnnx_version": __version__,
        "preprocess_version": PREPROCESS_VERSION,
        "train_images": len(ytr), "val_images": len(yva),
        "test_images": 0 if splits.test is None else len(splits.test[1]), "skipped_files": len(splits.skipped),
        "val_files_sha256": files_digest(splits.val_paths, split=split),
        "val_relpaths_sha256": files_digest(splits.val_paths, splits.val_root, split),
        "train_relpaths_sha256": files_digest(splits.train_paths, splits.train_root, split), "split": split,
    })
    check_ranks_see_same_data(config, d, cfg.data)
    if resume is not None:
        check_same_data(config, resume["config"], cfg.data)
    # A resumed run's config (--epochs changed, say) is written with its first checkpoint: until
    # then last.pt is still the run config.json describes (a resume that failed left them apart).
    config_pending = resume is not None and (run_dir / "config.json").exists()
    if d.main:
        if not config_pending:
            files.atomic_write(run_dir / "config.json", json.dumps(config, indent=2) + "\n")
        if splits.skipped:
            files.atomic_write(run_dir / "skipped.txt", skipped_text(splits.skipped))

    torch.manual_seed(cfg.seed)
    try:
        net = create_model(cfg.arch, len(splits.class_names), **arch_kwargs,
                           **({"pretrained": True} if pretrained else {}))
    except (RuntimeError, MemoryError) as e:  # e.g. seed-cnn's dense layer grows with the side squared
        h, w = spec["size"]
        raise ValueError(f"cannot build {cfg.arch} for {len(splits.class_names)} classes at {h}x{w} px "
                         f"(a smaller --image-size?): {files.first_line(e, 200)}") from None
    head = finetune.head_names(cfg.arch, len(splits.class_names), arch_kwargs)
    channels_last = loop.channels_last_enabled(cfg, dev_type)
    wrapped = Uint8Input(net, spec["mean"], spec["std"]).to(device)
    if channels_last:
        wrapped = wrapped.to(memory_format=torch.channels_last)
    whitening, whiten_seconds = frontier.initialise(net, cfg, xtr, spec["mean"], spec["std"])
    train_model = _training_module(wrapped, cfg, d, device)
    # One parameter list unless fine-tuning options split it (keeps older runs' optimizer states resumable).
    params = (finetune.param_groups(net, head, cfg.backbone_lr_mult)
              if cfg.backbone_lr_mult != 1.0 or cfg.freeze_backbone_epochs else wrapped.parameters())
    steps_per_epoch = max(1, (len(ytr) // d.world) // per_rank)
    if frontier.wants_role_groups(cfg):  # Muon, BN biases at their own lr, the whitening bias's own schedule
        params = optim.param_groups(net, cfg, steps_per_epoch=steps_per_epoch, whitening=whitening)
    run = Run(cfg, d, device, run_dir, progress, splits, spec, arch_kwargs, config, net, wrapped, train_model,
              loop.make_optimizer(params, cfg), _resident(xtr, device), ytr.to(device),
              # Validation is sharded across ranks and its counts all-reduced.
              _resident(take(xva, slice(d.rank, None, d.world)), device), yva[d.rank::d.world].to(device),
              planned_steps(cfg, steps_per_epoch, resume), loop.bf16_enabled(cfg, dev_type), channels_last, head)
    run.whiten_seconds = whiten_seconds
    run.config_pending = config_pending and d.main
    run.ema = frontier.weight_average(net, cfg)
    if run.ema is not None:
        run.averaged = Uint8Input(run.ema.module, spec["mean"], spec["std"]).to(device)
    if cfg.compile:
        run.compile_seconds = frontier.compile_warmup(train_model, net, run.xtr, run.ytr, batch=per_rank, device=device,
                                                      bf16=run.bf16, channels_last=channels_last)
        say(f"torch.compile warm-up: {run.compile_seconds:.1f}s (not counted as training time)", d)
    say(f"{cfg.arch}: {sum(p.numel() for p in net.parameters()):,} parameters on {device} x{d.world}, "
        f"{len(ytr)} train / {len(yva)} val images, {steps_per_epoch} steps/epoch, "
        f"threads {torch.get_num_threads()}, bf16 {run.bf16}, channels_last {channels_last}", d)
    _say_images_left_out(len(ytr), per_rank, steps_per_epoch, d)
    return run


LEFT_OUT_NOTED = 0.05  # the share of the training split an epoch leaves out from which a run says so


def _say_images_left_out(n: int, per_rank: int, steps: int, d) -> None:
    """An epoch trains `steps` whole batches of `per_rank` a process (train_one_epoch): on a small
    folder the remainder is a large share of it (900 images at batch 512 leave 388 out of each
    epoch), which the user is told, with a batch size that leaves out fewer than one image a step."""
    shard = n // d.world
    used = d.world * min(shard, steps * per_rank)
    if n - used < LEFT_OUT_NOTED * n:
        return
    more_steps = -(-shard // per_rank)  # one more step for the remainder, each batch smaller
    even = shard // more_steps
    left = n - d.world * more_steps * even
    advice = "" if left >= n - used else f" --batch-size {even * d.world} " + (
        "uses them all" if left == 0 else f"leaves out {left}")
    say(f"note: each epoch trains on {used} of the {n} training images, in whole batches of {per_rank * d.world}; "
        f"the other {n - used} (others each epoch: the order is shuffled) wait for a later epoch.{advice}", d)


def planned_steps(cfg: TrainConfig, steps_per_epoch: int, resume: dict | None) -> int:
    """The schedule's length in steps: --epochs at this run's steps an epoch; for a resume, the
    steps last.pt has taken (at the rate they were taken: another number of processes takes
    another number a epoch) and the epochs left at this rate, so the schedule ends with the
    last epoch. Unchanged world and --epochs: the same number as the first plan."""
    if resume is None:
        return cfg.epochs * steps_per_epoch
    return int(resume["scheduler"]["step"]) + (cfg.epochs - int(resume["epoch"])) * steps_per_epoch


def _training_module(wrapped, cfg: TrainConfig, d: loop.Dist, device: str):
    """wrapped under DDP (several ranks) and torch.compile (when asked): what train steps call."""
    train_model = wrapped
    if d.world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        dev = torch.device(device)
        train_model = DDP(wrapped, device_ids=[dev.index] if dev.type == "cuda" else None)
    if cfg.compile:
        train_model = torch.compile(train_model)
    return train_model


def _resident(images, device):
    """A tensor moves to the device; a disk cache's Rows stay where they are (read per batch).
    OutOfGpuMemory where the images do not fit there: no smaller batch helps, the disk cache does."""
    if isinstance(images, Rows):
        return images
    try:
        return images.to(device)
    except torch.OutOfMemoryError:
        raise OutOfGpuMemory(f"the decoded images ({images.numel() / 2**30:.1f} GiB) do not fit in the memory of "
                             f"{device}: --cache disk keeps them on the host, read batch by batch") from None


def train_spec(cfg: TrainConfig, spec: dict):
    """The spec the training images are decoded through: for random-resized-crop on an image
    folder, the same resize at rrc_cache_scale x the side (None: the model's spec)."""
    import math

    from cnnx.runtime.preprocess import validate_spec

    if "rrc" not in cfg.aug or cfg.data == "cifar10" or cfg.rrc_cache_scale == 1:
        return None
    return validate_spec({**spec, "size": [math.ceil(s * cfg.rrc_cache_scale) for s in spec["size"]]})


def load_run_data(cfg: TrainConfig, spec: dict, run_dir: Path, d: loop.Dist, progress: bool, split: int):
    """The splits (`split`: data.SPLIT_BY_NAME, or the method a resumed run began with); each
    machine's first process (LOCAL_RANK 0; rank 0 on its machine) decodes (and caches) first, the
    others then read its cache (a disk cache is mapped by every rank; each reads only its shard's
    rows). Rank 0 alone, every process of another machine decoded the whole folder at once."""
    base = {"data": cfg.data, "data_root": cfg.data_root, "cache_dir": cfg.cache_dir, "preprocess": spec,
            "val_fraction": cfg.val_fraction, "split_seed": cfg.split_seed, "split": split}
    how = {"workers": cfg.workers, "cache_mode": cfg.cache, "train_spec": train_spec(cfg, spec)}
    first = d.main or (d.local_rank == 0 and "LOCAL_RANK" in os.environ)  # a launch by hand names no machines
    if first:
        splits = load_splits(base, progress=progress and d.main, **how)
    _barrier(d)
    if not first:
        splits = load_splits(base, progress=False, **how)
    say(f"data: {splits.source}", d)
    for note in splits.notes:
        say(f"note: {note}", d)
    if splits.ignored:
        say(ignored_line(splits.ignored), d)
    if splits.skipped:
        say(f"skipped {len(splits.skipped)} file(s):", d)
        for p, why in splits.skipped[:20]:
            say(f"  {files.printable(f'{p}: {why}')}", d)  # one line a file, no escape sequences of a name
        if len(splits.skipped) > 20:
            say(f"  ... and {len(splits.skipped) - 20} more (all listed in {run_dir / 'skipped.txt'})", d)
    if len(splits.train[1]) == 0 or len(splits.val[1]) == 0:
        raise EveryRankAlike(f"not enough images to train and validate "
                         f"({len(splits.train[1])} train, {len(splits.val[1])} val)")
    if len(splits.train[1]) < d.world:  # a rank with no training image trains on an empty batch (a NaN loss)
        raise EveryRankAlike(f"{len(splits.train[1])} training image(s) for {d.world} processes: each needs at "
                             "least one")
    return splits


_SKIPPED_ESCAPES = str.maketrans({"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"})


def skipped_text(skipped) -> bytes:
    """skipped.txt: a line `path<TAB>reason` a file; a backslash, tab, newline or CR in a name is
    written \\\\, \\t, \\n, \\r (one line a file, whatever its name); a name that is not UTF-8
    as its own bytes (surrogateescape), as cnnx classify's errors file writes it."""
    return "".join(f"{files.name_text(p).translate(_SKIPPED_ESCAPES)}\t{r.translate(_SKIPPED_ESCAPES)}\n"
                   for p, r in skipped).encode("utf-8", "surrogateescape")


def files_digest(paths, root=None, split: int = SPLIT_BY_NAME) -> str | None:
    """sha256 of a split's file list (what --resume compares), None where there is no list
    (CIFAR-10). root: each path relative to it (the folder holding the class folders) with the
    file's size, so that the data folder moved elsewhere gives the same digest, and another
    folder of files named alike (0000.jpg, ...) another one. split: the run's split method,
    whose names are hashed as its run hashed them (data.name_bytes)."""
    if paths is None:
        return None
    import hashlib

    if root is not None:
        base = os.path.realpath(os.path.expanduser(root))
        paths = [f"{os.path.relpath(p, base)}\0{_size(p)}" for p in paths]
    return hashlib.sha256(name_bytes("\n".join(paths), split)).hexdigest()


def _size(path) -> int:
    try:
        return os.stat(path).st_size
    except OSError:  # gone since it was decoded: no size matches it
        return -1


def held_out_changed(config: dict, val_paths, root) -> str | None:
    """Why `val_paths`, a split re-created from a run's config out of the class folders in
    `root`, are not the files that run held out (config's val_relpaths_sha256; of a run before
    it, val_files_sha256: the same absolute paths), else None: what export's gate and evaluate
    --split val check before they score them as held-out images."""
    relative = config.get("val_relpaths_sha256")
    recorded = relative or config.get("val_files_sha256")
    if not recorded:
        return "the cnnx that ran it did not record them"
    if files_digest(val_paths, root if relative else None, split_method(config)) != recorded:
        return "files added, removed or renamed since the run"
    return None


DATA_KEYS = (("class_names", "classes"), ("train_images", "training images"), ("val_images", "validation images"),
             ("test_images", "test images"), ("val_relpaths_sha256", "validation files"),
             ("val_files_sha256", "validation files"),  # (absolute: of runs before relative ones)
             ("train_relpaths_sha256", "training files"))  # a file moved to another class, renamed


def data_difference(now: dict, then: dict, was: str = "then", now_is: str = "now") -> str | None:
    """The first of DATA_KEYS in which two resolved configs' data differ, in words, or None.
    A key `then` lacks (a checkpoint of an older cnnx) is not compared."""
    for key, what in DATA_KEYS:
        if key not in then or then[key] == now[key]:
            continue
        if key == "val_files_sha256" and "val_relpaths_sha256" in then:  # where the folder is does not matter
            continue
        if key == "class_names":
            change = (f"{len(then[key])} {was}, {len(now[key])} {now_is}" if len(then[key]) != len(now[key])
                      else "other names")
        elif key.endswith("_sha256"):
            change = "other files"
        else:
            change = f"{then[key]} {was}, {now[key]} {now_is}"
        return f"{what}: {change}"
    return None


def check_same_data(now: dict, then: dict, data: str):
    """DataError where the data found for a --resume is not the data the run began with: other
    classes, another number of images, other validation files (a new split: former validation
    images trained on, best.pt chosen on two validation sets), other training files (moved to
    another class, renamed: the resumed epochs would not be the run's)."""
    from cnnx.train.data import DataError

    change = data_difference(now, then)
    if change is None:
        return
    began = then.get("preprocess_version")  # recorded since preprocess version 3
    if began is not None and began != PREPROCESS_VERSION:  # the files may be the same, decoded (or skipped) otherwise
        raise DataError(f"--resume: this cnnx decodes images otherwise than the one that began the run (preprocess "
                        f"version {PREPROCESS_VERSION}, the run's {began}; {change} in {data}): resume with that "
                        "cnnx, or train a new run (another --name)")
    older = "" if began is not None else "; or the older cnnx that began it decoded some files otherwise"
    raise DataError(f"the data in {data} changed since the run began ({change}{older}): --resume would "
                    "continue the run on other images; restore the data, or train a new run (another --name)")


def check_ranks_see_same_data(config: dict, d: loop.Dist, data: str):
    """DataError on every rank where any rank found other data than rank 0 (each lists the
    folder itself: another node's copy, or a folder changed while rank 0 decoded). Without it
    a rank with another class fails inside DDP with a traceback, and one with a few more
    images trains and validates on its own split while config.json says rank 0's."""
    if d.world <= 1:
        return
    import torch.distributed as dist

    from cnnx.train.data import DataError

    box = [{k: config[k] for k, _ in DATA_KEYS} if d.main else None]
    dist.broadcast_object_list(box)
    changes = [None] * d.world
    dist.all_gather_object(changes, data_difference(config, box[0], "on process 0", "here"))
    bad = next(((rank, change) for rank, change in enumerate(changes) if change is not None), None)
    if bad is not None:
        raise DataError(f"process {bad[0]} of {d.world} found other data in {data} than process 0 ({bad[1]}): "
                        f"every process must see the same files")


def start_state(run: Run, resume: dict | None) -> State:
    """A fresh State, or last.pt's, with the model and optimizer restored from it."""
    if resume is None:
        if run.cfg.weights:
            n = finetune.load_backbone(run.net, run.cfg.weights, run.cfg.arch, len(run.class_names), run.arch_kwargs)
            say(f"started from {run.cfg.weights}: {n} backbone tensors loaded, a new head for "
                f"{len(run.class_names)} classes ({', '.join(sorted(run.head))})", run.d)
        if run.ema is not None:
            run.ema.load_state_dict(run.net.state_dict())  # the average starts at the starting weights
        return State()
    if run.d.main:
        _restore_best(run.run_dir, resume)
    # With --ema a checkpoint's state_dict is the average (what was evaluated); the trained weights are beside it.
    run.net.load_state_dict(resume.get("train_state_dict", resume["state_dict"]))
    if run.ema is not None:
        run.ema.load_state_dict(resume["state_dict"])
    run.optimizer.load_state_dict(resume["optimizer"])
    best = resume["best"]
    if best.get("confusion") is None and best["epoch"]:  # last.pt of an older cnnx: best.pt has it
        from cnnx.train.checkpoint import load_checkpoint

        best = {**best, "confusion": load_checkpoint(run.run_dir / "best.pt")["metrics"]["val_confusion"]}
    state = State(epoch=int(resume["epoch"]), step=int(resume["scheduler"]["step"]), history=list(resume["history"]),
                  best_top1=float(best["top1"]), best_epoch=int(best["epoch"]), since_best=int(best["since"]),
                  best_confusion=best.get("confusion"), best_probs=best.get("val_probs"))
    state.train_seconds = state.history[-1]["train_seconds_total"] if state.history else 0.0
    say(f"resuming {run.run_dir} after epoch {state.epoch} (step {state.step})", run.d)
    _say_what_resume_changes(run, resume, state.step)
    return state


def _say_what_resume_changes(run: Run, resume: dict, step: int):
    """A resume is exact on the run's own terms; say where it is not: another number of
    processes (other batches, another number of steps an epoch), or a schedule planned again
    (planned_steps) for another --epochs or that rate: the lr of the next step is not the one
    the first plan gave (after a finished cosine run it rises)."""
    began, epochs_then = resume["config"].get("world_size", 1), resume["config"]["epochs"]
    cfg = run.cfg
    if began != run.d.world:
        say(f"this run began on {began} process(es) and continues on {run.d.world}: its batches differ "
            f"from an uninterrupted run's from here on", run.d)
    decoded_then = resume["config"].get("preprocess_version")
    if decoded_then is not None and decoded_then != PREPROCESS_VERSION:
        say(f"this run's images were decoded by preprocess version {decoded_then}, this cnnx's is "
            f"{PREPROCESS_VERSION}: the kinds of files it decodes otherwise (cnnx.runtime.preprocess) continue "
            "on other pixels, and the training cache is decoded again", run.d)
    threads, threads_then = torch.get_num_threads(), resume["config"].get("threads_resolved")
    if torch.device(run.device).type == "cpu" and threads_then is not None and threads_then != threads:
        # a CPU kernel's sums are split by thread: the weights drift from an uninterrupted run's
        say(f"this run trained on {threads_then} CPU thread(s) a process and continues on {threads}: its figures "
            f"will not be bit-identical to an uninterrupted run's (--threads {threads_then} keeps them so)", run.d)
    planned = int(resume["scheduler"].get("total_steps", run.total_steps))
    kw = dict(peak=cfg.lr, schedule=cfg.schedule, warmup=cfg.warmup, final=cfg.final_lr)
    now, was = loop.lr_at(step, run.total_steps, **kw), loop.lr_at(step, planned, **kw)
    if planned != run.total_steps and not math.isclose(now, was, rel_tol=1e-6, abs_tol=1e-12):
        why = ([f"--epochs {cfg.epochs} (was {epochs_then})"] if cfg.epochs != epochs_then else []) + \
              ([f"{run.d.world} process(es)"] if began != run.d.world else []) or ["this run's steps an epoch"]
        say(f"the {cfg.schedule} schedule is planned again for {' and '.join(why)}: {run.total_steps} steps "
            f"(first {planned}); the next step's lr is {now:.3g} where the first plan gave {was:.3g}", run.d)


LAST_ONLY = ("train_state_dict", "optimizer", "scheduler", "history", "best")  # last.pt's fields beyond best.pt's


def _restore_best(run_dir: Path, last: dict):
    """best.pt from last.pt where the run was killed after writing last.pt and before best.pt
    (save_epoch): its last epoch was the best, and best.pt is missing or of an earlier epoch."""
    from cnnx.train.checkpoint import CheckpointError, load_checkpoint

    if last["best"]["epoch"] != last["epoch"]:
        return
    path = run_dir / "best.pt"
    if path.exists():
        try:
            if load_checkpoint(path)["epoch"] == last["epoch"]:
                return
        except CheckpointError:
            pass
    save_checkpoint({k: v for k, v in last.items() if k not in LAST_ONLY}, path)
    say(f"best.pt of epoch {last['epoch']} rebuilt from last.pt (the run was stopped between the two)")


def train_epoch(run: Run, state: State, epoch: int):
    """One pass over the training split; returns (metrics, seconds) and advances state.step."""
    torch.manual_seed(run.cfg.seed * 7919 + epoch)  # dropout etc.: a resumed epoch draws the same
    frozen = epoch < run.cfg.freeze_backbone_epochs
    # Only a run that freezes its backbone toggles it: unfreezing would also wake the parameters frozen for
    # good (whitening filters, frozen BN scales), and a flipped requires_grad recompiles a compiled model.
    if run.cfg.freeze_backbone_epochs and finetune.set_backbone_frozen(run.net, run.head, frozen) and run.d.world > 1:
        run.train_model = _training_module(run.wrapped, run.cfg, run.d, run.device)  # DDP hooks follow requires_grad
    if frozen != run.frozen:
        say(f"epoch {epoch + 1}: backbone {'frozen' if frozen else 'unfrozen'}", run.d)
        run.frozen = frozen
    t0 = loop.timer_sync(run.device)
    tm, state.step = loop.train_one_epoch(
        run.train_model, run.optimizer, run.xtr, run.ytr, cfg=run.cfg, epoch=epoch, step=state.step,
        total_steps=run.total_steps, num_classes=len(run.class_names), device=run.device, rank=run.d.rank,
        world=run.d.world, bf16=run.bf16, progress=run.progress and run.d.main,
        frozen_modules=finetune.backbone_norm_layers(run.net, run.head) if frozen else (), out_size=run.spec["size"],
        ema=run.ema)
    return tm, loop.timer_sync(run.device) - t0


def evaluate_epoch(run: Run):
    """Validation metrics (all ranks' counts), the per-image softmax (gathered on rank 0) and
    the seconds it took. Evaluation is float32 always: the metrics describe the function that
    export and `cnnx classify` run, and best.pt is chosen by them (bf16 is for training speed)."""
    t0 = loop.timer_sync(run.device)
    _rank_0_buffers(run.eval_model, run.d)
    counts, probs = loop.eval_counts(run.eval_model, run.xva_r, run.yva_r, len(run.class_names),
                                     batch_size=run.cfg.eval_batch_size, device=run.device,
                                     channels_last=run.channels_last, keep_probs=True)
    vm = counts.all_reduce().metrics()
    probs = _gather_val_rows(run, probs)
    return vm, probs, loop.timer_sync(run.device) - t0


def _rank_0_buffers(model, d: loop.Dist):
    """Rank 0's buffers (batch norm's running statistics) on every rank. DDP sends them at a
    training forward's start only: after an epoch's last step each rank's statistics are its
    own, and each rank scored its validation shard with them, while best.pt keeps rank 0's
    (the figures were of no saved model, the best epoch chosen on them)."""
    if d.world > 1:
        import torch.distributed as dist

        for t in model.buffers():
            dist.broadcast(t, 0)


def _gather_val_rows(run: Run, probs: torch.Tensor):
    """Rank r holds validation rows r, r+world, ...: put them back in order on rank 0."""
    d = run.d
    if d.world == 1:
        return probs.cpu()
    import torch.distributed as dist

    n = len(run.splits.val[1])
    rows = -(-n // d.world)
    padded = torch.zeros((rows, probs.shape[1]), dtype=probs.dtype, device=probs.device)
    padded[:len(probs)] = probs
    parts = [torch.empty_like(padded) for _ in range(d.world)]
    dist.all_gather(parts, padded)
    if not d.main:
        return None
    full = torch.empty((n, probs.shape[1]), dtype=probs.dtype)
    for r, part in enumerate(parts):
        full[r::d.world] = part[:len(range(r, n, d.world))].cpu()
    return full


def history_row(epoch: int, tm: dict, vm: dict, seconds: float, eval_seconds: float, state: State) -> dict:
    return {"epoch": epoch + 1, "lr": tm["lr"],
            "train_loss": tm["loss"], "train_top1": tm["top1"], "train_top5": tm["top5"],
            "val_loss": vm["loss"], "val_top1": vm["top1"], "val_top5": vm["top5"],
            "seconds": seconds, "eval_seconds": eval_seconds, "train_seconds_total": state.train_seconds + seconds,
            "train_per_class": tm["per_class"], "val_per_class": vm["per_class"]}


def save_epoch(run: Run, state: State, improved: bool, tm: dict, vm: dict):
    """last.pt, best.pt (when improved), the CSVs and report.html, each atomically (rank 0).
    last.pt first: it holds all of best.pt, so a run killed between the two writes resumes
    and rebuilds best.pt from it (start_state); best.pt first left a run of one epoch with
    best.pt and no last.pt, which could neither resume nor start again."""
    metrics = {"val_top1": vm["top1"], "val_top5": vm["top5"], "val_loss": vm["loss"],
               "train_top1": tm["top1"], "val_per_class": vm["per_class"], "val_confusion": vm["confusion"]}
    ckpt = build_checkpoint(model=run.ema.module if run.ema is not None else run.net, arch=run.cfg.arch,
                            arch_kwargs=run.arch_kwargs,
                            class_names=run.class_names, preprocess=run.spec, epoch=state.epoch, metrics=metrics,
                            config=run.config)
    resume = state.to_checkpoint()
    trained = {} if run.ema is None else {"train_state_dict": {k: v.detach().cpu() for k, v in run.net.state_dict().items()}}
    save_checkpoint({**ckpt, **trained, "optimizer": run.optimizer.state_dict(),
                     "scheduler": {"step": resume.pop("scheduler_step"), "total_steps": run.total_steps,
                                   "kind": run.cfg.schedule}, **resume}, run.run_dir / "last.pt")
    write_pending_config(run)
    if improved:
        save_checkpoint(ckpt, run.run_dir / "best.pt")
    write_csvs(run.run_dir, state.history, run.class_names)
    write_report(run, state)


def write_report(run: Run, state: State, summary: dict | None = None):
    """report.html: curves, per-class, confusion and the validation gallery of the best epoch."""
    from cnnx.report import Predictions, write_training_report

    if state.best_confusion is None:
        return
    xva, yva = run.splits.val
    val = None
    if state.best_probs is not None:
        val = Predictions(images=xva if isinstance(xva, Rows) else xva.numpy(), labels=yva.numpy(), probs=state.best_probs.numpy(),
                          paths=run.splits.val_paths)
    write_training_report(run.run_dir / "report.html", title=f"cnnx train: {run.run_dir.name}", config=run.config,
                          history=state.history, class_names=run.class_names, confusion=state.best_confusion,
                          val=val, summary=summary or {"best_epoch": state.best_epoch,
                                                       "best_val_top1": state.best_top1})


def write_pending_config(run: Run):
    """A resumed run's config.json (--epochs changed, say), once last.pt is the run it describes."""
    if run.config_pending:
        files.atomic_write(run.run_dir / "config.json", json.dumps(run.config, indent=2) + "\n")
        run.config_pending = False


def log_epoch(run: Run, state: State, tm: dict, vm: dict, improved: bool):
    row = state.history[-1]
    say(f"epoch {row['epoch']}/{run.cfg.epochs}  train loss {tm['loss']:.4f} top1 {tm['top1']:.4f}  "
        f"val loss {vm['loss']:.4f} top1 {vm['top1']:.4f}{loop.top5_said(vm, len(run.class_names))}  lr {tm['lr']:.3g}  "
        f"{row['seconds']:.1f}s (+{row['eval_seconds']:.1f}s eval){'  *best' if improved else ''}", run.d)


def finish(run: Run, state: State, stop: Stop, stop_after: int | None) -> dict:
    """Say why the loop ended, score the test split once (not when paused), write the plots."""
    cfg, d = run.cfg, run.d
    if stop is Stop.PAUSED:
        say(f"stopped after {stop_after} epoch(s) as asked; continue with --resume {run.run_dir}", d)
    elif stop is Stop.EARLY:
        say(f"early stop: val top-1 has not improved (nor its loss at the same top-1) for {cfg.patience} epoch(s) "
            f"(best {state.best_top1:.4f} at epoch {state.best_epoch})", d)
    summary = {"run_dir": str(run.run_dir), "best": str(run.run_dir / "best.pt"), "best_val_top1": state.best_top1,
               "best_epoch": state.best_epoch, "epochs_run": len(state.history),
               "train_seconds": state.train_seconds, "stopped": stop.value,
               "whiten_seconds": run.whiten_seconds, "compile_seconds": run.compile_seconds}
    if run.splits.test is not None and stop is not Stop.PAUSED and state.history:
        summary["test"] = evaluate_test_split(run, state)
    if d.main and state.history:
        _write_plots(run, state, summary)
    return summary


def evaluate_test_split(run: Run, state: State) -> dict:
    """The test split is used once, on the best checkpoint, at the end."""
    from cnnx.train.checkpoint import load_checkpoint

    d = run.d
    if d.main:
        run.net.load_state_dict(load_checkpoint(run.run_dir / "best.pt")["state_dict"])
    if d.world > 1:  # every rank evaluates its shard with rank 0's best weights
        import torch.distributed as dist

        for t in run.wrapped.state_dict().values():
            dist.broadcast(t, 0)
    xt, yt = run.splits.test
    counts, _ = loop.eval_counts(run.wrapped, _resident(take(xt, slice(d.rank, None, d.world)), run.device),
                                 yt[d.rank::d.world].to(run.device),
                                 len(run.class_names), batch_size=run.cfg.eval_batch_size, device=run.device,
                                 channels_last=run.channels_last)
    tm = counts.all_reduce().metrics()
    if d.main:
        files.atomic_write(run.run_dir / "test_metrics.json", json.dumps(
            {"checkpoint": "best.pt", "epoch": state.best_epoch, **{k: tm[k] for k in
             ("loss", "top1", "top5", "confusion", "n")}, "per_class": loop.per_class_json(tm["per_class"]),
             "class_names": run.class_names}, indent=1))
    say(f"test split ({tm['n']} images), best checkpoint: top1 {tm['top1']:.4f}{loop.top5_said(tm, len(run.class_names))}", d)
    return {k: tm[k] for k in ("loss", "top1", "top5", "per_class", "n")}


def _write_plots(run: Run, state: State, summary: dict):
    from cnnx.train import plots

    t = time.perf_counter()
    folder = run.run_dir / "plots"
    plots.plot_curves(state.history, folder, run.cfg.label_smoothing)
    best_row = next(r for r in state.history if r["epoch"] == state.best_epoch)
    plots.plot_per_class(run.class_names, best_row["train_per_class"], best_row["val_per_class"],
                         folder / "per_class.png", title=f"per-class top-1 (epoch {state.best_epoch})")
    plots.plot_confusion(state.best_confusion, run.class_names, folder / "confusion.png",
                         title=f"confusion matrix, val, best checkpoint (epoch {state.best_epoch})")
    say(f"plots in {folder} ({time.perf_counter() - t:.1f}s)")


def unwritten_end(run_dir: Path, config: dict) -> list:
    """What a run that has ended writes after its last checkpoint, where missing or older than
    last.pt (a kill in between: its CSVs, report, the test split's metrics, the plots)."""
    last = os.stat(run_dir / "last.pt").st_mtime_ns
    names = ["metrics.csv", "per_class.csv", "report.html", "plots/top1.png", "plots/per_class.png",
             "plots/confusion.png"] + (["test_metrics.json"] if config.get("test_images") else [])
    left = []
    for name in names:
        try:
            if os.stat(run_dir / name).st_mtime_ns >= last:
                continue
        except OSError:
            pass
        left.append(name)
    return left


def resume_state(path) -> tuple[TrainConfig, dict | None]:
    """(config, last.pt dict) for --resume of a run folder or its last.pt. A folder whose run
    was killed before its first epoch ended has no last.pt: (its config.json's config, None),
    so the run starts again from epoch 1, which is exactly what a resume would compute."""
    from cnnx.train.checkpoint import CheckpointError, load_checkpoint

    p = Path(path)
    if p.is_dir():
        if not (p / "last.pt").exists():
            if (p / "best.pt").exists():
                raise CheckpointError(f"{p} holds best.pt but no last.pt: it cannot be continued "
                                      f"(train a new run with another --name)")
            return _restart_config(p), None
        p = p / "last.pt"
    ckpt = load_checkpoint(p)
    missing = [k for k in ("optimizer", "scheduler", "history", "best") if k not in ckpt]
    if missing:
        raise CheckpointError(f"{p} cannot be resumed: it lacks {missing} (resume from last.pt, not best.pt)")
    return config_from_dict(ckpt["config"]), ckpt


def _restart_config(run_dir: Path) -> TrainConfig:
    from cnnx.train.checkpoint import CheckpointError

    try:
        config = json.loads((run_dir / "config.json").read_text())
    except FileNotFoundError:
        raise CheckpointError(
            f"{run_dir} holds no last.pt and no config.json: its run was stopped before training began; "
            f"start it again with the same cnnx train options and --name (the folder is reused)") from None
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{run_dir} holds no last.pt and its config.json is unreadable: {files.first_line(e)}"
                              ) from None
    return config_from_dict(config)
