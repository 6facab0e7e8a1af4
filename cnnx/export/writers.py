"""The export writers as a table: one small function per artifact that writes its file into
the staging folder, and one wrapper (`run_writer`, after Ultralytics' `@try_export`) that gives
every format the same timing, log line and one-line failure. Each entry also says which
parity backends check the file it wrote."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from cnnx.export.errors import ExportError
from cnnx.export.parity import Backend
from cnnx.runtime.contract import CPU_PROVIDER, CUDA_PROVIDER_ENTRY, INPUT_NAME
from cnnx.runtime.files import first_line, interruption, is_disk_full, users_temp_folder

# Output file per artifact; `cnnx classify` looks for model.onnx.
FILENAMES = {
    "onnx": "model.onnx",
    "onnx-fp16": "model.fp16.onnx",
    "onnx-int8": "model.int8.onnx",
    "torchscript": "model.torchscript.pt",
    "pt2": "model.pt2",
    "parity": "parity.json",
}
EXPORT_FILES = frozenset(FILENAMES.values())  # all an export folder may hold (cnnx.export.publish)
LOW_SPACE = 1 << 20  # bytes free below which a failed write is reported as a full disk


@dataclass
class Job:
    """What the writers share: the model, where files go, and what they recorded."""

    ckpt: dict
    sha256: str
    module: object  # uint8 images -> logits (cnnx.train.zoo.Uint8Input), eval mode
    example_images: np.ndarray  # a uint8 batch of the preprocess size, for tracing
    staging: Path
    opset: int | None  # --opset; once the ONNX writer ran, the opset it wrote (parity.json records it)
    calibration: np.ndarray | None  # uint8 images for int8
    say: Callable[[str], None]
    paths: dict = field(default_factory=dict)  # artifact -> Path in staging
    seconds: dict = field(default_factory=dict)  # artifact -> seconds to write it

    @property
    def example(self):
        import torch

        return torch.from_numpy(self.example_images)

    def path(self, name: str) -> Path:
        return self.staging / FILENAMES[name]

    @property
    def tta_views(self) -> int:
        from cnnx.train.zoo import tta_views

        return tta_views(self.module)

    def meta(self, variant: str = "fp32") -> dict:
        from cnnx.export.metadata import model_metadata

        return model_metadata(self.ckpt, self.sha256, variant, self.tta_views)


@dataclass(frozen=True)
class Writer:
    label: str  # "<label> failed: ..." on failure
    write: Callable[[Job], object]  # writes job.path(name); returns what `backends` needs
    backends: Callable[[Job, object], list]  # parity backends that run the written artifact


# The largest batch the parity gate sends at once (real images go in chunks of this size):
# the TensorRT engine's shape profile must cover it.
PARITY_MAX_BATCH = 256


def _ort_session(path, providers):
    from cnnx.runtime.cuda import new_session, onnxruntime

    ort = onnxruntime()

    opts = ort.SessionOptions()
    opts.log_severity_level = 3 if providers == [CPU_PROVIDER] else 4  # a GPU probe that fails is not news
    return new_session(ort, os.fspath(path), opts, providers)


def _gpu_providers(path, variant: str) -> list:
    """(backend name, provider list) of the GPU providers that can run here, per
    cnnx.runtime.cuda's diagnosis. CUDA with the options `cnnx classify` runs it with
    (CUDA_PROVIDER_ENTRY: TF32 off), TensorRT with the engine cache and shape profile
    `cnnx classify --device tensorrt` uses, so the gate checks what users will run."""
    from cnnx.runtime import cuda

    if variant == "int8" or not cuda.diagnose().usable:
        return []
    out = [("onnxruntime-cuda", [CUDA_PROVIDER_ENTRY, CPU_PROVIDER])]
    if cuda.diagnose_tensorrt().usable:
        from cnnx.runtime.contract import parse_metadata

        import onnx

        meta = parse_metadata({p.key: p.value for p in onnx.load(os.fspath(path), load_external_data=False).metadata_props})
        trt = (cuda.TENSORRT_PROVIDER, cuda.tensorrt_options(path, PARITY_MAX_BATCH, meta.spec["size"]))
        out.append(("onnxruntime-tensorrt", [trt, CUDA_PROVIDER_ENTRY, CPU_PROVIDER]))
    return out


def onnx_backends(path, variant: str, label: str) -> list:
    """onnxruntime CPU always; CUDA and TensorRT too when a session really runs on them here."""
    cpu = _ort_session(path, [CPU_PROVIDER])
    out = [Backend(f"onnxruntime-cpu{label}", variant, lambda x, s=cpu: s.run(None, {INPUT_NAME: x})[0])]
    for name, providers in _gpu_providers(path, variant):
        first = providers[0][0]
        try:
            session = _ort_session(path, providers)
        except Exception:  # noqa: BLE001 - diagnosed usable but the session failed: not this backend
            continue
        if session.get_providers()[0] == first:  # never a silent fallback counted as the GPU
            out.append(Backend(f"{name}{label}", variant, lambda x, s=session: s.run(None, {INPUT_NAME: x})[0]))
    return out


def activation_peak(module, images, batch_size: int = 256) -> float:
    """The largest |value| any submodule of `module` outputs on `images` (uint8 N,3,H,W numpy),
    eager, float32: where it passes float16's largest number (65,504), an fp16 model that
    computes in float16 (onnxruntime's CUDA provider) overflows to inf/NaN. The gate needs it
    from here: onnxruntime's CPU provider runs an fp16 model's operators in float32 (it casts
    around them), so its logits never show the overflow."""
    import torch

    peak = 0.0

    def hook(_mod, _inputs, output):
        nonlocal peak
        for t in output if isinstance(output, (tuple, list)) else (output,):
            if isinstance(t, torch.Tensor) and t.is_floating_point() and t.numel():
                peak = max(peak, float(t.detach().abs().max()))

    handles = [m.register_forward_hook(hook) for m in module.modules()]
    try:
        with torch.no_grad():
            for i in range(0, len(images), batch_size):
                module(torch.from_numpy(images[i:i + batch_size]))
    finally:
        for h in handles:
            h.remove()
    return peak


def torch_runner(module):
    import torch

    def run(x):
        with torch.no_grad():
            return module(torch.from_numpy(x)).numpy()

    return run


def _write_onnx(job):
    from cnnx.export.onnx import export_onnx

    model = export_onnx(job.module, job.example, job.path("onnx"), meta=job.meta(), opset=job.opset)
    # what parity.json records: the opset written, which the exporter chose where --opset was not given
    job.opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))


def _write_torchscript(job):
    from cnnx.export.torchscript import export_torchscript

    return export_torchscript(job.module, job.example, job.path("torchscript"), meta=job.meta())


def _write_pt2(job):
    from cnnx.export.pt2 import export_pt2

    return export_pt2(job.module, job.example, job.path("pt2"), meta=job.meta())


def _write_fp16(job):
    from cnnx.export.quantize import to_fp16

    to_fp16(job.path("onnx"), job.path("onnx-fp16"), meta=job.meta("fp16"))


def _write_int8(job):
    from cnnx.export.quantize import to_int8

    to_int8(job.path("onnx"), job.path("onnx-int8"), calibration=job.calibration, meta=job.meta("int8"))


# In the order they run: the variants are converted from the fp32 ONNX file.
WRITERS = {
    "onnx": Writer("ONNX export", _write_onnx, lambda job, _: onnx_backends(job.path("onnx"), "fp32", "")),
    "torchscript": Writer("TorchScript export", _write_torchscript,
                          lambda job, traced: [Backend("torchscript", "fp32", torch_runner(traced))]),
    "pt2": Writer("pt2 export", _write_pt2, lambda job, program: [Backend("pt2", "fp32", torch_runner(program))]),
    "onnx-fp16": Writer("fp16 conversion", _write_fp16,
                        lambda job, _: onnx_backends(job.path("onnx-fp16"), "fp16", " fp16")),
    "onnx-int8": Writer("int8 quantisation", _write_int8,
                        lambda job, _: onnx_backends(job.path("onnx-int8"), "int8", " int8")),
}


def _failure_line(label: str, error: Exception, folder: Path) -> str:
    """One line for a writer's failure. A full disk is named as such, whether the writer said
    so with an OSError or (torch's writers) only with a RuntimeError on a disk that is full."""
    try:
        low = shutil.disk_usage(folder).free < LOW_SPACE
    except OSError:
        low = False
    if low:
        return f"{label} failed: No space left on device in {folder.parent} (free some space and export again)"
    path = Path(os.path.abspath(os.fsdecode(error.filename))) if getattr(error, "filename", None) else None
    staged = path is not None and path.is_relative_to(folder)  # the staging folder, gone with the failure: its place
    if is_disk_full(error):  # not the output's disk: the file it names, or a temporary one (int8's calibration)
        temporary = path is None or path.is_relative_to(tempfile.gettempdir())  # (or the one kept apart in it)
        where = (f"the temporary folder {users_temp_folder()} ($TMPDIR)" if temporary and not staged
                 else folder.parent if staged else path.parent)
        return f"{label} failed: No space left on device in {where} (free some space and export again)"
    if staged and getattr(error, "strerror", None):
        return f"{label} failed: {error.strerror} (writing {path.name} in {folder.parent})"
    root = error
    for _ in range(16):  # torch's exporter wraps the reason (a missing op) in generic errors
        if root.__cause__ is None:
            break
        root = root.__cause__
    because = f" (cause: {first_line(root)})" if root is not error else ""
    return f"{label} failed: {first_line(error)}{because}"


@contextlib.contextmanager
def _noticing_interrupts():
    """Yield a list that gets the number of a Ctrl-C (or of a SIGTERM that files.ends_as_terminated
    turns into one), which still raises as the handler in place does: torch's exporters import
    modules lazily (triton), and an import interrupted there is caught inside torch and fails
    later as an AttributeError, which read as a failed export (exit 1) where the user had pressed
    Ctrl-C (130). Only where Python's handlers are (the main thread; not where SIGINT is ignored)."""
    seen = []
    if threading.current_thread() is not threading.main_thread():
        yield seen
        return
    handlers = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
    taken = {signum: handler for signum, handler in handlers.items() if callable(handler)}

    def interrupted(signum, frame):
        seen.append(signum)
        taken[signum](signum, frame)

    for signum in taken:
        signal.signal(signum, interrupted)
    try:
        yield seen
    finally:
        for signum, handler in taken.items():
            signal.signal(signum, handler)


def run_writer(name: str, job: Job) -> list:
    """Write one artifact: log, time, record its path; any failure becomes one ExportError
    line. Returns the parity backends for it."""
    writer = WRITERS[name]
    job.say(f"exporting {name} ...")
    t0 = time.perf_counter()
    try:
        with _noticing_interrupts() as interrupted:
            made = writer.write(job)
        job.seconds[name] = round(time.perf_counter() - t0, 3)
        job.paths[name] = job.path(name)
        backends = writer.backends(job, made)
    except ExportError:
        raise
    except Exception as e:  # noqa: BLE001 - the exporters raise many types; the user gets one line
        if interrupted:  # a Ctrl-C (SIGTERM) that the exporter swallowed and failed on: still one
            raise interruption(interrupted[0]) from None
        raise ExportError(_failure_line(writer.label, e, job.staging)) from None
    size = job.paths[name].stat().st_size / (1 << 20)
    job.say(f"exported {name} in {job.seconds[name]:.1f} s ({size:.1f} MiB)")
    return backends
