"""End-to-end `cnnx train` / `cnnx evaluate` on real CIFAR-10 JPEGs: the run directory, the
checkpoint contract, exact resume, and the 2-process gloo run."""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cnnx.runtime.preprocess import PREPROCESS_VERSION
from cnnx.train.checkpoint import load_checkpoint, model_from_checkpoint
from cnnx.train.data import validation_split
from cnnx.train.loop import evaluate
from cnnx.train.run import LOCK_NAME

from tests._train_util import copy_classes, run_cli, seed_args

ROOT = Path(__file__).resolve().parents[1]
METRIC_KEYS = ("lr", "train_loss", "train_top1", "train_top5", "val_loss", "val_top1", "val_top5")


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def trained(cifar_subset, tmp_path_factory):
    """One seed-cnn epoch on 2,000 real CIFAR-10 JPEGs (200 per class)."""
    data = cifar_subset(200)
    base = tmp_path_factory.mktemp("e2e")
    r = run_cli(seed_args(data, base / "runs", "e2e", base / "cache", "--epochs", "1", "--batch-size", "64"))
    assert r.exit_code == 0, r.stderr
    return data, base / "runs" / "e2e", r, base


def test_run_directory_and_checkpoint_contract(trained):
    data, run, r, _ = trained
    for name in ("best.pt", "last.pt", "metrics.csv", "per_class.csv", "config.json", "report.html"):
        assert (run / name).is_file(), name
    for png in ("top1", "loss", "top5", "per_class", "confusion"):
        assert (run / "plots" / f"{png}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [p for p in run.rglob(".tmp-*")]  # atomic writes leave no temp files behind
    assert r.stdout.startswith(str(run / "best.pt"))  # the result on stdout, talk on stderr
    assert "epoch 1/1" in r.stderr and "epoch 1/1" not in r.stdout
    assert re.search(r"epoch 1/1 .* top1 [0-9.]+ top5 [0-9.]+  lr", r.stderr), r.stderr  # 10 classes: top-5 says something

    raw = torch.load(run / "best.pt", map_location="cpu", weights_only=True)
    for key in ("format", "arch", "arch_kwargs", "num_classes", "class_names", "preprocess", "state_dict",
                "epoch", "metrics", "config"):
        assert key in raw, key
    assert raw["arch"] == "seed-cnn" and raw["num_classes"] == 10 and raw["preprocess"]["size"] == [32, 32]
    last = torch.load(run / "last.pt", map_location="cpu", weights_only=True)
    assert {"optimizer", "scheduler", "history", "best"} <= set(last) and not {"scaler", "rng"} & set(last)
    # report.html: the gallery is of the best epoch's validation images, with their files.
    assert last["best"]["val_probs"].shape == (200, 10)
    page = (run / "report.html").read_text()
    assert "data:image/" in page and str(data) in page

    rows = _rows(run / "metrics.csv")
    assert len(rows) == 1 and float(rows[0]["seconds"]) > 0
    per_class = _rows(run / "per_class.csv")
    assert len(per_class) == 20 and {p["split"] for p in per_class} == {"train", "val"}
    config = json.loads((run / "config.json").read_text())
    assert config["arch"] == "seed-cnn" and config["data"] == str(data) and config["val_images"] == 200
    # One epoch of a real CNN on real images learns something: clearly above 10% chance.
    assert float(rows[0]["val_top1"]) > 0.2


def test_best_checkpoint_reloads_and_reproduces_its_val_metrics(trained):
    _, run, _, _ = trained
    ckpt = load_checkpoint(run / "best.pt")
    model = model_from_checkpoint(ckpt)
    images, labels, names = validation_split(ckpt["config"])  # the exact held-out split of the run
    assert names == ckpt["class_names"] and len(labels) == 200 and torch.bincount(labels).tolist() == [20] * 10
    spec = ckpt["preprocess"]
    m = evaluate(model, images, labels, mean=spec["mean"], std=spec["std"], batch_size=128)
    assert m["top1"] == pytest.approx(ckpt["metrics"]["val_top1"], abs=1e-9)
    assert m["confusion"] == ckpt["metrics"]["val_confusion"]


def test_evaluate_command_prints_metrics_and_writes_confusion_png(trained, tmp_path):
    data, run, _, base = trained
    plot = tmp_path / "cm.png"
    r = run_cli(["evaluate", run / "best.pt", "--data", data, "--plot", plot, "--cache-dir", base / "cache",
                 "--workers", "1"])
    assert r.exit_code == 0, r.stderr
    lines = dict(line.split("\t") for line in r.stdout.strip().splitlines())
    assert lines["images"] == "2000" and 0.1 < float(lines["top1"]) <= 1 and float(lines["top5"]) >= float(lines["top1"])
    assert "top1[cat]" in lines and plot.read_bytes()[:4] == b"\x89PNG"
    some = tmp_path / "some"  # files evaluate passes over are counted, as train counts them
    shutil.copytree(data / "cat", some / "cat")
    (some / "cat" / "README.txt").write_text("photos of cats")
    (some / "cat" / ".hidden.jpg").write_bytes((some / "cat" / sorted(os.listdir(some / "cat"))[0]).read_bytes())
    r = run_cli(["evaluate", run / "best.pt", "--data", some, "--plot", plot, "--cache-dir", base / "cache"])
    assert r.exit_code == 0 and "ignored 2 file(s) that are hidden or not image names" in r.stderr, r.stderr
    r = run_cli(["evaluate", run / "best.pt", "--data", data, "--plot", plot, "--json", "--cache-dir",
                 base / "cache"])
    m = json.loads(r.stdout)
    assert m["n"] == 2000 and sum(map(sum, m["confusion"])) == 2000 and m["top1"] == pytest.approx(float(lines["top1"]), abs=1e-4)
    # the folder the run trained on: its figures include the training images, which was not said
    assert m["trained_on"] is True and "is the folder this model was trained on" in r.stderr
    # a folder larger than memory is read from a memory-mapped file, batch by batch: the same figures
    pages = {}
    for mode in ("memory", "disk"):
        r = run_cli(["evaluate", run / "best.pt", "--data", data, "--plot", plot, "--json", "--cache-dir",
                     base / "cache", "--cache", mode, "--report", tmp_path / f"{mode}.html"])
        assert r.exit_code == 0, r.stderr
        assert json.loads(r.stdout) == m
        page = (tmp_path / f"{mode}.html").read_text()
        pages[mode] = re.sub(r"written \S+ \S+ UTC", "", page)
    assert pages["disk"] == pages["memory"]  # the page's images too (read from the file: a traceback)


def test_resume_after_one_of_two_epochs_equals_two_straight_epochs(cifar_subset, tmp_path):
    data = cifar_subset(50)
    common = ["--epochs", "2", "--batch-size", "32", "--optimizer", "sgd", "--lr", "0.05"]
    r = run_cli(seed_args(data, tmp_path, "straight", tmp_path / "cache", *common))
    assert r.exit_code == 0, r.stderr
    r = run_cli(seed_args(data, tmp_path, "split", tmp_path / "cache", *common, "--stop-after", "1"))
    assert r.exit_code == 0, r.stderr
    assert "continue with --resume" in r.stderr and len(_rows(tmp_path / "split" / "metrics.csv")) == 1
    r = run_cli(["train", "--resume", tmp_path / "split", "--quiet"])
    assert r.exit_code == 0, r.stderr
    a, b = _rows(tmp_path / "straight" / "metrics.csv"), _rows(tmp_path / "split" / "metrics.csv")
    assert len(a) == len(b) == 2
    for ra, rb in zip(a, b):
        assert {k: ra[k] for k in METRIC_KEYS} == {k: rb[k] for k in METRIC_KEYS}
    wa = torch.load(tmp_path / "straight" / "last.pt", weights_only=True)["state_dict"]
    wb = torch.load(tmp_path / "split" / "last.pt", weights_only=True)["state_dict"]
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    # Killed between last.pt and best.pt of an epoch that improved: the best.pt left is an earlier
    # epoch's, and the resume rebuilds it from last.pt (not only a missing one).
    from cnnx.train.checkpoint import save_checkpoint
    from cnnx.train.run import LAST_ONLY, _restore_best

    last = torch.load(tmp_path / "split" / "last.pt", weights_only=True)
    last["best"] = {**last["best"], "epoch": last["epoch"]}  # (as when epoch 2 was the best)
    save_checkpoint({**{k: v for k, v in last.items() if k not in LAST_ONLY}, "epoch": 1}, tmp_path / "split" / "best.pt")
    _restore_best(tmp_path / "split", last)
    assert load_checkpoint(tmp_path / "split" / "best.pt")["epoch"] == 2
    # A finished run cannot be "resumed" without more epochs.
    r = run_cli(["train", "--resume", tmp_path / "split", "--quiet"])
    assert r.exit_code == 2 and "has trained 2 epochs, as many as --epochs 2 asks" in r.stderr
    # More epochs plan the schedule again (the lr rises from the first plan's end): said, with both rates;
    # another number of CPU threads sums otherwise (no longer bit-identical): said too.
    # So is a run begun by a cnnx that decoded some kinds of files otherwise (another preprocess version).
    threads = json.loads((tmp_path / "split" / "config.json").read_text())["threads_resolved"]
    last = torch.load(tmp_path / "split" / "last.pt", weights_only=True)
    last["config"]["preprocess_version"] = PREPROCESS_VERSION - 1
    torch.save(last, tmp_path / "split" / "last.pt")
    r = run_cli(["train", "--resume", tmp_path / "split", "--quiet", "--epochs", "3", "--threads", str(threads + 1)])
    assert r.exit_code == 0, r.stderr
    assert f"this run's images were decoded by preprocess version {PREPROCESS_VERSION - 1}, this cnnx's is " \
           f"{PREPROCESS_VERSION}" in r.stderr, r.stderr
    assert f"trained on {threads} CPU thread(s) a process and continues on {threads + 1}: its figures will not be " \
           f"bit-identical to an uninterrupted run's (--threads {threads} keeps them so)" in r.stderr, r.stderr
    said = [line for line in r.stderr.splitlines() if "planned again for --epochs 3 (was 2)" in line]
    assert len(said) == 1 and said[0].endswith("where the first plan gave 0"), r.stderr
    assert float(said[0].split("lr is ")[1].split()[0]) > 0
    assert len(_rows(tmp_path / "split" / "metrics.csv")) == 3


def _torchrun(args, processes: int = 2) -> tuple[int, str, str]:
    """`torchrun --standalone --nproc-per-node PROCESSES -m cnnx ARGS` on the CPU: (exit code, stdout, stderr)."""
    # faulthandler and C++ stacks: a rank that aborts (one SIGABRT of rank 1 was seen once) says where
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "PYTHONFAULTHANDLER": "1",
           "TORCH_SHOW_CPP_STACKTRACES": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(processes),
           "-m", "cnnx", *[str(a) for a in args]]
    # Own process group: on a timeout the workers die with the launcher instead of lingering.
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                         start_new_session=True)
    try:
        out, err = p.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        p.communicate()
        pytest.fail("the 2-process run did not finish in 240 s")
    return p.returncode, out, err


def test_resumes_under_torchrun_a_peer_that_stopped_another_number_of_processes_an_unstarted_run(cifar_subset,
                                                                                                    tmp_path):
    """A run of 1 process resumed on 2:
    - rank 0 stops with its own line (a metrics.csv it may not replace); rank 1, in a collective,
      printed gloo's traceback after it (now: rank 0 marks its failure in the process group's store);
    - the change of processes was silent, and the schedule stayed planned for the old steps an
      epoch (onecycle never reached 0; the other way its last steps ran at lr 0), the note
      blaming --epochs;
    - a run with only config.json gave rank 1 a TypeError traceback on --resume."""
    data = cifar_subset(6)  # 50 training images: 10 steps an epoch at batch 5; 12 of 2 images on each of 2 ranks
    r = run_cli(seed_args(data, tmp_path / "runs", "r", tmp_path / "cache", "--epochs", "3", "--stop-after", "1",
                          "--batch-size", "5", "--device", "cpu"))
    assert r.exit_code == 0, r.stderr
    run = tmp_path / "runs" / "r"
    (run / "metrics.csv").unlink()
    (run / "metrics.csv").mkdir()
    code, _out, err = _torchrun(["train", "--resume", run, "--quiet"])
    assert code != 0
    assert err.count("this run began on 1 process(es) and continues on 2") == 1
    said = [line for line in err.splitlines() if "schedule is planned again" in line]
    assert len(said) == 1 and "planned again for 2 process(es): 34 steps (first 30)" in said[0], err[-3000:]
    lines = err.splitlines()
    assert any(line.startswith("Error: exists and is not a regular file") for line in lines), err[-3000:]
    # rank 1 says its line, unless torchrun's SIGTERM (sent once rank 0 has ended) comes first
    stopped = "Error: process 0 of the run stopped with an error (its own line says which); process 1 stopped with it"
    assert stopped in lines or "SIGTERM" in err, err[-3000:]
    assert str(ROOT / "cnnx") not in err, err[-3000:]  # no traceback through cnnx's code (torchrun prints its own)
    (run / "metrics.csv").rmdir()  # last.pt of epoch 2 was written before it: the run goes on from there
    code, _out, err = _torchrun(["train", "--resume", run, "--quiet"])
    assert code == 0, err[-3000:]
    last = torch.load(run / "last.pt", weights_only=True)
    assert last["scheduler"]["step"] == last["scheduler"]["total_steps"] == 34  # the schedule ended with the run
    assert len(_rows(run / "metrics.csv")) == 3
    # Only config.json: stopped before its first epoch ended; every rank trains it from epoch 1.
    for name in os.listdir(run):
        if name != "config.json":
            shutil.rmtree(run / name) if (run / name).is_dir() else (run / name).unlink()
    code, _out, err = _torchrun(["train", "--resume", run, "--quiet", "--epochs", "1"])
    assert code == 0 and "Traceback" not in err, err[-3000:]
    assert err.count("training it again from epoch 1") == 1 and len(_rows(run / "metrics.csv")) == 1


def test_processes_that_find_other_data_or_too_few_images_stop_with_one_line(cifar_subset, tmp_path):
    """Each rank lists --data itself: a rank that found other data than rank 0 went on (a
    traceback inside DDP, or its own split under rank 0's config.json). Fewer training images
    than processes was "training diverged". A usage error was printed by every rank."""
    script = tmp_path / "ranks.py"
    script.write_text(
        "import os, torch.distributed as dist\n"
        "from cnnx.train import loop, run\n"
        "from cnnx.train.data import DataError\n"
        "dist.init_process_group('gloo'); d = loop.dist_from_env()\n"
        "for extra in (0, 2):\n"
        "    config = {'class_names': ['a', 'b'], 'train_images': 10 + d.rank * extra,\n"
        "              'val_images': 4, 'test_images': 0, 'val_files_sha256': 'x',\n"
        "              'val_relpaths_sha256': 'v', 'train_relpaths_sha256': 'y'}\n"
        "    try:\n"  # one write a line: the two ranks share the pipe
        "        run.check_ranks_see_same_data(config, d, 'D'); os.write(1, f'same {d.rank}\\n'.encode())\n"
        "    except DataError as e:\n"
        "        os.write(1, f'rank {d.rank}: {e}\\n'.encode())\n"
        "dist.destroy_process_group()\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                        str(script)], capture_output=True, text=True, env=env, timeout=120)
    assert p.returncode == 0 and sorted(p.stdout.splitlines()) == [
        f"rank {r}: process 1 of 2 found other data in D than process 0 (training images: 10 on process 0, 12 here): "
        f"every process must see the same files" for r in (0, 1)] + ["same 0", "same 1"], p.stderr[-2000:]
    few = tmp_path / "few"
    for split, n in (("train", 1), ("val", 1)):
        copy_classes(cifar_subset(2), few / split, ["cat", "dog"], n)
    code, _out, err = _torchrun(seed_args(few, tmp_path / "runs", "few", tmp_path / "cache", "--epochs", "1",
                                          "--device", "cpu"), processes=3)
    assert code != 0 and err.count("Error: 2 training image(s) for 3 processes: each needs at least one") == 1, \
        err[-3000:]  # said by rank 0 (every rank said it)
    code, _out, err = _torchrun(seed_args(few, tmp_path / "runs", "few2", tmp_path / "cache", "--patience", "-1"))
    assert code != 0 and err.count("Usage:") == 1 and err.count("--patience") >= 1, err[-3000:]


def test_two_process_gloo_run_only_rank0_writes(cifar_subset, tmp_path):
    data = cifar_subset(50)
    code, out, err = _torchrun(seed_args(data, tmp_path / "runs", "ddp", tmp_path / "cache", "--epochs", "1",
                                         "--batch-size", "64", "--device", "cpu"))
    assert code == 0, err[-3000:]
    assert "cpu x2" in err  # both processes joined one process group
    assert out.count("best val top-1") == 1  # one rank reports
    assert err.count("epoch 1/1 ") == 1
    run = tmp_path / "runs" / "ddp"
    assert sorted(f.name for f in run.iterdir()) == [LOCK_NAME, "best.pt", "config.json", "last.pt", "metrics.csv",
                                                     "per_class.csv", "plots", "report.html"]
    # The gallery holds every validation image: rank 1's shard was gathered to rank 0.
    probs = torch.load(run / "last.pt", weights_only=True)["best"]["val_probs"]
    assert probs.shape == (50, 10) and torch.allclose(probs.sum(1), torch.ones(50))
    ckpt = load_checkpoint(run / "best.pt")
    assert ckpt["config"]["world_size"] == 2 and len(_rows(run / "metrics.csv")) == 1


def test_validation_under_torchrun_is_of_the_model_best_pt_saves(cifar_train_dir, tmp_path):
    """Each rank scored its validation shard with its own batch-norm statistics (DDP sends rank
    0's at a training forward's start only), while best.pt keeps rank 0's: metrics.csv and
    best.pt's figures were of no saved model (0.4200 vs 0.4250 evaluated), the best epoch chosen on them."""
    data = tmp_path / "d"
    classes = ["airplane", "cat", "dog", "ship"]
    copy_classes(cifar_train_dir, data / "train", classes, 100)
    src = tmp_path / "src"
    copy_classes(cifar_train_dir, src, classes, 150)
    for c in classes:  # val/: 50 other images a class
        (data / "val" / c).mkdir(parents=True)
        for f in sorted((src / c).iterdir())[100:]:
            shutil.copyfile(f, data / "val" / c / f.name)
    code, _out, err = _torchrun(["train", "--data", data, "--arch", "seed-vgg", "--epochs", "3", "--batch-size", "40",
                                 "--out", tmp_path / "runs", "--name", "r", "--cache-dir", tmp_path / "c", "--quiet"])
    assert code == 0, err[-3000:]
    best = load_checkpoint(tmp_path / "runs" / "r" / "best.pt")
    r = run_cli(["evaluate", tmp_path / "runs" / "r" / "best.pt", "--data", data, "--split", "val", "--json",
                 "--cache-dir", tmp_path / "c"])
    assert r.exit_code == 0, r.stderr[-2000:]
    got = json.loads(r.stdout)
    assert got["top1"] == pytest.approx(best["metrics"]["val_top1"], abs=1e-9), (got, best["metrics"])
    assert got["loss"] == pytest.approx(best["metrics"]["val_loss"], rel=1e-4), (got, best["metrics"])


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_a_rank_killed_mid_run_is_one_line_on_its_peer(sig, cifar_subset, tmp_path):
    """Rank 1 killed (SIGKILL: the OOM killer; SIGTERM to it alone: a scheduler) during an epoch:
    rank 0 printed gloo's traceback ("Connection reset by peer") as if the failure were its
    own, or "process 1 stopped (its error is above)" where nothing was above."""
    import time

    data = cifar_subset(20, classes=("cat", "dog", "ship"))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "cnnx",
           "train", "--data", str(data), "--arch", "seed-cnn", "--epochs", "200", "--batch-size", "4",
           "--out", str(tmp_path / "runs"), "--name", "r", "--cache-dir", str(tmp_path / "c"), "--quiet"]
    agent = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not (tmp_path / "runs" / "r" / "last.pt").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.5)  # into the next epoch
        ranks = subprocess.run(["pgrep", "-P", str(agent.pid)], capture_output=True, text=True).stdout.split()
        assert len(ranks) == 2, ranks
        os.kill(int(sorted(ranks, key=int)[1]), sig)
        _out, err = agent.communicate(timeout=120)
    finally:
        if agent.poll() is None:
            os.killpg(agent.pid, signal.SIGKILL)
    assert agent.returncode != 0
    assert "[rank0]: Traceback" not in err and "its error is above" not in err, err[-3000:]
    how = "ended without a word (killed? out of memory?)" if sig == signal.SIGKILL else "was terminated (SIGTERM)"
    line = f"Error: process 1 of the run {how}; process 0 stopped with it"
    # unless torchrun's own SIGTERM to rank 0 (sent once rank 1 has ended) comes first
    assert line in err.splitlines() or "terminated" in err.splitlines(), err[-3000:]


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _by_hand(rank: int, port: int, args, world: int = 2) -> subprocess.Popen:
    env = {**os.environ, "WORLD_SIZE": str(world), "RANK": str(rank), "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(port)}
    for name in ("TORCHELASTIC_RUN_ID", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        env.pop(name, None)
    return subprocess.Popen([sys.executable, "-m", "cnnx", *map(str, args)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def _waiting_by_hand(ranks, port: int, args, world: int) -> list:
    """Processes `ranks` of a launch by hand, each past its "waiting for" line and into the wait."""
    import time

    procs = [_by_hand(rank, port, args, world=world) for rank in ranks]
    try:
        for p in procs:
            assert p.stderr.readline().startswith(f"waiting for the run's {world} processes")
    except BaseException:
        for p in procs:
            os.killpg(p.pid, signal.SIGKILL)
        raise
    time.sleep(2.0)  # into the wait
    return procs


def test_a_launch_by_hand_says_what_it_waits_for_and_trains_once_all_come(cifar_subset, tmp_path):
    """WORLD_SIZE and RANK set by hand, the other process not started: it waited (30 minutes,
    torch's default) without a line. The rendezvous is cnnx's own (Ctrl-C and SIGTERM must
    reach it): a run started by hand, process 1 first, trains as under torchrun."""
    port = _free_port()
    args = seed_args(cifar_subset(20), tmp_path / "runs", "r", tmp_path / "c", "--epochs", "1", "--batch-size", "32")
    late = None
    first = _by_hand(1, port, args)
    try:
        line = first.stderr.readline()
        assert line == (f"waiting for the run's 2 processes at 127.0.0.1:{port} (this is process 1; torchrun "
                        "starts them together)\n"), line
        late = _by_hand(0, port, args)
        out0, err0 = late.communicate(timeout=180)
        out1, err1 = first.communicate(timeout=60)
    finally:
        for p in (first, late):
            if p is not None and p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
    assert late.returncode == 0 and first.returncode == 0, (err0[-2000:], err1[-2000:])
    assert "cpu x2" in err0 and out0.count("best val top-1") == 1 and not out1, (out0, out1)
    assert load_checkpoint(tmp_path / "runs" / "r" / "best.pt")["config"]["world_size"] == 2


@pytest.mark.parametrize("rank,sig,code,said", [(0, signal.SIGINT, 130, "interrupted"),
                                               (1, signal.SIGTERM, 143, None)])
def test_a_launch_by_hand_waiting_for_its_peer_ends_on_ctrl_c_or_sigterm(rank, sig, code, said, cifar_subset,
                                                                          tmp_path):
    """Process 0 (serving the rendezvous) alone, or process 1 at a port where something that is
    not a store accepts and never answers: torch's waits held off Python's signal handlers, for
    30 minutes and for ever; only SIGKILL ended them. (Processes other than 0 say nothing of
    an interruption: under torchrun, Ctrl-C reaches them all.)"""
    import socket
    import threading
    import time

    mute = socket.socket()
    mute.bind(("127.0.0.1", 0))
    mute.listen(8)
    port = mute.getsockname()[1] if rank == 1 else _free_port()
    taken = []
    if rank == 1:
        threading.Thread(target=lambda: taken.extend(mute.accept() for _ in range(4)), daemon=True).start()
    p = _by_hand(rank, port, seed_args(cifar_subset(2), tmp_path / "runs", "r", tmp_path / "c"))
    try:
        assert p.stderr.readline().startswith("waiting for the run's 2 processes")
        time.sleep(1.0)  # into the wait
        os.kill(p.pid, sig)
        _out, err = p.communicate(timeout=20)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
        mute.close()
    assert p.returncode == code, err[-2000:]
    assert [l for l in err.splitlines() if l][-1:] == ([said] if said else []) and "Traceback" not in err, err[-2000:]
    assert not (tmp_path / "runs" / "r").exists()  # no run folder left without a checkpoint


def test_a_launch_by_hand_whose_process_0_is_interrupted_ends_its_waiting_peer_with_one_line(cifar_subset, tmp_path):
    """Processes 0 and 1 of 3 there, 2 never started, Ctrl-C to 0: 1 printed the store's
    "Failed to recv" traceback."""
    port, args = _free_port(), seed_args(cifar_subset(2), tmp_path / "runs", "r", tmp_path / "c")
    procs = _waiting_by_hand((0, 1), port, args, world=3)
    try:
        procs[0].send_signal(signal.SIGINT)
        errs = [p.communicate(timeout=30)[1] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
    assert [p.returncode for p in procs] == [130, 1], errs
    assert "Traceback" not in errs[1] and errs[1].strip().splitlines() == [
        "Error: process 0 of the run ended before all 3 processes came; process 1 stopped with it"], errs[1]


def test_a_launch_by_hand_whose_process_killed_after_it_came_ends_the_others_with_one_line(cifar_subset, tmp_path):
    """Processes 0 and 1 of 3 there, 1 killed (SIGKILL) in the wait, then 2 started: 0 and 2
    counted 1 as come and waited in gloo's C++ rendezvous for it, Ctrl-C held off, 30 minutes,
    then a traceback. (Interrupted instead, 1 takes back its key: the others wait on for it.)"""
    port, args = _free_port(), seed_args(cifar_subset(2), tmp_path / "runs", "r", tmp_path / "c")
    procs = _waiting_by_hand((0, 1), port, args, world=3)
    try:
        procs[1].kill()
        procs[1].wait()
        procs.append(_by_hand(2, port, args, world=3))
        errs = {r: procs[r].communicate(timeout=60)[1] for r in (0, 2)}
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
    for r in (0, 2):
        assert procs[r].returncode == 1 and errs[r].strip().splitlines()[-1] == (
            f"Error: process 1 of the run ended without a word after it came (killed?); process {r} stopped "
            "with it"), errs[r][-2000:]


def test_a_launch_by_hand_with_a_port_out_of_range_is_one_line(cifar_subset, tmp_path):
    r = subprocess.run([sys.executable, "-m", "cnnx", *map(str, seed_args(cifar_subset(2), tmp_path / "runs", "r",
                                                                             tmp_path / "c"))],
                       env={**{k: v for k, v in os.environ.items() if k != "TORCHELASTIC_RUN_ID"}, "WORLD_SIZE": "2",
                            "RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "99999"},
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and r.stderr.strip().splitlines() == [
        "Error: a launch with WORLD_SIZE and RANK set needs MASTER_ADDR and a MASTER_PORT of 1 to 65535 (now "
        "127.0.0.1:99999); torchrun sets all four"], r.stderr[-2000:]
