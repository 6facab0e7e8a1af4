"""export_checkpoint: the one entry point of the exporter (the CLI, tests and benchmarks call it).

A checkpoint becomes files in a staging folder inside the output folder; the parity gate runs
on those files; only when every bound holds are they moved (os.replace, one file at a time)
over the previous export. A failure leaves the output folder as it was.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from cnnx.export.errors import ExportError, ParityError

FORMATS = ("onnx", "torchscript", "pt2")
# Output file per artifact; `cnnx classify` looks for model.onnx.
FILENAMES = {
    "onnx": "model.onnx",
    "onnx-fp16": "model.fp16.onnx",
    "onnx-int8": "model.int8.onnx",
    "torchscript": "model.torchscript.pt",
    "pt2": "model.pt2",
    "parity": "parity.json",
}
DEFAULT_PARITY_IMAGES = 1000
CALIBRATION_IMAGES = 512  # int8 calibration: enough for stable min/max, seconds on a CPU


@dataclass(frozen=True)
class ExportResult:
    out_dir: Path
    paths: dict  # artifact name (a key of FILENAMES) -> Path of the written file
    parity: object  # cnnx.export.parity.ParityReport
    checkpoint: Path
    seconds: dict = field(default_factory=dict)  # artifact -> seconds to export it


def resolve_formats(formats, *, fp16=False, int8=False) -> tuple:
    if isinstance(formats, str):
        formats = (formats,)
    out = []
    for f in formats:
        for name in (FORMATS if f == "all" else (f,)):
            if name not in FORMATS:
                raise ExportError(f"unknown format {name!r}; valid: {', '.join(FORMATS + ('all',))}")
            if name not in out:
                out.append(name)
    if (fp16 or int8) and "onnx" not in out:
        out.insert(0, "onnx")  # the variants are converted from the fp32 ONNX file
    if not out:
        raise ExportError(f"no format given; valid: {', '.join(FORMATS + ('all',))}")
    return tuple(out)


def _prepare_out_dir(out_dir: Path):
    """(folders created, outermost last; staging folder). ExportError when it cannot be written."""
    if out_dir.exists() and not out_dir.is_dir():
        raise ExportError(f"output folder {out_dir} is a file, not a folder")
    created = [p for p in [out_dir, *out_dir.parents] if not p.exists()]
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".cnnx-export-", dir=out_dir))
    except OSError as e:
        raise ExportError(f"cannot write to output folder {out_dir}: {e.strerror or e}") from None
    return created, staging


def _cleanup(staging: Path, created):
    shutil.rmtree(staging, ignore_errors=True)
    for folder in created:  # innermost first; rmdir only removes empty ones
        try:
            folder.rmdir()  # a failed first export leaves no folder behind
        except OSError:
            break


def _ort_session(path, provider):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if provider == "CUDAExecutionProvider":
        # TF32 would make CUDA disagree with eager fp32 by far more than the 1e-4 bound.
        providers = [("CUDAExecutionProvider", {"use_tf32": 0}), "CPUExecutionProvider"]
    else:
        providers = [provider]
    return ort.InferenceSession(os.fspath(path), opts, providers=providers)


def _cuda_usable() -> bool:
    """onnxruntime-gpu lists CUDAExecutionProvider even without a GPU and then logs errors when
    a session asks for it; torch's check is quiet and needs the same driver."""
    import onnxruntime as ort
    import torch

    return "CUDAExecutionProvider" in ort.get_available_providers() and torch.cuda.is_available()


def _onnx_backends(path, variant: str, label: str):
    """onnxruntime CPU always; CUDA too when its provider really runs on this machine."""
    from cnnx.runtime.contract import INPUT_NAME
    from cnnx.export.parity import Backend

    out = []
    cpu = _ort_session(path, "CPUExecutionProvider")
    out.append(Backend(f"onnxruntime-cpu{label}", variant, lambda x, s=cpu: s.run(None, {INPUT_NAME: x})[0]))
    if variant != "int8" and _cuda_usable():
        try:
            cuda = _ort_session(path, "CUDAExecutionProvider")
        except Exception:  # provider listed but unusable (no GPU / driver): CPU only
            cuda = None
        if cuda is not None and cuda.get_providers()[0] == "CUDAExecutionProvider":
            out.append(Backend(f"onnxruntime-cuda{label}", variant, lambda x, s=cuda: s.run(None, {INPUT_NAME: x})[0]))
    return out


def _torch_runner(module):
    import torch

    def run(x):
        with torch.no_grad():
            return module(torch.from_numpy(x)).numpy()

    return run


def export_checkpoint(checkpoint_path, out_dir=None, formats=("onnx",), *, opset=None, verify_data=None,
                      fp16=False, int8=False, progress=False, parity_images: int = DEFAULT_PARITY_IMAGES,
                      random_batch_sizes=None, log: Callable[[str], None] | None = None) -> ExportResult:
    """Export a cnnx checkpoint and gate it on parity with eager PyTorch.

    formats: names from FORMATS or "all"; fp16/int8 add ONNX variants. verify_data: a folder
    of images (DIR/<class>/*) for the gate and int8 calibration; default the run's validation
    split, else random inputs only (said in the report). parity_images caps the real images
    (fewer for the big torchvision models in tests; the bounds never change). Raises
    ExportError (ParityError when a bound is broken); writes nothing on failure.
    """
    from cnnx.export import images as imgs
    from cnnx.export.onnx import check_opset
    from cnnx.export.parity import RANDOM_BATCH_SIZES

    say = log or (lambda msg: None)
    formats = resolve_formats(formats, fp16=fp16, int8=int8)
    opset = check_opset(opset)
    batch_sizes = tuple(random_batch_sizes or RANDOM_BATCH_SIZES)
    checkpoint_path = Path(checkpoint_path)

    import torch

    from cnnx.export.metadata import file_sha256, model_metadata
    from cnnx.train.checkpoint import CheckpointError, load_checkpoint, model_from_checkpoint
    from cnnx.train.zoo import Uint8Input

    try:
        ckpt = load_checkpoint(checkpoint_path)
        model = model_from_checkpoint(ckpt)
    except CheckpointError as e:
        raise ExportError(str(e)) from None
    sha = file_sha256(checkpoint_path)
    spec = ckpt["preprocess"]
    wrapped = Uint8Input(model, spec["mean"], spec["std"]).eval()

    out_dir = Path(out_dir) if out_dir is not None else checkpoint_path.parent / "export"
    created, staging = _prepare_out_dir(out_dir)
    try:
        notes = []
        if verify_data is not None:
            real = imgs.load_verify_data(verify_data, spec, ckpt["class_names"], parity_images)
        else:
            real, why = imgs.validation_images(ckpt, parity_images)
            if real is None and int8:
                raise ExportError(f"--int8 needs real calibration images and {why}: pass --verify-data DIR")
            if real is None:
                notes.append(f"no real images for the parity gate: {why}; random uint8 inputs only "
                             f"(pass --verify-data DIR to check on real images)")
                say(notes[-1])
        if real is not None:
            say(f"parity images: {real.source}")
            for n in real.notes:
                say(n)

        example = torch.from_numpy(imgs.random_images(2, spec["size"], seed=1))
        paths, seconds, backends = {}, {}, []
        from cnnx.export.parity import Backend

        def staged(name):
            return staging / FILENAMES[name]

        def timed(name, fn):
            say(f"exporting {name} ...")
            t0 = time.perf_counter()
            r = fn()
            seconds[name] = round(time.perf_counter() - t0, 3)
            paths[name] = staged(name)
            say(f"exported {name} in {seconds[name]:.1f} s")
            return r

        if "onnx" in formats:
            from cnnx.export.onnx import export_onnx

            timed("onnx", lambda: export_onnx(wrapped, example, staged("onnx"), meta=model_metadata(ckpt, sha), opset=opset))
            backends += _onnx_backends(staged("onnx"), "fp32", "")
        if "torchscript" in formats:
            from cnnx.export.torchscript import export_torchscript

            traced = timed("torchscript", lambda: export_torchscript(wrapped, example, staged("torchscript"),
                                                                     meta=model_metadata(ckpt, sha)))
            backends.append(Backend("torchscript", "fp32", _torch_runner(traced)))
        if "pt2" in formats:
            from cnnx.export.pt2 import export_pt2

            program = timed("pt2", lambda: export_pt2(wrapped, example, staged("pt2"), meta=model_metadata(ckpt, sha)))
            backends.append(Backend("pt2", "fp32", _torch_runner(program)))
        if fp16:
            from cnnx.export.quantize import to_fp16

            timed("onnx-fp16", lambda: to_fp16(staged("onnx"), staged("onnx-fp16"), meta=model_metadata(ckpt, sha, "fp16")))
            backends += _onnx_backends(staged("onnx-fp16"), "fp16", " fp16")
        if int8:
            from cnnx.export.quantize import to_int8

            calib = real.images[imgs.spread(len(real.images), CALIBRATION_IMAGES)]
            timed("onnx-int8", lambda: to_int8(staged("onnx"), staged("onnx-int8"), calibration=calib,
                                               meta=model_metadata(ckpt, sha, "int8")))
            backends += _onnx_backends(staged("onnx-int8"), "int8", " int8")
            notes.append(f"int8 calibrated on {len(calib)} of the parity images")

        from cnnx.export.parity import run_parity

        say("running the parity gate ...")
        report = run_parity(_torch_runner(wrapped), backends, real=real, size=spec["size"], batch_sizes=batch_sizes,
                            progress=progress, notes=notes)
        doc = {
            "checkpoint": str(checkpoint_path),
            "checkpoint_sha256": sha,
            "arch": ckpt["arch"],
            "files": {k: FILENAMES[k] for k in paths},
            "export_seconds": seconds,
            "opset": opset,
            **report.to_json(),
        }
        paths["parity"] = staged("parity")
        paths["parity"].write_text(json.dumps(doc, indent=1) + "\n")
        if not report.passed:
            first = report.failures[0].failure
            more = len(report.failures) - 1
            raise ParityError(f"parity gate failed: {first}" + (f" (and {more} more)" if more else ""), report)
        final = {}
        # model.onnx goes last and is stamped now: `cnnx classify` without --model takes the
        # newest *.onnx under runs/, which must be the fp32 model, not a variant beside it.
        for name in sorted(paths, key=lambda n: n == "onnx"):
            final[name] = out_dir / paths[name].name
            os.replace(paths[name], final[name])
        if "onnx" in final:
            os.utime(final["onnx"])
        final = {n: final[n] for n in paths}
    except BaseException:
        _cleanup(staging, created)
        raise
    shutil.rmtree(staging, ignore_errors=True)
    return ExportResult(out_dir=out_dir, paths=final, parity=report, checkpoint=checkpoint_path, seconds=seconds)
