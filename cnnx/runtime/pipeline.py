"""The classify pipeline: discovery -> parallel decoding (and inference) -> fixed-shape batches.

Batches are cut from the discovery stream in order, split into chunks and handed to a pool
of decode threads. Threads for large images: libjpeg-turbo (simplejpeg), Pillow's decoders
and resize, and onnxruntime release the GIL, so threads decode large JPEGs in parallel, and
there is no process to start. Small images are
another matter: a 32 px JPEG's decode is mostly Python under the GIL and threads take turns,
so PipelineConfig.decode "auto" gives models up to workers.PROCESS_DECODE_MAX_SIDE px to worker
processes (cnnx.runtime.procdecode, the same rows). Batches come back in order, i.e. in
sorted path order; a batch runs its decoded images only (the last batch, and one with failed
files, runs fewer: onnxruntime's CPU kernels take any batch size; the GPU path pads to the
shape its buffers are bound to).

With an `infer` function, the thread that decodes a batch's last chunk also runs the batch
through onnxruntime, so batches run concurrently, one a core, each on a one-thread session
(model.open_model(concurrent=True)), rather than one session spreading every operator over
all cores from the caller, whose halves wait for each other while a decoder holds a core
(figures: benchmarks/results/bench_classify*.json).

Memory does not grow with the number of files, nor past a fixed budget with the model's
input size: a batch holds at most MAX_BATCH_BYTES of pixels (a smaller batch is used when
--batch-size images would not fit) and at most MAX_READ_AHEAD_BYTES are decoded ahead of the
batch being run (at most `workers + 1` batches).
"""

from __future__ import annotations

import threading
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from cnnx.runtime.files import first_line
from cnnx.runtime.preprocess import DEFAULT_MAX_PIXELS, ImageError, load_image_into
from cnnx.runtime.workers import check_decode_mode, cores, decodes_in_processes

MAX_BATCH_BYTES = 256 << 20  # uint8 pixels of one batch: 1,700 images of 3x224x224, 5 of 3x4096x4096
MAX_READ_AHEAD_BYTES = 1 << 30  # pixels of the batches decoded ahead, all together


def image_bytes(spec) -> int:
    h, w = spec["size"]
    return 3 * h * w


def batch_size_within_budget(batch_size: int, spec) -> int:
    """The largest batch size <= batch_size whose pixels fit MAX_BATCH_BYTES (at least 1)."""
    return max(1, min(batch_size, MAX_BATCH_BYTES // image_bytes(spec)))


@dataclass(frozen=True)
class PipelineConfig:
    batch_size: int = 256  # images per batch, one onnxruntime call (its decoded images)
    workers: int = 0  # decode threads; 0 = one per CPU core
    max_pixels: int = DEFAULT_MAX_PIXELS  # larger images are refused as decompression bombs
    decode: str = "auto"  # "threads", "processes" (procdecode) or "auto": see decodes_in_processes

    def __post_init__(self):
        check_decode_mode(self.decode)

    def decodes_in_processes(self, spec) -> bool:
        """Whether the CPU decoder runs in processes for this model (workers.decodes_in_processes)."""
        return decodes_in_processes(self.decode, spec["size"], self.resolved_workers())

    def resolved_workers(self) -> int:
        return self.workers if self.workers > 0 else cores()

    def read_ahead(self, spec) -> int:
        """Batches decoded ahead of the one being run: one per worker and one more, within
        MAX_READ_AHEAD_BYTES."""
        batch_bytes = self.batch_size * image_bytes(spec)
        return max(1, min(self.resolved_workers() + 1, MAX_READ_AHEAD_BYTES // batch_bytes))


@dataclass
class DecodedBatch:
    """One batch: `images[:len(paths)]` are the decoded images of `paths` (in order);
    `failed` the (path, stage, message) of those that could not be decoded; `notes` the
    (path, note) of decoded images with a remark (first frame used, EXIF ignored); `logits`
    what decoded_batches' `infer` returned for `images` (None without infer, or when no file
    of the batch decoded)."""

    images: np.ndarray
    paths: list = field(default_factory=list)
    failed: list = field(default_factory=list)
    notes: list = field(default_factory=list)
    logits: np.ndarray | None = None


def decode_images(paths, spec, max_pixels: int):
    """Decode paths in order -> (uint8 (k, 3, H, W) of the k that decoded, their paths,
    failed [(path, stage, message)], notes [(path, note)])."""
    h, w = spec["size"]
    images = np.empty((len(paths), 3, h, w), dtype=np.uint8)
    ok, failed, notes = decode_into(paths, spec, max_pixels, images)
    return images[: len(ok)], ok, failed, notes


def decode_into(paths, spec, max_pixels: int, out):
    """Decode paths in order into out[0], out[1], ... (the k that decoded, packed; `out` has a
    row per path) -> (their paths, failed [(path, stage, message)], notes [(path, note)]).
    What both the decode threads and the decode processes (procdecode) run."""
    ok, failed, notes = [], [], []
    for path in paths:
        try:
            note = load_image_into(out[len(ok)], path, spec, max_pixels=max_pixels)
        except ImageError as e:
            failed.append((path, e.stage, str(e)))
            continue
        except MemoryError:
            failed.append((path, "decode", "out of memory decoding this image"))
            continue
        except Exception as e:  # noqa: BLE001 - a decoder bug on one file must not end the run
            failed.append((path, "decode", f"{type(e).__name__}: {first_line(e)}"))
            continue
        ok.append(path)
        if note:
            notes.append((path, note))
    return ok, failed, notes


def assemble(parts, spec, batch_size: int) -> DecodedBatch:
    """Chunks of one batch (in order) -> a DecodedBatch of fixed shape, zero rows padding."""
    h, w = spec["size"]
    out = DecodedBatch(np.zeros((batch_size, 3, h, w), dtype=np.uint8))
    for images, ok, failed, notes in parts:
        out.images[len(out.paths): len(out.paths) + len(ok)] = images
        out.paths += ok
        out.failed += failed
        out.notes += notes
    return out


def decode_batch(paths, spec, batch_size: int, max_pixels: int) -> DecodedBatch:
    """Decode one batch in this thread (what the pipeline does, without the pool)."""
    return assemble([decode_images(paths, spec, max_pixels)], spec, batch_size)


def _most_items(batch_size: int) -> int:
    """Items a batch may hold: a long run of skips is cut here too, so it is reported as it
    comes rather than held until the next decodable file."""
    return 4 * batch_size + 1024


def batched(found_iter, batch_size: int):
    """Cut a stream of discovery.Found into lists holding batch_size paths to decode, each
    with the skipped items found among them (in order), at most _most_items(batch_size)."""
    most = _most_items(batch_size)
    items, decodable = [], 0
    for item in found_iter:
        items.append(item)
        decodable += item.reason is None
        if decodable == batch_size or len(items) >= most:
            yield items
            items, decodable = [], 0
    if items:
        yield items


def batched_runs(runs, batch_size: int):
    """What batched(found_iter) yields, from discovery's runs (Discovery.runs: lists, each of
    files to decode or one skipped item), cut by slicing rather than one Python step a file."""
    most = _most_items(batch_size)
    items, decodable = [], 0
    for run in runs:
        if run[0].reason is not None:  # one skipped item
            items.append(run[0])
            if len(items) >= most:
                yield items
                items, decodable = [], 0
            continue
        start = 0
        while start < len(run):
            part = run[start:start + min(batch_size - decodable, most - len(items))]
            items += part
            decodable += len(part)
            start += len(part)
            if decodable == batch_size or len(items) >= most:
                yield items
                items, decodable = [], 0
    if items:
        yield items


def peek_files(item_batches, files: int) -> tuple:
    """Take batches from item_batches until they hold more than `files` files to decode, or
    until there are no more -> (those batches, whether item_batches ended within them). The
    caller goes on with itertools.chain(head, item_batches)."""
    head, decodable = [], 0
    for items in item_batches:
        head.append(items)
        decodable += sum(item.reason is None for item in items)
        if decodable > files:
            return head, False
    return head, True


def ahead_in_thread(iterable, depth: int, name: str = "cnnx-ahead"):
    """Yield what `iterable` yields, in order, produced by a thread of its own up to `depth`
    items ahead of the consumer; what it raises is raised here, in its place. Where the
    consumer's thread bounds the rate (the GPU path: it feeds the decode processes, copies
    batches and writes rows), work such as walking the folders then runs while that thread
    waits (on the GPU, on a decode process). A consumer that stops early stops the thread, at
    its next item, and waits for it: nothing it reads or writes is used after the consumer left.
    Items and the room for them pass through queue.SimpleQueue (C code): a queue.Queue's
    Conditions take locks in Python, each a hand-over of the GIL by the consumer's thread, and
    a KeyboardInterrupt landing inside one can leave its lock held and the producer, then the
    join, waiting for ever."""
    import queue

    items, room, stop = queue.SimpleQueue(), queue.SimpleQueue(), threading.Event()
    for _ in range(max(1, depth)):
        room.put(True)
    done = object()

    def produce():
        try:
            for item in iterable:
                room.get()  # while `depth` items wait for the consumer
                if stop.is_set():
                    return
                items.put((True, item))
        except BaseException as e:  # noqa: BLE001 - handed to the consumer, raised there
            items.put((False, e))
            return
        items.put((True, done))

    thread = threading.Thread(target=produce, name=name, daemon=True)
    thread.start()
    try:
        while True:
            ok, item = items.get()
            if not ok:
                raise item
            if item is done:
                return
            room.put(True)
            yield item
    finally:
        stop.set()
        room.put(True)  # a producer waiting for room wakes, and sees `stop`
        thread.join()


class _BatchJob:
    """One batch being decoded in chunks by the pool: the chunk that finishes last assembles
    the batch (and runs `infer` on it) and resolves `done`, so no pool thread ever waits for
    another."""

    def __init__(self, spec, batch_size: int, infer):
        self.spec, self.batch_size, self.infer = spec, batch_size, infer
        self.lock = threading.Lock()
        self.done = Future()
        self.chunks = []  # the pool's futures, cancelled when the caller stops early

    def start(self, pool, paths, chunk: int, max_pixels: int):
        starts = range(0, len(paths), chunk)
        self.parts = [None] * len(starts)
        self.left = len(starts)
        if not paths:
            self.finish()
        self.chunks = [pool.submit(self.decode_chunk, i, paths[start:start + chunk], max_pixels)
                       for i, start in enumerate(starts)]
        return self

    def decode_chunk(self, i: int, paths, max_pixels: int):
        try:
            self.parts[i] = decode_images(paths, self.spec, max_pixels)
            with self.lock:
                self.left -= 1
                last = self.left == 0
            if last:
                self.finish()
        except BaseException as e:  # noqa: BLE001 - handed to the caller of decoded_batches
            with self.lock:
                if not self.done.done():
                    self.done.set_exception(e)

    def finish(self):
        batch = assemble([p for p in self.parts if p is not None], self.spec, self.batch_size)
        self.parts = None
        if self.infer is not None and batch.paths:
            batch.logits = self.infer(batch.images)
        with self.lock:
            if not self.done.done():
                self.done.set_result(batch)


def decoded_batches(item_batches, spec, config: PipelineConfig, infer=None):
    """Yield (items, DecodedBatch) in order, decoding ahead in threads.

    Each batch is split into chunks of about batch_size / (4 * workers) files so that all
    workers share even a single batch (a few hundred large photos are one batch) and a slow
    file delays only its chunk. At most `config.read_ahead(spec)` batches are decoded ahead
    of the one being run: the bound that keeps memory flat however many files there are.

    infer: None, or a function uint8 (batch_size, 3, H, W) -> logits that is run in the pool
    thread that completes each batch (see the module's docstring); its result is the batch's
    `logits`, its exception is raised here, in batch order."""
    workers = config.resolved_workers()
    chunk = max(1, -(-config.batch_size // (4 * workers)))
    depth = config.read_ahead(spec)
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="cnnx-decode") as pool:
        pending = deque()
        try:
            for items in item_batches:
                paths = [item.path for item in items if item.reason is None]
                job = _BatchJob(spec, config.batch_size, infer).start(pool, paths, chunk, config.max_pixels)
                pending.append((items, job))
                if len(pending) > depth:
                    items, job = pending.popleft()
                    yield items, job.done.result()
            while pending:
                items, job = pending.popleft()
                yield items, job.done.result()
        finally:
            for _items, job in pending:
                for f in job.chunks:
                    f.cancel()
