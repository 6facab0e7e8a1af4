"""The decoded-image cache on disk (issue 10, data larger than memory): the memory-mapped cache
gives bit-identical images, batches and training to the in-memory one, a resumed run on it is
exact, and a full disk (a real small tmpfs) is one line with nothing half-written left behind."""

from __future__ import annotations

import itertools
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from _fs_util import mounted_tmpfs
import torch

from cnnx.runtime.preprocess import make_spec
from cnnx.train.cache import Rows, batches, build_disk_cache, read_disk_cache
from cnnx.train.checkpoint import load_checkpoint
from cnnx.train.data import JOB_SHARE, MAX_JOB_BYTES, MIN_JOB, decode_jobs, load_image_folder
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


def test_a_disk_cache_with_unreadable_files_packs_its_rows_as_memory_does(cifar_subset, tmp_path):
    """Two decode workers write their rows into the file; the rows after a broken file move up."""
    data = shutil.copytree(cifar_subset(12), tmp_path / "d")
    for name in ("cat/0-broken.jpg", "dog/zz-broken.png"):
        (data / name).write_bytes(b"\x89PNG not really")
    mem = load_image_folder(data, SPEC, progress=False, cache=tmp_path / "c", workers=2, cache_mode="memory")
    disk = load_image_folder(data, SPEC, progress=False, cache=tmp_path / "c", workers=2, cache_mode="disk")
    assert len(disk.skipped) == 2 and disk.skipped == mem.skipped and disk.paths == mem.paths
    assert torch.equal(disk.images[torch.arange(len(mem.labels))], mem.images)


def _resident_kib(path: Path) -> int:
    """KiB of this process's memory maps of `path` that are resident (/proc/self/smaps)."""
    total, inside = 0, False
    with open("/proc/self/smaps") as f:
        for line in f:
            if re.match(r"[0-9a-f]+-[0-9a-f]+ ", line):
                inside = line.rstrip().endswith(str(path))
            elif inside and line.startswith("Rss:"):
                total += int(line.split()[1])
    return total


def test_rows_are_read_from_the_file_not_through_its_map(cifar_subset, tmp_path):
    """The cache's pages never become the process's own: under a memory limit smaller than the
    cache, faulting mapped pages in (and the kernel reclaiming them) cost ~38x pread's time."""
    data = cifar_subset(12)
    disk = load_image_folder(data, SPEC, progress=False, cache=tmp_path, workers=2, cache_mode="disk")
    n = len(disk.labels)
    idx = [torch.randperm(n, generator=torch.Generator().manual_seed(k))[:17] for k in range(4)]
    assert len(list(batches(disk.images, disk.labels, idx, "cpu"))) == 4
    assert disk.images[torch.arange(n)].shape == (n, 3, 32, 32) and disk.images[n - 1].shape == (3, 32, 32)
    images_file = next((tmp_path / "folders").glob("*.u8/images.u8")).resolve()
    assert _resident_kib(images_file) == 0


def _small_cache(folder: Path):
    def decode_into(out):
        out[:] = np.arange(4, dtype=np.uint8)[:, None, None, None]  # row i holds i
        return 4, None

    return build_disk_cache(folder, 4, (8, 8), decode_into, lambda extra: {})[0]


def test_a_cache_removed_while_in_use_is_still_read(tmp_path):
    rows = _small_cache(tmp_path / "folders" / "k.u8")
    shutil.rmtree(tmp_path / "folders")  # another run's cleanup, a user's rm -r
    assert rows[torch.tensor([3, 1])][:, 0, 0, 0].tolist() == [3, 1]


def test_a_cache_cut_short_while_in_use_is_one_line_not_a_crash(tmp_path):
    """Through the map, rows past the new end read as zeros (within the file's last page, as
    here: the old reader returned them) or killed the process with SIGBUS (past that page)."""
    folder = tmp_path / "folders" / "k.u8"
    rows = _small_cache(folder)
    os.truncate(folder / "images.u8", 2 * 3 * 8 * 8)
    assert rows[torch.tensor([1, 0])][:, 0, 0, 0].tolist() == [1, 0]
    with pytest.raises(OSError, match="shorter than its header says") as e:
        rows[torch.tensor([0, 3])]
    assert "\n" not in str(e.value) and str(folder) in str(e.value)


@pytest.mark.parametrize("n, workers, row_bytes", [(2000, 2, 3 * 224 * 224), (50_000, 8, 3 * 32 * 32), (5, 2, 10),
                                                   (0, 2, 10), (1_000, 1, 3 * 2048 * 2048)])
def test_decode_jobs_cover_the_files_in_order_biggest_first(n, workers, row_bytes):
    """Handed out as workers finish them, shrinking jobs end all workers within a small job."""
    jobs = decode_jobs(n, workers, row_bytes)
    counts = [c for _, c in jobs]
    assert [s for s, _ in jobs] == list(itertools.accumulate(counts, initial=0))[:-1] and sum(counts) == n
    assert counts == sorted(counts, reverse=True) and all(c >= 1 for c in counts)
    assert all(c * row_bytes <= MAX_JOB_BYTES for c in counts if c > 1)
    if n >= 1000:
        assert counts[-1] <= MIN_JOB
    assert len(jobs) <= n / max(1, MAX_JOB_BYTES // row_bytes) + workers * JOB_SHARE * 10  # messages stay few


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

    # Export's parity images of the disk run: the same as the memory run's, read from a disk
    # cache row by row (the whole folder was once decoded into memory, and cached again as .pt).
    from cnnx.export.images import validation_images
    from cnnx.runtime.files import sha256_of
    from cnnx.train import data as train_data

    decoded = []
    real = train_data.load_image_folder
    monkey = pytest.MonkeyPatch()
    monkey.setattr(train_data, "load_image_folder", lambda *a, **k: decoded.append(k["cache_mode"]) or real(*a, **k))
    try:
        got = {name: validation_images(load_checkpoint(tmp_path / "runs" / name / "best.pt"),
                                       sha256_of(tmp_path / "runs" / name / "best.pt"), 7)
               for name in ("mem", "disk")}
    finally:
        monkey.undo()
    assert decoded == ["memory", "disk"]
    assert got["mem"][0] is not None and got["disk"][0] is not None, (got["mem"][1], got["disk"][1])
    assert len(got["disk"][0].images) == 7 and np.array_equal(got["mem"][0].images, got["disk"][0].images)


@pytest.fixture
def small_tmpfs(tmp_path):
    with mounted_tmpfs(tmp_path / "small", "256k") as mount:
        yield mount


@pytest.mark.parametrize("mode", ["memory", "disk"])
def test_a_cache_whose_bytes_changed_in_place_is_decoded_again_not_trained_on(mode, cifar_subset, tmp_path):
    """Bytes zeroed in the middle of a cache file (a disk error, a write into it) were read back
    as black images, trained on without a word: torch.load does not check its entries' CRCs,
    and the disk cache checked only its size."""
    data = cifar_subset(4)
    fresh = load_image_folder(data, SPEC, progress=False, cache=tmp_path / "c", workers=1, cache_mode=mode)
    images = fresh.images[torch.arange(len(fresh.labels))] if mode == "disk" else fresh.images
    del fresh
    files = [p for p in (tmp_path / "c").rglob("*") if p.is_file() and (p.name == "images.u8" or p.suffix == ".pt")]
    assert len(files) == 1, files
    with open(files[0], "r+b") as f:
        f.seek(files[0].stat().st_size // 2)
        f.write(bytes(3 * 32 * 32))
    again = load_image_folder(data, SPEC, progress=False, cache=tmp_path / "c", workers=1, cache_mode=mode)
    got = again.images[torch.arange(len(again.labels))] if mode == "disk" else again.images
    assert torch.equal(got, images)


def test_a_cache_is_read_whole_for_its_crc_only_when_its_file_changed_and_a_good_copy_once(tmp_path, monkeypatch):
    """The CRC read of the whole file at every run start (on every rank: minutes for a cache of
    ImageNet's size) is for a file whose stat is not the one recorded; a copy (cp -a, a restore)
    that passes is recorded, not read whole at each start for ever."""
    from cnnx.train import cache

    reads = []
    crc = cache._crc32_of
    monkeypatch.setattr(cache, "_crc32_of", lambda path: reads.append(path) or crc(path))
    built = tmp_path / "folders" / "k.u8"
    _small_cache(built)
    reads.clear()
    assert read_disk_cache(built) is not None and reads == []
    copy = tmp_path / "copy" / "k.u8"
    shutil.copytree(built, copy)  # copy2: times kept, another inode
    for expected in (1, 1):
        assert read_disk_cache(copy) is not None and len(reads) == expected


def test_a_full_disk_is_one_line_and_leaves_no_cache(cifar_subset, tmp_path, small_tmpfs):
    data = cifar_subset(12)  # 120 images x 3 x 48 x 48 = 830 KB > the 256 KB tmpfs
    r = run_cli(seed_args(data, tmp_path / "runs", "full", small_tmpfs, "--epochs", "1", "--image-size", "48",
                          "--cache", "disk"))
    assert r.exit_code == 1
    last = r.stderr.strip().splitlines()[-1]
    assert "no space left" in last and str(small_tmpfs) in last and "Traceback" not in r.stderr
    assert "images need 0.79 MiB)" in last  # was "0.00 GiB"
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


def test_a_damaged_cache_is_rebuilt_and_temp_folders_do_not_collide(tmp_path, monkeypatch):
    """A cache folder cut short was never rebuilt: the new one could not be renamed over the
    damaged folder, and every run on that data failed until the user removed it by hand. And
    the temp folder was named by the pid alone: two containers sharing the cache, both pid 1,
    removed each other's."""
    folder = tmp_path / "folders" / "k.u8"
    _small_cache(folder)
    os.truncate(folder / "images.u8", 2 * 3 * 8 * 8)
    assert read_disk_cache(folder) is None
    rows, meta = build_disk_cache(folder, 4, (8, 8), lambda out: (3, None), lambda extra: {"labels": [0, 1, 0]})
    assert rows.shape == (3, 3, 8, 8) and read_disk_cache(folder)[1]["labels"] == [0, 1, 0]
    assert sorted(p.name for p in (tmp_path / "folders").iterdir()) == ["k.u8"]
    temps = []

    def decode_into(out):  # another run of the same pid is building the same cache meanwhile
        temps.extend(p.name for p in (tmp_path / "folders").iterdir() if p.name != "k.u8")
        return 1, None

    for _ in range(2):  # one pid, one cache: two temp names
        shutil.rmtree(folder)
        build_disk_cache(folder, 1, (8, 8), decode_into, lambda extra: {})
    assert len(temps) == 2 and temps[0] != temps[1] and all(str(os.getpid()) in t for t in temps)


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
    # faulthandler: a rank that aborts (rank 1's SIGABRT, once) prints its Python threads' stacks
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONFAULTHANDLER": "1"})
    # the ranks' own lines, not only torchrun's summary after them (a rank's SIGABRT once: what did it say?)
    assert p.returncode == 0, "\n".join(line for line in p.stderr.splitlines() if "frame #" not in line)[-8000:]
    assert "backbone unfrozen" in p.stderr and "cpu x2" in p.stderr
    assert load_checkpoint(tmp_path / "runs" / "ddp" / "last.pt")["epoch"] == 2


def test_a_changed_folder_replaces_its_cached_decoding_and_keeps_other_decodings(tmp_path):
    """One cache entry per folder and decoding: the decoding of a folder as it was before its
    files changed is removed (each can be gigabytes, and is never read again); the same folder
    decoded at another size keeps its own until that decoding is read again; other folders keep theirs."""
    from PIL import Image

    from tests._runtime_util import photo_like

    def folder(name, n):
        for c in ("a", "b"):
            (tmp_path / name / c).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                Image.fromarray(photo_like(24, 24, seed=i)).save(tmp_path / name / c / f"{i}.png")
        return tmp_path / name

    data, other = folder("data", 3), folder("other", 2)
    cache = tmp_path / "c"
    small = make_spec(16, CIFAR_MEAN, CIFAR_STD)

    def load(root, spec=SPEC, mode="memory"):
        return load_image_folder(root, spec, progress=False, cache=cache, workers=1, cache_mode=mode)

    def entries():
        return sorted(p.name for p in (cache / "folders").iterdir())

    def decoding(name):
        return name.split("-")[0]

    load(data, small), load(other), load(data), load(data, mode="disk")
    before = entries()
    assert len(before) == 4 and len({decoding(n) for n in before}) == 3
    Image.fromarray(photo_like(24, 24, seed=9)).save(data / "a" / "new.png")
    assert len(load(data).labels) == 7
    after = entries()
    gone, new = set(before) - set(after), set(after) - set(before)
    assert len(gone) == 2 and len({decoding(n) for n in gone}) == 1  # the .pt and the .u8 of the 32 px decoding
    assert len(new) == 1 and decoding(next(iter(new))) == decoding(next(iter(gone)))
    assert len(after) == 3  # the 16 px decoding of the folder and the other folder stay
    assert [len(load(other).labels), len(load(data, small).labels)] == [4, 7]
    assert len(entries()) == 3  # the folder's 16 px decoding replaced in its turn; the other folder's read
    assert len(load(data, mode="disk").labels) == 7 and len(entries()) == 4
    # A decoding by an earlier load_image (PREPROCESS_VERSION) is never read again: replaced too.
    from cnnx.train import data as data_module

    older = data_module._decoding(data.resolve(), SPEC, data_module.PREPROCESS_VERSION - 1)
    (cache / "folders" / f"{older}-0123456789abcdef.pt").write_bytes(b"an older load_image's decoding")
    (cache / "folders" / ("0123456789abcdef" * 2 + ".pt")).write_bytes(b"a decoding named before 60d4e8d")
    (cache / "folders" / ("fedcba9876543210" * 2 + ".u8")).mkdir()
    Image.fromarray(photo_like(24, 24, seed=10)).save(data / "b" / "new.png")
    assert len(load(data).labels) == 8
    assert not any(n.startswith(older) for n in entries()) and len(entries()) == 3


def test_an_address_space_limit_sends_auto_to_disk_and_memory_to_one_line(cifar_subset, tmp_path):
    """Under `ulimit -v` (RLIMIT_AS), --cache auto kept images in memory that the limit refused
    (a numpy traceback); the limit now counts as the memory available, and --cache memory
    beyond it is one line naming --cache disk."""
    import sys

    data = cifar_subset(20, classes=("cat", "dog"))
    code = f"""
import resource
import torch  # the address space a training process maps, before the limit
from cnnx.runtime.preprocess import make_spec
from cnnx.train.cache import available_memory, use_disk
from cnnx.train.data import DataError, load_image_folder
size = next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmSize:')) * 1024
resource.setrlimit(resource.RLIMIT_AS, (size + (64 << 20), resource.RLIM_INFINITY))
assert available_memory() <= 64 << 20, available_memory()
assert use_disk('auto', 40 << 20) and not use_disk('memory', 40 << 20)
try:  # 40 images of 1024x1024: 120 MiB
    load_image_folder({str(data)!r}, make_spec(1024, (0.5,) * 3, (0.25,) * 3), progress=False,
                      cache={str(tmp_path / 'c')!r}, workers=1, cache_mode='memory')
except DataError as e:
    print(e)
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "not enough memory for 40 decoded images of 1024x1024 px (120 MiB): --cache disk keeps them in a file" \
        in r.stdout, (r.stdout, r.stderr[-2000:])


@pytest.mark.parametrize("layout", ["v1-container", "v1-nested", "v2-container", "v2-host-unlimited"])
def test_the_memory_cgroup_limit_is_found_where_a_container_mounts_its_own_at_the_top(tmp_path, layout):
    """Docker on a cgroup-v1 host without a cgroup namespace: /proc/self/cgroup names
    /docker/<id>, which the container's /sys/fs/cgroup/memory does not hold (its own cgroup is
    mounted there, its limit at the top): no limit was found, and --cache auto put data larger
    than the container in memory. A parent's limit binds a child without one, too."""
    from cnnx.train.cache import _cgroup_room

    fs, proc = tmp_path / "sys-fs-cgroup", tmp_path / "cgroup"
    v1 = layout.startswith("v1")
    mount = fs / "memory" if v1 else fs
    limit_f, usage_f = ("memory.limit_in_bytes", "memory.usage_in_bytes") if v1 else ("memory.max", "memory.current")
    path = "/docker/0123abcd"
    top = {"v1-container": mount, "v1-nested": mount / "docker", "v2-container": mount,
           "v2-host-unlimited": mount / "docker" / "0123abcd"}[layout]
    top.mkdir(parents=True)
    (top / limit_f).write_text("max\n" if layout == "v2-host-unlimited" else str(2 << 30))
    (top / usage_f).write_text(str(1 << 30))
    if layout == "v1-nested":  # the cgroup itself there, unlimited (v1 writes a huge number), its parent limited
        (top / "0123abcd").mkdir()
        (top / "0123abcd" / limit_f).write_text(str(1 << 62))
        (top / "0123abcd" / usage_f).write_text(str(1 << 29))
    proc.write_text(f"4:memory:{path}\n" if v1 else f"0::{path}\n")
    want = None if layout == "v2-host-unlimited" else 1 << 30
    assert _cgroup_room(proc, fs) == want


def test_a_disk_cache_follows_the_umask_and_another_users_unreadable_one_is_one_line(cifar_subset, tmp_path):
    """The cache folder had mkdtemp's 0700 (the memory cache's files beside it the umask's mode):
    in a team's shared --cache-dir another user's run took it for damaged, decoded everything,
    then failed to replace it, naming a temp folder."""
    import sys

    data = cifar_subset(4, classes=("cat", "dog"))
    old = os.umask(0o002)
    try:
        load_image_folder(data, SPEC, progress=False, cache=tmp_path / "c", workers=1, cache_mode="disk")
    finally:
        os.umask(old)
    (folder,) = (tmp_path / "c" / "folders").glob("*.u8")
    assert folder.stat().st_mode & 0o777 == 0o775
    for p in [tmp_path / "c", *(tmp_path / "c").rglob("*")]:  # another user's cache
        os.chown(p, 1000, 1000)
    folder.chmod(0o700)  # as an older cnnx made it
    code = (f"from pathlib import Path\nfrom cnnx.train.cache import CacheError, read_disk_cache\n"
            f"try:\n    read_disk_cache(Path({str(folder)!r}))\nexcept CacheError as e:\n    print(e)\n")
    r = subprocess.run(["setpriv", "--bounding-set", "-dac_override,-dac_read_search,-fowner",
                        "--inh-caps", "-dac_override,-dac_read_search,-fowner", sys.executable, "-c", code],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.startswith(f"the decoded-image cache {folder} is not readable by this user") and \
        "pass your own --cache-dir" in r.stdout, (r.stdout, r.stderr[-2000:])


def test_auto_keeps_images_in_memory_only_where_their_loading_copies_fit_its_share(monkeypatch):
    """Decoding holds the images LOADING_COPIES times at once (the decoded rows and the split's
    copy): auto counts each, so 300 MiB of images with 1 GiB free (600 MiB loading, over the
    half of it) go to the disk cache, and 200 MiB stay in memory."""
    from cnnx.train import cache

    monkeypatch.setattr(cache, "available_memory", lambda: 1 << 30)
    assert cache.LOADING_COPIES == 2 and cache.MEMORY_SHARE == 0.5
    assert cache.use_disk("auto", 300 << 20) and not cache.use_disk("auto", 200 << 20)
    assert not cache.use_disk("memory", 900 << 20) and cache.use_disk("disk", 1)
