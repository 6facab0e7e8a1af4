"""PNG plots of a run: curves (top-1, loss, top-5; train vs val per epoch), per-class top-1
and a confusion matrix. Matplotlib's Agg backend, so no display is needed."""

from __future__ import annotations

from pathlib import Path

from cnnx.runtime.files import atomic_file


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path):
    """Atomic like every other file of a run: a half-written PNG never replaces a good one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path, "wb") as f:
        fig.savefig(f, format="png", dpi=110, bbox_inches="tight")


def plot_curves(history: list, folder) -> list:
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
        ax.set_title(title + (" (train loss includes label smoothing)" if key == "loss" else ""), fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend()
        _save(fig, folder / f"{key}.png")
        plt.close(fig)
        written.append(folder / f"{key}.png")
    return written


def plot_per_class(class_names, train_top1, val_top1, path, title="per-class top-1"):
    plt = _plt()
    import numpy as np

    x = np.arange(len(class_names))
    fig, ax = plt.subplots(figsize=(max(6, 0.5 * len(class_names) + 2), 4))
    if train_top1 is not None:
        ax.bar(x - 0.2, train_top1, width=0.4, label="train")
        ax.bar(x + 0.2, val_top1, width=0.4, label="val")
        ax.legend()
    else:
        ax.bar(x, val_top1, width=0.6)
    ax.set_xticks(x, class_names, rotation=45, ha="right")
    ax.set_ylim(0, 1)
    ax.set_ylabel("top-1")
    ax.set_title(title)
    ax.grid(axis="y", alpha=0.3)
    _save(fig, Path(path))
    plt.close(fig)


def plot_confusion(confusion, class_names, path, title="confusion matrix"):
    """Rows = true class, columns = predicted; cells show counts, colour the row share."""
    plt = _plt()
    import numpy as np

    cm = np.asarray(confusion, dtype=np.int64)
    share = cm / np.maximum(cm.sum(1, keepdims=True), 1)
    n = len(class_names)
    fig, ax = plt.subplots(figsize=(max(5, 0.55 * n + 2), max(4, 0.5 * n + 1.5)))
    ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    if n <= 30:
        for i in range(n):
            for j in range(n):
                ax.text(j, i, str(cm[i, j]), ha="center", va="center", fontsize=7,
                        color="white" if share[i, j] > 0.5 else "black")
    ax.set_xticks(range(n), class_names, rotation=45, ha="right")
    ax.set_yticks(range(n), class_names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    _save(fig, Path(path))
    plt.close(fig)
