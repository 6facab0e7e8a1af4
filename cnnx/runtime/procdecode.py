"""Decoding in worker processes: the pipeline for small images, where decoding is Python work.

For a 32 px JPEG most of load_image's time is Python (reading the file, header checks, the
simplejpeg call, numpy) under the GIL, so decode threads take turns instead of adding up
(pipeline.py keeps threads for large photos, where libjpeg-turbo and Pillow release it).
Here each worker process has its own interpreter:

- the workers are forked by multiprocessing's forkserver (never a fork of this process,
  which has onnxruntime's threads); `cnnx.runtime.workers.warm_up()` starts the server,
  which imports numpy, Pillow and onnxruntime once, while the caller does its own imports
  or loads its model;
- a run owns one shared-memory segment, a ring of batch slots (memory stays flat however
  many files there are); a worker decodes a chunk of paths straight into its rows of a slot
  and sends back only its failures and notes, never pixels;
- on the CPU a worker also runs the model on the whole batches it decodes, on one thread,
  and sends back the logits (a few KB), so batches run side by side on the cores;
- batches are assembled in order in the caller, as pipeline.decoded_batches yields them,
  with the same rows, errors and notes (both paths share pipeline.decode_into); a caller
  that is done with each batch's pixels before asking for the next (the IOBinding runner
  copies them; on the CPU the workers ran the model) can borrow it from its slot instead
  (`lend`): no copy of the pixels in the caller, whose one process bounds the rate on a GPU.

A worker that dies (killed, out of memory) ends the run with DecodeWorkerDied, one line; a
run that ends for any reason (done, an error, Ctrl-C) unlinks its segment, and a killed
caller's segment is unlinked by multiprocessing's resource tracker.
"""

from __future__ import annotations

import os
import pickle
import secrets
import selectors
import signal
import sys
import threading
from collections import deque
from dataclasses import dataclass, field
from multiprocessing import shared_memory
from multiprocessing import util as mp_util

import numpy as np

from cnnx.runtime.contract import CPU_PROVIDER
from cnnx.runtime.files import first_line, hold_as_writer, quiet_pillow_warnings, remove_stale_temps
from cnnx.runtime.model import ModelError
from cnnx.runtime.pipeline import DecodedBatch, decode_into, image_bytes
from cnnx.runtime.workers import context, starting_workers

SHM_PREFIX = "cnnx-decode-"  # /dev/shm/cnnx-decode-<pid>-<random>: whose segment it is
SHM_FOLDER = "/dev/shm"  # where Linux keeps POSIX shared memory, as files
MIN_CHUNK_FILES = 64  # a task's paths: fewer means more pipe round trips per image
# Added to the workers' niceness when the caller's threads feed a GPU (Classifier with a bound
# runner): with a worker on every core, the caller's thread and the runs' threads otherwise wait
# for a time slice, or hold the GIL while descheduled; at +10 they get a core as they wake, and
# the workers still have every cycle those threads leave.
FEEDING_NICE = 10
STOP_TIMEOUT_S = 5.0
# A worker runs its model on a batch WORKER_RUN_ROWS images at a time: a small model's
# activations for 64 images stay in the CPU's caches, for 256 they do not (seed-cnn, 50,000
# CIFAR JPEGs on 2 cores, against whole-batch runs: benchmarks/results/classify_worker_rows.json).
# Only models of at most PROCESS_DECODE_MAX_SIDE px a side run in the workers.
WORKER_RUN_ROWS = 64


class DecodeWorkerDied(ModelError):
    """A decode worker process ended during a run. A ModelError so that callers which turn
    the runtime's failures into one line (cnnx classify) do so for this one too."""


class ModelChanged(ModelError):
    """The model file a worker opened is not the model the caller opened (a new export was
    moved into its place in between: the worker's rows would be another model's), or it could
    not open it (moved or removed: every call failed, "run again"). The caller
    then runs its batches itself, with the model it opened (a Classifier serving for days went
    on failing every call, each saying "run it again")."""


# --- the worker -------------------------------------------------------------------------------

def _attach(name: str):
    """The caller's segment, not registered with the resource tracker: the caller owns it and
    unlinks it. A worker that attached after the caller's unlink (a run stopped early) left
    its name with the tracker, which said at the program's exit that it had leaked
    (`track=False` from Python 3.13; before it, register is skipped in this one-threaded process)."""
    if sys.version_info >= (3, 13):
        return shared_memory.SharedMemory(name=name, track=False)
    from multiprocessing import resource_tracker

    register = resource_tracker.register
    resource_tracker.register = lambda *args, **kwargs: None
    try:
        return shared_memory.SharedMemory(name=name)
    finally:
        resource_tracker.register = register


def _worker(conn, nice: int = 0):
    """Decode tasks until told to stop or the caller goes (at `nice` more niceness than the
    process it was forked from). Messages in: ("load", model),
    ("attach", run, shm name, shape, spec, max_pixels, model), ("decode", run, slot, row,
    "\\0"-joined paths), ("stop",), where model is None or (path, the identity the caller's
    model has: ModelInfo.identity()); out: one (run, slot, row, decoded, failed, notes, logits)
    per decode task of the run attached, logits None without a model, the line of an
    onnxruntime failure, or a ModelChanged."""
    # Ctrl-C reaches the whole process group, and a SIGTERM often does (systemd stops a service's
    # every process): the caller finishes the batch in hand with us, then stops us; should it
    # die first, our pipe's end is ours.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if nice:
        os.nice(nice)  # only ever more: allowed to any user
    quiet_pillow_warnings()
    shm, images, run, model, spec, max_pixels = None, None, None, None, None, None
    try:
        while True:
            try:
                msg = conn.recv()
            except (EOFError, OSError):  # the caller has gone
                return
            if msg[0] == "decode":
                _, task_run, slot, row, joined = msg
                if task_run != run or images is None:  # of a run that has ended: nobody waits for it
                    continue
                paths = joined.split("\0")
                ok, failed, notes = decode_into(paths, spec, max_pixels, images[slot, row:row + len(paths)])
                # the rows that decoded (packed from `row`), not the batch's zero padding: one file
                # at --batch-size 65536 ran 65,536 images (17 GB)
                logits = model.run(images[slot, row:row + len(ok)]) if model is not None and ok else None
                try:
                    conn.send((run, slot, row, len(ok), failed, notes, logits))
                except OSError:  # the caller has gone
                    return
            elif msg[0] == "load":
                model = _WorkerModel(*msg[1])
            elif msg[0] == "attach":
                images = None
                if shm is not None:
                    shm.close()
                    shm = None
                _, run, name, shape, spec, max_pixels, wanted = msg
                if wanted is None:
                    model = None
                elif model is None or (model.path, model.expected) != wanted:
                    model = _WorkerModel(*wanted)
                try:
                    shm = _attach(name)
                except FileNotFoundError:  # the run ended (an error, Ctrl-C) before we got here
                    continue
                images = np.ndarray(shape, dtype=np.uint8, buffer=shm.buf)
            else:  # "stop"
                return
    finally:
        images = None
        if shm is not None:
            shm.close()


class _WorkerModel:
    """The model opened in a worker on one CPU thread (each worker runs its own batches:
    onnxruntime's operators split over the cores waited for the core a decoder held,
    benchmarks/results/bench_classify.json "tuning")."""

    def __init__(self, path, expected: dict):
        """expected: the identity of the model the caller opened from `path`: the file is opened
        again here, by name, and a new export moved into its place meanwhile is another model."""
        from cnnx.runtime.model import open_model

        self.path, self.expected, self.error = path, expected, None
        try:
            self.session, self.info, _ = open_model(path, "cpu", threads=1)
        except ModelError as e:  # moved or removed since the caller opened it: the caller runs its own
            self.error = ModelChanged(str(e))
            return
        if self.info.identity() != expected:
            self.error = ModelChanged(f"{path} was replaced by another model (a new export?)")

    def run(self, images):
        """The logits of every row of `images`, run WORKER_RUN_ROWS rows at a time."""
        if self.error is not None:
            return self.error
        try:
            return run_in_rows(self.session, self.info.input_name, self.info.output_name, images, WORKER_RUN_ROWS)
        except Exception as e:  # noqa: BLE001 - onnxruntime's own types: the caller says it in one line
            return first_line(e)


def run_in_rows(session, input_name: str, output_name: str, images, rows: int):
    """session.run on `images` in slices of `rows` -> the logits of all of them, in order (each
    image's logits depend on that image alone: the numbers of one run, up to the rounding
    onnxruntime may do differently at another batch size)."""
    if len(images) <= rows:
        return session.run([output_name], {input_name: images})[0]
    return np.concatenate([session.run([output_name], {input_name: images[i:i + rows]})[0]
                           for i in range(0, len(images), rows)])


# --- the caller's side ------------------------------------------------------------------------

@dataclass
class _Batch:
    """One batch being decoded into a slot: its chunks' results arrive in any order."""

    items: list
    slot: int
    chunks: list  # (row, paths) of each task, in order
    results: dict = field(default_factory=dict)  # row -> (decoded, failed, notes, logits)

    def decoded(self) -> bool:
        return len(self.results) == len(self.chunks)


class DecodePool:
    """`workers` decode processes, started once and reused by every run (`decoded_batches`).
    model: the ModelInfo of the model the runs will pass to decoded_batches (the caller opened
    it), opened by each worker now, while the caller goes on. nice: added to the workers' niceness (FEEDING_NICE when the
    caller's threads feed a GPU)."""

    def __init__(self, workers: int, model=None, nice: int = 0):
        ctx = context()
        self.procs, self.conns = [], []
        self._user = threading.Lock()  # held by the run using the workers (one at a time): claim()
        self.pid = os.getpid()  # the process whose workers they are (a forked one's are its parent's)
        self.model_replaced = False  # a worker opened another model than the caller's: they decode only
        self.runs = 0  # runs started: results of an earlier one (ended early) are dropped
        # Once a pool, not a run: segments of processes killed with their resource tracker (_hold)
        remove_stale_temps(SHM_FOLDER, (SHM_PREFIX,))
        try:
            with starting_workers():
                for _ in range(workers):
                    parent, child = ctx.Pipe()
                    proc = ctx.Process(target=_worker, args=(child, nice), daemon=True, name="cnnx-decode")
                    proc.start()
                    child.close()
                    self.procs.append(proc)
                    self.conns.append(parent)
                    if model is not None:
                        parent.send(("load", _wanted(model)))
        except (EOFError, OSError) as e:  # the forkserver ended (killed, out of memory) or cannot fork
            _stop(self.procs, self.conns)
            raise DecodeWorkerDied(f"the decode processes could not start ({first_line(e) or type(e).__name__}): "
                                   f"run again, or decode in threads (--decode threads)") from None
        except BaseException:
            _stop(self.procs, self.conns)
            raise
        # A pool its owner never closed (a Classifier dropped without close()) stops once collected,
        # or at exit before multiprocessing signals its daemon processes: the workers ignore
        # SIGTERM, and its join of them would wait forever (exitpriority >= 0 runs first).
        self._stop = mp_util.Finalize(self, _stop, args=(self.procs, self.conns), exitpriority=0)

    @property
    def busy(self) -> bool:
        return self._user.locked()

    def claim(self) -> bool:
        """Take the workers for one run (True), or False where another run has them: a check
        of `busy` then a run raced with another thread's (one got "already running")."""
        return self._user.acquire(blocking=False)

    def release(self):
        self._user.release()

    def decoded_batches(self, item_batches, spec, config, model=None, lend: bool = False, claimed: bool = False):
        """Yield (items, DecodedBatch) in order: what pipeline.decoded_batches yields for the
        same input, decoded in the worker processes. model: None, or the ModelInfo of the model
        (opened by `Classifier(model, "cpu")`) that each worker then runs on the whole
        batches it decodes, on one CPU thread: the batch's `logits` (a row a decoded file; a
        failed run raises ModelError here, in batch order; None, for the caller to run, once a
        worker opened another model from its path: ModelChanged). lend: a batch whose files all
        decoded comes as a view of its slot, valid only until the next batch is asked for
        (the caller is done with its pixels by then); others are copied out as without lend.
        claimed: the caller took the workers (claim()) and gives them back (release()); else
        this run takes them, or raises RuntimeError where another run has them."""
        if not claimed and not self.claim():
            raise RuntimeError("this DecodePool is already running a classify call")
        try:
            yield from self._decoded_batches(item_batches, spec, config, model, lend)
        finally:
            if not claimed:
                self.release()

    def _decoded_batches(self, item_batches, spec, config, model, lend):
        if self.model_replaced:
            model = None
        self.runs += 1
        slots = config.read_ahead(spec) + 1
        shape = (slots, config.batch_size, 3, *spec["size"])
        shm = shared_memory.SharedMemory(name=f"{SHM_PREFIX}{os.getpid()}-{secrets.token_hex(4)}", create=True,
                                         size=max(1, slots * config.batch_size * image_bytes(spec)))
        held = _hold(shm.name)
        try:
            images = np.ndarray(shape, dtype=np.uint8, buffer=shm.buf)
            for proc, conn in zip(self.procs, self.conns):
                try:
                    conn.send(("attach", self.runs, shm.name, shape, spec, config.max_pixels,
                               None if model is None else _wanted(model)))
                except OSError:  # it ended since the last run (the OOM killer)
                    raise DecodeWorkerDied(f"decode worker process {proc.pid} ended before this run; run "
                                           "again") from None
            yield from _Run(self, images, config, slots, model, lend).batches(item_batches)
        finally:
            images = None
            shm.close()
            shm.unlink()
            if held is not None:
                os.close(held)

    @property
    def broken(self) -> bool:
        """A worker has ended (killed, out of memory): no run can finish on this pool."""
        return any(not proc.is_alive() for proc in self.procs)

    def close(self):
        """Stop the workers (those that do not stop in time are killed)."""
        self._stop()


def _hold(segment: str):
    """The open descriptor by which this process holds its run's segment (files.hold_as_writer),
    or None where segments are not files in SHM_FOLDER. A process killed with its resource
    tracker (a SIGKILL to the process group: `timeout -s KILL`, a job's cancel, the OOM killer
    of a cgroup) left its segment, memory kept until reboot; the next run removes the segments
    of gone processes (files.remove_stale_temps), and leaves a held one alone also where its pid
    names no process here (a container sharing /dev/shm)."""
    try:
        fd = os.open(os.path.join(SHM_FOLDER, segment), os.O_RDONLY)
    except OSError:
        return None
    hold_as_writer(fd)
    return fd


def _wanted(model) -> tuple:
    """What a worker is told to open: (the path, the identity the caller's model has)."""
    return str(model.path), model.identity()


def _stop(procs, conns):
    for conn in conns:
        try:
            conn.send(("stop",))
        except OSError:
            pass
    for proc in procs:
        proc.join(STOP_TIMEOUT_S)
        if proc.is_alive():
            proc.kill()
            proc.join()
    for conn in conns:
        conn.close()


class _Run:
    """One run's scheduling: batches take free slots in order, their chunks go to the worker
    with the fewest outstanding, finished batches are copied out of their slot (or lent) in order."""

    def __init__(self, pool: DecodePool, images, config, slots: int, model, lend: bool = False):
        self.pool, self.images, self.config, self.model, self.lend = pool, images, config, model, lend
        self.free = deque(range(slots))
        self.chunk = _chunk_files(config.batch_size, slots, len(pool.conns), model is not None)
        self.outstanding = [deque() for _ in pool.conns]  # (slot, row, paths) sent to each worker
        self.pending = deque()  # _Batch in order
        self.by_slot = {}
        # Registered once for the run: multiprocessing.connection.wait would build and fill a
        # new selector at every wait, with two file descriptors a worker.
        self.selector = selectors.DefaultSelector()
        for i, conn in enumerate(pool.conns):
            self.selector.register(conn, selectors.EVENT_READ, (True, i))
        for i, proc in enumerate(pool.procs):
            self.selector.register(proc.sentinel, selectors.EVENT_READ, (False, i))

    def batches(self, item_batches):
        try:
            yield from self._batches(iter(item_batches))
        finally:
            self.selector.close()

    def _batches(self, item_batches):
        more = True
        while more or self.pending:
            while more and self.free:
                items = next(item_batches, None)
                if items is None:
                    more = False
                else:
                    self.start(items)
            while self.pending and self.pending[0].decoded():
                batch = self.pending.popleft()
                lent = self.lend and self.whole(batch)
                yield batch.items, self.assemble(batch, lent)
                if lent:  # the caller has asked for the next batch: it is done with this one
                    self.release(batch.slot)
                if more and self.free:
                    break  # give the freed slot a new batch before waiting
            else:
                if self.pending:
                    self.wait()

    def start(self, items):
        paths = [item.path for item in items if item.reason is None]
        slot = self.free.popleft()
        chunks = [(row, paths[row:row + self.chunk]) for row in range(0, len(paths), self.chunk)]
        batch = _Batch(items, slot, chunks)
        self.pending.append(batch)
        self.by_slot[slot] = batch
        for row, chunk in chunks:
            worker = min(range(len(self.outstanding)), key=lambda i: len(self.outstanding[i]))
            self.outstanding[worker].append((slot, row, chunk))
            try:
                # What Connection.send does, less its ForkingPickler (made anew at each call, for
                # reducers that a tuple of str and int never needs): the caller's one process
                # sends every task.
                self.pool.conns[worker].send_bytes(pickle.dumps(
                    ("decode", self.pool.runs, slot, row, "\0".join(chunk)), pickle.HIGHEST_PROTOCOL))
            except OSError:  # its end of the pipe has closed: it died
                self.died(worker)

    def wait(self):
        """Take one result of each worker with one ready (blocking until one is: the selector
        reports a worker again while it has more; Connection.poll would build a new selector
        at each call); a worker that died ends the run, once the results it sent are taken."""
        ended = []
        for key, _events in self.selector.select():
            is_conn, i = key.data
            if not is_conn:
                ended.append(i)
                continue
            try:
                self.take(i, self.pool.conns[i].recv())
            except (EOFError, OSError):
                self.died(i)
        for i in ended:  # even between tasks, the run cannot finish without it
            conn = self.pool.conns[i]
            try:
                while conn.poll():  # what it sent before it ended: `died` then names its task
                    self.take(i, conn.recv())
            except (EOFError, OSError):
                pass
            self.died(i)

    def take(self, worker: int, result):
        run, slot, row, decoded, failed, notes, logits = result
        if run != self.pool.runs:
            return
        self.outstanding[worker].popleft()
        self.by_slot[slot].results[row] = (decoded, failed, notes, logits)

    def died(self, worker: int):
        proc = self.pool.procs[worker]
        proc.join(1.0)
        how = (f"killed by signal {-proc.exitcode}" if proc.exitcode is not None and proc.exitcode < 0
               else f"exit status {proc.exitcode}")
        doing = (f"while decoding {self.outstanding[worker][0][2][0]} or a file after it" if self.outstanding[worker]
                 else "between tasks")
        raise DecodeWorkerDied(f"decode worker process {proc.pid} ended ({how}) {doing}; "
                               "run again (with fewer --workers if memory is short)")

    def whole(self, batch: _Batch) -> bool:
        """Every file of the batch decoded, so its slot's rows are the batch as it is."""
        return all(batch.results[row][0] == len(chunk) for row, chunk in batch.chunks)

    def release(self, slot: int):
        del self.by_slot[slot]
        self.free.append(slot)

    def assemble(self, batch: _Batch, lent: bool = False) -> DecodedBatch:
        """The batch's decoded rows, in order, into a fixed-shape DecodedBatch (its slot is
        free again); zero rows pad it. lent (whole(batch)): the slot itself, padded in place,
        no copy; it stays taken until release()."""
        rows = self.images[batch.slot]
        out = DecodedBatch(rows if lent else np.empty_like(rows))
        for row, chunk in batch.chunks:
            decoded, failed, notes, out.logits = batch.results[row]  # logits: one chunk a batch
            n = len(out.paths)
            if not lent:
                out.images[n:n + decoded] = rows[row:row + decoded]
            if failed:
                bad = {path for path, _stage, _error in failed}
                out.paths += [path for path in chunk if path not in bad]
            else:
                out.paths += chunk
            out.failed += failed
            out.notes += notes
        out.images[len(out.paths):] = 0
        if not lent:
            self.release(batch.slot)
        if isinstance(out.logits, ModelChanged):  # the caller runs its own, now and in later runs
            out.logits, self.pool.model_replaced = None, True
        if isinstance(out.logits, str):
            raise ModelError(f"{self.model.path}: onnxruntime failed on a batch of {len(out.paths)} on "
                             f"{CPU_PROVIDER}: {out.logits}")
        return out


def _chunk_files(batch_size: int, slots: int, workers: int, runs_model: bool) -> int:
    """Files a decode task: a worker that runs the model takes whole batches; else as few
    tasks a batch as still give every worker one when all slots are taken (each task is a
    message each way and a wake-up of the caller, whose one process bounds the rate on a
    GPU), and not under MIN_CHUNK_FILES."""
    if runs_model:
        return batch_size
    tasks = -(-workers // slots)  # a batch's tasks, so that slots x tasks >= workers
    return max(MIN_CHUNK_FILES, -(-batch_size // tasks))
