"""Values a user types by mistake, found by the review's 502-case harness (issue 8's session):
each is one line and exit 2 (usage) or 1 (failure), before anything is read or written, and
nothing the user had is replaced: not a checkpoint by a PNG, not /dev/null by a file."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cnnx.runtime.files import atomic_write
from tests._train_util import copy_classes, run_cli, seed_args

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def run(cifar_train_dir, tmp_path_factory):
    """(data folder, a trained seed-cnn best.pt, its ONNX export)."""
    base = tmp_path_factory.mktemp("values")
    data = copy_classes(cifar_train_dir, base / "d", ["cat", "dog"], 20)
    r = run_cli(seed_args(data, base / "runs", "r", base / "c", "--epochs", "1"))
    assert r.exit_code == 0, r.stderr[-2000:]
    ckpt = base / "runs" / "r" / "best.pt"
    r = run_cli(["export", ckpt, "--out", base / "exp"])
    assert r.exit_code == 0, r.stderr[-2000:]
    return data, ckpt, base / "exp" / "model.onnx"


def _usage(r, needle, code=2):
    lines = r.stderr.strip().splitlines()
    assert r.exit_code == code and "Traceback" not in r.stderr and needle in lines[-1], r.stderr[-2000:]


def test_evaluate_replaces_only_its_own_plot_and_page(run, tmp_path):
    """--plot replaced whatever it named with a PNG, exit 0: the checkpoint being evaluated, a
    training image, /dev/null as root (made a regular file)."""
    data, ckpt, _model = run
    before = ckpt.read_bytes()
    text = tmp_path / "notes.txt"
    text.write_text("mine\n")
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    base = ["evaluate", ckpt, "--data", data, "--workers", "1"]
    _usage(run_cli([*base, "--plot", ckpt]), "is the checkpoint")
    _usage(run_cli([*base, "--plot", text]), "is not a PNG image")
    _usage(run_cli([*base, "--plot", fifo]), "is not a regular file")
    _usage(run_cli([*base, "--report", fifo]), "is not a regular file")
    _usage(run_cli([*base, "--plot", tmp_path / "p.png", "--report", tmp_path / "p.png"]), "must be different")
    _usage(run_cli([*base, "--report", tmp_path / "no" / "r.html"]), "has no folder")
    _usage(run_cli([*base, "--report", ""]), "needs a file name")
    assert ckpt.read_bytes() == before and text.read_text() == "mine\n" and fifo.is_fifo()
    ok = run_cli([*base, "--plot", tmp_path / "p.png"])
    assert ok.exit_code == 0 and (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"
    assert run_cli([*base, "--plot", tmp_path / "p.png"]).exit_code == 0  # its own plot: replaced


def test_evaluate_s_default_plots_of_two_sites_test_splits_are_two_files(run, tmp_path):
    """siteA/test and siteB/test shared confusion_test.png: the second evaluation replaced the first's."""
    import shutil

    data, ckpt, _model = run
    store = tmp_path / "store"
    store.mkdir()
    shutil.copy(ckpt, store / "best.pt")
    for site in ("siteA", "siteB"):
        shutil.copytree(data, tmp_path / site / "test")
        r = run_cli(["evaluate", store / "best.pt", "--data", tmp_path / site / "test", "--workers", "1",
                     "--cache-dir", tmp_path / "c"])
        assert r.exit_code == 0 and r.stdout.startswith("images\t"), r.stderr[-2000:]
    assert sorted(p.name for p in store.glob("confusion_*.png")) == ["confusion_siteA-test.png",
                                                                    "confusion_siteB-test.png"]


def test_evaluate_s_default_plots_of_two_folders_of_one_name_are_two_files(run, tmp_path):
    """data/ and other/data/ shared confusion_data.png: the second evaluation replaced the
    first's, without a word. A plot records what it scored; the same folder's replaces its own."""
    import shutil

    data, ckpt, _model = run
    store = tmp_path / "store"
    store.mkdir()
    shutil.copy(ckpt, store / "best.pt")
    written = []
    for folder in (tmp_path / "data", tmp_path / "other" / "data", tmp_path / "data"):
        if not folder.exists():
            shutil.copytree(data, folder)
        r = run_cli(["evaluate", store / "best.pt", "--data", folder, "--workers", "1", "--cache-dir", tmp_path / "c",
                     "--json"])
        assert r.exit_code == 0, r.stderr[-2000:]
        written.append(Path(json.loads(r.stdout)["plot"]).name)
    assert written[0] == written[2] == "confusion_data.png" and written[1].startswith("confusion_data-"), written
    assert sorted(p.name for p in store.glob("confusion_*.png")) == sorted(written[:2])


def test_evaluate_prints_its_figures_whatever_happens_to_its_files(run, tmp_path):
    """Its default plot replaced a file of the user's that --plot refuses; a checkpoint kept
    where the plot cannot go (read-only) lost the figures to an error naming a temp file; a
    report that cannot be written did too. The figures come first; the default plot is a
    warning; a file asked for that cannot be written is one line naming it, exit 1."""
    import json
    import shutil

    from tests._fs_util import mounted_tmpfs

    data, ckpt, _model = run
    store = tmp_path / "store"
    store.mkdir()
    shutil.copy(ckpt, store / "best.pt")
    default = store / f"confusion_{data.name}.png"
    default.write_text("my notes\n")
    base = ["evaluate", store / "best.pt", "--data", data, "--workers", "1"]
    r = run_cli([*base, "--json"])
    assert r.exit_code == 0 and json.loads(r.stdout)["plot"] is None and default.read_text() == "my notes\n"
    assert f"warning: no confusion plot: {default} exists and is not a PNG image" in r.stderr
    # A data folder named in bytes that are not UTF-8: matplotlib's title took the surrogates (a traceback).
    odd = Path(os.fsdecode(os.path.join(os.fsencode(tmp_path), b"d\xff")))
    shutil.copytree(data, odd)
    r = run_cli(["evaluate", store / "best.pt", "--data", odd, "--workers", "1", "--plot", tmp_path / "odd.png",
                 "--report", tmp_path / "odd.html"])
    assert r.exit_code == 0 and (tmp_path / "odd.png").read_bytes()[:4] == b"\x89PNG", r.stderr[-2000:]
    assert "d\\xff" in (tmp_path / "odd.html").read_text()
    with mounted_tmpfs(tmp_path / "full", "16k") as full:
        r = run_cli([*base, "--plot", tmp_path / "p.png", "--report", full / "r.html"])
        assert r.exit_code == 1 and r.stdout.startswith("images\t40\ntop1\t"), r.stderr
        assert r.stderr.strip().splitlines()[-1] == f"Error: cannot write: No space left on device: {full / 'r.html'}"
        assert os.listdir(full) == [] and (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"
        # both failing: both named (the report that was not written went unmentioned)
        r = run_cli([*base, "--plot", full / "p.png", "--report", full / "r.html"])
        assert r.stderr.strip().splitlines()[-1] == (f"Error: cannot write: No space left on device: {full / 'p.png'}; "
                                                     f"No space left on device: {full / 'r.html'}"), r.stderr


def test_the_atomic_writer_never_replaces_what_is_not_a_regular_file(tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(OSError, match="not a regular file"):
        atomic_write(fifo, b"x")
    assert fifo.is_fifo() and os.listdir(tmp_path) == ["fifo"]


def test_classify_outputs_that_are_not_files_and_empty_names_are_usage_errors(run, tmp_path):
    """-o /dev/zero --resume read the endless output into memory until the OOM killer came;
    -o FIFO --resume and --errors /dev/stderr --resume (a pipe) hung; empty names failed after the run, or wrote into the cwd."""
    data, _ckpt, model = run
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    base = ["classify", data, "--model", model, "--workers", "1"]
    _usage(run_cli([*base, "-o", fifo, "--resume"]), "is not a regular file")
    _usage(run_cli([*base, "-o", "/dev/zero", "--resume"]), "is not a regular file")
    _usage(run_cli([*base, "-o", tmp_path / "p.csv", "--errors", fifo]), "is not a regular file")
    r, w = os.pipe()  # `--errors /dev/stderr` with stderr on a pipe: the --resume read it for ever
    try:
        _usage(run_cli([*base, "-o", tmp_path / "p.csv", "--errors", f"/dev/fd/{w}", "--resume"]),
               "is not a regular file")
    finally:
        os.close(r)
        os.close(w)
    for extra in (["-o", ""], ["--errors", ""], ["-o", tmp_path / "p.csv", "--report", ""]):
        _usage(run_cli([*base, *extra]), "needs a file name")
    assert sorted(os.listdir(tmp_path)) == ["fifo"]


def test_train_and_export_values_that_made_tracebacks_hangs_or_silent_runs(run, tmp_path):
    data, ckpt, _model = run
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    base = seed_args(data, tmp_path / "runs", "v", tmp_path / "c", "--epochs", "1")
    for extra, needle in ((["--threads", "100000"], "--threads: must be 1 to 1024"),  # a segfault
                          (["--lr", "1e308"], "--lr: must be at most"),  # an overflow traceback
                          (["--epochs", str(2**63)], "--epochs: must be 1 to"),
                          (["--seed", str(2**64)], "--seed: must be 0 to"),
                          (["--aug", ","], "give augmentations"),  # meant no augmentation, silently
                          (["--weights", ""], "--weights needs a checkpoint file"),  # trained from scratch
                          (["--resume", ""], "--resume needs a run folder")):  # started a new run
        _usage(run_cli([*base, *extra]), needle)
    _usage(run_cli([*base, "--aug", "crop", "--crop-pad", "1000"]), "must be smaller than the image side")
    # a traceback at the first step, after all the data was decoded
    for arch, side, smallest in (("airnet", 8, 9), ("vgg16", 31, 32), ("seed-vgg", 8, 16)):
        _usage(run_cli([*base, "--arch", arch, "--image-size", str(side)]),
               f"{arch} cannot take {side}x{side} px images (its layers shrink them to nothing); "
               f"the smallest it takes is {smallest}")
    # torch's "Expected more than 1 value per channel when training" at the first step, after the decoding
    _usage(run_cli([*base, "--arch", "resnet18", "--image-size", "32", "--batch-size", "1"]),
           "--batch-size 1: resnet18 at 32x32 px has batch norm over 1x1 maps, which cannot train on one image a "
           "batch; pass --batch-size 2 or more")
    assert not (tmp_path / "c").exists()  # before any image was decoded
    _usage(run_cli([*base, "--freeze-backbone-epochs", "1"]), "pass --weights or --pretrained")  # froze random weights
    _usage(run_cli([*base, "--freeze-backbone-epochs", "-1"]), "--freeze-backbone-epochs: must be >= 0, got -1")
    import pickle

    import torch

    torch.save(torch.nn.Linear(2, 2).state_dict(), tmp_path / "bare.pt")
    (tmp_path / "plain.pkl").write_bytes(pickle.dumps({"a": 1}, protocol=4))
    import warnings

    with warnings.catch_warnings():  # torch.jit's deprecation, the test's own
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), tmp_path / "script.pt")  # was "truncated", and quoted
    for weights, needle in (("bare.pt", "it is a bare state_dict; cnnx train writes checkpoints, and --pretrained"),
                            ("plain.pkl", "a safe, weights-only load refused it"),  # torch's weights_only advice
                            ("script.pt", "a TorchScript archive (torch.jit.save), not a checkpoint: cnnx never loads")):
        r = run_cli([*base, "--weights", tmp_path / weights])
        _usage(r, needle, 1)
        assert len(r.stderr.strip().splitlines()) == 1, r.stderr  # no warning of torch's before it
    _usage(run_cli([*base, "--weights", fifo]), "checkpoint is not a regular file", 1)  # hung
    # --resume of a folder that is not a run left a .cnnx-run.lock in it, and refused after
    _usage(run_cli(["train", "--resume", data, "--quiet"]), "not a run to continue, or one stopped", 1)
    assert not (data / ".cnnx-run.lock").exists()
    # --out and --name with --resume were ignored: the run went on in its own folder
    _usage(run_cli(["train", "--resume", ckpt.parent, "--name", "other", "--out", tmp_path / "elsewhere"]),
           "--resume continues the run in its own folder; --out and --name do not apply")
    _usage(run_cli(["export", ckpt, "--out", ""]), "needs a folder name")  # wrote into the cwd
    _usage(run_cli(["export", fifo]), "checkpoint is not a regular file", 1)  # hung
    # click's file_okay=False let a device through: exit 1 from the export, where a file was 2
    _usage(run_cli(["export", ckpt, "--out", tmp_path / "e", "--verify-data", os.devnull]), "is not a folder")


def test_a_full_stdout_is_one_line(run):
    """cnnx info > /dev/full (and export, evaluate, train after their work) ended in an
    OSError traceback."""
    _data, _ckpt, model = run
    with open("/dev/full", "w") as full:
        r = subprocess.run([sys.executable, "-m", "cnnx", "info", str(model)], stdout=full, stderr=subprocess.PIPE,
                           text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 1 and r.stderr.strip().splitlines() == [
        "Error: cannot write the output: No space left on device"], r.stderr


def _closed_stdout():
    os.close(1)


def test_a_closed_stdout_is_one_line_and_no_file_takes_its_place(run, tmp_path):
    """`cnnx classify >&-` was an AttributeError traceback (sys.stdout is None), and the first
    file opened took descriptor 1, where anything printed to stdout would land."""
    data, _ckpt, model = run

    def classify(*extra):
        return subprocess.run([sys.executable, "-m", "cnnx", "classify", str(data), "--model", str(model), *extra],
                              stderr=subprocess.PIPE, text=True, cwd=ROOT, timeout=120, preexec_fn=_closed_stdout)

    r = classify()  # the predictions were to go to stdout
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "Bad file descriptor" in r.stderr
    out = tmp_path / "p.csv"
    r = classify("-o", str(out))
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    lines = out.read_text().splitlines()
    assert lines[0].startswith('"path"') and len(lines) == 1 + 40
    r = subprocess.run([sys.executable, "-m", "cnnx", "info", str(model)], stderr=subprocess.PIPE, text=True,
                       cwd=ROOT, timeout=120, preexec_fn=_closed_stdout)
    assert r.returncode == 1 and r.stderr.strip().splitlines() == [
        "Error: cannot write the output: stdout is closed"], r.stderr


def test_temps_a_killed_command_left_beside_its_files_are_removed_by_its_next_run(run, tmp_path):
    """A classify or evaluate killed while writing (its run record, --report, --plot) left a
    .cnnx-tmp-<pid>-* file that its later runs never removed (train, the cache and export did)."""
    from cnnx.runtime.files import TEMP_PREFIX

    data, ckpt, model = run
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          check=True).stdout.strip()
    for name, args in (("c", ["classify", data, "--model", model, "-o", "{}/p.csv", "--report", "{}/page.html"]),
                       ("e", ["evaluate", ckpt, "--data", data, "--plot", "{}/c.png", "--report", "{}/page.html"])):
        folder = tmp_path / name
        folder.mkdir()
        left = folder / f"{TEMP_PREFIX}{dead}-x1y2z3"
        left.write_bytes(b"half a file")
        live = folder / f"{TEMP_PREFIX}{os.getpid()}-a1b2c3"  # a live process's: being written now
        live.write_bytes(b"being written")
        r = subprocess.run([sys.executable, "-m", "cnnx", *[str(a).replace("{}", str(folder)) for a in args]],
                           capture_output=True, text=True, cwd=ROOT, timeout=300)
        assert r.returncode == 0, r.stderr[-2000:]
        assert not left.exists() and live.exists(), sorted(p.name for p in folder.iterdir())
