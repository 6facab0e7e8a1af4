"""The classify pipeline: discovery -> parallel decoding -> fixed-shape batches -> onnxruntime.

Batches of paths are cut from the discovery stream in order and handed to a pool of decode
threads (libjpeg-turbo, Pillow's decoders and resize, and onnxruntime all release the GIL,
so threads overlap with inference without copying pixels between processes). At most
`workers + 2` batches are in flight: the queue is bounded, so memory does not grow with the
number of files. Every batch has the same shape (the last one is padded), so onnxruntime
sees one shape only. Results come back in submission order, i.e. in sorted path order.
"""

from __future__ import annotations

import os
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from cnnx.runtime.preprocess import DEFAULT_MAX_PIXELS, ImageError, load_image


@dataclass(frozen=True)
class PipelineConfig:
    batch_size: int = 256  # images per onnxruntime call (fixed; the last batch is padded)
    workers: int = 0  # decode threads; 0 = one per CPU core
    max_pixels: int = DEFAULT_MAX_PIXELS  # larger images are refused as decompression bombs

    def resolved_workers(self) -> int:
        if self.workers > 0:
            return self.workers
        if hasattr(os, "sched_getaffinity"):  # the cores this process may run on (cgroups, taskset)
            return max(1, len(os.sched_getaffinity(0)))
        return os.cpu_count() or 1


@dataclass
class DecodedBatch:
    """One batch: `images[:len(paths)]` are the decoded images of `paths` (in order);
    `failed` the (path, stage, message) of those that could not be decoded; `notes` the
    (path, note) of decoded images with a remark (first frame used, EXIF ignored)."""

    images: np.ndarray
    paths: list = field(default_factory=list)
    failed: list = field(default_factory=list)
    notes: list = field(default_factory=list)


def decode_batch(paths, spec, batch_size: int, max_pixels: int) -> DecodedBatch:
    h, w = spec["size"]
    images = np.zeros((batch_size, 3, h, w), dtype=np.uint8)  # zero rows pad a short batch
    out = DecodedBatch(images)
    for path in paths:
        try:
            arr, note = load_image(path, spec, max_pixels=max_pixels)
        except ImageError as e:
            out.failed.append((path, e.stage, str(e)))
            continue
        except MemoryError:
            out.failed.append((path, "decode", "out of memory decoding this image"))
            continue
        except Exception as e:  # noqa: BLE001 - a decoder bug on one file must not end the run
            out.failed.append((path, "decode", f"{type(e).__name__}: {e}"))
            continue
        images[len(out.paths)] = arr
        out.paths.append(path)
        if note:
            out.notes.append((path, note))
    return out


def batched_paths(found_iter, batch_size: int, on_skip):
    """Cut the discovery stream into lists of batch_size paths; skipped items go to on_skip."""
    chunk = []
    for item in found_iter:
        if item.reason is not None:
            on_skip(item)
            continue
        chunk.append(item.path)
        if len(chunk) == batch_size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def decoded_batches(path_batches, spec, config: PipelineConfig):
    """Yield DecodedBatch in order, decoding up to `workers` batches ahead in threads."""
    workers = config.resolved_workers()
    depth = workers + 2  # bounded: decoded-but-not-consumed batches never exceed this
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="cnnx-decode") as pool:
        pending = deque()
        it = iter(path_batches)
        try:
            for paths in it:
                pending.append(pool.submit(decode_batch, paths, spec, config.batch_size, config.max_pixels))
                if len(pending) >= depth:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            for f in pending:
                f.cancel()
