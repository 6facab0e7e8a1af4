"""Helpers for the Ray engine tests: a folder of real CIFAR JPEGs with bad files beside them,
reading predictions back (CSV, JSONL, Parquet) and finding the processes of Ray actors."""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
from pathlib import Path

from PIL import Image

from tests._runtime_util import photo_like


def make_mixed_folder(root: Path, cifar: Path) -> Path:
    """root/ with copies of the real JPEGs under `cifar` (class subfolders kept) and the bad
    cases: an empty file, a truncated JPEG, a text file named .jpg, an animated GIF (a note),
    a FIFO and a symlink (discover-stage rows) and a name that is not UTF-8."""
    shutil.copytree(cifar, root)
    bad = root / "bad"
    bad.mkdir()
    (bad / "empty.jpg").write_bytes(b"")
    (bad / "text.jpg").write_text("this is not a picture\n")
    whole = io.BytesIO()
    Image.fromarray(photo_like(300, 400, seed=9)).save(whole, "JPEG", quality=90)
    (bad / "truncated.jpg").write_bytes(whole.getvalue()[: len(whole.getvalue()) * 2 // 3])
    frames = [Image.fromarray(photo_like(40, 40, seed=s)).convert("P") for s in range(3)]
    frames[0].save(bad / "animated.gif", save_all=True, append_images=frames[1:], duration=50, loop=0)
    os.mkfifo(bad / "fifo.jpg")
    os.symlink(root.parent / "not-classified.jpg", bad / "link.jpg")  # to no file a PATH classifies: a skip
    Image.fromarray(photo_like(32, 32, seed=3)).save(os.path.join(os.fsencode(bad), b"non-utf8-\xff.jpg"), "JPEG")
    return root


def read_predictions(path) -> list:
    """[(path, [labels], [scores])] in file order from a CSV, a JSONL file or a Parquet folder
    (whose parts sort in the order they were written)."""
    path = Path(path)
    if path.is_dir():
        import pyarrow.parquet as pq

        rows = []
        for part in sorted(path.glob("part-*.parquet")):
            for rec in pq.read_table(part).to_pylist():
                k = sum(1 for c in rec if c.startswith("label"))
                labels = [rec["label"]] + [rec[f"label_{i}"] for i in range(2, k + 1)]
                scores = [rec["score"]] + [rec[f"score_{i}"] for i in range(2, k + 1)]
                rows.append((rec["path"], labels, scores))  # names that are not UTF-8 as parquet_name() writes them
        return rows
    with open(path, encoding="utf-8", errors="surrogateescape", newline="") as f:
        if path.suffix == ".jsonl":
            return [(r["path"], [t["label"] for t in r["topk"]], [t["score"] for t in r["topk"]])
                    for r in map(json.loads, f)]
        table = list(csv.reader(f))[1:]
    return [(unescape(r[0]), r[1::2], [float(s) for s in r[2::2]]) for r in table]


def read_errors(path) -> list:
    """[(path, stage, error)] rows of an errors CSV."""
    with open(path, encoding="utf-8", errors="surrogateescape", newline="") as f:
        return [(unescape(r[0]), r[1], unescape(r[2])) for r in list(csv.reader(f))[1:]]


def unescape(cell: str) -> str:
    return cell[1:] if cell[:1] == "'" and cell[1:2] in ("=", "+", "-", "@", "\t", "\r", "'") else cell


def actor_pids(class_name: str = "_ClassifyActor") -> list:
    """Process ids of this machine's Ray actor processes running `class_name` (Ray names the
    process `ray::MapWorker(MapBatches(<class>))`)."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmd = f.read()
        except OSError:
            continue
        if cmd.startswith(b"ray::") and class_name.encode() in cmd:
            pids.append(int(entry))
    return pids
