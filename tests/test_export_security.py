"""What a checkpoint may decide (issue 12, items 5, 6, 11): paths stored in it never decide
where cnnx writes, and its stored data path is read only when the checkpoint is one this
user's cnnx wrote (its sha256 is in the user's own-checkpoints file); class names, logits,
preprocess size and weights must agree with each other or the export is refused in one line."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from _export_util import make_checkpoint, one_line_error as _one_line_error, with_held_out_digest
from cnnx.export.api import export_checkpoint

CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
FAST = dict(formats=("onnx",), random_batch_sizes=(1, 7))


@pytest.fixture
def my_cache(tmp_path, monkeypatch):
    """This user's cache (where the own-checkpoints file lives), isolated per test."""
    cache = tmp_path / "my-cache"
    monkeypatch.setenv("CNNX_CACHE", str(cache))
    return cache


@pytest.fixture(scope="module")
def base_ckpt(tmp_path_factory):
    return torch.load(make_checkpoint(tmp_path_factory.mktemp("base") / "best.pt", "seed-cnn", CLASSES),
                      weights_only=True)


def _config(data, stored_cache):
    return {"data": str(data), "data_root": None, "cache_dir": str(stored_cache),
            "preprocess": {"size": [32, 32], "resize": "shorter-side+center-crop", "interpolation": "bilinear",
                           "antialias": True, "mean": [0.4914, 0.4822, 0.4465], "std": [0.247, 0.2435, 0.2616],
                           "channels": "RGB"},
            "val_fraction": 0.5, "split_seed": 0}



# Runs an export under an audit hook that records every path the process opens or lists
# under WATCH, and every folder it creates: the proof that the stored data folder is not read.
AUDIT = r"""
import json, os, sys
watch = [os.path.realpath(p) for p in json.loads(os.environ["WATCH"])]
seen = []
def hook(event, args):
    if event in ("open", "os.listdir", "os.scandir", "os.mkdir") and args and isinstance(args[0], (str, bytes, os.PathLike)):
        p = os.path.realpath(os.fsdecode(args[0])) if not isinstance(args[0], int) else ""
        if any(p == w or p.startswith(w + os.sep) for w in watch):
            seen.append(event + " " + p)
sys.addaudithook(hook)
from cnnx.cli import main
try:
    main(sys.argv[1:])
except SystemExit as e:
    code = e.code
print(json.dumps({"code": code, "seen": seen}))
"""


def test_foreign_checkpoint_reads_nothing_and_writes_nothing_where_it_says(base_ckpt, cifar_subset, tmp_path,
                                                                        my_cache):
    """A checkpoint crafted elsewhere (torch.save, not this user's cnnx) names a real image folder
    and a cache folder: export reads neither, creates nothing there, and says why."""
    data = cifar_subset(10, offset=3000)
    stored_cache = tmp_path / "stranger-cache"
    foreign = tmp_path / "foreign" / "best.pt"
    foreign.parent.mkdir()
    torch.save({**base_ckpt, "config": _config(data, stored_cache)}, foreign)
    env = {**os.environ, "CNNX_CACHE": str(my_cache), "WATCH": json.dumps([str(data), str(stored_cache)])}
    out = subprocess.run([sys.executable, "-c", AUDIT, "export", str(foreign), "--out", str(tmp_path / "out")],
                         capture_output=True, text=True, env=env, timeout=300)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["code"] in (0, None), out.stderr
    assert result["seen"] == []  # not one open, listing or mkdir under the stored paths
    assert not stored_cache.exists()
    assert "not one this user's cnnx wrote" in out.stderr and "--verify-data" in out.stderr
    doc = json.loads((tmp_path / "out" / "parity.json").read_text())
    assert doc["inputs"]["real"] is None
    assert {r["inputs"] for r in doc["results"]} == {"random b=1", "random b=7", "random b=256"}

    # int8 needs calibration images: a foreign checkpoint gets them only from --verify-data
    _one_line_error(["export", str(foreign), "--int8", "--out", str(tmp_path / "out8")], "--verify-data")
    assert not (tmp_path / "out8").exists() and not stored_cache.exists()


def test_own_run_uses_its_validation_split_and_never_the_stored_cache(base_ckpt, cifar_subset, tmp_path, my_cache):
    from cnnx.train.checkpoint import own_checkpoints_file, save_checkpoint

    data = cifar_subset(10, offset=3000)
    stored_cache = tmp_path / "stored-cache"
    own = tmp_path / "run" / "best.pt"
    save_checkpoint({**base_ckpt, "config": with_held_out_digest(_config(data, stored_cache), tmp_path / "s")}, own)
    assert own_checkpoints_file() == my_cache / "own-checkpoints.sha256"
    said = []
    result = export_checkpoint(own, tmp_path / "out", log=said.append, **FAST)
    real = json.loads(result.paths["parity"].read_text())["inputs"]["real"]
    assert real["source"].startswith(f"validation split of {data}") and real["count"] == 50 and real["labelled"]
    assert any("your own run" in s for s in said), said
    assert not stored_cache.exists()  # the decoded cache went to this user's cache, if anywhere
    mine = sorted((my_cache / "folders").iterdir())
    assert mine

    # a cache folder the user names (the run's --cache-dir, so as not to decode it all again) is used,
    # by the API and by `cnnx export --cache-dir`, which then finds what the API's export cached there
    named = tmp_path / "named-cache"
    export_checkpoint(own, tmp_path / "out-named", cache_dir=named, **FAST)
    cached = {p: p.stat().st_mtime_ns for p in (named / "folders").rglob("*") if p.is_file()}
    assert cached and sorted((my_cache / "folders").iterdir()) == mine
    from click.testing import CliRunner

    from cnnx.cli import cli
    r = CliRunner().invoke(cli, ["export", str(own), "--out", str(tmp_path / "out-cli"), "--cache-dir", str(named)])
    assert r.exit_code == 0, r.output
    assert {p: p.stat().st_mtime_ns for p in (named / "folders").rglob("*") if p.is_file()} == cached
    assert sorted((my_cache / "folders").iterdir()) == mine

    # the same checkpoint edited by someone else (its bytes, hence its sha256, differ) is foreign
    forged = tmp_path / "forged" / "best.pt"
    forged.parent.mkdir()
    torch.save({**torch.load(own, weights_only=True), "epoch": 2}, forged)
    result = export_checkpoint(forged, tmp_path / "out2", **FAST)
    assert json.loads(result.paths["parity"].read_text())["inputs"]["real"] is None


def _craft(tmp_path, base, name, **changes):
    path = tmp_path / f"{name}.pt"
    torch.save({**base, **changes}, path)
    return path


def test_class_names_that_disagree_with_the_logits_are_refused(base_ckpt, tmp_path, my_cache):
    out = tmp_path / "out"
    out.mkdir()
    (out / "model.onnx").write_bytes(b"previous export")
    (out / "parity.json").write_text("{}")
    three = _craft(tmp_path, base_ckpt, "three", class_names=["a", "b", "c"])  # num_classes stays 10
    _one_line_error(["export", str(three), "--out", str(out)], "3 class names", "10")
    three_both = _craft(tmp_path, base_ckpt, "three_both", class_names=["a", "b", "c"], num_classes=3)
    _one_line_error(["export", str(three_both), "--out", str(out)], "does not fit its arch")
    numbers = _craft(tmp_path, base_ckpt, "numbers", class_names=list(range(10)))
    _one_line_error(["export", str(numbers), "--out", str(out)], "class names must be")
    assert sorted(os.listdir(out)) == ["model.onnx", "parity.json"]
    assert (out / "model.onnx").read_bytes() == b"previous export"


def test_absurd_size_and_weights_that_do_not_fit_are_one_line(base_ckpt, tmp_path, my_cache):
    spec = dict(base_ckpt["preprocess"])
    huge = _craft(tmp_path, base_ckpt, "huge", preprocess={**spec, "size": [100000, 100000]})
    _one_line_error(["export", str(huge), "--out", str(tmp_path / "o")], "100000x100000", "4096")
    wrong_size = _craft(tmp_path, base_ckpt, "wrong_size", preprocess={**spec, "size": [40, 40]})
    _one_line_error(["export", str(wrong_size), "--out", str(tmp_path / "o")], "preprocess size")
    other_arch = _craft(tmp_path, base_ckpt, "other_arch", arch="resnet18-cifar")
    _one_line_error(["export", str(other_arch), "--out", str(tmp_path / "o")], "does not fit its arch")
    not_a_dict = _craft(tmp_path, base_ckpt, "not_a_dict", state_dict=[torch.zeros(3)])
    _one_line_error(["export", str(not_a_dict), "--out", str(tmp_path / "o")], "does not fit its arch")
    bad_kwargs = _craft(tmp_path, base_ckpt, "bad_kwargs", arch_kwargs=[1, 2])
    _one_line_error(["export", str(bad_kwargs), "--out", str(tmp_path / "o")], "does not fit its arch")
    assert not (tmp_path / "o").exists()


def test_a_record_torn_by_a_full_disk_does_not_swallow_the_next_checkpoints(base_ckpt, tmp_path, my_cache):
    """A record cut short (os.write on a full disk) left no newline: the next checkpoint's line
    was glued to it, and that checkpoint was treated as anyone else's (random inputs only)."""
    import hashlib

    from cnnx.train.checkpoint import is_own_checkpoint, own_checkpoints_file, save_checkpoint

    own_checkpoints_file().parent.mkdir(parents=True, exist_ok=True)
    own_checkpoints_file().write_text("0123456789abcdef")  # a torn record
    save_checkpoint(dict(base_ckpt), tmp_path / "run" / "best.pt")
    digest = hashlib.sha256((tmp_path / "run" / "best.pt").read_bytes()).hexdigest()
    assert is_own_checkpoint(digest), own_checkpoints_file().read_text()
