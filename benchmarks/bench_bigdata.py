"""Data larger than memory (issue 10, goals 2 and 3), on folders made from the CIFAR-10 JPEGs.

beyond-memory (goal 2): a folder of CIFAR JPEGs upscaled to --side px whose decoded cache is
  >= 3x the memory the training process may use (a cgroup v1 memory limit,
  /sys/fs/cgroup/memory/<name>/memory.limit_in_bytes, set to --limit-mib), trained with
  `--cache disk` for one epoch inside that limit; the same run on a 10x smaller folder for
  comparison. Memory figure: the training process's peak anonymous RSS (RssAnon of
  /proc/<pid>/status, sampled every 20 ms; cache pages are page cache, not the process's;
  decode workers are separate processes, not counted). Goal <= 1.2x.
  Model: AirNet with widths 8/16/16 (an arch_kwargs of the zoo's airnet), so that an epoch
  over tens of thousands of 144 px images fits the benchmark's time on 2 shared cores: the
  figure is about the data path, not the model.
speed (goal 2): training img/s on the small folder (--images / 10) with the images in memory
  vs in the disk cache (in the page cache: written there by its build), same model, batch and
  augmentation. One process sets up both runs (cnnx.train.run.setup, as `fit` does) and trains
  their epochs alternately (train_epoch, as `fit` calls it): one warm-up epoch each, then
  --speed-rounds rounds of one epoch each, in ABBA order, so load from elsewhere on the
  machine falls on both. Figure: the median over rounds of disk/memory epoch img/s. Goal >= 0.9x.
decode (goal 3): photo-sized JPEGs (CIFAR upscaled to --photo-side px) decoded to 224 px:
  load_image alone in a pool of N processes taking tasks of 16 files as they finish (the ceiling:
  DCT-scaled decoding as in cnnx classify, results dropped) vs building the disk cache with N
  decode workers (listing, decoding, writing, syncing),
  --decode-rounds rounds in ABBA order; figure: the median over rounds of build/ceiling img/s.
  Goal >= 0.9x.
reader (no goal; why the disk cache is read with pread): ms per batch of 16 random rows of the
  small folder's cache, read through the memory map (page faults) vs with pread (what
  cnnx.train.cache.read_rows does), in a cgroup of --reader-limit-mib (smaller than the cache:
  rows come from disk and the kernel reclaims as it reads) and without a limit (the page cache
  holds it all). Each method in its own process, the file's pages dropped before each.

On a 2-core CPU shared with other engineers, under their common lock: medians of interleaved
rounds, not single runs.

Run:  flock /tmp/cnnx-cpu.lock python benchmarks/bench_bigdata.py [--cifar DIR] [--images 40000]
      [--limit-mib 768] [--side 144] [--parts beyond-memory,speed,decode,reader] [--work DIR]
(768 MiB: the process's own ~420 MiB of torch and libraries plus batch-16 activations at 144 px;
40,000 x 3 x 144 x 144 bytes = 2.49 GB of decoded cache, 3.1x that limit.) Parts can run one at
a time (each under the lock, so no one is held up for long): a part's result replaces that
part in benchmarks/results/bench_bigdata.json and keeps the others, each with the command and
commit that measured it. --work DIR keeps the made folders between such runs.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _results import RESULTS, provenance, write_result  # noqa: E402
from cifar_jpegs import cifar_folder  # noqa: E402

CGROUP = Path("/sys/fs/cgroup/memory")
TINY_AIRNET = {"widths": [8, 16, 16], "stem": 8}


def _upscale_one(job):
    src, dest, side = job
    from PIL import Image

    with Image.open(src) as im:
        im.convert("RGB").resize((side, side), Image.BILINEAR).save(dest, quality=90)


def make_folder(src: Path, dest: Path, n: int, side: int, workers: int) -> Path:
    """dest/<class>/*.jpg: the first n/10 CIFAR JPEGs of each class, upscaled to side x side.
    Made aside and renamed: a dest that exists is whole (and reused)."""
    if dest.is_dir():
        return dest
    tmp = dest.with_name(f".{dest.name}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    classes = sorted(p.name for p in src.iterdir() if p.is_dir())
    jobs = []
    for c in classes:
        (tmp / c).mkdir(parents=True, exist_ok=True)
        for f in sorted((src / c).iterdir())[:n // len(classes)]:
            jobs.append((str(f), str(tmp / c / f.name), side))
    with mp.Pool(workers) as pool:
        pool.map(_upscale_one, jobs, chunksize=64)
    os.rename(tmp, dest)
    return dest


# --- children: one training run (its peak anonymous memory sampled), the speed rounds, a reader ----

def _config(a, cache_mode: str, epochs: int):
    from cnnx.train.config import resolve_config

    return resolve_config("airnet", arch_kwargs=TINY_AIRNET, data=a.data, image_size=a.side, cache_dir=a.cache,
                          cache=cache_mode, epochs=epochs, batch_size=16, eval_batch_size=32, lr=0.2, threads=2,
                          workers=2, aug=("flip",), bf16=False, channels_last=False)


def child(a):
    """Runs inside the cgroup (the parent put this pid there before exec)."""
    from cnnx.train.run import fit, reserve_run_dir

    peak = {"anon": 0}
    done = threading.Event()

    def sample():
        while not done.is_set():
            with open("/proc/self/status") as f:
                for line in f:
                    if line.startswith("RssAnon:"):
                        peak["anon"] = max(peak["anon"], int(line.split()[1]) * 1024)
            done.wait(0.02)

    threading.Thread(target=sample, daemon=True).start()
    cfg = _config(a, a.cache_mode, a.epochs)
    run_dir = Path(a.out)
    with reserve_run_dir(run_dir, resume=False):
        t = time.perf_counter()
        summary = fit(cfg, run_dir, progress=False)
    done.set()
    history = json.loads(json.dumps(summary))
    print(json.dumps({"peak_anon_bytes": peak["anon"], "wall_seconds": time.perf_counter() - t,
                      "summary": history}), flush=True)


def speed_child(a):
    """The memory and the disk run set up side by side; their epochs alternate (module docstring)."""
    from cnnx.train import loop
    from cnnx.train.cache import Rows
    from cnnx.train.run import State, setup, train_epoch

    runs = {}
    for mode in ("memory", "disk"):
        (Path(a.out) / mode).mkdir(parents=True, exist_ok=True)
        runs[mode] = [setup(_config(a, mode, 1 + a.rounds), Path(a.out) / mode, loop.Dist(), "cpu", False), State(), 0]
    n = len(runs["memory"][0].ytr)
    assert n == len(runs["disk"][0].ytr) and isinstance(runs["disk"][0].xtr, Rows)

    def epoch(mode) -> float:
        run, state, k = runs[mode]
        _, seconds = train_epoch(run, state, k)
        runs[mode][2] += 1
        return n / seconds

    warm = {m: epoch(m) for m in ("memory", "disk")}
    rounds = []
    for r in range(a.rounds):
        order = ("memory", "disk") if r % 2 == 0 else ("disk", "memory")
        rounds.append({m: epoch(m) for m in order})
    print(json.dumps({"train_images": n, "warmup_img_per_s": warm, "rounds_img_per_s": rounds}), flush=True)


def reader_child(a):
    """ms per batch of 16 random rows of the cache folder a.data, read by a.cache_mode: "map"
    (through the memory map, as the reader did before) or "pread" (cnnx.train.cache.read_rows)."""
    import numpy as np

    from cnnx.train.cache import read_disk_cache, read_rows

    rows, _ = read_disk_cache(Path(a.data))
    base, file = rows.base, rows.file
    batch, n = 16, len(base)
    out = np.empty((batch, *base.shape[1:]), dtype=base.dtype)
    rng = np.random.default_rng(0)
    ms = []
    for _ in range(a.epochs):
        perm = rng.permutation(n)
        t = time.perf_counter()
        for i in range(0, n - batch + 1, batch):
            idx = perm[i:i + batch]
            if a.cache_mode == "map":
                for k in np.argsort(idx, kind="stable"):
                    out[k] = base[idx[k]]
            else:
                read_rows(base, file, idx, out)
        ms.append(1e3 * (time.perf_counter() - t) / (n // batch))
    status = {k: int(v.split()[0]) * 1024 for k, v in
              (line.split(":", 1) for line in open("/proc/self/status")) if k in ("RssAnon", "RssFile")}
    print(json.dumps({"ms_per_batch_by_epoch": ms, "rss_anon_bytes": status["RssAnon"],
                      "rss_file_bytes": status["RssFile"]}), flush=True)


def _child_process(cmd, limit_bytes=None):
    """subprocess.run(cmd) in a fresh memory cgroup of limit_bytes (when given); (process,
    the cgroup's max usage, its failcnt)."""
    group = None
    if limit_bytes:
        group = CGROUP / f"cnnx-bench-bigdata-{os.getpid()}"
        group.mkdir(exist_ok=True)
        (group / "memory.limit_in_bytes").write_text(str(limit_bytes))

    def enter():
        if group is not None:
            (group / "cgroup.procs").write_text(str(os.getpid()))

    try:
        p = subprocess.run([sys.executable, __file__, *map(str, cmd)], preexec_fn=enter, capture_output=True, text=True)
        max_usage = int((group / "memory.max_usage_in_bytes").read_text()) if group else None
        failcnt = int((group / "memory.failcnt").read_text()) if group else None
    finally:
        if group is not None:
            group.rmdir()
    if p.returncode != 0:
        raise SystemExit(f"child {cmd[0]} failed (exit {p.returncode}): {p.stderr.strip().splitlines()[-3:]}")
    return json.loads(p.stdout.strip().splitlines()[-1]), max_usage, failcnt


def run_child(data, cache, out, cache_mode, epochs, side, limit_bytes=None) -> dict:
    """A training child (in a fresh memory cgroup of limit_bytes when given); its JSON line and
    the epoch seconds from its metrics.csv."""
    import csv

    res, max_usage, failcnt = _child_process(["--child", "--data", data, "--cache", cache, "--out", out, "--cache-mode",
                                              cache_mode, "--epochs", epochs, "--side", side], limit_bytes)
    with open(Path(out) / "metrics.csv", newline="") as f:
        res["epoch_seconds"] = [float(r["seconds"]) for r in csv.DictReader(f)]
    res["train_images"] = json.loads((Path(out) / "config.json").read_text())["train_images"]
    res["cgroup_max_usage_bytes"], res["cgroup_failcnt"] = max_usage, failcnt
    return res


def cache_bytes(cache: Path) -> int:
    return sum(f.stat().st_size for f in cache.rglob("images.u8"))


# --- parts ---------------------------------------------------------------------------------------

def beyond_memory(a, src, work) -> dict:
    limit = a.limit_mib * 2**20
    big = make_folder(src, work / "big", a.images, a.side, 2)
    small = make_folder(src, work / "small", a.images // 10, a.side, 2)
    # Each child builds its cache: its pages are then charged to the child's cgroup (a cache built
    # outside it would sit in page cache charged elsewhere, and the limit would not bind on it).
    for name in ("run-small", "run-big", "cache-small", "cache-big"):
        shutil.rmtree(work / name, ignore_errors=True)
    r_small = run_child(small, work / "cache-small", work / "run-small", "disk", 1, a.side, limit)
    r_big = run_child(big, work / "cache-big", work / "run-big", "disk", 1, a.side, limit)
    decoded = cache_bytes(work / "cache-big")
    ratio = r_big["peak_anon_bytes"] / r_small["peak_anon_bytes"]
    ips = {k: r["train_images"] / r["epoch_seconds"][0] for k, r in (("big", r_big), ("small", r_small))}
    return {"images_big": a.images, "images_small": a.images // 10, "side": a.side, "memory_limit_bytes": limit,
            "decoded_cache_bytes_big": decoded, "cache_over_limit": round(decoded / limit, 2),
            "epoch_img_per_s_big": round(ips["big"], 1), "epoch_img_per_s_small": round(ips["small"], 1),
            "big": r_big, "small": r_small, "peak_anon_ratio_big_over_small": round(ratio, 3),
            "goal_peak_anon_ratio": 1.2, "goal_met": decoded >= 3 * limit and ratio <= 1.2}


def speed(a, src, work) -> dict:
    folder = make_folder(src, work / "small", a.images // 10, a.side, 2)
    shutil.rmtree(work / "run-speed", ignore_errors=True)
    res, _, _ = _child_process(["--child-speed", "--data", folder, "--cache", work / "cache-speed", "--out",
                                work / "run-speed", "--side", a.side, "--rounds", a.speed_rounds])
    rounds = res["rounds_img_per_s"]
    ratios = [r["disk"] / r["memory"] for r in rounds]
    ratio = statistics.median(ratios)
    return {"images": res["train_images"],
            "method": f"one process, memory and disk runs' epochs alternating: a warm-up epoch each, then {len(rounds)} "
                      "rounds of one epoch each in ABBA order; img/s and the ratio are medians over the rounds",
            "epoch2_img_per_s_memory": round(statistics.median(r["memory"] for r in rounds), 1),
            "epoch2_img_per_s_disk": round(statistics.median(r["disk"] for r in rounds), 1),
            "disk_over_memory": round(ratio, 3), "disk_over_memory_by_round": [round(x, 3) for x in ratios],
            "goal": 0.9, "goal_met": ratio >= 0.9, "child": res}


def reader(a, src, work) -> dict:
    from cnnx.runtime.preprocess import make_spec
    from cnnx.train.data import load_image_folder

    folder = make_folder(src, work / "small", a.images // 10, a.side, 2)
    load_image_folder(folder, make_spec(a.side, (0.5,) * 3, (0.5,) * 3), progress=False, cache=work / "cache-reader",
                      workers=2, cache_mode="disk")
    cache = next((work / "cache-reader" / "folders").glob("*.u8"))
    images = cache / "images.u8"
    limit = a.reader_limit_mib * 2**20
    out = {"images": int(json.loads((cache / "meta.json").read_text())["shape"][0]),
           "cache_bytes": images.stat().st_size, "memory_limit_bytes": limit, "batch": 16}
    for how, limit_bytes in (("limited", limit), ("unlimited", None)):
        for method in ("map", "pread"):
            fd = os.open(images, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)  # this file's pages only: start cold
            finally:
                os.close(fd)
            res, max_usage, failcnt = _child_process(["--child-reader", "--data", cache, "--cache-mode", method,
                                                      "--epochs", 2], limit_bytes)
            out[f"{how}_{method}"] = {**res, "cgroup_max_usage_bytes": max_usage, "cgroup_failcnt": failcnt}
        # the second epoch: under the limit the steady state, without it the page cache's
        out[f"{how}_map_over_pread"] = round(out[f"{how}_map"]["ms_per_batch_by_epoch"][-1]
                                             / out[f"{how}_pread"]["ms_per_batch_by_epoch"][-1], 2)
    return out


def _decode_files(args):
    paths, spec = args
    from cnnx.runtime.preprocess import load_image

    for p in paths:
        load_image(p, spec)
    return len(paths)


def decode(a, src, work) -> dict:
    from cnnx.runtime.preprocess import make_spec
    from cnnx.train.data import list_image_folder, load_image_folder

    folder = make_folder(src, work / "photos", a.photos, a.photo_side, 2)
    spec = make_spec(224, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    paths = [str(folder / f[0]) for f in list_image_folder(folder).files]
    n = a.decode_workers
    # Small tasks that the pool's processes take as they finish: when another program takes a core
    # for a while, a fixed half each would wait for the slower process and understate the ceiling.
    chunks = [(paths[i:i + 16], spec) for i in range(0, len(paths), 16)]
    _decode_files((paths[:50], spec))  # warm the file cache and the imports
    ctx = mp.get_context("fork")

    def ceiling() -> float:
        with ctx.Pool(n) as pool:
            t = time.perf_counter()
            pool.map(_decode_files, chunks, chunksize=1)
            return len(paths) / (time.perf_counter() - t)

    def build() -> float:
        shutil.rmtree(work / "cache-photos", ignore_errors=True)
        t = time.perf_counter()
        load_image_folder(folder, spec, progress=False, cache=work / "cache-photos", workers=n, cache_mode="disk")
        return len(paths) / (time.perf_counter() - t)

    rounds = []
    for r in range(a.decode_rounds):
        order = (ceiling, build) if r % 2 == 0 else (build, ceiling)
        rounds.append({f.__name__: f() for f in order})
    ratios = [r["build"] / r["ceiling"] for r in rounds]
    ratio = statistics.median(ratios)
    return {"images": len(paths), "source_side": a.photo_side, "decoded_side": 224, "processes": n,
            "method": f"{len(rounds)} rounds of (ceiling, build) in ABBA order; img/s and the ratio are medians over "
                      "the rounds",
            "decode_only_img_per_s": round(statistics.median(r["ceiling"] for r in rounds), 1),
            "cache_build_img_per_s": round(statistics.median(r["build"] for r in rounds), 1),
            "build_over_ceiling": round(ratio, 3), "build_over_ceiling_by_round": [round(x, 3) for x in ratios],
            "rounds_img_per_s": [{k: round(v, 1) for k, v in r.items()} for r in rounds],
            "goal": 0.9, "goal_met": ratio >= 0.9}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for flag in ("--child", "--child-speed", "--child-reader"):
        p.add_argument(flag, action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS), p.add_argument("--cache", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS), p.add_argument("--rounds", type=int, help=argparse.SUPPRESS)
    p.add_argument("--cache-mode", default="disk", help=argparse.SUPPRESS)
    p.add_argument("--epochs", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--cifar", help="CIFAR-10 JPEG folder DIR/<class>/*.jpg (see cifar_jpegs.py)")
    p.add_argument("--images", type=int, default=40000, help="images in the big folder (the small one: a tenth)")
    p.add_argument("--side", type=int, default=144, help="pixels: the folders' images and the model's input")
    p.add_argument("--limit-mib", type=int, default=768, help="memory cgroup limit of the training process")
    p.add_argument("--speed-rounds", type=int, default=3, help="rounds of one epoch per path (speed)")
    p.add_argument("--photos", type=int, default=2000)
    p.add_argument("--photo-side", type=int, default=512)
    p.add_argument("--decode-workers", type=int, default=2)
    p.add_argument("--decode-rounds", type=int, default=9)
    p.add_argument("--reader-limit-mib", type=int, default=384, help="memory cgroup limit of the reader part's child")
    p.add_argument("--parts", default="beyond-memory,speed,decode,reader",
                   help="comma-separated; each replaces its own entry in the results JSON")
    p.add_argument("--work", type=Path, help="folder for the made image folders and caches, kept (default: a temp "
                                             "folder, removed)")
    a = p.parse_args()
    for flag, fn in (("child", child), ("child_speed", speed_child), ("child_reader", reader_child)):
        if getattr(a, flag):
            return fn(a)
    parts = {"beyond-memory": beyond_memory, "speed": speed, "decode": decode, "reader": reader}
    names = a.parts.split(",")
    if unknown := [n for n in names if n not in parts]:
        p.error(f"unknown part(s) {', '.join(unknown)}; known: {', '.join(parts)}")
    src = cifar_folder(a.cifar)
    if a.work:
        a.work.mkdir(parents=True, exist_ok=True)
    work = a.work or Path(tempfile.mkdtemp(prefix="cnnx-bench-bigdata-", dir=os.environ.get("CNNX_BENCH_TMP", "/tmp")))
    path = RESULTS / "bench_bigdata.json"
    try:
        old = json.loads(path.read_text())
    except (OSError, ValueError):
        old = {}
    # A part not run now keeps its figures and the provenance of the run that measured them.
    payload = {name: old[name] for name in parts if name in old and name not in names}
    for name, part in old.items():
        if name in payload and "measured" not in part:
            payload[name] = {**part, "measured": {k: old.get(k) for k in ("command", "recorded_at", "git_commit")}}
    payload.update({"benchmark": "data larger than memory: disk cache, prefetching reader, decode into the cache",
                    "note": "on a 2-core CPU shared with other engineers (under their common lock): speed and decode "
                            "are medians of interleaved rounds; each part names the command and commit that "
                            "measured it"})
    try:
        for name in names:
            print(f"--- {name}", file=sys.stderr, flush=True)
            payload[name] = {**parts[name](a, src, work), "measured": provenance()}
            print(json.dumps({k: v for k, v in payload[name].items() if not isinstance(v, dict)}), file=sys.stderr,
                  flush=True)
    finally:
        if not a.work:
            shutil.rmtree(work, ignore_errors=True)
    done = [n for n in parts if n in payload]
    # The top-level command: each distinct command that measured a part here (write_result would name only this one).
    commands = list(dict.fromkeys(payload[n]["measured"]["command"] for n in done))
    write_result(path, {"command": " ; ".join(commands), **{k: payload[k] for k in ("benchmark", "note", *done)}})


if __name__ == "__main__":
    main()
