"""`cnnx classify` end to end: a real exported ONNX model, real image files on disk, the real
onnxruntime. Every bad-input case of the issue is a file made here; each must become one row
of the errors file while every good file beside it is classified."""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from cnnx.cli import cli
from tests._runtime_util import CLASSES, exported_model, make_onnx_model, photo_like

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return exported_model(tmp_path_factory.mktemp("models"))


def run(args, **kw):
    return CliRunner().invoke(cli, ["classify", *map(str, args)], catch_exceptions=False, **kw)


def read_csv(path):
    with open(path, encoding="utf-8", errors="surrogateescape", newline="") as f:
        return list(csv.reader(f))


def unescape(cell):
    return cell[1:] if cell[:1] == "'" and cell[1:2] in ("=", "+", "-", "@", "\t", "\r", "'") else cell


def save_jpeg(path, arr, **kw):
    Image.fromarray(arr).save(path, "JPEG", quality=90, **kw)


def png_bomb(path, w=100_000, h=100_000):
    """A valid PNG signature + IHDR claiming w x h 8-bit RGB, then a tiny IDAT: ~100 bytes."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))


def make_bad_folder(root: Path) -> dict:
    """Write the issue's bad-input cases (and good images beside them) under root/.
    Returns {path: expectation}: "ok", ("note", text) or (stage, text) for a skipped file."""
    root.mkdir()
    e = {}
    rng = np.random.default_rng(0)

    def p(name):
        return str(root / name)

    for i in range(5):
        save_jpeg(p(f"good_{i}.jpg"), photo_like(int(rng.integers(24, 400)), int(rng.integers(24, 400)), seed=i))
        e[p(f"good_{i}.jpg")] = "ok"
    (root / "empty.jpg").write_bytes(b"")
    e[p("empty.jpg")] = ("open", "empty file")
    (root / "text.jpg").write_text("this is not a picture\n")
    e[p("text.jpg")] = ("open", "not an image")
    whole = io.BytesIO()
    Image.fromarray(photo_like(300, 400, seed=9)).save(whole, "JPEG", quality=90)
    data = whole.getvalue()
    (root / "truncated.jpg").write_bytes(data[: len(data) * 2 // 3])
    e[p("truncated.jpg")] = ("decode", "")
    (root / "corrupt.jpg").write_bytes(data[: len(data) // 2] + b"\0" * 300 + data[len(data) // 2 + 300:])
    e[p("corrupt.jpg")] = ("decode", "corrupt JPEG data")
    png_bomb(root / "bomb.png")
    e[p("bomb.png")] = ("open", "decompression bomb")
    frames = [Image.fromarray(photo_like(40, 40, seed=s)).convert("P") for s in range(3)]
    frames[0].save(p("animated.gif"), save_all=True, append_images=frames[1:], duration=50, loop=0)
    e[p("animated.gif")] = ("note", "first frame of 3")
    pages = [Image.fromarray(photo_like(50, 60, seed=s)) for s in range(2)]
    pages[0].save(p("pages.tif"), save_all=True, append_images=pages[1:])
    e[p("pages.tif")] = ("note", "first frame of 2")
    cut = io.BytesIO()  # Pillow raises TypeError counting its pages, and warns of corrupt EXIF
    pages[0].save(cut, "TIFF", save_all=True, append_images=pages * 2)
    (root / "pages_cut.tif").write_bytes(cut.getvalue()[:len(cut.getvalue()) // 2])
    e[p("pages_cut.tif")] = ("decode", "Missing dimensions")
    (root / "padded.jpg").write_bytes(data[:-2] + b"\0" * 50 + data[-2:])
    e[p("padded.jpg")] = ("note", "50 zero bytes before the JPEG's end marker ignored")
    ex = Image.Exif()
    ex[0x0112] = 6
    save_jpeg(p("rotated.jpg"), photo_like(120, 200, seed=11), exif=ex.tobytes())
    e[p("rotated.jpg")] = "ok"
    good = io.BytesIO()
    Image.fromarray(photo_like(64, 64, seed=12)).save(good, "JPEG")
    bad_exif = b"Exif\0\0" + b"MM\0*\0\0\0\x08\xff\xff"  # IFD says 65535 entries, file ends
    (root / "bad_exif.jpg").write_bytes(good.getvalue()[:2] + b"\xff\xe1" + struct.pack(">H", len(bad_exif) + 2)
                                        + bad_exif + good.getvalue()[2:])
    e[p("bad_exif.jpg")] = ("note", "malformed EXIF ignored")
    pal = Image.fromarray(photo_like(30, 30, seed=13)).convert("P")
    pal.info["transparency"] = 0
    pal.save(p("palette_transparent.png"), transparency=0)
    Image.fromarray(np.dstack([photo_like(40, 40, 14), np.full((40, 40), 128, np.uint8)]), "RGBA").save(p("rgba.png"))
    Image.fromarray(photo_like(40, 40, 15)).convert("LA").save(p("la.png"))
    Image.fromarray(photo_like(40, 40, 16)).convert("CMYK").save(p("cmyk.jpg"), "JPEG")
    Image.fromarray((rng.integers(0, 65535, (40, 40))).astype(np.uint16)).save(p("gray16.png"))
    Image.fromarray(photo_like(40, 40, 17)).convert("1").save(p("onebit.png"))
    Image.new("RGB", (1, 1), (200, 10, 10)).save(p("tiny_1x1.png"))
    Image.fromarray(photo_like(5000, 1, 18)).save(p("strip_1x5000.png"))
    for name in ("palette_transparent.png", "rgba.png", "la.png", "cmyk.jpg", "gray16.png", "onebit.png",
                 "tiny_1x1.png", "strip_1x5000.png"):
        e[p(name)] = "ok"
    assert Image.open(p("gray16.png")).mode.startswith("I;16") and Image.open(p("cmyk.jpg")).mode == "CMYK"
    (root / "photo.heic").write_bytes(struct.pack(">I", 24) + b"ftypheic\0\0\0\0mif1heic" + b"\0" * 100)
    e[p("photo.heic")] = ("open", "HEIC")
    os.symlink(".", root / "loop")  # not followed, and no skip: what it leads to is classified
    outside = root.parent / "outside_target.jpg"
    save_jpeg(outside, photo_like(32, 32, seed=19))
    os.symlink(outside, root / "outside.jpg")
    e[p("outside.jpg")] = ("discover", "symlink not followed")
    os.mkfifo(root / "fifo.jpg")
    e[p("fifo.jpg")] = ("discover", "not a regular file (FIFO)")
    for name in ("a,b.jpg", "new\nline.jpg", "=SUM(A1).jpg", "-minus.jpg", "quote\"d.jpg"):
        save_jpeg(p(name), photo_like(32, 32, seed=len(name)))
        e[p(name)] = "ok"
    raw = os.path.join(os.fsencode(root), b"non-utf8-\xff\xfe.jpg")
    with open(raw, "wb") as f:
        f.write(whole.getvalue())
    e[os.fsdecode(raw)] = "ok"
    (root / "README.txt").write_text("not an image, not an error\n")
    return e


@pytest.fixture(scope="module")
def bad_folder(tmp_path_factory):
    base = tmp_path_factory.mktemp("bad")
    return base / "imgs", make_bad_folder(base / "imgs")


@pytest.fixture(scope="module")
def bad_run(model, bad_folder, tmp_path_factory):
    root, expected = bad_folder
    out = tmp_path_factory.mktemp("bad-out") / "pred.csv"
    r = run([root, "--model", model, "-o", out, "--batch-size", "4", "--topk", "3"])
    return r, out, out.with_name("pred.errors.csv"), expected


def test_bad_inputs_each_become_one_error_row_and_every_good_file_is_classified(bad_run):
    r, out, errors, expected = bad_run
    assert r.exit_code == 0, r.output + r.stderr
    rows = read_csv(out)
    assert rows[0] == ["path", "label", "score", "label_2", "score_2", "label_3", "score_3"]
    classified = [unescape(row[0]) for row in rows[1:]]
    want_ok = [p for p, x in expected.items() if x == "ok" or x[0] == "note"]
    assert sorted(classified) == sorted(want_ok)
    assert classified == sorted(classified, key=os.fsencode)  # sorted path order
    for row in rows[1:]:
        assert row[1] in CLASSES and 0.0 < float(row[2]) <= 1.0 and float(row[2]) >= float(row[4])
    err_rows = read_csv(errors)
    assert err_rows[0] == ["path", "stage", "error"]
    by_path = {}
    for path, stage, message in err_rows[1:]:
        assert unescape(path) not in by_path, f"two rows for {path}"
        by_path[unescape(path)] = (stage, message)
    want_rows = {p: x for p, x in expected.items() if x != "ok"}
    assert set(by_path) == set(want_rows)
    for path, (stage, text) in want_rows.items():
        assert by_path[path][0] == stage, (path, by_path[path])
        assert text in by_path[path][1], (path, by_path[path])
    n_skipped = sum(1 for x in expected.values() if x != "ok" and x[0] != "note")
    assert f"classified {len(want_ok)} images" in r.stderr
    assert f"skipped {n_skipped} (" in r.stderr and "provider CPUExecutionProvider" in r.stderr
    assert "1 non-image files ignored" in r.stderr
    assert "Warning" not in r.stderr  # Pillow's, which name no file: the rows say what happened


def test_csv_cells_are_quoted_escaped_and_keep_awkward_names(model, bad_run, bad_folder, tmp_path, monkeypatch):
    _r, out, _errors, _expected = bad_run
    raw = out.read_bytes()
    names = {os.path.basename(unescape(row[0])) for row in read_csv(out)[1:]}
    assert {"a,b.jpg", "new\nline.jpg", "=SUM(A1).jpg", "-minus.jpg", "quote\"d.jpg"} <= names
    assert b"non-utf8-\xff\xfe.jpg" in raw  # the file's real name, byte for byte
    # Relative paths put the awkward first character at the start of the cell.
    monkeypatch.chdir(bad_folder[0])
    r = run(["--model", model, "-o", tmp_path / "rel.csv", "--", "=SUM(A1).jpg", "-minus.jpg", "a,b.jpg"])
    assert r.exit_code == 0, r.stderr
    raw = (tmp_path / "rel.csv").read_bytes()
    assert b'"\'=SUM(A1).jpg"' in raw and b'"\'-minus.jpg"' in raw and b'"a,b.jpg"' in raw
    rows = read_csv(tmp_path / "rel.csv")
    assert [unescape(row[0]) for row in rows[1:]] == ["-minus.jpg", "=SUM(A1).jpg", "a,b.jpg"]
    for row in rows:
        for cell in row:
            assert cell[:1] not in ("=", "+", "-", "@")  # spreadsheets must not run a cell


def test_strict_makes_a_skip_an_error(model, bad_folder, tmp_path):
    root, _ = bad_folder
    r = run([root, "--model", model, "-o", tmp_path / "p.csv", "--strict"])
    assert r.exit_code == 1 and "--strict" in r.stderr
    assert len(read_csv(tmp_path / "p.csv")) > 10  # the good files were still classified


def test_follow_symlinks_follows_outside_links_but_refuses_a_loop(model, bad_folder, tmp_path):
    root, _ = bad_folder
    r = run([root, "--model", model, "-o", tmp_path / "p.csv", "--follow-symlinks"])
    assert r.exit_code == 0
    errs = {unescape(row[0]): row for row in read_csv(tmp_path / "p.errors.csv")[1:]}
    assert "symlink loop" in errs[str(root / "loop")][2]
    assert str(root / "outside.jpg") in {unescape(row[0]) for row in read_csv(tmp_path / "p.csv")[1:]}


def test_unreadable_file_is_skipped_and_its_neighbours_classified(model, tmp_path_factory):
    import tempfile

    # Tests run as root, where chmod 000 does not stop a read. So the unreadable file is made
    # really unreadable: this process drops its effective uid to nobody for the second run
    # (everything it needs was imported by the first run, as root), and the kernel says no.
    base = Path(tempfile.mkdtemp(prefix="cnnx-unreadable-"))
    try:
        os.chmod(base, 0o777)
        (base / "imgs").mkdir(mode=0o755)
        for i in range(3):
            save_jpeg(base / "imgs" / f"ok_{i}.jpg", photo_like(40, 40, seed=i))
        save_jpeg(base / "imgs" / "secret.jpg", photo_like(40, 40, seed=7))
        os.chmod(base / "imgs" / "secret.jpg", 0o000)
        shutil.copyfile(model, base / "model.onnx")
        os.chmod(base / "model.onnx", 0o644)
        args = [base / "imgs", "--model", base / "model.onnx", "--batch-size", "2"]
        first = run([*args, "-o", base / "warm.csv"])  # as whoever we are: imports everything
        assert first.exit_code == 0
        dropped = os.geteuid() == 0
        if dropped:
            os.setegid(65534)
            os.seteuid(65534)
        try:
            r = run([*args, "-o", base / "p.csv"])
        finally:
            if dropped:
                os.seteuid(0)
                os.setegid(0)
        assert r.exit_code == 0, r.stderr
        assert [os.path.basename(row[0]) for row in read_csv(base / "p.csv")[1:]] == ["ok_0.jpg", "ok_1.jpg", "ok_2.jpg"]
        (row,) = read_csv(base / "p.errors.csv")[1:]
        assert row[0].endswith("secret.jpg") and row[1] == "open" and "Permission denied" in row[2]
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_output_is_in_sorted_path_order_across_folders_and_arguments(model, tmp_path):
    for rel in ("b/x.jpg", "a/z.jpg", "a/sub/y.jpg", "a/b.jpg", "c.jpg", "a/A.jpg"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        save_jpeg(tmp_path / rel, photo_like(32, 32, seed=len(rel)))
    r = run([tmp_path / "c.jpg", tmp_path / "b", tmp_path / "a", "--model", model, "-o", tmp_path / "p.csv",
             "--batch-size", "2"])
    assert r.exit_code == 0, r.stderr
    got = [os.path.relpath(row[0], tmp_path) for row in read_csv(tmp_path / "p.csv")[1:]]
    assert got == ["a/A.jpg", "a/b.jpg", "a/sub/y.jpg", "a/z.jpg", "b/x.jpg", "c.jpg"]


def test_jsonl_and_stdout_agree_with_csv(model, cifar_subset, tmp_path):
    folder = cifar_subset(2)
    r_csv = run([folder, "--model", model, "-o", tmp_path / "p.csv", "--topk", "2"])
    # no --format: the name says jsonl (CSV rows were written into p.jsonl)
    r_json = run([folder, "--model", model, "-o", tmp_path / "p.jsonl", "--topk", "2"])
    r_out = run([folder, "--model", model, "--topk", "2"])
    assert r_csv.exit_code == r_json.exit_code == r_out.exit_code == 0
    r_txt = run([folder, "--model", model, "-o", tmp_path / "p.txt", "--format", "jsonl", "--topk", "2"])
    assert r_txt.exit_code == 0 and (tmp_path / "p.txt").read_bytes() == (tmp_path / "p.jsonl").read_bytes()
    for name, fmt in (("q.csv", "jsonl"), ("q.JSONL", "csv")):  # a --format its name contradicts
        r = run([folder, "--model", model, "-o", tmp_path / name, "--format", fmt])
        assert r.exit_code == 2 and f"is named as a {'CSV' if fmt == 'jsonl' else 'JSONL'} file" in r.stderr, r.stderr
        assert not (tmp_path / name).exists()
    # *.json names one JSON document, which neither format is (CSV rows were written there)
    r = run([folder, "--model", model, "-o", tmp_path / "q.json"])
    assert r.exit_code == 2 and "name it *.csv or *.jsonl" in r.stderr and not (tmp_path / "q.json").exists(), r.stderr
    (tmp_path / "parts.json").mkdir()  # a folder named so is no file: --engine ray's Parquet parts go there
    r = run([folder, "--model", model, "-o", tmp_path / "parts.json"])
    assert r.exit_code == 2 and "Parquet folders need --engine ray" in r.stderr, r.stderr
    r = run([folder, "--model", model, "-o", tmp_path / "q.json", "--format", "jsonl", "--topk", "2"])  # said so
    assert r.exit_code == 0 and (tmp_path / "q.json").read_bytes() == (tmp_path / "p.jsonl").read_bytes()
    # CSV rows an older cnnx wrote into old.jsonl (no --format): --resume continues them as CSV
    half = tmp_path / "half"
    shutil.copytree(folder, half)
    for f in sorted(half.rglob("*.jpg"))[::2]:
        f.unlink()
    assert run([half, "--model", model, "-o", tmp_path / "old.csv", "--topk", "2"]).exit_code == 0
    (tmp_path / "old.csv").rename(tmp_path / "old.jsonl")
    (tmp_path / ".old.csv.run.json").rename(tmp_path / ".old.jsonl.run.json")
    shutil.copytree(folder, half, dirs_exist_ok=True)
    r = run([half, "--model", model, "-o", tmp_path / "old.jsonl", "--topk", "2", "--resume"])
    assert r.exit_code == 0 and "already done" in r.stderr, r.stderr
    assert len(read_csv(tmp_path / "old.jsonl")) == 1 + 20
    rows = read_csv(tmp_path / "p.csv")
    assert r_out.stdout.splitlines()[0] == '"path","label","score","label_2","score_2"'
    assert list(csv.reader(io.StringIO(r_out.stdout))) == rows
    recs = [json.loads(line) for line in (tmp_path / "p.jsonl").read_text().splitlines()]
    assert len(recs) == len(rows) - 1 == 20
    for rec, row in zip(recs, rows[1:]):
        assert rec["path"] == row[0] and rec["label"] == row[1] and abs(rec["score"] - float(row[2])) < 1e-6
        assert [t["label"] for t in rec["topk"]] == [row[1], row[3]]


def test_resume_after_a_killed_run_loses_nothing_and_repeats_nothing(model, cifar_subset, tmp_path):
    folder = cifar_subset(4)  # 40 images
    full = tmp_path / "full.csv"
    assert run([folder, "--model", model, "-o", full, "--batch-size", "8"]).exit_code == 0
    text = full.read_text()
    lines = text.splitlines(keepends=True)
    # A run killed while writing: 25 whole rows, then half of the next one.
    cut = tmp_path / "cut.csv"
    cut.write_text("".join(lines[:26]) + lines[26][:20])
    r = run([folder, "--model", model, "-o", cut, "--batch-size", "8", "--resume"])
    assert r.exit_code == 0, r.stderr
    assert "25 images already in" in r.stderr and "classified 15 images" in r.stderr
    assert cut.read_text() == text
    # Resuming a finished run does nothing; another --topk cannot be appended.
    r = run([folder, "--model", model, "-o", cut, "--resume"])
    assert r.exit_code == 0 and "classified 0 images" in r.stderr and cut.read_text() == text
    r = run([folder, "--model", model, "-o", cut, "--resume", "--topk", "2"])
    assert r.exit_code == 1 and "cannot resume" in r.stderr


def test_resume_counts_the_files_its_errors_file_already_has(model, cifar_subset, tmp_path):
    """The resume line and the summary's "already done" agree: the skips count too."""
    folder = tmp_path / "images"
    shutil.copytree(cifar_subset(1), folder)  # 10 images
    (folder / "cat" / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    out = tmp_path / "p.csv"
    assert run([folder, "--model", model, "-o", out]).exit_code == 0
    r = run([folder, "--model", model, "-o", out, "--resume"])
    assert r.exit_code == 0, r.stderr
    assert f"resume: 10 images already in {out} and 1 skipped file(s) in {tmp_path / 'p.errors.csv'}" in r.stderr
    assert "11 already done (--resume)" in r.stderr, r.stderr
    assert "note:" not in r.stderr
    # a file removed and one renamed since: their rows stay, and are said to be of files not found
    files = sorted(f for f in folder.rglob("*.jpg") if f.name != "broken.jpg")
    files[0].unlink()
    files[1].rename(files[1].with_name("renamed.jpg"))
    r = run([folder, "--model", model, "-o", out, "--resume"])
    assert r.exit_code == 0 and "classified 1 image;" in r.stderr and "9 already done" in r.stderr, r.stderr
    assert f"note: 2 row(s) of {out} or its errors file are of files not found under {folder} this time" in r.stderr


def test_jsonl_resume_drops_a_half_written_line(model, cifar_subset, tmp_path):
    folder = cifar_subset(1)
    full = tmp_path / "full.jsonl"
    assert run([folder, "--model", model, "-o", full, "--format", "jsonl", "--batch-size", "4"]).exit_code == 0
    lines = full.read_text().splitlines(keepends=True)
    cut = tmp_path / "cut.jsonl"
    cut.write_text("".join(lines[:6]) + lines[6][:15])
    r = run([folder, "--model", model, "-o", cut, "--format", "jsonl", "--batch-size", "4", "--resume"])
    assert r.exit_code == 0 and "classified 4 images" in r.stderr
    assert cut.read_text() == full.read_text()
    # Another --topk would append rows of another width (a CSV's header refuses it): refused too.
    for topk, code in (("3", 1), ("5", 0)):
        r = run([folder, "--model", model, "-o", cut, "--format", "jsonl", "--resume", "--topk", topk])
        assert r.exit_code == code and cut.read_text() == full.read_text(), r.stderr
    assert "line 1 holds a top-5, this run writes a top-3" in one_line_error(
        run([folder, "--model", model, "-o", cut, "--format", "jsonl", "--resume", "--topk", "3"]))


def test_existing_output_is_never_overwritten(model, cifar_subset, tmp_path):
    out = tmp_path / "p.csv"
    out.write_text("precious\n")
    r = run([cifar_subset(1), "--model", model, "-o", out])
    assert r.exit_code == 2 and "--resume" in r.stderr and out.read_text() == "precious\n"
    r = run([cifar_subset(1), "--model", model, "-o", out, "--resume"])
    assert r.exit_code == 1 and "cannot resume" in r.stderr and out.read_text() == "precious\n"


def one_line_error(r, code=1):
    assert r.exit_code == code, (r.exit_code, r.stderr)
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 or (code == 2 and lines[-1].startswith("Error:")), r.stderr
    assert "Traceback" not in r.stderr + r.stdout
    return lines[-1]


def test_fatal_model_errors_are_one_line(model, cifar_subset, tmp_path):
    folder = cifar_subset(1)
    assert "model not found" in one_line_error(run([folder, "--model", tmp_path / "nope.onnx"]))
    (tmp_path / "corrupt.onnx").write_bytes(os.urandom(2000))
    assert "cannot load model" in one_line_error(run([folder, "--model", tmp_path / "corrupt.onnx"]))
    truncated = tmp_path / "truncated.onnx"
    truncated.write_bytes(model.read_bytes()[:5000])
    assert "cannot load model" in one_line_error(run([folder, "--model", truncated]))
    floaty = make_onnx_model(tmp_path / "float.onnx", input_dtype="float32")
    assert "not a cnnx model" in one_line_error(run([folder, "--model", floaty]))
    bare = make_onnx_model(tmp_path / "bare.onnx", metadata={"cnnx.preprocess": None})
    assert "cnnx.preprocess" in one_line_error(run([folder, "--model", bare]))
    badspec = make_onnx_model(tmp_path / "badspec.onnx", metadata={"cnnx.preprocess": json.dumps({"size": 3})})
    assert "bad cnnx metadata" in one_line_error(run([folder, "--model", badspec]))


def test_empty_or_missing_path_is_fatal(model, tmp_path):
    (tmp_path / "empty").mkdir()
    assert "no files found" in one_line_error(run([tmp_path / "empty", "--model", model]))
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "notes.txt").write_text("x")
    assert "other files ignored" in one_line_error(run([tmp_path / "docs", "--model", model]))
    assert "does not exist" in one_line_error(run([tmp_path / "missing", "--model", model]), code=2)
    assert not list((tmp_path / "empty").iterdir())


def test_newest_model_under_runs_is_used_and_said(model, cifar_subset, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert "no runs/ folder" in one_line_error(run([cifar_subset(1)]))
    (tmp_path / "runs" / "old" / "export").mkdir(parents=True)
    (tmp_path / "runs" / "old" / "export" / "model.onnx").write_bytes(b"stale and broken")
    os.utime(tmp_path / "runs" / "old" / "export" / "model.onnx", (1, 1))
    (tmp_path / "runs" / "new" / "export").mkdir(parents=True)
    shutil.copyfile(model, tmp_path / "runs" / "new" / "export" / "model.onnx")
    os.utime(tmp_path / "runs" / "new" / "export" / "model.onnx", (2, 2))
    # Newer, but not the model to use: an exporter's half-written staging copy, a variant.
    (tmp_path / "runs" / "new" / "export" / ".cnnx-export-abc").mkdir()
    (tmp_path / "runs" / "new" / "export" / ".cnnx-export-abc" / "model.onnx").write_bytes(b"half")
    (tmp_path / "runs" / "new" / "export" / "model.int8.onnx").write_bytes(b"variant")
    r = run([cifar_subset(1)])
    assert r.exit_code == 0, r.stderr
    assert "runs/new/export/model.onnx (newest under runs/)" in r.stderr


def test_device_cuda_without_a_working_provider_is_a_one_line_error(model, cifar_subset):
    from cnnx.runtime.contract import cuda_driver_present

    if cuda_driver_present():
        pytest.skip("this machine has an NVIDIA driver; the CUDA run is tested by test_cuda_provider_runs")
    line = one_line_error(run([cifar_subset(1), "--model", model, "--device", "cuda"]))
    assert "--device cuda" in line
    r = run([cifar_subset(1), "--model", model, "--device", "auto"])
    assert r.exit_code == 0 and "provider CPUExecutionProvider" in r.stderr
    assert "onnxruntime" not in r.stderr.lower().replace("onnxruntime's", "")  # no provider noise


def test_cuda_provider_runs(model, cifar_subset):
    from cnnx.runtime.contract import cuda_driver_present

    if not cuda_driver_present():
        pytest.skip("no NVIDIA driver on this machine")
    r = run([cifar_subset(1), "--model", model, "--device", "cuda"])
    assert r.exit_code == 0, r.stderr
    assert "provider CUDAExecutionProvider" in r.stderr


def test_classify_runs_where_torch_cannot_be_imported(model, cifar_subset, tmp_path):
    blocker = tmp_path / "blocker" / "torch"
    blocker.mkdir(parents=True)
    (blocker / "__init__.py").write_text("raise ImportError('torch is not installed here (test)')\n")
    env = dict(os.environ, PYTHONPATH=str(blocker.parent))
    no_torch = subprocess.run([sys.executable, "-c", "import torch"], env=env, capture_output=True, text=True)
    assert no_torch.returncode != 0 and "not installed here" in no_torch.stderr
    out = tmp_path / "p.csv"
    r = subprocess.run([sys.executable, "-m", "cnnx", "classify", str(cifar_subset(1)), "--model", str(model),
                        "-o", str(out)], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert len(read_csv(out)) == 11 and "classified 10 images" in r.stderr


def test_runtime_imports_no_torch_and_the_command_module_is_cheap():
    code = (
        "import sys\n"
        "import cnnx.runtime.command\n"
        "cheap = sorted(m for m in ('numpy', 'onnxruntime', 'PIL', 'torch') if m in sys.modules)\n"
        "import cnnx.runtime.model, cnnx.runtime.pipeline, cnnx.runtime.output, cnnx.runtime.discover\n"
        "import cnnx.runtime.preprocess, onnxruntime, simplejpeg\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'torchvision', 'onnx', 'onnxscript',\n"
        "               'matplotlib') or m.startswith(('cnnx.train', 'cnnx.export')))\n"
        "print(cheap, heavy)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[] []"


def test_names_that_are_not_utf8_print_their_bytes_in_messages(model, tmp_path):
    """Warnings and errors show a name's bytes that are not UTF-8 as \\xNN, not as the
    surrogate escapes (\\udcNN) Python decodes them to, in a real process's stderr."""
    from cnnx.runtime.files import shown

    assert shown(b"a\xff b.jpg") == r"'a\xff b.jpg'" and shown("caf\u00e9.jpg") == "'caf\u00e9.jpg'"
    assert shown("it's\nx\\y") == r"'it\'s\nx\\y'"  # one line, escaped as repr escapes
    root = os.fsencode(tmp_path / "imgs")
    os.makedirs(os.path.join(root, b"empty-\xfe"))
    save_jpeg(os.path.join(root, b"ok.jpg"), photo_like(32, 32, seed=1))
    with open(os.path.join(root, b"broken-\xff.jpg"), "wb") as f:
        f.write(b"not a jpeg")

    def classify(*paths):
        return subprocess.run([sys.executable, "-m", "cnnx", "classify", *paths, "--model", os.fsencode(model)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    r = classify(root)
    assert r.returncode == 0, r.stderr
    assert b"warning: '" + root + rb"/broken-\xff.jpg': open:" in r.stderr
    for missing_or_empty in (os.path.join(root, b"empty-\xfe"), os.path.join(root, b"gone-\xfe")):
        r = classify(missing_or_empty)
        assert r.returncode in (1, 2) and rb"\xfe" in r.stderr and b"\\udc" not in r.stderr, r.stderr
    # A model so named (onnxruntime's bindings refused the path: "incompatible constructor
    # arguments"), in such a folder too; on stdout a path is the path, its own bytes, as
    # surrogateescape wrote them (a script reads it back).
    odd = os.path.join(os.fsencode(tmp_path), b"m\xfd.onnx")
    shutil.copyfile(model, odd)
    r = subprocess.run([sys.executable, "-m", "cnnx", "info", odd], capture_output=True)
    assert r.returncode == 0 and odd in r.stdout and rb"\xfd" not in r.stdout, r.stderr
    os.makedirs(os.path.join(os.fsencode(tmp_path), b"f\xfc"))
    shutil.copyfile(model, os.path.join(os.fsencode(tmp_path), b"f\xfc", b"model.onnx"))
    for path in (odd, os.path.join(os.fsencode(tmp_path), b"f\xfc", b"model.onnx")):
        r = subprocess.run([sys.executable, "-m", "cnnx", "classify", os.path.join(root, b"ok.jpg"), "--model", path],
                           capture_output=True)
        assert r.returncode == 0 and r.stdout.count(b"\n") == 2, r.stderr
