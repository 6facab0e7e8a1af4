"""Bad inputs to `cnnx train` / `cnnx evaluate`: each gets a one-line message naming the
problem and a meaningful exit code (2 usage, 1 failure), never a traceback."""

from __future__ import annotations

import csv
import json
import shutil
import socket

import pytest
import torch

from cnnx.train.checkpoint import load_checkpoint
from tests._train_util import copy_classes, run_cli, seed_args


def _offline(monkeypatch):
    """No network, as on this machine and in air-gapped CI: every connection attempt fails."""
    def refuse(*a, **k):
        raise OSError("network is unreachable (test)")

    monkeypatch.setattr(socket, "create_connection", refuse)


def _one_line_error(r, code, *needles):
    assert r.exit_code == code, (r.exit_code, r.stdout, r.stderr)
    assert "Traceback" not in r.stderr and r.stdout == ""
    msg = r.stderr.strip().splitlines()[-1]
    assert msg.startswith("Error:"), r.stderr
    for n in needles:
        assert n in msg, (n, msg)
    return msg


def test_missing_data_path(tmp_path):
    r = run_cli(seed_args(tmp_path / "nope", tmp_path, "x", tmp_path / "c"))
    _one_line_error(r, 2, "--data", "no such folder")


def test_empty_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    r = run_cli(seed_args(tmp_path / "empty", tmp_path / "runs", "x", tmp_path / "c"))
    _one_line_error(r, 1, "no class folders")


def test_single_class(cifar_train_dir, tmp_path):
    data = copy_classes(cifar_train_dir, tmp_path / "one", ["cat"], 5)
    r = run_cli(seed_args(data, tmp_path / "runs", "x", tmp_path / "c"))
    _one_line_error(r, 1, "1 class", "at least 2")


def test_corrupt_files_are_skipped_and_reported_by_path_with_a_count(cifar_train_dir, tmp_path):
    data = copy_classes(cifar_train_dir, tmp_path / "d", ["cat", "dog"], 30)
    good = sorted((data / "cat").iterdir())[0].read_bytes()
    (data / "cat" / "truncated.jpg").write_bytes(good[: len(good) // 3])
    (data / "dog" / "empty.png").write_bytes(b"")
    (data / "dog" / "text.jpg").write_text("hello")
    r = run_cli(seed_args(data, tmp_path / "runs", "x", tmp_path / "c", "--epochs", "1", "--batch-size", "16"))
    assert r.exit_code == 0, r.stderr
    assert "skipped 3 file(s)" in r.stderr
    for path in (data / "cat" / "truncated.jpg", data / "dog" / "empty.png", data / "dog" / "text.jpg"):
        assert str(path) in r.stderr
    listed = (tmp_path / "runs" / "x" / "skipped.txt").read_text().splitlines()
    assert len(listed) == 3
    assert "data: 60 images" in r.stderr  # the 60 good ones were all used


def test_unknown_arch_lists_the_valid_ones(tmp_path):
    r = run_cli(["train", "--arch", "resnet19", "--out", tmp_path])
    _one_line_error(r, 2, "unknown arch 'resnet19'", "seed-cnn", "airnet", "resnet18", "vgg16")


def test_pretrained_offline_is_a_clear_error(cifar_train_dir, tmp_path, monkeypatch):
    _offline(monkeypatch)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))  # an empty weight cache
    data = copy_classes(cifar_train_dir, tmp_path / "d", ["cat", "dog"], 5)
    args = ["train", "--data", data, "--arch", "resnet18", "--pretrained", "--image-size", "32", "--out",
            tmp_path / "runs", "--cache-dir", tmp_path / "c", "--quiet", "--workers", "1"]
    r = run_cli(args)
    _one_line_error(r, 1, "pretrained weights are not in the local cache", "unreachable")
    r = run_cli(["train", "--arch", "seed-cnn", "--pretrained", "--data", data, "--out", tmp_path / "runs"])
    _one_line_error(r, 2, "seed-cnn has no pretrained weights", "resnet18")


def test_cifar10_offline_tells_how_to_point_at_a_local_copy(tmp_path, monkeypatch):
    _offline(monkeypatch)
    r = run_cli(["train", "--data", "cifar10", "--data-root", tmp_path / "nothing-here", "--out", tmp_path / "runs",
                 "--quiet", "--epochs", "1"])
    _one_line_error(r, 1, "CIFAR-10 is not in", "holds no complete cifar-10-batches-py", "--data-root", "--data DIR")


@pytest.mark.parametrize("args, needle", [
    (["--epochs", "0"], "--epochs"),
    (["--lr", "-1"], "--lr"),
    (["--batch-size", "0"], "--batch-size"),
    (["--label-smoothing", "1.5"], "--label-smoothing"),
    (["--val-fraction", "1"], "--val-fraction"),
    (["--optimizer", "lion"], "'lion' is not one of"),
    (["--aug", "crop,mixup"], "unknown augmentation 'mixup'"),
    (["--epochs", "many"], "'many' is not a valid integer"),
    (["--name", "a/b"], "plain folder name"),
    (["--image-size", "5000"], "must be 8 to 4096 pixels"),  # once: a 13 GB decode cache, then a traceback
])
def test_bad_option_values_are_usage_errors(tmp_path, args, needle):
    (tmp_path / "d" / "a").mkdir(parents=True)
    r = run_cli(seed_args(tmp_path / "d", tmp_path / "runs", "x", tmp_path / "c") + args)
    msg = r.stderr.strip().splitlines()[-1]
    assert r.exit_code == 2 and "Traceback" not in r.stderr, r.stderr
    assert needle in msg, msg
    assert not (tmp_path / "runs").exists()  # nothing written for a rejected command


def test_existing_run_is_never_overwritten_and_resume_keeps_its_config(cifar_train_dir, tmp_path):
    data = copy_classes(cifar_train_dir, tmp_path / "d", ["cat", "dog"], 20)
    args = seed_args(data, tmp_path / "runs", "x", tmp_path / "c", "--epochs", "2", "--batch-size", "16")
    assert run_cli(args + ["--stop-after", "1"]).exit_code == 0
    before = (tmp_path / "runs" / "x" / "best.pt").read_bytes()
    r = run_cli(args)
    _one_line_error(r, 1, "already exists", "--resume")
    assert (tmp_path / "runs" / "x" / "best.pt").read_bytes() == before
    r = run_cli(["train", "--resume", tmp_path / "runs" / "x", "--lr", "0.5"])
    _one_line_error(r, 2, "cannot change --lr")
    r = run_cli(["train", "--resume", tmp_path / "runs" / "x" / "best.pt"])
    _one_line_error(r, 1, "cannot be resumed", "last.pt")
    r = run_cli(["train", "--resume", tmp_path / "runs" / "nope"])
    _one_line_error(r, 1, "not found")
    (tmp_path / "notes.txt").write_text("mine\n")  # it said "holds no last.pt" of the folder holding it
    r = run_cli(["train", "--resume", tmp_path / "notes.txt"])
    _one_line_error(r, 1, "notes.txt: not in a run's folder")
    r = run_cli(["train", "--resume", tmp_path / "runs" / "x" / "metrics.csv"])
    _one_line_error(r, 1, "cannot read checkpoint")
    r = run_cli(seed_args(data, tmp_path / "runs", "", tmp_path / "c", "--epochs", "2"))  # it took the default name
    _one_line_error(r, 2, "--name needs a folder name")
    # The command that started the run, --resume added, continues it (its --data, --arch, --lr,
    # --out and --name were refused); another value still is.
    r = run_cli(args + ["--resume", tmp_path / "runs" / "x", "--batch-size", "32"])
    _one_line_error(r, 2, "cannot change --batch-size")
    r = run_cli(args + ["--resume", tmp_path / "runs" / "x"])
    assert r.exit_code == 0 and "resuming" in r.stderr, r.stderr
    assert len((tmp_path / "runs" / "x" / "metrics.csv").read_text().strip().splitlines()) == 1 + 2
    # A relative --cache-dir given to --resume is stored as the folder it named (it was stored
    # relative: a later --resume from elsewhere decoded the data again into a new folder there)
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(tmp_path)
        r = run_cli(["train", "--resume", tmp_path / "runs" / "x", "--epochs", "3", "--cache-dir", "c"])
    assert r.exit_code == 0, r.stderr
    stored = json.loads((tmp_path / "runs" / "x" / "config.json").read_text())["cache_dir"]
    assert stored == str(tmp_path / "c"), stored
    # ... also one that gave --out alone, its run default-named (it was "--out do not apply")
    unnamed = [a for a in args if a not in ("--name", "x")] + ["--stop-after", "1"]
    assert run_cli(unnamed).exit_code == 0
    (run,) = [p for p in (tmp_path / "runs").iterdir() if p.name.startswith("seed-cnn-")]
    r = run_cli([*unnamed, "--resume", run])
    assert r.exit_code == 0 and len((run / "metrics.csv").read_text().strip().splitlines()) == 1 + 2, r.stderr
    r = run_cli([*[a if a != str(tmp_path / "runs") else str(tmp_path / "elsewhere") for a in map(str, unnamed)],
                 "--resume", run])
    _one_line_error(r, 2, "--out does not apply")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_device_cuda_without_cuda(cifar_train_dir, tmp_path):
    data = copy_classes(cifar_train_dir, tmp_path / "d", ["cat", "dog"], 5)
    r = run_cli(seed_args(data, tmp_path / "runs", "x", tmp_path / "c", "--device", "cuda"))
    _one_line_error(r, 1, "CUDA is not available")


def test_evaluate_bad_inputs(cifar_train_dir, tmp_path):
    data = copy_classes(cifar_train_dir, tmp_path / "d", ["cat", "dog"], 10)
    r = run_cli(["evaluate", tmp_path / "missing.pt", "--data", data])
    _one_line_error(r, 1, "checkpoint not found")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    r = run_cli(["evaluate", junk, "--data", data])
    msg = _one_line_error(r, 1, str(junk))
    assert "refused to load" in msg or "cannot read checkpoint" in msg
    r = run_cli(["evaluate", junk])
    assert r.exit_code == 2 and "--data" in r.stderr
    # A checkpoint trained on cat/dog cannot score a folder with a class it never saw.
    assert run_cli(seed_args(data, tmp_path / "runs", "x", tmp_path / "c", "--epochs", "1")).exit_code == 0
    other = copy_classes(cifar_train_dir, tmp_path / "o", ["cat", "frog"], 3)
    r = run_cli(["evaluate", tmp_path / "runs" / "x" / "best.pt", "--data", other, "--cache-dir", tmp_path / "c"])
    _one_line_error(r, 1, "classes the checkpoint does not know: frog")
    # A class folder's name with a newline stays on the error's one line, quoted.
    (other / "frog").rename(other / "fr\nog")
    r = run_cli(["evaluate", tmp_path / "runs" / "x" / "best.pt", "--data", other, "--cache-dir", tmp_path / "c"])
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    _one_line_error(r, 1, "does not know: 'fr\\nog' (it knows: cat, dog)")
    r = run_cli(["evaluate", tmp_path / "runs" / "x" / "best.pt", "--data", data, "--split", "test"])
    _one_line_error(r, 2, "no train/val/test folders")


def test_split_layout_early_stopping_and_test_split_once(cifar_train_dir, tmp_path):
    """DIR/{train,val,test}/<class>/: val/ is used for selection, test/ once at the end; a run
    whose val top-1 cannot move (lr 1e-9) stops after --patience epochs and says so."""
    data = tmp_path / "d"
    copy_classes(cifar_train_dir, data / "train", ["cat", "dog"], 24)
    for split, offset in (("val", 100), ("test", 200)):
        for c in ("cat", "dog"):
            (data / split / c).mkdir(parents=True)
            for f in sorted((cifar_train_dir / c).iterdir())[offset:offset + 8]:
                (data / split / c / f.name).write_bytes(f.read_bytes())
    r = run_cli(seed_args(data, tmp_path / "runs", "x", tmp_path / "c", "--epochs", "5", "--batch-size", "16",
                          "--lr", "1e-9", "--patience", "1"))
    assert r.exit_code == 0, r.stderr
    assert "early stop: val top-1 has not improved (nor its loss at the same top-1) for 1 epoch(s)" in r.stderr
    run = tmp_path / "runs" / "x"
    assert len((run / "metrics.csv").read_text().strip().splitlines()) == 1 + 2
    # best.pt is the best epoch's (1: epoch 2 did not improve), last.pt the last one's
    assert load_checkpoint(run / "best.pt")["epoch"] == 1 and load_checkpoint(run / "last.pt")["epoch"] == 2
    config = json.loads((run / "config.json").read_text())
    assert (config["train_images"], config["val_images"], config["test_images"]) == (48, 16, 16)
    test = json.loads((run / "test_metrics.json").read_text())
    assert test["n"] == 16 and test["checkpoint"] == "best.pt" and "test top-1" in r.stdout
    # Killed after its last checkpoint, before the test split and the plots: --resume writes them, trains nothing.
    before = (run / "test_metrics.json").read_bytes()
    (run / "test_metrics.json").unlink()
    (run / "plots" / "confusion.png").unlink()
    # The command that began it with --resume added (README) gives --epochs and --patience again,
    # their own values: it was refused ("as many as --epochs 5 asks").
    began = seed_args(data, tmp_path / "runs", "x", tmp_path / "c", "--epochs", "5", "--batch-size", "16",
                      "--lr", "1e-9", "--patience", "1")
    r = run_cli([*began, "--resume", run])
    assert r.exit_code == 0 and "stopped before it wrote plots/confusion.png, test_metrics.json" in r.stderr, r.stderr
    assert (run / "test_metrics.json").read_bytes() == before and (run / "plots" / "confusion.png").exists()
    assert len((run / "metrics.csv").read_text().strip().splitlines()) == 1 + 2
    # Its --resume stopped again after one more epoch; it is refused unless the patience grows.
    r = run_cli(["train", "--resume", run, "--quiet"])
    assert r.exit_code == 2 and "stopped early after epoch 2" in r.stderr and "--patience" in r.stderr, r.stderr
    assert len((run / "metrics.csv").read_text().strip().splitlines()) == 1 + 2
    config_before = (run / "config.json").read_bytes()
    r = run_cli(["train", "--resume", run, "--quiet", "--patience", "0"])
    assert r.exit_code == 0, r.stderr
    assert len((run / "metrics.csv").read_text().strip().splitlines()) == 1 + 5
    # killed after its last last.pt, before config.json: the resume that writes what the kill left
    # writes config.json too (it said --patience 1 for good, last.pt 0)
    config_after = (run / "config.json").read_bytes()
    assert json.loads(config_after)["patience"] == 0
    (run / "config.json").write_bytes(config_before)
    (run / "plots" / "confusion.png").unlink()
    r = run_cli(["train", "--resume", run, "--quiet"])
    assert r.exit_code == 0 and "stopped before it wrote plots/confusion.png" in r.stderr, r.stderr
    assert (run / "config.json").read_bytes() == config_after
    # evaluate on its train/ says so; it held nothing out of train/ (its validation images were val/'s)
    r = run_cli(["evaluate", run / "best.pt", "--data", data, "--split", "train", "--cache-dir", tmp_path / "c"])
    assert r.exit_code == 0 and "these figures include its 48 training images (its validation images were in val/" \
        in r.stderr, r.stderr
    r = run_cli(["evaluate", run / "best.pt", "--data", data / "train", "--cache-dir", tmp_path / "c"])  # named itself
    assert r.exit_code == 0 and "(its validation images were in val/" in r.stderr, r.stderr
    r = run_cli(["evaluate", run / "best.pt", "--data", data, "--json", "--cache-dir", tmp_path / "c"])
    assert json.loads(r.stdout)["trained_on"] is False and "trained on" not in r.stderr  # test/: held out
    assert json.loads(r.stdout)["split"] == "test" and "the test split" in r.stderr  # the default: test, else val
    # The patience counts across a resume: paused in a plateau one epoch after the best, the run
    # stops where an uninterrupted one stops (2 epochs after it), and a run whose last epoch is its
    # patience's last finished its epochs (no early stop). Training seconds continue after a resume.
    plateau = ["--batch-size", "16", "--lr", "1e-9", "--patience", "2"]
    r = run_cli(seed_args(data, tmp_path / "runs", "straight", tmp_path / "c", "--epochs", "5", *plateau))
    assert r.exit_code == 0 and "early stop" in r.stderr, r.stderr
    straight = (tmp_path / "runs" / "straight" / "metrics.csv").read_text().strip().splitlines()
    assert len(straight) == 1 + 3
    paused = tmp_path / "runs" / "paused"
    r = run_cli(seed_args(data, tmp_path / "runs", "paused", tmp_path / "c", "--epochs", "5", *plateau,
                          "--stop-after", "2"))
    assert r.exit_code == 0 and not (paused / "test_metrics.json").exists() and "test top-1" not in r.stdout, \
        r.stdout  # a pause is no end: the test split is scored once, when the run ends
    r = run_cli(["train", "--resume", paused, "--quiet"])
    assert r.exit_code == 0 and "early stop" in r.stderr, r.stderr
    rows = list(csv.DictReader((paused / "metrics.csv").open()))
    assert len(rows) == 3 and (paused / "test_metrics.json").exists()
    assert float(rows[2]["train_seconds_total"]) > float(rows[1]["train_seconds_total"]) > 0
    r = run_cli(seed_args(data, tmp_path / "runs", "whole", tmp_path / "c", "--epochs", "3", *plateau))
    assert r.exit_code == 0 and "early stop" not in r.stderr, r.stderr


def test_a_test_split_without_a_class_and_evaluate_on_a_train_folder_the_run_held_out_of(cifar_train_dir, tmp_path):
    """DIR/{train,test} with a class test/ lacks: test_metrics.json is JSON (null, not NaN, for
    that class). evaluate on train/ says the run held its validation images out of it (it spoke
    of a val/ there was none of), names the split it scores, and its report says so too; the
    report's loss chart says its train loss includes label smoothing."""
    import html

    data = tmp_path / "d"
    copy_classes(cifar_train_dir, data / "train", ["cat", "dog", "ship"], 12)
    copy_classes(cifar_train_dir, data / "test", ["cat", "dog"], 4)
    r = run_cli(seed_args(data, tmp_path / "runs", "x", tmp_path / "c", "--epochs", "1", "--label-smoothing", "0.1"))
    assert r.exit_code == 0, r.stderr
    run = tmp_path / "runs" / "x"
    text = (run / "test_metrics.json").read_text()
    test = json.loads(text, parse_constant=lambda c: pytest.fail(f"{c} in test_metrics.json: not JSON"))
    assert test["per_class"][2] is None and test["n"] == 8
    page = html.unescape((run / "report.html").read_text())
    assert "loss (train loss includes label smoothing 0.1)" in page
    r = run_cli(["evaluate", run / "best.pt", "--data", data, "--split", "train", "--cache-dir", tmp_path / "c",
                 "--report", tmp_path / "eval.html"])
    assert r.exit_code == 0, r.stderr
    assert "the run held out 3 of its images for validation" in r.stderr and "val/" not in r.stderr, r.stderr
    assert "the run held out 3 of its images for validation" in html.unescape((tmp_path / "eval.html").read_text())
    r = run_cli(["evaluate", run / "best.pt", "--data", data, "--cache-dir", tmp_path / "c"])
    assert r.exit_code == 0 and f"note: scoring {data / 'test'}, the test split" in r.stderr, r.stderr


def test_resume_refuses_data_that_changed_and_rebuilds_a_best_pt_it_lacks(cifar_train_dir, tmp_path):
    """--resume decodes the data again: files added since the run began once gave a new split
    silently (then an error every epoch), a class added a traceback, and config.json was
    rewritten first. last.pt is written before best.pt: a run stopped between them resumes,
    its best.pt rebuilt from last.pt (best.pt first once left a run that could neither resume
    nor start again)."""
    data = copy_classes(cifar_train_dir, tmp_path / "d", ["cat", "dog"], 20)
    run = tmp_path / "runs" / "x"
    args = seed_args(data, tmp_path / "runs", "x", tmp_path / "c", "--epochs", "2", "--batch-size", "16")
    assert run_cli(args + ["--stop-after", "1"]).exit_code == 0
    config = (run / "config.json").read_bytes()
    extra = sorted((cifar_train_dir / "cat").iterdir())[100:103]
    for f in extra:
        shutil.copyfile(f, data / "cat" / f"new-{f.name}")
    r = run_cli(["train", "--resume", run])
    _one_line_error(r, 1, "changed since the run began", "training images")
    # begun by a cnnx that decoded otherwise: the files may be the same, and "restore the data" cannot help
    from cnnx.runtime.preprocess import PREPROCESS_VERSION

    last = torch.load(run / "last.pt", map_location="cpu", weights_only=True)
    assert last["config"]["preprocess_version"] == PREPROCESS_VERSION
    last["config"]["preprocess_version"] = PREPROCESS_VERSION - 1
    torch.save(last, run / "older.pt")
    r = run_cli(["train", "--resume", run / "older.pt"])
    _one_line_error(r, 1, "this cnnx decodes images otherwise than the one that began the run",
                    f"preprocess version {PREPROCESS_VERSION}, the run's {PREPROCESS_VERSION - 1}",
                    "resume with that cnnx, or train a new run")
    del last["config"]["preprocess_version"]  # as a run of cnnx before it was recorded: not known
    torch.save(last, run / "older.pt")
    r = run_cli(["train", "--resume", run / "older.pt"])
    _one_line_error(r, 1, "changed since the run began", "or the older cnnx that began it decoded some files otherwise",
                    "restore the data, or train a new run")
    (run / "older.pt").unlink()
    for f in extra:
        (data / "cat" / f"new-{f.name}").unlink()
    copy_classes(cifar_train_dir, data, ["frog"], 5)
    r = run_cli(["train", "--resume", run])
    _one_line_error(r, 1, "changed since the run began", "classes: 2 then, 3 now")
    assert (run / "config.json").read_bytes() == config
    shutil.rmtree(data / "frog")
    # a training image of each class moved into the other, as a user relabels: same counts, same
    # held-out files, other training labels (resumed silently, the run no longer the one it began)
    cat, dog = sorted((data / "cat").iterdir())[0], sorted((data / "dog").iterdir())[0]
    cat.rename(data / "dog" / f"was-cat-{cat.name}")
    dog.rename(data / "cat" / f"was-dog-{dog.name}")
    r = run_cli(["train", "--resume", run])
    _one_line_error(r, 1, "changed since the run began", "training files: other files")
    (data / "dog" / f"was-cat-{cat.name}").rename(cat)
    (data / "cat" / f"was-dog-{dog.name}").rename(dog)

    (run / "best.pt").unlink()  # stopped after last.pt, before best.pt
    r = run_cli(["train", "--resume", run])
    assert r.exit_code == 0, r.stderr
    assert "best.pt of epoch 1 rebuilt from last.pt" in r.stderr
    assert (run / "best.pt").exists() and load_checkpoint(run / "last.pt")["epoch"] == 2
    # begun before the split by name (no "split" in its config): it resumes on the split it began with
    from cnnx.train.data import SPLIT_BY_GENERATOR, SPLIT_BY_NAME, load_splits
    from cnnx.train.run import files_digest

    assert last["config"]["split"] == SPLIT_BY_NAME
    old_split = load_splits({**last["config"], "split": SPLIT_BY_GENERATOR}, progress=False)
    assert files_digest(old_split.val_paths) != last["config"]["val_files_sha256"]
    last["config"]["preprocess_version"] = PREPROCESS_VERSION
    for key in ("split", "val_relpaths_sha256", "train_relpaths_sha256"):  # none recorded then
        del last["config"][key]
    last["config"]["val_files_sha256"] = files_digest(old_split.val_paths)
    torch.save(last, run / "older.pt")
    r = run_cli(["train", "--resume", run / "older.pt", "--epochs", "2"])
    assert r.exit_code == 0, r.stderr[-2000:]
    assert json.loads((run / "config.json").read_text())["split"] == SPLIT_BY_GENERATOR  # now recorded
    assert run_cli(["train", "--resume", run / "last.pt", "--epochs", "3"]).exit_code == 0  # and again


def test_a_run_whose_data_folder_moved_resumes_and_is_evaluated_there(cifar_train_dir, tmp_path):
    """An external disk mounted elsewhere, a folder renamed: the run could never be resumed
    ("data folder not found", then "cannot change --data"), its held-out images were lost to
    evaluate --split val, and a copy of its folder was scored without the note that its figures
    include the training images. Its files are recorded by their paths in the folder now."""
    data = copy_classes(cifar_train_dir, tmp_path / "d", ["cat", "dog"], 20)
    run = tmp_path / "runs" / "x"
    assert run_cli(seed_args(data, tmp_path / "runs", "x", tmp_path / "c", "--epochs", "2", "--batch-size", "16",
                             "--stop-after", "1")).exit_code == 0
    moved = tmp_path / "elsewhere" / "photos"
    moved.parent.mkdir()
    data.rename(moved)
    r = run_cli(["train", "--resume", run, "--data", moved])
    assert r.exit_code == 0 and f"the run's data folder {data} is not there: continuing on {moved}" in r.stderr, \
        r.stderr[-2000:]
    assert json.loads((run / "config.json").read_text())["data"] == str(moved)
    r = run_cli(["evaluate", run / "best.pt", "--data", moved, "--split", "val", "--json", "--cache-dir", tmp_path / "c"])
    assert r.exit_code == 0 and json.loads(r.stdout)["n"] == 4, r.stderr[-2000:]  # the 4 it held out
    copy = tmp_path / "copy"
    shutil.copytree(moved, copy)
    r = run_cli(["evaluate", run / "best.pt", "--data", copy, "--cache-dir", tmp_path / "c"])
    assert r.exit_code == 0 and "is the folder this model was trained on" in r.stderr, r.stderr[-2000:]
    other = copy_classes(cifar_train_dir, tmp_path / "other", ["cat", "dog"], 5)  # images it never saw
    r = run_cli(["evaluate", run / "best.pt", "--data", other, "--cache-dir", tmp_path / "c"])
    assert r.exit_code == 0 and "trained on" not in r.stderr, r.stderr[-2000:]
    r = run_cli(["evaluate", run / "best.pt", "--data", other, "--split", "val"])  # too few files to be it
    assert r.exit_code == 2 and "has no train/val/test folders" in r.stderr, r.stderr
    more = tmp_path / "more"  # as many files, other ones: told once decoded
    for c in ("cat", "dog"):
        (more / c).mkdir(parents=True)
        for f in sorted((cifar_train_dir / c).iterdir())[100:125]:
            shutil.copyfile(f, more / c / f.name)
    _one_line_error(run_cli(["evaluate", run / "best.pt", "--data", more, "--split", "val"]), 1,
                    "the images its run held out cannot be told again (not the folder it trained on")
    # the folder its config names now is there: another --data is a change, not a move
    r = run_cli(["train", "--resume", run, "--data", copy, "--epochs", "3"])
    assert r.exit_code == 2 and "cannot change --data" in r.stderr, r.stderr[-2000:]


def test_a_model_that_cannot_be_built_is_one_line(cifar_train_dir, tmp_path, monkeypatch):
    """seed-cnn's dense layer grows with the side squared: at 2048 px torch could not allocate it
    and the run ended in a traceback."""
    from cnnx.train import zoo

    def no_memory(*args, **kwargs):
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 34359738368 bytes")

    monkeypatch.setattr(zoo, "create_model", no_memory)
    data = copy_classes(cifar_train_dir, tmp_path / "d", ["cat", "dog"], 5)
    r = run_cli(seed_args(data, tmp_path / "runs", "x", tmp_path / "c", "--image-size", "48"))
    _one_line_error(r, 1, "cannot build seed-cnn for 2 classes at 48x48 px", "can't allocate memory")


def test_names_reach_the_terminal_without_their_escape_sequences(cifar_train_dir, tmp_path):
    """A class folder or a file named with ESC[2J (anyone's photo folder) cleared the screen:
    evaluate printed class names and skipped files raw, train its skipped files."""
    data = copy_classes(cifar_train_dir, tmp_path / "d\x1b]0;TITLE\x1b\\", ["cat", "dog"], 10)  # the folder too
    (data / "dog").rename(data / "\x1b[2Jdog")
    (data / "cat" / "\x1b]0;PWNED\x07.jpg").write_bytes(b"not an image")
    r = run_cli(seed_args(data, tmp_path / "runs", "x", tmp_path / "c", "--epochs", "1"))
    assert r.exit_code == 0 and "\x1b" not in r.stderr + r.stdout, r.stderr[-2000:]
    assert "cat/\\x1b]0;PWNED\\x07.jpg: " in r.stderr, r.stderr[-2000:]
    r = run_cli(["evaluate", tmp_path / "runs" / "x" / "best.pt", "--data", data, "--cache-dir", tmp_path / "c"])
    assert r.exit_code == 0 and "\x1b" not in r.stderr + r.stdout, (r.stdout, r.stderr[-2000:])
    assert "top1[\\x1b[2Jdog]\t" in r.stdout, r.stdout


def test_evaluate_split_val_of_a_flat_folder_scores_the_images_its_run_held_out(cifar_train_dir, tmp_path):
    """A run on DIR/<class>/* holds images out; evaluate could not score them again (--split val:
    "no train/val/test folders"), only the whole folder, training images included."""
    data = copy_classes(cifar_train_dir, tmp_path / "d", ["cat", "dog", "ship"], 30)
    assert run_cli(seed_args(data, tmp_path / "runs", "x", tmp_path / "c", "--epochs", "1")).exit_code == 0
    best = load_checkpoint(tmp_path / "runs" / "x" / "best.pt")
    args = ["evaluate", tmp_path / "runs" / "x" / "best.pt", "--data", data, "--cache-dir", tmp_path / "c"]
    r = run_cli(args + ["--split", "val", "--json"])
    assert r.exit_code == 0, r.stderr[-2000:]
    got = json.loads(r.stdout)
    assert got["n"] == best["config"]["val_images"] == 9 and not got["trained_on"] and got["split"] == "held-out"
    assert got["plot"] == str(tmp_path / "runs" / "x" / "confusion_d-val.png")  # not the whole folder's plot
    assert got["top1"] == pytest.approx(best["metrics"]["val_top1"], abs=1e-9)
    assert got["loss"] == pytest.approx(best["metrics"]["val_loss"], rel=1e-5)
    shutil.copyfile(next((data / "cat").iterdir()), data / "cat" / "new.jpg")  # the folder changed since
    _one_line_error(run_cli(args + ["--split", "val"]), 1, "the images its run held out cannot be told again")
    other = copy_classes(cifar_train_dir, tmp_path / "o", ["cat", "dog", "ship"], 3)  # not its folder
    r = run_cli(["evaluate", tmp_path / "runs" / "x" / "best.pt", "--data", other, "--split", "val"])
    assert r.exit_code == 2 and "has no train/val/test folders" in r.stderr, r.stderr
