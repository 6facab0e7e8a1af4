"""Benchmark `cnnx classify` on 2 CPU cores against the issue's CPU bound, and the settings that lower it.

Goal (issue 8, goal 2), all measured in the same run, on the 50,000 CIFAR-10 training JPEGs:
  bound_s = onnxruntime-only wall time on ready uint8 batches, at cnnx classify's default batch
            size, the fastest of: the session Classifier(model, "cpu") opens from one caller or
            from one caller per decode worker, and the one-thread session each decode process
            opens (procdecode) from one caller per worker, each batch run whole or, as the
            decode processes run it, WORKER_RUN_ROWS images at a time
          + single-core decode seconds of load_image over the 50,000 files / cores
            (bound_default_session_s: the first two ways only, the bound as first defined;
            bound_whole_batch_runs_s: every way but the last, the bound before WORKER_RUN_ROWS)
  ratio   = bound_s / cnnx classify's wall time, >= 0.95. Two ratios: the whole process
            (`python -m cnnx classify ...`, launch to exit, imports included) and the time its
            summary line states (from the command's start, imports excluded).
Rounds are interleaved (ORT-only, decode, classify) and the best (shortest) of each is kept: the
machine is shared and interference only adds time. Per-round figures are recorded too.
Goal 3: peak memory (VmHWM) classifying 50,000 vs 5,000 files within 10%.
"tuning": the session options, batch sizes and the thread split between decoders and
onnxruntime that pick cnnx's defaults (ORT-only and in-process pipeline figures).
"tuning_processes" (--part processes): decode threads vs processes (procdecode), and where
onnxruntime runs beside the processes (the caller, or each process on one thread).
"baselines" (information, the old goal): a per-image and a batched PIL -> numpy ->
session.run loop, same model and files; "photos" the same on 2-12 MP photo-like JPEGs.

Run it alone on the machine, in parts of a few minutes each (each part merges its keys into the
JSON; the goals are judged on what the JSON holds):
    flock /tmp/cnnx-cpu.lock python benchmarks/bench_classify.py --part bound
    flock /tmp/cnnx-cpu.lock python benchmarks/bench_classify.py --part tuning
    flock /tmp/cnnx-cpu.lock python benchmarks/bench_classify.py --part processes
    flock /tmp/cnnx-cpu.lock python benchmarks/bench_classify.py --part memory
    flock /tmp/cnnx-cpu.lock python benchmarks/bench_classify.py --part baselines
    flock /tmp/cnnx-cpu.lock python benchmarks/bench_classify.py --part accounting
"accounting": where a whole process's time beyond the bound goes, in core-seconds, each round
with its own bound: CPU of the cnnx process, of the processes it started, and idle cores.
--cifar: a CIFAR-10 JPEG folder (default $CNNX_CIFAR_DIR or /tmp/cifar10/train; cifar_jpegs.py).
Writes benchmarks/results/bench_classify.json. Needs the [train] extra only to build the
default model (a seeded, untrained seed-cnn exported with cnnx.export); pass --model to skip.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
CACHE = Path(os.environ.get("CNNX_BENCH_CACHE", "/tmp/cnnx-bench"))

sys.path.insert(0, str(HERE))

from _results import RESULTS, compile_bytecode, write_result  # noqa: E402
from cifar_jpegs import cifar_folder  # noqa: E402


def log(msg):
    print(msg, file=sys.stderr, flush=True)


# --- inputs -----------------------------------------------------------------------------------

def linked_subset(src: Path, per_class: int) -> Path:
    """DIR/<class>/ with hard links to the first per_class files of each class of src."""
    dest = CACHE / f"cifar-{per_class}-per-class"
    if dest.is_dir():
        return dest
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    for cls in sorted(os.listdir(src)):
        (tmp / cls).mkdir(parents=True)
        for name in sorted(os.listdir(src / cls))[:per_class]:
            try:
                os.link(src / cls / name, tmp / cls / name)
            except OSError:
                shutil.copyfile(src / cls / name, tmp / cls / name)
    os.replace(tmp, dest)
    return dest


def photo(h: int, w: int, seed: int) -> np.ndarray:
    from PIL import Image

    rng = np.random.default_rng(seed)
    low = Image.fromarray(rng.integers(0, 256, (max(2, h // 64), max(2, w // 64), 3), dtype=np.uint8))
    img = low.resize((w, h), Image.Resampling.BICUBIC)  # soft shapes and gradients
    mid = Image.fromarray(rng.integers(0, 256, (max(2, h // 8), max(2, w // 8), 3), dtype=np.uint8))
    img = Image.blend(img, mid.resize((w, h), Image.Resampling.BILINEAR), 0.3)  # detail
    tile = rng.normal(0, 7, (512, 512, 3)).astype(np.int16)  # sensor-like grain
    grain = np.tile(tile, (-(-h // 512), -(-w // 512), 1))[:h, :w]
    return np.clip(np.asarray(img, np.int16) + grain, 0, 255).astype(np.uint8)


def photos_dir(n: int) -> Path:
    """n JPEGs of 2-12 MP (mixed aspect ratios, some portrait), made once and cached."""
    from PIL import Image

    dest = CACHE / f"photos-{n}"
    if dest.is_dir() and len(os.listdir(dest)) == n:
        return dest
    dest.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    aspects = [(4, 3), (3, 2), (16, 9), (1, 1)]
    t0 = time.perf_counter()
    for i in range(n):
        mp = rng.uniform(2.0, 12.0)
        a, b = aspects[i % len(aspects)]
        w = int(round((mp * 1e6 * a / b) ** 0.5))
        h = int(round(w * b / a))
        if i % 3 == 2:
            w, h = h, w
        Image.fromarray(photo(h, w, i)).save(dest / f"photo_{i:04d}.jpg", quality=90)
        if i % 20 == 19:
            log(f"  made {i + 1}/{n} photos ({time.perf_counter() - t0:.0f} s)")
    return dest


def list_images(folder: Path):
    return sorted(str(p) for p in folder.rglob("*.jpg"))


def build_model() -> Path:
    out = CACHE / "model-seed-cnn" / "export" / "model.onnx"
    if out.exists():
        return out
    import torch

    from cnnx.export.api import export_checkpoint
    from cnnx.runtime.preprocess import make_spec
    from cnnx.train.checkpoint import build_checkpoint, save_checkpoint
    from cnnx.train.zoo import CIFAR_MEAN, CIFAR_STD, create_model

    torch.manual_seed(0)
    classes = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    ckpt = build_checkpoint(model=create_model("seed-cnn", 10), arch="seed-cnn", arch_kwargs={}, class_names=classes,
                            preprocess=make_spec(32, CIFAR_MEAN, CIFAR_STD), epoch=0, metrics={}, config={})
    save_checkpoint(ckpt, out.parent.parent / "best.pt")
    shutil.rmtree(out.parent, ignore_errors=True)
    export_checkpoint(out.parent.parent / "best.pt", out.parent, formats=("onnx",), parity_images=8)
    return out


# --- baselines --------------------------------------------------------------------------------

def baseline_preprocess(path: str, h: int, w: int) -> np.ndarray:
    from PIL import Image

    img = Image.open(path).convert("RGB")
    iw, ih = img.size
    scale = max(h / ih, w / iw)
    cw, ch = min(w / scale, iw), min(h / scale, ih)
    box = (max((iw - cw) / 2, 0), max((ih - ch) / 2, 0), (iw + cw) / 2, (ih + ch) / 2)
    img = img.resize((w, h), Image.Resampling.BILINEAR, box=box)
    return np.asarray(img).transpose(2, 0, 1)


def baseline(model: Path, files, batch_size: int):
    import onnxruntime as ort

    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    meta = session.get_modelmeta().custom_metadata_map
    h, w = json.loads(meta["cnnx.preprocess"])["size"]
    labels = []
    t0 = time.perf_counter()
    for start in range(0, len(files), batch_size):
        batch = np.stack([baseline_preprocess(f, h, w) for f in files[start:start + batch_size]])
        labels += session.run(None, {"images": batch})[0].argmax(1).tolist()
    names = json.loads(meta["cnnx.class_names"])
    return time.perf_counter() - t0, [names[i] for i in labels]


# --- cnnx classify ----------------------------------------------------------------------------

def _hwm_mib(pid: int):
    """Peak resident set (VmHWM) of a live process, MiB; None once it has exited."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def process_tree(pid: int) -> list:
    """(pid, depth) of the process and its live descendants: the command at 0, multiprocessing's
    forkserver and resource tracker at 1, the decode processes (forks of the forkserver) at 2."""
    out, todo = [], [(pid, 0)]
    while todo:
        p, depth = todo.pop()
        out.append((p, depth))
        try:
            with open(f"/proc/{p}/task/{p}/children") as f:
                todo += [(int(k), depth + 1) for k in f.read().split()]
        except OSError:
            pass
    return out


def classify_command(model: Path, folder: Path, out: Path, extra=(), launch=("-m", "cnnx")) -> list:
    """The `cnnx classify` command line the benchmark runs (top-1, to `out`), with `out` and its
    errors file removed first."""
    for f in (out, out.with_name(out.stem + ".errors.csv")):
        if f.exists():
            f.unlink()
    return [sys.executable, *launch, "classify", str(folder), "--model", str(model), "-o", str(out),
            "--topk", "1", *extra]


def run_classify(model: Path, folder: Path, *extra, out: Path, launch=("-m", "cnnx"), peak: bool = True,
                 cwd: Path = ROOT, env: dict | None = None):
    """Run the CLI; -> (wall s, peak RSS MiB, summary line, labels by path). peak=False: no
    memory polling (None for the peak), for a timing that nothing else shares the cores with:
    the polling reads /proc for every process of the tree 100 times a second. cwd, env: of the
    process (another version's tree: _results.tree_env, and that tree as cwd).

    Peak memory is the sum of the high-water marks (VmHWM, read every 10 ms until it exits; it
    only grows, so the last reading is the peak up to the final 10 ms) of the process and of
    every process under it (decode processes, multiprocessing's forkserver and resource
    tracker): an upper bound, the shared batch slots counted in each process that maps them.
    Not getrusage: on Linux a child's ru_maxrss includes the parent's RSS at fork/exec time."""
    cmd = classify_command(model, folder, out, extra, launch)
    t0 = time.perf_counter()
    err_file = CACHE / "classify.stderr"
    with open(err_file, "w") as err:
        proc = subprocess.Popen(cmd, stderr=err, cwd=cwd, env=env)
        peaks = {}  # pid -> its VmHWM, MiB
        while peak and proc.poll() is None:
            for pid, _depth in process_tree(proc.pid):
                hwm = _hwm_mib(pid)
                if hwm:
                    peaks[pid] = max(peaks.get(pid, 0.0), hwm)
            time.sleep(0.01)
        proc.wait()
        peak = sum(peaks.values()) if peak else None
    wall = time.perf_counter() - t0
    stderr = err_file.read_text()
    if proc.returncode != 0:
        raise SystemExit(f"cnnx classify failed ({proc.returncode}): {stderr}")
    summary = [line for line in stderr.splitlines() if line.startswith("classified")][-1]
    import csv

    with open(out, newline="") as f:
        labels = {row["path"]: row["label"] for row in csv.DictReader(f)}
    return wall, peak, summary, labels


def first_batch_latency(model: Path, folder: Path) -> float:
    """Seconds from launching `cnnx classify ... -o -` to its first prediction row on stdout."""
    cmd = [sys.executable, "-m", "cnnx", "classify", str(folder), "--model", str(model), "--device", "cpu"]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, cwd=ROOT)
    proc.stdout.readline()  # header
    proc.stdout.readline()  # first row: written when the first batch is done
    latency = time.perf_counter() - t0
    proc.kill()
    proc.wait()
    return latency


def decode_scaling(files, spec, threads_list=(1, 2)):
    """Decode-only images/s of cnnx's load_image with 1 and 2 threads: do the decoders release
    the GIL enough for threads (no pickling, one process) instead of worker processes?"""
    from concurrent.futures import ThreadPoolExecutor

    from cnnx.runtime.preprocess import load_image

    out = {}
    for n in threads_list:
        with ThreadPoolExecutor(n) as pool:
            t0 = time.perf_counter()
            list(pool.map(lambda f: load_image(f, spec), files, chunksize=64))
            out[f"{n}_threads_images_per_s"] = round(len(files) / (time.perf_counter() - t0), 1)
    return out


def compare(model, files, folder, batch_size, tag, rounds: int):
    """Per-image baseline once; then the batched baseline and cnnx classify interleaved for
    `rounds` rounds, keeping the best (shortest) time of each: the machine is shared, and
    interference only ever adds time, so best-of-N compares the two at their undisturbed speed."""
    n = len(files)
    log(f"[{tag}] per-image baseline on {n} files ...")
    t_single, labels_single = baseline(model, files, 1)
    batched_s, ours_s = [], []
    for r in range(rounds):
        log(f"[{tag}] round {r + 1}/{rounds}: batched baseline, cnnx classify ...")
        t_batched, labels_batched = baseline(model, files, batch_size)
        wall, rss, summary, ours = run_classify(model, folder, "--device", "cpu", "--batch-size", str(batch_size),
                                                out=CACHE / f"out-{tag}.csv")
        batched_s.append(round(t_batched, 3))
        ours_s.append(round(wall, 3))
    t_batched, wall = min(batched_s), min(ours_s)
    assert len(ours) == n, (len(ours), n)
    agree = sum(ours[f] == label for f, label in zip(files, labels_batched)) / n
    r = {
        "files": n,
        "per_image_baseline_images_per_s": round(n / t_single, 1),
        "batched_baseline_images_per_s": round(n / t_batched, 1),
        "cnnx_classify_images_per_s": round(n / wall, 1),
        "batched_baseline_rounds_s": batched_s,
        "cnnx_classify_rounds_s": ours_s,
        "cnnx_classify_peak_rss_mib": round(rss, 1),
        "cnnx_classify_summary": summary,
        "speedup_vs_per_image": round(t_single / wall, 2),
        "speedup_vs_batched": round(t_batched / wall, 2),
        "top1_agreement_with_batched_baseline": round(agree, 4),
        "baselines_agree": labels_single == labels_batched,
    }
    log(json.dumps(r, indent=1))
    return r


# --- the CPU bound (goal 2) -------------------------------------------------------------------

def cli_default_batch_size() -> int:
    """`cnnx classify`'s --batch-size default, read from the command itself."""
    from cnnx.runtime.command import classify

    return next(p.default for p in classify.params if p.name == "batch_size")


def ort_only_s(session, n: int, batch_size: int, h: int, w: int, callers: int, rows: int | None = None) -> float:
    """Wall seconds of session.run over n images in ready uint8 batches of batch_size (the last
    one padded, as cnnx runs it), from `callers` threads at once (1: this thread only); rows:
    each batch run that many images at a time (procdecode.run_in_rows), else whole."""
    from concurrent.futures import ThreadPoolExecutor

    from cnnx.runtime.procdecode import run_in_rows

    x = np.random.default_rng(0).integers(0, 256, (batch_size, 3, h, w), dtype=np.uint8)
    name, out = session.get_inputs()[0].name, session.get_outputs()[0].name

    def run(_=None):
        return run_in_rows(session, name, out, x, rows or batch_size)

    run()  # first-run allocations are start-up, not throughput
    batches = -(-n // batch_size)
    t0 = time.perf_counter()
    if callers == 1:
        for _ in range(batches):
            run()
    else:
        with ThreadPoolExecutor(callers) as pool:
            list(pool.map(run, range(batches)))
    return time.perf_counter() - t0


def decode_one_core_s(files, spec) -> float:
    """Seconds of load_image over every file, one after the other in this one thread."""
    from cnnx.runtime.preprocess import load_image

    t0 = time.perf_counter()
    for f in files:
        load_image(f, spec)
    return time.perf_counter() - t0


def startup_floor_s(model: Path) -> float:
    """Wall seconds of the least a process that runs this model must do: start Python, import
    numpy and onnxruntime, open the model (with numpy's BLAS threads off, as cnnx classify
    runs). The bound leaves this out; a whole `cnnx classify` process cannot."""
    code = ("import numpy, onnxruntime as ort; "
            f"ort.InferenceSession({str(model)!r}, providers=['CPUExecutionProvider'])")
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "OPENBLAS_NUM_THREADS": "1"})
    return time.perf_counter() - t0


def command_work_one_core_s(folder: Path, class_names, batch_size: int, topk: int = 1) -> float:
    """One-core seconds of the per-file work that any classify process does besides decoding
    and running the model, for every file of `folder`: walking it (Discovery, by the list, as
    classify takes it) and turning each batch's logits into rows (softmax_topk, then
    PredictionWriter.write_batch, top-k CSV to a file). On busy cores it adds to the wall."""
    import tempfile

    from cnnx.runtime.discover import Discovery
    from cnnx.runtime.model import softmax_topk
    from cnnx.runtime.output import PredictionWriter

    logits = np.random.default_rng(0).standard_normal((batch_size, len(class_names))).astype(np.float32)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.process_time()
        paths = [item.path for run in Discovery([folder]).runs() for item in run]
        writer = PredictionWriter(os.path.join(tmp, "p.csv"), "csv", class_names, topk)
        for i in range(0, len(paths), batch_size):
            chunk = paths[i:i + batch_size]
            idx, p = softmax_topk(logits[:len(chunk)], topk)
            writer.write_batch(chunk, idx, p)
        writer.close()
        return time.process_time() - t0


def reference_rows(fmt: str, class_names, paths, indices, scores) -> str:
    """A batch's rows as the standard library writes them, a row at a time: csv.writer
    (QUOTE_ALL, the formula escape) or json.dumps of each row's record. PredictionWriter
    formats whole batches itself and must write these same bytes."""
    import csv
    import io

    from cnnx.runtime.output import escape_cell

    buf = io.StringIO(newline="")
    if fmt == "csv":
        w = csv.writer(buf, quoting=csv.QUOTE_ALL, lineterminator="\n")
        for path, idx, sc in zip(paths, indices.tolist(), scores.tolist()):
            row = [escape_cell(path)]
            for j, s in zip(idx, sc):
                row += (escape_cell(class_names[j]), f"{s:.6f}")
            w.writerow(row)
    else:
        for path, idx, sc in zip(paths, indices.tolist(), scores.tolist()):
            buf.write(json.dumps({"path": path, "label": class_names[idx[0]], "score": round(sc[0], 6),
                                  "topk": [{"label": class_names[j], "score": round(s, 6)} for j, s in zip(idx, sc)]})
                      + "\n")
    return buf.getvalue()


def measure_writers(cifar: Path, rounds: int, batch_size: int) -> dict:
    """One-core microseconds a row of PredictionWriter.write_batch (the command's row loop,
    which on a GPU machine bounds the rate with the rest of the command's per-file work),
    CSV and JSONL, top-1 and top-5, against reference_rows writing the same rows to a file,
    over every CIFAR path with softmax_topk of seeded random logits; the bytes must match.
    Interleaved rounds, medians."""
    import tempfile

    from cnnx.runtime.discover import Discovery
    from cnnx.runtime.model import softmax_topk
    from cnnx.runtime.output import PredictionWriter, csv_header

    paths = [item.path for run in Discovery([cifar]).runs() for item in run]
    names = sorted(p.name for p in cifar.iterdir() if p.is_dir())
    logits = (3 * np.random.default_rng(0).standard_normal((len(paths), len(names)))).astype(np.float32)
    out = {}
    for fmt, k in (("csv", 1), ("csv", 5), ("jsonl", 1), ("jsonl", 5)):
        batches = [(paths[i:i + batch_size], *softmax_topk(logits[i:i + batch_size], k))
                   for i in range(0, len(paths), batch_size)]
        times = {"cnnx": [], "reference": []}
        with tempfile.TemporaryDirectory() as tmp:
            for _ in range(rounds):
                mine, ref = os.path.join(tmp, f"cnnx.{fmt}"), os.path.join(tmp, f"ref.{fmt}")
                for f in (mine, ref):
                    if os.path.exists(f):
                        os.remove(f)
                t0 = time.process_time()
                writer = PredictionWriter(mine, fmt, names, k)
                for batch in batches:
                    writer.write_batch(*batch)
                writer.close()
                times["cnnx"].append(time.process_time() - t0)
                t0 = time.process_time()
                with open(ref, "x", encoding="utf-8", errors="surrogateescape", newline="") as f:
                    if fmt == "csv":
                        f.write(",".join(f'"{h}"' for h in csv_header(k)) + "\n")
                    for batch in batches:
                        f.write(reference_rows(fmt, names, *batch))
                        f.flush()
                times["reference"].append(time.process_time() - t0)
                with open(mine, "rb") as a, open(ref, "rb") as b:
                    assert a.read() == b.read(), f"{fmt} top-{k}: PredictionWriter's bytes differ from the reference"
        cnnx, ref = (float(np.median(times[key])) * 1e6 / len(paths) for key in ("cnnx", "reference"))
        out[f"{fmt}_top{k}"] = {"cnnx_us_per_row": round(cnnx, 3), "reference_us_per_row": round(ref, 3),
                                "speedup": round(ref / cnnx, 2)}
        log(f"[writers] {fmt} top-{k}: {json.dumps(out[f'{fmt}_top{k}'])}")
    return {"rows": len(paths), "batch_size": batch_size, "rounds": rounds, "same_bytes": True, **out}


def interleave_extra_core_s(session, info, files, batch_size: int, rows: int) -> dict:
    """What a decode process pays for decoding a batch and then running the model on it, batch
    after batch, over doing each for all the files apart: one-core CPU seconds of
    decode_into + run_in_rows per batch (as procdecode's workers do) minus decode_into over all
    then run_in_rows over all, on the same files and the same 4 batch buffers, the two ways
    alternated twice (medians). Both ways write every pixel and run every batch. Each way's
    decodes and runs are also timed on their own (thread CPU time): the model's runs after a
    decode against back to back (run_extra_share), and the decodes after a run (decode_extra_share)."""
    from cnnx.runtime.pipeline import decode_into
    from cnnx.runtime.preprocess import DEFAULT_MAX_PIXELS
    from cnnx.runtime.procdecode import run_in_rows

    spec = info.spec
    slots = np.zeros((4, batch_size, 3, *spec["size"]), np.uint8)
    batches = [(files[i:i + batch_size], slots[k % 4]) for k, i in enumerate(range(0, len(files), batch_size))]
    spent = {"decode": 0.0, "run": 0.0}

    def decode(paths, out):
        t0 = time.thread_time()
        decode_into(paths, spec, DEFAULT_MAX_PIXELS, out)
        spent["decode"] += time.thread_time() - t0

    def run(_paths, images):
        t0 = time.thread_time()
        run_in_rows(session, info.input_name, info.output_name, images, rows)
        spent["run"] += time.thread_time() - t0

    def apart():
        for batch in batches:
            decode(*batch)
        for batch in batches:
            run(*batch)

    def interleaved():
        for batch in batches:
            decode(*batch)
            run(*batch)

    def timed(way):
        spent.update(decode=0.0, run=0.0)
        t0 = time.process_time()
        way()
        return {"all": time.process_time() - t0, **spent}

    run(*batches[0])
    ways = {"apart": [], "interleaved": []}
    for _ in range(2):
        ways["apart"].append(timed(apart))
        ways["interleaved"].append(timed(interleaved))
    a, b = ({part: float(np.median([x[part] for x in ways[way]])) for part in ("all", "decode", "run")}
            for way in ("apart", "interleaved"))
    return {"files": len(files), "apart_core_s": round(a["all"], 3), "interleaved_core_s": round(b["all"], 3),
            "extra_core_s": round(b["all"] - a["all"], 3), "extra_share": round(b["all"] / a["all"] - 1, 4),
            "run_apart_core_s": round(a["run"], 3), "run_interleaved_core_s": round(b["run"], 3),
            "run_extra_share": round(b["run"] / a["run"] - 1, 4),
            "decode_apart_core_s": round(a["decode"], 3), "decode_interleaved_core_s": round(b["decode"], 3),
            "decode_extra_share": round(b["decode"] / a["decode"] - 1, 4)}


def cores() -> int:
    return len(os.sched_getaffinity(0))


def summary_seconds(summary: str) -> float:
    """The seconds the summary line states ("...; 5.94 s; ...")."""
    return float(next(part[:-2] for part in summary.split("; ") if part.endswith(" s") and " " not in part[:-2]))


def measure_bound(model: Path, cifar: Path, rounds: int, batch_size: int | None) -> dict:
    """Goal 2: rounds of (ORT-only both ways, single-core decode, cnnx classify as a process),
    interleaved; the best of each kept. ORT-only runs on the session cnnx classify opens by
    default (Classifier(model, "cpu")), at its default batch size (or batch_size, which is
    then passed to cnnx classify as --batch-size)."""
    from cnnx.runtime.api import Classifier

    files = list_images(cifar)
    n = len(files)
    extra = ["--batch-size", str(batch_size)] if batch_size else []
    batch_size = batch_size or cli_default_batch_size()
    from cnnx.runtime.model import open_model
    from cnnx.runtime.procdecode import WORKER_RUN_ROWS

    with Classifier(model, "cpu", batch_size=batch_size, decode="threads") as clf:
        session, spec, workers = clf.session, clf.info.spec, clf.config.resolved_workers()
        decode_in_processes = clf.config.__class__(workers=clf.config.workers).decodes_in_processes(spec)
        worker_session = open_model(model, "cpu", threads=1)[0]
        h, w = spec["size"]
        per_round = []
        for r in range(rounds):
            log(f"[bound] round {r + 1}/{rounds}: ORT-only, decode, cnnx classify ...")
            one = ort_only_s(session, n, batch_size, h, w, 1)
            many = ort_only_s(session, n, batch_size, h, w, workers)
            split = ort_only_s(worker_session, n, batch_size, h, w, workers)
            sliced = ort_only_s(worker_session, n, batch_size, h, w, workers, WORKER_RUN_ROWS)
            decode = decode_one_core_s(files, spec)
            floor = startup_floor_s(model)
            wall, _rss, summary, labels = run_classify(model, cifar, "--device", "cpu", *extra,
                                                       out=CACHE / "out-bound.csv", peak=False)
            assert len(labels) == n, (len(labels), n)
            threads_wall, _rss, _summary, threads_labels = run_classify(
                model, cifar, "--device", "cpu", "--decode", "threads", *extra, out=CACHE / "out-bound-threads.csv",
                peak=False)
            assert threads_labels == labels
            # As this part timed it before (with the memory polling of run_classify), for comparison.
            polled_wall = run_classify(model, cifar, "--device", "cpu", *extra, out=CACHE / "out-bound.csv")[0]
            per_round.append({"ort_only_1_caller_s": round(one, 3), f"ort_only_{workers}_callers_s": round(many, 3),
                              f"ort_only_1_thread_sessions_{workers}_callers_s": round(split, 3),
                              f"ort_only_1_thread_sessions_{workers}_callers_{WORKER_RUN_ROWS}_rows_s": round(sliced, 3),
                              "decode_one_core_s": round(decode, 3), "startup_floor_s": round(floor, 3),
                              "classify_process_s": round(wall, 3),
                              "classify_summary_s": summary_seconds(summary), "summary": summary,
                              "classify_decode_threads_process_s": round(threads_wall, 3),
                              "classify_process_memory_polled_s": round(polled_wall, 3)})
            log(json.dumps(per_round[-1]))
    best = {key: min(r[key] for r in per_round) for key in per_round[0] if key != "summary"}
    ways = {"1 caller": best["ort_only_1_caller_s"], f"{workers} callers": best[f"ort_only_{workers}_callers_s"],
            f"1-thread session, {workers} callers, whole batches":
                best[f"ort_only_1_thread_sessions_{workers}_callers_s"]}
    whole_batch_ort_s = min(ways.values())
    ways[f"1-thread session, {workers} callers, {WORKER_RUN_ROWS} images a run (as the decode processes run it)"] = \
        best[f"ort_only_1_thread_sessions_{workers}_callers_{WORKER_RUN_ROWS}_rows_s"]
    how, ort_s = min(ways.items(), key=lambda kv: kv[1])
    default_ort_s = min(best["ort_only_1_caller_s"], best[f"ort_only_{workers}_callers_s"])
    bound = ort_s + best["decode_one_core_s"] / cores()
    best_default_bound = default_ort_s + best["decode_one_core_s"] / cores()
    # Each round's own ratio (its bound, the fastest way to run onnxruntime, over its classify):
    # on a host whose speed drifts, the best-of-each above may pair parts from different moments.
    per_round = [dict(r, ratio_same_round=round(
        (min(r["ort_only_1_caller_s"], r[f"ort_only_{workers}_callers_s"],
             r[f"ort_only_1_thread_sessions_{workers}_callers_s"],
             r[f"ort_only_1_thread_sessions_{workers}_callers_{WORKER_RUN_ROWS}_rows_s"])
         + r["decode_one_core_s"] / cores()) / r["classify_process_s"], 3)) for r in per_round]
    same_round = sorted(r["ratio_same_round"] for r in per_round)
    return {
        "files": n, "batch_size": batch_size, "decode_workers": workers, "cores": cores(),
        "session": session_settings(session),
        "ort_only_s": round(ort_s, 3),
        "ort_only_how": how,
        "decode_one_core_s": best["decode_one_core_s"],
        "bound_s": round(bound, 3),
        # The bound as first defined (the caller's default session only), for comparison.
        "bound_default_session_s": round(best_default_bound, 3),
        # Before the decode processes ran their batches WORKER_RUN_ROWS images at a time.
        "bound_whole_batch_runs_s": round(whole_batch_ort_s + best["decode_one_core_s"] / cores(), 3),
        "ratio_process_whole_batch_runs_bound": round(
            (whole_batch_ort_s + best["decode_one_core_s"] / cores()) / best["classify_process_s"], 3),
        "decode": "processes" if decode_in_processes else "threads",
        "classify_process_s": best["classify_process_s"],
        "classify_summary_s": best["classify_summary_s"],
        "ratio_process": round(bound / best["classify_process_s"], 3),
        "ratio_summary": round(bound / best["classify_summary_s"], 3),
        "classify_images_per_s": round(n / best["classify_process_s"], 1),
        "ratio_same_round_median": same_round[len(same_round) // 2],
        "ratio_same_round_best": same_round[-1],
        # What no whole process can avoid (Python, numpy, onnxruntime, the model), added to the
        # bound: the most a process-wall ratio can reach on this many files.
        "startup_floor_s": best["startup_floor_s"],
        "bound_with_startup_floor_s": round(bound + best["startup_floor_s"], 3),
        "ratio_process_vs_bound_with_startup_floor": round((bound + best["startup_floor_s"])
                                                           / best["classify_process_s"], 3),
        "ratio_reachable_by_a_process": round(bound / (bound + best["startup_floor_s"]), 3),
        "ratio_process_default_session_bound": round(best_default_bound / best["classify_process_s"], 3),
        # the same whole process with decode threads (the pipeline before), in the same rounds
        "classify_decode_threads_process_s": best["classify_decode_threads_process_s"],
        # the same process timed while run_classify polled its memory, as this part timed it
        # before: the polling takes CPU from the process it measures
        "classify_process_memory_polled_s": best["classify_process_memory_polled_s"],
        "ratio_process_memory_polled": round(bound / best["classify_process_memory_polled_s"], 3),
        "ratio_process_decode_threads": round(bound / best["classify_decode_threads_process_s"], 3),
        "rounds": per_round,
    }


PR_SET_CHILD_SUBREAPER = 36  # prctl(2): orphans of our children are re-parented to us


def classify_cpu_accounting(model: Path, folder: Path, *extra) -> dict:
    """One `cnnx classify` process, timed, with the CPU seconds of every process it made:
    this process becomes a child subreaper (Linux), so the forkserver, the resource tracker
    and any decode process still alive when cnnx exits are re-parented here and reaped with
    os.wait4, whose rusage counts a process and the children it reaped itself (the forkserver
    reaps the decode processes). -> wall s, main_cpu_s (the cnnx process), others_cpu_s
    (forkserver + decode processes + resource tracker), total_cpu_s."""
    import ctypes

    if ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        raise SystemExit("prctl(PR_SET_CHILD_SUBREAPER) failed: --part accounting needs Linux")
    cmd = classify_command(model, folder, CACHE / "out-accounting.csv", extra)
    ours = _children()  # this process's own (a forkserver of its own, ...): never waited for here
    t0 = time.perf_counter()
    with open(CACHE / "classify.stderr", "w") as err:
        proc = subprocess.Popen(cmd, stderr=err, cwd=ROOT)
        _pid, status, main_ru = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here: Popen must not wait again
    others = 0.0
    while orphans := _children() - ours:  # they end once their pipes to cnnx close
        for pid in orphans:
            _pid, _status, ru = os.wait4(pid, 0)
            others += ru.ru_utime + ru.ru_stime
    if proc.returncode != 0:
        raise SystemExit(f"cnnx classify failed ({proc.returncode}): {(CACHE / 'classify.stderr').read_text()}")
    main = main_ru.ru_utime + main_ru.ru_stime
    return {"wall_s": round(wall, 3), "main_cpu_s": round(main, 3), "others_cpu_s": round(others, 3),
            "total_cpu_s": round(main + others, 3)}


def _children() -> set:
    """Pids of this process's live children (every thread's), from /proc."""
    out = set()
    for tid in os.listdir(f"/proc/{os.getpid()}/task"):
        try:
            with open(f"/proc/{os.getpid()}/task/{tid}/children") as f:
                out.update(int(p) for p in f.read().split())
        except OSError:
            pass
    return out


def measure_accounting(model: Path, cifar: Path, rounds: int) -> dict:
    """Where the wall time beyond the bound goes (goal 2), in core-seconds, each round on its
    own: the bound's work is cores x bound_s (onnxruntime as the decode processes run it, 2
    callers, + load_image's one-core seconds), measured in the same round as one cnnx classify
    whose every process's CPU is counted (classify_cpu_accounting). Then
      cores x wall = bound work + extra CPU (CPU beyond the bound's work: the cnnx process
                     itself, the forkserver, what the decode processes do besides decoding
                     and running the model) + idle (core-seconds no process of the run used),
    and 1 - ratio = (extra CPU + idle) / (cores x wall). (classify_cpu_by_process.py splits the
    CPU further, the forkserver apart from the decode processes, by polling /proc, for two
    versions side by side; this counts it exactly, against the bound.)

    Each round also measures what any whole process must add to the bound, and from it the
    most a process can reach:
      reachable_s = bound_s + startup_floor_s (start Python, import numpy and onnxruntime,
                    open the model, exit) + command_work_core_s / cores (walk the folder and
                    write a row a file: command_work_one_core_s; the cores are busy, so its
                    CPU adds to the wall), ratio_reachable = bound_s / reachable_s;
    and, beside it, the cost of decoding and running a batch in turn on one core
    (interleave_extra_core_s, on a quarter of the files, scaled to all of them), which the bound
    measures apart: reachable_interleaved_s adds it / cores."""
    from cnnx.runtime.model import open_model
    from cnnx.runtime.pipeline import PipelineConfig
    from cnnx.runtime.procdecode import WORKER_RUN_ROWS

    files = list_images(cifar)
    n, batch_size = len(files), cli_default_batch_size()
    session, info, _ = open_model(model, "cpu", threads=1)
    spec, workers = info.spec, PipelineConfig().resolved_workers()
    h, w = spec["size"]
    k = cores()
    per_round = []
    for r in range(rounds):
        log(f"[accounting] round {r + 1}/{rounds}")
        ort = ort_only_s(session, n, batch_size, h, w, workers, WORKER_RUN_ROWS)
        decode = decode_one_core_s(files, spec)
        floor = startup_floor_s(model)
        work = command_work_one_core_s(cifar, info.class_names, batch_size)
        interleave = interleave_extra_core_s(session, info, files[::4], batch_size, WORKER_RUN_ROWS)
        run = classify_cpu_accounting(model, cifar, "--device", "cpu")
        bound = ort + decode / k
        reachable = bound + floor + work / k
        interleave_core_s = interleave["extra_core_s"] * n / interleave["files"]
        row = {"ort_only_s": round(ort, 3), "decode_one_core_s": round(decode, 3), "bound_s": round(bound, 3), **run,
               "ratio": round(bound / run["wall_s"], 3),
               "bound_work_core_s": round(k * bound, 3),
               "extra_cpu_core_s": round(run["total_cpu_s"] - k * bound, 3),
               "idle_core_s": round(k * run["wall_s"] - run["total_cpu_s"], 3),
               "startup_floor_s": round(floor, 3), "command_work_core_s": round(work, 3),
               "reachable_s": round(reachable, 3), "ratio_reachable": round(bound / reachable, 3),
               "interleave": interleave, "interleave_core_s": round(interleave_core_s, 3),
               "reachable_interleaved_s": round(reachable + interleave_core_s / k, 3),
               "ratio_reachable_interleaved": round(bound / (reachable + interleave_core_s / k), 3),
               "ratio_to_reachable": round(reachable / run["wall_s"], 3)}
        per_round.append(row)
        log(json.dumps(row))
    median = sorted(per_round, key=lambda x: x["ratio"])[len(per_round) // 2]
    return {"files": n, "cores": k, "decode_workers": workers, "rounds": per_round, "median_round": median,
            "ratio_reachable_median": float(np.median([r["ratio_reachable"] for r in per_round])),
            "ratio_reachable_max": max(r["ratio_reachable"] for r in per_round),
            "ratio_reachable_interleaved_median": float(np.median([r["ratio_reachable_interleaved"] for r in per_round])),
            "ratio_to_reachable_median": float(np.median([r["ratio_to_reachable"] for r in per_round]))}


def session_settings(session) -> dict:
    """The options an onnxruntime session actually runs with (what the bound was measured on)."""
    so = session.get_session_options()
    return {"intra_op_num_threads": so.intra_op_num_threads, "inter_op_num_threads": so.inter_op_num_threads,
            "graph_optimization_level": str(so.graph_optimization_level).split(".")[-1],
            "execution_mode": str(so.execution_mode).split(".")[-1], "enable_mem_pattern": so.enable_mem_pattern,
            "allow_spinning": so.get_session_config_entry("session.intra_op.allow_spinning")
            if hasattr(so, "get_session_config_entry") else None}


# --- tuning: what picks the defaults ------------------------------------------------------------

def tuning_sessions(model: Path):
    """Named onnxruntime CPU session variants: cnnx's open_model (as classify opens it) and
    the options it sets, one changed at a time."""
    import onnxruntime as ort

    def session(threads=0, spin="0", mem_pattern=True, level="ORT_ENABLE_ALL"):
        so = ort.SessionOptions()
        if threads:
            so.intra_op_num_threads = threads
        so.add_session_config_entry("session.intra_op.allow_spinning", spin)
        so.enable_mem_pattern = mem_pattern
        so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, level)
        return ort.InferenceSession(str(model), so, providers=["CPUExecutionProvider"])

    return {
        "ort default (all cores, spinning, memory pattern)": lambda: session(spin="1"),
        "all cores, no spinning, memory pattern (cnnx before)": lambda: session(),
        "all cores, no spinning, no memory pattern": lambda: session(mem_pattern=False),
        "1 thread, no spinning, memory pattern": lambda: session(threads=1),
        "1 thread, no spinning, no memory pattern": lambda: session(threads=1, mem_pattern=False),
        "1 thread, no spinning, no memory pattern, extended optimisation only":
            lambda: session(threads=1, mem_pattern=False, level="ORT_ENABLE_EXTENDED"),
    }


def tune_ort(model: Path, n: int, reps: int) -> dict:
    """ORT-only seconds for n images: each session variant x batch size (64, 256) x callers
    (1, one a core); then batch sizes for the variant cnnx opens (one thread, one a core)."""
    out = {}
    variants = tuning_sessions(model)
    grid = [(name, bs, callers) for name in variants for bs in (64, 256) for callers in sorted({1, cores()})]
    grid += [("1 thread, no spinning, no memory pattern", bs, cores()) for bs in (32, 128, 512)]
    sessions = {}
    for name, bs, callers in grid:
        session = sessions.setdefault(name, variants[name]())
        key = f"{name} | batch {bs} | {callers} caller(s)"
        out[key] = round(min(ort_only_s(session, n, bs, 32, 32, callers) for _ in range(reps)), 3)
        log(f"[tuning] {key}: {out[key]} s")
    return out


def tune_pipeline(model: Path, cifar: Path, settings, reps: int) -> dict:
    """In-process pipeline seconds (discovery, decoding, onnxruntime; no softmax or CSV) over the
    folder for (batch size, decode workers, intra-op threads, infer in the workers?)."""
    from cnnx.runtime.discover import Discovery
    from cnnx.runtime.model import open_model
    from cnnx.runtime.pipeline import PipelineConfig, batched_runs, decoded_batches

    out = {}
    for bs, workers, threads, in_workers in settings:
        session, info, _ = open_model(model, "cpu", threads=threads, concurrent=in_workers)

        def infer(images):
            return session.run([info.output_name], {info.input_name: images})[0]

        times = []
        for _ in range(reps):
            t0, n = time.perf_counter(), 0
            config = PipelineConfig(batch_size=bs, workers=workers)
            for _items, batch in decoded_batches(batched_runs(Discovery([str(cifar)]).runs(), bs), info.spec, config,
                                                 infer=infer if in_workers else None):
                if not in_workers:
                    infer(batch.images)
                n += len(batch.paths)
            times.append(time.perf_counter() - t0)
        key = (f"batch {bs} | {config.resolved_workers()} decode workers | {threads or 'all cores'} intra-op "
               f"thread(s) | onnxruntime in {'the decode workers' if in_workers else 'the caller'}")
        out[key] = round(min(times), 3)
        log(f"[tuning] {key}: {out[key]} s ({n} images)")
    return out


def tune_processes(model: Path, cifar: Path, settings, reps: int) -> dict:
    """In-process pipeline seconds (as tune_pipeline) with the decode processes of procdecode,
    for (batch size, decode processes, the caller's intra-op threads, onnxruntime in the
    decode processes?): in them, each runs its batches on a one-thread session; else the
    caller runs each batch on its own session. The workers' start-up is not counted."""
    from cnnx.runtime.discover import Discovery
    from cnnx.runtime.model import open_model
    from cnnx.runtime.pipeline import PipelineConfig, batched_runs
    from cnnx.runtime.procdecode import DecodePool

    out = {}
    for bs, workers, threads, in_workers in settings:
        session, info, _ = open_model(model, "cpu", threads=threads)
        config = PipelineConfig(batch_size=bs, workers=workers, decode="processes")
        pool = DecodePool(config.resolved_workers())
        times = []
        try:
            for _ in range(reps):
                t0, n = time.perf_counter(), 0
                for _items, batch in pool.decoded_batches(batched_runs(Discovery([str(cifar)]).runs(), bs), info.spec,
                                                          config, model=model if in_workers else None):
                    if not in_workers:
                        session.run([info.output_name], {info.input_name: batch.images})
                    n += len(batch.paths)
                times.append(time.perf_counter() - t0)
        finally:
            pool.close()
        where = ("the decode processes (1 intra-op thread each)" if in_workers
                 else f"the caller ({threads or 'all cores'} intra-op thread(s))")
        key = f"batch {bs} | {config.resolved_workers()} decode processes | onnxruntime in {where}"
        out[key] = round(min(times), 3)
        log(f"[processes] {key}: {out[key]} s ({n} images)")
    return out


def pipeline_decode(cifar: Path, reps: int) -> dict:
    """Decode-only images/s of the whole pipeline (discovery, decoding, batches; no model) over
    the folder, decode threads vs decode processes, one worker a core: the most images/s a
    GPU run of cnnx classify could be fed (issue 8 goal 1 on the GPU machine's 16 cores)."""
    from cnnx.runtime.discover import Discovery
    from cnnx.runtime.pipeline import PipelineConfig, batched_runs, decoded_batches
    from cnnx.runtime.preprocess import make_spec
    from cnnx.runtime.procdecode import DecodePool

    spec = make_spec(32, (0.5,) * 3, (0.25,) * 3)
    out = {"workers": cores()}
    pool = DecodePool(cores())
    try:
        for mode in ("threads", "processes") * reps:
            config = PipelineConfig(batch_size=256, decode=mode)
            todo = batched_runs(Discovery([str(cifar)]).runs(), 256)
            t0, n = time.perf_counter(), 0
            batches = pool.decoded_batches(todo, spec, config) if mode == "processes" else decoded_batches(
                todo, spec, config)
            for _items, batch in batches:
                n += len(batch.paths)
            rate = round(n / (time.perf_counter() - t0), 1)
            out[f"{mode}_images_per_s"] = max(out.get(f"{mode}_images_per_s", 0), rate)
            log(f"[pipeline_decode] {mode}: {rate} images/s ({n} images)")
    finally:
        pool.close()
    return out


# Issue 8: goal 2 (cnnx classify >= 0.95 of the CPU bound) and goal 3 (peak memory flat).
GOALS = {"cpu_bound_ratio_min": 0.95, "memory_50k_vs_5k_max_ratio": 1.10}


def merge_result(path: Path, update: dict, parts, argv) -> dict:
    """The JSON at path (if any) with `update`'s keys replaced; goals judged on the merged
    figures; written back with this command's provenance, and each part's own (`parts`: the
    command, time and commit that measured it)."""
    from _results import provenance

    old = json.loads(path.read_text()) if path.exists() else {}
    # Only what a part of this version measured (and recorded in `parts`) is kept from before.
    kept = {key for part in old.get("parts", {}) for key in PART_KEYS[part]}
    old = {key: value for key, value in old.items() if key in kept or key == "parts"}  # a label is of its run only
    doc = {**old, **update}
    doc["parts"] = {**old.get("parts", {}), **{part: provenance(argv) for part in parts}}
    doc["goals"] = GOALS
    met = {}
    if b := doc.get("bound"):
        met["cpu_bound_ratio_process"] = b["ratio_process"] >= GOALS["cpu_bound_ratio_min"]
        met["cpu_bound_ratio_summary"] = b["ratio_summary"] >= GOALS["cpu_bound_ratio_min"]
    if m := doc.get("memory"):
        met["memory_50k_vs_5k"] = m["ratio"] <= GOALS["memory_50k_vs_5k_max_ratio"]
    doc["goals_met"] = met
    write_result(path, doc, argv)
    return doc


# The keys each part writes.
PART_KEYS = {"bound": ("bound", "first_batch_latency_s"), "tuning": ("tuning",), "memory": ("memory",),
             "processes": ("tuning_processes",), "pipeline_decode": ("pipeline_decode",),
             "baselines": ("cifar",), "photos": ("photos", "photos_set"), "decode": ("decode_only",),
             "cuda": ("cuda",), "accounting": ("accounting",), "writers": ("writers",)}
PARTS = tuple(PART_KEYS)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", type=Path, help="cnnx ONNX model (default: a seeded seed-cnn exported here)")
    ap.add_argument("--cifar", type=Path, help="CIFAR-10 JPEG folder DIR/<class>/*.jpg (default $CNNX_CIFAR_DIR or /tmp/cifar10/train)")
    ap.add_argument("--part", action="append", choices=PARTS,
                    help="what to measure (repeatable; default: bound and memory; each part replaces its keys in --out)")
    ap.add_argument("--photos", type=int, default=200, help="number of 2-12 MP photos to make (default 200)")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds (best kept)")
    ap.add_argument("--batch-size", type=int, help="--part bound: at this batch size (default: cnnx classify's)")
    ap.add_argument("--label", help="what this run measured, recorded as `label` (e.g. a change under review "
                                    "run from a copy of the tree)")
    ap.add_argument("--out", type=Path, default=RESULTS / "bench_classify.json")
    args = ap.parse_args(argv)
    parts = args.part or ["bound", "memory"]

    CACHE.mkdir(parents=True, exist_ok=True)
    model = args.model or build_model()
    cifar = cifar_folder(args.cifar)
    small = linked_subset(cifar, 500)
    cnnx_source = Path(__import__("cnnx").__file__).parent
    update = {"model": str(model), "batch_size": args.batch_size or cli_default_batch_size(),
              "cnnx_source": str(cnnx_source), "bytecode": compile_bytecode(cnnx_source.parent)}
    if args.label:
        update["label"] = args.label
    if "bound" in parts:
        update["bound"] = measure_bound(model, cifar, args.rounds, args.batch_size)
        update["first_batch_latency_s"] = round(min(first_batch_latency(model, small) for _ in range(3)), 3)
    if "tuning" in parts:
        update["tuning"] = {
            "ort_only_images": 20000,
            "ort_only_s": tune_ort(model, 20000, reps=2),
            "pipeline_s": tune_pipeline(model, cifar, [(256, 0, None, False), (256, 0, 1, True), (64, 0, 1, True),
                                                       (64, 0, None, True), (64, 3, 1, True)], reps=2),
        }
    if "processes" in parts:
        update["tuning_processes"] = {
            "threads_s": tune_pipeline(model, cifar, [(256, 0, None, False)], reps=2),
            "processes_s": tune_processes(model, cifar, [(256, 0, None, False), (256, 0, 1, False), (256, 0, None, True),
                                                         (128, 0, None, True), (64, 0, None, True),
                                                         (256, 1, None, True), (256, 3, None, True)], reps=2),
        }
    if "pipeline_decode" in parts:
        update["pipeline_decode"] = pipeline_decode(cifar, reps=2)
    if "accounting" in parts:
        update["accounting"] = measure_accounting(model, cifar, args.rounds)
    if "writers" in parts:
        update["writers"] = measure_writers(cifar, args.rounds, update["batch_size"])
    if "memory" in parts:
        big = run_classify(model, cifar, "--device", "cpu", out=CACHE / "out-mem50k.csv")
        few = run_classify(model, small, "--device", "cpu", out=CACHE / "out-mem5k.csv")
        update["memory"] = {"files_50k_peak_rss_mib": round(big[1], 1), "files_5k_peak_rss_mib": round(few[1], 1),
                            "ratio": round(big[1] / few[1], 3), "files_50k": len(big[3]), "files_5k": len(few[3])}
        log(json.dumps(update["memory"]))
    bs = update["batch_size"]
    if "baselines" in parts:
        update["cifar"] = compare(model, list_images(cifar), cifar, bs, "cifar", args.rounds)
    if "photos" in parts:
        folder = photos_dir(args.photos)
        files = list_images(folder)
        sizes = [os.path.getsize(f) for f in files]
        update["photos_set"] = {"n": len(files), "mean_mb": round(sum(sizes) / len(sizes) / 1e6, 2),
                                "megapixels": "2-12 uniform"}
        update["photos"] = compare(model, files, folder, bs, "photos", args.rounds)
    if "decode" in parts:
        from cnnx.runtime.preprocess import make_spec

        spec = make_spec(32, (0.5,) * 3, (0.25,) * 3)
        update["decode_only"] = {"cifar_10000": decode_scaling(list_images(cifar)[:10000], spec)}
    if "cuda" in parts:
        from cnnx.runtime.contract import cuda_driver_present

        if cuda_driver_present():
            wall, _rss, summary, labels = run_classify(model, cifar, "--device", "cuda", out=CACHE / "out-cuda.csv")
            update["cuda"] = {"cifar": {"images_per_s": round(len(labels) / wall, 1), "summary": summary}}
        else:
            update["cuda"] = "not measured: no NVIDIA driver on this machine"
    doc = merge_result(args.out, update, parts, None if argv is None else [__file__, *argv])
    print(json.dumps({k: doc[k] for k in ("bound", "memory", "goals_met") if k in doc}, indent=2))


if __name__ == "__main__":
    main()
