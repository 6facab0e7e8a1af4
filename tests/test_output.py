"""The predictions writer formats CSV itself (the hot loop of `cnnx classify`): its bytes must
be csv.writer's QUOTE_ALL bytes with the formula escape, for every name a file system allows."""

from __future__ import annotations

import csv
import io

import numpy as np
import pytest

from cnnx.runtime.output import PredictionWriter, csv_header, escape_cell, summary_counts, unescape_cell

NAMES = ["plain", 'say "cheese"', "=cmd", "-neg", "a,b", "new\nline", "tab\tin", "+1", "@home", "'quoted"]
# The first three need no escaping (a batch of them takes the writer's fast path).
PATHS = ["dir/x.jpg", "caf\u00e9.jpg", "raw\udce9.jpg", 'dir/q"uote.jpg', "=SUM(A1).jpg", "-minus.jpg", "a,b.jpg",
         "new\nline.jpg", "\tlead.jpg", "\rcr.jpg", "'apos.jpg", "@at.jpg", "+plus.jpg"]


def reference(paths, indices, scores, topk):
    """What csv.writer wrote before: every cell quoted, formula-escaped text."""
    buf = io.StringIO(newline="")
    w = csv.writer(buf, quoting=csv.QUOTE_ALL, lineterminator="\n")
    w.writerow(csv_header(topk))
    for path, idx, sc in zip(paths, indices, scores):
        row = [escape_cell(path)]
        for j, s in zip(idx, sc):
            row += (escape_cell(NAMES[j]), f"{float(s):.6f}")
        w.writerow(row)
    return buf.getvalue().encode("utf-8", "surrogateescape")


@pytest.mark.parametrize("topk", [1, 3])
@pytest.mark.parametrize("as_arrays", [True, False])
def test_csv_rows_are_csv_writers_bytes(tmp_path, topk, as_arrays):
    rng = np.random.default_rng(topk)
    indices = rng.integers(0, len(NAMES), (len(PATHS), topk))
    scores = rng.random((len(PATHS), topk))
    if not as_arrays:
        indices, scores = [tuple(r) for r in indices.tolist()], [tuple(r) for r in scores.tolist()]
    out = tmp_path / "p.csv"
    writer = PredictionWriter(str(out), "csv", NAMES, topk)
    for start, end in ((0, 3), (3, 7), (7, None)):
        writer.write_batch(PATHS[start:end], indices[start:end], scores[start:end])
    writer.close()
    assert out.read_bytes() == reference(PATHS, np.asarray(indices), np.asarray(scores), topk)
    with open(out, encoding="utf-8", errors="surrogateescape", newline="") as f:
        rows = list(csv.reader(f))[1:]
    assert [unescape_cell(row[0]) for row in rows] == PATHS  # read back as the names they were
    assert len(rows) == len(PATHS) and all(len(row) == 1 + 2 * topk for row in rows)


def test_the_summary_counts_one_image_in_the_singular():
    assert summary_counts(1, {})[0] == "classified 1 image"
    assert summary_counts(0, {})[0] == "classified 0 images"
    assert summary_counts(1_500, {"open": 1}) == ["classified 1,500 images", "skipped 1 (open: 1)"]
