"""The export writers as a table: one small function per artifact that writes its file into
the staging folder, and one wrapper (`run_writer`, after Ultralytics' `@try_export`) that gives
every format the same timing, log line and one-line failure. Each entry also says which
parity backends check the file it wrote."""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from cnnx.export.errors import ExportError
from cnnx.export.parity import Backend
from cnnx.runtime.contract import CPU_PROVIDER, CUDA_PROVIDER, INPUT_NAME, cuda_driver_present
from cnnx.runtime.files import first_line, is_disk_full

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
    opset: int | None
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

    def meta(self, variant: str = "fp32") -> dict:
        from cnnx.export.metadata import model_metadata

        return model_metadata(self.ckpt, self.sha256, variant)


@dataclass(frozen=True)
class Writer:
    label: str  # "<label> failed: ..." on failure
    write: Callable[[Job], object]  # writes job.path(name); returns what `backends` needs
    backends: Callable[[Job, object], list]  # parity backends that run the written artifact


def _ort_session(path, provider):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3 if provider == CPU_PROVIDER else 4  # a CUDA probe that fails is not news
    if provider == CUDA_PROVIDER:
        # TF32 would make CUDA disagree with eager fp32 by far more than the 1e-4 bound.
        providers = [(CUDA_PROVIDER, {"use_tf32": 0}), CPU_PROVIDER]
    else:
        providers = [provider]
    return ort.InferenceSession(os.fspath(path), opts, providers=providers)


def _cuda_usable() -> bool:
    """onnxruntime-gpu lists its CUDA provider even where no driver loads (and then only logs
    errors): the one CUDA probe of the contract decides."""
    import onnxruntime as ort

    return CUDA_PROVIDER in ort.get_available_providers() and cuda_driver_present()


def onnx_backends(path, variant: str, label: str) -> list:
    """onnxruntime CPU always; CUDA too when a session really runs on it here."""
    cpu = _ort_session(path, CPU_PROVIDER)
    out = [Backend(f"onnxruntime-cpu{label}", variant, lambda x, s=cpu: s.run(None, {INPUT_NAME: x})[0])]
    if variant != "int8" and _cuda_usable():
        try:
            cuda = _ort_session(path, CUDA_PROVIDER)
        except Exception:  # noqa: BLE001 - provider present but unusable (no GPU): CPU only
            cuda = None
        if cuda is not None and cuda.get_providers()[0] == CUDA_PROVIDER:
            out.append(Backend(f"onnxruntime-cuda{label}", variant, lambda x, s=cuda: s.run(None, {INPUT_NAME: x})[0]))
    return out


def torch_runner(module):
    import torch

    def run(x):
        with torch.no_grad():
            return module(torch.from_numpy(x)).numpy()

    return run


def _write_onnx(job):
    from cnnx.export.onnx import export_onnx

    export_onnx(job.module, job.example, job.path("onnx"), meta=job.meta(), opset=job.opset)


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
    if is_disk_full(error) or low:
        return f"{label} failed: No space left on device in {folder.parent} (free some space and export again)"
    return f"{label} failed: {first_line(error)}"


def run_writer(name: str, job: Job) -> list:
    """Write one artifact: log, time, record its path; any failure becomes one ExportError
    line. Returns the parity backends for it."""
    writer = WRITERS[name]
    job.say(f"exporting {name} ...")
    t0 = time.perf_counter()
    try:
        made = writer.write(job)
        job.seconds[name] = round(time.perf_counter() - t0, 3)
        job.paths[name] = job.path(name)
        backends = writer.backends(job, made)
    except ExportError:
        raise
    except Exception as e:  # noqa: BLE001 - the exporters raise many types; the user gets one line
        raise ExportError(_failure_line(writer.label, e, job.staging)) from None
    size = job.paths[name].stat().st_size / (1 << 20)
    job.say(f"exported {name} in {job.seconds[name]:.1f} s ({size:.1f} MiB)")
    return backends
