"""`cnnx classify` on the GPU machine (issue 8): one run, at most 8 minutes, nothing from the network.

What one run measures (every figure with the card it ran on, all in the same process/run):
  card        nvidia-smi and torch.cuda.get_device_name; onnxruntime's version, file, providers;
              cnnx.runtime.cuda.diagnose() / diagnose_tensorrt(), gpudecode.diagnose(); the host
              memory kind the IOBinding path got (pinned-onnxruntime / pinned-cudart / pageable)
  exports     resnet18 (224 px, 1,000 classes; ImageNet weights when torchvision has them
              cached, else seeded random) and airnet (32 px, 10 classes, seeded random) through
              `cnnx export --fp16` on this machine's torch; its parity report (CPU and CUDA
              backends, fp32 and fp16). A gate refusal is recorded, and the speed figures then
              use the exporter's fp16 conversion of the same model (marked so).
  per model x variant (fp32, fp16, TensorRT fp32 when TensorRT 10 loads):
              session_run_img_s   plain `session.run` on a ready uint8 batch (no IOBinding)
              ceiling_img_s       IOBinding runs on ready uint8 batches, 2 or binding.SLOTS in
                                  flight (the faster), no host copy: the pure-inference ceiling
              bound_loop_img_s    the same with the copy into the (pinned) host buffer
              classify            `cnnx classify` as a subprocess: img/s over the whole process
                                  and after its first batch, peak RSS, ratio to the ceiling
              cuda_vs_cpu         max |logit diff| and top-1 agreement vs the CPU provider
    resnet18 runs on N synthetic 2-12 MP JPEG photos (plus any --jpegs), airnet on the
    50,000 CIFAR-10 JPEGs of --cifar-tar.
  decode_only  the CPU decode pipeline alone on the photos (is decoding the limit there?)
  gpu_decode   GPU JPEG decoding (cnnx.runtime.gpudecode: nvImageCodec + the ONNX resize on CUDA):
               the GPU decoder alone on the photos (img/s, files it passed to the CPU); its pixels
               vs load_image's on 64 photos; resnet18 fp32 classify of the photos with --decoder cpu,
               gpu and auto's sharing back to back in this process: img/s of each, the ratio (goal
               >= 3x where decoding is the limit) and top-1 agreement of GPU- vs CPU-decoded (goal
               >= 99.5%); py-spy on `cnnx classify --decoder gpu` of the photos (every thread,
               profile_gpu_decode_resnet18.txt)
               + nvImageCodec's own decode rate on the photos (gpu_decode_ceiling: the most GPU decoding
               can give), the same for each of its GPU backends alone with the cores it kept busy
               (gpu_decode_backends), and a step-by-step pixel diagnosis (gpu_decode_diagnose); with a trained airnet
               (--airnet-checkpoint): --decoder cpu vs gpu on the 50,000 CIFAR JPEGs and on the photos at
               32 px, where top-1 agreement means something (10 classes)
  decode_bound_cifar  what CPU decoding allows on the 50,000 CIFAR JPEGs: load_image alone in one
               process per core (no pipeline), and cnnx's decode processes without a model; where it
               is below the ceiling, classify's ratio to it says how close the pipeline comes
  startup_floor_airnet  a fresh Python importing numpy and onnxruntime, creating the CUDA session and
               running one batch: what any process pays before its first result (the whole-process
               ratio a run of N files can reach is N/ceiling over that plus N/ceiling)
  steady_state_airnet_fp32  cnnx classify on the 50,000 CIFAR JPEGs and on 10 hard-linked copies of
               them (500,000 files): the marginal rate, the pipeline's throughput without its start-up;
               with --baseline DIR (repeatable; another commit's cnnx/ package: `git archive
               <commit> cnnx | tar -x -C DIR` and the commit in DIR/COMMIT) the same for that
               version, rounds interleaved, so a change is measured against its parents on one card
  steady_state_workers_airnet_fp32  the same marginal rate with --workers cores-4, cores-2 and
               cores: do the decode processes leave the caller's threads the core they need?
  steady_state_api_airnet_fp32  Classifier.classify(...).results() in one warm process, nothing
               written: the runtime's marginal rate without the CLI's rows and start-up
  steady_state_batch_airnet_fp32  the same at --batch-size 512 and 1024, each against the ceiling at
               its own batch
  profile_airnet_fp32  py-spy (where a wheel of it was installed) on cnnx classify of the 500,000
               files: every thread's stacks, idle included, 200 a second, collapsed (one line a
               stack, its sample count last) -> profile_airnet_fp32.txt beside the JSON; the stage
               records where the main thread's samples went
  profile_gil_airnet_fp32  the same with py-spy --gil (only the thread holding the GIL is sampled):
               how much of the wall some thread held it, and the main thread's share of that
  rows         classify_rows_cuda_vs_cpu_airnet: Classifier.classify on CUDA vs the CPU provider, same
               5,000 files: top-1 agreement of the rows (every batch must run its own pixels)
  sweep        --batch-size 64..2048: ceilings of both models, cnnx classify img/s of airnet
               on CIFAR; the best is printed (the CUDA default of --batch-size stays 256 until
               a run of this script says otherwise)
  slots        ceiling and bound loop with 1, 2 and 3 batches in flight (resnet18 fp32)
  memory       peak RSS of cnnx classify (airnet fp32, CUDA) on 50,000 vs 5,000 files
  pytest_gpu   tests/test_classify_gpu.py, test_cuda_diagnosis.py and test_gpudecode.py with CUDA
               (when time is left)
Not measured: the CPU goal 2 of issue 8.

Each stage checks the time left (--budget-s, default 420 s) and is skipped, with a note, when it
would not fit (so what must not be missed comes first: that cnnx classify's rows on CUDA are the
CPU's right after the classify stages, then the photos, the CIFAR steady state, the CUDA tests,
and last the stages that explain the figures); the JSON is rewritten after every stage
(benchmarks/_results.write_result), so a run cut short still leaves its figures.

Prepare here (once a machine: a session's machine starts without these ignored folders). It
downloads onnxruntime-gpu for the GPU machine's Python 3.12 and splits it into parts of 55 MiB,
each in its own ignored folder, the other wheels, copies the CIFAR tarball in, puts each
--baseline-commit's cnnx/ in .data/baseline-<commit>, and with --train-airnet trains
.data/airnet-best.pt with `cnnx train`'s airnet recipe (about 7 minutes on 2 cores):

    python benchmarks/gpu_classify.py --prepare --train-airnet --baseline-commit 5906b62

Then on the GPU machine: the calls of benchmarks/gpu_run.sh, back to back: one per wheel part
(`--prepare` prints the count: 5 of 55 MiB), then the run itself, carrying .data (the CIFAR tarball,
16 MB; .data/wheels, the small wheels cnnx needs there: simplejpeg, onnxscript, onnx-ir, ml_dtypes,
2 MB; .data/airnet-best.pt, a trained airnet for `--airnet-checkpoint`) and the GPU-decoding wheels.
The JSON comes back under files_at/results/gpu_classify.json; `python benchmarks/gpu_collect.py
files_at/results` puts it and its profiles in benchmarks/results/ under the commit that ran.
`--stages a,b,...` runs only those stages (and the inputs they need).
Smoke test of the whole script on a CPU (tiny sizes, CPU provider, IOBinding forced on; the
GPU decoder on nvImageCodec's CPU backend):

    python benchmarks/gpu_classify.py --smoke --results /tmp/gpu-smoke

What the GPU-decode path gives on this CPU (nvImageCodec's libjpeg-turbo backend + the same ONNX
resize on the CPU provider, vs load_image: pixels and top-1 of a 224 px resnet18 on 2-12 MP
photos) -> benchmarks/results/gpu_decode_cpu.json:

    python benchmarks/gpu_classify.py --cpu-decode-check --photos 48
"""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from pathlib import Path

START = time.perf_counter()  # the budget counts from here: installing the wheel is part of the run
HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

ORT_GPU = "onnxruntime-gpu==1.31.1"
# What cnnx needs that the GPU machine lacks (GPU.md's list): simplejpeg (the runtime's JPEG
# decoder) and the dynamo ONNX exporter's onnxscript / onnx-ir (ml_dtypes under them).
SMALL_WHEELS = ("simplejpeg==1.9.0", "onnxscript==0.7.2", "onnx-ir==1.1.0", "ml_dtypes==0.6.0")
# GPU JPEG decoding (the `gpu-decode` extra): nvImageCodec and the nvJPEG library it loads. nvJPEG
# of CUDA 13.0, the CUDA of the machine's torch wheels; it travels in its own ignored folder (with
# the last onnxruntime part and the CIFAR tarball it would pass the 64 MiB a call).
GPU_DECODE_WHEELS = ("nvidia-nvimgcodec-cu13==0.9.0.20", "nvidia-nvjpeg==13.0.2.28")
GPU_DECODE_DIR = ".ortgpu-decode"  # matches .gitignore's /.ortgpu*/
PROFILER_WHEELS = ("py-spy==0.4.3",)  # the profile stages' sampler, from .data/wheels
CARRY_BYTES = 64 << 20  # what one device call may carry, all carried folders together
PIP_TARGET = ["--no-deps", "--only-binary=:all:", "--python-version", "3.12", "--implementation", "cp",
              "--platform", "manylinux_2_28_x86_64", "--platform", "manylinux_2_27_x86_64",
              "--platform", "manylinux_2_17_x86_64", "--platform", "manylinux2014_x86_64"]
# 5 parts: each call carries one and the repository's files (3.4 MB at 93bb47c, and growing) under the
# 64 MiB a call; 61 MiB parts no longer fitted beside them (GPU.md's split -b 55M)
PART_BYTES = 55 << 20
CIFAR_TAR = ROOT.parent / "shared" / "datasets" / "cifar10-train.tar.gz"
BATCH = 256  # cnnx classify's default, measured on the CPU


def log(msg):
    print(msg, file=sys.stderr, flush=True)


# --- preparation (here, with a network) -------------------------------------------------------------

def tree_bytes() -> int:
    """The bytes of the files a device call copies besides what it carries: git's tracked files
    and the untracked ones it does not ignore."""
    names = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, check=True).stdout.split(b"\0")
    return sum((ROOT / os.fsdecode(n)).stat().st_size for n in names if n and (ROOT / os.fsdecode(n)).is_file())


def prepare(cifar_tar: Path, baselines=(), airnet: str | None = None):
    """Everything the GPU run carries, made here on a fresh machine (with the package registry):
    onnxruntime-gpu for cp312 manylinux x86-64 split into .ortgpuN/ folders (ignored by
    .gitignore's /.ortgpu*/), the GPU-decoding wheels, the small wheels and py-spy in .data/wheels,
    the CIFAR tarball in .data/; for each commit in baselines its cnnx/ in .data/baseline-<commit>
    (the steady-state A/B); airnet: "train" trains one with `cnnx train`'s airnet recipe on the
    tarball's JPEGs (minutes on 2 cores), a path copies that best.pt, into .data/airnet-best.pt."""
    data = ROOT / ".data"
    data.mkdir(exist_ok=True)
    for commit in baselines:  # first: a commit that does not exist stops before any download
        prepare_baseline(commit, data)
    tmp = ROOT / ".ortgpu-download"
    shutil.rmtree(tmp, ignore_errors=True)
    subprocess.run([sys.executable, "-m", "pip", "download", *PIP_TARGET, "-d", str(tmp), ORT_GPU], check=True)
    subprocess.run([sys.executable, "-m", "pip", "download", *PIP_TARGET, "-d", str(data / "wheels"),
                    *SMALL_WHEELS, *PROFILER_WHEELS], check=True)
    decode_dir = ROOT / GPU_DECODE_DIR
    shutil.rmtree(decode_dir, ignore_errors=True)
    subprocess.run([sys.executable, "-m", "pip", "download", *PIP_TARGET, "-d", str(decode_dir), *GPU_DECODE_WHEELS],
                   check=True)
    wheel = next(tmp.glob("*.whl"))
    blob = wheel.read_bytes()
    parts = [blob[i:i + PART_BYTES] for i in range(0, len(blob), PART_BYTES)]
    for i, part in enumerate(parts, 1):
        folder = ROOT / f".ortgpu{i}"
        folder.mkdir(exist_ok=True)
        stale = [f for f in folder.iterdir() if f.name != f"{wheel.name}.part-{i:02d}"]
        if stale:  # one part a folder: a carried folder must stay under the 64 MiB a run
            raise SystemExit(f"{folder} holds other files ({stale[0].name}): move them away and run again")
        (folder / f"{wheel.name}.part-{i:02d}").write_bytes(part)
    shutil.rmtree(tmp)
    shutil.copyfile(cifar_tar, data / cifar_tar.name)
    if airnet == "train":
        train_airnet(cifar_tar, data / "airnet-best.pt")
    elif airnet:
        shutil.copyfile(airnet, data / "airnet-best.pt")
    log(f"{wheel.name}: {len(blob) / 1e6:.0f} MB in {len(parts)} parts: "
        + ", ".join(f".ortgpu{i}" for i in range(1, len(parts) + 1)) + f"; .data/{cifar_tar.name}; .data/wheels: "
        + ", ".join(sorted(w.name for w in (data / "wheels").glob("*.whl")))
        + f"; {GPU_DECODE_DIR}: " + ", ".join(f"{w.name} ({w.stat().st_size / 1e6:.0f} MB)"
                                              for w in sorted(decode_dir.glob("*.whl")))
        + "; baselines: " + (", ".join(sorted(b.name for b in data.glob("baseline-*"))) or "none")
        + "; .data/airnet-best.pt: " + ("yes" if (data / "airnet-best.pt").is_file() else
                                         "no (the airnet figures then use a seeded random model)"))
    calls = [[f".ortgpu{i}"] for i in range(1, len(parts) + 1)] + [[".data", GPU_DECODE_DIR]]
    tree = tree_bytes()  # the working tree travels with every call, within the same limit
    for carried in calls:
        size = tree + sum(f.stat().st_size for folder in carried for f in (ROOT / folder).rglob("*") if f.is_file())
        if size > CARRY_BYTES:
            log(f"warning: {' + '.join(carried)} and the working tree hold {size / 2**20:.1f} MiB, over the "
                f"{CARRY_BYTES >> 20} MiB a call carries")
    log(f"device calls: one per part (cp .ortgpuN/* /tmp/ortgpu/), one for {GPU_DECODE_DIR} (cp to /tmp/gpudecode/), "
        "the last one also carrying .data and running this script with --wheel-parts /tmp/ortgpu "
        "--wheels /tmp/gpudecode (see the docstring)")


def prepare_baseline(commit: str, data: Path) -> Path:
    """.data/baseline-<short commit>: that commit's cnnx/ package and a COMMIT file naming it."""
    r = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--verify", "--quiet", f"{commit}^{{commit}}"],
                       capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"--baseline-commit {commit}: no such commit in this repository")
    sha = r.stdout.strip()
    folder = data / f"baseline-{sha[:7]}"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", sha, "cnnx"], capture_output=True, check=True).stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(folder, filter="data")
    (folder / "COMMIT").write_text(sha + "\n")
    return folder


def train_airnet(cifar_tar: Path, dest: Path):
    """`cnnx train` with no options but the data (the airnet recipe) on the tarball's 50,000
    JPEGs; its best.pt copied to dest."""
    with tempfile.TemporaryDirectory() as tmp:
        with tarfile.open(cifar_tar) as tar:
            tar.extractall(tmp, filter="data")
        train = next(Path(tmp).glob("**/train"))
        log(f"training airnet on {train} (cnnx train's recipe; minutes on a 2-core CPU)")
        subprocess.run([sys.executable, "-m", "cnnx", "train", "--data", str(train), "--out", f"{tmp}/runs",
                        "--name", "airnet", "--cache-dir", f"{tmp}/cache", "--quiet"], check=True, cwd=ROOT)
        shutil.copyfile(Path(tmp) / "runs" / "airnet" / "best.pt", dest)


def install_wheels(part_dirs, wheel_dirs, site: Path) -> list:
    """Join split wheels (NAME.whl.part-NN) and install every wheel with pip --no-index
    --no-deps --target site; put site first on this process's and its children's path."""
    wheels = []
    for folder in part_dirs:
        groups = {}
        for part in sorted(Path(folder).glob("*.whl.part-*")):
            groups.setdefault(part.name.split(".part-")[0], []).append(part)
        for name, parts in groups.items():
            joined = Path(folder) / name
            with open(joined, "wb") as out:
                for part in parts:
                    out.write(part.read_bytes())
            wheels.append(joined)
    for folder in wheel_dirs:
        wheels += sorted(Path(folder).glob("*.whl"))
    if wheels:
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--upgrade",
                        "--target", str(site), *map(str, wheels)], check=True)
        sys.path.insert(0, str(site))
        os.environ["PYTHONPATH"] = os.pathsep.join([str(site), str(ROOT), os.environ.get("PYTHONPATH", "")])
    else:
        os.environ["PYTHONPATH"] = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    sys.path.insert(0, str(ROOT))
    return [w.name for w in wheels]


# --- the run's bookkeeping --------------------------------------------------------------------------

ALWAYS = {"card", "cifar", "photos"}  # the inputs every stage may use


def with_inputs(only: set) -> set:
    """--stages' names and the stages whose results they use: an export for each model a stage
    runs (the GPU-decoding stages run on resnet18's photos), and the ceiling and the 10x CIFAR
    folder for the steady states and the profiles of airnet."""
    need = set(only)
    for name in only:
        for arch in ("airnet", "resnet18"):
            if arch in name:
                need.add(f"export_{arch}")
        if name.startswith("gpu_decode") and "airnet" not in name:
            need.add("export_resnet18")
        if name in ("decode_bound_cifar", "cifar_x10"):
            need |= {"export_airnet", "ceiling_airnet_fp32"}
        elif name.startswith(("steady_state", "profile_airnet", "profile_gil")):
            need |= {"export_airnet", "ceiling_airnet_fp32", "cifar_x10"}
    return need


class Run:
    """Results, the deadline and the JSON written after every stage."""

    def __init__(self, out: Path, budget_s: float, argv, only=None):
        self.asked = only  # the stage names --stages gave (None: all)
        self.only = None if only is None else with_inputs(only) | ALWAYS  # and what they need
        self.t0 = START
        self.deadline = START + budget_s
        self.out = out
        self.argv = argv
        self.results = {"stages": {}, "skipped": {}}

    def left(self) -> float:
        return self.deadline - time.perf_counter()

    def stage(self, name: str, fn, *args, need_s: float = 10.0, **kw):
        """fn(*args, **kw) -> its result stored under `name`; skipped when fewer than need_s
        seconds are left or when --stages leaves it out; an exception is recorded as its last
        line (the run goes on)."""
        if self.only is not None and name not in self.only:
            return None
        if self.left() < need_s:
            self.results["skipped"][name] = f"out of time ({self.left():.0f} s left, needs ~{need_s:.0f} s)"
            log(f"[{name}] skipped: {self.results['skipped'][name]}")
            return None
        t = time.perf_counter()
        log(f"[{name}] ...")
        try:
            value = fn(*args, **kw)
        except (Exception, SystemExit) as e:  # noqa: BLE001 - one failed figure must not end the run
            value = None
            last = (str(e).strip().splitlines() or [""])[-1][:500]
            self.results["skipped"][name] = f"failed: {type(e).__name__}: {last}"
            log(f"[{name}] {self.results['skipped'][name]}")
        else:
            self.results[name] = json.loads(json.dumps(value, default=str))  # paths as strings
            log(f"[{name}] {json.dumps(self.results[name])[:600]}")
        self.results["stages"][name] = round(time.perf_counter() - t, 1)
        self.save()
        return value

    def not_run(self):
        """Each stage --stages asked for that did not run and was not skipped (no such stage,
        or one whose input failed) is skipped, saying so: never a silently empty JSON."""
        for name in sorted(self.asked or ()):
            if name not in self.results["stages"] and name not in self.results["skipped"]:
                self.results["skipped"][name] = "not run: no such stage, or an input it needs was not made"
                log(f"[{name}] {self.results['skipped'][name]}")

    def save(self):
        from _results import write_result

        self.results["elapsed_s"] = round(time.perf_counter() - self.t0, 1)
        write_result(self.out, self.results, self.argv)


# --- inputs -----------------------------------------------------------------------------------------

def card() -> dict:
    out = {}
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version,pci.bus_id",
                              "--format=csv,noheader"], capture_output=True, text=True, timeout=30)
        out["nvidia_smi"] = smi.stdout.strip() or smi.stderr.strip()
    except (OSError, subprocess.TimeoutExpired) as e:
        out["nvidia_smi"] = f"unavailable: {e}"
    code = ("import torch; print(torch.__version__, torch.version.cuda, "
            "torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no CUDA device')")
    t = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    out["torch"] = t.stdout.strip() or t.stderr.strip()[-300:]
    import onnxruntime as ort

    from cnnx.runtime import cuda

    out["onnxruntime"] = {"version": ort.__version__, "file": ort.__file__, "providers": ort.get_available_providers()}
    out["cuda_diagnosis"] = cuda.describe()
    out["tensorrt_diagnosis"] = cuda.diagnose_tensorrt().reason
    from cnnx.runtime import gpudecode

    out["gpu_decode_diagnosis"] = gpudecode.diagnose().reason
    out["cores"] = len(os.sched_getaffinity(0))
    return out


def cifar_folder(tar: Path, work: Path, per_class: int | None) -> Path:
    """The tarball's cifar10/train/<class>/*.jpg extracted under work (all, or per_class a class)."""
    dest = work / "cifar10" / "train"
    if dest.is_dir():
        return dest
    with tarfile.open(tar) as t:
        members = [m for m in t.getmembers() if m.isdir() or per_class is None
                   or int(Path(m.name).stem) < per_class]
        t.extractall(work, members=members, filter="data")
    return dest


def linked_subset(src: Path, dest: Path, per_class: int | None) -> Path:
    """dest/<class>/ with hard links to the first per_class files (None: all) of each class of src."""
    if dest.is_dir():
        return dest
    for cls in sorted(os.listdir(src)):
        (dest / cls).mkdir(parents=True)
        for name in sorted(os.listdir(src / cls))[:per_class]:
            os.link(src / cls / name, dest / cls / name)
    return dest


def _one_photo(job):
    from PIL import Image

    from bench_classify import photo  # the benchmarks' one photo-like image maker

    path, h, w, seed = job
    Image.fromarray(photo(h, w, seed)).save(path, quality=90)
    return path


def photos(dest: Path, n: int, megapixels, jpegs: Path | None) -> dict:
    """n synthetic photo JPEGs (sizes cycling through `megapixels`, mixed aspect ratios, every
    third one portrait), made in parallel, plus hard links to the JPEGs of --jpegs."""
    from concurrent.futures import ProcessPoolExecutor

    dest.mkdir(parents=True, exist_ok=True)
    aspects = [(4, 3), (3, 2), (16, 9), (1, 1)]
    jobs = []
    for i in range(n):
        mp, (a, b) = megapixels[i % len(megapixels)], aspects[i % len(aspects)]
        w = int(round((mp * 1e6 * a / b) ** 0.5))
        h = int(round(w * b / a))
        jobs.append((str(dest / f"photo_{i:04d}.jpg"), *((w, h) if i % 3 == 2 else (h, w)), i))
    with ProcessPoolExecutor(len(os.sched_getaffinity(0))) as pool:
        list(pool.map(_one_photo, jobs, chunksize=4))
    given = 0
    for f in sorted(jpegs.rglob("*")) if jpegs else []:
        if f.suffix.lower() in (".jpg", ".jpeg"):
            target = dest / f"given_{given:05d}{f.suffix.lower()}"
            try:
                os.link(f, target)
            except OSError:  # another file system
                shutil.copyfile(f, target)
            given += 1
    sizes = [p.stat().st_size for p in dest.iterdir()]
    return {"folder": str(dest), "synthetic": n, "given": given, "megapixels": list(megapixels),
            "mean_mb": round(sum(sizes) / len(sizes) / 1e6, 2)}


# --- models -----------------------------------------------------------------------------------------

def export(arch: str, size: int, classes: int, work: Path, verify: Path, parity_images: int,
           trained: Path | None = None) -> dict:
    """A checkpoint of arch (`trained`, a cnnx checkpoint, when given; else ImageNet weights for
    resnet18 when cached, else seeded random) exported with `cnnx export --fp16`; on a gate refusal
    the refusal is recorded, the export is repeated with the CUDA backend hidden and then without
    --fp16, and fp16 is converted for speed only (cnnx.export.quantize.to_fp16)."""
    import torch

    from cnnx.runtime.preprocess import make_spec
    from cnnx.train.checkpoint import build_checkpoint, save_checkpoint
    from cnnx.train.zoo import create_model, get_arch

    spec_arch = get_arch(arch)
    torch.manual_seed(0)
    weights = "seeded random"
    model = None
    if trained is not None:
        weights = f"trained: {trained}"
    elif arch == "resnet18":
        try:
            model = create_model(arch, classes, pretrained=True)
            weights = "ImageNet (torchvision cache)"
        except Exception as e:  # noqa: BLE001 - not cached and offline: random weights
            weights = f"seeded random ({str(e).splitlines()[0][:120]})"
    model = model or create_model(arch, classes)
    names = [f"class{i:04d}" for i in range(classes)] if classes != 10 else \
        ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    ckpt = trained or work / f"ckpt-{arch}" / "best.pt"
    if trained is None:
        save_checkpoint(build_checkpoint(model=model, arch=arch, arch_kwargs={}, class_names=names,
                                         preprocess=make_spec(size, spec_arch.mean, spec_arch.std), epoch=0,
                                         metrics={}, config={}), ckpt)
    out = work / f"export-{arch}{'-trained' if trained else ''}"
    base = [sys.executable, "-m", "cnnx", "export", str(ckpt), "--out", str(out), "--verify-data", str(verify),
            "--parity-images", str(parity_images)]
    info = {"arch": arch, "size": size, "classes": classes, "weights": weights, "refusals": []}
    attempts = [("fp16, all backends", [*base, "--fp16"], {}),
                ("fp16, CUDA backend hidden", [*base, "--fp16"], {"CUDA_VISIBLE_DEVICES": ""}),
                ("fp32 only, CUDA backend hidden", base, {"CUDA_VISIBLE_DEVICES": ""})]
    for label, cmd, env in attempts:
        t = time.perf_counter()
        r = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **env}, timeout=300)
        if r.returncode == 0:
            info.update(export=label, export_s=round(time.perf_counter() - t, 1))
            break
        info["refusals"].append({"attempt": label, "error": (r.stderr.strip().splitlines() or ["?"])[-1][:500],
                                 "stderr_tail": r.stderr.strip().splitlines()[-40:]})
    else:
        # cnnx export failed every way (e.g. its dynamo exporter's packages missing there): the
        # tests' TorchScript-exporter builder of the same contract model (seeded weights), so
        # the speed figures still come; no parity report then.
        sys.path.insert(0, str(ROOT))
        from tests._runtime_util import make_onnx_model

        out = work / f"fallback-{arch}"
        make_onnx_model(out / "model.onnx", arch=arch, size=size, class_names=names)
        info["export"] = "tests/_runtime_util.make_onnx_model (cnnx export failed: see refusals)"
    parity = out / "parity.json"
    if parity.exists():
        doc = json.loads(parity.read_text())
        info["parity"] = {"passed": doc.get("passed"), "rows": [
            {k: r[k] for k in ("backend", "variant", "inputs", "n", "max_abs", "top1_agreement", "failure")}
            for r in doc.get("results", [])]}
    info["fp32"] = str(out / "model.onnx")
    fp16 = out / "model.fp16.onnx"
    if not fp16.exists():
        from cnnx.export.quantize import to_fp16

        import onnx

        props = {p.key: p.value for p in onnx.load(str(out / "model.onnx")).metadata_props}
        meta = {k: json.loads(v) if v[:1] in "[{" else v for k, v in props.items()}
        fp16 = work / f"speed-only-{arch}.fp16.onnx"
        to_fp16(out / "model.onnx", fp16, meta=meta)
        info["fp16_note"] = "not written by cnnx export (see refusals): converted for speed figures only"
    info["fp16"] = str(fp16)
    return info


# --- measurements -----------------------------------------------------------------------------------

def _ready_batch(clf, batch):
    import numpy as np

    h, w = clf.info.spec["size"]
    return np.random.default_rng(0).integers(0, 256, (batch, 3, h, w), dtype=np.uint8)


def _rate(step, batch: int, seconds: float) -> float:
    """images/s of step() (one batch each), after 3 warm-up steps, over >= seconds."""
    for _ in range(3):
        step()
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        step()
        n += 1
    return round(n * batch / (time.perf_counter() - t0), 1)


def ceilings(model: str, device: str, batch: int, seconds: float, slots=None, only_ceiling: bool = False) -> dict:
    """session.run, IOBinding with ready batches (no host copy) and the bound loop (with the
    copy into the host buffers), for each number of batches in flight (default 2 and
    binding.SLOTS, classify's); the ceiling is the faster; only_ceiling: the IOBinding figure
    alone (the batch-size sweep)."""
    from collections import deque
    from concurrent.futures import ThreadPoolExecutor

    from cnnx.runtime import Classifier
    from cnnx.runtime.binding import SLOTS, BoundRunner, BoundSlot

    slots = slots or sorted({2, SLOTS})
    out = {}
    with Classifier(model, device, batch_size=batch, io_binding=True) as clf:
        batch = clf.batch_size  # within the pipeline's memory budget, as cnnx classify runs it
        x = _ready_batch(clf, batch)
        out.update(provider=clf.provider, host_memory=clf.host_memory, batch=batch)
        if not only_ceiling:
            out["session_run_img_s"] = _rate(lambda: clf.predict(x), batch, seconds)
        pinned = clf.provider != "CPUExecutionProvider"
        for n in slots:
            ready = [BoundSlot(clf.session, clf.info.input_name, clf.info.output_name, x.shape, pinned)
                     for _ in range(n)]
            for s in ready:  # the batch on the device once: the ceiling runs without uploads
                s.host.array[:] = x
                s.device_input.update_inplace(x)
            pool, flight, turn = ThreadPoolExecutor(n), deque(), [0]

            def step():
                if len(flight) == n:
                    flight.popleft().result()
                flight.append(pool.submit(ready[turn[0] % n].run, clf.session, False))
                turn[0] += 1

            out[f"ceiling_img_s_slots{n}"] = _rate(step, batch, seconds)
            while flight:
                flight.popleft().result()
            pool.shutdown()
            for s in ready:
                s.host.close()
            if only_ceiling:
                continue
            runner = BoundRunner(clf.session, clf.info.input_name, clf.info.output_name, batch,
                                 clf.info.spec["size"], slots=n, pinned=pinned)
            jobs = iter(int, 1)  # endless; _rate stops pulling
            gen = runner.run_in_order(jobs, lambda _: x)
            out[f"bound_loop_img_s_slots{n}"] = _rate(lambda: next(gen), batch, seconds)
            gen.close()
            runner.close()
    out["ceiling_slots"] = max(slots, key=lambda n: out[f"ceiling_img_s_slots{n}"])
    out["ceiling_img_s"] = out[f"ceiling_img_s_slots{out['ceiling_slots']}"]
    return out


def agreement(model: str, device: str, files, n: int = 64) -> dict:
    """Logits of `device` vs the CPU provider on n real images: max |diff|, top-1 agreement."""
    import numpy as np

    from cnnx.runtime import Classifier
    from cnnx.runtime.pipeline import decode_images

    with Classifier(model, "cpu") as cpu, Classifier(model, device) as dev:
        x, ok, _failed, _notes = decode_images(files[:n], cpu.info.spec, 1 << 40)
        a, b = cpu.predict(x), dev.predict(x)
    return {"n": len(ok), "max_abs": float(np.abs(a - b).max()),
            "top1_agreement": float((a.argmax(1) == b.argmax(1)).mean())}


def classify(model: str, folder: Path, device: str, batch: int, work: Path, ceiling: float | None,
             with_memory: bool = False, tree: Path | None = None, extra=()) -> dict:
    """`cnnx classify` as a subprocess (of `tree`'s cnnx where given). Timed without the memory
    polling (it reads /proc for every process of the tree 100 times a second) unless with_memory
    (the memory stage). A tree runs with itself first on PYTHONPATH and as the cwd (which
    `python -c`, multiprocessing's forkserver among them, puts first on sys.path): inserting it
    into the CLI's sys.path alone left the forkserver, a fresh interpreter whose preload ignores
    the caller's sys.path on Python 3.11, importing this tree's decode workers."""
    from _results import tree_env
    from bench_classify import run_classify

    where = {} if tree is None else {"cwd": Path(tree).resolve(), "env": tree_env(tree)}
    wall, peak, summary, labels = run_classify(Path(model).resolve(), Path(folder).resolve(), "--device", device,
                                               "--batch-size", str(batch), *extra,
                                               out=(Path(work) / "classify-out.csv").resolve(), peak=with_memory,
                                               **where)
    first = re.search(r"first batch after ([\d.]+) s", summary)
    inner = re.search(r"; ([\d.]+) s; ", summary)
    n = len(labels)
    r = {"files": n, "wall_s": round(wall, 3), "img_s": round(n / wall, 1), "summary": summary}
    if peak is not None:
        r["peak_rss_mib"] = round(peak, 1)
    if first and inner and n > batch and float(inner.group(1)) - float(first.group(1)) >= 0.05:  # 10 ms digits
        r["img_s_after_first_batch"] = round((n - batch) / (float(inner.group(1)) - float(first.group(1))), 1)
    if ceiling:
        r["ratio_to_ceiling"] = round(r["img_s"] / ceiling, 3)
        if "img_s_after_first_batch" in r:
            r["ratio_after_first_batch"] = round(r["img_s_after_first_batch"] / ceiling, 3)
    return r


def decode_only(folder: Path, size: int) -> dict:
    """images/s of cnnx's decode pipeline alone (threads = cores), to the model's size."""
    from cnnx.runtime.discover import Discovery
    from cnnx.runtime.pipeline import PipelineConfig, batched_runs, decoded_batches
    from cnnx.runtime.preprocess import make_spec

    spec = make_spec(size, (0.5,) * 3, (0.25,) * 3)
    t0, cpu0 = time.perf_counter(), _cpu_s()
    n = sum(len(b.paths) for _items, b in decoded_batches(batched_runs(Discovery([str(folder)]).runs(), BATCH), spec,
                                                           PipelineConfig(batch_size=BATCH)))
    wall = time.perf_counter() - t0
    return {"files": n, "img_s": round(n / wall, 1), "threads": PipelineConfig().resolved_workers(),
            "cores_busy": round((_cpu_s() - cpu0) / wall, 2)}


def _cpu_s() -> float:
    """CPU seconds this process has used (all its threads, user + system): over a wall interval,
    how many cores it kept busy."""
    t = os.times()
    return t.user + t.system


def _decode_shard(job):
    """One process's share of decode_bound: load_image on each file; (files, seconds)."""
    from cnnx.runtime.preprocess import load_image

    paths, spec = job
    t0 = time.perf_counter()
    for p in paths:
        load_image(p, spec)
    return len(paths), time.perf_counter() - t0


def decode_bound(folder: Path, model: str, batch: int) -> dict:
    """What CPU decoding allows classify on these files: load_image alone in one process per
    core (no pipeline, no model: the decode bound of issue 8's goal 1 where decoding is the
    limit), and cnnx's decode processes (procdecode, as `cnnx classify` runs them) without a model."""
    import multiprocessing as mp

    from cnnx.runtime import Classifier, workers
    from cnnx.runtime.discover import Discovery
    from cnnx.runtime.pipeline import PipelineConfig, batched_runs
    from cnnx.runtime.procdecode import DecodePool

    with Classifier(model, "cpu") as clf:
        spec = clf.info.spec
    files = sorted(str(p) for p in folder.rglob("*.jpg"))
    cores = workers.cores()
    shards = [(files[i::cores], spec) for i in range(cores)]
    with mp.get_context("forkserver").Pool(cores) as pool:
        pool.map(_decode_shard, [(s[:8], spec) for s, _ in shards])  # imports and page cache warm
        t0 = time.perf_counter()
        done = pool.map(_decode_shard, shards)
        wall = time.perf_counter() - t0
    out = {"files": len(files), "cores": cores, "load_image_img_s": round(len(files) / wall, 1),
           "load_image_core_s_per_1000": round(1000 * sum(s for _, s in done) / len(files), 3)}
    config = PipelineConfig(batch_size=batch)
    pool = DecodePool(config.resolved_workers())
    try:
        t0 = time.perf_counter()
        n = sum(len(b.paths) for _items, b in pool.decoded_batches(batched_runs(Discovery([str(folder)]).runs(), batch), spec,
                                                                    config))
        out.update(procdecode_img_s=round(n / (time.perf_counter() - t0), 1), procdecode_workers=len(pool.procs))
    finally:
        pool.close()
    return out


STARTUP_SCRIPT = """
import sys, time
t0 = time.perf_counter()
import numpy as np, onnxruntime as ort
from cnnx.runtime import cuda
cuda.preload(ort)
session = ort.InferenceSession(sys.argv[1], providers=[sys.argv[2], "CPUExecutionProvider"])
inp = session.get_inputs()[0]
x = np.zeros((int(sys.argv[3]), *inp.shape[1:]), dtype=np.uint8)
session.run(None, {inp.name: x})
print(time.perf_counter() - t0, session.get_providers()[0])
"""


def startup_floor(model: str, device: str, batch: int, rounds: int = 3) -> dict:
    """What any onnxruntime process pays before its first result, which no pipeline can avoid:
    a fresh Python that imports numpy and onnxruntime, loads the CUDA libraries, creates the
    session and runs one batch (best of `rounds`; wall from the process start, and the same
    from the first import)."""
    provider = {"cuda": "CUDAExecutionProvider", "tensorrt": "TensorrtExecutionProvider"}.get(device,
                                                                                              "CPUExecutionProvider")
    walls, inner = [], []
    for _ in range(rounds):
        t0 = time.perf_counter()
        r = subprocess.run([sys.executable, "-c", STARTUP_SCRIPT, model, provider, str(batch)], capture_output=True,
                           text=True, check=True, cwd=ROOT)
        walls.append(time.perf_counter() - t0)
        inner.append(float(r.stdout.split()[0]))
        ran = r.stdout.split()[1]
    return {"provider": ran, "batch": batch, "process_s": round(min(walls), 3), "after_interpreter_s": round(min(inner), 3),
            "rounds": rounds}


def replicated(src: Path, dest: Path, copies: int) -> Path:
    """dest/c<i>/<class>/ for i < copies, each with hard links to all of src's files: a folder
    `copies` times as large, made in seconds, read from the same page cache."""
    if dest.is_dir():
        return dest
    for i in range(copies):
        linked_subset(src, dest / f"c{i}", None)
    return dest


def marginal_rate(small: dict, large: dict, ceiling: float) -> dict:
    """The extra files of the larger run over its extra seconds (start-up taken out), and its
    ratio to the ceiling; None where the larger run was not slower (a tiny --smoke run)."""
    more_s = large["wall_s"] - small["wall_s"]
    if more_s <= 0:
        return {"marginal_img_s": None, "marginal_ratio_to_ceiling": None}
    marginal = (large["files"] - small["files"]) / more_s
    return {"marginal_img_s": round(marginal, 1), "marginal_ratio_to_ceiling": round(marginal / ceiling, 3)}


def steady_state(model: str, small: Path, large: Path, device: str, batch: int, work: Path, ceiling: float,
                 rounds: int = 2, baselines=(), extra=()) -> dict:
    """cnnx classify on `small` and `large` (best of `rounds` each): the marginal rate
    (large - small files over the difference of the walls) is the pipeline's own throughput,
    with the start-up (the same in both) taken out; its ratio to the ceiling. baselines:
    folders each with another version's cnnx/ (and its commit in COMMIT), measured the same
    way in the same rounds (the order of the versions reversed every other round)."""
    trees = [None, *baselines]
    runs = {(i, name): [] for i in range(len(trees)) for name in ("small", "large")}
    for r in range(rounds):
        for i in (range(len(trees)) if r % 2 == 0 else reversed(range(len(trees)))):
            for name, folder in (("small", small), ("large", large)):
                runs[i, name].append(classify(model, folder, device, batch, work, ceiling, tree=trees[i], extra=extra))

    def summary(i):
        best = {name: min(runs[i, name], key=lambda x: x["wall_s"]) for name in ("small", "large")}
        return {**best, **marginal_rate(best["small"], best["large"], ceiling), "rounds": rounds}

    out = summary(0)
    if baselines:
        out["baselines"] = []
        for i, folder in enumerate(baselines, 1):
            commit = Path(folder) / "COMMIT"
            b = {"commit": commit.read_text().strip() if commit.is_file() else None, **summary(i)}
            b["this_vs_it"] = (round(out["marginal_img_s"] / b["marginal_img_s"], 3)
                               if out["marginal_img_s"] and b["marginal_img_s"] else None)
            # The whole process on `small` (start-up, its files, exit): what a user times.
            b["small_wall_it_over_this"] = round(b["small"]["wall_s"] / out["small"]["wall_s"], 3)
            out["baselines"].append(b)
    return out


API_LOOP = """
import json, sys, time
from cnnx.runtime.api import Classifier
model, device, batch, small, large = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4], sys.argv[5]
out = {}
with Classifier(model, device, batch_size=batch, topk=1) as clf:
    for name, folder in (("warm-up", small), ("small", small), ("large", large), ("small", small), ("large", large)):
        t0 = time.perf_counter()
        n = sum(len(r.paths) for r in clf.classify([folder]).results())
        wall = time.perf_counter() - t0
        if name in out and out[name]["wall_s"] <= wall:
            continue
        out[name] = {"files": n, "wall_s": round(wall, 3)}
print(json.dumps(out))
"""


def steady_state_api(model: str, small: Path, large: Path, device: str, batch: int, ceiling: float) -> dict:
    """Classifier.classify(...).results() in one process (the decode processes and the session
    started once), nothing written: the marginal rate of the runtime alone, without the CLI's CSV
    rows, progress and start-up; against the CLI's, what its rows cost."""
    r = subprocess.run([sys.executable, "-c", API_LOOP, model, device, str(batch), str(small), str(large)],
                       capture_output=True, text=True, check=True, cwd=ROOT, timeout=120)
    out = json.loads(r.stdout.strip().splitlines()[-1])
    return {**out, **marginal_rate(out["small"], out["large"], ceiling)}


def steady_state_by_batch(model: str, small: Path, large: Path, device: str, work: Path, batches, seconds: float) -> dict:
    """The steady state at other --batch-size values, each against the ceiling at its own batch:
    a batch's fixed costs in the caller (its messages, the numpy calls on its logits, the hand-over
    to a run's thread) are paid once for more files."""
    out = {}
    for b in batches:
        ceiling = ceilings(model, device, b, seconds, only_ceiling=True)["ceiling_img_s"]
        out[str(b)] = {"ceiling_img_s": ceiling, **steady_state(model, small, large, device, b, work, ceiling)}
    return out


PROFILE_RATE = 200  # py-spy samples a second


def profile(model: str, folder: Path, device: str, batch: int, work: Path, out: Path, site: Path,
            gil: bool = False, extra=()) -> dict:
    """py-spy record of `cnnx classify` on `folder`: every thread, idle samples included,
    PROFILE_RATE a second, collapsed stacks -> `out`; the main thread's share of samples by where
    they were. gil: only the samples of the thread holding the GIL (py-spy --gil): their sum
    over the run's wall x PROFILE_RATE is how busy the GIL was (near 1: the one process's threads
    wait for each other), the main thread's share of them what it holds."""
    spy = site / "bin" / "py-spy"
    if not spy.is_file():
        spy = shutil.which("py-spy")
        if spy is None:
            raise RuntimeError(f"no py-spy in {site / 'bin'} or on PATH: put its wheel in a --wheels folder")
    target = work / "profile-out.csv"
    target.unlink(missing_ok=True)
    Path(str(target.with_suffix("")) + ".errors.csv").unlink(missing_ok=True)
    cmd = [str(spy), "record", "--format", "raw", "--gil" if gil else "--idle", "--threads", "--rate",
           str(PROFILE_RATE), "--output", str(out), "--", sys.executable, "-m", "cnnx", "classify", str(folder),
           "--model", model, "-o", str(target), "--topk", "1", "--device", device, "--batch-size", str(batch), *extra]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=120)
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        raise RuntimeError(f"py-spy exit {r.returncode}: {(r.stderr.strip().splitlines() or [''])[-1]}")
    summary = collapsed_summary(out)
    extra = {}
    if gil:
        held = sum(summary["threads"].values())
        extra = {"wall_s": round(wall, 3), "gil_held_share_of_wall": round(held / (wall * PROFILE_RATE), 3),
                 "main_thread_share_of_gil": round(summary["main_samples"] / held, 3) if held else None}
    return {"file": out.name, **summary, **extra}


def collapsed_summary(path: Path, top: int = 25) -> dict:
    """Per thread: samples; for the main thread (profile_parts.raw_profile's: by its name, the
    thread with the most samples where it has none; with --gil not always the busiest), the
    samples by the innermost frame of cnnx's own code (else the innermost frame), the
    top `top`. A line of py-spy's raw format: `thread (id);frame;frame... count`."""
    from profile_parts import raw_profile

    lines, threads, main = raw_profile(path)
    by_thread, names = {}, {}
    for thread, frames, count in lines:
        if ": " in frames[0]:
            names[thread] = frames[0].split(": ", 1)[1]
        ours = [f for f in frames[1:] if "cnnx/" in f]
        if len(frames) == 1:  # a sample with no Python frame (the thread starting or ending)
            key = "(no Python frame)"
        else:
            key, leaf = (ours or frames[1:])[-1], frames[-1]
            key = key if leaf == key else f"{key} > {leaf}"
        counts = by_thread.setdefault(thread, {})
        counts[key] = counts.get(key, 0) + count

    def ranked(thread, n):
        return [[k, v, round(v / threads[thread], 3)]
                for k, v in sorted(by_thread[thread].items(), key=lambda kv: -kv[1])[:n]]

    # The other threads (decode feeders, resize pool, runs): where each spent its samples, by name.
    others = {f"{names.get(t, '?')} {t}": {"samples": threads[t], "top": ranked(t, 5)}
              for t in sorted(threads, key=threads.get, reverse=True) if t != main}
    return {"threads": threads, "main_thread": main, "main_samples": threads[main],
            "main_top": ranked(main, top), "other_threads": others}


def gpu_decoder(smoke: bool, workers: int = 0, shared: bool = False, resize_sessions: int = 1):
    """The GPU decoder (nvImageCodec + the resize on CUDA); --smoke: the same code on nvImageCodec's
    CPU backend and the CPU provider. shared: as --decoder auto makes it, each batch shared with
    `workers` CPU threads."""
    from cnnx.runtime.gpudecode import GpuDecoder
    from cnnx.runtime.pipeline import PipelineConfig

    workers = workers or PipelineConfig().resolved_workers()
    return GpuDecoder(device="cpu" if smoke else "cuda", workers=workers, share_threads=workers if shared else 0,
                      resize_sessions=resize_sessions)


def gpu_decode_only(folder: Path, size: int, smoke: bool, resize_sessions: int = 1, module=None) -> dict:
    """images/s of the GPU decoder alone on the photos, to the model's size; what it passed to the CPU.
    module: another version's gpudecode (_baseline_gpudecodes), whose decoder then runs."""
    from cnnx.runtime.discover import Discovery
    from cnnx.runtime.pipeline import PipelineConfig, batched_runs
    from cnnx.runtime.preprocess import make_spec

    spec = make_spec(size, (0.5,) * 3, (0.25,) * 3)
    if module is None:
        from cnnx.runtime import gpudecode as module

        dec = gpu_decoder(smoke, resize_sessions=resize_sessions)
    else:
        dec = module.GpuDecoder(device="cpu" if smoke else "cuda", workers=PipelineConfig().resolved_workers())
    try:
        t0, cpu0 = time.perf_counter(), _cpu_s()
        n = sum(len(b.paths) for _items, b in module.decoded_batches(batched_runs(Discovery([str(folder)]).runs(), BATCH),
                                                                      spec, PipelineConfig(batch_size=BATCH), dec))
        wall = time.perf_counter() - t0
    finally:
        dec.close()
    return {"files": n, "img_s": round(n / wall, 1), "on_gpu": dec.on_gpu, "to_cpu": dec.to_cpu, "device": dec.device,
            "cores_busy": round((_cpu_s() - cpu0) / wall, 2)}


def gpu_decode_ceiling(folder: Path, smoke: bool, batch: int = 32) -> dict:
    """nvImageCodec's own decode rate on the photos (bytes already in memory, batches of `batch`,
    every image synchronised, no resize, no copy back): the most any GPU-decode pipeline on this
    card can give. Beside it the photos' megapixels, to compare with the CPU decode pipeline."""
    from cnnx.runtime import gpudecode

    nv = gpudecode.import_nvimgcodec()
    datas = [p.read_bytes() for p in sorted(folder.iterdir())]
    if smoke:
        dec, cudart = nv.Decoder(device_id=nv.NVIMGCODEC_DEVICE_CPU_ONLY, backends=[nv.Backend(nv.BackendKind.CPU_ONLY)]), None
    else:
        dec, cudart = gpudecode._gpu_decoder(nv, 0), gpudecode._CudaRuntime(0)
    r = _nvimgcodec_rate(nv, dec, cudart, datas, batch)
    pixels, decoded = r.pop("pixels"), r["decoded"]
    return {"files": len(datas), "batch": batch, **r, "megapixels_s": round(pixels / r["wall_s"] / 1e6, 1),
            "mean_megapixels": round(pixels / max(decoded, 1) / 1e6, 2)}


def _nvimgcodec_rate(nv, dec, cudart, datas, batch: int) -> dict:
    """nvImageCodec decoder `dec` on the bytes `datas`, `batch` a call, every image synchronised
    (cudart None: host images), after one warm-up call (its buffers, the hardware engines):
    decoded images, their pixels, img/s, wall seconds and cores_busy, nvImageCodec's own CPU work
    (parsing; Huffman decoding where its hybrid backend takes an image): what it leaves the CPU
    decoder when the two share the files."""
    from cnnx.runtime import gpudecode

    params = gpudecode._decode_params(nv)

    def run(chunk):
        imgs = dec.decode([nv.CodeStream(d) for d in chunk], params=params)
        if cudart is not None:
            cudart.synchronize(i.cuda_stream for i in imgs if i is not None)
        return imgs

    run(datas[:batch])
    t0, cpu0 = time.perf_counter(), _cpu_s()
    pixels, decoded = 0, 0
    for i in range(0, len(datas), batch):
        for img in run(datas[i:i + batch]):
            if img is not None:
                decoded += 1
                pixels += img.shape[0] * img.shape[1]
    wall = time.perf_counter() - t0
    return {"decoded": decoded, "pixels": pixels, "img_s": round(decoded / wall, 1), "wall_s": round(wall, 3),
            "cores_busy": round((_cpu_s() - cpu0) / wall, 2)}


def gpu_decode_backends(folder: Path, smoke: bool, batch: int = 32) -> dict:
    """gpu_decode_ceiling's measure for each of nvImageCodec's GPU backends alone (the hardware
    JPEG engines, CUDA, and the hybrid that decodes the Huffman stream on the CPU): img/s, files
    it took, and the cores it kept busy. Which one takes the photos, and at what CPU cost, is what
    decides whether GPU decoding leaves the CPU free (cnnx's decoder lists all three, in this order)."""
    from cnnx.runtime import gpudecode

    if smoke:
        return {"skipped": "no GPU backends on the CPU"}
    nv = gpudecode.import_nvimgcodec()
    datas = [p.read_bytes() for p in sorted(folder.iterdir())]
    cudart = gpudecode._CudaRuntime(0)
    out = {}
    for kind in ("HW_GPU_ONLY", "GPU_ONLY", "HYBRID_CPU_GPU"):
        try:
            dec = nv.Decoder(device_id=0, backends=[nv.Backend(getattr(nv.BackendKind, kind))])
            r = _nvimgcodec_rate(nv, dec, cudart, datas, batch)
            out[kind] = {"decoded": r["decoded"], "files": len(datas), "img_s": r["img_s"],
                         "cores_busy": r["cores_busy"]}
        except Exception as e:  # noqa: BLE001 - a backend this build or card lacks: say so, go on
            out[kind] = {"error": f"{type(e).__name__}: {str(e)[:200]}"}
    return out


def _baseline_gpudecodes(baselines) -> dict:
    """{commit: the gpudecode module of that --baseline tree, loaded beside this tree's} for each
    distinct gpudecode.py among the baselines that differs from this tree's (its own imports of
    cnnx resolve to this tree: only its decoder and resize graph are the baseline's)."""
    import hashlib
    import importlib.util

    def digest(path):
        return hashlib.sha256(path.read_bytes()).hexdigest()

    seen, out = {digest(ROOT / "cnnx" / "runtime" / "gpudecode.py")}, {}
    for folder in baselines:
        path = Path(folder) / "cnnx" / "runtime" / "gpudecode.py"
        if not path.is_file() or digest(path) in seen:
            continue
        seen.add(digest(path))
        commit = (Path(folder) / "COMMIT").read_text().strip() if (Path(folder) / "COMMIT").is_file() else str(folder)
        name = f"baseline_gpudecode_{len(out)}"
        spec = importlib.util.spec_from_file_location(name, path)
        module = sys.modules[name] = importlib.util.module_from_spec(spec)  # dataclasses look it up there
        try:
            spec.loader.exec_module(module)
        except Exception as e:  # noqa: BLE001 - a baseline needing what this tree no longer has: say so
            del sys.modules[name]
            out[commit] = f"{type(e).__name__}: {str(e)[:200]}"
            continue
        out[commit] = module
    return out


def _resize_rate(decoder, images, size: int) -> dict:
    """img/s of decoder._resize over `images` in the decoder's CPU threads, after one untimed pass
    (each thread's sessions made), and the cores this process kept busy meanwhile."""
    list(decoder.pool.map(lambda img: decoder._resize(img, size, size), images))
    t0, cpu0 = time.perf_counter(), _cpu_s()
    done = sum(r is not None for r in decoder.pool.map(lambda img: decoder._resize(img, size, size), images))
    wall = time.perf_counter() - t0
    return {"img_s": round(done / wall, 1), "cores_busy": round((_cpu_s() - cpu0) / wall, 2)}


def gpu_decode_steps(folder: Path, size: int, smoke: bool, n: int = 96, baselines=()) -> dict:
    """--decoder gpu's steps one at a time, each alone, on n photos (which one holds GpuDecoder at a
    third of nvImageCodec's own rate?):
      read_route_img_s    reading each file and jpeg_route, in the decoder's CPU threads
      decode_img_s        nvImageCodec on the groups decode_images forms (_device_group), one call at
                          a time, synchronised (GpuDecoder._decode_on_gpu)
      resize_ms_one_thread  the resize graph on those decoded images one after another, one thread:
                          ms an image, copy back included (GpuDecoder._resize)
      resize_img_s        the same in the decoder's CPU threads, with resize_sessions 1 (what runs),
                          4 and one a thread
      resize_profile      onnxruntime's profile of the resize graph on 8 of the images: the share of
                          each operator in the nodes' time, and the mean of a whole run (on CUDA a
                          node's time is its launch, the run's includes the wait for the copy back)
      padded_share        the share of the photos whose crop needs its edge repeated (the graph with
                          Expand and Concat; camera sizes, multiples of 8, need none)
      resize_img_s_by_graph  the resize rate on the photos of each graph ("plain", "padded"), here
                          and for each baseline on the same photos: what the plain graph gains
      decode_only         GpuDecoder alone on every photo (gpu_decode_only) with one resize session
                          and with one a thread
      baselines           for each --baseline tree with another gpudecode.py: its resize_img_s (its
                          own graph and sessions, the same images and threads) and its decode_only"""
    from collections import deque

    import onnxruntime as ort

    from cnnx.runtime import gpudecode
    from cnnx.runtime.cuda import new_session
    from cnnx.runtime.pipeline import PipelineConfig

    workers = PipelineConfig().resolved_workers()
    paths = sorted(str(p) for p in folder.iterdir())
    dec = gpu_decoder(smoke)
    out = {"photos": min(n, len(paths)), "workers": workers}
    try:
        t0 = time.perf_counter()
        routed = list(dec.pool.map(lambda p: dec._read_and_route(p, 1 << 40), paths[:n]))
        out["read_route_img_s"] = round(len(routed) / (time.perf_counter() - t0), 1)
        todo = deque((p, d) for p, d, reason in routed if reason is None)
        groups = []
        while group := gpudecode._device_group(todo, threading.Lock()):
            groups.append([d for _p, d in group])
        dec._decode_on_gpu(groups[0][:2])  # warm-up: buffers, the engines
        t0 = time.perf_counter()
        images = [img for g in groups for img in dec._decode_on_gpu(g) if img is not None]
        out["decode_img_s"] = round(len(images) / (time.perf_counter() - t0), 1)
        out["decoded"] = len(images)
        for img in images[:4]:
            dec._resize(img, size, size)  # warm-up: each box-filter factor's session
        t0 = time.perf_counter()
        for img in images:
            dec._resize(img, size, size)
        out["resize_ms_one_thread"] = round(1000 * (time.perf_counter() - t0) / len(images), 3)
        out["resize_img_s"] = {}
        for sessions in sorted({1, 4, workers}):
            d = gpu_decoder(smoke, workers=workers, resize_sessions=sessions)
            try:
                out["resize_img_s"][str(sessions)] = _resize_rate(d, images, size)
            finally:
                d.close()
        # onnxruntime's own profile of the resize, per operator
        prof_dir = Path(tempfile.mkdtemp(prefix="cnnx-resize-prof-"))
        by_op, runs, files = {}, [], []
        sample = images[:8]

        def graph(img):  # the resize graph _resize takes for this image: (pool, padded)
            pool = gpudecode.pool_factor(img.shape[0], img.shape[1], size, size)
            return pool, gpudecode.resize_feeds(img.shape[0], img.shape[1], size, size, pool)[0]

        for key in sorted({graph(i) for i in sample}):
            options = ort.SessionOptions()
            options.log_severity_level = 3
            options.enable_profiling = True
            options.profile_file_prefix = str(prof_dir / f"pool{key[0]}-{'padded' if key[1] else 'plain'}")
            session = new_session(ort, gpudecode.resize_model_bytes(*key), options, dec._providers)
            d = gpu_decoder(smoke, workers=1)
            d._sessions[key] = session  # resize_sessions 1: keyed by (pool, padded) alone
            try:
                for img in sample:
                    if graph(img) == key:
                        d._resize(img, size, size)
            finally:
                d.close()
            files.append(session.end_profiling())
        out["padded_share"] = round(sum(graph(i)[1] for i in images) / len(images), 3)
        groups = {"plain": [i for i in images if not graph(i)[1]], "padded": [i for i in images if graph(i)[1]]}

        def by_graph(d):  # the same decoder's resize rate on the images of each graph of this tree
            return {name: _resize_rate(d, group, size) for name, group in groups.items() if group}

        d = gpu_decoder(smoke, workers=workers)
        try:
            out["resize_img_s_by_graph"] = by_graph(d)
        finally:
            d.close()
        out["baselines"] = {}
        for commit, module in _baseline_gpudecodes(baselines).items():
            if isinstance(module, str):
                out["baselines"][commit] = {"error": module}
                continue
            d = module.GpuDecoder(device="cpu" if smoke else "cuda", workers=workers)
            try:
                out["baselines"][commit] = {"resize_img_s": _resize_rate(d, images, size),
                                            "resize_img_s_by_graph": by_graph(d)}
            finally:
                d.close()
            out["baselines"][commit]["decode_only"] = gpu_decode_only(folder, size, smoke, module=module)
        for f in files:
            for e in json.loads(Path(f).read_text()):
                if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
                    key = f"{e['args'].get('op_name')} ({e['args'].get('provider', '?')})"
                    by_op[key] = by_op.get(key, 0) + e["dur"]
                elif e.get("cat") == "Session" and e["name"] == "model_run":
                    runs.append(e["dur"])
        total = sum(by_op.values()) or 1
        out["resize_profile"] = {
            "runs": len(runs), "run_us_mean": round(sum(runs) / max(1, len(runs)), 1),
            "nodes_us_per_run": round(total / max(1, len(runs)), 1),
            "by_op_share": {k: round(v / total, 3) for k, v in sorted(by_op.items(), key=lambda kv: -kv[1])}}
        shutil.rmtree(prof_dir, ignore_errors=True)
    finally:
        images = None
        dec.close()
    out["decode_only"] = {str(s): gpu_decode_only(folder, size, smoke, resize_sessions=s) for s in (1, workers)}
    return out


def gpu_decode_diagnose(folder: Path, size: int, smoke: bool, n: int = 12) -> dict:
    """Where GPU-decoded pixels part from load_image's, one step at a time, on n photos:
    nvImageCodec's full-size decode (copied to the host) vs Pillow's; the resize graph on the
    CPU provider on those host pixels vs load_image; the same graph on the device (pool 1 and
    pool_factor's) vs on the CPU; and the image's stream and array interface."""
    import numpy as np
    import onnxruntime as ort
    from PIL import Image

    from cnnx.runtime import gpudecode
    from cnnx.runtime.preprocess import load_image, make_spec

    spec = make_spec(size, (0.5,) * 3, (0.25,) * 3)
    dec = gpu_decoder(smoke)
    nv = dec.nvimgcodec
    cpu_sessions = {}
    rows, first = [], None
    try:
        for path in sorted(folder.iterdir())[:n]:
            img = dec.decoder.decode(nv.CodeStream(path.read_bytes()), params=dec.params)
            if dec.cudart is not None:
                dec.cudart.synchronize_device()
            if first is None:
                cai = img.__cuda_array_interface__ if dec.device == "cuda" else img.__array_interface__
                first = {"shape": list(img.shape), "strides": str(img.strides), "cuda_stream": img.cuda_stream,
                         "interface": {k: str(v) for k, v in cai.items() if k != "data"}, "buffer_kind": str(img.buffer_kind)}
            host = np.asarray(img.cpu())
            full = np.asarray(Image.open(path).convert("RGB"))
            h, w = full.shape[:2]
            load, _note = load_image(str(path), spec)
            row = {"file": path.name, "hw": [h, w], "host_shape": list(host.shape),
                   "nvjpeg_vs_pillow_full": round(float(np.abs(host.astype(int) - full).mean()), 3)}
            for pool in sorted({1, gpudecode.pool_factor(h, w, size, size)}):
                if pool not in cpu_sessions:
                    cpu_sessions[pool] = ort.InferenceSession(gpudecode.resize_model_bytes(pool),
                                                              providers=["CPUExecutionProvider"])
                rgb = np.ascontiguousarray(host.reshape(h, -1))
                on_cpu = cpu_sessions[pool].run(None, {"pixels": rgb, **gpudecode.crop_feeds(h, w, size, size, pool)})[0][0]
                on_dev = dec._resize(img, size, size, pool)
                row[f"pool{pool}"] = {
                    "cpu_graph_vs_load_image": round(float(np.abs(on_cpu.astype(int) - load).mean()), 3),
                    "device_graph_vs_cpu_graph": None if on_dev is None else round(float(np.abs(on_dev.astype(int) - on_cpu).mean()), 3),
                    "device_graph_vs_load_image": None if on_dev is None else round(float(np.abs(on_dev.astype(int) - load).mean()), 3)}
            rows.append(row)
    finally:
        dec.close()
    return {"first_image": first, "rows": rows}


def gpu_decode_pixels(folder: Path, size: int, smoke: bool, n: int = 64, model: str | None = None,
                      device: str = "cpu") -> dict:
    """The GPU decoder's uint8 model input vs load_image's on n photos: mean and max |diff| (levels).
    With a model (of this size): its logits on both, max |diff|, top-1 agreement, how many classes
    it gave, and the top-1 agreement of the centred logits (each class's mean over the images
    taken away): a model with random weights gives nearly every image the same class, and then
    only the centred argmax depends on the image."""
    import numpy as np

    from cnnx.runtime.pipeline import decode_images
    from cnnx.runtime.preprocess import make_spec

    spec = make_spec(size, (0.5,) * 3, (0.25,) * 3)
    paths = sorted(str(p) for p in folder.iterdir())[:n]
    dec = gpu_decoder(smoke)
    try:
        mine, ok, failed, _notes = dec.decode_images(paths, spec, 1 << 40)
    finally:
        dec.close()
    ref, ref_ok, _f, _n = decode_images(paths, spec, 1 << 40)
    if ok != ref_ok:
        raise SystemExit(f"the decoders decoded different files: {len(ok)} vs {len(ref_ok)}; failed {failed[:3]}")
    diff = np.abs(mine.astype(np.int16) - ref.astype(np.int16))
    per_image = diff.reshape(len(ok), -1).mean(1)
    out = {"n": len(ok), "mean_abs": round(float(diff.mean()), 3), "max_abs": int(diff.max()),
           "worst_image_mean_abs": round(float(per_image.max()), 3), "on_gpu": dec.on_gpu, "to_cpu": dec.to_cpu}
    if model is not None:
        from cnnx.runtime import Classifier

        with Classifier(model, device, batch_size=16) as clf:
            a, b = clf.predict(ref), clf.predict(mine)
        top_a, top_b = (a - a.mean(0)).argmax(1), (b - a.mean(0)).argmax(1)
        out["logits"] = {"max_abs": round(float(np.abs(a - b).max()), 4),
                         "top1_agreement": round(float((a.argmax(1) == b.argmax(1)).mean()), 4),
                         "distinct_top1_classes": len(set(a.argmax(1).tolist())),
                         "centred_top1_agreement": round(float((top_a == top_b).mean()), 4),
                         "centred_distinct_classes": len(set(top_a.tolist()))}
    return out


MIN_CLASSES_SHOWN = 10  # top-1 agreement of a model giving fewer classes on the photos is not evidence


def _top1_agreement(ref: dict, other: dict) -> tuple:
    """{path: top-1 index} twice -> (files in both, share of them with the same top-1)."""
    common = set(ref) & set(other)
    return len(common), sum(ref[p] == other[p] for p in common) / max(1, len(common))


def gpu_decode_classify(model: str, folder: Path, device: str, batch: int, smoke: bool,
                        shared: bool = False) -> dict:
    """The photos through Classifier.classify (cnnx classify's pipeline, in this process) with the
    CPU decoder and with the GPU decoder, back to back: img/s of each, the ratio, and top-1
    agreement of the GPU-decoded predictions with the CPU-decoded ones (the reference).
    shared: also the GPU decoder as --decoder auto makes it (each batch shared with CPU threads),
    its ratio to the CPU decoder and its agreement ("auto_decode", "auto_vs_cpu_decode")."""
    from cnnx.runtime import Classifier, Prediction

    out = {}
    top1 = {}
    for name in ("cpu", "gpu", "auto") if shared else ("cpu", "gpu"):
        decoder = "cpu" if name == "cpu" else gpu_decoder(smoke, shared=name == "auto")
        with Classifier(model, device, batch_size=batch, decoder=decoder) as clf:
            t0, cpu0 = time.perf_counter(), _cpu_s()
            rows = [r for r in clf.classify([str(folder)]) if isinstance(r, Prediction)]
            wall = time.perf_counter() - t0
            out[f"{name}_decode"] = {"files": len(rows), "wall_s": round(wall, 2), "img_s": round(len(rows) / wall, 1),
                                     "provider": clf.provider, "cores_busy": round((_cpu_s() - cpu0) / wall, 2)}
            if clf.gpu_decoder is not None:
                out[f"{name}_decode"].update(on_gpu=clf.gpu_decoder.on_gpu, to_cpu=clf.gpu_decoder.to_cpu)
        top1[name] = {r.path: r.indices[0] for r in rows}
    n, agree = _top1_agreement(top1["cpu"], top1["gpu"])
    ratio = out["gpu_decode"]["img_s"] / max(out["cpu_decode"]["img_s"], 1e-9)
    # A model that gives (nearly) every image one class agrees trivially: below MIN_CLASSES_SHOWN
    # classes the agreement shows nothing, and the goal is left undecided (None), not met.
    classes = len(set(top1["cpu"].values()))
    out.update(n=n, distinct_top1_classes=classes, top1_agreement=round(agree, 4), agreement_goal=0.995,
               agreement_met=(agree >= 0.995) if classes >= MIN_CLASSES_SHOWN else None,
               gpu_vs_cpu_decode=round(ratio, 2), speed_goal=3.0, speed_met=ratio >= 3.0)
    if shared:
        auto_ratio = out["auto_decode"]["img_s"] / max(out["cpu_decode"]["img_s"], 1e-9)
        out.update(auto_vs_cpu_decode=round(auto_ratio, 2), auto_top1_agreement=round(
            _top1_agreement(top1["cpu"], top1["auto"])[1], 4), speed_met=max(ratio, auto_ratio) >= 3.0)
    return out


def classify_rows_agreement(model: str, folder: Path, device: str, batch: int) -> dict:
    """Classifier.classify (cnnx classify's pipeline) on `device` vs on the CPU provider, same
    files: top-1 agreement of the rows and how many classes they give (the IOBinding path's
    end-to-end check: every batch must run its own pixels)."""
    from cnnx.runtime import Classifier, Prediction

    top1 = {}
    for dev in (device, "cpu"):
        with Classifier(model, dev, batch_size=batch) as clf:
            top1[dev] = {r.path: r.indices[0] for r in clf.classify([str(folder)]) if isinstance(r, Prediction)}
    n, agree = _top1_agreement(top1["cpu"], top1[device])
    return {"n": n, "top1_agreement": round(agree, 5), "distinct_top1_classes": len(set(top1["cpu"].values()))}


def cpu_decode_check(n_photos: int, work: Path) -> int:
    """On a machine without a GPU: what the GPU-decode code path gives on nvImageCodec's CPU
    backend (libjpeg-turbo, full-size decode) + the same resize graph on the CPU provider, vs
    load_image, on 2-12 MP photos: pixels and top-1 of a 224 px resnet18 (seeded random weights:
    no pretrained weights here). -> benchmarks/results/gpu_decode_cpu.json"""
    sys.path.insert(0, str(ROOT))
    from _results import RESULTS, write_result

    from tests._runtime_util import make_onnx_model

    work.mkdir(parents=True, exist_ok=True)
    out = {"what": "GPU-decode code path on nvImageCodec's CPU backend + ONNX resize (CPU provider) vs "
                   "load_image; agreement through resnet18 224 px, seeded random weights; 'small': more, "
                   "smaller photos (0.25-1 MP) for a larger agreement sample on these 2 cores"}
    out["photos"] = photos(work / "photos-cpu-check", n_photos, (2, 4, 8, 12), None)
    model = work / "resnet18-224" / "model.onnx"
    if not model.exists():
        make_onnx_model(model, arch="resnet18", size=224, class_names=[f"class{i:04d}" for i in range(1000)])
    folder = work / "photos-cpu-check"
    out["pixels"] = gpu_decode_pixels(folder, 224, True, n=n_photos, model=str(model))
    out["classify"] = gpu_decode_classify(str(model), folder, "cpu", 16, True)
    small = work / "photos-cpu-check-small"
    out["small"] = {"photos": photos(small, 6 * n_photos, (0.25, 0.5, 1), None),
                    "pixels": gpu_decode_pixels(small, 224, True, n=6 * n_photos, model=str(model)),
                    "classify": gpu_decode_classify(str(model), small, "cpu", 16, True)}
    out["decode_only_cpu"] = decode_only(folder, 224)
    out["decode_only_nvimgcodec_cpu"] = gpu_decode_only(folder, 224, True)
    write_result(RESULTS / "gpu_decode_cpu.json", out, [__file__, "--cpu-decode-check", "--photos", str(n_photos)])
    log(json.dumps(out, indent=1))
    return 0


# --- the run ----------------------------------------------------------------------------------------

def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--results", type=Path, help="folder for gpu_classify.json (required unless --prepare)")
    ap.add_argument("--cifar-tar", type=Path, default=CIFAR_TAR, help="tarball of cifar10/train/<class>/*.jpg")
    ap.add_argument("--jpegs", type=Path, help="real JPEG photos to classify beside the synthetic ones")
    ap.add_argument("--airnet-checkpoint", type=Path,
                    help="a trained airnet best.pt (e.g. gpu_train.py's) for the airnet figures and the GPU-decode "
                         "agreement (a seeded random model gives nearly one class: its agreement shows nothing)")
    ap.add_argument("--wheel-parts", type=Path, action="append", default=[],
                    help="folder of NAME.whl.part-NN files to join and install (--target --site)")
    ap.add_argument("--wheels", type=Path, action="append", default=[], help="folder of wheels to install")
    ap.add_argument("--site", type=Path, default=Path("/tmp/cnnx-site"))
    ap.add_argument("--work", type=Path, default=Path("/tmp/cnnx-gpu-bench"))
    ap.add_argument("--photos", type=int, default=480, help="synthetic 2-12 MP photos to make")
    ap.add_argument("--budget-s", type=float, default=420.0, help="stages that would end later are skipped")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU provider: proves the script")
    ap.add_argument("--baseline", type=Path, action="append", default=[],
                    help="a folder with another commit's cnnx/ package (and COMMIT): steady state A/B (repeatable)")
    ap.add_argument("--stages", help="comma-separated stage names to run (default: all); the others are not run")
    ap.add_argument("--prepare", action="store_true",
                    help="make here what the GPU run carries (wheels, tarball, baselines, checkpoint), then exit")
    ap.add_argument("--baseline-commit", action="append", default=[],
                    help="--prepare: put this commit's cnnx/ in .data/baseline-<commit> (repeatable)")
    ap.add_argument("--train-airnet", action="store_true",
                    help="--prepare: train .data/airnet-best.pt with cnnx train's airnet recipe (minutes here), "
                         "unless --airnet-checkpoint gives one")
    ap.add_argument("--cpu-decode-check", action="store_true",
                    help="no GPU: the GPU-decode path on nvImageCodec's CPU backend vs load_image "
                         "-> benchmarks/results/gpu_decode_cpu.json")
    a = ap.parse_args(argv)
    if a.prepare:
        airnet = str(a.airnet_checkpoint) if a.airnet_checkpoint else ("train" if a.train_airnet else None)
        return prepare(a.cifar_tar, a.baseline_commit, airnet)
    if a.cpu_decode_check:
        return cpu_decode_check(a.photos, a.work)
    if a.results is None:
        ap.error("--results DIR is required")
    wheels = install_wheels(a.wheel_parts, a.wheels, a.site)  # before onnxruntime is imported
    os.environ["CNNX_BENCH_CACHE"] = str(a.work)  # bench_classify's scratch files go here too
    a.work.mkdir(parents=True, exist_ok=True)
    smoke = a.smoke
    device = "cpu" if smoke else "cuda"
    seconds = 0.5 if smoke else 3.0
    run = Run(a.results / ("gpu_classify-smoke.json" if smoke else "gpu_classify.json"), a.budget_s,
              None if argv is None else [__file__, *argv], only=a.stages and set(a.stages.split(",")))
    from _results import compile_bytecode

    run.results.update(smoke=smoke, device=device, wheels_installed=wheels, batch_default=BATCH,
                       bytecode=compile_bytecode(ROOT, *a.baseline))

    info = run.stage("card", card, need_s=0)
    if not smoke and not (info or {}).get("cuda_diagnosis", "").startswith("CUDA provider: usable"):
        log(f"CUDA cannot run here: {(info or {}).get('cuda_diagnosis')}; nothing to measure")
        return 1
    variants = ["fp32", "fp16"]
    from cnnx.runtime import cuda

    if not smoke and cuda.diagnose_tensorrt().usable:
        variants.append("tensorrt")

    cifar = run.stage("cifar", cifar_folder, a.cifar_tar, a.work, 20 if smoke else None, need_s=15)
    if cifar is None:
        return 1
    cifar_small = linked_subset(cifar, a.work / "cifar-small", 5 if smoke else 500)
    verify = linked_subset(cifar, a.work / "cifar-verify", 2 if smoke else 10)
    mp = (0.05, 0.1, 0.2) if smoke else (2, 4, 8, 12)
    run.stage("photos", photos, a.work / "photos", 6 if smoke else a.photos, mp, a.jpegs, need_s=30)
    photo_dir = a.work / "photos"
    models = {}
    for arch, size, classes in (("resnet18", 64 if smoke else 224, 10 if smoke else 1000), ("airnet", 32, 10)):
        models[arch] = run.stage(f"export_{arch}", export, arch, size, classes, a.work, verify,
                                 8 if smoke else 64, a.airnet_checkpoint if arch == "airnet" else None, need_s=60)

    sets = {"resnet18": photo_dir, "airnet": cifar}
    real = sorted(str(p) for p in verify.rglob("*.jpg"))
    for arch, folder in sets.items():
        m = models.get(arch)
        if not m:
            continue
        for variant in variants:
            path = m["fp16"] if variant == "fp16" else m["fp32"]
            dev = "tensorrt" if variant == "tensorrt" else device
            key = f"{arch}_{variant}"
            c = run.stage(f"ceiling_{key}", ceilings, path, dev, BATCH, seconds, need_s=20)
            run.stage(f"classify_{key}", classify, path, folder, dev, BATCH, a.work,
                      c and c["ceiling_img_s"], need_s=30)
            if not smoke:
                run.stage(f"cuda_vs_cpu_{key}", agreement, path, dev, real, need_s=15)
    # That cnnx classify's rows on CUDA (its IOBinding runner, GPU decoding) are the CPU's: before
    # anything it measures, as a run cut short skips the last stages.
    if models.get("airnet"):
        run.stage("classify_rows_cuda_vs_cpu_airnet", classify_rows_agreement, models["airnet"]["fp32"], cifar_small,
                  device, BATCH, need_s=30)
        run.stage("gpu_decode_classify_airnet_cifar", gpu_decode_classify, models["airnet"]["fp32"], cifar, device,
                  BATCH, smoke, need_s=40)
    # The photos and GPU decoding, before the CIFAR steady state
    run.stage("decode_only_photos", decode_only, photo_dir, 224, need_s=20)
    if models.get("resnet18"):
        size = models["resnet18"]["size"]
        run.stage("gpu_decode_ceiling", gpu_decode_ceiling, photo_dir, smoke, need_s=20)
        run.stage("gpu_decode_backends", gpu_decode_backends, photo_dir, smoke, need_s=30)
        run.stage("gpu_decode_steps", gpu_decode_steps, photo_dir, size, smoke, baselines=a.baseline, need_s=40)
        run.stage("gpu_decode_diagnose", gpu_decode_diagnose, photo_dir, size, smoke, need_s=20)
        run.stage("gpu_decode_only_photos", gpu_decode_only, photo_dir, size, smoke, need_s=20)
        run.stage("gpu_decode_pixels", gpu_decode_pixels, photo_dir, size, smoke, model=models["resnet18"]["fp32"],
                  device=device, need_s=15)
        run.stage("gpu_decode_classify_resnet18", gpu_decode_classify, models["resnet18"]["fp32"], photo_dir,
                  device, BATCH, smoke, shared=True, need_s=50)
        # Where --decoder gpu's time goes (it reached a third of nvImageCodec's own rate on the H100)
        run.stage("profile_gpu_decode_resnet18", profile, models["resnet18"]["fp32"], photo_dir, device, BATCH,
                  a.work, a.results / "profile_gpu_decode_resnet18.txt", a.site, extra=("--decoder", "gpu"), need_s=30)
    ceiling = (run.results.get("ceiling_airnet_fp32") or {}).get("ceiling_img_s")
    large = None
    if models.get("airnet"):
        run.stage("decode_bound_cifar", decode_bound, cifar, models["airnet"]["fp32"], BATCH, need_s=20)
        run.stage("startup_floor_airnet", startup_floor, models["airnet"]["fp32"], device, BATCH, need_s=15)
        if ceiling:
            large = run.stage("cifar_x10", replicated, cifar, a.work / "cifar-x10", 2 if smoke else 10, need_s=30)
        if large:
            run.stage("steady_state_airnet_fp32", steady_state, models["airnet"]["fp32"], cifar, large, device,
                      BATCH, a.work, ceiling, rounds=3, baselines=a.baseline, need_s=20 * (1 + len(a.baseline)))
    if not smoke:  # the CUDA tests, before the stages that only explain the figures
        run.stage("pytest_gpu", pytest_on_gpu, a.cifar_tar, need_s=90)
    if large:
        cores = os.cpu_count() or 1
        run.stage("steady_state_workers_airnet_fp32", lambda: {
            str(w): steady_state(models["airnet"]["fp32"], cifar, large, device, BATCH, a.work, ceiling,
                                 extra=("--workers", str(w)))
            for w in sorted({max(1, cores - 4), max(1, cores - 2), cores})}, need_s=60)
        run.stage("steady_state_api_airnet_fp32", steady_state_api, models["airnet"]["fp32"], cifar, large,
                  device, BATCH, ceiling, need_s=30)
        run.stage("steady_state_batch_airnet_fp32", steady_state_by_batch, models["airnet"]["fp32"], cifar,
                  large, device, a.work, (512, 1024), seconds / 2, need_s=60)
        run.stage("profile_airnet_fp32", profile, models["airnet"]["fp32"], large, device, BATCH, a.work,
                  a.results / "profile_airnet_fp32.txt", a.site, need_s=30)
        run.stage("profile_gil_airnet_fp32", profile, models["airnet"]["fp32"], large, device, BATCH,
                  a.work, a.results / "profile_gil_airnet_fp32.txt", a.site, gil=True, need_s=30)
    if models.get("airnet"):
        run.stage("gpu_decode_classify_airnet_photos", gpu_decode_classify, models["airnet"]["fp32"], photo_dir,
                  device, BATCH, smoke, need_s=30)

    sweep = (32, 64, 128) if smoke else (64, 128, 256, 512, 1024, 2048)
    for arch in ("resnet18", "airnet"):
        if models.get(arch):
            run.stage(f"sweep_ceiling_{arch}", lambda m=models[arch]["fp32"]: {
                str(b): ceilings(m, device, b, seconds / 2, only_ceiling=True)["ceiling_img_s"] for b in sweep}, need_s=40)
    if models.get("airnet"):
        run.stage("sweep_classify_airnet", lambda: {
            str(b): classify(models["airnet"]["fp32"], cifar, device, b, a.work, None)["img_s"] for b in sweep},
            need_s=60)
        run.stage("memory_airnet", lambda: {
            "files_large": (big := classify(models["airnet"]["fp32"], cifar, device, BATCH, a.work, None, True)),
            "files_small": (few := classify(models["airnet"]["fp32"], cifar_small, device, BATCH, a.work, None, True)),
            "ratio": round(big["peak_rss_mib"] / few["peak_rss_mib"], 3)}, need_s=40)
    if models.get("resnet18"):
        run.stage("slots_resnet18", ceilings, models["resnet18"]["fp32"], device, BATCH, seconds, slots=(1, 2, 3),
                  need_s=20)
    run.not_run()
    summarize(run.results)
    run.save()
    return 0


def pytest_on_gpu(cifar_tar: Path) -> dict:
    """This issue's tests where CUDA runs (the CUDA-only ones skip on a CPU machine). The
    tests' CIFAR fixture reads ../shared/datasets/ beside the checkout: linked there from the
    carried tarball when this (throwaway) machine has none."""
    shared = ROOT.parent / "shared" / "datasets" / "cifar10-train.tar.gz"
    if not shared.exists():
        shared.parent.mkdir(parents=True, exist_ok=True)
        shared.symlink_to(cifar_tar.resolve())
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider",
                        "tests/test_classify_gpu.py", "tests/test_cuda_diagnosis.py", "tests/test_gpudecode.py"],
                       capture_output=True, text=True, cwd=ROOT, timeout=240)
    return {"returncode": r.returncode, "tail": r.stdout.strip().splitlines()[-12:]}


def _met(flag) -> str:
    return {True: "met", False: "not met", None: "not shown: too few classes"}[flag]


def _img_s(x) -> str:
    return "-" if x is None else f"{x:,.0f}"


def summarize(r: dict):
    """The figures a reader wants first, on stdout."""
    lines = [f"card: {r.get('card', {}).get('nvidia_smi')} | torch: {r.get('card', {}).get('torch')}"]
    for key in sorted(k for k in r if k.startswith("ceiling_")):
        name = key[len("ceiling_"):]
        c, k = r[key], r.get(f"classify_{name}", {})
        lines.append(f"{name:18s} session.run {c['session_run_img_s']:>9,.0f}  ceiling {c['ceiling_img_s']:>9,.0f}  "
                     f"classify {k.get('img_s', 0):>9,.0f} img/s  ratio {k.get('ratio_to_ceiling', '-')} "
                     f"(after 1st batch {k.get('ratio_after_first_batch', '-')})  host {c['host_memory']}")
    for key in ("sweep_ceiling_resnet18", "sweep_ceiling_airnet", "sweep_classify_airnet"):
        if r.get(key):
            best = max(r[key], key=lambda b: r[key][b])
            lines.append(f"{key}: {r[key]}  best --batch-size {best}")
    if r.get("memory_airnet"):
        lines.append(f"memory: peak RSS ratio {r['memory_airnet']['ratio']} "
                     f"({r['memory_airnet']['files_large']['files']} vs {r['memory_airnet']['files_small']['files']} files)")
    if r.get("decode_bound_cifar"):
        b, k = r["decode_bound_cifar"], r.get("classify_airnet_fp32", {})
        lines.append(f"decode bound (CIFAR, {b['cores']} processes): load_image {b['load_image_img_s']:,.0f} img/s, "
                     f"decode processes {b['procdecode_img_s']:,.0f} img/s; classify airnet fp32 "
                     f"{k.get('img_s', 0):,.0f} img/s = {k.get('img_s', 0) / b['load_image_img_s']:.2f} of it")
    if r.get("startup_floor_airnet") and r.get("ceiling_airnet_fp32") and r.get("classify_airnet_fp32"):
        f, c, k = r["startup_floor_airnet"], r["ceiling_airnet_fp32"], r["classify_airnet_fp32"]
        infer_s = k["files"] / c["ceiling_img_s"]
        lines.append(f"start-up floor {f['process_s']} s ({f['provider']}): a process classifying {k['files']:,} files "
                     f"can reach at most {infer_s / (infer_s + f['process_s']):.3f} of the ceiling; classify took "
                     f"{k['wall_s']} s")
    if r.get("steady_state_airnet_fp32"):
        st = r["steady_state_airnet_fp32"]
        lines.append(f"steady state: {st['large']['files']:,} vs {st['small']['files']:,} files, marginal "
                     f"{_img_s(st['marginal_img_s'])} img/s = {st['marginal_ratio_to_ceiling']} of the ceiling")
        if sa := r.get("steady_state_api_airnet_fp32"):
            lines.append(f"  the Python API, nothing written: marginal {_img_s(sa['marginal_img_s'])} img/s = "
                         f"{sa['marginal_ratio_to_ceiling']}")
        for b, sb in (r.get("steady_state_batch_airnet_fp32") or {}).items():
            lines.append(f"  --batch-size {b}: marginal {_img_s(sb['marginal_img_s'])} img/s = "
                         f"{sb['marginal_ratio_to_ceiling']} of its ceiling {sb['ceiling_img_s']:,.0f}")
        for w, sw in (r.get("steady_state_workers_airnet_fp32") or {}).items():
            lines.append(f"  --workers {w}: marginal {_img_s(sw['marginal_img_s'])} img/s = {sw['marginal_ratio_to_ceiling']}")
        for b in st.get("baselines", []):
            lines.append(f"  baseline {b['commit']}: marginal {_img_s(b['marginal_img_s'])} img/s = "
                         f"{b['marginal_ratio_to_ceiling']} of the ceiling; this tree / it {b['this_vs_it']}; "
                         f"{st['small']['files']:,} files, whole process: it {b['small']['wall_s']} s, "
                         f"this tree {st['small']['wall_s']} s")
    if r.get("profile_airnet_fp32"):
        pr = r["profile_airnet_fp32"]
        lines.append(f"profile ({pr['file']}): main thread {pr['main_samples']} samples; top: "
                     + "; ".join(f"{k} {share}" for k, _n, share in pr["main_top"][:8]))
    if pg := r.get("profile_gil_airnet_fp32"):
        lines.append(f"GIL ({pg['file']}): held {pg['gil_held_share_of_wall']} of the wall, the main thread "
                     f"{pg['main_thread_share_of_gil']} of that; its top: "
                     + "; ".join(f"{k} {share}" for k, _n, share in pg["main_top"][:6]))
    if r.get("decode_only_photos"):
        lines.append(f"decode only (photos, CPU threads): {r['decode_only_photos']}")
    if r.get("gpu_decode_classify_resnet18"):
        g, c = r["gpu_decode_classify_resnet18"], r.get("ceiling_resnet18_fp32", {})
        limit = r.get("decode_only_photos", {}).get("img_s", 0) < c.get("ceiling_img_s", 0)
        lines.append(f"GPU decode (resnet18 fp32 on the photos): {g['gpu_decode']['img_s']:,.0f} vs CPU decode "
                     f"{g['cpu_decode']['img_s']:,.0f} img/s = {g['gpu_vs_cpu_decode']}x (goal 3x, "
                     f"{'met' if g['speed_met'] else 'not met'}; CPU decoding is {'' if limit else 'not '}the limit), "
                     f"top-1 agreement {g['top1_agreement']} on {g['n']}, {g['distinct_top1_classes']} classes given "
                     f"(goal 0.995, {_met(g['agreement_met'])})")
        if "auto_decode" in g:
            lines.append(f"  --decoder auto (the batch shared with CPU threads): {g['auto_decode']['img_s']:,.0f} img/s = "
                         f"{g['auto_vs_cpu_decode']}x the CPU decoder; on the GPU {g['auto_decode'].get('on_gpu')}, "
                         f"to the CPU {g['auto_decode'].get('to_cpu')}; top-1 agreement {g['auto_top1_agreement']}")
    if r.get("gpu_decode_backends"):
        lines.append(f"nvImageCodec by backend (photos): {r['gpu_decode_backends']}")
    if r.get("gpu_decode_only_photos"):
        lines.append(f"GPU decode only (photos): {r['gpu_decode_only_photos']}; pixels vs load_image: "
                     f"{r.get('gpu_decode_pixels')}")
    if st := r.get("gpu_decode_steps"):
        lines.append(f"GPU decode steps (photos): read+route {st['read_route_img_s']:,} img/s, nvImageCodec "
                     f"{st['decode_img_s']:,}, resize {st['resize_ms_one_thread']} ms in one thread, by resize "
                     f"sessions {st['resize_img_s']}; decoder alone by sessions "
                     f"{ {k: v['img_s'] for k, v in st['decode_only'].items()} }; resize run "
                     f"{st['resize_profile']['run_us_mean']} us, ops {list(st['resize_profile']['by_op_share'].items())[:4]}")
        lines.append(f"  resize by graph (plain / padded photos): {st.get('resize_img_s_by_graph')}")
        for commit, b in st.get("baselines", {}).items():
            lines.append(f"  baseline {commit[:12]}: " + (b["error"] if "error" in b else
                         f"resize {b['resize_img_s']['img_s']:,} img/s (by graph {b['resize_img_s_by_graph']}), "
                         f"decoder alone {b['decode_only']['img_s']:,}"))
    if r.get("slots_resnet18"):
        lines.append(f"slots 1 vs 2: {r['slots_resnet18']}")
    if r["skipped"]:
        lines.append(f"skipped: {r['skipped']}")
    print("\n".join(lines), flush=True)


if __name__ == "__main__":
    sys.exit(main())
