"""The decoded-image cache on disk (issue 10, data larger than memory): the memory-mapped cache
gives bit-identical images, batches and training to the in-memory one, a resumed run on it is
exact, and a full disk (a real small tmpfs) is one line with nothing half-written left behind."""

from __future__ import annotations

import subprocess

import numpy as np
import pytest
from _fs_util import mounted_tmpfs
import torch

from cnnx.runtime.preprocess import make_spec
from cnnx.train.cache import Rows, batches, build_disk_cache, read_disk_cache
from cnnx.train.checkpoint import load_checkpoint
from cnnx.train.data import load_image_folder
from cnnx.train.zoo import CIFAR_MEAN, CIFAR_STD

from tests._train_util import run_cli, seed_args

SPEC = make_spec(32, CIFAR_MEAN, CIFAR_STD)


def test_disk_cache_gives_the_same_images_and_batches(cifar_subset, tmp_path):
    data = cifar_subset(12)
    mem = load_image_folder(data, SPEC, progress=False, cache=tmp_path, workers=2, cache_mode="memory")
    disk = load_image_folder(data, SPEC, progress=False, cache=tmp_path, workers=2, cache_mode="disk")
    again = load_image_folder(data, SPEC, progress=False, cache=tmp_path, workers=2, cache_mode="disk")
    assert isinstance(disk.images, Rows) and isinstance(disk.images.base, np.memmap)
    assert torch.equal(disk.labels, mem.labels) and disk.paths == mem.paths and again.paths == mem.paths
    assert torch.equal(disk.images[torch.arange(len(mem.labels))], mem.images)
    g = torch.Generator().manual_seed(5)
    idx = [torch.randperm(len(mem.labels), generator=g)[:17] for _ in range(6)]
    got = list(batches(again.images, again.labels, idx, "cpu"))  # the prefetching reader
    want = list(batches(mem.images, mem.labels, idx, "cpu"))
    assert len(got) == 6
    for (xd, yd), (xm, ym) in zip(got, want):
        assert torch.equal(xd, xm) and torch.equal(yd, ym)
    assert disk.images[3].shape == (3, 32, 32)  # one row, as the report's gallery reads it


def test_training_on_the_disk_cache_is_bit_identical_and_resumes_exactly(cifar_subset, tmp_path):
    data = cifar_subset(12)
    args = ["--epochs", "2", "--batch-size", "16", "--threads", "1"]
    r = run_cli(seed_args(data, tmp_path / "runs", "mem", tmp_path / "c", *args, "--cache", "memory"))
    assert r.exit_code == 0, r.stderr
    r = run_cli(seed_args(data, tmp_path / "runs", "disk", tmp_path / "c", *args, "--cache", "disk",
                          "--stop-after", "1"))
    assert r.exit_code == 0, r.stderr
    assert list((tmp_path / "c" / "folders").glob("*.u8/images.u8"))
    r = run_cli(["train", "--resume", tmp_path / "runs" / "disk", "--quiet", "--workers", "1"])
    assert r.exit_code == 0, r.stderr
    mem = load_checkpoint(tmp_path / "runs" / "mem" / "last.pt")
    disk = load_checkpoint(tmp_path / "runs" / "disk" / "last.pt")
    assert disk["epoch"] == 2 and disk["config"]["cache"] == "disk"
    for k, v in mem["state_dict"].items():
        assert torch.equal(v, disk["state_dict"][k]), k
    assert mem["history"][-1]["val_top1"] == disk["history"][-1]["val_top1"]


@pytest.fixture
def small_tmpfs(tmp_path):
    with mounted_tmpfs(tmp_path / "small", "256k") as mount:
        yield mount


def test_a_full_disk_is_one_line_and_leaves_no_cache(cifar_subset, tmp_path, small_tmpfs):
    data = cifar_subset(12)  # 120 images x 3 x 48 x 48 = 830 KB > the 256 KB tmpfs
    r = run_cli(seed_args(data, tmp_path / "runs", "full", small_tmpfs, "--epochs", "1", "--image-size", "48",
                          "--cache", "disk"))
    assert r.exit_code == 1
    last = r.stderr.strip().splitlines()[-1]
    assert "no space left" in last and str(small_tmpfs) in last and "Traceback" not in r.stderr
    folders = small_tmpfs / "folders"
    assert not list(folders.iterdir())  # no cache folder, no temp folder: nothing to read back


def test_a_build_killed_half_way_is_never_read_back(tmp_path):
    folder = tmp_path / "folders" / "k.u8"

    def decode_into(out):
        out[0] = 7
        raise KeyboardInterrupt  # the user's Ctrl-C half-way

    with pytest.raises(KeyboardInterrupt):
        build_disk_cache(folder, 4, (8, 8), decode_into, lambda extra: {})
    assert read_disk_cache(folder) is None and not list((tmp_path / "folders").iterdir())
    rows, meta = build_disk_cache(folder, 4, (8, 8), lambda out: (2, None), lambda extra: {"labels": [0, 1]})
    assert rows.shape == (2, 3, 8, 8) and meta["labels"] == [0, 1]
    assert read_disk_cache(folder)[1]["shape"] == [2, 3, 8, 8]


def test_torchrun_two_ranks_read_the_disk_cache_and_switch_freezing(cifar_subset, tmp_path):
    """Each rank maps the cache rank 0 built and reads its shard's rows; DDP is rebuilt when
    the backbone unfreezes (its hooks follow requires_grad)."""
    import os
    import sys

    data = cifar_subset(12)
    r = run_cli(seed_args(data, tmp_path / "runs", "pre", tmp_path / "c", "--epochs", "1", "--batch-size", "32"))
    assert r.exit_code == 0, r.stderr
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "cnnx",
           *[str(a) for a in seed_args(cifar_subset(6, classes=["cat", "dog"]), tmp_path / "runs", "ddp",
                                       tmp_path / "c", "--weights", tmp_path / "runs" / "pre" / "best.pt",
                                       "--epochs", "2", "--freeze-backbone-epochs", "1", "--batch-size", "4",
                                       "--threads", "1", "--cache", "disk")]]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert p.returncode == 0, p.stderr[-2000:]
    assert "backbone unfrozen" in p.stderr and "cpu x2" in p.stderr
    assert load_checkpoint(tmp_path / "runs" / "ddp" / "last.pt")["epoch"] == 2
