"""Decoding in worker processes (cnnx.runtime.procdecode): the same rows as the decode
threads, a dead worker is one line and exit 1 (never a hang), and no shared-memory segment
is left in /dev/shm after a run that ends normally, with an error, or by Ctrl-C."""

from __future__ import annotations

import glob
import json
import os
import shutil
import signal
import subprocess
import textwrap
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from cnnx.runtime.api import Classifier, Note, Prediction, Skipped
from cnnx.runtime.pipeline import PipelineConfig
from cnnx.runtime.procdecode import SHM_PREFIX, DecodeWorkerDied
from tests._runtime_util import exported_model
from tests.test_classify import make_bad_folder

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return exported_model(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="module")
def mixed(cifar_subset, tmp_path_factory) -> Path:
    """Real CIFAR JPEGs with the bad-input cases of test_classify among them."""
    root = tmp_path_factory.mktemp("mixed")
    make_bad_folder(root / "bad")
    shutil.copytree(cifar_subset(6), root / "cifar")
    return root


def segments(pid: int) -> list:
    return glob.glob(f"/dev/shm/{SHM_PREFIX}{pid}-*")


def rows_of(model, folder, decode: str, **kw) -> list:
    with Classifier(model, "cpu", decode=decode, **kw) as clf:
        rows = list(clf.classify([folder]))
        assert (clf.decode_pool is not None) == (decode == "processes")
        return rows


@pytest.mark.parametrize("batch_size, workers", [(8, 2), (256, 3)])
def test_bad_files_among_good_ones_give_the_threads_rows(model, mixed, batch_size, workers):
    # batch 8: many batches through the ring of slots, errors in several of them; 256: one batch
    # in chunks of every worker.
    threads = rows_of(model, mixed, "threads", batch_size=batch_size, workers=workers)
    processes = rows_of(model, mixed, "processes", batch_size=batch_size, workers=workers)
    kinds = {type(row) for row in threads}
    assert kinds == {Prediction, Skipped, Note}, kinds  # the folder exercises every kind of row
    assert processes == threads
    assert not segments(os.getpid())


def test_logits_from_the_workers_are_the_callers(model, mixed):
    """On the CPU the workers run the model; on a bound runner (IOBinding) the caller does: same rows."""
    in_workers = rows_of(model, mixed, "processes", batch_size=16)
    in_caller = rows_of(model, mixed, "processes", batch_size=16, io_binding=True)
    assert in_workers == in_caller


def test_predict_alone_starts_no_process(model):
    import numpy as np

    with Classifier(model, "cpu", decode="processes") as clf:
        clf.predict(np.zeros((2, 3, 32, 32), np.uint8))
        assert clf.decode_pool is None


def test_a_program_that_never_closes_its_classifier_still_exits(model, mixed):
    """The workers ignore SIGTERM (a service's stop signals every process): at exit, multiprocessing
    signals its daemon processes and joins them, which waited forever where its exit hook came
    before the pool's own (any weakref.finalize made before multiprocessing was imported)."""
    code = textwrap.dedent(f"""
        import tempfile
        keep = tempfile.TemporaryDirectory()  # a weakref.finalize before multiprocessing is imported
        from cnnx.runtime.api import Classifier
        clf = Classifier({str(model)!r}, "cpu", decode="processes", workers=2, batch_size=8)
        print(sum(len(b.paths) for b in clf.classify([{str(mixed)!r}]).results()), flush=True)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert out.returncode == 0 and int(out.stdout) > 0, out.stderr


def test_auto_decodes_a_small_job_in_threads_and_a_larger_one_in_processes(model, mixed, monkeypatch):
    """decode "auto": a call with at most PROCESS_DECODE_MIN_FILES files to decode takes threads
    (no process started); one with more starts the processes, which a later small call then uses.
    The same rows every way."""
    import cnnx.runtime.api as api

    threads = rows_of(model, mixed, "threads", batch_size=8, workers=2)
    files = sum(isinstance(row, Prediction) or (isinstance(row, Skipped) and row.stage != "discover")
                for row in threads)  # the files that discovery hands on to be decoded
    with Classifier(model, "cpu", decode="auto", batch_size=8, workers=2) as clf:
        monkeypatch.setattr(api, "PROCESS_DECODE_MIN_FILES", files)
        assert list(clf.classify([mixed])) == threads
        assert clf.decode_pool is None  # `files` files: not more than the least for processes
        monkeypatch.setattr(api, "PROCESS_DECODE_MIN_FILES", files - 1)
        assert list(clf.classify([mixed])) == threads
        pool = clf.decode_pool
        assert pool is not None and pool.runs == 1
        monkeypatch.setattr(api, "PROCESS_DECODE_MIN_FILES", files)
        assert list(clf.classify([mixed])) == threads
        assert pool.runs == 2  # started already: a small call uses them too


@pytest.mark.parametrize("decode, warmed", [("auto", False), ("processes", True), ("threads", False)])
def test_only_decode_processes_start_their_server_with_the_classifier(model, monkeypatch, decode, warmed):
    """Under auto a call's size decides (a small one needs no server), so the Classifier starts
    none ahead; under processes every call uses it, and its imports start at once."""
    import cnnx.runtime.api as api

    calls = []
    monkeypatch.setattr(api, "warm_up", lambda: calls.append(1))
    with Classifier(model, "cpu", decode=decode, workers=2):
        assert bool(calls) == warmed


def test_a_run_stopped_early_leaves_nothing_for_the_next_one(model, mixed):
    """Tasks and results of a run the caller stopped (its segment gone) are not taken for the
    next run's: the second run of the same workers gives the threads' rows."""
    threads = rows_of(model, mixed, "threads", batch_size=8)
    with Classifier(model, "cpu", decode="processes", batch_size=8, workers=2) as clf:
        first = clf.classify([mixed])
        next(first)
        first.close()
        assert not segments(os.getpid())
        assert list(clf.classify([mixed])) == threads


def _batches(folder, spec, batch_size: int, workers: int, lend: bool) -> list:
    """Each batch of a DecodePool run, copied as it comes (a lent one is valid only until then):
    (paths, failed, notes, images, whether the pool's batch owned its pixels)."""
    from cnnx.runtime.discover import Discovery
    from cnnx.runtime.pipeline import batched_runs
    from cnnx.runtime.procdecode import DecodePool

    config = PipelineConfig(batch_size=batch_size, workers=workers)
    pool = DecodePool(workers)
    try:
        return [(b.paths, b.failed, b.notes, b.images.copy(), b.images.flags.owndata)
                for _items, b in pool.decoded_batches(batched_runs(Discovery([str(folder)]).runs(), batch_size), spec,
                                                      config, lend=lend)]
    finally:
        pool.close()


def test_one_run_at_a_time_takes_the_workers_and_a_failed_start_gives_them_back(model, mixed, monkeypatch):
    """Two threads' calls on one Classifier: each checked `busy`, then started, and one got
    "this DecodePool is already running a classify call" (1 to 4 calls in 12,000); the workers
    are taken at once now (claim), by one run. A run whose segment could not be made (/dev/shm
    full) left the pool busy for good: every later call decoded in threads."""
    from multiprocessing import shared_memory

    from cnnx.runtime.discover import Discovery
    from cnnx.runtime.pipeline import batched_runs
    from cnnx.runtime.procdecode import DecodePool

    with Classifier(model, "cpu") as clf:
        spec = clf.info.spec
    config = PipelineConfig(batch_size=8, workers=2)
    pool = DecodePool(2)

    def run(**kw):
        return [b.paths for _items, b in pool.decoded_batches(batched_runs(Discovery([str(mixed)]).runs(), 8), spec,
                                                              config, **kw)]

    try:
        assert pool.claim() and pool.busy and not pool.claim()
        with pytest.raises(RuntimeError, match="already running"):
            run()
        rows = run(claimed=True)  # the holder's own run
        assert pool.busy  # given back by its holder, not by the run
        pool.release()
        assert not pool.busy and run() == rows and not pool.busy

        def no_room(*args, **kwargs):
            raise OSError(28, "No space left on device")

        monkeypatch.setattr(shared_memory, "SharedMemory", no_room)
        with pytest.raises(OSError):
            run()
        assert not pool.busy
    finally:
        pool.close()


def test_lent_batches_are_the_copied_ones_and_only_whole_ones_are_lent(model, mixed):
    """lend (the IOBinding runner's way): a batch whose files all decoded is its slot, not a
    copy; one with a failure is copied out as before; every batch holds the same pixels and rows."""
    with Classifier(model, "cpu") as clf:
        spec = clf.info.spec
    copied = _batches(mixed, spec, 8, 2, lend=False)
    lent = _batches(mixed, spec, 8, 2, lend=True)
    assert len(lent) == len(copied) > 4
    for (paths, failed, notes, images, _), (lpaths, lfailed, lnotes, limages, owns) in zip(copied, lent):
        assert (lpaths, lfailed, lnotes) == (paths, failed, notes)
        assert (limages == images).all()
        assert owns == bool(failed)  # whole batches borrowed, the others copied
    assert any(failed for _p, failed, *_ in copied) and any(not failed for _p, failed, *_ in copied)
    assert not segments(os.getpid())


@pytest.mark.parametrize("io_binding", [False, True])
def test_decode_processes_yield_to_a_caller_that_feeds_a_gpu(model, mixed, io_binding):
    """With a bound runner (the GPU path; forced on the CPU here) the workers run at
    FEEDING_NICE more niceness than this process; on the CPU loop, where they run the model
    too, at the same."""
    from cnnx.runtime.procdecode import FEEDING_NICE

    mine = os.getpriority(os.PRIO_PROCESS, 0)
    with Classifier(model, "cpu", decode="processes", workers=2, batch_size=16, io_binding=io_binding) as clf:
        rows = list(clf.classify([mixed]))
        niceness = {os.getpriority(os.PRIO_PROCESS, p.pid) for p in clf.decode_pool.procs}
    assert rows and niceness == {min(19, mine + FEEDING_NICE) if io_binding else mine}


def test_a_batch_is_one_task_when_the_slots_cover_the_workers():
    from cnnx.runtime.procdecode import MIN_CHUNK_FILES, _chunk_files

    assert _chunk_files(256, 18, 16, runs_model=False) == 256  # CIFAR on 16 cores: 18 slots
    assert _chunk_files(256, 7, 16, runs_model=False) == 86  # 3 tasks a batch: 21 tasks for 16 workers
    assert _chunk_files(256, 2, 16, runs_model=False) == MIN_CHUNK_FILES
    assert _chunk_files(256, 2, 16, runs_model=True) == 256


def test_auto_picks_processes_for_small_inputs_only():
    small, large = {"size": [32, 32]}, {"size": [224, 224]}
    assert PipelineConfig(workers=2).decodes_in_processes(small)
    assert not PipelineConfig(workers=2).decodes_in_processes(large)
    assert not PipelineConfig(workers=1).decodes_in_processes(small)
    assert PipelineConfig(workers=1, decode="processes").decodes_in_processes(small)
    assert not PipelineConfig(workers=2, decode="threads").decodes_in_processes(small)
    with pytest.raises(ValueError, match="decode must be one of"):
        PipelineConfig(decode="fork")


def test_a_worker_killed_mid_run_is_one_error_not_a_hang(model, cifar_subset):
    with Classifier(model, "cpu", decode="processes", batch_size=8, workers=2) as clf:
        rows = clf.classify([cifar_subset(20)])
        next(rows)
        victim = clf.decode_pool.procs[0]  # started by the first row
        os.kill(victim.pid, signal.SIGKILL)
        with pytest.raises(DecodeWorkerDied, match=f"decode worker process {victim.pid} ended "
                                                   r"\(killed by signal 9\)"):
            for _row in rows:
                pass
        # "run again": the same Classifier runs again, on new workers (it sent to the dead one and
        # raised BrokenPipeError at every later call)
        again = [r for r in clf.classify([cifar_subset(20)]) if isinstance(r, Prediction)]
        assert len(again) == 200 and victim not in clf.decode_pool.procs
        os.kill(clf.decode_pool.procs[1].pid, signal.SIGKILL)  # ended between two calls
        clf.decode_pool.procs[1].join(5)
        assert len([r for r in clf.classify([cifar_subset(20)]) if isinstance(r, Prediction)]) == 200
    assert not segments(os.getpid())


def children(pid: int) -> list:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(k) for k in f.read().split()]
    except OSError:
        return []


def workers_of(pid: int) -> list:
    """The decode processes of a cnnx classify: children of its forkserver (its other child,
    multiprocessing's resource tracker, has none)."""
    return [w for kid in children(pid) for w in children(kid)]


def start_cli(model, folder, *extra, env=None, group=False):
    """`cnnx classify --decode processes` writing to a pipe nobody reads yet: it stops mid-run
    once the pipe is full (the folder's rows are several times a pipe's 64 KiB), with its
    workers started and its segment in /dev/shm. (Under --decode auto, a folder this small
    would be decoded in threads.)"""
    proc = subprocess.Popen([sys.executable, "-m", "cnnx", "classify", str(folder), "--model", str(model),
                             "--device", "cpu", "--batch-size", "16", "--decode", "processes", *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT, env=env, start_new_session=group)
    proc.stdout.readline()  # the header
    proc.stdout.readline()  # a first row: the run is under way
    deadline = time.monotonic() + 30
    while len(workers_of(proc.pid)) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert segments(proc.pid), "the run holds no segment: is it decoding in processes?"
    return proc


@pytest.fixture(scope="module")
def big(cifar_subset) -> Path:
    return cifar_subset(300)  # 3,000 rows: ~200 KB of CSV


def test_cli_worker_killed_mid_run_exits_1_with_one_line(model, big):
    proc = start_cli(model, big, "--workers", "2")
    victim = workers_of(proc.pid)[0]
    os.kill(victim, signal.SIGKILL)
    _out, err = proc.communicate(timeout=120)
    lines = err.decode().strip().splitlines()
    assert proc.returncode == 1, err.decode()
    assert lines[-1].startswith(f"Error: decode worker process {victim} ended (killed by signal 9)")
    assert "Traceback" not in err.decode()
    assert not segments(proc.pid)


@pytest.mark.parametrize("signum, code, line", [(signal.SIGINT, 130, "interrupted"),
                                                (signal.SIGTERM, 143, "terminated")])
def test_cli_ctrl_c_or_sigterm_ends_the_run_cleanly_leaving_no_segment_and_no_process(model, big, signum, code, line,
                                                                                     tmp_path):
    """Ctrl-C reaches the process group; a SIGTERM (systemd stopping a service, docker stop)
    the command or every process: the rows end with a whole one, and the last line says why."""
    temp = tmp_path / "temp"
    temp.mkdir()
    proc = start_cli(model, big, "--workers", "2", env={**os.environ, "TMPDIR": str(temp)})
    helpers = children(proc.pid) + workers_of(proc.pid)
    for pid in workers_of(proc.pid):
        os.kill(pid, signum)
    proc.send_signal(signum)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err.decode()[-2000:]
    assert err.decode().strip().splitlines()[-1] == line
    assert out[-1:] in (b"", b"\n") and "Traceback" not in err.decode()  # (start_cli read two rows)
    assert not segments(proc.pid)
    deadline = time.monotonic() + 20
    while alive(helpers) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not alive(helpers), "a decode process outlived its caller"
    assert not os.listdir(temp), "multiprocessing's temporary folder (the forkserver's socket) was left behind"


def test_cli_sigterm_to_its_process_group_ends_the_run_as_terminated_not_as_workers_dead(model, big):
    """systemd stopping a service, or `timeout`, signals the whole process group: the forkserver
    died of it, and each worker, still running, then read as dead ('exit status 255'), exit 1."""
    proc = start_cli(model, big, "--workers", "2", group=True)
    os.killpg(proc.pid, signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err.decode()[-2000:]
    assert err.decode().strip().splitlines()[-1] == "terminated"


def test_a_program_s_own_forkserver_processes_can_still_be_terminated_after_a_run(model, mixed):
    """The forkserver is multiprocessing's one of the process, and it starts with SIGTERM
    blocked (see the test above): a program's own processes of it inherited the mask, so
    terminate() did nothing and `with Pool():` hung for ever."""
    code = textwrap.dedent(f"""
        import multiprocessing as mp, time
        from cnnx.runtime import Classifier
        if __name__ == "__main__":
            with Classifier({str(model)!r}, "cpu", workers=2, decode="processes") as clf:
                list(clf.classify([{str(mixed)!r}]))
            p = mp.get_context("forkserver").Process(target=time.sleep, args=(60,))
            p.start()
            time.sleep(0.3)
            p.terminate()
            p.join(10)
            print(p.exitcode)
    """)
    script = Path(mixed).parent / "own_forkserver.py"
    script.write_text(code)
    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert r.returncode == 0 and r.stdout.strip() == str(-signal.SIGTERM), (r.stdout, r.stderr[-2000:])


def test_decode_workers_started_under_a_stream_of_sigterms_to_them_all_live(model, mixed, tmp_path):
    """A SIGTERM to the process group reaches every worker as it starts: one that had unblocked it
    at its fork died in the milliseconds before it ignored it, and the run ended as a worker
    death ('could not start', 'ended before this run'), not as terminated. Here another process
    sends SIGTERM to each child of the forkserver, over and over, while runs start their pools."""
    sniper = tmp_path / "sniper.py"
    sniper.write_text(textwrap.dedent("""
        import os, signal, sys, time
        main, end, server = int(sys.argv[1]), time.time() + 60, None
        def kids(pid):
            try:
                with open(f"/proc/{pid}/task/{pid}/children") as f:
                    return [int(k) for k in f.read().split()]
            except OSError:
                return []
        while time.time() < end:
            if server is None:
                for k in kids(main):
                    try:
                        with open(f"/proc/{k}/cmdline", "rb") as f:
                            server = k if b"forkserver" in f.read() else server
                    except OSError:
                        pass
                continue
            for k in kids(server):
                try:
                    os.kill(k, signal.SIGTERM)
                except OSError:
                    pass
    """))
    code = textwrap.dedent(f"""
        import subprocess, sys, time
        from cnnx.runtime import Classifier
        from cnnx.runtime.workers import warm_up
        if __name__ == "__main__":
            warm_up()
            sniper = subprocess.Popen([sys.executable, {str(sniper)!r}, str(__import__("os").getpid())])
            time.sleep(0.3)
            try:
                for _ in range(4):
                    with Classifier({str(model)!r}, "cpu", workers=3, decode="processes") as clf:
                        list(clf.classify([{str(mixed)!r}]))
            finally:
                sniper.kill()
            print("ok")
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=240, cwd=ROOT)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-3000:]


def test_a_finished_run_leaves_no_temporary_folder(model, mixed, tmp_path):
    """The command ends with os._exit (cli.ExitNow), which skips atexit: multiprocessing's
    temporary folder, the forkserver's socket in it, was left in /tmp by every run."""
    temp = tmp_path / "temp"
    temp.mkdir()
    result = subprocess.run([sys.executable, "-m", "cnnx", "classify", str(mixed), "--model", str(model),
                             "--decode", "processes", "--workers", "2", "-o", str(tmp_path / "p.csv")],
                            capture_output=True, text=True, cwd=ROOT, env={**os.environ, "TMPDIR": str(temp)})
    assert result.returncode == 0, result.stderr
    assert "classified" in result.stderr
    assert not os.listdir(temp)


def test_a_run_killed_with_sigkill_leaves_no_temporary_folder(model, cifar_subset, tmp_path):
    """kill -9 (the OOM killer) skips the caller's own removal of multiprocessing's folder, the
    forkserver's socket in it: a /tmp/pymp-* was left by every such run. The forkserver, which
    ends with its caller, removes it."""
    temp = tmp_path / "temp"
    temp.mkdir()
    out = tmp_path / "p.csv"
    proc = subprocess.Popen([sys.executable, "-m", "cnnx", "classify", str(cifar_subset(100)), "--model", str(model),
                             "--decode", "processes", "--workers", "2", "--batch-size", "16", "-o", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT,
                            env={**os.environ, "TMPDIR": str(temp)})
    deadline = time.monotonic() + 120
    while not (out.exists() and out.stat().st_size > 0):
        assert proc.poll() is None and time.monotonic() < deadline, "the run ended before any row came"
        time.sleep(0.02)
    proc.kill()
    proc.wait()
    deadline = time.monotonic() + 30
    while os.listdir(temp) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not os.listdir(temp)


def test_temporary_folders_of_killed_runs_are_removed_by_the_next_run(model, cifar_subset, tmp_path):
    """A caller killed before its forkserver could remove the socket's folder (just after it
    started it), or with the forkserver (a kill of the whole group), left a /tmp/pymp-* for ever:
    the folder names its process now, and the next run removes those of processes gone."""
    from cnnx.runtime.workers import MP_TEMP_PREFIX

    temp = tmp_path / "temp"
    temp.mkdir()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    left = temp / f"{MP_TEMP_PREFIX}{int(dead.stdout)}-abcd1234"
    left.mkdir()
    (left / "listener-1").write_bytes(b"")
    for other in ("pymp-zzzz", "pymp-99999999"):  # multiprocessing's own names (no pid): not ours to judge
        (temp / other).mkdir()
    code = (f"import json, os\nfrom cnnx.runtime import Classifier\n"
            f"with Classifier({str(model)!r}, 'cpu', decode='processes', workers=2, batch_size=8) as c:\n"
            f"    rows = list(c.classify([{str(cifar_subset(2))!r}]))\n"
            f"    print(json.dumps([os.getpid(), sorted(os.listdir({str(temp)!r}))]))\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT,
                       env={**os.environ, "TMPDIR": str(temp)})
    assert r.returncode == 0, r.stderr[-2000:]
    pid, during = json.loads(r.stdout)
    own = [n for n in during if n.startswith(f"{MP_TEMP_PREFIX}{pid}-")]
    assert len(own) == 1 and sorted(during) == sorted(own + ["pymp-99999999", "pymp-zzzz"]), during
    assert sorted(os.listdir(temp)) == ["pymp-99999999", "pymp-zzzz"]  # its own removed at its exit


@pytest.mark.skipif(not os.path.isdir("/dev/shm"), reason="POSIX shared memory as files in /dev/shm")
def test_segments_of_processes_killed_with_their_resource_tracker_are_removed_by_the_next_run(model, mixed):
    """A SIGKILL to the whole process group (timeout -s KILL, a job's cancel, a cgroup's OOM kill)
    takes multiprocessing's resource tracker too: the segment stayed, memory kept until reboot.
    One a live process holds stays, also where its pid names no process here (a container)."""
    import fcntl

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    left = f"/dev/shm/{SHM_PREFIX}{int(dead.stdout)}-0000dead"
    held = f"/dev/shm/{SHM_PREFIX}{int(dead.stdout)}-0000held"
    for name in (left, held):
        with open(name, "wb") as f:
            f.write(bytes(4096))
    fd = os.open(held, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)  # as a run in another PID namespace holds its own
    try:
        rows_of(model, mixed, "processes", batch_size=8)
        assert not os.path.exists(left) and os.path.exists(held)
    finally:
        os.close(fd)
        for name in (left, held):
            if os.path.exists(name):
                os.unlink(name)


def test_cli_killed_leaves_no_segment_and_no_process(model, big):
    """SIGKILL of cnnx classify itself: multiprocessing's resource tracker unlinks the segment;
    the workers and the forkserver see their pipes close and exit."""
    proc = start_cli(model, big, "--workers", "2")
    helpers = children(proc.pid) + workers_of(proc.pid)
    proc.kill()
    proc.communicate(timeout=60)
    deadline = time.monotonic() + 20
    while (segments(proc.pid) or alive(helpers)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not segments(proc.pid)
    assert not alive(helpers), "a decode process outlived its killed caller"


def alive(pids) -> list:
    """pids still running (zombies and reused pids' other programs aside)."""
    out = []
    for p in pids:
        try:
            with open(f"/proc/{p}/stat") as f:
                if f.read().split()[2] != "Z":
                    out.append(p)
        except OSError:
            pass
    return out


def test_cli_finished_run_leaves_its_rows_and_no_segment_or_process(model, big):
    """A run that ends normally ends its process at once (cli.ExitNow: no interpreter teardown):
    its rows are all out, its segment unlinked, and its decode processes and their server see
    their pipes close and exit."""
    proc = start_cli(model, big, "--workers", "2")
    helpers = children(proc.pid) + workers_of(proc.pid)
    rest = proc.stdout.read()  # after the header and the row start_cli read (communicate would
    err = proc.stderr.read()   # skip what its buffer already holds)
    assert proc.wait(timeout=120) == 0, err.decode()
    assert 2 + len(rest.decode().splitlines()) == 1 + 3000
    assert err.decode().splitlines()[-1].startswith("classified 3,000 images")
    assert not segments(proc.pid)
    deadline = time.monotonic() + 20
    while alive(helpers) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not alive(helpers), "a decode process outlived its caller"


def test_cli_normal_run_leaves_no_segment(model, mixed, tmp_path):
    out = tmp_path / "out.csv"
    proc = subprocess.Popen([sys.executable, "-m", "cnnx", "classify", str(mixed), "--model", str(model),
                             "--device", "cpu", "-o", str(out), "--decode", "processes"],
                            stderr=subprocess.PIPE, text=True, cwd=ROOT)
    _out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert any(line.startswith("classified") for line in err.splitlines()), err
    assert not segments(proc.pid)


def test_a_failing_model_run_in_the_workers_is_one_line(tmp_path, cifar_subset):
    """An onnxruntime failure inside a worker reaches the caller as the one line the caller's
    own run would give (ModelError), and the segment goes."""
    from cnnx.runtime.model import ModelError
    from tests._runtime_util import tiny_onnx_model

    path = tiny_onnx_model(tmp_path / "m.onnx", batch_out="fails-when-lit")
    with Classifier(path, "cpu", decode="processes", batch_size=8, workers=2) as clf:
        with pytest.raises(ModelError, match=r"m\.onnx: onnxruntime failed on a batch of 8 on CPUExecutionProvider"):
            list(clf.classify([cifar_subset(2)]))
    assert not segments(os.getpid())


def test_a_model_replaced_before_the_workers_open_it_gives_the_rows_of_the_model_opened(tmp_path, cifar_subset):
    """The workers open the model again by its path: a new export moved into its place after
    the caller opened it gave the other model's rows under the caller's run record (the
    review's swaps: 17 of 25 runs); then every call stopped with ModelChanged, "run it again",
    however often a Classifier serving for days ran it. The caller runs its own model now."""
    path = tmp_path / "deploy" / "model.onnx"
    path.parent.mkdir()
    shutil.copyfile(exported_model(tmp_path, seed=0), path)
    images = cifar_subset(2)
    with Classifier(path, "cpu", decode="threads", batch_size=8) as reference:
        want = [(r.path, r.indices, r.scores) for r in reference.classify([images])]
    with Classifier(path, "cpu", decode="processes", batch_size=8, workers=2) as clf:
        shutil.copyfile(exported_model(tmp_path, seed=1), tmp_path / "new.onnx")
        os.replace(tmp_path / "new.onnx", path)  # a new export, published while this run starts
        for _ in range(2):
            got = [(r.path, r.indices, r.scores) for r in clf.classify([images])]
            assert [(p, i) for p, i, _s in got] == [(p, i) for p, i, _s in want]
            assert np.allclose([s for *_, s in got], [s for *_, s in want], atol=1e-5)
        assert clf.decode_pool is not None and clf.decode_pool.model_replaced
    assert not segments(os.getpid())


def test_a_model_moved_away_after_the_caller_opened_it_is_run_by_the_caller(tmp_path, cifar_subset):
    """The workers open the model again by its path: one moved or removed meanwhile (a deploy
    swapping folders) failed every call for ever, "onnxruntime failed ... model not found"."""
    from tests._runtime_util import tiny_onnx_model

    model = tiny_onnx_model(tmp_path / "m.onnx")
    with Classifier(model, "cpu", decode="processes", workers=2, batch_size=8) as clf:
        os.replace(model, tmp_path / "moved.onnx")
        for _ in range(2):
            assert sum(isinstance(r, Prediction) for r in clf.classify([cifar_subset(2)])) == 20
        assert clf.decode_pool.model_replaced


def test_a_fork_imports_nothing_in_the_child_and_the_forkserver_keeps_a_live_caller_s_folder(tmp_path, monkeypatch):
    """cnnx's at-fork hook imported multiprocessing.forkserver in every child (a hang where
    another thread held that import's lock at the fork); and the forkserver, ending on an error
    of its own, removed its live caller's temp folder: no server could start there again."""
    script = ("import os, sys\nimport cnnx.runtime.workers\nassert 'multiprocessing.forkserver' not in sys.modules\n"
              "pid = os.fork()\nif pid == 0:\n    os._exit(3 if 'multiprocessing.forkserver' in sys.modules else 0)\n"
              "print(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]))\n")
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert r.returncode == 0 and r.stdout == "0\n", r.stdout + r.stderr
    from multiprocessing import forkserver

    from cnnx.runtime import forkserver_preload

    folder = tmp_path / "pymp-x"
    folder.mkdir()
    (folder / "listener-y").write_bytes(b"")
    monkeypatch.setattr(forkserver._forkserver, "_forkserver_address", str(folder / "listener-y"))
    forkserver_preload._remove_socket_folder(os.getpid(), os.getppid())  # its caller alive: kept
    assert folder.is_dir()
    forkserver_preload._remove_socket_folder(os.getpid(), -1)  # its caller gone
    assert not folder.exists()


def test_a_process_forked_after_the_pool_started_classifies_in_threads(tmp_path, cifar_subset):
    """Its workers and their state came with the fork: the child's call failed in
    multiprocessing's own check (a bare AssertionError, 'can only test a child process'); a
    Classifier the child opened found its processes "could not start ... run again"; an
    IOBinding run waited for the parent's threads for ever, and so did close()."""
    model = exported_model(tmp_path)
    script = textwrap.dedent(f"""
        import os, sys
        from cnnx.runtime import Classifier
        clf = Classifier({str(model)!r}, "cpu", decode="processes", workers=2, batch_size=8)
        bound = Classifier({str(model)!r}, "cpu", decode="threads", io_binding=True, batch_size=8)
        want = [(r.path, r.indices) for r in clf.classify([{str(cifar_subset(2))!r}])]
        assert want == [(r.path, r.indices) for r in bound.classify([{str(cifar_subset(2))!r}])]
        pid = os.fork()
        if pid == 0:
            import faulthandler
            faulthandler.dump_traceback_later(60, exit=True)  # a hang is a failure, not the test's timeout
            try:
                got = [(r.path, r.indices) for r in clf.classify([{str(cifar_subset(2))!r}])]
                # the IOBinding runner's threads are the parent's: its run waited for them for ever
                assert got == [(r.path, r.indices) for r in bound.classify([{str(cifar_subset(2))!r}])]
                # a Classifier of its own starts its own decode processes ("could not start", every time)
                own = Classifier({str(model)!r}, "cpu", decode="processes", workers=2, batch_size=8)
                mine = [(r.path, r.indices) for r in own.classify([{str(cifar_subset(2))!r}])]
                ok = got == want == mine and clf.decode_pool is None and own.decode_pool is not None
                own.close()
                clf.close()  # onnxruntime's teardown of the parent's sessions waited for ever here
                bound.close()
                os._exit(0 if ok else 3)
            except BaseException as e:
                print(type(e).__name__, e, file=sys.stderr, flush=True)
                os._exit(4)
        _, status = os.waitpid(pid, 0)
        print("child", os.waitstatus_to_exitcode(status), "parent", len(list(clf.classify([{str(cifar_subset(2))!r}]))))
        clf.close()
        bound.close()
    """)
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert r.returncode == 0 and r.stdout.split() == ["child", "0", "parent", "20"], r.stdout + r.stderr[-2000:]


def test_cli_decode_option_gives_the_same_csv_threads_or_processes(model, mixed, tmp_path):
    """`cnnx classify --decode threads|processes` reaches the Classifier: same output, same errors file."""
    outs = {}
    for mode in ("threads", "processes"):
        out = tmp_path / f"{mode}.csv"
        r = subprocess.run([sys.executable, "-m", "cnnx", "classify", str(mixed), "--model", str(model), "-o",
                            str(out), "--decode", mode, "--workers", "2"], capture_output=True, text=True, cwd=ROOT)
        assert r.returncode == 0, r.stderr
        outs[mode] = (out.read_bytes(), (tmp_path / f"{mode}.errors.csv").read_bytes())  # names may not be UTF-8
    assert outs["threads"] == outs["processes"]
    r = subprocess.run([sys.executable, "-m", "cnnx", "classify", str(mixed), "--model", str(model), "--decode",
                        "forks"], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 2 and "--decode" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("size", [(32, 32), (224, 160)])
def test_the_metadata_peek_reads_what_onnxruntime_reads(tmp_path, size):
    """cnnx classify decides on decode processes from the file before onnxruntime loads."""
    import onnxruntime as ort

    from cnnx.runtime.contract import peek_metadata_props, peek_preprocess_size
    from tests._runtime_util import tiny_onnx_model

    path = tiny_onnx_model(tmp_path / "m.onnx", size=size)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert peek_metadata_props(path) == dict(session.get_modelmeta().custom_metadata_map)
    assert peek_preprocess_size(path) == size
    data = path.read_bytes()
    (tmp_path / "cut.onnx").write_bytes(data[:len(data) - 7])  # the metadata entry cut short
    (tmp_path / "text.onnx").write_text("not a model\n" * 100)
    os.mkfifo(tmp_path / "fifo.onnx")  # never opened for writing: a blocking read would hang
    import json

    import onnx

    from cnnx.runtime.contract import KEY_PREPROCESS

    proto = onnx.load(str(path))
    for prop in proto.metadata_props:  # a size of JSON's Infinity: int() raised OverflowError, a traceback
        if prop.key == KEY_PREPROCESS:
            spec = json.loads(prop.value)
            spec["size"][0] = float("inf")
            prop.value = json.dumps(spec)
    onnx.save(proto, str(tmp_path / "inf.onnx"))
    for bad in ("cut.onnx", "text.onnx", "missing.onnx", "fifo.onnx", ".", "inf.onnx"):
        assert peek_preprocess_size(tmp_path / bad) is None


def test_decode_processes_are_wanted_for_small_models_only(tmp_path):
    from cnnx.runtime.workers import decodes_in_processes, warm_up_for
    from tests._runtime_util import tiny_onnx_model

    small = tiny_onnx_model(tmp_path / "small.onnx", size=(32, 32))
    large = tiny_onnx_model(tmp_path / "large.onnx", size=(224, 224))
    assert decodes_in_processes("auto", (64, 64), 2) and not decodes_in_processes("auto", (65, 64), 2)
    assert not warm_up_for(large, decode="auto", workers=2)
    assert not warm_up_for(small, decode="threads", workers=2)
    assert not warm_up_for(small, decode="auto", workers=1)
    assert not warm_up_for(tmp_path / "missing.onnx", decode="processes", workers=2)
    assert warm_up_for(small, decode="auto", workers=2)


def test_cli_starts_the_decode_server_before_it_imports_numpy_or_onnxruntime(model, mixed, tmp_path):
    """The server's imports overlap this process's own (the first batch comes sooner)."""
    script = f"""
import sys
from cnnx.runtime import workers
real = workers.warm_up
def warm_up():
    print("numpy" in sys.modules, "onnxruntime" in sys.modules, flush=True)
    real()
workers.warm_up = warm_up
from cnnx.cli import main
main(["classify", {str(mixed)!r}, "--model", {str(model)!r}, "-o", {str(tmp_path / 'p.csv')!r}, "--workers", "2"])
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    # the command's early start; under auto the Classifier leaves it to the pool
    assert out.stdout.split("\n")[:2] == ["False False", ""]


def test_cli_on_a_few_files_starts_no_decode_server(model, cifar_subset, tmp_path):
    """Under --decode auto, paths that plainly hold at most PROCESS_DECODE_MIN_FILES files (a flat
    folder, single files) are decoded in threads and the server is never started; the rows are
    those of --decode processes."""
    flat = tmp_path / "flat"
    flat.mkdir()
    for src in sorted(cifar_subset(2).rglob("*.jpg")):
        shutil.copyfile(src, flat / f"{src.parent.name}-{src.name}")
    script = """
import sys
from cnnx.runtime import procdecode, workers
def refuse(*args, **kwargs):
    raise SystemExit("a decode process or its server was started")
workers.warm_up = refuse
procdecode.DecodePool = refuse
from cnnx.cli import main
main(sys.argv[1:])
"""
    outs = {}
    for mode in ("auto", "processes"):
        out = tmp_path / f"{mode}.csv"
        cmd = [sys.executable, "-c", script] if mode == "auto" else [sys.executable, "-m", "cnnx"]
        r = subprocess.run([*cmd, "classify", str(flat), str(flat / sorted(os.listdir(flat))[0]), "--model",
                            str(model), "-o", str(out), "--workers", "2", "--decode", mode],
                           capture_output=True, text=True, cwd=ROOT, timeout=120)
        assert r.returncode == 0, r.stderr
        outs[mode] = out.read_bytes()
    assert outs["auto"] == outs["processes"] and outs["auto"].count(b"\n") == 1 + 20  # the file beside its folder: once


def test_a_worker_runs_its_batch_in_slices_with_the_logits_of_one_run(model):
    """WORKER_RUN_ROWS: a worker's batch runs in slices (the activations of a slice stay in the
    caches); the logits come back in order, as one run of the whole batch gives them."""
    import numpy as np

    from cnnx.runtime.model import open_model
    from cnnx.runtime.procdecode import WORKER_RUN_ROWS, run_in_rows

    session, info, _ = open_model(model, "cpu", threads=1)
    h, w = info.spec["size"]
    for n in (1, WORKER_RUN_ROWS, 2 * WORKER_RUN_ROWS + 3):
        images = np.random.default_rng(n).integers(0, 256, (n, 3, h, w), dtype=np.uint8)
        whole = session.run([info.output_name], {info.input_name: images})[0]
        sliced = run_in_rows(session, info.input_name, info.output_name, images, WORKER_RUN_ROWS)
        assert sliced.shape == whole.shape
        np.testing.assert_allclose(sliced, whole, rtol=1e-5, atol=1e-5)
        assert (sliced.argmax(1) == whole.argmax(1)).all()


def test_a_worker_attaches_to_a_segment_without_telling_the_resource_tracker(monkeypatch):
    """The caller owns a batch segment and unlinks it; a worker that attached after the unlink
    (a run stopped early) left the name with the tracker, which warned at the program's exit
    that it had leaked ("resource_tracker: There appear to be 2 leaked shared_memory objects")."""
    from multiprocessing import resource_tracker, shared_memory

    from cnnx.runtime import procdecode

    told = []
    monkeypatch.setattr(resource_tracker, "register", lambda name, rtype: told.append(name))
    monkeypatch.setattr(resource_tracker, "unregister", lambda name, rtype: None)
    seg = shared_memory.SharedMemory(create=True, size=64)
    try:
        assert told == [seg._name]  # the owner's registration
        shm = procdecode._attach(seg.name)
        assert bytes(shm.buf[:4]) == bytes(seg.buf[:4]) and told == [seg._name]
        resource_tracker.register("after", "shared_memory")  # put back as it was
        assert told == [seg._name, "after"]
        shm.close()
    finally:
        seg.close()
        seg.unlink()
