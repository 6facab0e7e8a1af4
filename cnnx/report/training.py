"""The training / evaluation page: `runs/<name>/report.html` (written by `cnnx train` after
every epoch) and `cnnx evaluate --report FILE` (history=[]).

Size is bounded whatever the dataset: the galleries hold GALLERY_CAP thumbnails each, the
confusion matrix is drawn for up to MAX_MATRIX_CLASSES classes (a list of the most confused
pairs otherwise), and every other table has one row per class or per epoch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from cnnx.report.page import esc, fmt_num, kv_table, num_value, page, pct, sortable_table, thumb_card
from cnnx.report.svg import line_chart
from cnnx.report.thumbs import array_data_uri
from cnnx.runtime.files import atomic_write

GALLERY_CAP = 24  # thumbnails in each gallery (mistakes; least confident correct)
MAX_MATRIX_CLASSES = 100  # above this the matrix (classes^2 cells) is replaced by the confused pairs
CONFUSED_PAIRS = 15
DATA_KEYS = ("data", "data_root", "arch", "num_classes", "train_images", "val_images", "test_images",
             "skipped_files", "val_fraction", "split_seed", "device_resolved", "world_size")
COLOURS = {"train": "#0969da", "val": "#cf222e", "val_top5": "#8250df", "lr": "#1a7f37"}


@dataclass(frozen=True)
class Predictions:
    """Validation predictions of the checkpoint the page is about."""

    images: object  # images[i] -> uint8 (3, H, W) RGB (numpy array or anything np.asarray reads)
    labels: np.ndarray  # int64 (N,) true label ids
    probs: np.ndarray  # float32 (N, C) softmax probabilities
    paths: Sequence[str] | None = None  # source file of each image when known


def write_training_report(path, *, title: str, config: dict, history: list[dict], class_names: list[str],
                          confusion: list[list[int]], val: Predictions | None, summary: dict | None = None,
                          through_symlink: bool = False) -> None:
    """Write the page atomically (through_symlink: see atomic_file; a page the user named).
    history: cnnx.train.run's per-epoch rows ([] for an evaluation); confusion: rows = true
    label, of the checkpoint the page is about."""
    text = render_training_report(title=title, config=config, history=history, class_names=class_names,
                                  confusion=confusion, val=val, summary=summary)
    atomic_write(path, text, through_symlink=through_symlink)


def render_training_report(*, title, config, history, class_names, confusion, val, summary=None) -> str:
    nc = len(class_names)
    try:
        cm = np.asarray(confusion, dtype=np.int64) if nc else np.zeros((0, 0), np.int64)
    except ValueError:  # ragged rows
        cm = None
    if cm is None or cm.shape != (nc, nc):
        got = "ragged rows" if cm is None else "x".join(map(str, cm.shape))
        raise ValueError(f"confusion must be {nc}x{nc} for {nc} classes, got {got}")
    best = _best_row(history, summary)
    # An evaluation (no history) is on the folder it was given, not the run's validation split:
    # its figures are not called "val", and the run's config is the checkpoint's past, not this data.
    split = "val " if history else ""
    sections = [("overview", "Overview", _overview(cm, history, best, summary, split))]
    if history:
        smoothing = config.get("label_smoothing") if isinstance(config, dict) else None
        sections.append(("curves", "Curves", _curves(history, best, smoothing if isinstance(smoothing, (int, float))
                                                     else 0.0)))
    sections.append(("per-class", "Per-class top-1", _per_class(cm, class_names, best, split)))
    sections.append(("confusion", "Confusion matrix", _confusion(cm, class_names)))
    sections.append(("mistakes", "Validation images" if history else "Images", _galleries(val, class_names)))
    sections.append(("config", "Data and config" if history else "The checkpoint's training run",
                     _data_and_config(config, evaluation=not history)))
    what = "training run" if history else "evaluation"
    checkpoint = f"epoch {best['epoch']}" if best else "the evaluated checkpoint"
    return page(title, sections, subtitle=f"{what}; confusion, per-class and galleries of {checkpoint}")


def _best_row(history, summary) -> dict | None:
    """The history row of the checkpoint the page is about: summary's best_epoch, else the
    first epoch with the highest val top-1, a tie to the lower val loss (the rule best.pt is
    kept by: cnnx.train.run.State.record)."""
    if not history:
        return None
    epoch = (summary or {}).get("best_epoch")
    for row in history:
        if epoch is not None and row.get("epoch") == epoch:
            return row
    return max(history, key=lambda r: (r.get("val_top1", -1.0), -r.get("val_loss", 0.0), -r.get("epoch", 0)))


def _overview(cm, history, best, summary, split: str) -> str:
    n = int(cm.sum())
    cards = [(f"{split}top-1", pct(np.trace(cm) / n) if n else "n/a"), (f"{split}images", f"{n:,}"),
             ("classes", f"{cm.shape[0]:,}")]
    if history:
        last = history[-1]
        cards += [("best epoch", f"{best['epoch']} of {last['epoch']}"),
                  ("last val top-1", pct(last.get("val_top1"))),
                  ("training time", f"{fmt_num(last.get('train_seconds_total'), 4)} s")]
    html_ = '<div class="cards">' + "".join(f'<div class="card">{esc(k)}<b>{esc(v)}</b></div>' for k, v in cards)
    html_ += "</div>"
    if summary:
        html_ += "<h3>Summary</h3>" + kv_table(summary.items())
    return html_


def loss_title(label_smoothing: float) -> str:
    """The loss chart's title (report.html and plots/loss.png): with label smoothing the train
    loss has its floor above zero, and a gap to the val loss that is not overfitting."""
    return "loss" + (f" (train loss includes label smoothing {label_smoothing:g})" if label_smoothing > 0 else "")


def _curves(history, best, label_smoothing: float = 0.0) -> str:
    xs = [int(r["epoch"]) for r in history]

    def col(key):
        return [r.get(key) for r in history]

    mark = dict(marker_x=int(best["epoch"]), marker_label="best") if best else {}
    charts = [
        line_chart("top-1 accuracy", xs, [("train", col("train_top1"), COLOURS["train"], False),
                                          ("val", col("val_top1"), COLOURS["val"], False),
                                          ("val top-5", col("val_top5"), COLOURS["val_top5"], True)], **mark),
        line_chart(loss_title(label_smoothing), xs, [("train", col("train_loss"), COLOURS["train"], False),
                                ("val", col("val_loss"), COLOURS["val"], False)], **mark),
        line_chart("learning rate", xs, [("lr", col("lr"), COLOURS["lr"], False)], **mark),
    ]
    head = [("epoch", True), ("lr", True), ("train loss", True), ("train top-1", True), ("val loss", True),
            ("val top-1", True), ("val top-5", True), ("seconds", True), ("eval seconds", True)]
    keys = ("lr", "train_loss", "train_top1", "val_loss", "val_top1", "val_top5", "seconds", "eval_seconds")
    rows = [[(esc(r.get("epoch")), num_value(r.get("epoch")))] +
            [(esc(fmt_num(r.get(k))), num_value(r.get(k))) for k in keys] for r in history]
    return (f'<div class="charts">{"".join(charts)}</div>'
            f"<details><summary>per-epoch numbers</summary>{sortable_table(head, rows)}</details>")


def _per_class(cm, class_names, best, split: str) -> str:
    support, predicted, correct = cm.sum(1), cm.sum(0), np.diag(cm)
    off = cm.copy()
    np.fill_diagonal(off, 0)
    train = best.get("train_per_class") if best else None
    head = [("class", False), (f"{split}images", True), (f"{split}top-1", True), ("precision", True)]
    if train is not None:
        head.append((f"train top-1 (epoch {best['epoch']})", True))
    head.append(("most often predicted instead", False))
    rows = []
    for i, name in enumerate(class_names):
        recall = correct[i] / support[i] if support[i] else None
        precision = correct[i] / predicted[i] if predicted[i] else None
        row = [(esc(name), None), (f"{support[i]:,}", num_value(support[i])), (pct(recall), num_value(recall)),
               (pct(precision), num_value(precision))]
        if train is not None:
            t = train[i] if i < len(train) else None
            row.append((pct(t), num_value(t)))
        j = int(off[i].argmax()) if off.shape[1] else 0
        row.append((f"{esc(class_names[j])} ({off[i, j]:,})", None) if off.size and off[i, j] else ("", None))
        rows.append(row)
    note = (f'<p class="muted">{split or "the "}columns from the confusion matrix below; click a heading to sort '
            "(the table reads the same without scripts).</p>")
    return note + sortable_table(head, rows, table_id="per-class-table")


def _cell_style(fraction: float, diagonal: bool) -> str:
    if fraction <= 0:
        return ""
    alpha = 0.08 + 0.82 * fraction
    rgb = "26,127,55" if diagonal else "207,34,46"
    text = ";color:#fff" if alpha > 0.55 else ""
    return f' style="background:rgba({rgb},{alpha:.2f}){text}"'


def _confusion(cm, class_names) -> str:
    nc = len(class_names)
    parts = []
    if nc == 0:
        return '<p class="muted">no classes</p>'
    if nc <= MAX_MATRIX_CLASSES:
        support = cm.sum(1)
        head = "".join(f'<th title="{esc(n)}">{esc(n)}</th>' for n in class_names)
        rows = []
        for i, name in enumerate(class_names):
            cells = []
            for j in range(nc):
                v = int(cm[i, j])
                frac = v / support[i] if support[i] else 0.0
                cls = ' class="diag"' if i == j else ""
                cells.append(f'<td{cls}{_cell_style(frac, i == j)}>{v}</td>')
            rows.append(f'<tr><th title="{esc(name)}">{esc(name)}</th>{"".join(cells)}'
                        f'<td class="n">{support[i]:,}</td></tr>')
        parts.append('<p class="muted">rows: true class; columns: predicted class; counts, shaded by the share '
                     "of the row (green: correct, red: mistakes).</p>")
        parts.append(f'<div class="scroll"><table class="confusion" id="confusion-matrix"><thead><tr>'
                     f'<th class="corner">true ↓ predicted →</th>{head}<th>images</th></tr></thead>'
                     f'<tbody>{"".join(rows)}</tbody></table></div>')
    else:
        parts.append(f'<p class="muted">{nc:,} classes: the matrix is not drawn (its {nc * nc:,} cells would '
                     "swamp the page); the most confused pairs follow.</p>")
    parts.append("<h3>Most confused pairs</h3>" + _confused_pairs(cm, class_names))
    return "".join(parts)


def _confused_pairs(cm, class_names) -> str:
    off = cm.copy()
    np.fill_diagonal(off, 0)
    flat = np.argsort(-off, axis=None, kind="stable")[:CONFUSED_PAIRS]
    support = cm.sum(1)
    rows = []
    for k in flat:
        i, j = divmod(int(k), cm.shape[1])
        if off[i, j] == 0:
            break
        share = off[i, j] / support[i]
        rows.append([(esc(class_names[i]), None), (esc(class_names[j]), None),
                     (f"{off[i, j]:,}", num_value(off[i, j])), (pct(share), num_value(share))])
    if not rows:
        return '<p class="muted">no mistakes.</p>'
    head = [("true", False), ("predicted", False), ("images", True), ("share of true class", True)]
    return sortable_table(head, rows, table_id="confused-pairs")


def _galleries(val: Predictions | None, class_names) -> str:
    if val is None:
        return '<p class="muted">no predictions were given for this page.</p>'
    probs = np.asarray(val.probs, dtype=np.float32)
    labels = np.asarray(val.labels, dtype=np.int64)
    if probs.ndim != 2 or probs.shape[1] != len(class_names) or labels.shape != (probs.shape[0],):
        raise ValueError(f"val predictions: probs {probs.shape} and labels {labels.shape} do not match "
                         f"{len(class_names)} classes")
    n = len(labels)
    if n == 0:
        return '<p class="muted">there are no images.</p>'
    pred = probs.argmax(1)
    conf = probs[np.arange(n), pred]
    wrong = np.flatnonzero(pred != labels)
    right = np.flatnonzero(pred == labels)
    worst = wrong[np.argsort(-conf[wrong], kind="stable")][:GALLERY_CAP]
    unsure = right[np.argsort(conf[right], kind="stable")][:GALLERY_CAP]
    top2 = np.argsort(-probs[unsure], axis=1, kind="stable")[:, 1] if probs.shape[1] > 1 else None

    def cards(indices, caption):
        out = []
        for k, i in enumerate(indices):
            i = int(i)
            t, p = class_names[labels[i]], class_names[pred[i]]
            tip = val.paths[i] if val.paths is not None else ""
            out.append(thumb_card(array_data_uri(val.images[i]), caption(k, i, t, p), alt=f"true {t}, predicted {p}",
                                  tip=tip))
        return "".join(out)

    def mistake(_k, i, t, p):
        return (f"true <b>{esc(t)}</b> · {probs[i, labels[i]]:.2f}<br>"
                f'<span class="bad">pred <b>{esc(p)}</b> · {conf[i]:.2f}</span>')

    def correct(k, i, t, _p):
        line = f"<b>{esc(t)}</b> · {conf[i]:.2f}"
        if top2 is not None:
            j = int(top2[k])
            line += f"<br>next {esc(class_names[j])} · {probs[i, j]:.2f}"
        return line

    shown_w = f"{len(worst)} of {len(wrong):,}"
    shown_r = f"{len(unsure)} of {len(right):,}"
    return (f'<h3>Most confident mistakes ({shown_w})</h3><div class="gallery" id="gallery-mistakes">'
            f"{cards(worst, mistake) or '<p class=muted>none</p>'}</div>"
            f'<h3>Least confident correct answers ({shown_r})</h3><div class="gallery" id="gallery-unsure">'
            f"{cards(unsure, correct) or '<p class=muted>none</p>'}</div>")


def _data_and_config(config: dict, evaluation: bool = False) -> str:
    """The run's data and config; on an evaluation's page, those of the run that trained the
    checkpoint (the evaluated folder is the summary's)."""
    data = [(k, config[k]) for k in DATA_KEYS if k in config]
    pre = config.get("preprocess")
    if isinstance(pre, dict) and "size" in pre:
        data.append(("input size", "x".join(str(v) for v in pre["size"])))
    heads = ("Its data", "Its config") if evaluation else ("Data", "Config")
    note = ('<p class="muted">the run that trained the checkpoint; the figures above are on the evaluated folder, '
            "named in the summary.</p>") if evaluation else ""
    return (note + (f"<h3>{heads[0]}</h3>" + kv_table(data) if data else "") +
            f"<h3>{heads[1]}</h3>" + kv_table(config.items()))
