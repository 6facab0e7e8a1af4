"""How an export reaches its folder (issue 12, items 11, 12, 13): built whole in a hidden
staging folder beside --out and swapped in, so the folder is always the complete previous
export or the complete new one (a SIGKILL at any moment, a full disk); files cnnx did not
write are never moved or deleted; staging folders of killed exports are removed next time."""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
import zipfile

import pytest
from _fs_util import mounted_tmpfs

from _export_util import make_checkpoint, one_line_error as _one_line_error
from cnnx.export.api import export_checkpoint

CLASSES = [f"c{i}" for i in range(10)]
FAST = dict(random_batch_sizes=(1, 7))


@pytest.fixture(scope="module")
def two_ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpts")
    return (make_checkpoint(root / "a" / "best.pt", "seed-cnn", CLASSES, seed=0),
            make_checkpoint(root / "b" / "best.pt", "seed-cnn", CLASSES, seed=1))


def _sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _snapshot(folder):
    return {p.name: _sha(p) for p in sorted(folder.iterdir())}


def _hidden(folder):
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))



def test_new_export_replaces_the_previous_one_whole(two_ckpts, tmp_path):
    a, b = two_ckpts
    out = tmp_path / "export"
    first = export_checkpoint(a, out, ("onnx", "torchscript"), **FAST)
    assert sorted(first.paths) == ["onnx", "parity", "torchscript"]
    second = export_checkpoint(b, out, ("torchscript",), **FAST)
    # a's model.onnx went with the rest of a's export: no file of another checkpoint stays beside b's
    assert sorted(os.listdir(out)) == ["model.torchscript.pt", "parity.json"]
    assert {k: p.name for k, p in second.paths.items()} == {"torchscript": "model.torchscript.pt",
                                                            "parity": "parity.json"}
    doc = json.loads((out / "parity.json").read_text())
    assert doc["checkpoint_sha256"] == _sha(b) and doc["files"] == {"torchscript": "model.torchscript.pt"}
    assert _hidden(tmp_path) == []  # no staging folder and no old export left beside it

    # a symlinked --out stays a link; the folder it points to gets the export
    target = tmp_path / "real"
    target.mkdir()
    link = tmp_path / "link"
    link.symlink_to(target)
    export_checkpoint(a, link, ("torchscript",), **FAST)
    assert link.is_symlink() and sorted(os.listdir(target)) == ["model.torchscript.pt", "parity.json"]


def test_out_folder_holding_other_files_is_refused_untouched(two_ckpts, tmp_path):
    a, _ = two_ckpts
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    (mine / "model.onnx").write_bytes(b"my own model")
    before = _snapshot(mine)
    _one_line_error(["export", str(a), "--out", str(mine)], "notes.txt", "did not write")
    assert _snapshot(mine) == before
    # an export's file names alone do not make a previous export: the user's own model.onnx,
    # another tool's, has no cnnx metadata (it was replaced, without a word)
    theirs = tmp_path / "deploy"
    theirs.mkdir()
    (theirs / "model.onnx").write_bytes(b"\x08\x07\x12\x07pytorch")  # a protobuf: ir_version, producer
    (theirs / "parity.json").write_text('{"note": "mine"}')
    before = _snapshot(theirs)
    _one_line_error(["export", str(a), "--out", str(theirs)], "model.onnx, parity.json", "did not write")
    assert _snapshot(theirs) == before
    # the run folder itself (best.pt, metrics...) is not an export folder either
    _one_line_error(["export", str(a), "--out", str(a.parent)], "best.pt")
    assert sorted(os.listdir(a.parent)) == ["best.pt"]
    assert _hidden(tmp_path) == []


def test_a_live_export_s_staging_folder_is_held_against_an_export_of_a_reused_pid(two_ckpts, tmp_path):
    """In containers every export is pid 1: a second one took the first's staging folder, its
    pid alive (itself) and its folder older than itself, for a killed export's, and removed it
    from under it. The staging folder is held (flock) while its export runs."""
    from cnnx.export import publish as pub
    from cnnx.runtime import files

    out = tmp_path / "out"
    staging, created = pub.make_staging(out)
    try:
        os.utime(staging, (1, 1))  # as old as can be: only the hold keeps it
        assert files.held_by_a_writer(staging)
        assert files.remove_stale_temps(tmp_path, (pub.STAGING_PREFIX,)) == [] and staging.is_dir()
    finally:
        pub.discard(staging, created)
    assert not staging.exists() and staging not in pub._held


def test_staging_folders_of_dead_exports_are_removed(two_ckpts, tmp_path):
    a, _ = two_ckpts
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    stale = tmp_path / f".cnnx-export-{dead_pid}-abc"
    (stale / "inner").mkdir(parents=True)
    (stale / "inner" / "model.onnx").write_bytes(b"half")
    live = tmp_path / f".cnnx-export-{os.getppid()}-xyz"  # a live process's (another export now)
    live.mkdir()
    export_checkpoint(a, tmp_path / "export", ("torchscript",), **FAST)
    assert not stale.exists() and live.exists()


# When to SIGKILL: as soon as the staging folder is complete (before the swap), as soon as the
# swap is seen (while the old export is being removed), and at a random moment.
KILL_TRIES = ("staged", "swapped", "any")


def _inode(path):
    try:
        return path.stat().st_ino
    except FileNotFoundError:
        return None


def _wait_for(proc, ready):
    while proc.poll() is None and not ready():
        time.sleep(0.0002)


def _export_state(out, old, new_sha):
    """'old' (the previous export, byte for byte) or 'new' (complete, of the new checkpoint)."""
    names = sorted(os.listdir(out))
    if names == sorted(old) and _snapshot(out) == old:
        return "old"
    doc = json.loads((out / "parity.json").read_text())
    assert names == sorted([*doc["files"].values(), "parity.json"]), names
    assert doc["checkpoint_sha256"] == new_sha
    with zipfile.ZipFile(out / "model.torchscript.pt") as z:  # complete: every member's CRC checks
        assert z.testzip() is None
        meta = json.loads(z.read(next(n for n in z.namelist() if n.endswith("/extra/cnnx.json"))))
    assert meta["cnnx.checkpoint_sha256"] == new_sha
    return "new"


def test_sigkill_at_any_moment_leaves_the_old_or_the_new_export(two_ckpts, tmp_path):
    """Real kills: a subprocess export of checkpoint b (TorchScript: the quickest format) over
    a's ONNX + TorchScript export, SIGKILLed around the publish window and at a random moment."""
    a, b = two_ckpts
    out = tmp_path / "export"
    export_checkpoint(a, out, ("onnx", "torchscript"), **FAST)
    old = _snapshot(out)
    pristine = tmp_path / "pristine"
    shutil.copytree(out, pristine)
    rng = random.Random(12)
    states = []
    for when in KILL_TRIES:
        shutil.rmtree(out)
        shutil.copytree(pristine, out)
        old_inode = _inode(out / "parity.json")
        proc = subprocess.Popen([sys.executable, "-c", "from cnnx.cli import main; main()", "export", str(b),
                                 "--format", "torchscript", "--out", str(out)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            if when == "staged":
                _wait_for(proc, lambda: list(tmp_path.glob(".cnnx-export-*/parity.json")))
            elif when == "swapped":
                _wait_for(proc, lambda: _inode(out / "parity.json") != old_inode)
            else:
                time.sleep(rng.uniform(0.5, 3.0))
            proc.send_signal(signal.SIGKILL)
        finally:
            proc.wait(timeout=120)
        states.append(_export_state(out, old, _sha(b)))
    assert set(states) <= {"old", "new"} and states[1] == "new", states
    # the next export removes what the killed ones left (their pids are dead)
    export_checkpoint(b, out, ("torchscript",), **FAST)
    assert _hidden(tmp_path) == []


@pytest.fixture
def small_disk(tmp_path):
    with mounted_tmpfs(tmp_path / "disk", "24m") as disk:
        yield disk


def test_full_disk_is_one_line_and_keeps_the_previous_export(two_ckpts, small_disk):
    a, b = two_ckpts
    out = small_disk / "export"
    export_checkpoint(a, out, ("torchscript",), **FAST)  # ~8.4 MB of seed-cnn weights fit
    before = _snapshot(out)
    st = os.statvfs(small_disk)
    with open(small_disk / "filler", "wb") as f:  # leave 2 MiB: less than one model file
        f.write(b"\0" * (st.f_bavail * st.f_frsize - (2 << 20)))
    # torch's writer fails with a RuntimeError, onnx's with an OSError: both are a full disk
    for fmt in ("torchscript", "onnx"):
        line = _one_line_error(["export", str(b), "--format", fmt, "--out", str(out)], "No space left on device")
        assert str(small_disk) in line
        assert _snapshot(out) == before
        assert sorted(os.listdir(small_disk)) == ["export", "filler"]


def test_swap_by_renames_where_the_filesystem_cannot_exchange(tmp_path):
    """The fallback of filesystems without RENAME_EXCHANGE, on real folders: the new export in,
    the old one gone, nothing hidden left beside them."""
    from cnnx.export.publish import _swap_by_renames

    out, staging = tmp_path / "export", tmp_path / ".cnnx-export-1-x"
    out.mkdir()
    (out / "model.onnx").write_bytes(b"old")
    staging.mkdir()
    (staging / "model.pt2").write_bytes(b"new")
    _swap_by_renames(staging, out)
    assert sorted(os.listdir(out)) == ["model.pt2"] and (out / "model.pt2").read_bytes() == b"new"
    assert sorted(os.listdir(tmp_path)) == ["export"]


def test_a_full_temporary_folder_is_named_not_the_output_disk(two_ckpts, small_disk, tmp_path, cifar_subset,
                                                             monkeypatch, caplog):
    """int8 quantisation writes its calibration model in the temporary folder: that disk full was
    reported as "No space left on device in <the output's folder>", a disk with room to spare.
    onnxruntime's shape inference logged its traceback first (logging's last resort: stderr;
    here pytest's log capture takes it)."""
    import tempfile

    st = os.statvfs(small_disk)
    with open(small_disk / "filler", "wb") as f:
        f.write(b"\0" * (st.f_bavail * st.f_frsize))
    monkeypatch.setattr(tempfile, "tempdir", str(small_disk))
    out = tmp_path / "out"
    _one_line_error(["export", str(two_ckpts[1]), "--int8", "--verify-data", str(cifar_subset(2)), "--out", str(out)],
                    f"int8 quantisation failed: No space left on device in the temporary folder {small_disk}")
    assert not out.exists()
    assert not [r for r in caplog.records if r.name.startswith("onnxruntime")], caplog.text[-2000:]


def test_int8_temporary_files_of_a_killed_export_are_removed_by_the_next(two_ckpts, tmp_path, cifar_subset,
                                                                         monkeypatch):
    """onnxruntime's quantisation makes pre.quant.* and ort.quant.* (the calibration model, as
    large as the model) in the temporary folder: an export killed meanwhile (kill -9) left them
    there for good. They go into a folder of the export's own in it, which the next removes."""
    import tempfile

    from click.testing import CliRunner

    from cnnx.cli import cli
    from cnnx.runtime.files import TEMP_PREFIX

    temp = tmp_path / "temp"
    temp.mkdir()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    left = temp / f"{TEMP_PREFIX}{int(dead.stdout)}-abcd1234" / "ort.quant.xyz"
    left.mkdir(parents=True)
    (left / "augmented_model.onnx").write_bytes(bytes(4096))
    mine = temp / "notes.txt"  # the user's own
    mine.write_text("mine")
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    r = CliRunner().invoke(cli, ["export", str(two_ckpts[1]), "--int8", "--verify-data", str(cifar_subset(2)),
                                 "--out", str(tmp_path / "out")], catch_exceptions=False)
    # (this small checkpoint's int8 variant may fail the gate: the quantisation ran either way)
    assert r.exit_code in (0, 1) and "exporting onnx-int8" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert sorted(os.listdir(temp)) == ["notes.txt"] and tempfile.tempdir == str(temp)


def test_a_replaced_folder_keeps_its_mode_owner_and_group(two_ckpts, tmp_path):
    """Each export swaps in a new folder: a folder kept private (700) came back 755, a team's
    group folder (nobody:nogroup, setgid) came back the exporting user's."""
    import grp
    import pwd
    import stat

    a, b = two_ckpts
    out = tmp_path / "deploy"
    export_checkpoint(a, out, ("torchscript",), **FAST)
    os.chmod(out, 0o700)
    export_checkpoint(b, out, ("torchscript",), **FAST)
    assert stat.S_IMODE(out.stat().st_mode) == 0o700 and _snapshot(out)["parity.json"]
    if os.geteuid() != 0:
        return
    uid, gid = pwd.getpwnam("nobody").pw_uid, grp.getgrnam("nogroup").gr_gid
    os.chown(out, uid, gid)
    os.chmod(out, 0o2770)
    export_checkpoint(a, out, ("torchscript",), **FAST)
    st = out.stat()
    assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o2770, uid, gid)
    assert {p.stat().st_gid for p in out.iterdir()} == {gid}  # what setgid would have given new files
    assert json.loads((out / "parity.json").read_text())["checkpoint_sha256"] == _sha(a)


def test_an_owner_that_cannot_be_set_does_not_stop_the_export(two_ckpts, tmp_path, monkeypatch):
    """In a user namespace (a rootless container) chown to an id not mapped there is EINVAL: keeping
    the old folder's owner made the export fail after its gate with "cannot publish"."""
    import errno

    a, b = two_ckpts
    out = tmp_path / "deploy"
    export_checkpoint(a, out, ("torchscript",), **FAST)

    def unmapped(*args, **kwargs):
        raise OSError(errno.EINVAL, "Invalid argument")

    monkeypatch.setattr(os, "chown", unmapped)
    export_checkpoint(b, out, ("torchscript",), **FAST)
    assert json.loads((out / "parity.json").read_text())["checkpoint_sha256"] == _sha(b)


def test_a_mount_point_out_is_refused_before_the_export_not_after(two_ckpts, tmp_path):
    """The swap renames a folder into the output's place, which a mount point cannot take (EBUSY):
    the export and its gate ran, then "cannot publish". It is refused first, with a way out."""
    with mounted_tmpfs(tmp_path / "volume", "16m") as volume:
        line = _one_line_error(["export", str(two_ckpts[0]), "--format", "torchscript", "--out", str(volume)],
                               "is a mount point", f"--out {volume / 'export'}")
        assert "parity" not in line and os.listdir(volume) == []
        export_checkpoint(two_ckpts[0], volume / "export", ("torchscript",), **FAST)
        assert sorted(os.listdir(volume / "export")) == ["model.torchscript.pt", "parity.json"]


@pytest.mark.skipif(shutil.which("setpriv") is None or os.geteuid() != 0, reason="needs setpriv, as root")
def test_a_folder_its_user_may_not_write_is_refused_not_swapped(two_ckpts, tmp_path):
    """The swap needs only the parent's permission: a previous export in a folder made read-only
    was replaced, and the old one, swapped out of it, stayed beside it for good (its folder 555),
    one more with each export. Root is made an ordinary user here by dropping the capabilities
    that bypass file permissions."""
    a, b = two_ckpts
    out = tmp_path / "deployed"
    export_checkpoint(a, out, ("torchscript",), **FAST)
    for f in out.iterdir():
        f.chmod(0o444)
    out.chmod(0o555)
    before = _snapshot(out)
    try:
        r = subprocess.run(["setpriv", "--bounding-set", "-dac_override,-dac_read_search,-fowner",
                            sys.executable, "-m", "cnnx", "export", str(b), "--out", str(out), "--format", "torchscript"],
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 1, r.stderr[-2000:]
        assert r.stderr.strip().splitlines() == [f"Error: cannot write to output folder {out}: Permission denied"]
        assert _snapshot(out) == before and _hidden(tmp_path) == []
    finally:
        out.chmod(0o755)


def test_a_read_only_disk_is_named_so_and_a_failed_write_names_the_file_not_the_staging_folder(two_ckpts, tmp_path):
    """An export over a previous one on a read-only mount said "Permission denied" (access()
    says only no); a write that failed otherwise than for a full disk (EFBIG) named the staging
    folder, removed with the failure."""
    import errno

    from cnnx.export.writers import _failure_line

    a, b = two_ckpts
    with mounted_tmpfs(tmp_path / "disk", "16m") as disk:
        export_checkpoint(a, disk / "exp", ("onnx",), **FAST)
        before = _snapshot(disk / "exp")
        if subprocess.run(["mount", "-o", "remount,ro", str(disk)], capture_output=True).returncode != 0:
            pytest.skip("cannot remount the tmpfs read-only here")
        _one_line_error(["export", str(b), "--out", str(disk / "exp"), "--format", "onnx"],
                        f"cannot write to output folder {disk / 'exp'}: Read-only file system")
        assert _snapshot(disk / "exp") == before
    staging = tmp_path / ".cnnx-export-1-x"
    line = _failure_line("pt2 export", OSError(errno.EFBIG, os.strerror(errno.EFBIG), str(staging / "model.pt2")),
                         staging)
    assert line == f"pt2 export failed: File too large (writing model.pt2 in {tmp_path})", line


def test_a_file_put_into_the_previous_export_while_exporting_is_not_swapped_away(two_ckpts, tmp_path, monkeypatch):
    """The folder is checked up front and again at the swap: a user's notes.txt dropped into the
    previous export while the new one was being written went away with that export (the swap
    moves the whole folder and removes it), without a word. Here the writer step drops it."""
    from cnnx.export import api

    a, b = two_ckpts
    out = tmp_path / "export"
    export_checkpoint(a, out, ("torchscript",), **FAST)
    real_run_writer = api.run_writer

    def writer_while_the_user_writes(name, job):
        (out / "notes.txt").write_text("mine, written during the export")
        return real_run_writer(name, job)

    monkeypatch.setattr(api, "run_writer", writer_while_the_user_writes)
    before = _snapshot(out)
    _one_line_error(["export", str(b), "--format", "torchscript", "--out", str(out)], "notes.txt", "did not write")
    assert (out / "notes.txt").read_text() == "mine, written during the export"
    assert _snapshot(out) == {**before, "notes.txt": _sha(out / "notes.txt")}
    assert json.loads((out / "parity.json").read_text())["checkpoint_sha256"] == _sha(a)
    assert _hidden(tmp_path) == []


def test_a_failed_rename_into_place_puts_the_previous_export_back(two_ckpts, tmp_path, monkeypatch):
    """Where the filesystem cannot exchange, the previous export is renamed aside and the new one
    in: when that second rename fails, the previous export goes back to --out (it was left only
    in a hidden .cnnx-export-old-* folder, --out gone)."""
    from cnnx.export import publish as pub
    from cnnx.export.errors import ExportError

    a, b = two_ckpts
    out = tmp_path / "export"
    export_checkpoint(a, out, ("onnx", "torchscript"), **FAST)
    before = _snapshot(out)
    monkeypatch.setattr(pub, "_exchange", lambda x, y: False)
    real_rename, failed = os.rename, []

    def rename(src, dst, *args, **kwargs):
        if os.fspath(dst) == os.fspath(out) and os.path.basename(os.fspath(src)) != "export" and not failed:
            failed.append(src)  # the staging folder into place: fails once
            raise OSError(5, "Input/output error", os.fspath(dst))
        return real_rename(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(ExportError, match="cannot publish the export: Input/output error"):
        export_checkpoint(b, out, ("torchscript",), **FAST)
    monkeypatch.undo()
    assert failed and os.path.basename(os.fspath(failed[0])).startswith(pub.STAGING_PREFIX)
    assert out.is_dir() and _snapshot(out) == before
    assert json.loads((out / "parity.json").read_text())["checkpoint_sha256"] == _sha(a)
    assert _hidden(tmp_path) == []  # no .cnnx-export-old-* (nor the staging folder) left beside it


def test_a_symlink_named_as_an_export_file_makes_the_folder_not_an_export(two_ckpts, tmp_path):
    """A link named model.onnx to a cnnx model is not a file an export wrote there: the folder is
    refused (the swap would remove the link with the folder), the link and its target untouched."""
    a, _ = two_ckpts
    elsewhere = tmp_path / "elsewhere"
    export_checkpoint(a, elsewhere, ("onnx",), **FAST)
    target = elsewhere / "model.onnx"
    target_sha, target_inode = _sha(target), _inode(target)
    deploy = tmp_path / "deploy"
    deploy.mkdir()
    (deploy / "model.onnx").symlink_to(target)
    _one_line_error(["export", str(a), "--format", "torchscript", "--out", str(deploy)], "model.onnx",
                    "did not write")
    assert os.listdir(deploy) == ["model.onnx"] and (deploy / "model.onnx").is_symlink()
    assert os.readlink(deploy / "model.onnx") == str(target)
    assert _sha(target) == target_sha and _inode(target) == target_inode
    assert sorted(os.listdir(elsewhere)) == ["model.onnx", "parity.json"] and _hidden(tmp_path) == []
