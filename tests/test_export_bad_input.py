"""Bad input to `cnnx export`: each a one-line error, a meaningful exit code, nothing written."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from _export_util import make_checkpoint
from cnnx.cli import cli

CLASSES = [f"c{i}" for i in range(10)]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("ok") / "best.pt", "seed-cnn", CLASSES)


def _run(args):
    r = CliRunner().invoke(cli, args)
    lines = r.stderr.strip().splitlines()
    assert "Traceback" not in r.output, r.output
    return r, lines


def _one_line_error(args, code, *needles):
    r, lines = _run(args)
    assert r.exit_code == code, (r.exit_code, r.output)
    assert r.stdout == ""
    if code == 1:
        assert len(lines) == 1 and lines[0].startswith("Error: "), lines
    else:  # click usage errors add a usage line and a hint before the "Error:" line
        assert lines[-1].startswith("Error: "), lines
    for n in needles:
        assert n in lines[-1], (n, lines[-1])
    return lines[-1]


class Evil:
    """Unpickling this runs `touch <path>`: weights_only=True must refuse to."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


def test_missing_truncated_and_foreign_checkpoints(ckpt, tmp_path):
    out = tmp_path / "out"
    _one_line_error(["export", str(tmp_path / "nope.pt"), "--out", str(out)], 1, "checkpoint not found")
    half = tmp_path / "half.pt"
    half.write_bytes(ckpt.read_bytes()[: ckpt.stat().st_size // 2])
    _one_line_error(["export", str(half), "--out", str(out)], 1, "truncated or not a torch file")
    foreign = tmp_path / "foreign.pt"
    torch.save({"weight": torch.zeros(3)}, foreign)
    _one_line_error(["export", str(foreign), "--out", str(out)], 1, "not a cnnx checkpoint")
    text = tmp_path / "notes.pt"
    text.write_text("hello")
    _one_line_error(["export", str(text), "--out", str(out)], 1, "cannot read checkpoint")
    _one_line_error(["export", str(tmp_path), "--out", str(out)], 1, "is a folder")
    garbage = tmp_path / "garbage.pt"  # random bytes: torch's own text advises turning the safe load off
    garbage.write_bytes(bytes(range(256)) * 20)
    line = _one_line_error(["export", str(garbage), "--out", str(out)], 1)
    assert "weights_only" not in line and ("not a torch checkpoint" in line or "not a torch file" in line), line
    versioned = tmp_path / "versioned.pt"
    for bad in ("2", -5, True):  # True and -5 were taken for version 1
        torch.save({**torch.load(ckpt, weights_only=True), "format_version": bad}, versioned)
        _one_line_error(["export", str(versioned), "--out", str(out)], 1,
                        f"format_version must be a whole number from 1, got {bad!r}")
    assert not out.exists()


def test_malicious_pickle_is_refused_without_running(tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    torch.save({"format": "cnnx-checkpoint", "payload": Evil(marker)}, evil)
    _one_line_error(["export", str(evil), "--out", str(tmp_path / "out")], 1, "refused")
    assert not marker.exists()
    assert not (tmp_path / "out").exists()
    # cnnx info never unpickles either: the .pt is a zip without cnnx.json
    r, lines = _run(["info", str(evil)])
    assert r.exit_code == 1 and not marker.exists()


def test_unknown_format_and_unsupported_opsets(ckpt, tmp_path):
    line = _one_line_error(["export", str(ckpt), "--format", "tflite", "--out", str(tmp_path / "o")], 2, "tflite")
    assert "onnx" in line and "torchscript" in line and "pt2" in line
    for opset in ("7", "17", "99"):
        line = _one_line_error(["export", str(ckpt), "--opset", opset, "--out", str(tmp_path / "o")], 2, "--opset")
        assert f"opset {opset}" in line and "supported: 18.." in line
    assert not (tmp_path / "o").exists()


def test_unwritable_output_folder(ckpt, tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("keep me")
    _one_line_error(["export", str(ckpt), "--out", str(afile)], 1, "is a file")
    _one_line_error(["export", str(ckpt), "--out", str(afile / "sub")], 1, "cannot write to output folder")
    assert afile.read_text() == "keep me"
    if os.geteuid() != 0:  # root ignores permission bits
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o500)
        _one_line_error(["export", str(ckpt), "--out", str(ro / "x")], 1, "cannot write to output folder")


def test_bad_verify_data_and_int8_without_images(ckpt, tmp_path):
    _one_line_error(["export", str(ckpt), "--verify-data", str(tmp_path / "none"), "--out", str(tmp_path / "o")],
                    2, "--verify-data")
    empty = tmp_path / "empty"
    (empty / "c0").mkdir(parents=True)
    (empty / "c0" / "notes.txt").write_text("x")
    _one_line_error(["export", str(ckpt), "--verify-data", str(empty), "--out", str(tmp_path / "o")], 1,
                    "no image files")
    broken = tmp_path / "broken"
    (broken / "c0").mkdir(parents=True)
    (broken / "c0" / "a.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    _one_line_error(["export", str(ckpt), "--verify-data", str(broken), "--out", str(tmp_path / "o")], 1,
                    "could be decoded")
    _one_line_error(["export", str(ckpt), "--int8", "--out", str(tmp_path / "o" / "deep" / "er")], 1,
                    "--int8 needs real")
    assert not (tmp_path / "o").exists()  # folders made for a failed export are removed again


def test_no_checkpoint_and_no_runs_is_a_usage_error(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _one_line_error(["export"], 2, "runs/*/best.pt")


def _remove_chain(top, depth: int):
    """Remove top/d/d/.../d (depth levels) bottom-up. shutil.rmtree (pytest's cleanup of old
    temp folders, for every engineer sharing /tmp) recurses and would fail on this tree."""
    for level in range(depth, 0, -1):
        folder = os.path.join(top, *(["d"] * level))
        if not os.path.isdir(folder):
            continue  # made only part of the way down
        for name in os.listdir(folder):
            if name != "d":
                os.unlink(os.path.join(folder, name))
        os.rmdir(folder)


def test_verify_data_nested_deeper_than_the_recursion_limit(ckpt, cifar_subset, tmp_path):
    """A --verify-data tree nested 1,100 folders deep is walked (an explicit stack, not
    recursion): its image is found and gates the export."""
    depth = 1100
    jpg = next((cifar_subset(1) / "cat").iterdir())
    top = tmp_path / "verify" / "c3"
    top.mkdir(parents=True)
    try:
        folder = str(top)
        for _ in range(depth):  # os.makedirs recurses too
            folder = os.path.join(folder, "d")
            os.mkdir(folder)
        with open(os.path.join(folder, "a.jpg"), "wb") as f:
            f.write(jpg.read_bytes())
        r, lines = _run(["export", str(ckpt), "--verify-data", str(tmp_path / "verify"), "--out", str(tmp_path / "o")])
        assert r.exit_code == 0, r.output
        assert "--verify-data" in r.stderr and "(1 of 1 images)" in r.stderr
    finally:
        _remove_chain(top, depth)


def test_verify_data_of_symlinks_to_the_images_is_used(ckpt, cifar_subset, tmp_path):
    """A --verify-data folder of links to the images (benchmarks/bench_export.py makes one) was
    "no image files": the walk did not follow symlinks, as cnnx train's does."""
    links = tmp_path / "verify" / "cat"
    links.mkdir(parents=True)
    for f in sorted((cifar_subset(3) / "cat").iterdir()):
        os.symlink(f, links / f.name)
    r, _lines = _run(["export", str(ckpt), "--verify-data", str(tmp_path / "verify"), "--out", str(tmp_path / "o")])
    assert r.exit_code == 0, r.output
    assert "(3 of 3 images)" in r.stderr, r.stderr


def test_a_writer_failure_names_the_reason_torch_wrapped_in_a_generic_error(tmp_path):
    """torch's ONNX exporter says only 'Failed to convert the exported program' on its first
    line; the missing op is in the exception it wraps: the one line names both."""
    from cnnx.export.writers import _failure_line

    try:
        try:
            raise LookupError("No ONNX function found for aten.adaptive_max_pool2d")
        except LookupError as inner:
            raise RuntimeError("Failed to convert the exported program to an ONNX model.\nNext steps: ...") from inner
    except RuntimeError as e:
        line = _failure_line("ONNX export", e, tmp_path / "model.onnx")
    assert line == ("ONNX export failed: Failed to convert the exported program to an ONNX model. "
                    "(cause: No ONNX function found for aten.adaptive_max_pool2d)")
    assert "\n" not in line


def test_a_checkpoint_replaced_during_the_load_keeps_the_hash_of_what_was_loaded(tmp_path, monkeypatch):
    """Export during training: the checkpoint was loaded, then its path hashed again; a best.pt
    replaced in between gave the exported model one epoch's weights and the next one's sha256,
    and a --resume then took that next epoch's export for the same model. Here the replace comes
    at the worst moment, right after the hash (the way a training run replaces best.pt)."""
    from cnnx.runtime.files import sha256_of
    from cnnx.train import checkpoint

    path = make_checkpoint(tmp_path / "best.pt", "seed-cnn", ["cat", "dog"], size=32, seed=0)
    newer = make_checkpoint(tmp_path / "newer.pt", "seed-cnn", ["cat", "dog"], size=32, seed=1)
    first = sha256_of(path)

    def hash_then_replace(source):
        digest = sha256_of(source)
        os.replace(newer, path)
        return digest

    monkeypatch.setattr(checkpoint, "sha256_of", hash_then_replace)
    ckpt, sha = checkpoint.load_checkpoint_and_sha256(path)
    assert sha == first != sha256_of(path)
    monkeypatch.undo()
    again = make_checkpoint(tmp_path / "again.pt", "seed-cnn", ["cat", "dog"], size=32, seed=0)
    want = checkpoint.load_checkpoint(again)["state_dict"]
    assert all(torch.equal(ckpt["state_dict"][k], v) for k, v in want.items())


def test_a_ctrl_c_the_exporter_swallows_is_still_an_interrupt(monkeypatch, tmp_path):
    """torch's exporters import modules lazily: a Ctrl-C there is caught inside torch, which then
    fails with an AttributeError, and the export said "ONNX export failed" (exit 1) where the
    user had pressed Ctrl-C. A real SIGINT to this process, inside a writer that swallows it as
    torch's import does; without a Ctrl-C the same failure stays an export failure."""
    import os
    import signal

    import numpy as np

    from cnnx.export import writers
    from cnnx.export.errors import ExportError

    def swallowing(sigint: bool):
        def write(job):
            try:
                if sigint:
                    os.kill(os.getpid(), signal.SIGINT)  # Python raises it at the next instruction
                raise ImportError("cannot import triton.language")
            except (KeyboardInterrupt, ImportError):
                pass
            raise AttributeError("module 'triton.language' has no attribute 'core'")
        return write

    job = writers.Job(ckpt={}, sha256="", module=None, example_images=np.zeros((1, 3, 2, 2), np.uint8),
                      staging=tmp_path, opset=None, calibration=None, say=lambda line: None)
    for sigint, raised in ((True, KeyboardInterrupt), (False, ExportError)):
        monkeypatch.setitem(writers.WRITERS, "onnx", writers.Writer("ONNX export", swallowing(sigint), lambda j, m: []))
        with pytest.raises(raised):
            writers.run_writer("onnx", job)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler

    # a SIGTERM, which the export command turns into Terminated (files.ends_as_terminated), alike
    from cnnx.runtime.files import Terminated, ends_as_terminated

    def swallowing_sigterm(job):
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            raise ImportError("cannot import triton.language")
        except (KeyboardInterrupt, ImportError):
            pass
        raise AttributeError("module 'triton.language' has no attribute 'core'")

    monkeypatch.setitem(writers.WRITERS, "onnx", writers.Writer("ONNX export", swallowing_sigterm, lambda j, m: []))
    with pytest.raises(Terminated):
        ends_as_terminated(writers.run_writer)("onnx", job)
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


# The real images of the parity gate (cnnx.export.images): which labels they carry, and which
# of them a capped --parity-images keeps.

RUN_CLASSES = ["cat", "dog", "ship"]


@pytest.fixture(scope="module")
def own_run(cifar_subset, tmp_path_factory):
    """(data folder, config as `cnnx train` records it) of a run on 3 classes x 10 real JPEGs,
    its validation split half of them, its held-out files' digests recorded."""
    from _export_util import with_held_out_digest
    from cnnx.runtime.preprocess import make_spec
    from cnnx.train.data import SPLIT_BY_NAME
    from cnnx.train.zoo import get_arch

    a = get_arch("seed-cnn")
    data = cifar_subset(10, offset=4000, classes=RUN_CLASSES)
    config = {"data": str(data), "data_root": None, "cache_dir": None, "preprocess": make_spec(32, a.mean, a.std),
              "val_fraction": 0.5, "split_seed": 0, "split": SPLIT_BY_NAME}
    return data, with_held_out_digest(config, tmp_path_factory.mktemp("scratch"))


def _own_images(path, limit):
    from cnnx.export.images import validation_images
    from cnnx.runtime.files import sha256_of
    from cnnx.train.checkpoint import load_checkpoint

    return validation_images(load_checkpoint(path), sha256_of(path), limit)


def test_a_capped_validation_split_keeps_each_image_s_own_label(own_run, tmp_path):
    """--parity-images below the run's validation split: the images kept are spread over it, and
    each must keep its own label (the first N labels of the split were taken, a class-sorted
    list's: the gate's accuracy scored images against other images' classes)."""
    from _export_util import eager_logits
    from cnnx.export.api import export_checkpoint

    _data, config = own_run
    ckpt = make_checkpoint(tmp_path / "run" / "best.pt", "seed-cnn", RUN_CLASSES, size=32, config=config)
    full, why = _own_images(ckpt, None)
    assert full is not None and full.labelled, why
    assert len(full.images) == 15 and len(set(full.labels.tolist())) == 3
    some, why = _own_images(ckpt, 6)
    assert some is not None and len(some.images) == 6 and some.labelled, why
    truth = []
    for image, label in zip(some.images, some.labels.tolist()):
        where = [i for i in range(len(full.images)) if np.array_equal(full.images[i], image)]
        assert where, "a parity image not in the validation split"
        assert label in {int(full.labels[i]) for i in where}, (label, [int(full.labels[i]) for i in where])
        truth.append(int(full.labels[where[0]]))
    assert sorted(set(truth)) == [0, 1, 2]  # spread over the classes
    # and the gate's accuracy is the checkpoint's on those images against their own labels
    result = export_checkpoint(ckpt, tmp_path / "out", ("torchscript",), parity_images=6, random_batch_sizes=(1,))
    real = result.parity.inputs["real"]
    assert real["count"] == 6 and real["labelled"], real
    want = float((eager_logits(ckpt, some.images).argmax(1) == np.asarray(truth)).mean() * 100.0)
    assert result.parity.eager_accuracy == pytest.approx(want), (result.parity.eager_accuracy, want)


def test_a_run_whose_data_has_other_classes_is_not_scored_on_it(own_run, tmp_path):
    """The run's data now lists its classes otherwise than the checkpoint (here in another order):
    its labels index other names, so its validation split is not used (random inputs only, said
    so) rather than scored against the wrong classes."""
    from cnnx.export.api import export_checkpoint

    _data, config = own_run
    ckpt = make_checkpoint(tmp_path / "run" / "best.pt", "seed-cnn", ["dog", "cat", "ship"], size=32, config=config)
    real, why = _own_images(ckpt, None)
    assert real is None and why == "the run's data no longer has the checkpoint's classes", why
    said = []
    result = export_checkpoint(ckpt, tmp_path / "out", ("torchscript",), random_batch_sizes=(1,), log=said.append)
    doc = json.loads(result.paths["parity"].read_text())
    assert doc["inputs"]["real"] is None and doc["eager_accuracy"] is None
    assert "no longer has the checkpoint's classes" in doc["notes"][0], doc["notes"]


def _verify_folder(root, cifar_subset, layout):
    """root/<name>/* (or root/* for name None) of real JPEGs: layout maps a name to a count."""
    import shutil

    src = sorted((cifar_subset(4, offset=4100) / "cat").iterdir())
    for name, n in layout.items():
        folder = root / name if name else root
        folder.mkdir(parents=True, exist_ok=True)
        for f in src[:n]:
            shutil.copyfile(f, folder / f.name)
    return root


def test_verify_data_folders_that_are_not_classes_are_unlabelled_not_class_0(ckpt, cifar_subset, tmp_path):
    """A --verify-data folder that is not one of the checkpoint's classes: its images count for
    agreement only (they were scored as the first class, an accuracy made up)."""
    from cnnx.export.images import load_verify_data
    from cnnx.train.checkpoint import load_checkpoint

    spec = load_checkpoint(ckpt)["preprocess"]
    other = _verify_folder(tmp_path / "other", cifar_subset, {"zebra": 3})
    real = load_verify_data(other, spec, CLASSES, None)
    assert real.labels.tolist() == [-1, -1, -1] and not real.labelled
    assert any("not classes of the checkpoint" in n and "zebra" in n for n in real.notes), real.notes
    mixed = _verify_folder(tmp_path / "mixed", cifar_subset, {"c2": 2, "zebra": 2})
    assert load_verify_data(mixed, spec, CLASSES, None).labels.tolist() == [2, 2, -1, -1]
    r, _lines = _run(["export", str(ckpt), "--format", "torchscript", "--verify-data", str(other),
                      "--out", str(tmp_path / "o")])
    assert r.exit_code == 0, r.output
    doc = json.loads((tmp_path / "o" / "parity.json").read_text())
    assert doc["inputs"]["real"]["count"] == 3 and doc["inputs"]["real"]["labelled"] is False
    assert doc["eager_accuracy"] is None
    assert all(row["accuracy"] is None for row in doc["results"]), doc["results"]


def test_verify_data_of_labelled_and_unlabelled_images_reports_no_accuracy(ckpt, cifar_subset, tmp_path):
    """A class folder beside images directly in the folder: an accuracy over all of them counted
    every unlabelled image as wrong. The gate runs on them all, for agreement only, and says so."""
    from cnnx.export.api import export_checkpoint

    data = _verify_folder(tmp_path / "v", cifar_subset, {"c3": 3, None: 2})
    said = []
    result = export_checkpoint(ckpt, tmp_path / "out", ("torchscript",), verify_data=data, random_batch_sizes=(1,),
                               log=said.append)
    real = result.parity.inputs["real"]
    assert real["count"] == 5 and real["labelled"] is False, real
    assert result.parity.eager_accuracy is None
    assert all(r.accuracy is None and r.accuracy_change is None for r in result.parity.rows)
    assert any("no class: they count for agreement, not accuracy" in s for s in said), said


def test_capped_verify_data_takes_images_of_every_class(ckpt, cifar_subset, tmp_path):
    """--parity-images below the number of images: each class gets its share, round robin (a
    large first class took the whole cap)."""
    from cnnx.export.images import load_verify_data, spread
    from cnnx.train.checkpoint import load_checkpoint

    picked = spread(21, 3, ["a"] * 10 + ["b"] + ["c"] * 10)
    assert picked.tolist() == [0, 10, 11]
    assert sorted(spread(30, 7, [0] * 10 + [1] * 10 + [2] * 10) // 10) == [0, 0, 0, 1, 1, 2, 2]
    data = _verify_folder(tmp_path / "v", cifar_subset, {"c0": 4, "c1": 2, "c2": 2})
    real = load_verify_data(data, load_checkpoint(ckpt)["preprocess"], CLASSES, 3)
    assert real.labels.tolist() == [0, 1, 2] and real.labelled
    r, _lines = _run(["export", str(ckpt), "--format", "torchscript", "--verify-data", str(data),
                      "--parity-images", "3", "--out", str(tmp_path / "o")])
    assert r.exit_code == 0 and "(3 of 8 images)" in r.stderr, r.output


def test_verify_data_of_a_split_layout_is_its_val_folder_else_test_else_train(tmp_path):
    """--verify-data DIR/{train,val,test}/<class>/*: the gate's images are val/'s (held out and
    the run's own choice of model), test/'s only where there is no val/."""
    from cnnx.export.images import _split_of_layout

    for split in ("train", "val", "test"):
        (tmp_path / split / "cat").mkdir(parents=True)
        (tmp_path / split / "cat" / "a.jpg").write_bytes(b"")
    assert _split_of_layout(tmp_path, ["cat"]) == tmp_path / "val"
    shutil.rmtree(tmp_path / "val")
    assert _split_of_layout(tmp_path, ["cat"]) == tmp_path / "test"
    shutil.rmtree(tmp_path / "test")
    assert _split_of_layout(tmp_path, ["cat"]) == tmp_path / "train"
    assert _split_of_layout(tmp_path / "train", ["cat"]) == tmp_path / "train"  # DIR/<class>/*: itself
