"""`cnnx classify` against a hostile user and a crashing machine (issue 12): models that do
not give one row per image, two writers on one output, resume spellings, memory bombs in
metadata and model sizes, a full disk, very deep folders, SIGINT, symlinked outputs and
unreadable files named on the command line. Real models, files, subprocesses and tmpfs."""

from __future__ import annotations

import csv
import io
import os
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from _fs_util import mounted_tmpfs
from click.testing import CliRunner
from PIL import Image

from cnnx.cli import cli
from tests._runtime_util import CLASSES, photo_like, tiny_onnx_model

ROOT = Path(__file__).resolve().parents[1]


def run(args, **kw):
    return CliRunner().invoke(cli, ["classify", *map(str, args)], catch_exceptions=False, **kw)


def read_csv(path):
    with open(path, encoding="utf-8", errors="surrogateescape", newline="") as f:
        return list(csv.reader(f))


def one_line_error(r, code=1):
    assert r.exit_code == code, (r.exit_code, r.stderr)
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, r.stderr
    assert "Traceback" not in r.stderr + r.stdout
    return lines[0]


def cnnx_subprocess(*args, **kw):
    return subprocess.Popen([sys.executable, "-m", "cnnx", "classify", *map(str, args)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return tiny_onnx_model(tmp_path_factory.mktemp("tiny") / "model.onnx")


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("imgs") / "imgs"
    root.mkdir()
    for i in range(12):
        Image.fromarray(photo_like(24 + i, 30, seed=i)).save(root / f"img_{i:02d}.png")
    return root


# -- 2. a model must give one row per image ------------------------------------------------

def test_a_run_that_could_read_nothing_it_was_given_fails_like_one_that_found_nothing(model, images, tmp_path):
    """A folder its user may not list (or every entry a link not followed) classified nothing and
    exited 0, as a run that finished with warnings, leaving no output file."""
    folder = tmp_path / "links"
    folder.mkdir()
    os.symlink(tmp_path / "nowhere.jpg", folder / "a.jpg")
    os.symlink(tmp_path / "elsewhere.jpg", folder / "b.jpg")
    r = run([folder, "--model", model, "-o", tmp_path / "p.csv"])
    assert r.exit_code == 1, r.stderr
    assert r.stderr.strip().splitlines()[-1] == (f"Error: nothing under {folder} could be read: 2 path(s) failed before "
                                                 "any image was opened (each is listed with its reason)")
    assert [row[1] for row in read_csv(tmp_path / "p.errors.csv")[1:]] == ["discover", "discover"]
    shutil.copyfile(sorted(images.iterdir())[0], folder / "c.png")
    assert run([folder, "--model", model, "-o", tmp_path / "q.csv"]).exit_code == 0  # one image read: warnings


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_an_image_the_model_gives_non_finite_scores_is_an_errors_row_not_class_0(fmt, tmp_path):
    """NaN or inf logits (an fp16 export overflowing) were written as class 0 with score nan,
    exit 0, and as a bare NaN in JSONL (not JSON); evaluate refuses such a model."""
    import json

    model = tiny_onnx_model(tmp_path / "m.onnx", batch_out="nan-when-dark")
    folder = tmp_path / "imgs"
    folder.mkdir()
    Image.new("RGB", (32, 32), (0, 0, 0)).save(folder / "a_dark.png")
    Image.new("RGB", (32, 32), (200, 100, 50)).save(folder / "b_lit.png")
    out, errors = tmp_path / f"p.{fmt}", tmp_path / "e.csv"
    r = run([folder, "--model", model, "-o", out, "--format", fmt, "--errors", errors])
    assert r.exit_code == 0, r.output
    lines = out.read_text().splitlines()
    if fmt == "jsonl":
        rows = [json.loads(line, parse_constant=lambda c: pytest.fail(f"not JSON: {c}")) for line in lines]
        assert [row["path"] for row in rows] == [str(folder / "b_lit.png")]
    else:
        assert [row[0] for row in read_csv(out)[1:]] == [str(folder / "b_lit.png")] and "nan" not in out.read_text()
    assert read_csv(errors)[1:] == [[str(folder / "a_dark.png"), "model", "the model gave this image non-finite "
                                     "scores (NaN or inf: an fp16 export overflowing?)"]]


@pytest.mark.parametrize("decode", ["threads", "processes"])
def test_a_batch_runs_its_decoded_images_not_its_padding(decode, tmp_path):
    """A batch with fewer files than --batch-size ran its zero padding too: one file at
    --batch-size 65536 ran 65,536 images (17 GB, 40 s). The model here scales its scores by
    the images of the run, so they say how many it ran."""
    from cnnx.runtime.api import Classifier

    model = tiny_onnx_model(tmp_path / "m.onnx", batch_out="times-rows")
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(3):
        Image.new("RGB", (32, 32), (40 * i, 100, 50)).save(folder / f"{i}.png")
    with Classifier(model, "cpu", batch_size=4096, decode=decode, workers=2) as clf:
        rows = list(clf.classify([folder]))
        with Classifier(model, "cpu", batch_size=3, decode="threads") as alone:
            want = list(alone.classify([folder]))
    assert [r.scores for r in rows] == [r.scores for r in want] and len(rows) == 3


def test_a_model_whose_output_batch_is_fixed_is_refused_at_load(images, tmp_path):
    reduced = tiny_onnx_model(tmp_path / "reduced.onnx", batch_out="reduced")  # logits [1, C] for any N
    line = one_line_error(run([images, "--model", reduced, "-o", tmp_path / "p.csv"]))
    assert "output batch dimension is 1" in line and "one row per image" in line
    assert not (tmp_path / "p.csv").exists()


def test_a_model_that_returns_the_wrong_number_of_rows_stops_before_writing_them(images, tmp_path):
    first_row = tiny_onnx_model(tmp_path / "first_row.onnx", batch_out="first-row")  # symbolic, but 1 row
    line = one_line_error(run([images, "--model", first_row, "-o", tmp_path / "p.csv", "--batch-size", "4"]))
    assert "not one row per image" in line and "for 4 images" in line
    assert not (tmp_path / "p.csv").exists()  # no row of that batch was written
    fewer = tiny_onnx_model(tmp_path / "fewer.onnx", batch_out="fewer-scores")
    line = one_line_error(run([images, "--model", fewer, "-o", tmp_path / "p.csv", "--batch-size", "4"]))
    assert line == f"Error: {fewer}: the model gives {len(CLASSES) - 1} scores an image, but its metadata names " \
                   f"{len(CLASSES)} classes"
    assert not (tmp_path / "p.csv").exists()


# -- 3. one writer per output --------------------------------------------------------------

def wait_for(condition, what, timeout=60.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.002)


def test_a_second_writer_on_the_same_output_is_refused_and_a_dead_holder_blocks_nothing(cifar_subset, model,
                                                                                        tmp_path):
    """... or on its errors file, which `-o p` and `-o p.csv` share by default."""
    folder = cifar_subset(6)  # 60 images
    out = tmp_path / "p.csv"
    lock = tmp_path / ".p.csv.lock"
    first = cnnx_subprocess(folder, "--model", model, "-o", out, "--resume", "--batch-size", "1", "--workers", "1")
    try:
        # Stop the first run while it holds the lock (taken before the output is read or
        # created), so the second surely runs while the first is mid-way.
        wait_for(lambda: lock.exists() and lock.read_text() == str(first.pid), "the first run's lock")
        os.kill(first.pid, signal.SIGSTOP)
        second = cnnx_subprocess(folder, "--model", model, "-o", out, "--resume")
        _stdout, stderr = second.communicate(timeout=120)
        assert second.returncode == 1, stderr
        lines = [line for line in stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and "being written by another cnnx classify" in lines[0]
        assert f"pid {first.pid}" in lines[0]
        # `-o p` shares p.csv's default errors file, p.errors.csv: one of the two ended half-way
        other = cnnx_subprocess(folder, "--model", model, "-o", tmp_path / "p")
        _stdout, stderr = other.communicate(timeout=120)
        assert other.returncode == 1 and stderr.strip().splitlines() == [
            f"Error: {tmp_path / 'p.errors.csv'}, this run's errors file, is being written by another cnnx classify "
            f"(pid {first.pid}), perhaps as another output's: wait for it to finish, or name another --errors file"], \
            stderr
        assert not (tmp_path / "p").exists()
        # A holder killed -9 (the kernel drops its flock) leaves nothing that blocks a resume.
        first.kill()
        first.wait(timeout=60)
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    third = cnnx_subprocess(folder, "--model", model, "-o", out, "--resume")
    _stdout, stderr = third.communicate(timeout=120)
    assert third.returncode == 0, stderr
    rows = read_csv(out)
    assert rows[0][0] == "path" and all(row[0] != "path" for row in rows[1:])  # one header
    paths = [row[0] for row in rows[1:]]
    assert len(paths) == len(set(paths)) == 60
    assert not lock.exists()


# -- 4. --resume matches the file, not the spelling ----------------------------------------

def test_names_are_written_and_read_back_as_their_utf8_bytes_in_a_locale_that_is_not_utf8(images, model, tmp_path):
    """With an ASCII (or Latin-1) file system encoding, café.jpg's row was read back as another
    string than its path: a --resume classified it again (two rows), and in Latin-1 the row was
    written as Ã© (a name no file has), the report had no thumbnail of it; train named the class
    folder émile `Ã©mile`."""
    work = tmp_path / "imgs"
    work.mkdir()
    for i, name in enumerate(["café.jpg", "plain.jpg", "zz.jpg"]):
        shutil.copyfile(sorted(images.iterdir())[i], work / name)
    (tmp_path / "data" / "émile").mkdir(parents=True)
    (tmp_path / "data" / "cat").mkdir()
    env = {**os.environ, "LC_ALL": "C", "PYTHONUTF8": "0", "PYTHONCOERCECLOCALE": "0"}
    out = tmp_path / "p.csv"

    def classify(*extra):
        r = subprocess.run([sys.executable, "-m", "cnnx", "classify", str(work), "--model", str(model), "--topk", "1",
                            "-o", str(out), *extra], capture_output=True, env=env, timeout=300)
        assert r.returncode == 0, r.stderr.decode(errors="replace")[-2000:]

    classify("--report", str(tmp_path / "r.html"))
    assert "codec" not in (tmp_path / "r.html").read_text()  # café's thumbnail: 'ascii' codec can't encode
    rows = out.read_bytes().split(b"\n")[1:-1]
    assert [row.split(b",")[0] for row in rows] == [b'"%s/%s"' % (bytes(work), n.encode()) for n in
                                                    ("café.jpg", "plain.jpg", "zz.jpg")]
    with open(out, "r+b") as f:  # the run cut short after the café row (same file: its run record holds)
        f.truncate(len(out.read_bytes().split(b"\n", 2)[0]) + 1 + len(rows[0]) + 1)
    classify("--resume")
    assert out.read_bytes().split(b"\n")[1:-1] == rows
    for folder in ("émile", "cat"):
        shutil.copyfile(work / "zz.jpg", tmp_path / "data" / folder / "1.jpg")
    names = subprocess.run([sys.executable, "-c", "import sys; from pathlib import Path; from cnnx.train.data import "
                            "list_image_folder; print(ascii(list_image_folder(Path(sys.argv[1])).class_names))",
                            str(tmp_path / "data")], capture_output=True, text=True, env=env, timeout=300)
    assert names.stdout == "['cat', '\\xe9mile']\n", names.stderr[-2000:]


def test_resume_matches_paths_however_the_folder_is_spelt(images, model, tmp_path, monkeypatch):
    work = tmp_path / "work"
    shutil.copytree(images, work / "imgs")
    monkeypatch.chdir(work)
    out = tmp_path / "p.csv"
    assert run(["imgs", "--model", model, "-o", out, "--batch-size", "5"]).exit_code == 0
    text = out.read_text()
    assert read_csv(out)[1][0] == "imgs/img_00.png"  # the path as the user typed it
    for spelling in ("./imgs", "imgs/../imgs", str(work / "imgs"), "imgs/"):
        r = run([spelling, "--model", model, "-o", out, "--resume"])
        assert r.exit_code == 0, r.stderr
        assert "classified 0 images" in r.stderr and "12 already done" in r.stderr, (spelling, r.stderr)
        assert out.read_text() == text


# -- 8. metadata bombs in a PNG ------------------------------------------------------------

def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def zlib_of_repeated(block: bytes, times: int) -> bytes:
    """zlib.compress(block * times), built in a fraction of the time: after a full flush
    deflate forgets its history, so every further copy of the block compresses to the
    same bytes."""
    co = zlib.compressobj(9, zlib.DEFLATED, -15)
    first = co.compress(block) + co.flush(zlib.Z_FULL_FLUSH)
    repeat = co.compress(block) + co.flush(zlib.Z_FULL_FLUSH)
    adler = 1
    for _ in range(times):
        adler = zlib.adler32(block, adler)
    return b"\x78\xda" + first + repeat * (times - 1) + co.flush() + struct.pack(">I", adler)


def png_with_chunk(path: Path, extra: bytes) -> np.ndarray:
    arr = photo_like(48, 64, seed=3)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG")
    data = buf.getvalue()
    ihdr_end = 8 + 25  # signature + IHDR chunk
    with open(path, "wb") as f:
        f.write(data[:ihdr_end])
        f.write(extra)
        f.write(data[ihdr_end:])
    return arr


# Peak RSS from VmHWM: getrusage's ru_maxrss would also count the parent's RSS at the fork.
PEAK_RSS = """
import sys
import numpy as np
from cnnx.runtime.preprocess import load_image, make_spec
spec = make_spec((48, 64), (0.5,) * 3, (0.25,) * 3)
arr, note = load_image(sys.argv[1], spec)
np.save(sys.argv[2], arr)
status = dict(line.split(":", 1) for line in open("/proc/self/status"))
print(int(status["VmHWM"].split()[0]) // 1024)
print(note)
"""


@pytest.mark.parametrize("kind", ["zTXt", "iTXt"])
def test_a_png_with_a_huge_text_chunk_decodes_in_bounded_memory(kind, tmp_path):
    if kind == "zTXt":  # 600 MB of text compressed to ~600 KB on disk
        extra = png_chunk(b"zTXt", b"Comment\0\0" + zlib_of_repeated(b"A" * (1 << 20), 600))
    else:  # 200 MB stored as it is (the file is under the 1 GiB size cap)
        extra = png_chunk(b"iTXt", b"XML:com.adobe.xmp\0\0\0\0\0" + b"B" * (200 << 20))
    path = tmp_path / "text_bomb.png"
    arr = png_with_chunk(path, extra)
    del extra
    r = subprocess.run([sys.executable, "-c", PEAK_RSS, str(path), str(tmp_path / "out.npy")], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    peak_mb, note = r.stdout.splitlines()
    assert int(peak_mb) < 300, f"peak RSS {peak_mb} MB decoding one PNG"
    assert note.startswith("PNG metadata chunk") and kind in note
    assert np.array_equal(np.load(tmp_path / "out.npy"), arr.transpose(2, 0, 1))  # the pixels, unchanged


def test_a_png_with_a_huge_text_chunk_is_classified_with_a_note(model, tmp_path):
    (tmp_path / "imgs").mkdir()
    png_with_chunk(tmp_path / "imgs" / "bomb.png", png_chunk(b"tEXt", b"Comment\0" + b"C" * (20 << 20)))
    r = run([tmp_path / "imgs", "--model", model, "-o", tmp_path / "p.csv"])
    assert r.exit_code == 0, r.stderr
    assert len(read_csv(tmp_path / "p.csv")) == 2
    (note,) = read_csv(tmp_path / "p.errors.csv")[1:]
    assert note[1] == "note" and "tEXt of 20,971,528 bytes" in note[2]


# -- 9. the model's input size -------------------------------------------------------------

def test_an_absurd_preprocess_size_with_symbolic_height_and_width_is_one_line(images, tmp_path):
    huge = tiny_onnx_model(tmp_path / "huge.onnx", size=(100_000, 100_000), fixed_hw=False)
    line = one_line_error(run([images, "--model", huge]))
    assert "100000x100000 exceeds the limit of 4096" in line


def test_a_large_input_size_reduces_the_batch_instead_of_allocating_gigabytes(tmp_path):
    from cnnx.runtime import Classifier
    from cnnx.runtime.pipeline import MAX_BATCH_BYTES, MAX_READ_AHEAD_BYTES

    big = tiny_onnx_model(tmp_path / "big.onnx", size=(4000, 4000), fixed_hw=False)
    (tmp_path / "imgs").mkdir()
    for i in range(3):
        Image.fromarray(photo_like(40, 50, seed=i)).save(tmp_path / "imgs" / f"{i}.png")
    with Classifier(big, "cpu", workers=2) as clf:  # default batch_size 256: 12 GiB of pixels
        per_image = 3 * 4000 * 4000
        assert clf.requested_batch_size == 256 and clf.batch_size * per_image <= MAX_BATCH_BYTES
        assert clf.config.read_ahead(clf.info.spec) * clf.batch_size * per_image <= MAX_READ_AHEAD_BYTES
        rows = list(clf.classify([tmp_path / "imgs"]))
    assert [os.path.basename(r.path) for r in rows] == ["0.png", "1.png", "2.png"]
    r = run([tmp_path / "imgs", "--model", big, "-o", tmp_path / "p.csv", "--workers", "1"])
    assert r.exit_code == 0, r.stderr
    assert "--batch-size 256 reduced to 5" in r.stderr and len(read_csv(tmp_path / "p.csv")) == 4


# -- 11. full disk, very deep folders ------------------------------------------------------

@pytest.fixture
def small_tmpfs(tmp_path):
    with mounted_tmpfs(tmp_path / "small", "16k") as mount:
        yield mount


def test_a_full_disk_is_one_line_and_no_traceback(cifar_subset, model, small_tmpfs):
    out = small_tmpfs / "p.csv"
    r = run([cifar_subset(10), "--model", model, "-o", out, "--topk", "10", "--batch-size", "8"])
    line = one_line_error(r)
    assert line == f"Error: cannot write: No space left on device: {out}"
    # What was written is whole batches: the one that did not fit is taken back (the file ended
    # mid-row, which CSV readers choke on)
    rows = read_csv(out)
    assert rows[0][0] == "path" and out.read_bytes().endswith(b"\n") and len(rows) > 1
    assert {len(row) for row in rows} == {21} and (len(rows) - 1) % 8 == 0


def make_deep(base: Path, depth: int, leaf_png: bytes) -> None:
    """base/d/d/.../d/deep.png, depth folders, made relative to open folders (no long paths)."""
    fd = os.open(base, os.O_RDONLY)
    try:
        for _ in range(depth):
            os.mkdir("d", dir_fd=fd)
            sub = os.open("d", os.O_RDONLY, dir_fd=fd)
            os.close(fd)
            fd = sub
        leaf = os.open("deep.png", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd)
        os.write(leaf, leaf_png)
        os.close(leaf)
    finally:
        os.close(fd)


def remove_deep(base: Path, depth: int) -> None:
    """Bottom-up, relative to open folders (shutil.rmtree recurses once per level)."""
    fds = [os.open(base, os.O_RDONLY)]
    try:
        for _ in range(depth):
            fds.append(os.open("d", os.O_RDONLY, dir_fd=fds[-1]))
        os.unlink("deep.png", dir_fd=fds[-1])
        for i in range(depth, 0, -1):
            os.close(fds.pop())
            os.rmdir("d", dir_fd=fds[i - 1])
    finally:
        for fd in fds:
            os.close(fd)


def test_folders_nested_1500_deep_are_walked_without_recursion(model, tmp_path):
    buf = io.BytesIO()
    Image.fromarray(photo_like(32, 32, seed=5)).save(buf, "PNG")
    base = tmp_path / "deep"
    base.mkdir()
    Image.fromarray(photo_like(32, 32, seed=6)).save(base / "top.png")
    make_deep(base, 1500, buf.getvalue())
    try:
        r = run([base, "--model", model, "-o", tmp_path / "p.csv"])
        assert r.exit_code == 0, r.stderr
        paths = [row[0] for row in read_csv(tmp_path / "p.csv")[1:]]
        assert paths == [str(base / ("d/" * 1500) / "deep.png"), str(base / "top.png")]
    finally:
        remove_deep(base, 1500)


def test_output_is_in_full_path_order_not_depth_first(model, tmp_path):
    for rel in ("a/b/c.png", "a/b-x.png", "a/b.png", "a/b0.png", "a.png", "a-b.png", "a/b/c/d.png", "a/b/c-d.png"):
        (tmp_path / "in" / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(photo_like(16, 16, seed=len(rel))).save(tmp_path / "in" / rel)
    r = run([tmp_path / "in" / "a", tmp_path / "in" / "a.png", tmp_path / "in" / "a-b.png", "--model", model,
             "-o", tmp_path / "p.csv", "--batch-size", "3"])
    assert r.exit_code == 0, r.stderr
    got = [row[0] for row in read_csv(tmp_path / "p.csv")[1:]]
    assert got == sorted(got, key=os.fsencode) and len(got) == 8
    assert [os.path.relpath(p, tmp_path / "in") for p in got][:4] == ["a-b.png", "a.png", "a/b-x.png", "a/b.png"]


# -- 13. symlinked output, SIGINT, unreadable file named on the command line ---------------

def test_resume_that_drops_a_cut_short_row_keeps_a_symlinked_output_and_its_mode(images, model, tmp_path):
    out = tmp_path / "p.csv"
    assert run([images, "--model", model, "-o", out, "--batch-size", "4"]).exit_code == 0
    full = out.read_text()
    lines = full.splitlines(keepends=True)
    real = tmp_path / "kept" / "real.csv"
    real.parent.mkdir()
    real.write_text("".join(lines[:6]) + lines[6][:10])  # killed while writing row 6
    os.chmod(real, 0o640)
    link = tmp_path / "link.csv"
    os.symlink(real, link)
    r = run([images, "--model", model, "-o", link, "--resume", "--batch-size", "4"])
    assert r.exit_code == 0, r.stderr
    assert link.is_symlink() and os.readlink(link) == str(real)
    assert real.read_text() == full and (real.stat().st_mode & 0o777) == 0o640


@pytest.mark.parametrize("sidecar", [".p.csv.lock", ".p.csv.run.json"])
def test_a_symlink_planted_under_an_outputs_lock_or_run_record_is_refused_not_written_through(sidecar, images, model,
                                                                                              tmp_path):
    """In a folder others can write, a link named like the output's lock had its target
    truncated to the pid (then the link removed), one named like its run record had its target
    replaced by the JSON record; both runs exited 0."""
    victim = tmp_path / "notes.txt"
    victim.write_text("precious")
    os.symlink(victim, tmp_path / sidecar)
    line = one_line_error(run([images, "--model", model, "-o", tmp_path / "p.csv"]))
    assert "is a symlink" in line and sidecar in line, line
    assert victim.read_text() == "precious" and (tmp_path / sidecar).is_symlink()


def test_sigint_exits_130_and_the_run_resumes(cifar_subset, model, tmp_path):
    folder = cifar_subset(10)  # 100 images
    out = tmp_path / "p.csv"
    proc = cnnx_subprocess(folder, "--model", model, "-o", out, "--batch-size", "1", "--workers", "1")
    try:
        wait_for(lambda: out.exists() and out.read_text().count("\n") >= 3, "the first rows")
        proc.send_signal(signal.SIGINT)
        _stdout, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr and "Aborted" not in stderr
    assert stderr.strip().splitlines()[-1] == "interrupted"
    assert not (tmp_path / ".p.csv.lock").exists()  # released on the way out
    r = run([folder, "--model", model, "-o", out, "--resume"])
    assert r.exit_code == 0, r.stderr
    paths = [row[0] for row in read_csv(out)[1:]]
    assert len(paths) == len(set(paths)) == 100


# A run interrupted while a thread it must join never returns (exit would wait for it forever).
STUCK_AFTER_SIGINT = """
import os, signal, threading, time
from cnnx.runtime import command
command.INTERRUPT_GRACE_S = 0.5
with command._ends_when_interrupted():
    threading.Thread(target=threading.Event().wait).start()
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(30)
"""


def test_an_interrupted_run_whose_cleanup_hangs_still_ends_with_130():
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "-c", STUCK_AFTER_SIGINT], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 130, r.stderr
    assert r.stderr.strip().splitlines()[-1] == "interrupted (the cleanup did not finish in time)"
    assert time.monotonic() - t0 < 20


# Ctrl-C while rows stream: deferred to the end of the batch in hand, then KeyboardInterrupt
# at a point where no lock is held; a second Ctrl-C raises at once.
DEFERRED_SIGINT = """
import os, signal, sys
from cnnx.runtime import command
command.INTERRUPT_GRACE_S = 60
seen = []
with command._ends_when_interrupted() as interrupts:
    try:
        with interrupts.deferred():
            os.kill(os.getpid(), signal.SIGINT)
            seen.append("still running")
            interrupts.stop_if_asked()
            seen.append("not stopped")
    except KeyboardInterrupt:
        seen.append("stopped at the check")
    try:
        with command.Interrupts().deferred():  # a new run's: not asked
            pass
        os.kill(os.getpid(), signal.SIGINT)  # outside the rows: at once
        seen.append("not raised")
    except KeyboardInterrupt:
        seen.append("raised at once")
print(seen, flush=True)
os._exit(0)  # the armed timers
"""


def test_a_ctrl_c_while_rows_stream_stops_the_loop_at_its_check_not_where_it_lands():
    r = subprocess.run([sys.executable, "-c", DEFERRED_SIGINT], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == str(["still running", "stopped at the check", "raised at once"])


# Imports everything the run needs, then becomes user nobody for good (real and effective
# uid: a `readable` check through os.access asks about the real one), then runs the CLI.
AS_NOBODY = """
import os, sys, difflib
import cnnx.cli, cnnx.runtime.api, cnnx.runtime.command, cnnx.runtime.output, onnxruntime, simplejpeg
from PIL import Image
Image.init()
if os.getuid() == 0:
    os.setgroups([])
    os.setresgid(65534, 65534, 65534)
    os.setresuid(65534, 65534, 65534)
cnnx.cli.main(["classify", *sys.argv[1:]])
"""


def test_an_unreadable_file_named_on_the_command_line_gets_its_errors_row(model):
    base = Path(tempfile.mkdtemp(prefix="cnnx-unreadable-arg-"))
    try:
        os.chmod(base, 0o777)
        for name in ("ok.png", "secret.png"):
            Image.fromarray(photo_like(20, 20, seed=len(name))).save(base / name)
        os.chmod(base / "secret.png", 0o000)
        shutil.copyfile(model, base / "model.onnx")
        os.chmod(base / "model.onnx", 0o644)
        proc = subprocess.Popen([sys.executable, "-c", AS_NOBODY, str(base / "secret.png"), str(base / "ok.png"),
                                 "--model", str(base / "model.onnx"), "-o", str(base / "p.csv")],
                                cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        _stdout, stderr = proc.communicate(timeout=120)
        assert proc.returncode == 0, stderr
        assert [row[0] for row in read_csv(base / "p.csv")[1:]] == [str(base / "ok.png")]
        (row,) = read_csv(base / "p.errors.csv")[1:]
        assert row[0] == str(base / "secret.png") and row[1] == "open" and "Permission denied" in row[2]
    finally:
        shutil.rmtree(base, ignore_errors=True)


# -- --report ------------------------------------------------------------------------------

def test_report_is_written_after_the_run_and_after_a_resume(images, model, tmp_path):
    out, page = tmp_path / "p.csv", tmp_path / "report.html"
    (tmp_path / "more").mkdir()
    shutil.copytree(images, tmp_path / "more" / "imgs")
    (tmp_path / "more" / "imgs" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 30)
    r = run([images, "--model", model, "-o", out, "--report", page])
    assert r.exit_code == 0, r.stderr
    assert page.read_text().lstrip().lower().startswith("<!doctype html") and f"report: {page}" in r.stderr
    page.unlink()
    r = run([images, tmp_path / "more" / "imgs", "--model", model, "-o", out, "--resume", "--report", page])
    assert r.exit_code == 0, r.stderr
    html = page.read_text()
    assert "broken.png" in html and "img_11.png" in html
    r = run([images, "--model", model, "--report", page])  # predictions on stdout: nothing to read back
    assert r.exit_code == 2 and "--report needs --output FILE" in r.stderr
    r = run([images, "--model", model, "-o", tmp_path / "q.csv", "--report", tmp_path / "q.csv"])
    assert r.exit_code == 2 and "must be different files" in r.stderr


def test_files_to_write_in_a_missing_folder_or_two_on_stdout_are_refused_before_the_run(images, model, tmp_path):
    """The errors file is first written at the first skip, the report after the run: a folder
    that is not there once failed there (2,048 rows written, then exit 1). And `--errors -`
    beside predictions on stdout made one stream of two CSVs."""
    out = tmp_path / "p.csv"
    for option, target in (("--output", tmp_path / "nodir" / "p.csv"), ("--errors", tmp_path / "nodir" / "e.csv"),
                           ("--report", tmp_path / "nodir" / "r.html")):
        r = run([images, "--model", model, option, target] + ([] if option == "--output" else ["-o", out]))
        assert r.exit_code == 2 and f"{option} {target}: no folder {target.parent} to write it in" in r.stderr, r.stderr
        assert "Traceback" not in r.stderr and not out.exists() and not target.parent.exists()
    r = run([images, "--model", model, "--errors", "-"])
    assert r.exit_code == 2 and "--output and --errors must be different files" in r.stderr and r.stdout == ""
    r = run([images, "--model", model, "-o", out, "--errors", "-"])  # a file and stdout: allowed
    assert r.exit_code == 0, r.stderr
    # a symlink to nothing: "File exists" after a run record written beside the link's target
    (tmp_path / "dangling").mkdir()
    link = tmp_path / "dangling" / "p.csv"
    os.symlink(tmp_path / "dangling" / "target.csv", link)
    r = run([images, "--model", model, "-o", link])
    assert r.exit_code == 2 and f"--output {link} is a symlink to {tmp_path / 'dangling' / 'target.csv'}, which is " \
        "not there" in r.stderr, r.stderr
    assert sorted(os.listdir(tmp_path / "dangling")) == ["p.csv"]


def test_resume_refuses_another_model_and_another_folder_than_its_first_run(images, model, tmp_path, monkeypatch):
    """A run records beside its output the model and the folder it ran in (.NAME.run.json).
    A --resume with another model once appended that model's rows to the first one's (the
    default --model is the newest export: a re-export between the two runs was enough), and
    one from another folder matched none of the relative paths: every file classified again."""
    from cnnx.runtime.output import run_record_path

    work = tmp_path / "work"
    shutil.copytree(images, work / "imgs")
    monkeypatch.chdir(work)
    out = tmp_path / "p.csv"
    assert run(["imgs", "--model", model, "-o", out, "--batch-size", "5"]).exit_code == 0
    out.write_text("".join(out.read_text().splitlines(keepends=True)[:6]))  # a run cut short: 5 rows
    text = out.read_text()
    assert os.path.exists(run_record_path(out))
    others = {"classes": tiny_onnx_model(tmp_path / "m1.onnx", class_names=["a", "b", "c"]),
              "weights": tiny_onnx_model(tmp_path / "m2.onnx", checkpoint_sha256="1" * 64)}
    for what, other in others.items():
        r = run(["imgs", "--model", other, "-o", out, "--resume"])
        assert r.exit_code == 1 and f"written with another model (its {what} differ)" in r.stderr, r.stderr
        assert f"resume with that model (--model {os.path.abspath(model)})" in r.stderr, r.stderr  # as it was picked
        assert out.read_text() == text
    monkeypatch.chdir(tmp_path)
    r = run([work / "imgs", "--model", model, "-o", out, "--resume"])
    assert r.exit_code == 1 and f"holds paths relative to {work}, where its first run ran" in r.stderr, r.stderr
    assert out.read_text() == text
    monkeypatch.chdir(work)
    shutil.copyfile(model, tmp_path / "moved.onnx")  # the same model elsewhere: the same rows
    r = run([work / "imgs", "--model", tmp_path / "moved.onnx", "-o", out, "--resume"])
    assert r.exit_code == 0 and "7 images" in r.stderr and "5 already done" in r.stderr, r.stderr
    assert len(read_csv(out)) == 13
    os.remove(run_record_path(out))  # an output of an older cnnx, without a record: its labels are checked
    text = out.read_text()
    renamed = tiny_onnx_model(tmp_path / "m3.onnx", class_names=[f"other-{c}" for c in CLASSES])
    r = run(["imgs", "--model", renamed, "-o", out, "--resume"])
    assert r.exit_code == 1 and "holds labels this model does not have" in r.stderr, r.stderr
    assert out.read_text() == text and not os.path.exists(run_record_path(out))
    # its classes, other weights (an output moved without its record, resumed with a retrained
    # model: two models' rows in one file, silently): its first rows' files, classified again, tell
    other_weights = tiny_onnx_model(tmp_path / "m4.onnx", weight_scale=3.0, checkpoint_sha256="4" * 64)
    r = run(["imgs", "--model", other_weights, "-o", out, "--resume"])
    assert r.exit_code == 1 and "its rows are not this model's: 8 of 8 of its files classified again give other " \
        "scores" in r.stderr, r.stderr
    assert out.read_text() == text and not os.path.exists(run_record_path(out))
    r = run(["imgs", "--model", others["weights"], "-o", out, "--resume"])  # the same weights, another sha256
    assert r.exit_code == 0 and "12 already done" in r.stderr and "has no run record" in r.stderr, r.stderr
    assert "its rows' scores are this model's (8 of its files classified again)" in r.stderr, r.stderr
    r = run(["imgs", "--model", model, "-o", out, "--resume"])  # the record that resume wrote is checked now
    assert r.exit_code == 1 and "written with another model (its weights differ)" in r.stderr, r.stderr


def test_report_replaces_only_a_page_cnnx_wrote(images, model, tmp_path):
    """--report once replaced whatever it named: `--report model.onnx` left an HTML page where the
    model was, and a report symlinked to the output replaced the predictions just written."""
    out, page = tmp_path / "p.csv", tmp_path / "page.html"
    own_model = tmp_path / "model.onnx"
    shutil.copyfile(model, own_model)
    model_bytes = own_model.read_bytes()
    r = run([images, "--model", own_model, "-o", out, "--report", own_model])
    assert r.exit_code == 2 and "--report and --model must be different files" in r.stderr, r.stderr
    os.symlink(out, tmp_path / "link.html")
    r = run([images, "--model", own_model, "-o", out, "--report", tmp_path / "link.html"])
    assert r.exit_code == 2 and "--output and --report must be different files" in r.stderr, r.stderr
    photo = tmp_path / "photo.png"
    shutil.copyfile(images / "img_00.png", photo)
    r = run([images, "--model", own_model, "-o", out, "--report", photo])
    assert r.exit_code == 2 and f"--report {photo} exists and is not a page cnnx wrote" in r.stderr, r.stderr
    assert own_model.read_bytes() == model_bytes and not out.exists()
    assert photo.read_bytes() == (images / "img_00.png").read_bytes()
    assert run([images, "--model", own_model, "-o", out, "--report", page]).exit_code == 0
    first = os.stat(page).st_ino
    r = run([images, "--model", own_model, "-o", out, "--resume", "--report", page])  # its own page: rewritten
    assert r.exit_code == 0, r.stderr
    assert os.stat(page).st_ino != first and 'content="cnnx"' in page.read_text()  # a new file, renamed in


def test_a_resume_writes_a_note_once_where_the_kill_came_after_the_note(model, tmp_path):
    """A batch writes its errors rows (notes among them), then its predictions: a kill between
    the two left a note for a file not yet in the output, and the resume, which classifies it
    again, wrote the note a second time."""
    folder = tmp_path / "imgs"
    folder.mkdir()
    Image.fromarray(photo_like(30, 30, seed=1)).save(folder / "a.png")
    frames = [Image.fromarray(photo_like(40, 40, seed=s)).convert("P") for s in range(3)]
    frames[0].save(folder / "b.gif", save_all=True, append_images=frames[1:])
    out, errors = tmp_path / "p.csv", tmp_path / "p.errors.csv"
    assert run([folder, "--model", model, "-o", out]).exit_code == 0
    (note,) = read_csv(errors)[1:]
    assert note[0] == str(folder / "b.gif") and note[1] == "note"
    rows = out.read_text().splitlines(keepends=True)
    out.write_text("".join(r for r in rows if "b.gif" not in r))  # as the kill left it: the note, not the row
    r = run([folder, "--model", model, "-o", out, "--resume"])
    assert r.exit_code == 0 and "classified 1 image" in r.stderr, r.stderr
    assert read_csv(errors)[1:] == [note] and len(read_csv(out)) == 3


def test_outputs_of_two_formats_never_share_an_errors_file(model, tmp_path):
    """The review's `-o p.csv` then `-o p.jsonl`: both default to p.errors.csv, the second run
    was told to --resume into it, and then each run's skips were the other's (its report, its
    resume). The default keeps a non-.csv output's name, and an errors file without its output
    says it may be another run's."""
    from cnnx.runtime.output import default_errors_path

    assert [default_errors_path(o) for o in ("p.csv", "P.CSV", "p.jsonl", "d/preds/", "p", "-")] == [
        "p.errors.csv", "P.errors.csv", "p.jsonl.errors.csv", "d/preds.errors.csv", "p.errors.csv", None]
    folder = tmp_path / "imgs"
    folder.mkdir()
    Image.fromarray(photo_like(30, 30, seed=1)).save(folder / "a.png")
    (folder / "empty.jpg").write_bytes(b"")
    assert run([folder, "--model", model, "-o", tmp_path / "p.csv"]).exit_code == 0
    first = (tmp_path / "p.errors.csv").read_bytes()
    r = run([folder, "--model", model, "-o", tmp_path / "p.jsonl", "--format", "jsonl"])
    assert r.exit_code == 0, r.stderr
    assert (tmp_path / "p.errors.csv").read_bytes() == first and b"empty.jpg" in (tmp_path / "p.jsonl.errors.csv").read_bytes()
    r = run([folder, "--model", model, "-o", tmp_path / "q.csv", "--errors", tmp_path / "p.errors.csv"])
    assert r.exit_code == 2 and "already exists without its output" in r.stderr and "if it is this output's" in r.stderr, \
        r.stderr
    assert not (tmp_path / "q.csv").exists() and (tmp_path / "p.errors.csv").read_bytes() == first
    # p.jsonl beside p.csv, whose errors file p.errors.csv is: p.jsonl's run had no skips to write
    (tmp_path / "p.jsonl.errors.csv").unlink()
    r = run([folder, "--model", model, "-o", tmp_path / "p.jsonl", "--format", "jsonl", "--resume"])
    assert r.exit_code == 0 and (tmp_path / "p.errors.csv").read_bytes() == first, r.stderr
    # An older cnnx's r.jsonl kept its skips in r.errors.csv: a --resume tried them again into a
    # second errors file; it asks which file continues.
    r = run([folder, "--model", model, "-o", tmp_path / "r.jsonl", "--format", "jsonl", "--errors",
             tmp_path / "r.errors.csv"])
    assert r.exit_code == 0, r.stderr
    r = run([folder, "--model", model, "-o", tmp_path / "r.jsonl", "--format", "jsonl", "--resume"])
    assert r.exit_code == 2 and "r.jsonl's errors file is" in r.stderr and "--errors" in r.stderr, r.stderr
    assert not (tmp_path / "r.jsonl.errors.csv").exists()
    r = run([folder, "--model", model, "-o", tmp_path / "r.jsonl", "--format", "jsonl", "--resume", "--errors",
             tmp_path / "r.errors.csv"])
    assert r.exit_code == 0 and "2 already done" in r.stderr, r.stderr


def test_output_naming_this_process_stdout_is_stdout(model, tmp_path):
    """`-o /dev/stdout` into a pipe failed on a lock beside /proc/<pid>/fd/pipe:[...], and
    redirected to a file it "already exists" (the shell had just created it)."""
    folder = tmp_path / "imgs"
    folder.mkdir()
    Image.fromarray(photo_like(30, 30, seed=1)).save(folder / "a.png")
    cmd = [sys.executable, "-m", "cnnx", "classify", str(folder), "--model", str(model), "--topk", "1"]
    piped = subprocess.run([*cmd, "-o", "/dev/stdout"], capture_output=True, text=True)
    assert piped.returncode == 0 and piped.stdout.splitlines()[1].startswith(f'"{folder}/a.png"'), piped.stderr
    with open(tmp_path / "redirected.csv", "w") as f:
        r = subprocess.run([*cmd, "-o", "/dev/fd/1"], stdout=f, stderr=subprocess.PIPE, text=True)
    assert r.returncode == 0 and (tmp_path / "redirected.csv").read_text() == piped.stdout, r.stderr
    # ... but --resume into the file stdout is appended to reads it back as a path
    Image.fromarray(photo_like(30, 30, seed=2)).save(folder / "b.png")
    with open(tmp_path / "redirected.csv", "a") as f:
        r = subprocess.run([*cmd, "-o", "/dev/stdout", "--resume"], stdout=f, stderr=subprocess.PIPE, text=True)
    rows = (tmp_path / "redirected.csv").read_text().splitlines()
    assert r.returncode == 0 and "1 already done" in r.stderr and len(rows) == 3 and "b.png" in rows[2], r.stderr


# -- review: resume and non-finite gaps that no test caught ------------------------------

def test_resume_refuses_an_output_that_ends_with_two_rows_cnnx_did_not_write(images, model, tmp_path):
    """One row that does not parse at the end is the row a killed run was writing (dropped);
    two are someone's edit, and --resume refused them. Deleting them would lose the user's rows."""
    out = tmp_path / "p.csv"
    assert run([images, "--model", model, "-o", out]).exit_code == 0
    ours = out.read_text()
    assert len(read_csv(out)) == 13
    edited = ours + "extra/one.png,cat,0.5\nextra/two.png,dog,0.25\n"  # typed in an editor: unquoted
    out.write_text(edited)
    line = one_line_error(run([images, "--model", model, "-o", out, "--resume"]))
    assert line == f"Error: cannot resume: {out}: row 14 was not written by cnnx classify; refusing to append", line
    assert out.read_bytes() == edited.encode()
    # one such row: a cut-short last row, dropped (the file is cnnx's own rows again)
    out.write_text(ours + "extra/one.png,cat,0.5\n")
    r = run([images, "--model", model, "-o", out, "--resume"])
    assert r.exit_code == 0 and "12 already done" in r.stderr and "classified 0 images" in r.stderr, r.stderr
    assert out.read_text() == ours


def _resumed_without_record(images, model, tmp_path):
    """An output of `model` over `images` whose run record was removed (moved without it)."""
    from cnnx.runtime.output import run_record_path

    out = tmp_path / "p.csv"
    assert run([images, "--model", model, "-o", out]).exit_code == 0
    os.remove(run_record_path(out))
    return out, out.read_bytes()


def test_resume_without_a_run_record_refuses_a_model_whose_classes_are_in_another_order(images, model, tmp_path):
    """The same weights, its class names reversed: the same classes (no unknown label) and the
    same top-1 scores, only the labels differ. Appending its rows gave 'cat' and 'dog' for one
    class in one file; the labels of the rows classified again tell."""
    from cnnx.runtime import Classifier, Prediction
    from cnnx.runtime.output import run_record_path

    out, before = _resumed_without_record(images, model, tmp_path)
    reordered = tiny_onnx_model(tmp_path / "reordered.onnx", class_names=list(reversed(CLASSES)))
    rows = {row[0]: (row[1], float(row[2])) for row in read_csv(out)[1:]}
    with Classifier(reordered) as clf:  # the premise: scores alike, labels not
        again = [p for p in clf.classify([images]) if isinstance(p, Prediction)]
    assert len(again) == 12
    for p in again:
        label, score = rows[p.path]
        assert abs(p.scores[0] - score) < 1e-6 and p.label(clf.info.class_names) != label, (p, label, score)
    r = run([images, "--model", reordered, "-o", out, "--resume"])
    line = one_line_error(r)
    assert "has no run record" in line and "its rows are not this model's: 8 of 8 of its files classified again " \
        "give other scores" in line, line
    assert out.read_bytes() == before and not os.path.exists(run_record_path(out))


def test_resume_without_a_run_record_refuses_an_fp32_model_whose_scores_differ_by_a_thousandth(images, model,
                                                                                                tmp_path):
    """An fp32 model's rows classified again must match to 1e-4 (6 decimals written, rounding);
    2e-2 is for fp16/int8 variants. Weights 0.2% off (a retrained model, the same classes and
    labels) move the scores 3e-4..1e-3: another model, refused."""
    from cnnx.runtime.output import run_record_path

    out, before = _resumed_without_record(images, model, tmp_path)
    near = tiny_onnx_model(tmp_path / "near.onnx", weight_scale=1.002, checkpoint_sha256="5" * 64)
    line = one_line_error(run([images, "--model", near, "-o", out, "--resume"]))
    assert "its rows are not this model's: 8 of 8 of its files classified again give other scores" in line, line
    assert out.read_bytes() == before and not os.path.exists(run_record_path(out))
    r = run([images, "--model", model, "-o", out, "--resume"])  # the model that wrote it: accepted
    assert r.exit_code == 0 and "its rows' scores are this model's (8 of its files classified again)" in r.stderr, \
        r.stderr
    assert out.read_bytes() == before


def test_resume_from_another_folder_refuses_an_output_of_relative_and_absolute_paths(images, model, tmp_path,
                                                                                      monkeypatch):
    """One relative path among absolute ones is enough: from another folder it matches no file,
    which would be classified and written again. An output of absolute paths only resumes from
    anywhere."""
    work = tmp_path / "work"
    shutil.copytree(images, work / "imgs")
    elsewhere = tmp_path / "abs"
    elsewhere.mkdir()
    for name in ("img_00.png", "img_01.png"):
        shutil.copyfile(images / name, elsewhere / name)
    monkeypatch.chdir(work)
    out = tmp_path / "p.csv"
    assert run(["imgs", elsewhere, "--model", model, "-o", out]).exit_code == 0
    paths = [row[0] for row in read_csv(out)[1:]]
    assert sum(os.path.isabs(p) for p in paths) == 2 and len(paths) == 14, paths
    text = out.read_text()
    monkeypatch.chdir(tmp_path)
    line = one_line_error(run([work / "imgs", elsewhere, "--model", model, "-o", out, "--resume"]))
    assert line == (f"Error: cannot resume: {out} holds paths relative to {work}, where its first run ran: resume "
                    "from there"), line
    assert out.read_text() == text
    absolute = tmp_path / "q.csv"
    monkeypatch.chdir(work)
    assert run([elsewhere, "--model", model, "-o", absolute]).exit_code == 0
    monkeypatch.chdir(tmp_path)
    r = run([elsewhere, "--model", model, "-o", absolute, "--resume"])
    assert r.exit_code == 0 and "classified 0 images" in r.stderr and "2 already done" in r.stderr, r.stderr


def _overflowing_model(path: Path) -> Path:
    """tiny_onnx_model whose class-0 weight of the red channel is 1e37: an image with a red
    top-left corner gets logit 0 = +inf (float32 overflow, as an fp16 export's), its other
    logits finite; a black corner gets all-finite logits."""
    import onnx
    from onnx import numpy_helper

    tiny_onnx_model(path)
    proto = onnx.load(str(path))
    (w,) = [t for t in proto.graph.initializer if t.name == "W"]
    weights = numpy_helper.to_array(w).copy()
    weights[0, 0] = 1e37
    w.CopyFrom(numpy_helper.from_array(weights, "W"))
    onnx.save(proto, str(path))
    return path


def test_an_image_with_one_inf_logit_among_finite_ones_is_an_errors_row(tmp_path):
    """Only a row whose every logit is finite has a softmax: one +inf (the others finite) was
    taken for a finite row and written as a prediction."""
    import onnxruntime as ort

    model = _overflowing_model(tmp_path / "m.onnx")
    folder = tmp_path / "imgs"
    folder.mkdir()
    Image.new("RGB", (32, 32), (0, 0, 0)).save(folder / "a_dark.png")
    Image.new("RGB", (32, 32), (200, 100, 50)).save(folder / "b_red.png")
    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    red = np.zeros((1, 3, 32, 32), np.uint8)
    red[0, 0] = 200
    (logits,) = session.run(None, {"images": red})
    assert np.isposinf(logits[0, 0]) and np.isfinite(logits[0, 1:]).all(), logits  # the premise: one inf
    out, errors = tmp_path / "p.csv", tmp_path / "e.csv"
    r = run([folder, "--model", model, "-o", out, "--errors", errors])
    assert r.exit_code == 0, r.stderr
    assert [row[0] for row in read_csv(out)[1:]] == [str(folder / "a_dark.png")]
    assert read_csv(errors)[1:] == [[str(folder / "b_red.png"), "model", "the model gave this image non-finite "
                                     "scores (NaN or inf: an fp16 export overflowing?)"]]
    assert "skipped 1 (model: 1)" in r.stderr, r.stderr
