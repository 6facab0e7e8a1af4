"""`cnnx classify`: batch-classify image files and folders through onnxruntime.

Thin on purpose: options are checked here, the work is cnnx.runtime.api.Classifier, rows
are written by cnnx.runtime.output. Imports stay inside the functions so `cnnx --help`
stays cheap; nothing here (or anywhere under cnnx/runtime/) imports torch.
"""

from __future__ import annotations

import contextlib
import os
import signal
import stat
import sys
import threading
import time
from dataclasses import dataclass, field

import click

from cnnx.cli import INTERRUPTED_LINE, ExitNow
from cnnx.runtime.contract import INFERENCE_DEVICES
from cnnx.runtime.files import ends_as_terminated, interruption, remove_stale_temps_beside, shown
from cnnx.runtime.output import (already_exists, default_errors_path, names_parquet_folder, nothing_could_be_read,
                                 rows_not_found_note)
from cnnx.runtime.workers import DECODE_MODES, PROCESS_DECODE_MAX_SIDE, PROCESS_DECODE_MIN_FILES


class _Progress:
    """A one-line counter on stderr (the total is unknown while discovery streams): redrawn
    in place on a terminal, a plain line every 10 s otherwise."""

    def __init__(self):
        self.tty = sys.stderr.isatty()
        self.every = 0.25 if self.tty else 10.0
        self.start = self.last = time.perf_counter()

    def update(self, done: int, skipped: int, force: bool = False):
        now = time.perf_counter()
        if not force and now - self.last < self.every:
            return
        self.last = now
        rate = done / max(now - self.start, 1e-9)
        line = f"classified {done:,}  skipped {skipped:,}  {rate:,.0f} images/s"
        sys.stderr.write(("\r" + line + "\x1b[K") if self.tty else line + "\n")
        sys.stderr.flush()

    def close(self):
        if self.tty:
            sys.stderr.write("\r\x1b[K")
            sys.stderr.flush()


@dataclass
class _Tally:
    """What the summary line says."""

    classified: int = 0
    noted: int = 0
    skipped: dict = field(default_factory=dict)  # stage -> count
    first_batch_s: float | None = None

    @property
    def n_skipped(self) -> int:
        return sum(self.skipped.values())


@click.command()
@click.argument("paths", nargs=-1, type=click.Path(readable=False, path_type=str), metavar="PATH...")
@click.option("--model", "model_path", type=click.Path(dir_okay=False, path_type=str),
              help="Exported .onnx model. Default: the newest one under runs/.")
@click.option("--output", "-o", default="-", show_default=True, type=click.Path(allow_dash=True),
              help="Predictions file, or - for stdout. An existing file is only continued with --resume. "
                   "--engine ray: a folder (ending in / or .parquet) gets Parquet part files.")
@click.option("--format", "fmt", type=click.Choice(["csv", "jsonl"]),
              help="Output rows as CSV (path,label,score,top-k) or one JSON object per line. Default: jsonl for "
                   "an --output named *.jsonl or *.ndjson, else csv (an --output named *.json needs it: neither is one JSON "
                   "document).")
@click.option("--topk", type=click.IntRange(1), default=5, show_default=True,
              help="Labels and scores per image (capped at the number of classes).")
@click.option("--batch-size", type=click.IntRange(1, 65536), default=256, show_default=True,
              help="Images per batch, one onnxruntime call each (its decoded images), except in decode "
                   "processes (--decode), which run their batches in slices of 64; on a GPU every call has "
                   "this shape (the last padded). "
                   "Reduced, with a note, when the images would exceed 256 MiB a batch. 256 is the measured "
                   "choice on the CPU (results/bench_classify_batch64.json against bench_classify.json) and on "
                   "an H100 (benchmarks/gpu_classify.py's sweep).")
@click.option("--workers", type=click.IntRange(0, 256), default=0, show_default=True,
              help="Decode workers (threads or processes, see --decode); 0 = one per CPU core.")
@click.option("--decode", "decode", type=click.Choice(DECODE_MODES), default="auto",
              show_default=True,
              help="How the CPU decoder runs: processes (a small JPEG's decode is mostly Python, which threads "
                   "cannot run in parallel), threads (large photos: libjpeg-turbo and Pillow release the GIL); "
                   f"auto: processes for models of up to {PROCESS_DECODE_MAX_SIDE} px on more than "
                   f"{PROCESS_DECODE_MIN_FILES:,} files, else threads (starting processes costs more than "
                   "they save on fewer).")
@click.option("--device", type=click.Choice(INFERENCE_DEVICES), default="auto", show_default=True,
              help="auto: CUDA when onnxruntime's CUDA provider loads, else CPU. cuda: CUDA or a one-line "
                   "error naming the cause. tensorrt: onnxruntime's TensorRT provider (TensorRT 10; engines "
                   "cached under $CNNX_CACHE/trt) or an error.")
@click.option("--decoder", type=click.Choice(["cpu", "gpu", "auto"]), default="cpu", show_default=True,
              help="cpu: libjpeg-turbo/Pillow in --workers threads. gpu: JPEGs decoded by nvImageCodec and resized "
                   "on the GPU (pip install 'cnnx[gpu-decode]'), every file it does not take (progressive, CMYK, "
                   "corrupt, not JPEG) by the CPU; or a one-line error naming why it cannot run. auto: where gpu "
                   f"runs and the model's input is over {PROCESS_DECODE_MAX_SIDE} px a side (smaller images "
                   "decode faster on the CPU), the GPU and --workers CPU threads share each batch, from its two "
                   "ends; else cpu.")
@click.option("--errors", "errors_path", type=click.Path(dir_okay=False),
              help="CSV of files not classified (path,stage,error), or - for stdout. Default: OUTPUT with its "
                   "extension replaced by .errors.csv (p.csv: p.errors.csv), or warnings on stderr when OUTPUT is stdout.")
@click.option("--resume", is_flag=True, help="Continue OUTPUT: skip paths already in it (or in the errors file).")
@click.option("--strict", is_flag=True, help="Exit 1 when any file was skipped.")
@click.option("--follow-symlinks", is_flag=True, help="Follow symlinks inside folders (cycles are still refused).")
@click.option("--report", "report_path", type=click.Path(dir_okay=False),
              help="Also write one self-contained HTML page of the results (everything in OUTPUT, "
                   "--resume'd runs included). Needs --output FILE; the local engine only.")
@click.option("--engine", type=click.Choice(["local", "ray"]), default="local", show_default=True,
              help="local: this machine (decode threads or processes, see --decode). ray: Ray Data actors, one "
                   "session each, on this machine or the cluster at --address (pip install 'cnnx[ray]').")
@click.option("--address", help="--engine ray: join the Ray cluster at HOST:PORT (`ray start --head` prints it; "
                                "'auto': the one started on this machine). Default: $RAY_ADDRESS, else a private "
                                "Ray on this machine.")
@click.option("--num-workers", type=click.IntRange(1, 100_000),
              help="--engine ray: actors, one onnxruntime session each. Default: the cluster's CPUs (or its GPUs / "
                   "--num-gpus-per-worker).")
@click.option("--num-gpus-per-worker", type=click.FloatRange(0, 64), default=0, show_default=True,
              help="--engine ray: GPUs per actor (1, or 0.5 for two actors a GPU); decoding then runs in a "
                   "separate CPU stage.")
@click.option("--manifest", type=click.Path(exists=True, dir_okay=False),
              help="--engine ray: a file of image paths or s3:// gs:// URIs, one a line (classified in its order; blank "
                   "lines skipped, no comments; relative paths from the current folder).")
def classify(paths, model_path, output, fmt, topk, batch_size, workers, decode, device, decoder, errors_path, resume,
             strict, follow_symlinks, report_path, engine, address, num_workers, num_gpus_per_worker, manifest):
    """Batch-classify image files and folders (recursively) through onnxruntime.

    Rows come out in sorted path order, flushed as each batch finishes: CSV
    (path,label,score, then label_i,score_i up to --topk) or JSONL. Files that cannot be
    classified go to the errors file and the summary; exit 0 when the run finished
    (skips are warnings), 1 on a fatal error or, with --strict, on any skip.
    """
    t0 = time.perf_counter()
    _no_blas_threads()
    output = "-" if _is_stdout(output, resume) else output
    fmt_given, fmt = fmt, _rows_format(output, fmt, resume)
    if engine == "ray":
        # the local engine's decoding, at values other than those Ray's actors run with
        local_only = [f"--{name} {value}" for name, value, ray_s in (("workers", workers, 0), ("decode", decode, "auto"),
                                                                     ("decoder", decoder, "cpu")) if value != ray_s]
        if local_only:
            raise click.UsageError(f"{', '.join(local_only)}: only with --engine local")
        if names_parquet_folder(output) and fmt_given is not None:
            raise click.UsageError(f"--format {fmt}: --output {output} names a folder of Parquet part files "
                                   f"(a file's name gets --format's rows)")
        _classify_on_ray(paths, model_path, output, fmt, topk, batch_size, device, errors_path, resume, strict,
                         follow_symlinks, report_path, address, num_workers, num_gpus_per_worker, manifest)
        return
    _check_local_usage(paths, output, address, num_workers, num_gpus_per_worker, manifest)
    if errors_path is None:
        errors_path = _default_errors_path(output, resume)
    _check_usage(paths, output, errors_path, resume, report_path, model_path)
    remove_stale_temps_beside(output, errors_path, report_path)
    decode = _small_job_threads(paths, decode)
    _warm_up(model_path, decoder, decode, workers)
    with _ends_when_interrupted() as interrupts, _one_line_errors(), _one_writer(output, errors_path):
        _check_not_there(output, errors_path, resume)
        classifier = _open_classifier(model_path, device, batch_size=batch_size, workers=workers, topk=topk,
                                      decoder=decoder, decode=decode)
        done, noted = _read_done(output, errors_path, fmt, classifier) if resume else (set(), set())
        _record_the_run(output, classifier, resume)
        rows = classifier.classify(paths, follow_symlinks=follow_symlinks, done=done)
        tally = _write_rows(rows, output, fmt, errors_path, classifier, append=resume, t0=t0, interrupts=interrupts,
                            noted=noted)
    if rows.found == 0:
        what = "files" if rows.ignored == 0 else f"image files ({rows.ignored} other files ignored)"
        raise click.ClickException(f"no {what} found under {', '.join(paths)}")
    _print_summary(tally, rows, classifier, errors_path, time.perf_counter() - t0)
    note = rows_not_found_note(rows.done_not_found, output, paths)
    if note is not None:
        click.echo(f"note: {note}", err=True)
    unread = nothing_could_be_read(tally.classified, tally.skipped, paths, already_done=rows.already_done)
    if unread is not None:
        raise click.ClickException(unread)
    if report_path is not None:
        _write_report(report_path, output, fmt, errors_path, classifier.info)
    if strict and tally.n_skipped:
        raise click.ClickException(f"--strict: {tally.n_skipped} file(s) skipped")
    return ExitNow(0)


INTERRUPT_GRACE_S = 20.0  # after Ctrl-C: time for the run's own cleanup before the process is ended


class Interrupts:
    """What Ctrl-C does to a run (_ends_when_interrupted). While rows stream (`deferred()`), the
    first Ctrl-C only asks the row loop to stop after the batch in hand (`stop_if_asked`), where
    its thread holds no lock: a KeyboardInterrupt raised at whatever instruction the signal
    lands on can leave one taken. threading.Condition.__enter__ is Python code, and a signal
    handled just after it acquired its lock raises before the `with` owns the lock; the pool
    thread that then finishes the Future waits for that lock forever, and the exit waits for
    the thread. (A CI run hung after Ctrl-C; a loop of Future.result() calls hit by SIGINT does
    it too, now and then, py-spy showing the pool thread in Condition.__enter__.) A second
    Ctrl-C, or one outside the rows, raises at once."""

    def __init__(self):
        self.deferring = False
        self.asked = False

    @contextlib.contextmanager
    def deferred(self):
        self.deferring = True
        try:
            yield
        finally:
            self.deferring = False

    def stop_if_asked(self):
        """Raise KeyboardInterrupt (Terminated for SIGTERM) if a signal came while deferred."""
        if self.asked:
            self.deferring = False  # the cleanup starts: another Ctrl-C raises at once
            raise interruption(self.asked)


@contextlib.contextmanager
def _ends_when_interrupted():
    """Ctrl-C ends the run as Python's own handler does, with KeyboardInterrupt (the run then
    flushes its rows, releases the output lock and exits 130), at once or, while rows stream,
    after the batch in hand (Interrupts); and it arms a timer: should a thread the exit must
    join never return, the process still ends, with exit 130, INTERRUPT_GRACE_S later. SIGTERM
    does the same (Terminated, exit 143). Yields the run's Interrupts. Nothing changes for a
    signal ignored or handled by someone else (SIGINT not Python's default_int_handler, SIGTERM
    not the default), or off the main thread (nothing then asks the Interrupts to stop)."""
    interrupts = Interrupts()
    if threading.current_thread() is not threading.main_thread():
        yield interrupts
        return

    def interrupted(signum, _frame):
        if not interrupts.asked:
            timer = threading.Timer(INTERRUPT_GRACE_S, _exit_interrupted, (signum,))
            timer.daemon = True
            timer.start()
        if interrupts.deferring and not interrupts.asked:
            interrupts.asked = signum
            return
        interrupts.asked = signum
        raise interruption(signum)

    ours = {signal.SIGINT: signal.default_int_handler, signal.SIGTERM: signal.SIG_DFL}
    taken = [signum for signum, default in ours.items() if signal.getsignal(signum) is default]
    for signum in taken:
        signal.signal(signum, interrupted)
    try:
        yield interrupts
    finally:
        for signum in taken:
            signal.signal(signum, ours[signum])


def _exit_interrupted(signum: int):
    with contextlib.suppress(OSError):
        os.write(2, b"%s (the cleanup did not finish in time)\n" % INTERRUPTED_LINE[signum].encode())
    os._exit(128 + signum)


def _no_blas_threads():
    """numpy's OpenBLAS starts a thread per core at import and they spin a while: CPU taken
    from decoding on a small machine, in this process and in the decode processes' server,
    for a runtime that does no BLAS. Set before numpy is first imported (the server inherits
    it); a value the user set is kept."""
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")


def _default_errors_path(output, resume: bool):
    from cnnx.runtime.output import ResumeError

    try:
        return default_errors_path(output, resume)
    except ResumeError as e:
        raise click.UsageError(f"cannot resume: {e}") from None


JSONL_SUFFIXES = (".jsonl", ".ndjson")


def _rows_format(output: str, fmt: str | None, resume: bool) -> str:
    """--format, else the one --output's extension names (jsonl for JSONL_SUFFIXES), else csv
    (but *.json, a name for one JSON document, is a usage error: neither is one). A --format
    the extension contradicts is a usage error: CSV rows in preds.jsonl fail every
    JSON reader (they were written so, silently). --resume of an existing file: the rows it
    holds decide, where --format is not given (an older cnnx wrote CSV into preds.jsonl), and a
    --format given is theirs to say."""
    suffix = "" if output == "-" else os.path.splitext(output.rstrip("/"))[1].lower()
    named = "jsonl" if suffix in JSONL_SUFFIXES else "csv" if suffix == ".csv" else None
    if resume and output != "-":
        if fmt is not None:
            return fmt
        first = b""
        with contextlib.suppress(OSError):
            if stat.S_ISREG(os.stat(output).st_mode):  # a FIFO's open waits for a writer (refused later, in one line)
                with open(output, "rb") as f:
                    first = f.read(1)
        if first in (b"{", b'"'):  # a JSONL row, or the CSV header's quoted "path"
            return "jsonl" if first == b"{" else "csv"
    if fmt is None:
        if suffix == ".json" and not names_parquet_folder(output):  # CSV rows there failed every JSON reader
            raise click.UsageError(f"--output {output}: cnnx writes CSV or JSON Lines (a JSON object a line), not one "
                                   "JSON document: name it *.csv or *.jsonl, or give --format")
        return named or "csv"
    if named is not None and named != fmt:
        raise click.UsageError(f"--format {fmt}: --output {output} is named as a {named.upper()} file (name it *.{fmt}, "
                               f"or leave --format out)")
    return fmt


def _check_local_usage(paths, output, address, num_workers, num_gpus_per_worker, manifest):
    from cnnx.runtime.discover import is_uri

    ray_only = [name for name, value in (("--address", address), ("--num-workers", num_workers),
                                         ("--num-gpus-per-worker", num_gpus_per_worker), ("--manifest", manifest))
                if value]
    if ray_only:
        raise click.UsageError(f"{', '.join(ray_only)}: only with --engine ray")
    if not paths:
        raise click.UsageError("give at least one PATH")
    if any(is_uri(p) for p in paths):
        raise click.UsageError("s3:// gs:// file:// paths need --engine ray")
    if names_parquet_folder(output):
        what = "is a folder" if os.path.isdir(output) else "names a folder of Parquet part files"
        raise click.UsageError(f"--output {output} {what}: give a file (Parquet folders need --engine ray)")


@ends_as_terminated
def _classify_on_ray(paths, model_path, output, fmt, topk, batch_size, device, errors_path, resume, strict,
                     follow_symlinks, report_path, address, num_workers, num_gpus_per_worker, manifest):
    """--engine ray: cnnx.runtime.ray_engine does the work, with its own output lock and checks."""
    from cnnx.runtime.model import find_newest_model
    from cnnx.runtime.discover import is_uri
    from cnnx.runtime.ray_engine import RayEngineError, RayUsageError, classify_with_ray

    if not paths and manifest is None:
        raise click.UsageError("give at least one PATH or --manifest FILE")
    if num_gpus_per_worker != num_gpus_per_worker:  # NaN passes click's FloatRange
        raise click.BadParameter("must be a number from 0 to 64, got nan", param_hint="--num-gpus-per-worker")
    if report_path is not None:
        raise click.UsageError("--report is not available with --engine ray")
    if resume and output == "-":
        raise click.UsageError("--resume needs --output FILE (it reads back what that file already holds)")
    if errors_path is None:
        errors_path = _default_errors_path(output, resume)
    _check_files(output, errors_path, None, model_path)
    for path in paths:
        if not is_uri(path) and not os.path.lexists(path):
            raise click.BadParameter(f"{shown(path)} does not exist", param_hint="PATH...")
    progress = _Progress()
    try:
        with _one_line_errors():
            if model_path is None:
                model_path = str(find_newest_model("runs"))
                click.echo(f"model: {model_path} (newest under runs/)", err=True)
            summary = classify_with_ray(paths, model_path, output=output, fmt=fmt, errors=errors_path, resume=resume,
                                        manifest=manifest, address=address, num_workers=num_workers,
                                        num_gpus_per_worker=num_gpus_per_worker, batch_size=batch_size, topk=topk,
                                        follow_symlinks=follow_symlinks, device=device, on_progress=progress.update)
    except RayUsageError as e:
        raise click.UsageError(str(e)) from None
    except RayEngineError as e:
        raise click.ClickException(str(e)) from None
    finally:
        progress.close()
    for line in summary.warnings:
        click.echo(f"warning: {line}", err=True)
    click.echo(summary.line(), err=True)
    for line in summary.notes:  # after the summary, as the local engine's
        click.echo(f"note: {line}", err=True)
    unread = nothing_could_be_read(summary.classified, summary.skipped, [*paths, *([manifest] if manifest else [])],
                                   already_done=summary.resumed)
    if unread is not None:
        raise click.ClickException(unread)
    n_skipped = sum(summary.skipped.values())
    if strict and n_skipped:
        raise click.ClickException(f"--strict: {n_skipped} file(s) skipped")


def _check_usage(paths, output, errors_path, resume, report_path, model_path):
    if resume and output == "-":
        raise click.UsageError("--resume needs --output FILE (it reads back what that file already holds)")
    if report_path is not None and output == "-":
        raise click.UsageError("--report needs --output FILE (the page is made from what that file holds)")
    _check_files(output, errors_path, report_path, model_path)
    for path in paths:
        # A path that is not there is a typo; one that cannot be stat'ed or read (permissions)
        # gets its errors row like any other unreadable file, and the rest still run.
        if not os.path.lexists(path):
            raise click.BadParameter(f"{shown(path)} does not exist", param_hint="PATH...")


def _is_stdout(output: str, resume: bool) -> bool:
    """Whether --output names this process's stdout (/dev/stdout, /dev/fd/1), to be written as
    `-` is: as a file it resolves to a pipe's /proc name, which is no path, or to the file the
    shell just created for the redirect, which then "already exists". Not with --resume into a
    file (`-o /dev/stdout --resume >> pred.csv`): that reads the file back, as a path."""
    if output == "-":
        return True
    try:
        st, out = os.stat(output), os.fstat(1)
    except OSError:
        return False
    return (st.st_dev, st.st_ino) == (out.st_dev, out.st_ino) and not (resume and stat.S_ISREG(out.st_mode))


def _check_files(output, errors_path, report_path, model_path):
    """What both engines check of the files they will write, before the run: no two the same
    file (symlinks resolved: a report through a link to the output replaced the predictions)
    or the model, stdout once at most (two CSVs on one stream are not one CSV), each in a
    folder that is there (the errors file is first written at the first skip, the report after
    the run: a typo must not cost the run), and a --report that replaces only a page cnnx wrote."""
    files = [("--output", output), ("--errors", errors_path), ("--report", report_path), ("--model", model_path)]
    for label, p in files:
        if p == "":
            raise click.UsageError(f"{label} needs a file name")
    named = [(label, p, p if p == "-" else os.path.realpath(p.rstrip("/" + os.sep) or p))
             for label, p in files if p is not None]
    for i, (label, given, path) in enumerate(named):
        for other, _other_given, other_path in named[i + 1:]:
            if path == other_path:
                raise click.UsageError(f"{label} and {other} must be different files")
        if label != "--model" and path != "-" and not os.path.isdir(os.path.dirname(path)):
            raise click.UsageError(f"{label} {given}: no folder {os.path.dirname(path)} to write it in")
        if label in ("--output", "--errors") and path != "-" and os.path.exists(given) and not (
                os.path.isfile(given) or os.path.isdir(given)):  # a Parquet output is a folder
            # /dev/null, a FIFO: a --resume would read it for ever, a lock would go beside it in /dev.
            # The given name, stat following its links: realpath turns /dev/stderr on a pipe into
            # /proc/PID/fd/pipe:[N], a name that is not there
            raise click.UsageError(f"{label} {given} exists and is not a regular file: name a file, or - for stdout")
        if label in ("--output", "--errors") and path != "-" and os.path.islink(given) and not os.path.exists(given):
            # the open (O_EXCL) then said "File exists", after the run record was written beside its target
            raise click.UsageError(f"{label} {given} is a symlink to {os.readlink(given)}, which is not there: name a "
                                   f"file, or create the link's target")
    if report_path is not None:
        from cnnx.report import report_replaceable  # the report's imports only where one is asked for

        why = report_replaceable(report_path)
        if why is not None:
            raise click.UsageError(f"--report {report_path} {why}: remove it or name another file")


def _check_not_there(output, errors_path, resume):
    """Checked while holding the output's lock, so a run that just finished is seen."""
    for label, target in (("--output", output), ("--errors", errors_path)):
        if target not in (None, "-") and os.path.exists(target) and not resume:
            raise click.UsageError(already_exists(label, target, output))


@contextlib.contextmanager
def _one_line_errors():
    """The runtime's failures as one line (exit 1); a closed stdout (`| head`) ends quietly."""
    from cnnx.runtime.gpudecode import DecoderUnavailable
    from cnnx.runtime.model import ModelError
    from cnnx.runtime.output import WriteError

    try:
        yield
    except (ModelError, DecoderUnavailable) as e:
        raise click.ClickException(str(e)) from None
    except WriteError as e:
        raise click.ClickException(f"cannot write: {e}") from None
    except BrokenPipeError:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        sys.exit(1)


@contextlib.contextmanager
def _one_writer(output, errors_path):
    """Hold the output's and the errors file's locks for the whole run (held_for_writing)."""
    from cnnx.runtime.output import OutputBusy, held_for_writing

    try:
        with held_for_writing(output, errors_path):
            yield
    except OutputBusy as e:
        raise click.ClickException(str(e)) from None


def _small_job_threads(paths, decode: str) -> str:
    """decode "auto" -> "threads" for paths that plainly hold at most PROCESS_DECODE_MIN_FILES
    files (a few files, a small tree of them), which the Classifier would decode in threads
    anyway (it counts the files as discovery finds them): then neither the decode processes' server
    nor its imports start ahead, for nothing (benchmarks/results/small_jobs.json)."""
    from cnnx.runtime.discover import holds_at_most

    if decode == "auto" and holds_at_most(paths, PROCESS_DECODE_MIN_FILES):
        return "threads"
    return decode


def _warm_up(model_path, decoder, decode, workers):
    """Start the decode processes' server now if they will run (model_path None: not known
    yet): its imports (numpy, Pillow, onnxruntime) then run on another core while this process
    does its own, which come next, and the first batch starts sooner (bench_classify.json,
    "first_batch_latency_s")."""
    if model_path is not None and decoder == "cpu":
        from cnnx.runtime.workers import warm_up_for

        warm_up_for(model_path, decode=decode, workers=workers)


def _open_classifier(model_path, device, **options):
    from cnnx.runtime.model import find_newest_model

    if model_path is None:
        model_path = str(find_newest_model("runs"))
        click.echo(f"model: {model_path} (newest under runs/)", err=True)
        _warm_up(model_path, options["decoder"], options["decode"], options["workers"])
    from cnnx.runtime.api import Classifier
    from cnnx.runtime.pipeline import MAX_BATCH_BYTES

    classifier = Classifier(model_path, device, **options)
    if classifier.batch_size < classifier.requested_batch_size:
        h, w = classifier.info.spec["size"]
        click.echo(f"note: --batch-size {classifier.requested_batch_size} reduced to {classifier.batch_size}: "
                   f"images of 3x{h}x{w} would exceed {MAX_BATCH_BYTES >> 20} MiB a batch", err=True)
    return classifier


def _read_done(output, errors_path, fmt, classifier) -> tuple[set, set]:
    """(paths already in OUTPUT and in the errors file, paths the errors file has a note on)
    for --resume, once its run record (output.check_resume) says this run may append to it."""
    from cnnx.runtime.files import os_error_line
    from cnnx.runtime.api import classified_again
    from cnnx.runtime.output import ResumeError, check_resume, check_unrecorded_output, read_done, read_run_record

    done, n, noted, labels, sample = set(), None, set(), set(), []
    try:
        record = read_run_record(output) if os.path.exists(output) else None
        check_resume(output, record, classifier.info.identity(), ())  # the model, before the columns
        if os.path.exists(output):
            unrecorded = record is None
            done, n = read_done(output, fmt, classifier.topk, labels=labels if unrecorded else None,
                                sample=sample if unrecorded else None)
            if unrecorded:
                warning = check_unrecorded_output(output, labels, sample, classifier.info,
                                                  lambda rows: classified_again(classifier, rows))
                click.echo(f"warning: {warning}", err=True)
        failed = set()
        if errors_path is not None and os.path.exists(errors_path):
            failed = read_done(errors_path, "errors", None, notes=noted)[0] - done
            done |= failed
        check_resume(output, record, classifier.info.identity(), done)
        if n is not None:  # the summary's "already done" counts both
            also = (f" and {len(failed):,} skipped file(s) in {errors_path} (not tried again: remove a file's row "
                    "there to retry it)") if failed else ""
            click.echo(f"resume: {n:,} images already in {output}{also}", err=True)
    except ResumeError as e:
        raise click.ClickException(f"cannot resume: {e}") from None
    except OSError as e:
        raise click.ClickException(f"cannot resume: {os_error_line(e)}") from None
    return done, noted


def _record_the_run(output, classifier, resume: bool):
    """A run that starts OUTPUT records, beside it, what a --resume must match
    (output.write_run_record); a resumed output keeps the record it has, and one without a
    record (an older cnnx's) gets this run's."""
    from cnnx.runtime.files import os_error_line
    from cnnx.runtime.output import run_record_path, write_run_record

    if output == "-" or (resume and os.path.exists(output) and os.path.exists(run_record_path(output))):
        return
    try:
        write_run_record(output, classifier.info.identity(), classifier.info.path)
    except OSError as e:
        raise click.ClickException(f"cannot write: {os_error_line(e)}") from None


def _write_rows(rows, output, fmt, errors_path, classifier, *, append: bool, t0: float,
                interrupts: Interrupts | None = None, noted=frozenset()) -> _Tally:
    """Stream the rows into the predictions and errors files, one flush per batch (a Ctrl-C
    deferred by `interrupts` stops the loop once a batch is written)."""
    from cnnx.runtime.api import Skipped
    from cnnx.runtime.output import ErrorsWriter, PredictionWriter

    interrupts = interrupts or Interrupts()
    writer = PredictionWriter(output, fmt, classifier.info.class_names, classifier.topk, append=append)
    errors = ErrorsWriter(errors_path, append=append, noted=noted)
    tally, progress = _Tally(), _Progress()
    try:
        with interrupts.deferred():
            for result in rows.results():
                for row in result.others():
                    if isinstance(row, Skipped):
                        tally.skipped[row.stage] = tally.skipped.get(row.stage, 0) + 1
                        errors.write(row.path, row.stage, row.error)
                    else:  # a Note on an image that was classified
                        tally.noted += 1
                        errors.write(row.path, "note", row.note)
                if result.paths:
                    writer.write_batch(result.paths, result.indices, result.scores)
                tally.classified += len(result.paths)
                if result.paths and tally.first_batch_s is None:
                    tally.first_batch_s = time.perf_counter() - t0
                progress.update(tally.classified, tally.n_skipped)
                interrupts.stop_if_asked()
            interrupts.stop_if_asked()  # pressed while the pipeline wound down
    finally:
        rows.close()
        progress.close()
        try:
            writer.close()
        finally:
            errors.close()
    return tally


def _print_summary(tally: _Tally, rows, classifier, errors_path, wall: float):
    from cnnx.runtime.output import summary_counts

    parts = summary_counts(tally.classified, tally.skipped, already_done=rows.already_done, noted=tally.noted,
                           ignored=rows.ignored)
    parts += [f"provider {classifier.provider}"]
    if classifier.gpu_decoder is not None:
        parts.append(classifier.gpu_decoder.summary())
    parts += [f"{wall:.2f} s", f"{tally.classified / wall:,.0f} images/s"]
    if tally.first_batch_s is not None:
        parts.append(f"first batch after {tally.first_batch_s:.2f} s")
    click.echo("; ".join(parts), err=True)
    if tally.n_skipped and errors_path is not None:
        click.echo(f"skipped files are listed in {'stdout' if errors_path == '-' else shown(errors_path)}", err=True)


def _write_report(report_path, output, fmt, errors_path, info):
    from cnnx.report import ReportError, write_classify_report
    from cnnx.runtime.files import os_error_line

    try:  # a missing errors file means nothing was skipped; None would mean "no errors file given"
        write_classify_report(report_path, output=output, fmt=fmt, errors=errors_path,
                              class_names=list(info.class_names), spec=info.spec)
    except ReportError as e:
        raise click.ClickException(f"cannot write the report: {e}") from None
    except OSError as e:
        raise click.ClickException(f"cannot write the report: {os_error_line(e, report_path)}") from None
    click.echo(f"report: {report_path}", err=True)
