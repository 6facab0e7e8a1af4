"""cnnx.runtime.files: the one atomic writer and the one first line of an error."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import textwrap

import pytest

from cnnx.runtime import files


def test_atomic_write_replaces_whole_and_leaves_no_temp(tmp_path):
    target = tmp_path / "out.txt"
    target.write_text("old")
    files.atomic_write(target, "new text")
    assert target.read_text() == "new text"
    assert [p.name for p in tmp_path.iterdir()] == ["out.txt"]


def test_failure_inside_keeps_the_old_file(tmp_path):
    target = tmp_path / "out.bin"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError):
        with files.atomic_file(target) as f:
            f.write(b"half")
            raise RuntimeError("writer died")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.bin"]


def test_symlink_is_written_through_and_mode_kept(tmp_path):
    real = tmp_path / "real.csv"
    real.write_text("a\n")
    os.chmod(real, 0o640)
    link = tmp_path / "link.csv"
    link.symlink_to(real)
    with pytest.raises(OSError, match="is a symlink, and cnnx writes this name itself"):  # a name cnnx chose
        files.atomic_write(link, "b\n", keep_mode_of_target=True)
    assert real.read_text() == "a\n"
    files.atomic_write(link, "b\n", keep_mode_of_target=True, through_symlink=True)  # a name the user gave
    assert link.is_symlink() and link.read_text() == "b\n"
    assert (real.stat().st_mode & 0o777) == 0o640


def test_new_file_gets_the_umask_mode_not_0600(tmp_path):
    old = os.umask(0o022)
    try:
        files.atomic_write(tmp_path / "x", b"1")
    finally:
        os.umask(old)
    assert (os.stat(tmp_path / "x").st_mode & 0o777) == 0o644


def test_killed_writer_leaves_old_or_new_and_its_temp_is_cleaned(tmp_path):
    target = tmp_path / "big.bin"
    target.write_bytes(b"old")
    code = textwrap.dedent(f"""
        import os, sys, time
        from cnnx.runtime.files import atomic_file
        with atomic_file({str(target)!r}) as f:
            f.write(b"x" * 1000)
            f.flush()
            print("writing", flush=True)
            time.sleep(60)
    """)
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "writing"
    p.send_signal(signal.SIGKILL)
    p.wait(timeout=30)
    assert target.read_bytes() == b"old"
    stale = [q.name for q in tmp_path.iterdir() if q.name.startswith(files.TEMP_PREFIX)]
    assert len(stale) == 1 and stale[0].startswith(f"{files.TEMP_PREFIX}{p.pid}-")
    removed = files.remove_stale_temps(tmp_path)
    assert [os.path.basename(r) for r in removed] == stale
    assert [q.name for q in tmp_path.iterdir()] == ["big.bin"]


def test_temps_of_live_processes_are_kept(tmp_path):
    mine = tmp_path / f"{files.TEMP_PREFIX}{os.getpid()}-abc"
    mine.write_text("in progress")
    nopid = tmp_path / f"{files.TEMP_PREFIX}notapid-x"
    nopid.write_text("?")
    assert files.remove_stale_temps(tmp_path) == []
    assert mine.exists() and nopid.exists()


def test_temps_of_a_reused_pid_written_before_its_process_started_are_stale(tmp_path):
    """In a container every run is pid 1, and a killed run's temps were never removed: their pid
    was alive (the next run itself). A temp last changed before the process of its pid started
    cannot be that process's; one changed since may be."""
    old = tmp_path / f"{files.TEMP_PREFIX}{os.getpid()}-killed"
    old.mkdir()
    (old / "part").write_text("half")
    started = time.time() - time.clock_gettime(time.CLOCK_BOOTTIME) + int(
        open(f"/proc/{os.getpid()}/stat").read().rsplit(")", 1)[1].split()[19]) / os.sysconf("SC_CLK_TCK")
    os.utime(old, (started - 60, started - 60))  # a minute before this process began
    mine = tmp_path / f"{files.TEMP_PREFIX}{os.getpid()}-now"
    mine.write_text("in progress")  # written by this process: kept
    assert files.remove_stale_temps(tmp_path) == [str(old)]
    assert mine.exists()


def test_first_line():
    assert files.first_line(ValueError("\n  bad thing\nsecond")) == "bad thing"
    assert files.first_line(KeyError()) == "KeyError"
    assert files.first_line(RuntimeError("x" * 500), limit=20) == "x" * 17 + "..."
    e = OSError(28, "No space left on device", "/out/model.onnx")
    assert files.os_error_line(e) == "No space left on device: /out/model.onnx"
    assert files.is_disk_full(e)


def test_temps_a_writer_holds_are_kept_when_their_pid_names_no_process_here(tmp_path, monkeypatch):
    """Two containers sharing a cache folder (or two hosts, an NFS home): a run's pid names no
    process in the other's PID namespace, and the other removed the cache it was building, as if
    its writer had been killed. A writer now holds its temps (flock); a killed one holds nothing."""
    import numpy as np

    from cnnx.train.cache import build_disk_cache

    monkeypatch.setattr(files, "pid_alive", lambda pid: False)  # every pid, as seen from the other namespace
    seen = {}

    def decode_into(out):  # while the cache is being built, another run cleans the folder
        seen["removed"] = files.remove_stale_temps(tmp_path)
        seen["temps"] = [p.name for p in tmp_path.iterdir() if p.name.startswith(files.TEMP_PREFIX)]
        out[...] = 7
        return len(out), None

    rows, _meta = build_disk_cache(tmp_path / "cache", 4, (8, 8), decode_into, lambda extra: {})
    assert seen["removed"] == [] and len(seen["temps"]) == 1, seen
    assert (np.asarray(rows[np.arange(4)]) == 7).all()
    with files.atomic_file(tmp_path / "out.txt", "w") as f:  # an atomic file's temp, the same
        f.write("x")
        assert files.remove_stale_temps(tmp_path) == []
    left = tmp_path / f"{files.TEMP_PREFIX}999999-left"  # what a killed writer left: no one holds it
    left.mkdir()
    assert files.remove_stale_temps(tmp_path) == [str(left)] and (tmp_path / "out.txt").read_text() == "x"


def test_a_write_error_that_names_no_file_is_said_with_the_file_being_written(tmp_path):
    """Under `ulimit -f` a checkpoint's write ended the run with "Error: File too large" and no path."""
    target = tmp_path / "big.bin"
    code = textwrap.dedent(f"""
        import resource, signal
        from cnnx.runtime.files import atomic_write
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # as Python does at start: the write fails with EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
        try:
            atomic_write({str(target)!r}, b"x" * 100000)
        except OSError as e:
            print(e.errno, e.filename)
    """)
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert p.stdout.split() == ["27", str(target)], (p.stdout, p.stderr)  # EFBIG, the file
    assert os.listdir(tmp_path) == []  # nothing half-written


def test_a_filesystem_without_locks_still_writes(tmp_path, monkeypatch):
    """flock raising ENOSYS (Lustre mounted noflock) stopped every atomic write and cache build."""
    import errno
    import fcntl

    def no_locks(fd, op):
        raise OSError(errno.ENOSYS, "Function not implemented")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    files.atomic_write(tmp_path / "a.txt", "x")
    assert (tmp_path / "a.txt").read_text() == "x" and os.listdir(tmp_path) == ["a.txt"]


def test_sigint_held_takes_a_ctrl_c_after_its_block_whichever_thread_it_reaches():
    """A Ctrl-C inside the block (onnxruntime's import would turn it into an ImportError that
    reads as a broken install) is a KeyboardInterrupt right after it; the handler is put back."""
    import threading
    import time

    handler = signal.getsignal(signal.SIGINT)
    for sender in ("this thread", "another thread"):
        reached = []
        with pytest.raises(KeyboardInterrupt):
            with files.sigint_held():
                if sender == "this thread":
                    os.kill(os.getpid(), signal.SIGINT)
                else:  # the kernel may hand it to a thread that does not block it; Python runs it here
                    threading.Timer(0.05, os.kill, (os.getpid(), signal.SIGINT)).start()
                deadline = time.monotonic() + 0.5
                while time.monotonic() < deadline:  # bytecode boundaries where a handler would run
                    pass
                reached.append(True)
        assert reached == [True], sender
        assert signal.getsignal(signal.SIGINT) is handler
    # A program's own handler (an asyncio loop's, cnnx classify's) hears of it once, after the block.
    heard = []
    signal.signal(signal.SIGINT, lambda signum, frame: heard.append(signum))
    try:
        with files.sigint_held():
            os.kill(os.getpid(), signal.SIGINT)
            for _ in range(100_000):
                pass
            assert heard == []
        assert heard == [signal.SIGINT]
    finally:
        signal.signal(signal.SIGINT, handler)


def test_the_forkserver_starts_with_ctrl_c_held_and_the_caller_has_it_back():
    """A Ctrl-C while the forkserver imports its preload (numpy, onnxruntime) killed it with a
    traceback, and the pool it was to serve ended in "Aborted!" (exit 1): it starts with SIGINT
    blocked, which it ignores after its imports; the caller's own mask is as it was. (The
    resource tracker's own start unblocks SIGINT: it is started first.)"""
    code = textwrap.dedent("""
        import signal
        from multiprocessing import forkserver
        from cnnx.runtime import workers
        workers.warm_up()
        pid = forkserver._forkserver._forkserver_pid
        blocked = next(int(line.split()[1], 16) for line in open(f"/proc/{pid}/status")
                       if line.startswith("SigBlk:"))
        print(bool(blocked & (1 << (signal.SIGINT - 1))), signal.SIGINT in signal.pthread_sigmask(signal.SIG_BLOCK, []))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["True", "False"]


@pytest.mark.parametrize("data", [b"new bytes\n" * 100, "new text\n" * 100])
def test_atomic_write_fsyncs_the_whole_file_before_the_rename_and_the_folder_after(tmp_path, monkeypatch, data):
    """Without the file's fsync before the rename, a power cut can leave the new name on an
    empty or partial file (ext4 delalloc, XFS): the old contents gone, the new ones not there.
    The folder's fsync after the rename makes the rename itself durable."""
    import stat

    target = tmp_path / "out.csv"
    target.write_bytes(b"old contents\n")
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        st = os.fstat(fd)
        events.append(("fsync", "folder" if stat.S_ISDIR(st.st_mode) else "file", st.st_ino,
                       None if stat.S_ISDIR(st.st_mode) else st.st_size))
        return real_fsync(fd)

    def replace(src, dst, *a, **kw):
        events.append(("replace", os.stat(src).st_ino, os.fspath(dst)))
        return real_replace(src, dst, *a, **kw)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    files.atomic_write(target, data)
    monkeypatch.undo()
    size = len(data if isinstance(data, bytes) else data.encode())
    new = os.stat(target).st_ino
    assert events == [("fsync", "file", new, size),  # the temp file, whole, that becomes the target
                      ("replace", new, str(target)),
                      ("fsync", "folder", os.stat(tmp_path).st_ino, None)], events
    assert target.read_bytes() == (data if isinstance(data, bytes) else data.encode())
