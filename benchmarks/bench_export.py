"""Export benchmark (issue 3): per zoo architecture, on this CPU, in one run:
  - export seconds per format (cnnx.export.api.export_checkpoint, parity gate included),
  - images/s at batch 1 and 256 for eager PyTorch (the baseline), TorchScript, pt2,
    onnxruntime fp32, fp16 and int8,
  - top-1 of every variant on held-out CIFAR-10 images, and its change against eager.
Goals (seed-cnn): onnxruntime fp32 >= 2x eager images/s; int8 a further >= 1.5x over fp32
with <= 0.5 points of top-1 lost.

Data: a CIFAR-10 JPEG folder DIR/<class>/*.jpg (--cifar, else $CNNX_CIFAR_DIR, else
/tmp/cifar10/train; cifar_jpegs.py makes one): the first --train-per-class images of each class train the model for --epochs (plain SGD,
flips), images 4000..4099 of each class calibrate int8 / feed the parity gate, and the last
--val-per-class images of each class are the validation images. --epochs 0 benchmarks an
untrained model (speed and agreement only; its accuracy means nothing).

Run under the shared CPU lock:  flock /tmp/cnnx-cpu.lock python benchmarks/bench_export.py --arch seed-cnn
Writes benchmarks/results/export-<arch>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _results import RESULTS, write_result  # noqa: E402
from cifar_jpegs import cifar_folder  # noqa: E402

CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def log(msg):
    print(msg, file=sys.stderr, flush=True)


def files_of(root: Path, start: int, stop: int | None):
    out = []
    for ci, c in enumerate(CLASSES):
        files = sorted((root / c).iterdir())
        out += [(f, ci) for f in files[start:stop]]
    return out


def decode(files, spec):
    from cnnx.runtime.preprocess import load_image

    x = np.stack([load_image(f, spec)[0] for f, _ in files])
    return x, np.asarray([c for _, c in files], dtype=np.int64)


def train(model, spec, x, y, epochs: int, batch: int = 64, lr: float = 0.02, seed: int = 0):
    """Plain SGD with momentum, a cosine lr and random flips: a short, honest baseline model."""
    import math

    import torch

    from cnnx.train.zoo import Uint8Input

    net = Uint8Input(model, spec["mean"], spec["std"]).train()
    opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=5e-4)
    g = torch.Generator().manual_seed(seed)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    steps = epochs * (len(yt) // batch)
    step = 0
    for _ in range(epochs):
        perm = torch.randperm(len(yt), generator=g)
        for i in range(0, len(perm) - batch + 1, batch):
            idx = perm[i:i + batch]
            xb = xt[idx]
            flip = torch.rand(len(idx), generator=g) < 0.5
            xb = torch.where(flip.view(-1, 1, 1, 1), xb.flip(3), xb)
            for group in opt.param_groups:
                group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / max(1, steps)))
            loss = torch.nn.functional.cross_entropy(net(xb), yt[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
    model.eval()
    return steps


def rate(fn, x, min_seconds: float) -> float:
    """Images/s: one warm-up call, then the median of >= 3 timed calls spanning >= min_seconds."""
    fn(x)
    times, start = [], time.perf_counter()
    while len(times) < 3 or time.perf_counter() - start < min_seconds:
        t = time.perf_counter()
        fn(x)
        times.append(time.perf_counter() - t)
    return len(x) / statistics.median(times)


def batched(fn, x, bs=256):
    return np.concatenate([np.asarray(fn(x[i:i + bs])) for i in range(0, len(x), bs)])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--arch", default="seed-cnn")
    p.add_argument("--size", type=int, default=None, help="input side (default: the arch's; 32 for CIFAR nets)")
    p.add_argument("--cifar", type=Path, help="CIFAR-10 JPEG folder (default $CNNX_CIFAR_DIR or /tmp/cifar10/train)")
    p.add_argument("--train-per-class", type=int, default=2000)
    p.add_argument("--val-per-class", type=int, default=500)
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--min-seconds", type=float, default=2.0, help="timing window per measurement")
    p.add_argument("--big-batch", type=int, default=256)
    p.add_argument("--out", type=Path, default=RESULTS, help="folder for export-<arch>.json")
    a = p.parse_args(argv)

    import onnxruntime as ort
    import torch

    from cnnx.export.api import export_checkpoint
    from cnnx.runtime.preprocess import make_spec
    from cnnx.train.checkpoint import build_checkpoint, save_checkpoint
    from cnnx.train.zoo import Uint8Input, create_model, get_arch

    torch.set_num_threads(a.threads)
    arch = get_arch(a.arch)
    spec = make_spec(a.size or arch.image_size, arch.mean, arch.std)
    data = cifar_folder(a.cifar)
    t0 = time.perf_counter()
    xtr, ytr = decode(files_of(data, 0, a.train_per_class), spec)
    xva, yva = decode(files_of(data, 5000 - a.val_per_class, None), spec)
    log(f"decoded {len(ytr)} train / {len(yva)} val images in {time.perf_counter() - t0:.1f} s")

    torch.manual_seed(0)
    model = create_model(a.arch, len(CLASSES))
    t0 = time.perf_counter()
    steps = train(model, spec, xtr, ytr, a.epochs) if a.epochs else 0
    train_s = time.perf_counter() - t0
    log(f"trained {a.arch} for {a.epochs} epochs ({steps} steps) in {train_s:.0f} s")

    work = Path(tempfile.mkdtemp(prefix=f"bench-export-{a.arch}-"))
    calib = work / "calib"
    for f, c in files_of(data, 4000, 4100):
        (calib / CLASSES[c]).mkdir(parents=True, exist_ok=True)
        os.symlink(f, calib / CLASSES[c] / f.name)
    ckpt_path = work / "run" / "best.pt"
    save_checkpoint(build_checkpoint(model=model, arch=a.arch, arch_kwargs={}, class_names=CLASSES, preprocess=spec,
                                     epoch=a.epochs, metrics={}, config={}), ckpt_path)
    from cnnx.export.errors import ParityError

    refused = None
    t0 = time.perf_counter()
    try:
        result = export_checkpoint(ckpt_path, formats=("all",), verify_data=calib, fp16=True, int8=True, log=log)
    except ParityError as e:  # a briefly-trained model's int8 can fail the gate: record it, go on without
        refused = {"error": str(e), "report": e.report.to_json()}
        failed = {row.variant for row in e.report.failures}
        if "fp32" in failed:  # the export itself is wrong: nothing to benchmark
            raise
        log(f"{e}; exporting again without {', '.join(sorted(failed))}")
        log(e.report.table())
        result = export_checkpoint(ckpt_path, formats=("all",), verify_data=calib, fp16="fp16" not in failed,
                                   int8="int8" not in failed, log=log)
    export_total = time.perf_counter() - t0
    log(result.parity.table())

    eager_net = Uint8Input(model, spec["mean"], spec["std"]).eval()

    def torch_fn(m):
        def run(x):
            with torch.inference_mode():
                return m(torch.from_numpy(x)).numpy()
        return run

    def ort_fn(path):
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = a.threads
        s = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        return lambda x: s.run(None, {"images": x})[0]

    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit.load's deprecation warning
        ts = torch.jit.load(str(result.paths["torchscript"]))  # a benchmark may; cnnx/ never loads TorchScript
    backends = {
        "eager": torch_fn(eager_net),
        "torchscript": torch_fn(ts),
        "pt2": torch_fn(torch.export.load(str(result.paths["pt2"])).module()),
        "onnxruntime-fp32": ort_fn(result.paths["onnx"]),
    }
    for key in ("onnx-fp16", "onnx-int8"):
        if key in result.paths:
            backends["onnxruntime-" + key[5:]] = ort_fn(result.paths[key])
    rng = np.random.default_rng(0)
    speed = {}
    for b in (1, a.big_batch):
        x = xva[rng.choice(len(xva), size=b, replace=b > len(xva))]
        for name, fn in backends.items():
            speed.setdefault(name, {})[str(b)] = round(rate(fn, x, a.min_seconds), 1)
            log(f"{name:18s} batch {b:4d}: {speed[name][str(b)]:10.1f} images/s")
    logits = {name: batched(fn, xva) for name, fn in backends.items()}
    acc = {name: round(float((lg.argmax(1) == yva).mean() * 100), 2) for name, lg in logits.items()}
    agree = {name: round(float((lg.argmax(1) == logits["eager"].argmax(1)).mean() * 100), 2) for name, lg in logits.items()}

    def ratio(num, den):
        return {b: round(speed[num][b] / speed[den][b], 2) for b in speed[den]}

    fp32_vs_eager = ratio("onnxruntime-fp32", "eager")
    has_int8 = "onnxruntime-int8" in backends
    int8_vs_fp32 = ratio("onnxruntime-int8", "onnxruntime-fp32") if has_int8 else None
    int8_loss = round(acc["eager"] - acc["onnxruntime-int8"], 2) if has_int8 else None
    goals = {
        "onnxruntime_fp32_>=2x_eager": {b: r >= 2.0 for b, r in fp32_vs_eager.items()},
        "int8_>=1.5x_fp32": {b: r >= 1.5 for b, r in int8_vs_fp32.items()} if has_int8 else None,
        "int8_top1_loss_<=0.5pt": int8_loss <= 0.5 if has_int8 else None,
    }
    doc = {
        "benchmark": "export",
        "arch": a.arch,
        "input_size": spec["size"],
        "threads": a.threads,
        "training": {"epochs": a.epochs, "steps": steps, "train_images": int(len(ytr)), "seconds": round(train_s, 1)},
        "validation_images": int(len(yva)),
        "export_seconds": {**result.seconds, "total_with_parity_gate": round(export_total, 2)},
        "images_per_s": speed,
        "speedup": {"onnxruntime-fp32_vs_eager": fp32_vs_eager, "int8_vs_onnxruntime-fp32": int8_vs_fp32,
                    "torchscript_vs_eager": ratio("torchscript", "eager"), "pt2_vs_eager": ratio("pt2", "eager")},
        "top1": acc,
        "top1_change_vs_eager_pt": {k: round(v - acc["eager"], 2) for k, v in acc.items()},
        "top1_agreement_with_eager": agree,
        # The gate of the export benchmarked here (it passed, or export_checkpoint would have raised):
        # max/mean abs logit difference and top-1 agreement per backend and input set.
        "parity_gate": result.parity.to_json(),
        "refused_by_parity_gate": refused,
        "goals": goals,
    }
    write_result(a.out / f"export-{a.arch}.json", doc, None if argv is None else [__file__, *argv])
    head = f"{'backend':18s} {'img/s b=1':>10s} {'img/s b=' + str(a.big_batch):>12s} {'top-1':>7s} {'vs eager':>9s}"
    print(f"{a.arch} ({spec['size'][0]}x{spec['size'][1]}, {a.threads} threads, {len(yva)} val images)")
    print(head)
    for name in backends:
        print(f"{name:18s} {speed[name]['1']:10.1f} {speed[name][str(a.big_batch)]:12.1f} {acc[name]:7.2f} "
              f"{acc[name] - acc['eager']:+8.2f}pt")
    print(f"onnxruntime fp32 / eager: {fp32_vs_eager}; int8 / fp32: {int8_vs_fp32}; int8 top-1 lost: {int8_loss} pt")
    print(f"export seconds: {doc['export_seconds']}")
    print(f"goals: {json.dumps(goals)}")


if __name__ == "__main__":
    main()
