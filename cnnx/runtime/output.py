"""Writers for predictions (CSV / JSONL) and the errors file, reading them back for
--resume, and the lock that keeps one writer per output file.

CSV cells are all quoted; a cell starting with = + - @ (or tab, CR, or the escape quote
itself) gets a leading ' so spreadsheets do not run it as a formula, and reading it back
strips exactly that one character. Paths that are not valid UTF-8 are written as their
original bytes (surrogateescape), so what is written is the file's real name; JSONL is
pure ASCII (json escapes), and both read back to the same Python string.
"""

from __future__ import annotations

import contextlib
import csv
import functools
import io
import json
import os
import sys

from cnnx.runtime.files import (NAMES_ARE_UTF8, atomic_write, name_text, names_line, open_lock_file, os_error_line,
                                path_of_text, shown)

ERRORS_HEADER = ["path", "stage", "error"]
_FORMULA_START = frozenset(("=", "+", "-", "@", "\t", "\r", "'"))


class ResumeError(Exception):
    """An existing output that cannot be continued (other columns, not cnnx output)."""


class WriteError(Exception):
    """A results or errors file that cannot be written (full disk, I/O error); one line,
    e.g. 'No space left on device: pred.csv'. A closed stdout stays a BrokenPipeError."""


class OutputBusy(Exception):
    """Another process holds the output's lock (is writing the same file right now)."""


@contextlib.contextmanager
def _write_errors(target):
    try:
        yield
    except BrokenPipeError:
        raise
    except OSError as e:
        raise WriteError(os_error_line(e, target)) from None


class OutputLock:
    """One writer per output file: an exclusive flock on `.<name>.lock` beside the file (the
    real file when the output is a symlink), taken before the output is read or created and
    held until the run ends. The kernel drops a flock when its process dies, so a crashed
    holder never blocks the next run; the lock file itself is removed by the holder at the
    end (a run that opened it just before is told to retry by the inode check)."""

    def __init__(self, output):
        real = os.path.realpath(output)
        self.path = os.path.join(os.path.dirname(real), f".{os.path.basename(real)}.lock")
        self.fd = None

    def acquire(self):
        import fcntl

        while self.fd is None:
            fd = open_lock_file(self.path)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
                os.close(fd)
                raise OutputBusy(f"pid {holder}" if holder.isdigit() else "another process") from None
            except BaseException:
                os.close(fd)
                raise
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(self.path))
            except FileNotFoundError:
                same = False
            if not same:  # removed by the holder that just finished: lock the new one
                os.close(fd)
                continue
            with contextlib.suppress(OSError):  # the pid only names the holder in a message (a full disk)
                os.ftruncate(fd, 0)
                os.pwrite(fd, str(os.getpid()).encode(), 0)
            self.fd = fd
        return self

    def release(self):
        if self.fd is not None:
            with contextlib.suppress(OSError):
                os.unlink(self.path)  # while still holding it: nobody can lock a removed name
            os.close(self.fd)
            self.fd = None

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()


@contextlib.contextmanager
def held_for_writing(output, errors_path):
    """The OutputLock of a run's output and of its errors file (None and "-" are no files),
    held for the whole run: a second run on either stops before it writes anything, where a
    resume started twice appended duplicates, and `-o p.csv` beside `-o p` (one default errors
    file, p.errors.csv) ended one of them half-way. OutputBusy with the line to say; WriteError
    where a lock cannot be made."""
    with contextlib.ExitStack() as stack:
        for target in dict.fromkeys(t for t in (output, errors_path) if t not in (None, "-")):
            lock = OutputLock(target.rstrip("/" + os.sep))
            try:
                lock.acquire()
            except OutputBusy as e:
                if target == output:
                    raise OutputBusy(f"{target} is being written by another cnnx classify ({e}); wait for it to "
                                     "finish") from None
                raise OutputBusy(f"{target}, this run's errors file, is being written by another cnnx classify ({e}), "
                                 "perhaps as another output's: wait for it to finish, or name another --errors file") \
                    from None
            except OSError as e:
                raise WriteError(os_error_line(e, lock.path)) from None
            stack.callback(lock.release)
        yield


def escape_cell(value: str) -> str:
    return "'" + value if value[:1] in _FORMULA_START else value


def unescape_cell(value: str) -> str:
    return value[1:] if value[:1] == "'" and value[1:2] in _FORMULA_START else value


def _csv_text(value: str) -> str:
    """A cell's text between its quotes, as csv.writer's QUOTE_ALL writes it (escaped, quotes doubled)."""
    return escape_cell(value).replace('"', '""')


# A str as json.dumps writes it (quoted, ASCII-escaped: lone surrogates as \\udcXX), in C.
_json_text = json.encoder.encode_basestring_ascii


def _score_texts(scores, shortest: bool):
    """Scores in [0, 1] -> two object arrays of their shape whose strings, joined cell by cell,
    are "%.6f" % score (shortest False: CSV's cell) or repr(round(score, 6)) (shortest True:
    what json.dumps writes of the rounded score), made with no Python call a score. The score's
    micro-units m = rint(score x 1e6), which the product's rounding can tip only within 1e-9
    of a tie: there m comes from "%.6f" (it rounds the exact value, as round() does). The text
    is m's digits, read from tables; repr writes m / 1e6 at its shortest: trailing zeros
    dropped down to one, and below 1e-4 an exponent (5e-06, 1.2e-05)."""
    import numpy as np

    head, tail, tail_shortest, small = _score_tables()
    x = scores * 1e6
    m = np.rint(x).astype(np.int64)
    tie = np.abs(x - np.floor(x) - 0.5) < 1e-9
    if tie.any():
        m[tie] = [int(("%.6f" % v).replace(".", "")) for v in scores[tie].tolist()]
    whole, low = m // 1000, m % 1000
    if not shortest:
        return head[2 * whole], tail[low]
    first, second = head[2 * whole + (low == 0)], tail_shortest[low]
    tiny = (m > 0) & (m < 100)
    if tiny.any():
        first[tiny], second[tiny] = small[m[tiny]], ""
    return first, second


@functools.cache
def _score_tables():
    """_score_texts' tables: by 2 x (m // 1000) + (the last 3 digits are 0), "i.ddd" with the
    3 digits whole, or stripped of trailing zeros (down to one); by m % 1000, the last 3
    digits, whole or stripped of trailing zeros; by m < 100, repr(m / 1e6)."""
    import numpy as np

    head = np.empty(2 * 1001, dtype=object)
    for whole in range(1001):
        digits = "%03d" % (whole % 1000)
        head[2 * whole] = f"{whole // 1000}.{digits}"
        head[2 * whole + 1] = f"{whole // 1000}.{digits.rstrip('0') or '0'}"
    tail = np.array(["%03d" % low for low in range(1000)], dtype=object)
    tail_shortest = np.array([("%03d" % low).rstrip("0") for low in range(1000)], dtype=object)
    small = np.array([repr(m / 1e6) for m in range(100)], dtype=object)
    return head, tail, tail_shortest, small


def _unit_interval(scores) -> bool:
    """Every score in [0, 1] (no NaN, no -0.0, which "%.6f" and repr write with its sign)."""
    import numpy as np

    return bool(((scores >= 0) & (scores <= 1)).all()) and not np.signbit(scores).any()


def csv_header(topk: int) -> list:
    head = ["path", "label", "score"]
    for i in range(2, topk + 1):
        head += [f"label_{i}", f"score_{i}"]
    return head


def open_text(path, mode: str):
    """Text stream for a results/errors file, or stdout for '-'."""
    if path == "-":
        return io.TextIOWrapper(sys.stdout.buffer, encoding="utf-8", errors="surrogateescape", newline="",
                                write_through=True)
    return open(path, mode, encoding="utf-8", errors="surrogateescape", newline="")


def _csv_writer(stream):
    return csv.writer(stream, quoting=csv.QUOTE_ALL, lineterminator="\n")


class PredictionWriter:
    """Streams prediction rows; the file is opened at the first batch (an empty run leaves
    nothing behind) and flushed after every batch (a killed run keeps every finished one)."""

    def __init__(self, target, fmt: str, class_names, topk: int, *, append: bool = False):
        self.target, self.fmt, self.class_names, self.topk, self.append = target, fmt, class_names, topk, append
        import numpy as np

        # Quoted once, not once a row; an object array, so that a batch's top-k picks them at once.
        self._name_cells = np.array([f'"{_csv_text(name)}"' for name in class_names], dtype=object)
        self._name_json = np.array([_json_text(name) for name in class_names], dtype=object)
        self.stream = None
        self.rows = 0
        self._whole = None  # the file's size after its last whole batch (header included)

    def _open(self):
        existing = self.append and self.target != "-" and os.path.exists(self.target) and os.path.getsize(self.target)
        self.stream = open_text(self.target, "a" if self.append else "x" if self.target != "-" else "w")
        if self.fmt == "csv":
            self._csv = _csv_writer(self.stream)
            if not existing:
                self._csv.writerow(csv_header(self.topk))
        self.stream.flush()
        self._whole = _size_written(self.stream, self.target)

    def write_batch(self, paths, indices, scores):
        """One batch (flushed once at its end): paths, and per path its top-k class indices and
        scores, best first (sequences or arrays of len(paths) x topk). A batch that cannot be
        written whole (a full disk) is taken back: the file ends with the batch before it."""
        try:
            with _write_errors(self.target):
                self._write_batch(paths, indices, scores)
        except WriteError:  # a full disk: the file ends mid-row otherwise, which CSV readers choke on
            stream, self.stream = self.stream, None
            _cut_back(stream, self._whole)
            raise

    def _write_batch(self, paths, indices, scores):
        if self.stream is None:
            self._open()
        if len(paths):
            import numpy as np

            indices = np.asarray(indices).reshape(len(paths), -1)  # (n, k), however the caller held them
            scores = np.asarray(scores, dtype=np.float64).reshape(indices.shape)
            rows = self._csv_rows if self.fmt == "csv" else self._jsonl_rows
            if not NAMES_ARE_UTF8:  # a Latin-1 locale: no per-path call in the common case
                paths = [name_text(p) for p in paths]
            self.stream.write(rows(paths, indices, scores))
        self.stream.flush()
        self.rows += len(paths)
        self._whole = _size_written(self.stream, self.target)

    def _csv_rows(self, paths, indices, scores) -> str:
        """The batch's CSV rows as one string: the same bytes as csv.writer's QUOTE_ALL with the
        formula escape (tests/test_output.py compares them), made by one %-format of a row
        template repeated len(paths) times, so that no Python code runs per cell. indices and
        scores: (n, k) arrays."""
        import numpy as np

        n, k = indices.shape
        tables = _unit_interval(scores)  # else "%.6f" itself (scores that are not probabilities)
        cells = np.empty((n, 1 + (3 if tables else 2) * k), dtype=object)
        if '"' in "".join(paths) or not _FORMULA_START.isdisjoint({p[:1] for p in paths}):
            cells[:, 0] = [_csv_text(p) for p in paths]
        else:  # the common batch: no path to escape
            cells[:, 0] = paths
        if tables:
            cells[:, 1::3] = self._name_cells[indices]
            cells[:, 2::3], cells[:, 3::3] = _score_texts(scores, shortest=False)
            row = '"%s",' + ",".join(['%s,"%s%s"'] * k) + "\n"
        else:
            cells[:, 1::2] = self._name_cells[indices]
            cells[:, 2::2] = scores
            row = '"%s",' + ",".join(['%s,"%.6f"'] * k) + "\n"
        return (row * n) % tuple(cells.ravel().tolist())

    def _jsonl_rows(self, paths, indices, scores) -> str:
        """The batch's JSONL lines as one string: the bytes of json.dumps (ASCII, so a name that
        is not UTF-8 stays valid JSON) of {"path", "label", "score", "topk": [{"label",
        "score"}, ...]}, each score as round(score, 6) (tests/test_output.py compares them).
        Made as _csv_rows makes its rows, one %-format of a line template, the scores' text
        from _score_texts. Scores outside [0, 1] (NaN from a NaN logit) take json.dumps itself.
        indices and scores: (n, k) arrays."""
        import numpy as np

        n, k = indices.shape
        if not _unit_interval(scores):
            names = self.class_names
            return "".join(json.dumps({"path": path, "label": names[idx[0]], "score": round(sc[0], 6),
                                       "topk": [{"label": names[j], "score": round(s, 6)} for j, s in zip(idx, sc)]})
                           + "\n" for path, idx, sc in zip(paths, indices.tolist(), scores.tolist()))
        cells = np.empty((n, 1 + 3 * (k + 1)), dtype=object)  # path; label, score's 2 parts; then each of the top k
        cells[:, 0] = list(map(_json_text, paths))
        cells[:, 4::3] = self._name_json[indices]
        cells[:, 5::3], cells[:, 6::3] = _score_texts(scores, shortest=True)
        cells[:, 1:4] = cells[:, 4:7]  # "label" and "score": the top-k's first
        line = ('{"path": %s, "label": %s, "score": %s%s, "topk": ['
                + ", ".join(['{"label": %s, "score": %s%s}'] * k) + "]}\n")
        return (line * n) % tuple(cells.ravel().tolist())

    def close(self):
        stream, self.stream = self.stream, None
        if stream is None:
            return
        with _write_errors(self.target):
            if self.target != "-":
                stream.close()
            else:
                try:
                    stream.flush()
                finally:
                    stream.detach()  # leave sys.stdout usable


def names_parquet_folder(output: str) -> bool:
    """OUTPUT names a folder of Parquet part files (--engine ray's): it ends with / or .parquet,
    or is a folder; else a file (or - for stdout) of --format's rows."""
    return output != "-" and (output.endswith(("/", os.sep, ".parquet")) or os.path.isdir(output))


def default_errors_path(output: str, resume: bool = False) -> str | None:
    """Where the errors rows of OUTPUT go by default: beside it, its name with `.errors.csv`
    for `.csv` (pred.csv -> pred.errors.csv) and added to any other (pred.jsonl ->
    pred.jsonl.errors.csv, a Parquet folder preds/ -> preds.errors.csv): two runs into
    pred.csv and pred.jsonl never share one. None for stdout. A --resume (`resume`) where that
    file is not there but the one cnnx before 3408db5 named (pred.errors.csv for pred.jsonl)
    is: ResumeError, as that one may hold this output's skips or another output's."""
    if output == "-":
        return None
    name = output.rstrip("/" + os.sep) or output
    path = (name[:-4] if name.lower().endswith(".csv") else name) + ".errors.csv"
    stem = os.path.splitext(name)[0]
    former = stem + ".errors.csv"
    if resume and former != path and os.path.exists(output) and os.path.exists(former) and \
            not os.path.exists(path) and not os.path.exists(stem + ".csv"):  # (else it is that CSV's)
        raise ResumeError(f"{output}'s errors file is {path} now, and there is none; {former} is where cnnx wrote "
                          f"them before (or another output's): --errors {former} continues it, --errors {path} "
                          "starts the new one")
    return path


def already_exists(label: str, target: str, output: str) -> str:
    """The one line for a --output or --errors file that exists, on a run without --resume:
    continue it; an errors file without its output may be another run's (a --resume would add
    this run's rows to it), or this output's run that classified nothing yet."""
    if label == "--errors" and output == "-":
        return f"--errors {target} already exists, and no --resume continues output on stdout: name another file, or remove it"
    if label == "--errors" and not os.path.exists(output):
        return (f"--errors {target} already exists without its output {output}: pass --resume if it is this "
                "output's, else name another --errors file, or remove it")
    return f"{label} {target} already exists: pass --resume to continue it, or remove it"


def _size_written(stream, target):
    """The size of the file a writer's flushed `stream` writes to: where a failed write is cut
    back to (_cut_back); None for stdout, which is never cut."""
    return None if target == "-" else stream.buffer.tell()


def _cut_back(stream, size) -> None:
    """A file stream that failed to write (a full disk) cut back to `size` bytes, what it held
    whole, and closed without the rest it buffers (None: left as it is)."""
    if stream is None or size is None:
        return
    with contextlib.suppress(OSError, ValueError):
        os.ftruncate(stream.fileno(), size)
    with contextlib.suppress(OSError, ValueError):
        stream.buffer.raw.close()  # first: closing the stream would write its buffer again
    with contextlib.suppress(OSError, ValueError):
        stream.close()


class ErrorsWriter:
    """`path,stage,error` rows for every file not classified (and notes on those that were).
    With no file (output on stdout and no --errors) the rows go to stderr as warnings."""

    def __init__(self, target, *, append: bool = False, noted=frozenset()):
        """noted: paths whose note row the file already holds (read_done's `notes`): a run
        killed between a batch's errors and its predictions wrote the note, not the row that
        makes the file done, and the resume classifies it again."""
        self.target, self.append, self.noted = target, append, noted
        self.stream = None
        self.rows = 0
        self._whole = None  # the file's size after its last whole row

    def write(self, path: str, stage: str, message: str):
        if stage == "note" and path in self.noted:
            return
        message = " ".join(str(message).split())  # one line per row, whatever the error said
        if self.target is None:
            print(f"warning: {shown(path)}: {stage}: {message}", file=sys.stderr)
            self.rows += 1
            return
        try:
            with _write_errors(self.target):
                self._write(path, stage, message)
        except WriteError:  # a full disk: the file ends with its last whole row, as the predictions do
            stream, self.stream = self.stream, None
            _cut_back(stream, self._whole)
            raise

    def _write(self, path: str, stage: str, message: str):
        if self.stream is None:
            existing = self.append and os.path.exists(self.target) and os.path.getsize(self.target)
            self.stream = open_text(self.target, "a" if self.append else "x")
            self._csv = _csv_writer(self.stream)
            self._whole = _size_written(self.stream, self.target)
            if not existing:
                self._csv.writerow(ERRORS_HEADER)
        self._csv.writerow([escape_cell(name_text(path)), stage, escape_cell(message)])
        self.stream.flush()
        self.rows += 1
        self._whole = _size_written(self.stream, self.target)

    def close(self):
        stream, self.stream = self.stream, None
        if stream is not None:
            with _write_errors(self.target):
                stream.close()


def _drop_cut_short_row(path, text: str):
    """Rewrite `path` as `text` (what precedes a row a killed run was writing): atomically,
    through a symlink, keeping the file's permission bits."""
    atomic_write(path, text.encode("utf-8", "surrogateescape"), keep_mode_of_target=True, through_symlink=True)


def run_record_path(output) -> str:
    """`.<name>.run.json` beside the output (beside the real file when it is a symlink)."""
    real = os.path.realpath(output)
    return os.path.join(os.path.dirname(real), f".{os.path.basename(real)}.run.json")


def write_run_record(output, model: dict, model_path=None):
    """Record, beside a new output, what a --resume of it must match: the model (its
    ModelInfo.identity()) and the folder this run runs in (the paths it writes as the user
    typed them are relative to it); and the model's file, for the user (a --resume with
    another model names it: the run may have picked the newest export for them). Written
    atomically before the first row."""
    record = {"cnnx_run_record": 1, "cwd": os.getcwd(), "model": model}
    if model_path is not None:
        record["model_path"] = os.path.abspath(model_path)
    atomic_write(run_record_path(output), json.dumps(record, indent=1) + "\n")


def read_run_record(output) -> dict | None:
    """The output's run record; None where there is none (an output of an older cnnx, or one
    moved without it): --resume then checks the columns only."""
    path = run_record_path(output)
    try:
        with open(path, encoding="utf-8") as f:
            record = json.load(f)
    except FileNotFoundError:
        return None
    except ValueError:
        record = None
    if not isinstance(record, dict) or record.get("cnnx_run_record") != 1:
        raise ResumeError(f"{path} is not a cnnx run record (remove it to resume without its checks)")
    return record


def check_resume(output, record: dict | None, model: dict, done) -> None:
    """ResumeError where appending to `output` would mix runs: its record names another model
    (rows of two models in one file), or another folder where `done` holds relative paths (none
    would match here: every file would be classified again, and written twice)."""
    if record is None:
        return
    if record.get("model") != model:
        was = record.get("model") if isinstance(record.get("model"), dict) else {}
        what = next((k for k in ("class_names", "checkpoint_sha256", "variant", "tta_views") if was.get(k) != model[k]),
                    "model")
        what = {"class_names": "classes differ", "checkpoint_sha256": "weights differ", "variant": "variant differs",
                "tta_views": "test-time views differ"}.get(what, "metadata differs")
        path = record.get("model_path")
        that = f"--model {path}" if isinstance(path, str) else "--model"
        raise ResumeError(f"{output} was written with another model (its {what}): resume with that "
                          f"model ({that}), or write to a new file")
    cwd = record.get("cwd")
    if isinstance(cwd, str) and os.path.realpath(cwd) != os.path.realpath(os.getcwd()) and \
            any(not os.path.isabs(p) for p in done):
        raise ResumeError(f"{output} holds paths relative to {cwd}, where its first run ran: resume from there")


# The rows of an output without a run record that --resume classifies again (its first ones),
# and how far their written scores (6 decimals) may be from this model's: rounding, the last bits
# of another batch size or device (the rows may be a GPU's: fp32, TF32 off); an fp16 or int8
# variant's arithmetic differs more between devices. Another model's scores differ far more.
SAMPLE_ROWS = 8
SCORE_TOLERANCE = {"fp32": 1e-4}
LOW_PRECISION_SCORE_TOLERANCE = 2e-2


def read_done(path, fmt: str, topk: int | None, *, notes: set | None = None, labels: set | None = None,
              sample: list | None = None):
    """Paths already in an output (or errors, fmt='errors') file, for --resume. A last row cut
    short by a killed run is dropped (the file is rewritten without it, atomically); anything
    else that does not parse is a ResumeError, so a wrong file is never appended to.
    Returns (paths set, rows kept). For errors files, note rows are not counted as done; their
    paths go into `notes` when it is given. `labels`, when given, gets every label of an
    output's rows (top-1 and top-k); `sample` the (path, label, score) of its first
    SAMPLE_ROWS rows (check_unrecorded_output)."""
    with open(path, encoding="utf-8", errors="surrogateescape", newline="") as f:
        text = f.read()
    if not text:
        return set(), 0
    done, kept = set(), []
    if fmt == "jsonl":
        lines = text.split("\n")
        complete, tail = lines[:-1], lines[-1]  # text ending in "\n" leaves tail == ""
        for i, line in enumerate(complete):
            try:
                rec = json.loads(line)
                done.add(path_of_text(rec["path"]))
                width = len(rec["topk"])
                if labels is not None:
                    labels.update([rec["label"], *(t["label"] for t in rec["topk"])])
                if sample is not None and len(sample) < SAMPLE_ROWS:
                    sample.append((path_of_text(rec["path"]), rec["label"], float(rec["score"])))
            except (ValueError, KeyError, TypeError):
                raise ResumeError(f"{path}: line {i + 1} is not a cnnx JSONL prediction") from None
            if topk is not None and width != topk:  # as a CSV's header tells its --topk
                raise ResumeError(f"{path}: line {i + 1} holds a top-{width}, this run writes a top-{topk} "
                                  "(resume with the same --topk)")
            kept.append(line + "\n")
        if tail:
            _drop_cut_short_row(path, "".join(kept))
        return done, len(kept)
    header = csv_header(topk) if fmt == "csv" else ERRORS_HEADER
    rows = list(csv.reader(io.StringIO(text, newline=""), strict=False))
    if not rows or rows[0] != header:
        got = ",".join(rows[0]) if rows else ""
        raise ResumeError(f"{path}: columns are {got!r}, this run writes {','.join(header)!r} "
                          "(resume with the same --format and --topk)")
    # Keep the longest run of rows that re-serialise to exactly the text of the file; what
    # remains may only be the one row a killed run was writing, which is dropped.
    buf = io.StringIO(newline="")
    writer = _csv_writer(buf)
    good, pos = [], 0
    for row in rows:
        buf.seek(0)
        buf.truncate()
        writer.writerow(row)
        line = buf.getvalue()
        if len(row) != len(header) or not text.startswith(line, pos):
            break
        good.append(row)
        pos += len(line)
    if pos != len(text):
        if len(rows) - len(good) > 1:
            raise ResumeError(f"{path}: row {len(good) + 1} was not written by cnnx classify; refusing to append")
        _drop_cut_short_row(path, text[:pos])
    for row in good[1:]:
        if fmt == "errors" and row[1] == "note":
            if notes is not None:
                notes.add(path_of_text(unescape_cell(row[0])))
            continue
        done.add(path_of_text(unescape_cell(row[0])))
        if labels is not None and fmt == "csv":  # path, label, score, label_2, score_2, ...
            labels.update(unescape_cell(cell) for cell in row[1::2])
        if sample is not None and fmt == "csv" and len(sample) < SAMPLE_ROWS:
            with contextlib.suppress(ValueError):  # a score that is no number: not a row to check by
                sample.append((path_of_text(unescape_cell(row[0])), unescape_cell(row[1]), float(row[2])))
    return done, len(good) - 1


def check_unrecorded_output(output, labels: set, sample: list, info, classify_again) -> str:
    """An output without its run record (moved or copied without it, or an older cnnx's) that
    --resume would append the rows of the model `info` (its ModelInfo) to: ResumeError where its
    rows hold a label that is none of the model's classes, or where the files of its first rows
    (`sample`: path, label, score), classified again (`classify_again`: sample -> path -> (label,
    score) of the files that could be, api.classified_again), give other scores (another model
    with the same classes: appending mixed two models in one file, silently); else the warning
    to show. labels: every label of its rows."""
    unknown = sorted(labels - set(info.class_names))
    if unknown:
        raise ResumeError(f"{output} holds labels this model does not have ({names_line(unknown, 5)}): another model "
                          "wrote it; resume with that model (--model), or write to a new file")
    tolerance = SCORE_TOLERANCE.get(info.variant, LOW_PRECISION_SCORE_TOLERANCE)
    classified = classify_again(sample)
    checked = [(path, label, score, classified[path]) for path, label, score in sample if path in classified]
    differ = [path for path, label, score, (now_label, now_score) in checked
              if label != now_label or abs(score - now_score) > tolerance]
    if differ:
        raise ResumeError(f"{output} has no run record ({run_record_path(output)}: moved or copied without it?) and "
                          f"its rows are not this model's: {len(differ)} of {len(checked)} of its files classified "
                          f"again give other scores (first: {differ[0]}); resume with the model that wrote it (--model), "
                          "or write to a new file")
    why = f"{run_record_path(output)}: moved or copied without it, or an older cnnx wrote it"
    if checked:
        return (f"{output} has no run record ({why}): its rows' scores are this model's ({len(checked)} of its files "
                "classified again); the record is written now")
    return (f"{output} has no run record ({why}): its labels are this model's classes, but none of its files could "
            "be classified again to check that this model wrote them; the record is written now")


def rows_not_found_note(gone: int, output, paths) -> str | None:
    """What a --resume says of the rows its output (or errors file) holds for files it did not
    find (removed or renamed since, or under a PATH not given this time: a renamed file gets a
    second row, under its new name), None where there are none."""
    if gone <= 0:
        return None
    return (f"{gone:,} row(s) of {output} or its errors file are of files not found under {', '.join(map(str, paths))} "
            "this time (removed, renamed, or under a path not given): they stay")


def summary_counts(classified: int, skipped: dict, *, already_done: int = 0, noted: int = 0, ignored: int = 0) -> list:
    """The counts that begin the summary line of every classify engine (local and Ray), in
    one wording: classified, skipped by stage, already done, with notes, non-image files."""
    n_skipped = sum(skipped.values())
    parts = [f"classified {classified:,} image{'' if classified == 1 else 's'}", f"skipped {n_skipped:,}"]
    if n_skipped:
        parts[-1] += " (" + ", ".join(f"{k}: {v}" for k, v in sorted(skipped.items())) + ")"
    if already_done:
        parts.append(f"{already_done:,} already done (--resume)")
    if noted:
        parts.append(f"{noted} with notes")
    if ignored:
        parts.append(f"{ignored:,} non-image files ignored")
    return parts


def nothing_could_be_read(classified: int, skipped: dict, paths, *, already_done: int = 0) -> str | None:
    """The error of a run (either engine) that classified nothing because every path failed while
    the files were being looked for (a folder its user may not list): like one that found no
    file, not a run that finished with warnings (exit 0, and no output written). None otherwise,
    and for a --resume that found files done already."""
    if classified or already_done or not skipped or set(skipped) != {"discover"}:
        return None
    return (f"nothing under {', '.join(map(str, paths))} could be read: {sum(skipped.values())} path(s) failed before "
            f"any image was opened (each is listed with its reason)")
