"""PNG plots of a run: curves (top-1, loss, top-5; train vs val per epoch), per-class top-1
and a confusion matrix. Matplotlib's Agg backend, so no display is needed."""

from __future__ import annotations

import functools
import warnings
from pathlib import Path

# Above MAX_LABELLED_CLASSES classes a plot names no class on its axes (the labels would overlap,
# and a figure sized to hold them grows with the classes squared: 13 GB of pixels at 1,000
# classes); the report's tables name them, as the HTML page does past the same bound.
from cnnx.report.training import MAX_MATRIX_CLASSES as MAX_LABELLED_CLASSES
from cnnx.report.training import loss_title
from cnnx.runtime.files import atomic_file

MAX_LABEL_CHARS = 30  # a longer class name is cut (with an ellipsis), not the plot squeezed beside it


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _names_as_written(plot):
    """A plot whose text (class names, a folder's name in a title) is drawn as it is written:
    matplotlib reads text between two $ as TeX math, and a class `price_$1_$2` failed the
    run's plots (a ParseSyntaxException), `$5 & $10` drawn as italic math."""

    @functools.wraps(plot)
    def draw(*args, **kwargs):
        import matplotlib

        with matplotlib.rc_context({"text.parse_math": False}):
            return plot(*args, **kwargs)

    return draw


def _save(fig, path: Path, through_symlink: bool = False, text: dict | None = None):
    """Atomic like every other file of a run: a half-written PNG never replaces a good one
    (through_symlink: see atomic_file; a file the user named). Matplotlib's warnings (a class
    name's glyphs missing from its font, drawn as boxes) are not the user's to read on a
    training run's stderr. text: PNG text chunks to write in it (png_text reads them)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path, "wb", through_symlink=through_symlink) as f, warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # matplotlib's warn_external names this module as their origin
        fig.savefig(f, format="png", dpi=110, bbox_inches="tight", metadata=text)


def png_text(path) -> dict:
    """The text chunks of a PNG ({} where it has none or cannot be read)."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            return dict(getattr(im, "text", {}) or {})
    except (OSError, ValueError, SyntaxError):  # Pillow's errors on a damaged PNG
        return {}


def _labels(class_names) -> list:
    return [c if len(c) <= MAX_LABEL_CHARS else c[:MAX_LABEL_CHARS - 1] + "\u2026" for c in class_names]


@_names_as_written
def plot_curves(history: list, folder, label_smoothing: float = 0.0) -> list:
    """top1.png, loss.png, top5.png from the per-epoch history rows."""
    plt = _plt()
    folder = Path(folder)
    epochs = [r["epoch"] for r in history]
    written = []
    for key, title in (("top1", "top-1 accuracy"), ("loss", "loss"), ("top5", "top-5 accuracy")):
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot(epochs, [r[f"train_{key}"] for r in history], "o-", label="train")
        ax.plot(epochs, [r[f"val_{key}"] for r in history], "o-", label="val")
        ax.set_xlabel("epoch")
        ax.set_ylabel(title)
        ax.set_title(loss_title(label_smoothing) if key == "loss" else title, fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend()
        _save(fig, folder / f"{key}.png")
        plt.close(fig)
        written.append(folder / f"{key}.png")
    return written


@_names_as_written
def plot_per_class(class_names, train_top1, val_top1, path, title="per-class top-1"):
    plt = _plt()
    import numpy as np

    n = len(class_names)
    labelled = n <= MAX_LABELLED_CLASSES
    x = np.arange(n)
    fig, ax = plt.subplots(figsize=(max(6, 0.5 * n + 2) if labelled else 16, 4))
    if train_top1 is not None:
        ax.bar(x - 0.2, train_top1, width=0.4, label="train")
        ax.bar(x + 0.2, val_top1, width=0.4, label="val")
        ax.legend()
    else:
        ax.bar(x, val_top1, width=0.6)
    if labelled:
        ax.set_xticks(x, _labels(class_names), rotation=45, ha="right")
    else:
        ax.set_xlabel(f"{n} classes by index, in the order of the model's class names")
    ax.set_ylim(0, 1)
    ax.set_ylabel("top-1")
    ax.set_title(title)
    ax.grid(axis="y", alpha=0.3)
    _save(fig, Path(path))
    plt.close(fig)


@_names_as_written
def plot_confusion(confusion, class_names, path, title="confusion matrix", through_symlink=False, text=None):
    """Rows = true class, columns = predicted; cells show counts, colour the row share. text:
    PNG text chunks kept in the file (what was scored: evaluate's default plot names)."""
    plt = _plt()
    import numpy as np

    cm = np.asarray(confusion, dtype=np.int64)
    share = cm / np.maximum(cm.sum(1, keepdims=True), 1)
    n = len(class_names)
    labelled = n <= MAX_LABELLED_CLASSES  # else a heat map of the row shares; the report names the confused pairs
    fig, ax = plt.subplots(figsize=(max(5, 0.55 * n + 2), max(4, 0.5 * n + 1.5)) if labelled else (10, 9))
    ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    if n <= 30:
        for i in range(n):
            for j in range(n):
                ax.text(j, i, str(cm[i, j]), ha="center", va="center", fontsize=7,
                        color="white" if share[i, j] > 0.5 else "black")
    if labelled:
        ax.set_xticks(range(n), _labels(class_names), rotation=45, ha="right")
        ax.set_yticks(range(n), _labels(class_names))
    ax.set_xlabel("predicted" if labelled else
                  f"predicted ({n} classes by index, in the order of the model's class names)")
    ax.set_ylabel("true")
    ax.set_title(title)
    _save(fig, Path(path), through_symlink, text)
    plt.close(fig)
