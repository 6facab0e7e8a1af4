"""`cnnx classify --engine ray`: the same classification spread over a Ray cluster with Ray Data.

    driver: list the inputs -> ray.data.from_blocks(paths) -> map_batches(_ClassifyActor,
            ActorPoolStrategy): one onnxruntime session per actor, decoding with the one
            load_image -> rows streamed back in order -> cnnx.runtime.output's writers

- Inputs: local files and folders go through the CLI's Discovery (the same files, the same
  order, the same discover-stage errors rows); a manifest holds one file path or URI a line
  (kept in its order; relative paths are relative to the current folder, like PATH
  arguments); `s3://` and `gs://` prefixes are listed through pyarrow.fs, `file://` ones are
  walked with the local paths by Discovery (the same skips as a local path; their rows are
  file:// URIs, percent-escaped: file_uri). A path given twice, in either spelling, is
  classified once.
- With GPU actors (`num_gpus_per_worker` > 0) decoding runs as a separate CPU map stage
  feeding them, so a GPU never waits for a JPEG decoder; on CPUs it runs inside the actor,
  so pixels never cross the object store.
- The driver writes every row. Rows are small (a path and k labels), so this is not the
  bottleneck, and it keeps the output exactly local classify's: CSV/JSONL by the same
  writers (flushed per block), or Parquet part files each written whole and renamed into
  place (a killed run leaves complete parts only). `resume` skips what is already there.
- The model travels through the object store (its bytes), so workers on other machines need
  no copy of the file; images given as local paths must be readable at the same path on
  every node (a shared filesystem), or be given as s3:// / gs:// URIs.
- Paths travel as bytes: Arrow strings must be UTF-8, file names need not be.

Ray is imported only inside functions: `cnnx.runtime` works without it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import tempfile
import threading
import time
from dataclasses import dataclass, field

import numpy as np

from cnnx.runtime.api import Classifier, classified_again, path_list
from cnnx.runtime.contract import external_data_files
from cnnx.runtime.discover import URI, Discovery, Found, PathKeys, is_uri
from cnnx.runtime.files import (TEMP_PREFIX, atomic_file, escaped_name, first_line, os_error_line,
                                path_of_text, quiet_pillow_warnings, remove_stale_temps)
from cnnx.runtime.model import NON_FINITE_LINE, NON_FINITE_STAGE, ModelError, finite_rows, softmax_topk
from cnnx.runtime.output import (SAMPLE_ROWS, ErrorsWriter, OutputBusy, PredictionWriter, ResumeError, WriteError,
                                 already_exists, check_resume, check_unrecorded_output, csv_header, default_errors_path,
                                 held_for_writing, names_parquet_folder, read_done, read_run_record, rows_not_found_note,
                                 run_record_path, summary_counts, write_run_record)
from cnnx.runtime.pipeline import decode_images
from cnnx.runtime.preprocess import DEFAULT_MAX_PIXELS

FORMATS = ("csv", "jsonl", "parquet")
URI_SCHEMES = ("s3", "gs", "file")  # s3 and gs listed and read through pyarrow.fs; file walked and read as local paths
PART_PREFIX = "part-"
CANNOT_CLASSIFY = "cannot classify"  # the stage of an actor's rows that could not open the model
URI_RETRY_S = 20.0  # an s3:// or gs:// object that cannot be reached in this long is an errors row
CONNECT_TIMEOUT_S = 10.0  # an unreachable --address fails within this, not after Ray's own retries
INSTALL_HINT = "pip install 'cnnx[ray]'"


class RayEngineError(Exception):
    """A failure of the Ray engine, one line for the user (exit 1): Ray not installed, a
    cluster that cannot be reached, an output that cannot be continued, a failed run."""


class RayUsageError(RayEngineError):
    """A usage mistake the engine finds (an output that exists without --resume): exit 2 at the
    command line, as the local engine's."""


@dataclass
class RaySummary:
    """What a run did, for the summary line (the same counts local classify prints)."""

    classified: int = 0
    skipped: dict = field(default_factory=dict)  # stage -> count
    found: int = 0
    resumed: int = 0
    noted: int = 0
    ignored: int = 0  # non-image files inside listed folders/prefixes
    workers: int = 0
    providers: set = field(default_factory=set)  # onnxruntime providers the actors ran
    nodes: set = field(default_factory=set)  # Ray node ids whose actors classified something
    startup_seconds: float = 0.0  # ray.init (or joining the cluster) until the first row came back
    seconds: float = 0.0
    warnings: list = field(default_factory=list)  # lines for the user (the CLI prints them as warnings)
    notes: list = field(default_factory=list)  # and as notes, after the summary line

    def line(self) -> str:
        parts = summary_counts(self.classified, self.skipped, already_done=self.resumed, noted=self.noted,
                               ignored=self.ignored)
        if self.workers == 0:  # nothing left to classify: Ray was not started, and no start-up to tell
            parts += ["ray: not started (nothing left to classify)", f"{self.seconds:.2f} s"]
            return "; ".join(parts)
        providers = ", ".join(sorted(self.providers)) or "none"
        parts.append(f"ray: {self.workers} workers on {len(self.nodes)} node(s), provider {providers}")
        parts.append(f"{self.seconds:.2f} s (Ray start-up to the first rows {self.startup_seconds:.2f} s)")
        parts.append(f"{self.classified / max(self.seconds, 1e-9):,.0f} images/s")
        return "; ".join(parts)


def import_ray():
    """-> the ray module, or RayEngineError with the install hint."""
    try:
        import ray
        import ray.data  # noqa: F401 - the [data] extra, not only ray core
    except ImportError:
        raise RayEngineError(f"--engine ray needs Ray Data, which is not installed: {INSTALL_HINT}") from None
    return ray


def classify_with_ray(paths, model, *, output, fmt="csv", errors=None, resume=False, manifest=None, address=None,
                      num_workers=None, num_gpus_per_worker=0.0, batch_size=256, topk=5, follow_symlinks=False,
                      device="auto", max_pixels=DEFAULT_MAX_PIXELS, rows_per_part=100_000,
                      on_progress=None) -> RaySummary:
    """Classify `paths` (files, folders, s3:// gs:// file:// prefixes: a list, or one alone) and the lines of
    `manifest` on Ray Data; write predictions to `output` (a CSV/JSONL file, '-', or a
    Parquet folder: see output.names_parquet_folder) and the files not classified to `errors`.

    address: a running cluster (`ray start --head` prints it; 'auto' finds the local one);
    None: $RAY_ADDRESS (set under `ray job submit`), else a private Ray started on this
    machine with `num_workers` CPUs, unless this process already called ray.init (then that
    session is used, and left running).
    num_workers: actors, one onnxruntime session each (default: the cluster's CPUs, or its
    GPUs / num_gpus_per_worker). resume: skip paths already in output and errors.
    on_progress(classified, skipped) is called after each block of rows.
    Raises RayEngineError or ModelError (one line each); returns a RaySummary.
    """
    ray = import_ray()
    t0 = time.perf_counter()
    paths = path_list(paths)
    output, errors, manifest = (None if p is None else os.fsdecode(p) for p in (output, errors, manifest))
    fmt = "parquet" if names_parquet_folder(output) else fmt
    if fmt not in FORMATS:
        raise RayEngineError(f"unknown output format {fmt!r}; known: {', '.join(FORMATS)}")
    if errors is None:
        try:
            errors = default_errors_path(output, resume)
        except ResumeError as e:
            raise RayUsageError(f"cannot resume: {e}") from None
    # The contract check, the top-k cap and the batch budget, once here rather than in N actors,
    # on the bytes the actors get: read before and after the model is opened here, the same both
    # times (a new export moved into its place meanwhile would give the actors another model).
    model_bytes = _read_model(model)
    with Classifier(model, "cpu", threads=1, batch_size=batch_size, topk=topk, max_pixels=max_pixels,
                    decode="threads") as clf:  # the pool, not processes of its own, uses the cores
        info, topk, batch_size = clf.info, clf.topk, clf.batch_size
    if model_bytes is None or _read_model(model) != model_bytes:
        raise RayEngineError(f"{model} was replaced by another model (a new export?) while this run started: "
                             f"run it again")
    kept_apart = external_data_files(model_bytes)
    if kept_apart:  # the actors get the .onnx file's bytes alone, and failed naming a temp folder
        raise RayEngineError(f"{model} keeps its weights in other files ({', '.join(kept_apart[:3])}), and the Ray "
                             f"engine sends the model file alone to its workers: save it as one file "
                             f"(onnx.save(model, path, save_as_external_data=False); cnnx export writes one), or "
                             f"classify with --engine local")
    if device in ("cuda", "tensorrt") and address is None and not os.environ.get("RAY_ADDRESS") \
            and not ray.is_initialized():
        # A private Ray starts on this machine, whose actors open the model here: why they could
        # not is one line now, before Ray starts, not an actor's traceback after it.
        from cnnx.runtime import cuda

        status = cuda.diagnose() if device == "cuda" else cuda.diagnose_tensorrt()
        if not status.usable:
            raise RayEngineError(f"--device {device}: {status.reason}")
    summary = RaySummary()

    def classify_here(sample):  # an output without its run record: are its rows this model's?
        with Classifier(model, "cpu", threads=1, batch_size=batch_size, topk=topk, max_pixels=max_pixels,
                        decode="threads") as here:
            return classified_again(here, sample)

    with _output_lock(output, errors), _Sink(output, fmt, errors, topk, resume, rows_per_part, info,
                                     classify_here) as sink:
        summary.warnings += sink.warnings
        todo, discover_skips, found_done = _plan(_found(paths, manifest, follow_symlinks, summary), sink, summary)
        if summary.found == 0:
            raise RayEngineError(f"no {'image ' if summary.ignored else ''}files found under "
                                 f"{', '.join(map(str, [*paths, *([manifest] if manifest else [])]))}")
        note = rows_not_found_note(len(sink.done) - found_done, output, [*paths, *([manifest] if manifest else [])])
        if note is not None:
            summary.notes.append(note)
        t_ray = time.perf_counter()
        with _ray_session(ray, address, num_workers, needed=bool(todo)), _data_context():  # before any row is written
            for path, reason in discover_skips:
                sink.skip(path, "discover", reason, summary)
            if todo:
                summary.workers = _pool_size(ray, num_workers, num_gpus_per_worker)
                dataset, summary.workers = _dataset(ray, todo, model_bytes, info.spec, topk, device, max_pixels,
                                                    batch_size, summary.workers, num_gpus_per_worker)
                for block in _blocks(ray, dataset):
                    summary.startup_seconds = summary.startup_seconds or time.perf_counter() - t_ray
                    sink.write_block(block, summary)
                    if on_progress is not None:
                        on_progress(summary.classified, sum(summary.skipped.values()))
    summary.seconds = time.perf_counter() - t0
    return summary


@contextlib.contextmanager
def _output_lock(output, errors_path):
    """local classify's locks of the output and its errors file (a second run on either stops)."""
    try:
        with held_for_writing(output, errors_path):
            yield
    except OutputBusy as e:
        raise RayEngineError(str(e)) from None
    except WriteError as e:
        raise RayEngineError(f"cannot write: {e}") from None


# ---- inputs ---------------------------------------------------------------------------------

def _found(paths, manifest, follow_symlinks, summary):
    """Found items in output order: local paths and file:// folders (one walk, Discovery's
    order), s3:// and gs:// prefixes (sorted), manifest lines."""
    paths = list(dict.fromkeys(paths))
    local = [p for p in paths if not is_uri(p)]
    spelt = {}
    for uri in (p for p in paths if is_uri(p) and URI.match(p).group(1).lower() == "file"):
        root = _file_uri_path(uri)
        if isinstance(root, Found):
            yield root
        elif root not in local and root not in spelt:  # given twice: one walk, the plain spelling first
            spelt[root] = file_uri
    if local or spelt:
        discovery = Discovery([*local, *spelt], follow_symlinks=follow_symlinks, spelt=spelt)
        yield from discovery
        summary.ignored += discovery.ignored
    for uri in sorted(p for p in paths if is_uri(p) and URI.match(p).group(1).lower() != "file"):
        yield from _list_uri(uri, summary)
    if manifest is not None:
        yield from _manifest_lines(manifest)


def _file_uri_path(uri: str):
    """The local path of a file:// URI, walked by Discovery as a local path is (the same skips:
    symlinks not followed, loops, special files; pyarrow's listing left dangling and looping
    symlinks out without a row, and failed on a name that is not UTF-8); its rows are file://
    URIs too (file_uri). A Found skip when the URI names no file of this machine."""
    try:
        return file_uri_local_path(uri)
    except ValueError as e:
        return Found(uri, f"cannot list: {first_line(e)}")


def file_uri(path: str) -> str:
    """The file:// URI of a local absolute path, every byte outside [A-Za-z0-9_.~/-] percent-
    escaped: a name with a space, %, # or ? (or one that is not UTF-8) is one file, read back
    as itself by file_uri_local_path."""
    from urllib.parse import quote

    return "file://" + quote(os.fsencode(path))


def file_uri_local_path(uri: str) -> str:
    """The local path a file:// URI names (file:///path or file://localhost/path), its percent-
    escapes decoded to bytes (names need not be UTF-8). ValueError for another host."""
    from urllib.parse import unquote_to_bytes

    host, _, path = uri.split("://", 1)[1].partition("/")
    if host not in ("", "localhost"):
        raise ValueError(f"{uri} names host {host!r}: each node reads a file:// URI from its own filesystem; "
                         f"write file:///path")
    return os.fsdecode(unquote_to_bytes(os.fsencode("/" + path)))


def _list_uri(uri: str, summary):
    """A file or every image file under an s3:// or gs:// prefix (pyarrow.fs), sorted by key."""
    scheme = URI.match(uri).group(1).lower()
    if scheme not in URI_SCHEMES:
        yield Found(uri, f"unsupported URI scheme {scheme}:// (known: {', '.join(s + '://' for s in URI_SCHEMES)})")
        return
    import pyarrow.fs as pafs

    from cnnx.runtime.contract import is_image_name

    try:
        fs, root = _object_filesystem(uri)
        info = fs.get_file_info(root)
        if info.type == pafs.FileType.NotFound:
            yield Found(uri, "not found")
            return
        if info.type == pafs.FileType.File:
            yield Found(uri)
            return
        listed = fs.get_file_info(pafs.FileSelector(root, recursive=True))
    except (OSError, ValueError) as e:  # pyarrow's ArrowInvalid is a ValueError, its I/O errors OSErrors
        yield Found(uri, f"cannot list: {first_line(e)}")
        return
    files = []
    for entry in listed:  # s3 and gs keys are UTF-8 (file:// folders are walked by Discovery: _found)
        if entry.type != pafs.FileType.File:
            continue
        if is_image_name(entry.base_name):
            files.append(entry.path)
        else:
            summary.ignored += 1
    for path in sorted(files, key=os.fsencode):
        yield Found(f"{scheme}://{path}")


def _manifest_lines(manifest):
    try:
        with open(manifest, encoding="utf-8", errors="surrogateescape") as f:
            for line in f:
                line = line.rstrip("\r\n")
                if line.strip():  # a local path as this locale names it (a URI is text either way)
                    yield Found(line if is_uri(line) else path_of_text(line))
    except OSError as e:
        raise RayEngineError(f"cannot read manifest {manifest}: {e.strerror or first_line(e)}") from None


def _plan(found_iter, sink, summary):
    """-> (paths still to classify, [(path, reason)] of discover-stage skips not yet recorded,
    how many of the paths the output already holds were found). A path given twice (a manifest
    line repeated, a folder and a file in it) is classified once."""
    todo, skips, seen, found_done = [], [], set(), 0
    for item in found_iter:
        key = sink.key(item.path)
        if key in seen:
            continue
        seen.add(key)
        summary.found += 1
        if sink.is_done(item.path):
            summary.resumed += item.reason is None
            found_done += key in sink.done
        elif item.reason is not None:
            skips.append((item.path, item.reason))
        else:
            todo.append(item.path)
    return todo, skips, found_done


# ---- Ray --------------------------------------------------------------------------------------

@contextlib.contextmanager
def _ray_session(ray, address, num_workers, *, needed: bool):
    """Join `address` or start a private Ray here (shut down at the end). A session this
    process already opened (ray.init in a notebook, a test) is used as it is and left open."""
    if not needed:
        yield
        return
    if ray.is_initialized():
        if address is not None:
            raise RayEngineError(f"this process is already connected to a Ray cluster; to use {address} "
                                 "instead, call ray.shutdown() first (or pass no address to use the current one)")
        yield
        return
    quiet = dict(include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR)
    # Under `ray job submit` RAY_ADDRESS names the job's cluster (ray.init would read it too,
    # and refuse the num_cpus of a private start).
    address = address or os.environ.get("RAY_ADDRESS") or None
    with _sigterm_kept(ray.shutdown):
        if address is None:
            try:  # "local": a private instance, never the head a `ray start` left on this machine
                ray.init(address="local", num_cpus=num_workers or _local_cpus(), **quiet)
            except Exception as e:  # noqa: BLE001 - Ray's own types (a port taken, no disk for its session)
                raise RayEngineError(f"cannot start a private Ray on this machine: {first_line(e)}") from None
        else:
            _check_reachable(address)
            try:
                ray.init(address=address, **quiet)
            except Exception as e:  # noqa: BLE001 - ray.init raises ConnectionError, RuntimeError, ValueError...
                hint = "" if os.environ.get("RAY_AUTH_MODE") else (
                    " (a cluster of Ray >= 2.59 refuses drivers without its token: set RAY_AUTH_MODE=token and "
                    "RAY_AUTH_TOKEN, or the token file, as on the head)")
                raise RayEngineError(f"cannot join the Ray cluster at {address}: {first_line(e)}{hint}") from None
    try:
        yield
    finally:
        ray.shutdown()


@contextlib.contextmanager
def _sigterm_kept(shutdown):
    """SIGTERM's handler as it was before the block, where it was Python's to set (the main
    thread): ray.init installs its own, whose SIGTERM printed a native stack dump and aborted
    (exit 134) once it returned, and ended it with sys.exit (15, or 1 after its node stopped its
    processes) while it ran, where cnnx classify ends a run as 'terminated' (143) and a program
    keeps the handler it set, or the default. A SIGTERM that ended the block so is given, after
    `shutdown()` (a half-started Ray), to the handler from before: cnnx's raises Terminated."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    before = signal.getsignal(signal.SIGTERM)
    try:
        yield
    except SystemExit:  # ray.init exits only from its SIGTERM handlers
        with contextlib.suppress(Exception):
            shutdown()
        if callable(before):
            signal.signal(signal.SIGTERM, before)
            before(signal.SIGTERM, None)
        raise
    finally:
        if before is not None:  # None: a handler not set from Python, which cannot be set back
            signal.signal(signal.SIGTERM, before)


def _check_reachable(address: str):
    """A TCP connect to host:port first, so a wrong --address fails in seconds with one line
    (ray.init retries for much longer). 'auto' and addresses without a port go to Ray as they are."""
    rest = address.split("://", 1)[-1]
    host, sep, port = rest.rpartition(":")
    if not sep or not port.isdigit():
        return
    try:
        conn = socket.create_connection((host.strip("[]"), int(port)), timeout=CONNECT_TIMEOUT_S)
    except OSError as e:
        raise RayEngineError(f"cannot reach the Ray cluster at {address}: {e.strerror or first_line(e)} "
                             "(is `ray start --head` running there, and the port open?)") from None
    with conn:
        if os.environ.get("RAY_USE_TLS", "0") in ("0", "") and not _speaks_http2(conn):
            raise RayEngineError(f"{address} answers, but not as a Ray cluster's head does (its GCS speaks gRPC): "
                                 f"pass the port of `ray start --head` (6379 unless --port), not the dashboard's (8265)")


# HTTP/2's client connection preface and an empty SETTINGS frame: a gRPC server (Ray's GCS)
# answers with a SETTINGS frame of its own (frame type 4, the header's 4th byte).
_HTTP2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes([0, 0, 0, 4, 0, 0, 0, 0, 0])


def _speaks_http2(conn) -> bool:
    """Whether the server on `conn` answers HTTP/2's preface as gRPC does. Something else there
    (the dashboard's HTTP/1, any other service) made ray.init retry without end. A server that
    says nothing in time is left to ray.init (True)."""
    try:
        conn.sendall(_HTTP2_PREFACE)
        head = b""
        while len(head) < 9:
            chunk = conn.recv(9 - len(head))
            if not chunk:
                return False  # closed on the preface
            head += chunk
    except socket.timeout:
        return True
    except OSError:
        return False
    return head[3] == 4


def _local_cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _pool_size(ray, num_workers, num_gpus_per_worker) -> int:
    if num_workers:
        return int(num_workers)
    resources = ray.cluster_resources()
    if num_gpus_per_worker:
        gpus = int(resources.get("GPU", 0) / num_gpus_per_worker)
        if gpus < 1:
            raise RayEngineError(f"--num-gpus-per-worker {num_gpus_per_worker}: the Ray cluster has "
                                 f"{resources.get('GPU', 0):g} GPUs")
        return gpus
    return max(1, int(resources.get("CPU", 1)))


def _read_model(model) -> bytes | None:
    """The model file's bytes; None where it cannot be read (the Classifier's open says why)."""
    try:
        with open(model, "rb") as f:
            return f.read()
    except OSError:
        return None


def _dataset(ray, todo, model_bytes, spec, topk, device, max_pixels, batch_size, workers, num_gpus_per_worker):
    import pyarrow as pa
    from ray.data import ActorPoolStrategy

    model_ref = ray.put(model_bytes)
    # Arrow blocks of paths: compact in the driver (a million paths are tens of MB, not Python
    # dicts). from_blocks keeps them as they are and reads their row counts here; from_arrow
    # would run a Ray task per block to do that (worker processes importing Ray Data).
    rows = _block_rows(len(todo), batch_size, workers)
    # No more actors than blocks: an actor with no block to take only costs its start-up (and
    # Ray Data warns of it).
    workers = min(workers, -(-len(todo) // rows))
    ds = ray.data.from_blocks([pa.table({"path": pa.array(list(map(os.fsencode, todo[i:i + rows])), pa.binary())})
                               for i in range(0, len(todo), rows)])
    decode_args = dict(spec=spec, max_pixels=max_pixels, cwd=os.getcwd())
    gpu = num_gpus_per_worker > 0
    if gpu:
        ds = ds.map_batches(_decode_rows, fn_kwargs=decode_args, batch_size=batch_size, batch_format="numpy",
                            num_cpus=1)
    # The model's bytes are in the object store once; each actor ray.get()s them (the ref sits
    # in a list: Ray passes nested refs on unresolved).
    actor_args = ([model_ref], device, topk, batch_size, max_pixels, decode_args)
    return ds.map_batches(_ClassifyActor, fn_constructor_args=actor_args,
                          compute=ActorPoolStrategy(size=workers), batch_size=batch_size, batch_format="numpy",
                          num_gpus=num_gpus_per_worker if gpu else None, num_cpus=0 if gpu else 1), workers


BLOCKS_PER_ACTOR = 4  # at least this many blocks per actor where the input allows: an even share of the work
# Ray's cost is per block (a task to schedule, its metadata, stats, an object to move): on 2
# cores, with blocks of one 256-image batch that cost was a large share of the run (profiled
# with py-spy on bench_ray's 50,000 JPEGs); 8 batches a block make it small.
MAX_BATCHES_PER_BLOCK = 8


def _block_rows(paths: int, batch_size: int, workers: int) -> int:
    """Paths per Ray block: whole batches, up to MAX_BATCHES_PER_BLOCK, fewer when that would
    leave an actor with less than BLOCKS_PER_ACTOR blocks."""
    batches = -(-paths // (batch_size * workers * BLOCKS_PER_ACTOR))
    return batch_size * max(1, min(MAX_BATCHES_PER_BLOCK, batches))


ACTORS_START_S = 600  # a pool the cluster cannot place (too few CPUs/GPUs) fails after this, not never


@contextlib.contextmanager
def _data_context():
    """Ray Data settings for this run, restored after it (a notebook's own context stays its own)."""
    from ray.data import DataContext

    context = DataContext.get_current()
    settings = {"enable_progress_bars": False,  # the CLI prints its own progress line
                "print_on_execution_start": False,
                "wait_for_min_actors_s": ACTORS_START_S}  # and every actor is up before rows are sent
    saved = {name: getattr(context, name) for name in settings}
    saved_order = context.execution_options.preserve_order
    data_logger = logging.getLogger("ray.data")
    saved_level = data_logger.level
    for name, value in settings.items():
        setattr(context, name, value)
    context.execution_options.preserve_order = True  # rows come back in path order, as locally
    data_logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(context, name, value)
        context.execution_options.preserve_order = saved_order
        data_logger.setLevel(saved_level)


def _blocks(ray, dataset):
    """Result blocks in order; a failed run becomes one RayEngineError line (its root cause, or
    why an actor cannot classify)."""
    try:
        for table in dataset.iter_batches(batch_size=None, batch_format="pyarrow"):
            block = _block_columns(table)
            failed = np.flatnonzero(block["stage"] == CANNOT_CLASSIFY)
            if len(failed):
                raise RayEngineError(f"a Ray worker (node {block['node'][failed[0]][:12]}) cannot classify: "
                                     f"{block['message'][failed[0]]}")
            yield block
    except ray.exceptions.RayError as e:
        cause = e
        while cause.__cause__ is not None:
            cause = cause.__cause__
        raise RayEngineError(f"the Ray run failed: {type(cause).__name__}: {first_line(cause)}") from None


def _decode_rows(batch, *, spec, max_pixels, cwd, filesystems=None):
    """{path: bytes} -> {path, stage ('' when decoded), message (error or note), images}.
    Local paths go through decode_images (local classify's own function); URIs are read
    through pyarrow.fs and decoded from their bytes by the same load_image."""
    quiet_pillow_warnings()
    names = [os.fsdecode(p) for p in batch["path"]]
    h, w = spec["size"]
    n = len(names)
    images = np.zeros((n, 3, h, w), dtype=np.uint8)
    stage, message = [""] * n, [""] * n
    where = {}  # location -> rows naming it; workers' cwd is not the driver's
    remote = []
    for i, name in enumerate(names):
        if not is_uri(name):
            where.setdefault(os.path.join(cwd, name), []).append(i)
        elif URI.match(name).group(1).lower() == "file":
            try:
                where.setdefault(file_uri_local_path(name), []).append(i)
            except ValueError as e:
                stage[i], message[i] = "open", f"cannot read: {first_line(e)}"
        else:
            remote.append(i)
    if where:
        decoded, ok, failed, notes = decode_images(list(where), spec, max_pixels)
        for image, p in zip(decoded, ok):
            images[where[p]] = image
        for p, st, msg in failed:
            for i in where[p]:
                stage[i], message[i] = st, msg
        for p, note in notes:
            for i in where[p]:
                message[i] = note
    filesystems = {} if filesystems is None else filesystems
    for i in remote:
        try:
            data = _read_uri(names[i], filesystems)
        except (OSError, ValueError) as e:
            stage[i], message[i] = "open", f"cannot read: {first_line(e)}"
            continue
        decoded, ok, failed, notes = decode_images([data], spec, max_pixels)
        if ok:
            images[i] = decoded[0]
            message[i] = notes[0][1] if notes else ""
        else:
            stage[i], message[i] = failed[0][1], failed[0][2]
    return {"path": batch["path"], "stage": np.array(stage, dtype=object), "message": np.array(message, dtype=object),
            "images": images}


def _read_uri(uri: str, filesystems: dict) -> bytes:
    """The bytes of one s3:// or gs:// object, its key as listed (never URI-decoded: a key may
    hold a space, % or #); one pyarrow filesystem per scheme and bucket per actor (an S3
    client is costly to make)."""
    scheme, rest = uri.split("://", 1)
    key = (scheme.lower(), rest.split("/", 1)[0])
    if key not in filesystems:
        filesystems[key] = _object_filesystem(f"{key[0]}://{key[1]}")[0]
    with filesystems[key].open_input_stream(rest) as f:
        return f.readall()


def _object_filesystem(uri: str):
    """(pyarrow filesystem, path in it) for an s3:// or gs:// URI, as FileSystem.from_uri gives
    them, but GCS gives up on a bucket it cannot reach after URI_RETRY_S (its client retried for
    15 minutes: a run with one gs:// path on a machine without access hung, rows of other files
    in its block held back with it)."""
    import datetime

    import pyarrow.fs as pafs

    scheme, rest = uri.split("://", 1)
    if scheme.lower() == "gs":
        return pafs.GcsFileSystem(retry_time_limit=datetime.timedelta(seconds=URI_RETRY_S)), rest.rstrip("/")
    return pafs.FileSystem.from_uri(uri)


class _ClassifyActor:
    """One onnxruntime session per Ray actor; batches of paths (or of decoded images, when a
    CPU stage decodes for GPU actors) in, top-k rows out."""

    def __init__(self, model_ref, device, topk, batch_size, max_pixels, decode_args):
        import ray

        # Why this actor cannot classify (no usable GPU on its node, a full /tmp) goes back as its
        # first batch's rows (stage CANNOT_CLASSIFY), which the driver ends the run with, in one
        # line (_blocks): raised here, in __init__ or in a batch, it reaches the driver only as text
        # inside Ray's traceback.
        self.classifier, self.failure, self.topk = None, None, topk
        quiet_pillow_warnings()
        try:
            folder = tempfile.mkdtemp(prefix="cnnx-ray-model-")
            path = os.path.join(folder, "model.onnx")
            try:
                with open(path, "wb") as f:
                    f.write(ray.get(model_ref[0]))
                # One intra-op thread: a CPU actor holds one CPU, and the pool, not threads, uses the cores.
                self.classifier = Classifier(path, device, threads=1, batch_size=batch_size, topk=topk,
                                             max_pixels=max_pixels, decode="threads")
            finally:
                with contextlib.suppress(OSError):
                    os.unlink(path)
                os.rmdir(folder)
        except ModelError as e:
            self.failure = first_line(e)
        except OSError as e:
            self.failure = f"cannot write the model to its temporary folder: {os_error_line(e)}"
        self.node = ray.get_runtime_context().get_node_id()
        self.decode_args = decode_args
        self.filesystems = {}

    def __call__(self, batch):
        if self.failure is not None:
            n = len(batch["path"])
            rows = {"path": batch["path"], "stage": np.array([CANNOT_CLASSIFY] * n, dtype=object),
                    "message": np.array([self.failure] * n, dtype=object)}
            k = self.topk  # the width of the other actors' blocks
            return _result_table(rows, np.zeros((n, k), np.int64), np.zeros((n, k)), "", self.node)
        rows = batch if "images" in batch else _decode_rows(batch, filesystems=self.filesystems, **self.decode_args)
        clf = self.classifier
        ok = np.flatnonzero(rows["stage"] == "")
        n = len(rows["path"])
        indices = np.zeros((n, clf.topk), dtype=np.int64)
        scores = np.zeros((n, clf.topk), dtype=np.float64)
        for start in range(0, len(ok), clf.batch_size):
            take = ok[start:start + clf.batch_size]
            logits = clf.predict(rows["images"][take])  # no padding rows, as local classify's CPU path
            finite = finite_rows(logits)
            if finite is not None:  # as local classify: a file of non-finite scores is an errors row
                rows = {**rows, "stage": rows["stage"].copy(), "message": rows["message"].copy()}  # Ray's may be read-only
                rows["stage"][take[~finite]], rows["message"][take[~finite]] = NON_FINITE_STAGE, NON_FINITE_LINE
                take, logits = take[finite], logits[finite]
            indices[take], scores[take] = softmax_topk(logits, clf.topk)
        return _result_table(rows, indices, scores, clf.provider, self.node)


def _result_table(rows, indices, scores, provider: str, node: str):
    """An actor's rows as an Arrow table of native types (binary, strings, fixed-size lists):
    Ray Data ships and concatenates it as it is, where numpy object columns would be converted
    value by value on both sides."""
    import pyarrow as pa

    n, k = indices.shape

    def lists(values):
        return pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1)), k)

    return pa.table({"path": pa.array(rows["path"], pa.binary()), "stage": pa.array(rows["stage"], pa.string()),
                     "message": pa.array(rows["message"], pa.string()), "indices": lists(indices),
                     "scores": lists(scores), "provider": pa.array([provider] * n, pa.string()),
                     "node": pa.array([node] * n, pa.string())})


def _block_columns(table) -> dict:
    """A result table back as the columns _Sink.write_block reads: numpy arrays, (n, k) for
    indices and scores."""
    columns = {name: table.column(name).to_numpy(zero_copy_only=False)
               for name in ("path", "stage", "message", "provider", "node")}
    for name in ("indices", "scores"):
        lists = table.column(name).combine_chunks()
        columns[name] = lists.flatten().to_numpy().reshape(len(lists), lists.type.list_size)
    return columns


# ---- output -----------------------------------------------------------------------------------

class _Sink:
    """Predictions (CSV/JSONL through PredictionWriter, or Parquet parts) and the errors file,
    and what both already hold when resuming."""

    def __init__(self, output, fmt, errors_path, topk, resume, rows_per_part, info, classify_here):
        """info: the model's ModelInfo: its identity() is kept in the output's run record with its
        path (as local classify keeps them: output.write_run_record) and checked by a --resume
        (check_resume). classify_here: sample -> api.classified_again of the model, for an
        output without its record (output.check_unrecorded_output)."""
        model = info.identity()
        class_names = info.class_names
        self.fmt, self.class_names, self.topk = fmt, class_names, topk
        if resume and output == "-":
            raise RayUsageError("--resume needs --output FILE (it reads back what that file already holds)")
        for label, target in (("--output", output), ("--errors", errors_path)):
            if target not in (None, "-") and os.path.exists(target) and not resume and not (
                    fmt == "parquet" and target == output and not _parts(output)):
                raise RayUsageError(already_exists(label, target, output))
        done, noted, escaped = set(), set(), set()
        self.warnings = []  # for the user, before the summary line
        target = None if output == "-" else output.rstrip("/" + os.sep)  # a Parquet folder's record is beside it
        started = target is not None and os.path.exists(target) and (fmt != "parquet" or bool(_parts(output)))
        self._output, self._errors_path = output, errors_path
        self._fresh = None  # (record, whether the Parquet folder is new): a run that ends before its first row takes them back
        folder_is_new = fmt == "parquet" and not os.path.exists(output)
        try:
            record = read_run_record(target) if resume and started else None
            check_resume(target, record, model, ())  # the model, before anything is read
            unrecorded = resume and started and record is None  # moved without its record, or an older cnnx's
            labels, sample = (set(), []) if unrecorded else (None, None)
            if fmt == "parquet":
                self.writer = _ParquetParts(output, class_names, topk, rows_per_part)
                if resume:
                    done, escaped = self.writer.read_done(labels, sample)
            else:
                if resume and os.path.exists(output):
                    done = read_done(output, fmt, topk, labels=labels, sample=sample)[0]
                self.writer = PredictionWriter(output, fmt, class_names, topk, append=resume)
            if unrecorded:
                self.warnings.append(check_unrecorded_output(target, labels, sample, info, classify_here))
            if resume and errors_path is not None and os.path.exists(errors_path):
                done |= read_done(errors_path, "errors", None, notes=noted)[0]
            check_resume(target, record, model, done | escaped)  # and the folder its relative paths are relative to
        except ResumeError as e:
            raise RayEngineError(f"cannot resume: {e}") from None
        except OSError as e:
            raise RayEngineError(f"cannot resume: {os_error_line(e)}") from None
        if target is not None and not (resume and started and record is not None):
            try:
                write_run_record(target, model, info.path)
            except OSError as e:
                raise RayEngineError(f"cannot write: {os_error_line(e)}") from None
            self._fresh = (run_record_path(target), folder_is_new)
        self._keys = PathKeys()
        self.done = {self.key(p) for p in done}
        self.done_escaped = {self.key(p) for p in escaped}  # parts of an older cnnx: parquet_name() spellings
        self.errors = ErrorsWriter(errors_path, append=resume, noted=noted)

    def key(self, path: str) -> str:
        """Local paths match however the folder is spelt (PathKeys, as local --resume), a file://
        URI as the local path it names (a manifest's `/a/x.jpg` and `file:///a/x.jpg` are one
        file); other URIs as written."""
        if not is_uri(path):
            return self._keys(path)
        if URI.match(path).group(1).lower() == "file":
            with contextlib.suppress(ValueError):  # another host's: as written
                return self._keys(file_uri_local_path(path))
        return path

    def is_done(self, path) -> bool:
        return self.key(path) in self.done or (bool(self.done_escaped) and
                                               self.key(parquet_name(path)) in self.done_escaped)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *exc):
        self.close()
        if exc_type is not None and self._fresh is not None and not self._wrote_anything():
            # Failed before its first row (a cluster that cannot be joined, a model no actor can
            # open): nothing of it stays behind, as nothing of a local run that fails so early.
            record, new_folder = self._fresh
            with contextlib.suppress(OSError):
                os.remove(record)
                if new_folder:
                    os.rmdir(self._output)

    def _wrote_anything(self) -> bool:
        if os.path.exists(self._errors_path):
            return True
        return bool(_parts(self._output)) if self.fmt == "parquet" else os.path.exists(self._output)

    def skip(self, path, stage, message, summary):
        summary.skipped[stage] = summary.skipped.get(stage, 0) + 1
        self.errors.write(path, stage, message)

    def write_block(self, block, summary):
        names = [os.fsdecode(p) for p in block["path"]]
        stage, message = block["stage"], block["message"]
        classified = stage == ""
        for i in np.flatnonzero(~classified | (message != "")):  # skips and notes in path order, as local classify
            if classified[i]:
                summary.noted += 1
                self.errors.write(names[i], "note", message[i])
            else:
                self.skip(names[i], stage[i], message[i], summary)
        rows = np.flatnonzero(classified)
        if len(rows):
            self.writer.write_batch([names[i] for i in rows], block["indices"][rows], block["scores"][rows])
            summary.classified += len(rows)
            summary.providers.update(block["provider"][rows])
            summary.nodes.update(block["node"][rows])

    def close(self):
        try:
            self.writer.close()
        finally:
            self.errors.close()


def parquet_name(path: str) -> str:
    """A path as the Parquet `path` column holds it: Arrow strings are UTF-8, so the bytes of a
    name that is not are written as \\x escapes (and compared in that form on --resume)."""
    return escaped_name(path)


def _parts(folder) -> list:
    try:
        return sorted(n for n in os.listdir(folder) if n.startswith(PART_PREFIX) and n.endswith(".parquet"))
    except OSError:
        return []


class _ParquetParts:
    """Predictions as FOLDER/part-NNNNN.parquet with local classify's CSV columns (path, label,
    score, label_i, score_i; scores rounded to 6 places like CSV and JSONL) and `path_bytes`,
    the name's exact bytes: `path` is an Arrow string (parquet_name), in which a name that is
    not UTF-8 cannot be told from one spelt with a literal \\xNN. Each part is written to a
    hidden temp file and renamed, so every part on disk is complete."""

    FLUSH_SECONDS = 60.0  # a part at least this often, so a killed run loses at most a minute of rows

    def __init__(self, folder, class_names, topk, rows_per_part):
        self.folder, self.class_names, self.topk, self.rows_per_part = folder, class_names, topk, rows_per_part
        self.columns = csv_header(topk) + ["path_bytes"]
        self.last_flush = time.monotonic()
        self.pending = []  # (path, indices, scores) not yet in a part
        self.rows = 0
        self.next_part = 0
        try:
            os.makedirs(folder, exist_ok=True)
        except OSError as e:
            raise WriteError(os_error_line(e, folder)) from None
        remove_stale_temps(folder, (TEMP_PREFIX,))  # parts a killed run was writing

    def read_done(self, labels: set | None = None, sample: list | None = None) -> tuple[set, set]:
        """(the names already in the parts, exactly; the escaped `path` names of parts an older
        cnnx wrote, without path_bytes). `labels`, when given, gets every label of their rows;
        `sample` the (path, label, score) of the first SAMPLE_ROWS (output.read_done's)."""
        import pyarrow.parquet as pq

        done, escaped = set(), set()
        for name in _parts(self.folder):
            try:
                table = pq.read_table(os.path.join(self.folder, name))
            except (OSError, ValueError) as e:
                raise ResumeError(f"{self.folder}/{name}: not readable as Parquet: {first_line(e)}") from None
            if table.column_names == self.columns:
                names = list(map(os.fsdecode, table.column("path_bytes").to_pylist()))
                done.update(names)
                if sample is not None and len(sample) < SAMPLE_ROWS:
                    sample += list(zip(names, table.column("label").to_pylist(),
                                       table.column("score").to_pylist()))[:SAMPLE_ROWS - len(sample)]
            elif table.column_names == self.columns[:-1]:
                escaped.update(table.column("path").to_pylist())
            else:
                raise ResumeError(f"{self.folder}/{name}: columns are {','.join(table.column_names)!r}, this run "
                                  f"writes {','.join(self.columns)!r} (resume with the same --topk)")
            if labels is not None:
                for column in table.column_names:
                    if column == "label" or column.startswith("label_"):
                        labels.update(table.column(column).to_pylist())
            self.next_part = max(self.next_part, int(name[len(PART_PREFIX):].split(".")[0]) + 1)
        return done, escaped

    def write_batch(self, paths, indices, scores):
        self.pending.extend(zip(paths, indices, scores))
        if len(self.pending) >= self.rows_per_part or time.monotonic() - self.last_flush > self.FLUSH_SECONDS:
            self._flush()

    def _flush(self):
        if not self.pending:
            return
        import pyarrow as pa
        import pyarrow.parquet as pq

        names = self.class_names
        cols = {"path": [parquet_name(p) for p, _, _ in self.pending],
                "path_bytes": pa.array([os.fsencode(p) for p, _, _ in self.pending], pa.binary())}
        for j in range(self.topk):
            suffix = "" if j == 0 else f"_{j + 1}"
            cols["label" + suffix] = [names[idx[j]] for _, idx, _ in self.pending]
            cols["score" + suffix] = [round(float(sc[j]), 6) for _, _, sc in self.pending]
        table = pa.table({c: cols[c] for c in self.columns})
        target = os.path.join(self.folder, f"{PART_PREFIX}{self.next_part:05d}.parquet")
        try:
            with atomic_file(target, "wb") as f:
                pq.write_table(table, f)
        except OSError as e:  # a full disk: one line, as local classify's writers say it
            raise WriteError(os_error_line(e, target)) from None
        self.next_part += 1
        self.rows += len(self.pending)
        self.pending = []
        self.last_flush = time.monotonic()

    def close(self):
        self._flush()
