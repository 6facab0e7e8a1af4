"""The predictions writer formats CSV and JSONL itself (the hot loop of `cnnx classify`): its
bytes must be csv.writer's QUOTE_ALL bytes with the formula escape, and json.dumps' bytes of
each row's record, for every name a file system allows."""

from __future__ import annotations

import csv
import io
import json

import numpy as np
import pytest

from cnnx.runtime.output import PredictionWriter, _score_texts, csv_header, escape_cell, summary_counts, unescape_cell

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


def write_in_batches(out, fmt: str, topk: int, indices, scores):
    """PATHS with their indices and scores written to `out` in three uneven batches -> out."""
    writer = PredictionWriter(str(out), fmt, NAMES, topk)
    for start, end in ((0, 3), (3, 7), (7, None)):
        writer.write_batch(PATHS[start:end], indices[start:end], scores[start:end])
    writer.close()
    return out


@pytest.mark.parametrize("topk", [1, 3])
@pytest.mark.parametrize("as_arrays", [True, False])
def test_csv_rows_are_csv_writers_bytes(tmp_path, topk, as_arrays):
    rng = np.random.default_rng(topk)
    indices = rng.integers(0, len(NAMES), (len(PATHS), topk))
    scores = rng.random((len(PATHS), topk))
    if not as_arrays:
        indices, scores = [tuple(r) for r in indices.tolist()], [tuple(r) for r in scores.tolist()]
    out = write_in_batches(tmp_path / "p.csv", "csv", topk, indices, scores)
    assert out.read_bytes() == reference(PATHS, np.asarray(indices), np.asarray(scores), topk)
    with open(out, encoding="utf-8", errors="surrogateescape", newline="") as f:
        rows = list(csv.reader(f))[1:]
    assert [unescape_cell(row[0]) for row in rows] == PATHS  # read back as the names they were
    assert len(rows) == len(PATHS) and all(len(row) == 1 + 2 * topk for row in rows)


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_scores_that_are_not_probabilities_are_written_as_before(tmp_path, fmt):
    """Out of [0, 1] (a caller's own scores, NaN from a NaN logit, -0.0): "%.6f" / json.dumps itself."""
    indices = np.arange(len(PATHS)).reshape(-1, 1) % len(NAMES)
    scores = np.linspace(-0.5, 1.5, len(PATHS)).reshape(-1, 1)
    scores[3, 0] = np.nan
    writes = {"out of range": scores, "-0.0": np.where(np.arange(len(PATHS)) == 2, -0.0, 0.5).reshape(-1, 1)}
    for what, scores in writes.items():
        out = tmp_path / f"{what}.{fmt}"
        writer = PredictionWriter(str(out), fmt, NAMES, 1)
        writer.write_batch(PATHS, indices, scores)
        writer.close()
        want = reference(PATHS, indices, scores, 1) if fmt == "csv" else json_reference(PATHS, indices, scores)
        assert out.read_bytes() == want, what


def json_reference(paths, indices, scores):
    """What the writer wrote before: json.dumps of each row's record."""
    return "".join(json.dumps({"path": p, "label": NAMES[idx[0]], "score": round(float(sc[0]), 6),
                               "topk": [{"label": NAMES[j], "score": round(float(s), 6)} for j, s in zip(idx, sc)]}) + "\n"
                   for p, idx, sc in zip(paths, indices.tolist(), scores.tolist())).encode("ascii")


@pytest.mark.parametrize("topk", [1, 3])
@pytest.mark.parametrize("kind", ["float64", "float32", "lists", "edges", "nan"])
def test_jsonl_rows_are_json_dumps_bytes(tmp_path, topk, kind):
    rng = np.random.default_rng(topk)
    indices = rng.integers(0, len(NAMES), (len(PATHS), topk))
    scores = rng.random((len(PATHS), topk))
    if kind == "float32":
        scores = scores.astype(np.float32)
    elif kind == "edges":
        # repr's whole numbers, exponents and rounding to 0; two near-ties np.round(x, 6) rounds the other way
        scores.ravel()[:8] = [1.0, 0.0, 5e-06, 1e-07, 0.6369615, 0.8132705, 0.9999996, 1e-300]
    elif kind == "nan":  # a NaN logit: json.dumps writes NaN, as it did
        scores[4, 0] = np.nan
    given_indices, given_scores = indices, scores
    if kind == "lists":
        given_indices, given_scores = [tuple(r) for r in indices.tolist()], [tuple(r) for r in scores.tolist()]
    out = write_in_batches(tmp_path / "p.jsonl", "jsonl", topk, given_indices, given_scores)
    assert out.read_bytes() == json_reference(PATHS, indices, scores)
    records = [json.loads(line) for line in out.read_text(encoding="ascii").splitlines()]
    assert [r["path"] for r in records] == PATHS  # read back as the names they were
    assert all(len(r["topk"]) == topk and r["label"] == r["topk"][0]["label"] for r in records)


def test_score_texts_are_the_formatted_score_for_every_six_place_value():
    six = np.arange(1_000_001) / 1e6
    scores = np.concatenate([six, (np.arange(0, 1_000_000, 7) + 0.5) / 1e6,  # ties, as near as a double gets
                             np.random.default_rng(0).random(20_000)])
    for shortest, text in ((True, lambda s: repr(round(s, 6))), (False, lambda s: "%.6f" % s)):
        first, second = _score_texts(scores, shortest)
        assert [a + b for a, b in zip(first.tolist(), second.tolist())] == [text(s) for s in scores.tolist()]


def test_the_summary_counts_one_image_in_the_singular():
    assert summary_counts(1, {})[0] == "classified 1 image"
    assert summary_counts(0, {})[0] == "classified 0 images"
    assert summary_counts(1_500, {"open": 1}) == ["classified 1,500 images", "skipped 1 (open: 1)"]


@pytest.mark.parametrize("which", ["predictions", "errors"])
def test_a_file_that_fills_the_disk_ends_with_its_last_whole_row(tmp_path, which):
    """It ended mid-row (the predictions file, 3 cells of 11; the errors file, 1 of 3), which CSV
    readers choke on. Whichever file fills the disk first is cut back to what it held whole."""
    from _fs_util import mounted_tmpfs

    from cnnx.runtime.output import ErrorsWriter, WriteError

    with mounted_tmpfs(tmp_path / "small", "16k") as disk:
        target = disk / "f.csv"
        writer = (PredictionWriter(str(target), "csv", ["cat", "dog"], 2) if which == "predictions"
                  else ErrorsWriter(str(target)))
        with pytest.raises(WriteError):
            for i in range(10_000):
                path = f"/photos/{i:06d}-{'x' * 40}.jpg"
                if which == "predictions":
                    writer.write_batch([path] * 7, [[0, 1]] * 7, [[0.75, 0.25]] * 7)
                else:
                    writer.write(path, "decode", "image file is truncated (5 bytes not processed)")
        writer.close()
        data = target.read_bytes()
        rows = list(csv.reader(io.StringIO(data.decode())))
        assert data.endswith(b"\n") and len(rows) > 10
        assert {len(row) for row in rows} == {5 if which == "predictions" else 3}


def test_cells_a_spreadsheet_would_run_as_formulas_get_a_leading_quote(tmp_path):
    """Hard-coded bytes (the tests above compare with escape_cell itself, so a start it forgot
    escapes nowhere and passes): a file named '@SUM(1).jpg' is written as "'@SUM(1).jpg", and
    so are paths, class names and error messages starting with = + - @."""
    from cnnx.runtime.output import ErrorsWriter

    for raw, cell in (("@SUM(1).jpg", "'@SUM(1).jpg"), ("=A1.jpg", "'=A1.jpg"), ("+1.jpg", "'+1.jpg"),
                      ("-2.jpg", "'-2.jpg"), ("plain@.jpg", "plain@.jpg")):
        assert escape_cell(raw) == cell and unescape_cell(cell) == raw
    out = tmp_path / "p.csv"
    writer = PredictionWriter(str(out), "csv", ["@home", "cat"], 2)
    writer.write_batch(["dir/plain.jpg"], [[1, 0]], [[0.75, 0.25]])  # the fast path: nothing to escape
    writer.write_batch(["@SUM(1).jpg", "=A1.jpg", "+1.jpg", "-2.jpg"], [[0, 1]] * 4, [[0.5, 0.5]] * 4)
    writer.close()
    assert out.read_text() == (
        '"path","label","score","label_2","score_2"\n'
        '"dir/plain.jpg","cat","0.750000","\'@home","0.250000"\n'
        '"\'@SUM(1).jpg","\'@home","0.500000","cat","0.500000"\n'
        '"\'=A1.jpg","\'@home","0.500000","cat","0.500000"\n'
        '"\'+1.jpg","\'@home","0.500000","cat","0.500000"\n'
        '"\'-2.jpg","\'@home","0.500000","cat","0.500000"\n')
    errors = tmp_path / "p.errors.csv"
    writer = ErrorsWriter(str(errors))
    writer.write("@SUM(1).jpg", "decode", "@bad header")
    writer.close()
    assert errors.read_text() == '"path","stage","error"\n"\'@SUM(1).jpg","decode","\'@bad header"\n'
