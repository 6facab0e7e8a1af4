"""`cnnx train` / `cnnx evaluate` against a hostile machine (issue 12): racing runs, kills,
a dead decode worker, a full or read-only disk, absurdly deep folders, broken checkpoints.
Each gets one line and exit 1, and leaves every file complete or absent."""

from __future__ import annotations

import contextlib

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from _fs_util import mounted_tmpfs
import torch

from cnnx.runtime.files import TEMP_PREFIX
from cnnx.runtime.preprocess import make_spec
from cnnx.train.checkpoint import build_checkpoint, load_checkpoint
from cnnx.train.data import load_image_folder
from cnnx.train.run import LOCK_NAME
from cnnx.train.zoo import CIFAR_MEAN, CIFAR_STD, create_model

from tests._train_util import copy_classes, remove_deep_tree, run_cli, seed_args

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def _cnnx(args, **kw):
    return subprocess.Popen([sys.executable, "-m", "cnnx", *[str(a) for a in args]], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=ENV, start_new_session=True, **kw)


def _finish(p, timeout=180):
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        p.communicate()
        pytest.fail(f"cnnx did not finish within {timeout} s")
    return p.returncode, out, err


def _one_line(code, stderr, rc_expected=1):
    assert code == rc_expected, stderr[-2000:]
    assert "Traceback" not in stderr, stderr[-2000:]
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("Error: "), stderr[-2000:]
    return last


def _temps(folder: Path):
    return [p for p in folder.rglob("*") if p.name.startswith((TEMP_PREFIX, ".tmp-"))]


@pytest.fixture(scope="module")
def small(cifar_train_dir, tmp_path_factory):
    return copy_classes(cifar_train_dir, tmp_path_factory.mktemp("small") / "d", ["cat", "dog"], 20)


# --- (1) two runs, one name ------------------------------------------------------------------

def test_two_runs_with_the_same_name_one_runs_the_other_gets_one_line(cifar_subset, tmp_path):
    """Started together (separate caches), both used to pass the "exists" check while the
    other was still loading its data, and both wrote the folder."""
    data = cifar_subset(300)  # 3,000 images: loading them takes longer than the two starts differ
    runs = tmp_path / "runs"
    procs = [_cnnx(seed_args(data, runs, "same", tmp_path / f"cache{i}", "--epochs", "1", "--batch-size", "256",
                             "--image-size", "40")) for i in range(2)]
    results = [_finish(p) for p in procs]
    codes = sorted(r[0] for r in results)
    assert codes == [0, 1], [r[2][-1500:] for r in results]
    loser = next(r for r in results if r[0] == 1)
    msg = _one_line(loser[0], loser[2])
    assert "in use by another cnnx train" in msg or "already exists" in msg, msg
    winner = next(i for i, r in enumerate(results) if r[0] == 0)
    # Every file of the folder is the winner's: config.json and both checkpoints agree.
    config = json.loads((runs / "same" / "config.json").read_text())
    assert config["cache_dir"] == str(tmp_path / f"cache{winner}")
    for ckpt in ("best.pt", "last.pt"):
        assert load_checkpoint(runs / "same" / ckpt)["config"]["cache_dir"] == config["cache_dir"]


def test_two_runs_with_the_default_name_in_one_second_get_two_folders(small, tmp_path, monkeypatch):
    """The default name is the arch and the second the run started: a second run in that
    second (a script starting two) was refused ("in use" or "already exists") though its user
    never chose a name. It now gets NAME-2."""
    monkeypatch.setattr(time, "strftime", lambda fmt, *a: "20260101-000000")
    args = [a for a in seed_args(small, tmp_path / "runs", "x", tmp_path / "c", "--epochs", "1") if a != "x"]
    args.remove("--name")
    for _ in range(2):
        r = run_cli(args)
        assert r.exit_code == 0, r.stderr[-2000:]
    runs = sorted(p.name for p in (tmp_path / "runs").iterdir())
    assert runs == ["seed-cnn-20260101-000000", "seed-cnn-20260101-000000-2"]
    assert all((tmp_path / "runs" / n / "best.pt").is_file() for n in runs)


def test_a_live_run_folder_cannot_be_resumed_beside_it(small, tmp_path):
    """The flock is held for the whole run: --resume of a run that is still training is refused."""
    runs = tmp_path / "runs"
    assert run_cli(seed_args(small, runs, "x", tmp_path / "c", "--epochs", "3", "--batch-size", "16",
                             "--stop-after", "1")).exit_code == 0
    import fcntl

    with open(runs / "x" / LOCK_NAME, "r+") as held:  # what a live `cnnx train` holds
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        r = run_cli(["train", "--resume", runs / "x", "--quiet"])
        assert r.exit_code == 1 and "in use by another cnnx train" in r.stderr.strip().splitlines()[-1]
    assert run_cli(["train", "--resume", runs / "x", "--quiet"]).exit_code == 0


def test_symlinks_planted_in_a_run_folder_are_refused_not_written_through(small, tmp_path):
    """A shared run folder: a link under the run lock's name had its target truncated to the pid
    (even when the resume then failed); metrics.csv, report.html as links had their targets
    replaced."""
    runs = tmp_path / "runs"
    assert run_cli(seed_args(small, runs, "x", tmp_path / "c", "--epochs", "3", "--batch-size", "16",
                             "--stop-after", "1")).exit_code == 0
    victim = tmp_path / "notes.txt"
    victim.write_text("precious")
    (runs / "x" / LOCK_NAME).unlink(missing_ok=True)
    os.symlink(victim, runs / "x" / LOCK_NAME)
    r = run_cli(["train", "--resume", runs / "x", "--quiet"])
    assert r.exit_code == 1 and "is a symlink" in r.stderr.strip().splitlines()[-1], r.stderr[-2000:]
    (runs / "x" / LOCK_NAME).unlink()
    (runs / "x" / "metrics.csv").unlink()
    os.symlink(victim, runs / "x" / "metrics.csv")
    r = run_cli(["train", "--resume", runs / "x", "--quiet"])
    assert r.exit_code == 1 and "metrics.csv" in r.stderr.strip().splitlines()[-1], r.stderr[-2000:]
    assert victim.read_text() == "precious"


# --- (13) a run killed before its first last.pt ----------------------------------------------

def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_run_killed_before_its_first_epoch_restarts_with_the_same_name(small, tmp_path):
    runs = tmp_path / "runs"
    args = seed_args(small, runs, "k", tmp_path / "c", "--epochs", "1", "--batch-size", "16")
    p = _cnnx(args)
    deadline = time.monotonic() + 120
    while not (runs / "k" / LOCK_NAME).exists():  # reserved: the run is past its start
        assert p.poll() is None and time.monotonic() < deadline, "the run ended before it could be killed"
        time.sleep(0.02)
    os.killpg(p.pid, signal.SIGKILL)
    p.communicate()
    assert not (runs / "k" / "last.pt").exists()
    # What a kill in the middle of a write leaves: temp files of a dead process.
    dead = _dead_pid()
    (runs / "k" / f"{TEMP_PREFIX}{dead}-abc").write_bytes(b"half a checkpoint")
    (runs / "k" / ".tmp-x1y2z3.pt").write_bytes(b"half a checkpoint of an older cnnx")
    r = run_cli(args)
    assert r.exit_code == 0, r.stderr
    assert (runs / "k" / "last.pt").is_file() and _temps(runs / "k") == []


def test_a_run_stopped_by_sigterm_before_its_first_checkpoint_ends_as_terminated_leaving_no_folder(small, tmp_path):
    """SIGTERM (timeout, systemd, a batch job's time limit) killed train at once: no line, and
    the run folder (config.json, its lock) stayed, one more for each such run. A SIGTERM to the
    whole group: the decode processes leave the end to the run."""
    runs = tmp_path / "runs"
    # epochs enough for the run to outlast files.SIGTERM_RESEND_S: a SIGTERM whose exception was
    # lost is sent again then (a run that ended first exited 0, 1 of 4 runs on a loaded machine)
    p = _cnnx(seed_args(small, runs, "t", tmp_path / "c", "--epochs", "500", "--workers", "2"))
    deadline = time.monotonic() + 120
    while not (runs / "t" / LOCK_NAME).exists():
        assert p.poll() is None and time.monotonic() < deadline, "the run ended before it could be stopped"
        time.sleep(0.01)
    os.killpg(p.pid, signal.SIGTERM)
    code, _out, err = _finish(p)
    assert code == 143 and err.strip().splitlines()[-1] == "terminated", err[-2000:]
    assert "Traceback" not in err and not (runs / "t").exists()


def test_resume_of_a_run_without_last_pt_trains_it_again_from_its_config(small, tmp_path):
    runs = tmp_path / "runs"
    args = seed_args(small, runs, "r", tmp_path / "c", "--epochs", "1", "--batch-size", "16")
    assert run_cli(args).exit_code == 0
    config = (runs / "r" / "config.json").read_text()
    for f in ("last.pt", "best.pt", "metrics.csv"):
        (runs / "r" / f).unlink()
    r = run_cli(["train", "--resume", runs / "r", "--quiet"])
    assert r.exit_code == 0, r.stderr
    assert "training it again from epoch 1" in r.stderr and (runs / "r" / "last.pt").is_file()
    assert (runs / "r" / "config.json").read_text() == config
    # A finished run whose last.pt was deleted to save space keeps its best.pt: no restart.
    best = (runs / "r" / "best.pt").read_bytes()
    (runs / "r" / "last.pt").unlink()
    r = run_cli(["train", "--resume", runs / "r", "--quiet"])
    assert r.exit_code == 1 and "holds best.pt but no last.pt" in r.stderr
    r = run_cli(args)
    assert r.exit_code == 1 and "holds best.pt; choose another --name" in r.stderr
    assert (runs / "r" / "best.pt").read_bytes() == best
    # Killed during data loading: no config.json either; the line says how to restart.
    (runs / "e").mkdir()
    r = run_cli(["train", "--resume", runs / "e", "--quiet"])
    assert r.exit_code == 1 and "start it again with the same cnnx train options and --name" in r.stderr


def test_a_folder_holding_other_files_is_never_reused(small, tmp_path):
    (tmp_path / "runs" / "mine").mkdir(parents=True)
    (tmp_path / "runs" / "mine" / "thesis.tex").write_text("keep me")
    r = run_cli(seed_args(small, tmp_path / "runs", "mine", tmp_path / "c", "--epochs", "1"))
    assert r.exit_code == 1 and "not a cnnx run's (thesis.tex)" in r.stderr
    assert sorted(os.listdir(tmp_path / "runs" / "mine")) == ["thesis.tex"]


# --- (13) what a folder walk picks up --------------------------------------------------------

def test_empty_class_folder_is_a_one_line_error(small, tmp_path):
    data = copy_classes(small, tmp_path / "d", ["cat", "dog"], 10)
    (data / "bird").mkdir()
    (data / "bird" / "README.txt").write_text("not an image")
    (data / "bird" / ".DS_Store").write_bytes(b"\0")
    r = run_cli(seed_args(data, tmp_path / "runs", "x", tmp_path / "c", "--epochs", "1"))
    assert r.exit_code == 1 and "Traceback" not in r.stderr
    assert f"class folder {data / 'bird'} holds no image files" in r.stderr.strip().splitlines()[-1]
    # A run that fails before its first checkpoint takes back the folder it made (it left one
    # holding only its lock, beside the real runs); a folder it did not make stays.
    assert list((tmp_path / "runs").iterdir()) == []
    (tmp_path / "runs" / "x").mkdir()
    r = run_cli(seed_args(data, tmp_path / "runs", "x", tmp_path / "c", "--epochs", "1"))
    assert r.exit_code == 1 and (tmp_path / "runs" / "x").is_dir()


def test_non_image_names_and_hidden_files_are_ignored_as_classify_does(small, tmp_path):
    data = copy_classes(small, tmp_path / "d", ["cat", "dog"], 10)
    (data / "cat" / "notes.md").write_text("a note")
    (data / "cat" / ".thumb.jpg").write_bytes(b"hidden")
    (data / ".git").mkdir()
    (data / "dog" / "UPPER.JPG").write_bytes((data / "dog" / sorted(os.listdir(data / "dog"))[0]).read_bytes())
    d = load_image_folder(data, make_spec(32, CIFAR_MEAN, CIFAR_STD), progress=False, use_cache=False)
    assert d.class_names == ["cat", "dog"] and len(d.labels) == 21 and d.skipped == [] and d.ignored == 3
    assert any(p.endswith("UPPER.JPG") for p in d.paths)


def test_links_loose_images_and_mac_leftovers_are_used_or_listed_as_classify_follow_symlinks_sees_them(small, tmp_path):
    """The review's folders: train dropped a loose image beside the class folders, a dangling
    link, a loop and a symlinked subfolder without a word, read symlinked files but not
    symlinked folders, and (classify) read macOS's "._" files as images. Now train follows
    links as `cnnx classify --follow-symlinks` does, lists what it leaves with why, and both
    pass over hidden names, __MACOSX among them, counting them."""
    from cnnx.runtime.discover import Discovery

    data = copy_classes(small, tmp_path / "d", ["cat", "dog"], 6)
    outside = copy_classes(small, tmp_path / "elsewhere", ["dog"], 9)
    cats = sorted(os.listdir(data / "cat"))
    shutil.copyfile(data / "cat" / cats[0], data / "loose.jpg")
    (data / "cat" / f"._{cats[0]}").write_bytes(b"\0\5\x16\7 AppleDouble")
    (data / "__MACOSX" / "cat").mkdir(parents=True)
    (data / "__MACOSX" / "cat" / f"._{cats[1]}").write_bytes(b"\0\5\x16\7")
    os.symlink("/nonexistent/x.jpg", data / "dog" / "dangling.jpg")
    os.symlink("..", data / "dog" / "loop")
    os.symlink(outside / "dog", data / "dog" / "more")  # 9 images: followed, as classify --follow-symlinks does
    os.symlink(cats[2], data / "cat" / "again.jpg")  # the same file twice in its class: once
    d = load_image_folder(data, make_spec(32, CIFAR_MEAN, CIFAR_STD), progress=False, use_cache=False)
    skipped = {os.path.relpath(p, data): why for p, why in d.skipped}
    assert d.class_names == ["cat", "dog"] and len(d.labels) == 6 + 6 + 9, d.paths
    assert skipped == {"loose.jpg": "not in a class folder; not used",
                       "dog/dangling.jpg": "cannot stat: No such file or directory",
                       "dog/loop": "a folder walked already (a symlink loop, or a second link to it); not followed",
                       "cat/again.jpg": f"the same file as cat/{cats[2]} (a link); used once"}, skipped
    assert d.ignored == 2  # the ._ file in cat/ and __MACOSX
    walk = Discovery([str(data)], follow_symlinks=True)
    found = {os.path.relpath(f.path, data) for f in walk if f.reason is None}
    assert found - {"loose.jpg", "cat/again.jpg"} == {os.path.relpath(p, data) for p in d.paths} and walk.ignored == 2


def test_a_folder_that_cannot_be_labelled_one_way_is_a_one_line_error(small, tmp_path):
    """Each of these trained a model with exit 0 (or, for the name, failed after an epoch):
    a class that is a link to the data folder (every image twice, under two labels), one file
    linked into two classes, train/ beside valid/ (two classes, "train" and "valid"), an
    unlabelled Kaggle test/ of loose files, an empty val/, a class name that is not UTF-8, two
    class names that are the same letters in other code points."""
    def error(data):
        r = run_cli(seed_args(data, tmp_path / "runs", f"x{len(os.listdir(tmp_path))}", tmp_path / "c", "--epochs", "1"))
        assert r.exit_code == 1 and "Traceback" not in r.stderr, r.stderr[-2000:]
        return r.stderr.strip().splitlines()[-1]

    a = copy_classes(small, tmp_path / "a", ["cat", "dog"], 5)
    os.symlink(".", a / "everything")
    assert "class folder" in error(a) and "is the data folder itself (a symlink)" in error(a)
    b = copy_classes(small, tmp_path / "b", ["cat", "dog"], 5)
    os.symlink(b / "cat" / sorted(os.listdir(b / "cat"))[0], b / "dog" / "a_cat.jpg")
    assert "are one file (a link) in two classes, cat and dog" in error(b)
    for split, files in (("valid", "classes"), ("test", "loose"), ("val", "none")):
        c = tmp_path / f"split-{split}-{files}"
        copy_classes(small, c / "train", ["cat", "dog"], 5)
        (c / split).mkdir()
        if files == "classes":
            copy_classes(small, c / split, ["cat", "dog"], 3)
        elif files == "loose":
            shutil.copyfile(next((small / "cat").iterdir()), c / split / "0001.jpg")
        if files == "classes":  # valid/ is val/: it trains on train/ and validates on valid/
            shutil.copyfile(next((small / "cat").iterdir()), c / "IMG_0042.jpg")  # beside the splits: listed
            (c / "._IMG_0042.jpg").write_bytes(b"\0\5\26\7")  # macOS's AppleDouble: hidden, ignored
            r = run_cli(seed_args(c, tmp_path / "runs", split, tmp_path / "c", "--epochs", "1"))
            assert r.exit_code == 0 and "10 train / 6 val images in 2 classes" in r.stderr, r.stderr[-2000:]
            assert f"{c / 'IMG_0042.jpg'}: not in a split's class folder; not used" in r.stderr, r.stderr[-2000:]
            assert "._IMG_0042.jpg" not in r.stderr, r.stderr[-2000:]
        else:
            assert f"{c / split} holds no class folders, beside train/ (an unlabelled {split} split?)" in error(c)
    n = copy_classes(small, tmp_path / "n", ["cat", "dog"], 5)
    os.rename(n / "dog", os.fsdecode(bytes(n) + b"/caf\xe9"))
    assert "caf\\xe9: its name is not UTF-8 text" in error(n)
    u = copy_classes(small, tmp_path / "u", ["cat", "dog"], 5)  # café decomposed beside café composed: two classes
    os.rename(u / "cat", u / "cafe\u0301")
    os.rename(u / "dog", u / "caf\u00e9")
    assert "are the same name in other Unicode code points" in error(u)
    # a class, or a split, on a drive not mounted: the class was dropped as a non-image name and
    # the model lacked it; a val/ so was replaced by a tenth of train/ (each with exit 0)
    gone = tmp_path / "not-mounted"
    d = copy_classes(small, tmp_path / "d", ["cat", "dog"], 5)
    os.symlink(gone / "ship", d / "ship")
    assert error(d) == f"Error: {d / 'ship'} is a link to {gone / 'ship'}, which is not there (a folder on a drive " \
                       "not mounted?): mount it, or remove the link"
    e = tmp_path / "e"
    copy_classes(small, e / "train", ["cat", "dog"], 5)
    os.symlink(gone / "val", e / "val")
    assert f"{e / 'val'} is a link to {gone / 'val'}, which is not there" in error(e)


@pytest.mark.skipif(shutil.which("setpriv") is None or os.geteuid() != 0, reason="needs setpriv, as root")
def test_a_class_folder_its_user_may_not_list_is_named_so_not_empty(small, tmp_path):
    """It was 'holds no image files; add images to it'. Root is made an ordinary user by dropping
    the capabilities that bypass file permissions."""
    data = copy_classes(small, tmp_path / "d", ["cat", "dog"], 5)
    (data / "dog").chmod(0)
    try:
        r = subprocess.run(["setpriv", "--bounding-set", "-dac_override,-dac_read_search,-fowner", sys.executable,
                            "-m", "cnnx", *map(str, seed_args(data, tmp_path / "runs", "x", tmp_path / "c", "--epochs", "1"))],
                           capture_output=True, text=True, timeout=300)
    finally:
        (data / "dog").chmod(0o755)
    assert r.returncode == 1, r.stderr[-2000:]
    assert r.stderr.strip().splitlines()[-1] == f"Error: class folder {data / 'dog'}: cannot list folder: Permission denied"


def test_a_run_says_when_whole_batches_leave_much_of_a_small_folder_out_of_each_epoch(cifar_train_dir, tmp_path):
    """An epoch trains whole batches: 180 images at batch 64 trained 128 an epoch, without a word."""
    data = copy_classes(cifar_train_dir, tmp_path / "d", ["cat", "dog"], 100)  # 180 train / 20 val
    r = run_cli(seed_args(data, tmp_path / "runs", "b64", tmp_path / "c", "--epochs", "1", "--batch-size", "64"))
    assert r.exit_code == 0, r.stderr[-2000:]
    assert ("note: each epoch trains on 128 of the 180 training images, in whole batches of 64; the other 52 (others "
            "each epoch: the order is shuffled) wait for a later epoch. --batch-size 60 uses them all") in r.stderr
    r = run_cli(seed_args(data, tmp_path / "runs", "b60", tmp_path / "c", "--epochs", "1", "--batch-size", "60"))
    assert r.exit_code == 0 and "note: each epoch" not in r.stderr, r.stderr[-2000:]


def test_splits_with_a_folder_beside_them_or_files_in_two_of_them_are_one_line(small, tmp_path):
    """Each trained with exit 0: train/ val/ beside an unlabelled/ (or beside valid/ too) became
    3 classes named train, unlabelled and val; a val/ (or test/) that is train/ through a link,
    or hard links of its files (cp -al), scored training images as held-out ones; a file
    hard-linked into two classes gave one image two labels, which a symlink could not."""
    def error(data):
        r = run_cli(seed_args(data, tmp_path / "runs", f"x{len(os.listdir(tmp_path))}", tmp_path / "c", "--epochs", "1"))
        assert r.exit_code == 1 and "Traceback" not in r.stderr, r.stderr[-2000:]
        return r.stderr.strip().splitlines()[-1]

    def splits(name):
        d = tmp_path / name
        copy_classes(small, d / "train", ["cat", "dog"], 5)
        copy_classes(small, d / "val", ["cat", "dog"], 3)
        return d

    a = splits("beside")
    shutil.copytree(small / "cat", a / "unlabelled")
    assert f"{a / 'unlabelled'} is not a split folder, beside train/ and its class folders" in error(a)
    b = splits("twice")
    copy_classes(small, b / "valid", ["cat", "dog"], 3)
    assert "val/ and valid/ are both the val split of" in error(b)
    c = splits("linked-folder")
    os.symlink("train", c / "test")
    assert "test/ is train/ (a link)" in error(c)
    d = splits("hard-linked")
    shutil.rmtree(d / "val")
    shutil.copytree(d / "train", d / "val", copy_function=os.link)  # cp -al
    assert "is a file of train/ too (a link): the val split would hold train images" in error(d)
    e = splits("linked-class")
    shutil.rmtree(e / "val" / "dog")
    os.symlink("../train/dog", e / "val" / "dog")
    assert "is a file of train/ too (a link): the val split would hold train images" in error(e)
    assert not list((tmp_path / "c").glob("folders/*"))  # said before any split was decoded (and cached)
    g = tmp_path / "nested-classes"  # a class named train, its images in subfolders as the others': classes
    for c in ("car", "ship", "train"):
        copy_classes(small, g / c, ["cat"], 3)
    r = run_cli(seed_args(g, tmp_path / "runs", "nested", tmp_path / "c", "--epochs", "1"))
    assert r.exit_code == 0 and "data: 9 images in 3 classes" in r.stderr, r.stderr[-2000:]
    f = copy_classes(small, tmp_path / "f", ["cat", "dog"], 5)
    cat = sorted(os.listdir(f / "cat"))
    os.link(f / "cat" / cat[0], f / "dog" / "a_cat.jpg")
    assert "are one file (a link) in two classes, cat and dog" in error(f)
    os.unlink(f / "dog" / "a_cat.jpg")
    os.link(f / "cat" / cat[0], f / "cat" / "again.jpg")  # twice in its class: used once, and said
    r = run_cli(seed_args(f, tmp_path / "runs", "once", tmp_path / "c", "--epochs", "1"))
    assert r.exit_code == 0 and "data: 10 images" in r.stderr and "(a link); used once" in r.stderr, r.stderr[-2000:]


def test_skipped_txt_holds_one_line_a_file_whatever_its_name(tmp_path):
    """A name with a newline split its skipped.txt line in two; a name that is not UTF-8 ended
    the run when skipped.txt was written, after the decoding."""
    from cnnx.train.run import skipped_text

    odd = ["d/new\nline\ttab.jpg", "d/back\\slash.jpg", os.fsdecode(b"d/broken\xfe.jpg")]
    text = skipped_text([(p, "open: not an image") for p in odd])
    lines = text.split(b"\n")[:-1]
    assert lines == [b"d/new\\nline\\ttab.jpg\topen: not an image", b"d/back\\\\slash.jpg\topen: not an image",
                     b"d/broken\xfe.jpg\topen: not an image"]


def test_the_run_lists_a_skipped_file_on_one_line_whatever_its_name(small, tmp_path):
    """A name with a newline was printed as two lines of the run's skipped list."""
    data = copy_classes(small, tmp_path / "d", ["cat", "dog"], 5)
    (data / "cat" / "bad\n<i>name.jpg").write_bytes(b"not a jpeg")
    r = run_cli(seed_args(data, tmp_path / "runs", "nl", tmp_path / "c", "--epochs", "1"))
    assert r.exit_code == 0, r.stderr[-2000:]
    assert f"  {data / 'cat'}/bad\\n<i>name.jpg: " in r.stderr and "\n<i>name.jpg" not in r.stderr, r.stderr[-2000:]


def test_a_decode_job_none_of_whose_files_decodes_is_skipped_not_a_traceback(small, tmp_path):
    """A run of 8 or more unreadable files in path order (an iPhone folder's IMG_*.HEIC) made a
    whole decode job of the in-memory cache with no rows: a TypeError traceback, train and evaluate."""
    data = copy_classes(small, tmp_path / "d", ["cat", "dog"], 5)
    for i in range(12):
        (data / "cat" / f"IMG_{i:04d}.HEIC").write_bytes(b"\0\0\0\x18ftypheic")
    r = run_cli(seed_args(data, tmp_path / "runs", "heic", tmp_path / "c", "--epochs", "1", "--workers", "2"))
    assert r.exit_code == 0 and "Traceback" not in r.stderr and "skipped 12 file(s)" in r.stderr, r.stderr[-2000:]
    r = run_cli(["evaluate", tmp_path / "runs" / "heic" / "best.pt", "--data", data, "--workers", "2",
                 "--cache-dir", tmp_path / "c2"])
    assert r.exit_code == 0 and r.stdout.startswith("images\t10\n"), r.stderr[-2000:]


def test_a_model_trained_in_a_locale_that_is_not_utf8_is_evaluated_on_its_own_folder(small, tmp_path):
    """Train names a class by its folder's bytes as UTF-8 whatever the locale; evaluate's early
    check compared the folder names as the locale decodes them, and refused the very folder."""
    data = copy_classes(small, tmp_path / "d", ["cat", "dog"], 5)
    os.rename(data / "dog", data / "émile")
    env = {**os.environ, "LC_ALL": "C", "PYTHONUTF8": "0", "PYTHONCOERCECLOCALE": "0"}
    cli = [sys.executable, "-m", "cnnx"]
    r = subprocess.run([*cli, *map(str, seed_args(data, tmp_path / "runs", "loc", tmp_path / "c", "--epochs", "1"))],
                       capture_output=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    r = subprocess.run([*cli, "evaluate", str(tmp_path / "runs" / "loc" / "best.pt"), "--data", str(data),
                        "--cache-dir", str(tmp_path / "c")], capture_output=True, env=env, timeout=300)
    assert r.returncode == 0 and r.stdout.startswith(b"images\t10\n"), r.stderr[-2000:]


def test_class_folder_nested_1500_levels_deep_is_listed_without_recursion(small, tmp_path):
    data = copy_classes(small, tmp_path / "d", ["cat", "dog"], 5)
    fd = os.open(data / "cat", os.O_RDONLY)
    try:
        for _ in range(1500):  # relative to the folder above: no path grows past PATH_MAX here
            os.mkdir("n", dir_fd=fd)
            nxt = os.open("n", os.O_RDONLY, dir_fd=fd)
            os.close(fd)
            fd = nxt
        image = (small / "cat" / sorted(os.listdir(small / "cat"))[0]).read_bytes()
        out = os.open("deep.jpg", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd)
        os.write(out, image)
        os.close(out)
    finally:
        os.close(fd)
    try:
        d = load_image_folder(data, make_spec(32, CIFAR_MEAN, CIFAR_STD), progress=False, use_cache=False)
    finally:  # pytest's own cleanup of old temp folders would recurse into it and fail
        remove_deep_tree(data / "cat" / "n")
    assert len(d.labels) == 11 and d.paths[5].endswith("/n/deep.jpg") and d.paths[5].count("/n") == 1500


def test_decoding_with_two_workers_equals_one_process(cifar_subset, tmp_path):
    """Rows, labels, paths and skipped files in file order, whichever worker finished first."""
    data = copy_classes(cifar_subset(300), tmp_path / "d", ["cat", "dog"], 300)
    for name in ("cat/0-broken.jpg", "dog/zz-broken.png"):
        (data / name).write_bytes(b"\x89PNG not really")
    spec = make_spec(32, CIFAR_MEAN, CIFAR_STD)
    one = load_image_folder(data, spec, progress=False, use_cache=False, workers=1)
    two = load_image_folder(data, spec, progress=False, use_cache=False, workers=2)
    assert torch.equal(one.images, two.images) and torch.equal(one.labels, two.labels)
    assert one.paths == two.paths and one.skipped == two.skipped and len(two.skipped) == 2


# --- (7) a decode worker killed (the OOM killer's SIGKILL) -----------------------------------

def test_killed_decode_worker_ends_the_run_with_one_line(cifar_subset, tmp_path):
    """The worker is killed half-way through sending its decoded images (the parent is
    stopped meanwhile, so the message is certainly cut), which hung the run forever before."""
    psutil = pytest.importorskip("psutil")
    data = cifar_subset(400, classes=["cat", "dog", "ship"])
    p = _cnnx(seed_args(data, tmp_path / "runs", "oom", tmp_path / "c", "--epochs", "1", "--image-size", "224",
                        "--workers", "2", "--cache", "memory"))  # the last --workers wins; auto may pick disk
    proc = psutil.Process(p.pid)
    deadline = time.monotonic() + 120
    try:
        while len(proc.children()) < 2:
            assert p.poll() is None and time.monotonic() < deadline, "no decode workers appeared"
            time.sleep(0.02)
        workers = proc.children()
        os.kill(p.pid, signal.SIGSTOP)
        victim = None
        while victim is None:  # a worker that has begun to send: it blocks on the full pipe
            assert time.monotonic() < deadline, "no worker began to send"
            victim = next((w for w in workers if w.io_counters().write_chars > 0), None)
            time.sleep(0.02)
        time.sleep(0.2)
        victim.kill()
    finally:
        os.kill(p.pid, signal.SIGCONT)
    code, out, err = _finish(p, timeout=60)
    msg = _one_line(code, err)
    assert "decode worker process was killed by SIGKILL" in msg and "memory" in msg and "GiB" in msg, msg


def test_a_killed_run_takes_its_decode_workers_with_it_and_can_start_again(cifar_subset, tmp_path):
    """SIGKILL during decoding left the forked workers alive for ever (each held its own pipe's
    other end, so it never read EOF), and holding the run folder's lock: "in use by another cnnx
    train" for a pid that was gone. They now end with their parent."""
    psutil = pytest.importorskip("psutil")
    data = cifar_subset(400, classes=["cat", "dog", "ship"])
    args = seed_args(data, tmp_path / "runs", "k", tmp_path / "c", "--epochs", "1", "--image-size", "224",
                     "--workers", "2")
    p = _cnnx(args)
    proc = psutil.Process(p.pid)
    deadline = time.monotonic() + 120
    while len(proc.children()) < 2:
        assert p.poll() is None and time.monotonic() < deadline, "no decode workers appeared"
        time.sleep(0.02)
    workers = proc.children()
    os.kill(p.pid, signal.SIGSTOP)  # the workers block on their full pipes: alive when the parent dies
    os.kill(p.pid, signal.SIGKILL)
    p.communicate(timeout=60)
    gone, alive = psutil.wait_procs(workers, timeout=10)
    assert not alive, [w.pid for w in alive]
    code, out, err = _finish(_cnnx([*args[:-2], "--workers", "1", "--image-size", "32"]))
    assert code == 0 and "in use by another" not in err, err[-2000:]


# --- (11) full disk, read-only --out ---------------------------------------------------------

@pytest.mark.parametrize("size, what", [("4k", "config.json"), ("12m", "last.pt"), ("full", "config.json")])
def test_full_disk_is_one_line_and_leaves_no_partial_file(small, tmp_path, size, what):
    """seed-cnn's best.pt is ~8.5 MB and last.pt ~17 MB: 12m fills up at last.pt, 4k (one page,
    the lock file's) at config.json. A disk full before the run ("full") said "No space left on
    device" of no file (the lock's pid), and left a folder holding only the lock, one a try."""
    with mounted_tmpfs(tmp_path / "disk", "64k" if size == "full" else size) as disk:
        if size == "full":
            (disk / "runs").mkdir()
            with contextlib.suppress(OSError), open(disk / "filler", "wb") as f:
                f.write(bytes(1 << 20))
        r = run_cli(seed_args(small, disk / "runs", "x", tmp_path / "c", "--epochs", "1", "--batch-size", "16"))
        assert r.exit_code == 1 and "Traceback" not in r.stderr, r.stderr
        assert "No space left on device" in r.stderr.strip().splitlines()[-1], r.stderr
        run = disk / "runs" / "x"
        assert _temps(run) == [] and not (run / what).exists()
        if size == "full":
            assert r.stderr.strip().splitlines()[-1].endswith(f"{run / what}"), r.stderr
            assert not run.exists()
        if (run / "best.pt").exists():
            load_checkpoint(run / "best.pt")  # complete, not cut


def test_a_diverging_run_stops_with_one_line_and_saves_no_best_pt(small, tmp_path):
    """--lr 1e6 trained to NaN and still wrote best.pt with a "best val top-1" (a NaN row's
    argmax is class 0: the share of that class), exit 0. inf and NaN values of the float
    options were accepted too, and fine-tuning with muon silently trained the backbone at
    the full rate."""
    r = run_cli(seed_args(small, tmp_path / "runs", "nan", tmp_path / "c", "--epochs", "2", "--lr", "1e6"))
    assert r.exit_code == 1 and "Traceback" not in r.stderr, r.stderr[-2000:]
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("Error: training diverged in epoch ") and "nothing of this epoch is saved" in last, last
    diverged = int(last.split("epoch ")[1].split(":")[0])
    best = tmp_path / "runs" / "nan" / "best.pt"
    if best.exists():  # an earlier epoch's, finite
        ckpt = load_checkpoint(best)
        assert ckpt["epoch"] < diverged and all(torch.isfinite(t).all() for t in ckpt["state_dict"].values()
                                                if t.is_floating_point())
    for option, value in (("--lr", "inf"), ("--weight-decay", "nan"), ("--backbone-lr-mult", "inf")):
        r = run_cli(seed_args(small, tmp_path / "runs", "inf", tmp_path / "c", option, value))
        assert r.exit_code == 2 and "must be a finite number" in r.stderr, r.stderr[-2000:]
    ok = run_cli(seed_args(small, tmp_path / "runs", "base", tmp_path / "c", "--epochs", "1"))
    assert ok.exit_code == 0, ok.stderr[-2000:]
    r = run_cli(seed_args(small, tmp_path / "runs", "ft", tmp_path / "c", "--weights", tmp_path / "runs" / "base" /
                          "best.pt", "--optimizer", "muon"))
    assert r.exit_code == 2 and "cannot be combined with --optimizer muon" in r.stderr, r.stderr[-2000:]


def test_a_step_larger_than_memory_is_one_line_before_any_decoding(small, tmp_path):
    """--image-size 4096 on the CPU ended in the allocator's RuntimeError traceback at the first
    step (or the OOM killer's SIGKILL), after the whole folder was decoded."""
    from cnnx.train.zoo import activation_bytes

    small_bytes = activation_bytes("airnet", {}, (32, 32))
    assert 0 < 3.5 * small_bytes < activation_bytes("airnet", {}, (64, 64)) < 4.5 * small_bytes  # grows with the area
    r = run_cli(seed_args(small, tmp_path / "runs", "big", tmp_path / "c", "--image-size", "4096",
                          "--batch-size", "256"))
    assert r.exit_code == 1 and "Traceback" not in r.stderr, r.stderr[-2000:]
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("Error: seed-cnn on batches of 256 images of 4096x4096 px (--batch-size) needs about ") and \
        "a smaller --batch-size" in last, last
    assert "data:" not in r.stderr and not list((tmp_path / "c").glob("folders/*"))


def test_no_arch_holds_more_than_the_bound_that_skips_the_count():
    """_check_step_fits_memory skips the meta-device count (seconds of imports at every CPU
    start) where the batch's input times MAX_ACTIVATION_RATIO fits: the bound must hold for
    every arch of the zoo, at its own size and twice it."""
    from cnnx.train.config import resolve_config
    from cnnx.train.run import model_spec
    from cnnx.train.zoo import ARCHS, MAX_ACTIVATION_RATIO, activation_bytes

    for name in ARCHS:
        arch_kwargs, spec = model_spec(resolve_config(name))
        for side in (spec["size"][0], 2 * spec["size"][0]):
            counted = activation_bytes(name, arch_kwargs, (side, side))
            assert 0 < counted <= MAX_ACTIVATION_RATIO * 3 * side * side * 4, (name, side, counted)


def test_a_full_cache_folder_is_a_warning_and_the_run_trains(small, tmp_path):
    """The decoded data did not fit the cache folder: torch's writer said RuntimeError, not
    OSError, and the run ended in a 50-line traceback where a warning was meant."""
    with mounted_tmpfs(tmp_path / "cache", "64k") as cache:
        r = run_cli(seed_args(small, tmp_path / "runs", "x", cache, "--epochs", "1", "--cache", "memory"))
        assert r.exit_code == 0, r.stderr[-2000:]
        assert "warning: cannot write the data cache" in r.stderr and "No space left" in r.stderr
        assert [p.name for p in (cache / "folders").iterdir()] == []


def test_read_only_out_is_one_line(small, tmp_path):
    with mounted_tmpfs(tmp_path / "ro", "1m") as ro:
        (ro / "runs").mkdir()
        if subprocess.run(["mount", "-o", "remount,ro", str(ro)], capture_output=True).returncode != 0:
            pytest.skip("cannot remount the tmpfs read-only")
        r = run_cli(seed_args(small, ro / "runs", "x", tmp_path / "c", "--epochs", "1"))
        assert r.exit_code == 1 and "Traceback" not in r.stderr, r.stderr
        msg = r.stderr.strip().splitlines()[-1]
        assert "cannot create the run folder: Read-only file system" in msg and str(ro / "runs" / "x") in msg, msg


# --- (11) evaluate on broken checkpoints ------------------------------------------------------

def _crafted(tmp_path, name, *, nan=False, size=32, wrong_arch=False) -> Path:
    torch.manual_seed(0)
    model = create_model("seed-cnn", 3 if wrong_arch else 2, image_size=32)
    if nan:
        with torch.no_grad():
            model.classifier[-1].weight.fill_(float("nan"))
    spec = make_spec(32, CIFAR_MEAN, CIFAR_STD)
    spec["size"] = [size, size]
    ckpt = build_checkpoint(model=model, arch="seed-cnn", arch_kwargs={"image_size": 32}, class_names=["cat", "dog"],
                            preprocess=spec, epoch=1, metrics={}, config={})
    path = tmp_path / name
    torch.save(ckpt, path)  # written as a stranger would: not through cnnx's own writer
    return path


@pytest.mark.parametrize("kind, needle", [
    ("nan", "non-finite outputs (NaN or inf) for 10 of 10 images"),
    ("size", "size"),
    ("arch", "its arch 'seed-cnn'"),
])
def test_evaluate_broken_checkpoints_are_one_line(small, tmp_path, kind, needle):
    data = copy_classes(small, tmp_path / "d", ["cat", "dog"], 5)
    ckpt = _crafted(tmp_path, f"{kind}.pt", nan=kind == "nan", size=100_000 if kind == "size" else 32,
                    wrong_arch=kind == "arch")
    r = run_cli(["evaluate", ckpt, "--data", data, "--cache-dir", tmp_path / "c", "--workers", "1",
                 "--plot", tmp_path / "cm.png"])
    assert r.exit_code == 1 and "Traceback" not in r.stderr and r.stdout == "", (r.stdout, r.stderr)
    msg = r.stderr.strip().splitlines()[-1]
    assert msg.startswith("Error: ") and needle in msg, msg
    assert not (tmp_path / "cm.png").exists()


# --- reports ----------------------------------------------------------------------------------

def test_evaluate_report_is_a_page_with_the_images(small, tmp_path):
    runs = tmp_path / "runs"
    assert run_cli(seed_args(small, runs, "x", tmp_path / "c", "--epochs", "1", "--batch-size", "16")).exit_code == 0
    page = (runs / "x" / "report.html").read_text()
    assert page.lstrip().lower().startswith("<!doctype html") and "data:image/" in page
    report = tmp_path / "eval.html"
    r = run_cli(["evaluate", runs / "x" / "best.pt", "--data", small, "--cache-dir", tmp_path / "c",
                 "--report", report, "--plot", tmp_path / "cm.png"])
    assert r.exit_code == 0, r.stderr
    text = report.read_text()
    assert "data:image/" in text and sorted(os.listdir(small / "cat"))[0] in text


def test_weights_bring_their_own_widths_and_image_size(small, tmp_path):
    """--weights took only the arch from the checkpoint: a wider (GPU-recipe) airnet could not
    be fine-tuned at all, and a seed-cnn trained at 48 px failed on a tensor shape unless the
    user guessed --image-size 48."""
    import json

    from cnnx.runtime.preprocess import make_spec
    from cnnx.train.checkpoint import build_checkpoint, save_checkpoint

    r = run_cli(seed_args(small, tmp_path / "runs", "s48", tmp_path / "c", "--epochs", "1", "--image-size", "48"))
    assert r.exit_code == 0, r.stderr[-2000:]
    r = run_cli(seed_args(small, tmp_path / "runs", "ft48", tmp_path / "c", "--epochs", "1",
                          "--weights", tmp_path / "runs" / "s48" / "best.pt"))
    assert r.exit_code == 0, r.stderr[-2000:]
    assert json.loads((tmp_path / "runs" / "ft48" / "config.json").read_text())["preprocess"]["size"] == [48, 48]
    wide = create_model("airnet", 3, widths=(8, 16, 16))
    ckpt = build_checkpoint(model=wide, arch="airnet", arch_kwargs={"widths": [8, 16, 16]}, class_names=["a", "b", "c"],
                            preprocess=make_spec(32, CIFAR_MEAN, CIFAR_STD), epoch=1, metrics={}, config={})
    save_checkpoint(ckpt, tmp_path / "wide.pt")
    args = [a for a in seed_args(small, tmp_path / "runs", "ftw", tmp_path / "c", "--epochs", "1",
                                 "--weights", tmp_path / "wide.pt")]
    args[args.index("--arch") + 1] = "airnet"
    r = run_cli(args)
    assert r.exit_code == 0, r.stderr[-2000:]
    assert json.loads((tmp_path / "runs" / "ftw" / "config.json").read_text())["arch_kwargs"]["widths"] == [8, 16, 16]
    # at another size the widths are the checkpoint's still (they were dropped: "does not fit")
    r = run_cli([*[a if a != "ftw" else "ftw40" for a in args], "--image-size", "40"])
    assert r.exit_code == 0, r.stderr[-2000:]
    config = json.loads((tmp_path / "runs" / "ftw40" / "config.json").read_text())
    assert config["arch_kwargs"]["widths"] == [8, 16, 16] and config["preprocess"]["size"] == [40, 40]


def test_a_class_too_small_for_a_validation_image_is_said(small, tmp_path):
    """A 1-image class got no validation image: per_class.csv held nan for it, and nothing was said."""
    data = copy_classes(small, tmp_path / "d", ["cat", "dog"], 10)
    (data / "one").mkdir()
    shutil.copyfile(next((small / "cat").iterdir()), data / "one" / "only.jpg")
    r = run_cli(seed_args(data, tmp_path / "runs", "x", tmp_path / "c", "--epochs", "1"))
    assert r.exit_code == 0, r.stderr[-2000:]
    assert "note: 1 class(es) too small for a validation image: one (their val top-1 is not measured)" in r.stderr


def test_gpu_out_of_memory_in_an_epoch_is_one_line(small, tmp_path, monkeypatch):
    """CUDA's allocator raises torch.OutOfMemoryError, which ended a run with a traceback; it is one
    line naming the batch and the option that lowers it. The error is raised into an epoch here (a
    CPU machine has no CUDA allocator to exhaust); test_a_real_cuda_out_of_memory_is_one_line is
    the same on a GPU."""
    import cnnx.train.loop
    import cnnx.train.run as run_module

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    ok = run_cli(seed_args(small, tmp_path / "runs", "ok", tmp_path / "c", "--epochs", "1"))
    assert ok.exit_code == 0, ok.stderr[-2000:]
    monkeypatch.setattr(run_module, "train_epoch", out_of_memory)
    r = run_cli(seed_args(small, tmp_path / "runs", "oom", tmp_path / "c", "--batch-size", "32", "--image-size", "40"))
    last = _one_line(r.exit_code, r.stderr)
    assert last.startswith("Error: out of GPU memory on cpu") and "batches of 32 images of 40 px" in last, last
    assert "a smaller --batch-size" in last and not (tmp_path / "runs" / "oom" / "best.pt").exists()

    class TooLarge:  # decoded images that the card cannot hold at all: no batch size helps
        def numel(self):
            return 40 << 30

        def to(self, device):
            out_of_memory()

    with pytest.raises(run_module.OutOfGpuMemory, match=r"images \(40.0 GiB\) do not fit .*--cache disk"):
        run_module._resident(TooLarge(), "cuda:0")

    monkeypatch.setattr(cnnx.train.loop, "evaluate", out_of_memory)  # `cnnx evaluate` on a GPU
    r = run_cli(["evaluate", tmp_path / "runs" / "ok" / "best.pt", "--data", small, "--batch-size", "16",
                 "--cache-dir", tmp_path / "c"])
    last = _one_line(r.exit_code, r.stderr)
    assert last == "Error: out of GPU memory on cpu at --batch-size 16: a smaller --batch-size", last


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_real_cuda_out_of_memory_is_one_line(small, tmp_path):
    """resnet18 on 40 images of 4096 px in one batch needs hundreds of GiB of activations."""
    r = run_cli(["train", "--data", small, "--arch", "resnet18", "--image-size", "4096", "--batch-size", "40",
                 "--epochs", "1", "--device", "cuda", "--out", tmp_path / "runs", "--name", "oom",
                 "--cache-dir", tmp_path / "c", "--quiet"])
    last = _one_line(r.exit_code, r.stderr)
    assert last.startswith("Error: out of GPU memory on cuda") and "a smaller --batch-size" in last, last


def test_a_run_that_diverges_after_a_good_epoch_still_ends_its_best(cifar_train_dir, tmp_path, monkeypatch):
    """A run that diverged in epoch 3 kept best.pt of epoch 1 but never wrote test_metrics.json
    nor its plots, and could not: --resume diverged again, --resume --epochs 2 was refused.
    (Non-finite values in epoch 3 exactly: where a real --lr diverges depends on the machine.)"""
    from cnnx.train import run as train_run

    check = train_run.check_finite

    def diverges_in_epoch_3(tm, vm, epoch):
        if epoch == 2:
            tm = {**tm, "loss": float("nan")}
        return check(tm, vm, epoch)

    monkeypatch.setattr(train_run, "check_finite", diverges_in_epoch_3)
    data = tmp_path / "d"
    copy_classes(cifar_train_dir, data / "train", ["airplane", "cat", "dog"], 100)
    src = copy_classes(cifar_train_dir, tmp_path / "src", ["airplane", "cat", "dog"], 110)
    for c in ("airplane", "cat", "dog"):
        (data / "test" / c).mkdir(parents=True)
        for f in sorted((src / c).iterdir())[100:]:
            shutil.copyfile(f, data / "test" / c / f.name)
    r = run_cli(seed_args(data, tmp_path / "runs", "r", tmp_path / "c", "--epochs", "4", "--batch-size", "32"))
    assert r.exit_code == 1 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert r.stderr.strip().splitlines()[-1].startswith("Error: training diverged in epoch 3"), r.stderr[-2000:]
    run = tmp_path / "runs" / "r"
    best = load_checkpoint(run / "best.pt")
    test = json.loads((run / "test_metrics.json").read_text())
    assert test["epoch"] == best["epoch"] and test["n"] == 30
    assert sorted(os.listdir(run / "plots")) == ["confusion.png", "loss.png", "per_class.png", "top1.png", "top5.png"]


def test_names_with_a_newline_stay_on_the_error_line_and_a_copy_beyond_memory_is_one_line(small, tmp_path,
                                                                                          monkeypatch):
    """A class named with a newline cut the one-line errors to their first part (the CLI keeps a
    message's first line): the link under two classes, the class with no decodable image. And
    --cache memory whose images fit but whose split copies did not ended in torch's traceback."""
    def error(data):
        r = run_cli(seed_args(data, tmp_path / "runs", f"x{len(os.listdir(tmp_path))}", tmp_path / "c", "--epochs", "1"))
        assert r.exit_code == 1 and "Traceback" not in r.stderr, r.stderr[-2000:]
        return r.stderr.strip().splitlines()[-1]

    a = copy_classes(small, tmp_path / "a", ["cat", "dog"], 5)
    os.rename(a / "dog", a / "dog\nx")
    os.link(a / "cat" / sorted(os.listdir(a / "cat"))[0], a / "dog\nx" / "linked.jpg")
    assert "are one file (a link) in two classes, cat and 'dog\\nx': each image needs one class" in error(a)
    b = copy_classes(small, tmp_path / "b", ["cat", "dog"], 5)
    os.rename(b / "dog", b / "dog\nx")
    for f in (b / "dog\nx").iterdir():
        f.write_bytes(b"not an image")
    assert f"class folder '{b}/dog\\nx' holds no image that can be decoded" in error(b)
    from cnnx.train import data

    def no_memory(images, idx):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:127] DefaultCPUAllocator: can't allocate memory")

    monkeypatch.setattr(data, "take", no_memory)
    assert error(copy_classes(small, tmp_path / "m", ["cat", "dog"], 5)).startswith(
        "Error: not enough memory for a copy of ")


def test_a_resume_that_fails_before_its_first_checkpoint_leaves_config_json_as_last_pt_has_it(small, tmp_path):
    """--resume --epochs 3 rewrote config.json at its start: on a disk that filled up before its
    first last.pt, the run folder said 3 epochs while its last.pt (what resumes) said 2."""
    with mounted_tmpfs(tmp_path / "disk", "48m") as disk:
        args = seed_args(small, disk / "runs", "x", tmp_path / "c", "--epochs", "2", "--batch-size", "16")
        assert run_cli([*args, "--stop-after", "1"]).exit_code == 0
        config = disk / "runs" / "x" / "config.json"
        st = os.statvfs(disk)
        with open(disk / "filler", "wb") as f:
            f.write(bytes(max(0, st.f_bavail * st.f_frsize - (1 << 20))))  # 1 MiB left: not a last.pt
        r = run_cli([*args, "--resume", disk / "runs" / "x", "--epochs", "3"])
        assert r.exit_code == 1 and "No space left on device" in r.stderr, r.stderr[-2000:]
        assert json.loads(config.read_text())["epochs"] == 2
        (disk / "filler").unlink()
        r = run_cli([*args, "--resume", disk / "runs" / "x", "--epochs", "3"])
        assert r.exit_code == 0, r.stderr[-2000:]
        assert json.loads(config.read_text())["epochs"] == 3
        assert load_checkpoint(disk / "runs" / "x" / "last.pt")["config"]["epochs"] == 3
