"""The Python API of the runtime (no torch): what `cnnx classify` runs, for notebooks, data
pipelines and other engines.

    from cnnx.runtime import Classifier, Prediction, Skipped, Note

    with Classifier("runs/cifar/export/model.onnx") as clf:
        for row in clf.classify(["photos/"]):
            if isinstance(row, Prediction):
                print(row.path, row.label(clf.info.class_names), row.scores[0])

`classify` streams rows as batches finish: the CLI's discovery (files and folders,
recursively, in sorted path order), decode pipeline (threads, or processes for small-input
models; bounded read-ahead, one batch shape), errors (Skipped, with the stage) and notes
(Note: the image WAS classified). A writer takes `classify(...).results()` instead: one
BatchResult a batch, its predictions as arrays (no object a row).
"""

from __future__ import annotations

import contextlib
import itertools
import numbers
import os
import weakref
from dataclasses import dataclass

import numpy as np

from cnnx.runtime import procdecode
from cnnx.runtime.binding import CUDA_DEVICES, BoundRunner, RunFailed, RunnerClosed
from cnnx.runtime.contract import CPU_PROVIDER as CPU
from cnnx.runtime.discover import Discovery, PathKeys
from cnnx.runtime.files import first_line
from cnnx.runtime.gpudecode import DECODERS, GpuDecoder, open_decoder
from cnnx.runtime.gpudecode import decoded_batches as gpu_decoded_batches
from cnnx.runtime.model import (NON_FINITE_LINE, NON_FINITE_STAGE, ModelError, finite_rows, open_model, softmax,
                                softmax_topk)
from cnnx.runtime.pipeline import (PipelineConfig, ahead_in_thread, batch_size_within_budget, batched_runs,
                                   decoded_batches, peek_files)
from cnnx.runtime.preprocess import DEFAULT_MAX_PIXELS
from cnnx.runtime.workers import PROCESS_DECODE_MIN_FILES, check_decode_mode, warm_up

CLOSED_DURING_RUN = "this Classifier was closed before the run ended: its rows stop here"
DISCOVERY_AHEAD = 4  # batches of found files the GPU path's discovery thread may hold ready


@dataclass(frozen=True)
class Prediction:
    """Top-k of one image, best first: class indices and softmax probabilities."""

    path: str
    indices: tuple
    scores: tuple

    def label(self, class_names) -> str:
        return class_names[self.indices[0]]


@dataclass(frozen=True)
class Skipped:
    """A file not classified; stage is discover, open, decode, convert or resize."""

    path: str
    stage: str
    error: str


@dataclass(frozen=True)
class Note:
    """A remark on an image that was classified (e.g. "first frame of 3")."""

    path: str
    note: str


def path_list(paths) -> list:
    """A list of str, bytes or os.PathLike, or one of them alone (one path, never its
    characters) -> a list of str paths; TypeError naming the type of one that is not a path."""
    if isinstance(paths, (str, bytes, os.PathLike)):
        paths = [paths]
    return [os.fsdecode(p) for p in paths]


def _int_at_least(name: str, value, least: int) -> int:
    """value as an int (numpy's integers too, never a bool), or ValueError naming the argument."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < least:
        raise ValueError(f"{name} must be an int >= {least}, got {value!r}")
    return int(value)


# What a process forked after a Classifier opened must never free: onnxruntime's teardown of a
# session (or its bindings) there waits for the parent's threads, which the fork did not copy.
_KEPT_AFTER_FORK = []


class Classifier:
    """An exported cnnx ONNX model opened on a device (contract-checked; ModelError with one
    line otherwise). batch_size is the images per onnxruntime call; `batch_size` as used may
    be smaller when that many images of the model's size would exceed the pipeline's memory
    budget (compare with `requested_batch_size`).

    Open one in each process: a process forked (os.fork) after a Classifier opened can use it,
    on the plain loop with decode threads (its decode processes and IOBinding threads stay the
    parent's; close() there frees nothing of the parent's), but onnxruntime's threads do not
    survive a fork, and its exit handlers then wait for them for ever: such a process must end
    with os._exit, as multiprocessing's workers do.

    io_binding: run classify()'s batches through IOBinding with several in flight and page-locked
    host buffers (cnnx.runtime.binding); None (default) = on CUDA and TensorRT, off on the CPU,
    where the plain loop is kept. `host_memory` says which buffers it got, or None when off.
    One classify run at a time uses them; another read meanwhile runs its batches with
    session.run.

    decoder: "cpu" (default) decodes with preprocess.load_image in threads; "gpu" decodes JPEGs
    with nvImageCodec and resizes them on the GPU (cnnx.runtime.gpudecode; load_image still takes
    every file the GPU does not), or raises gpudecode.DecoderUnavailable naming why it cannot run;
    "auto": gpu where it runs and the model's input is over workers.PROCESS_DECODE_MAX_SIDE px a
    side, with `workers` CPU threads sharing each batch (GpuDecoder's share_threads), else cpu;
    or a GpuDecoder made by the caller (e.g. on nvImageCodec's CPU backend),
    closed with this Classifier. `decoder` as used is "gpu" or "cpu"; `gpu_decoder` counts the
    files it decoded and those it passed to the CPU.

    decode: how the cpu decoder runs: "threads", "processes" (cnnx.runtime.procdecode: worker
    processes started by the first classify call, once, and reused by the next ones; predict()
    alone starts none) or "auto" (processes for small-input models, see
    PipelineConfig.decodes_in_processes, started by the first call with more than
    workers.PROCESS_DECODE_MIN_FILES files to decode; smaller calls before it take threads).
    `decode_pool` is the pool of processes once started, or None (not yet, or threads or the
    GPU decode)."""

    def __init__(self, model, device: str = "auto", *, threads: int | None = None, batch_size: int = 256,
                 workers: int = 0, topk: int = 5, max_pixels: int = DEFAULT_MAX_PIXELS,
                 io_binding: bool | None = None, decoder: str | GpuDecoder = "cpu", decode: str = "auto"):
        batch_size, topk, workers, max_pixels = (
            _int_at_least(name, value, least) for name, value, least in (
                ("batch_size", batch_size, 1), ("topk", topk, 1), ("workers", workers, 0), ("max_pixels", max_pixels, 1)))
        threads = None if threads is None else _int_at_least("threads", threads, 1)
        if io_binding not in (None, True, False):
            raise ValueError(f"io_binding must be None, True or False, got {io_binding!r}")
        if not isinstance(decoder, GpuDecoder) and decoder not in DECODERS:
            raise ValueError(f"decoder must be one of {', '.join(DECODERS)}, got {decoder!r}")
        check_decode_mode(decode)  # before the model loads
        self.requested_batch_size = batch_size
        self._pid = os.getpid()  # the process whose onnxruntime threads the session has (close())
        self.runner = None
        self._runs = weakref.WeakSet()  # the _RunStops of runs still read, stopped by close()
        self.gpu_decoder = None
        self.decode_pool = None
        self.session, self.info, self.provider = open_model(model, device, threads=threads, batch_size=batch_size)
        self.batch_size = batch_size_within_budget(batch_size, self.info.spec)
        self.topk = min(topk, len(self.info.class_names))
        self.config = PipelineConfig(batch_size=self.batch_size, workers=workers, max_pixels=max_pixels,
                                     decode=decode)
        on_gpu = self.provider in CUDA_DEVICES
        if io_binding or (io_binding is None and on_gpu):
            try:
                self.runner = BoundRunner(self.session, self.info.input_name, self.info.output_name,
                                          self.batch_size, self.info.spec["size"], pinned=on_gpu)
            except Exception as e:  # onnxruntime's own types (a binding it refuses)
                raise ModelError(f"{self.info.path}: cannot bind the model's input and output on "
                                 f"{self.provider}: {first_line(e)}") from None
        try:
            self.gpu_decoder = decoder if isinstance(decoder, GpuDecoder) else open_decoder(
                decoder, workers=self.config.resolved_workers(), size=self.info.spec["size"])
        except BaseException:
            self.close()
            raise
        self.decoder = "cpu" if self.gpu_decoder is None else "gpu"
        self._decode = decode
        self._pool_wanted = self.gpu_decoder is None and self.config.decodes_in_processes(self.info.spec)
        if self._pool_wanted and decode == "processes":
            # Every call's batches will be decoded there: the server's imports then overlap the
            # caller's own work until the first classify call. Under auto a call's size decides
            # first (PROCESS_DECODE_MIN_FILES), and a small one, often the only one, needs no
            # server (benchmarks/results/classify_startup.json, api_one_file_s): it starts with
            # the pool. A failure here is _pool's to report.
            with contextlib.suppress(Exception):
                warm_up()

    def _pool(self):
        """The decode processes (started by the first call that wants them), or None: threads
        decode. Under auto, processes that cannot start mean threads (the same rows): e.g. a
        process whose user changed since multiprocessing's forkserver started (its socket is
        the old user's; its workers would read files as that user), or one that may no longer
        run Python's executable. A pool one of whose workers ended (DecodeWorkerDied in an
        earlier call) is replaced: each call that says "run again" can be run again."""
        if self.session is None:  # closed: nothing is started again for a run close() missed
            raise ValueError(CLOSED_DURING_RUN)
        if self.decode_pool is not None and self.decode_pool.pid != os.getpid():
            # a process forked after the pool started: its workers are the parent's (their state
            # came with the fork: an AssertionError), left to it; this process decodes in threads
            self.decode_pool, self._pool_wanted = None, False
        if self.decode_pool is not None and self.decode_pool.broken:
            self.decode_pool.close()
            self.decode_pool, self._pool_wanted = None, True
        if self._pool_wanted and self.decode_pool is None:
            self._pool_wanted = False  # one try
            try:
                self.decode_pool = procdecode.DecodePool(
                    self.config.resolved_workers(), model=self.info if self._cpu_loop else None,
                    nice=procdecode.FEEDING_NICE if self.runner is not None else 0)
            except Exception:
                if self._decode != "auto":
                    raise
        return self.decode_pool

    @property
    def _cpu_loop(self) -> bool:
        return self.provider == CPU and self.runner is None

    @property
    def _runs_in_workers(self) -> bool:
        """On the CPU the decode processes run the batches too, each on one thread
        (procdecode._WorkerModel): faster than onnxruntime here on all cores or on one
        (benchmarks/results/bench_classify.json, "tuning_processes"); the caller's session then
        serves predict() only."""
        return self.decode_pool is not None and self._cpu_loop

    @property
    def host_memory(self) -> str | None:
        return None if self.runner is None else self.runner.host_memory

    def predict(self, images, *, probabilities: bool = False) -> np.ndarray:
        """uint8 (N, 3, H, W) at the model's size -> float32 (N, C) logits (or softmax
        probabilities). ModelError when the model returns anything but N rows of C."""
        if self.session is None:
            raise ValueError("this Classifier is closed")
        h, w = self.info.spec["size"]
        if not (isinstance(images, np.ndarray) and images.dtype == np.uint8 and images.shape[1:] == (3, h, w)
                and images.ndim == 4):
            got = f"{images.dtype} {images.shape}" if isinstance(images, np.ndarray) else type(images).__name__
            raise ValueError(f"images must be uint8 (N, 3, {h}, {w}), got {got}")
        # batch_size images a run at most: TensorRT's engine takes no more (its shape profile),
        # and onnxruntime's CPU arena keeps the memory of the largest batch it ran: a predict() of
        # a whole dataset at once held gigabytes after the call.
        step = self.batch_size
        logits = [self._run(images[i:i + step]) for i in range(0, max(1, len(images)), step)]
        logits = logits[0] if len(logits) == 1 else np.concatenate(logits)
        self._check_rows(logits, len(images))
        return softmax(logits).astype(np.float32) if probabilities else logits.astype(np.float32, copy=False)

    def _run(self, images):
        try:
            return self.session.run([self.info.output_name], {self.info.input_name: images})[0]
        except Exception as e:  # onnxruntime's own exception types
            raise self._run_failed(len(images), first_line(e)) from None

    def _run_failed(self, n: int, error: str) -> ModelError:
        return ModelError(f"{self.info.path}: onnxruntime failed on a batch of {n} on {self.provider}: {error}")

    def _check_rows(self, logits, n: int):
        """ModelError unless logits has a row of a score a class for each of the n images run
        (on the IOBinding path a classify batch's n counts its padding rows)."""
        k = len(self.info.class_names)
        if logits.ndim == 2 and logits.shape[0] == n and logits.shape[1] != k:
            raise ModelError(f"{self.info.path}: the model gives {logits.shape[1]} scores an image, but its metadata "
                             f"names {k} classes")
        if logits.shape != (n, k):
            raise ModelError(f"{self.info.path}: the model returned {'x'.join(map(str, logits.shape))} logits "
                             f"for {n} images (a run's batch) and {k} classes: not one row per image")

    def classify(self, paths, *, follow_symlinks: bool = False, done=frozenset()) -> Classification:
        """Rows (Prediction | Skipped | Note) for files and folders, in sorted path order.
        Paths in `done` (e.g. read back from an output by --resume) are skipped silently;
        they match however the folder is spelt (`DIR`, `./DIR`, `DIR/../DIR`). paths and done:
        a list of str, bytes or os.PathLike, or one of them alone (one path, never its characters)."""
        if self.session is None:
            raise ValueError("this Classifier is closed")
        return Classification(self, path_list(paths), follow_symlinks=follow_symlinks, done=done)

    def __reduce__(self):
        raise TypeError("a Classifier cannot be pickled (it holds an onnxruntime session and threads): "
                        "open one in each process from the model's path")

    def close(self):
        for run in list(self._runs):
            run.close(CLOSED_DURING_RUN)
        if os.getpid() != self._pid:  # a forked process: onnxruntime's teardown here waited for ever on
            _KEPT_AFTER_FORK.append((self.session, self.runner, self.gpu_decoder))  # the parent's threads
            self.runner = self.gpu_decoder = None
        if self.runner is not None:
            self.runner.close()
            self.runner = None
        if self.gpu_decoder is not None:
            self.gpu_decoder.close()
            self.gpu_decoder = None
        if self.decode_pool is not None:
            self.decode_pool.close()  # the parent's, in a forked process: its Finalize does nothing there
            self.decode_pool = None
        self.session = None  # onnxruntime frees a session with its last reference

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


@dataclass(eq=False)
class BatchResult:
    """One batch's outcome as arrays (what a writer takes): the `paths` classified, in order,
    with their top-k class `indices` and softmax `scores` (len(paths) x topk, best first; None
    when no file of the batch decoded); `others()`: its Skipped and Note rows, in path order.
    `rows()`: all its rows as Classification iterates them (a Note follows its Prediction).
    items: the batch's discovery.Found; failed: (path, stage, error); notes: (path, note)."""

    items: list
    paths: list
    indices: np.ndarray | None
    scores: np.ndarray | None
    failed: list
    notes: list

    def predictions(self) -> list:
        if not self.paths:
            return []
        return [Prediction(path, tuple(i), tuple(s))
                for path, i, s in zip(self.paths, self.indices.tolist(), self.scores.tolist())]

    def rows(self) -> list:
        return self._in_order(self.predictions())

    def others(self) -> list:
        if len(self.items) == len(self.paths) and not self.notes:  # every file classified, no remark
            return []
        return self._in_order(None)

    def _in_order(self, predictions) -> list:
        """The rows in the order of the batch's items; predictions None: Skipped and Note only."""
        failed = {path: (stage, error) for path, stage, error in self.failed}
        notes = dict(self.notes)
        rows, next_ok = [], 0
        for item in self.items:
            if item.reason is not None:
                rows.append(Skipped(item.path, "discover", item.reason))
            elif next_ok < len(self.paths) and self.paths[next_ok] == item.path:
                if predictions is not None:
                    rows.append(predictions[next_ok])
                next_ok += 1
                if item.path in notes:
                    rows.append(Note(item.path, notes[item.path]))
            else:
                rows.append(Skipped(item.path, *failed[item.path]))
        return rows


class _RunStop:
    """Whether a run was closed, and why where its reader did not ask (Classifier.close): what
    Classifier.close reaches a run by. Held by the Classification and by every generator of its
    rows: a reader of `clf.classify(paths).results()` holds no Classification, and the run went
    on after close(), on decode processes started again for it."""

    __slots__ = ("closed", "why", "results", "__weakref__")

    def __init__(self, results):
        self.closed, self.why, self.results = False, None, results

    def close(self, why: str | None = None):
        self.closed, self.why = True, why
        with contextlib.suppress(ValueError):  # being read in another thread right now: it ends there
            self.results.close()


def classified_again(classifier: Classifier, sample) -> dict:
    """path -> (label, score) of the Classifier's model for each file of `sample` (path, label,
    score) still there to classify (a file gone or unreadable now is no evidence either way):
    what --resume checks the rows of an output without its run record by
    (output.check_unrecorded_output)."""
    paths = [path for path, _label, _score in sample if os.path.isfile(path)]
    if not paths:
        return {}
    keys, names = PathKeys(), classifier.info.class_names
    by_key = {keys(row.path): (row.label(names), float(row.scores[0]))
              for row in classifier.classify(paths) if isinstance(row, Prediction)}
    return {path: by_key[keys(path)] for path in paths if keys(path) in by_key}


def _until_stopped(items, stop: _RunStop):
    """items until the run is closed (an item in hand then is not given), then ValueError(why)
    where another hand than its reader's closed it (a module function: it must not hold the
    Classification). An error the close caused in the run's parts (its decode processes or
    session closed under the reader: "decode worker ended") is that ValueError too."""
    try:
        for item in items:
            if stop.closed:
                break
            yield item
    except Exception:
        if stop.why is None:
            raise
        raise ValueError(stop.why) from None
    if stop.why is not None:
        raise ValueError(stop.why)


class _Counts:
    """What the walk found so far (Classification's counts), apart from the Classification: the
    generators that count hold this, not the Classification, so nothing they hold (a thread
    among them) keeps it alive once its caller lets go of it."""

    __slots__ = ("found", "already_done")

    def __init__(self):
        self.found = 0
        self.already_done = 0


class Classification:
    """The rows of one Classifier.classify call: an iterator of rows, of one list of rows per
    batch (`batches()`), or of one BatchResult per batch (`results()`: arrays, what a writer
    flushes at; no row objects made). Counts as it goes: `found` (files found, skips and
    already-done ones included), `already_done`, `ignored` (non-image files inside folders);
    once it has ended, `done_not_found` (paths of `done` no file found was).
    A run stopped before its end (`close()`, `with`, or the Classification let go of: a
    `break` out of the loop) stops its threads and gives back the decode processes and the
    IOBinding runner; Classifier.close() stops the runs still open."""

    def __init__(self, classifier: Classifier, paths, *, follow_symlinks: bool, done):
        self.classifier = classifier
        self.discovery = Discovery(paths, follow_symlinks=follow_symlinks)
        self._counts = _Counts()
        keys = PathKeys()
        done_keys = {keys(p) for p in path_list(done)}
        self._done_given = len(done_keys)
        todo = _todo(self.discovery, self._counts, keys, done_keys)
        # Module functions, not methods: a generator of a method would hold this object (a
        # cycle, freed only by the cyclic collector), and the discovery thread of the GPU path
        # would hold it for ever once the caller stopped reading.
        self._results = _run(classifier, todo)
        self._stop = _RunStop(self._results)
        self._rows = _until_stopped((row for result in self._results for row in result.rows()), self._stop)
        classifier._runs.add(self._stop)  # alive while this or a generator of results() is

    @property
    def found(self) -> int:
        return self._counts.found

    @property
    def already_done(self) -> int:
        return self._counts.already_done

    @property
    def ignored(self) -> int:
        return self.discovery.ignored

    @property
    def done_not_found(self) -> int:
        """Paths of `done` (rows an output already holds, for --resume) that no file this run
        found was: removed or renamed since, or under a path not given this time."""
        return self._done_given - self._counts.already_done

    def __iter__(self):
        return self

    def __next__(self):
        return next(self._rows)

    def batches(self):
        return (result.rows() for result in self.results())

    def results(self):
        return _until_stopped(self._results, self._stop)

    def close(self, *, stopped: str | None = None):
        """Stop the run: no row comes after (not even the rest of the batch in hand). stopped:
        why, when its reader did not ask: the next read raises ValueError with it, rather than
        ending as if every row had come."""
        self._stop.close(stopped)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _run(clf: Classifier, todo):
    """BatchResults of the files `todo` yields. A generator: the IOBinding runner is taken
    by the first call that starts reading, one at a time (its slots hold one run's batches);
    another call meanwhile runs its batches with session.run (the same rows)."""
    todo = batched_runs(todo, clf.batch_size)
    runner = clf.runner if clf.runner is not None and clf.runner.claim() else None
    batches = None
    try:
        if runner is not None:
            # The GPU path's one thread bounds its rate and waits on the runs for part of its
            # time (benchmarks/results/gpu_profile_airnet_e9f6c17.txt): the folder walk, a share
            # of what it holds the GIL for (the profile), goes to a thread of its own, to run in those waits.
            todo = ahead_in_thread(todo, DISCOVERY_AHEAD, name="cnnx-discover")
        if clf.gpu_decoder is None:
            batches = _cpu_decoded(clf, todo)
        else:
            batches = gpu_decoded_batches(todo, clf.info.spec, clf.config, clf.gpu_decoder)
        yield from (_plain(clf, batches) if runner is None else _bound(clf, runner, batches))
    finally:
        # Closed now, not when collected: after an exception (Ctrl-C in a notebook, which keeps the
        # traceback and with it these frames) the decode threads and read-ahead batches stayed.
        try:
            if batches is not None:
                batches.close()
        finally:  # a second Ctrl-C in the first close must not leave the runner claimed for good
            try:
                todo.close()
            finally:
                if runner is not None:
                    runner.release()


def _cpu_decoded(clf: Classifier, todo):
    """The decode processes, or threads where the Classifier has none or another
    classify call (run first) holds them: the same rows either way. Both consumers are
    done with a batch's pixels before they ask for the next (the IOBinding runner copies
    them into its own buffer; on the CPU the processes ran the model and `_logits` never
    reads them): they borrow them from the processes' slots, never copied here.
    Under decode "auto", a call with at most PROCESS_DECODE_MIN_FILES files to decode
    (counted ahead) takes threads, unless an earlier call started the processes."""
    if clf._pool_wanted and clf._decode == "auto":  # processes for this model, not started yet
        head, ended = peek_files(todo, PROCESS_DECODE_MIN_FILES)
        todo = itertools.chain(head, todo)
        if ended:  # a small job: threads finish it before processes would have started
            yield from decoded_batches(todo, clf.info.spec, clf.config)
            return
    pool = clf._pool()
    if pool is not None and pool.claim():
        try:
            yield from pool.decoded_batches(todo, clf.info.spec, clf.config,
                                            model=clf.info if clf._runs_in_workers else None, lend=True, claimed=True)
        finally:
            pool.release()
    else:
        yield from decoded_batches(todo, clf.info.spec, clf.config)


def _plain(clf: Classifier, batches):
    """The CPU loop: one session.run per batch, in this thread."""
    for items, batch in batches:
        yield _result(clf, items, batch, _logits(clf, batch))


def _bound(clf: Classifier, runner: BoundRunner, batches):
    """The GPU path: IOBinding, binding.SLOTS batches in flight, each batch's
    top-k taken on its run's thread (this one, which bounds the rate, meanwhile feeds the
    next). A batch where no file decoded is not run (images_of -> None, top None)."""

    def finish(job, logits):
        clf._check_rows(logits, clf.batch_size)
        return _top(clf, job[1], logits)

    runs = runner.run_in_order(batches, lambda job: job[1].images if job[1].paths else None, finish)
    try:
        while True:
            try:
                (items, batch), top = next(runs)
            except StopIteration:
                return
            except RunFailed as e:
                raise clf._run_failed(clf.batch_size, str(e)) from None
            except RunnerClosed:  # Classifier.close() from another thread, while this run was reading
                raise ValueError(CLOSED_DURING_RUN) from None
            yield BatchResult(items, *(top or (batch.paths, None, None, batch.failed)), batch.notes)
    finally:  # its runs in flight end now, while the runner's threads still serve them (not at collection)
        runs.close()


def _todo(discovery: Discovery, counts: _Counts, keys: PathKeys, done: set):
    """Discovery's runs, less the files an earlier run already classified (--resume)."""
    for run in discovery.runs():
        counts.found += len(run)
        if done:
            kept = [item for item in run if keys(item.path) not in done]
            counts.already_done += len(run) - len(kept)
            run = kept
        if run:
            yield run


def _logits(clf: Classifier, batch):
    """The decode processes' logits (they ran the batch), else the batch run here: its rows
    that decoded, not its zero padding (one file at --batch-size 65536 ran 65,536 images, 17 GB;
    the GPU path keeps one shape, its bound buffers')."""
    n = len(batch.paths)
    if batch.logits is not None:
        clf._check_rows(batch.logits, n)
        return batch.logits
    return clf.predict(batch.images[:n]) if n else None


def _result(clf: Classifier, items, batch, logits) -> BatchResult:
    return BatchResult(items, *_top(clf, batch, logits), batch.notes)


def _top(clf: Classifier, batch, logits):
    """(paths, indices, scores, failed) of the batch's decoded files (the padded rows dropped):
    a file whose scores are not finite is a failed one (finite_rows). indices and scores None
    where no file is left."""
    if not batch.paths:
        return batch.paths, None, None, batch.failed
    logits = logits[:len(batch.paths)]
    ok = finite_rows(logits)
    if ok is None:
        return (batch.paths, *softmax_topk(logits, clf.topk), batch.failed)
    paths = [path for path, good in zip(batch.paths, ok) if good]
    failed = batch.failed + [(path, NON_FINITE_STAGE, NON_FINITE_LINE) for path, good in zip(batch.paths, ok)
                             if not good]
    return (paths, *(softmax_topk(logits[ok], clf.topk) if paths else (None, None)), failed)
