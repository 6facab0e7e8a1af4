"""The page of a `cnnx classify` job (`--report FILE`), read back from what the predictions
file and the errors file hold, so a --resume'd job reports every image of every session.

The files are streamed once, whatever their length; what the page keeps is bounded: a
seeded reservoir sample of SAMPLE_PER_CLASS images per predicted class (MAX_GRID_THUMBS in
all), the LEAST_CONFIDENT lowest top-1 scores, and the first MAX_ERROR_ROWS errors and notes.
"""

from __future__ import annotations

import csv
import heapq
import json
import math
import os
import random
from collections import Counter
from dataclasses import dataclass, field

from cnnx.report.page import esc, fmt_num, kv_table, num_value, page, pct, sortable_table, thumb_card
from cnnx.report.thumbs import file_thumbnails, thumb_spec
from cnnx.runtime.files import atomic_write, path_of_text
from cnnx.runtime.output import ERRORS_HEADER, csv_header, unescape_cell

SAMPLE_PER_CLASS = 12
MAX_GRID_THUMBS = 360  # ~4 KB each for photo crops: the grids stay under ~1.5 MB
LEAST_CONFIDENT = 24
MAX_ERROR_ROWS = 500
MAX_COUNT_ROWS = 1000  # classes listed in the counts table (most predicted first)
MAX_CELL_CHARS = 400  # of a path or message in the errors table (the errors file has them whole)
FORMATS = ("csv", "jsonl")  # the predictions formats the page can read back


class ReportError(Exception):
    """A predictions or errors file the report cannot read (not cnnx output); one line."""


@dataclass(frozen=True)
class Row:
    path: str
    label: str
    score: float
    runner_up: str | None = None  # second label and score when the file holds top-k >= 2
    runner_up_score: float | None = None


@dataclass
class PredictionStats:
    """What the page shows of the predictions, accumulated row by row in bounded memory."""

    counts: Counter = field(default_factory=Counter)
    score_sums: Counter = field(default_factory=Counter)
    samples: dict = field(default_factory=dict)  # label -> reservoir of Rows
    least: list = field(default_factory=list)  # heap of (-score, -seq, Row): the lowest scores
    total: int = 0
    unreadable_rows: int = 0
    rng: random.Random = field(default_factory=lambda: random.Random(0))

    def add(self, row: Row):
        seen = self.counts[row.label]
        self.counts[row.label] += 1
        self.score_sums[row.label] += row.score
        sample = self.samples.setdefault(row.label, [])
        if seen < SAMPLE_PER_CLASS:
            sample.append(row)
        else:  # reservoir sampling: every row of the class is kept with equal probability
            j = self.rng.randrange(seen + 1)
            if j < SAMPLE_PER_CLASS:
                sample[j] = row
        heapq.heappush(self.least, (-row.score, -self.total, row))
        if len(self.least) > LEAST_CONFIDENT:
            heapq.heappop(self.least)  # drops the highest score (the later row on a tie)
        self.total += 1

    def least_confident(self) -> list:
        return [row for _, _, row in sorted(self.least, key=lambda t: (-t[0], -t[1]))]


@dataclass
class ErrorStats:
    stages: Counter = field(default_factory=Counter)
    errors: list = field(default_factory=list)  # (path, stage, message), the first MAX_ERROR_ROWS
    notes: list = field(default_factory=list)  # (path, note)
    unreadable_rows: int = 0


def _score(text) -> float:
    v = float(text)
    if not math.isfinite(v):
        raise ValueError("score is not finite")
    return v


def _ends_with_newline(path) -> bool:
    """False when the file's last row was cut short (a killed writer): every row cnnx writes
    ends with a newline."""
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        if f.tell() == 0:
            return True
        f.seek(-1, os.SEEK_END)
        return f.read(1) == b"\n"


def _complete_rows(rows, complete: bool, stats):
    """The rows, less the last one when the file does not end with a newline."""
    previous = None
    for row in rows:
        if previous is not None:
            yield previous
        previous = row
    if previous is not None:
        if complete:
            yield previous
        else:
            stats.unreadable_rows += 1


def read_csv_predictions(stream, stats: PredictionStats, name: str, complete: bool = True):
    reader = csv.reader(stream, strict=False)
    head = next(reader, None)
    if head is None:
        return
    if len(head) < 3 or (len(head) - 3) % 2 or head != csv_header(1 + (len(head) - 3) // 2):
        raise ReportError(f"{name}: columns are {','.join(head[:6])!r}, not those of a cnnx predictions CSV")
    try:
        for row in _complete_rows(reader, complete, stats):
            if len(row) != len(head):
                stats.unreadable_rows += 1
                continue
            try:
                second = (unescape_cell(row[3]), _score(row[4])) if len(row) >= 5 else (None, None)
                stats.add(Row(unescape_cell(row[0]), unescape_cell(row[1]), _score(row[2]), *second))
            except ValueError:
                stats.unreadable_rows += 1
    except csv.Error:  # a quoted cell cut short by a killed run: the rows before it count
        stats.unreadable_rows += 1


def read_jsonl_predictions(stream, stats: PredictionStats, name: str, complete: bool = True):
    for number, line in enumerate(_complete_rows(stream, complete, stats), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            topk = rec.get("topk") or []
            second = (str(topk[1]["label"]), _score(topk[1]["score"])) if len(topk) > 1 else (None, None)
            if not isinstance(rec["path"], str):
                raise TypeError("path is not a string")
            stats.add(Row(rec["path"], str(rec["label"]), _score(rec["score"]), *second))
        except (ValueError, KeyError, TypeError, AttributeError, IndexError):
            if number == 1:
                raise ReportError(f"{name}: line 1 is not a cnnx JSONL prediction") from None
            stats.unreadable_rows += 1


def read_predictions(output: str, fmt: str) -> PredictionStats | None:
    """Stats of a predictions file; None when it does not exist (no image was classified:
    `cnnx classify` creates it at the first finished batch)."""
    if fmt not in FORMATS:
        raise ReportError(f"a report reads {' or '.join(FORMATS)} predictions, not {fmt}")
    stats = PredictionStats()
    try:
        stream = open(output, encoding="utf-8", errors="surrogateescape", newline="")
    except FileNotFoundError:
        return None
    with stream:
        complete = _ends_with_newline(output)
        (read_csv_predictions if fmt == "csv" else read_jsonl_predictions)(stream, stats, output, complete)
    return stats


def read_errors(errors: str) -> ErrorStats | None:
    stats = ErrorStats()
    try:
        stream = open(errors, encoding="utf-8", errors="surrogateescape", newline="")
    except FileNotFoundError:
        return None
    with stream:
        reader = csv.reader(stream, strict=False)
        head = next(reader, None)
        if head is None:
            return stats
        if head != ERRORS_HEADER:
            raise ReportError(f"{errors}: columns are {','.join(head[:6])!r}, not {','.join(ERRORS_HEADER)!r}")
        try:
            for row in reader:
                if len(row) != 3:
                    stats.unreadable_rows += 1
                    continue
                path, stage, message = unescape_cell(row[0]), row[1], unescape_cell(row[2])
                stats.stages[stage] += 1
                if stage == "note":
                    if len(stats.notes) < MAX_ERROR_ROWS:
                        stats.notes.append((path, message))
                elif len(stats.errors) < MAX_ERROR_ROWS:
                    stats.errors.append((path, stage, message))
        except csv.Error:
            stats.unreadable_rows += 1
    return stats


def write_classify_report(path, *, output: str, fmt: str, errors: str | None,
                          class_names: list[str] | None = None, spec: dict | None = None) -> None:
    """Write the page of a classify job atomically, from the predictions file `output` (CSV or
    JSONL as `cnnx classify` writes it) and the errors file. class_names: the model's (classes
    never predicted are listed with 0); spec: the model's preprocess spec (thumbnails show its
    crop). Raises ReportError for a file that is not cnnx output, OSError for one unreadable."""
    if output == "-":
        raise ReportError("the report is read back from the predictions file: it needs --output FILE, not stdout")
    preds = read_predictions(output, fmt)
    errs = read_errors(errors) if errors is not None else None
    atomic_write(path, render_classify_report(output=output, fmt=fmt, errors=errors, preds=preds, errs=errs,
                                              class_names=class_names, spec=spec), through_symlink=True)  # --report


def render_classify_report(*, output, fmt, errors, preds, errs, class_names, spec) -> str:
    stats = preds or PredictionStats()
    order = _class_order(stats, class_names)
    grid = _grid_rows(stats, order)
    least = stats.least_confident()
    # names as the output holds them -> the files, as this locale names them
    paths = {t: path_of_text(t) for t in [r.path for _, rows in grid for r in rows] + [r.path for r in least]}
    opened = file_thumbnails(list(paths.values()), thumb_spec(spec))
    thumbs = {t: opened[p] for t, p in paths.items()}
    sections = [
        ("overview", "Overview", _overview(output, fmt, errors, preds, errs, order)),
        ("counts", "Images per predicted class", _counts(stats, order)),
        ("samples", "Samples per class", _grids(stats, grid, thumbs)),
        ("least-confident", "Least confident predictions", _least(least, thumbs)),
        ("errors", "Files not classified", _errors(errors, errs)),
    ]
    name = os.path.basename(output) if output else "predictions"
    return page(f"cnnx classify: {name}", sections, subtitle=f"read from {output}")


def _class_order(stats, class_names) -> list:
    """Classes by images predicted (most first), then the model's classes never predicted."""
    order = [c for c, _ in sorted(stats.counts.items(), key=lambda kv: (-kv[1], kv[0]))]
    if class_names:
        seen = set(order)
        order += [c for c in class_names if c not in seen]
    return order


def _grid_rows(stats, order) -> list:
    """(label, sample rows sorted by path) for the classes that get a grid, within MAX_GRID_THUMBS."""
    budget, out = MAX_GRID_THUMBS, []
    for label in order:
        sample = stats.samples.get(label)
        if not sample or budget <= 0:
            continue
        take = sorted(sample, key=lambda r: r.path)[:budget]
        budget -= len(take)
        out.append((label, take))
    return out


def _overview(output, fmt, errors, preds, errs, order) -> str:
    total = preds.total if preds else 0
    skipped = sum(v for k, v in errs.stages.items() if k != "note") if errs else 0
    notes = errs.stages.get("note", 0) if errs else 0
    mean = sum(preds.score_sums.values()) / total if total else None
    predicted = sum(1 for c in order if preds and preds.counts.get(c))
    cards = [("classified", f"{total:,}"), ("not classified", f"{skipped:,}"), ("with notes", f"{notes:,}"),
             ("classes predicted", f"{predicted:,} of {len(order):,}"), ("mean top-1 score", fmt_num(mean, 3))]
    html_ = '<div class="cards">' + "".join(f'<div class="card">{esc(k)}<b>{esc(v)}</b></div>' for k, v in cards)
    html_ += "</div>"
    if errors == "-":
        where = "stdout (its rows are not in this report)"
    elif errors is not None and os.path.lexists(errors):
        where = errors
    else:  # the errors file is made at the first skip
        where = f"none written ({'no file was skipped' if errors else 'none asked for'})"
    facts = [("predictions file", output), ("format", fmt), ("errors file", where)]
    if preds is None:
        facts.append(("note", "the predictions file does not exist: no image was classified"))
    unreadable = (preds.unreadable_rows if preds else 0) + (errs.unreadable_rows if errs else 0)
    if unreadable:
        facts.append(("rows left out", f"{unreadable:,} rows did not parse (e.g. one cut short by a killed run)"))
    return html_ + kv_table(facts)


def _counts(stats, order) -> str:
    if not order:
        return '<p class="muted">no predictions.</p>'
    top = max(stats.counts.values(), default=0) or 1
    total = stats.total or 1
    head = [("class", False), ("images", True), ("share", True), ("mean score", True), ("", False)]
    rows = []
    for label in order[:MAX_COUNT_ROWS]:
        n = stats.counts.get(label, 0)
        mean = stats.score_sums[label] / n if n else None
        bar = f'<span class="bar" style="width:{max(1, round(120 * n / top)) if n else 0}px"></span>'
        rows.append([(esc(label), None), (f"{n:,}", num_value(n)), (pct(n / total), num_value(n / total)),
                     (fmt_num(mean, 3), num_value(mean)), (bar, num_value(n))])
    table = sortable_table(head, rows, table_id="counts-table")
    rest = order[MAX_COUNT_ROWS:]
    if rest:
        images = sum(stats.counts.get(c, 0) for c in rest)
        table += (f'<p class="muted">and {len(rest):,} more classes with {images:,} images in all '
                  f"(the {MAX_COUNT_ROWS:,} most predicted are listed).</p>")
    return table


def _card(row, thumbs, caption) -> str:
    uri, why = thumbs.get(row.path, (None, "not decoded"))
    return thumb_card(uri, caption, alt=f"{row.label}: {os.path.basename(row.path)}", missing=why, tip=row.path)


def _grids(stats, grid, thumbs) -> str:
    if not grid:
        return '<p class="muted">no predictions.</p>'
    parts = [f'<p class="muted">a seeded random sample of up to {SAMPLE_PER_CLASS} images per class, in path order; '
             f"{MAX_GRID_THUMBS} images at most on the page.</p><div id=\"class-grids\">"]
    for label, rows in grid:
        n = stats.counts[label]
        cards = "".join(_card(r, thumbs, f"{esc(os.path.basename(r.path))}<br>{r.score:.2f}") for r in rows)
        parts.append(f"<h3>{esc(label)} <span class=\"muted\">{n:,} images, {len(rows)} shown</span></h3>"
                     f'<div class="gallery">{cards}</div>')
    with_grid = {label for label, _ in grid}
    not_shown = sum(1 for label in stats.counts if label not in with_grid)
    if not_shown:
        parts.append(f'<p class="muted">{not_shown:,} more classes have no grid (the page holds '
                     f"{MAX_GRID_THUMBS} sample images at most).</p>")
    return "".join(parts) + "</div>"


def _least(rows, thumbs) -> str:
    if not rows:
        return '<p class="muted">no predictions.</p>'

    def caption(r):
        line = f"{esc(os.path.basename(r.path))}<br><b>{esc(r.label)}</b> · {r.score:.2f}"
        if r.runner_up is not None:
            line += f"<br>next {esc(r.runner_up)} · {r.runner_up_score:.2f}"
        return line

    cards = "".join(_card(r, thumbs, caption(r)) for r in rows)
    return (f'<p class="muted">the {len(rows)} lowest top-1 scores, lowest first.</p>'
            f'<div class="gallery" id="least-confident-gallery">{cards}</div>')


def clip(text: str) -> str:
    return text if len(text) <= MAX_CELL_CHARS else text[: MAX_CELL_CHARS - 1] + "…"


def _errors(errors, errs) -> str:
    if errors is None:
        return '<p class="muted">no errors file was given (skipped files went to stderr).</p>'
    if errors == "-":
        return '<p class="muted">skipped files went to stdout (--errors -): not read back here.</p>'
    if errs is None or not errs.stages:
        return '<p class="muted">every file found was classified.</p>'
    skipped = sum(v for k, v in errs.stages.items() if k != "note")
    parts = [kv_table(sorted(errs.stages.items()))]
    if errs.errors:
        shown = f" (the first {len(errs.errors):,} of {skipped:,}; all in {errors})" if skipped > len(errs.errors) else ""
        head = [("path", False), ("stage", False), ("error", False)]
        rows = [[(esc(clip(p)), None), (esc(s), None), (esc(clip(m)), None)] for p, s, m in errs.errors]
        parts.append(f"<h3>Errors{esc(shown)}</h3>" + sortable_table(head, rows, table_id="errors-table"))
    if errs.notes:
        rows = [[(esc(clip(p)), None), (esc(clip(m)), None)] for p, m in errs.notes]
        parts.append("<details><summary>notes on classified files</summary>" +
                     sortable_table([("path", False), ("note", False)], rows) + "</details>")
    return "".join(parts)
