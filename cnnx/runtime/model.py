"""An exported cnnx ONNX model opened for inference: contract checks, metadata, providers.

The contract is cnnx.runtime.contract. Anything else is refused with one line (ModelError),
never guessed around: size, mean, std and class names come from the model and nowhere else.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cnnx.runtime.contract import (CPU_PROVIDER as CPU, CUDA_PROVIDER as CUDA, DEVICES, ContractError,
                                   check_signature, cuda_driver_present, parse_metadata)
from cnnx.runtime.files import first_line


class ModelError(Exception):
    """A model that cannot be used (missing, corrupt, not the cnnx contract, provider)."""


@dataclass(frozen=True)
class ModelInfo:
    path: Path
    class_names: tuple
    spec: dict
    arch: str
    version: str
    input_name: str
    output_name: str


def find_newest_model(runs_dir="runs") -> Path:
    """The newest exported model under runs_dir: the most recently written `model.onnx`
    (cnnx export's fp32 model), else any *.onnx. Hidden folders are not searched: the
    exporter stages half-written files in `.cnnx-export-*` before moving them in place."""
    root = Path(runs_dir)
    if not root.is_dir():
        raise ModelError(f"no --model given and no {root}/ folder here to find an exported model in")
    best = {True: (-1.0, None), False: (-1.0, None)}  # is it a model.onnx? -> (mtime, path)
    for dirpath, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        for name in files:
            if name.endswith(".onnx"):
                p = Path(dirpath) / name
                try:
                    mtime = p.stat().st_mtime
                except OSError:
                    continue
                key = name == "model.onnx"
                if mtime > best[key][0]:
                    best[key] = (mtime, p)
    newest = best[True][1] or best[False][1]
    if newest is None:
        raise ModelError(f"no --model given and no exported .onnx model under {root}/ (run `cnnx export` first)")
    return newest


def _session_options(ort, threads: int | None, quiet: bool):
    so = ort.SessionOptions()
    if threads:
        so.intra_op_num_threads = threads
    # Spinning worker threads would burn the cores the decoders need between batches.
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if quiet:
        so.log_severity_level = 4  # a CUDA provider that fails to load is expected under auto
    return so


def open_model(path, device: str = "auto", *, threads: int | None = None):
    """-> (onnxruntime.InferenceSession, ModelInfo, provider actually running).
    device auto: CUDA when its provider really loads, else CPU; cuda: CUDA or ModelError."""
    import onnxruntime as ort

    if device not in DEVICES:
        raise ModelError(f"unknown device {device!r}; known: {', '.join(DEVICES)}")
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"model not found: {path}")
    want_cuda = device in ("auto", "cuda") and CUDA in ort.get_available_providers()
    if device == "cuda" and not want_cuda:
        raise ModelError("--device cuda: this onnxruntime has no CUDAExecutionProvider (install onnxruntime-gpu)")
    if want_cuda and not cuda_driver_present():
        # Without the driver library the CUDA provider cannot load; trying costs ~0.5 s of
        # start-up (preload + provider library) for nothing, so auto goes straight to the CPU.
        if device == "cuda":
            raise ModelError("--device cuda: no NVIDIA driver here (libcuda cannot be loaded); use --device cpu or auto")
        want_cuda = False
    if want_cuda and hasattr(ort, "preload_dlls"):
        try:
            ort.preload_dlls()  # CUDA/cuDNN from the nvidia-* wheels, when installed
        except Exception:  # noqa: BLE001 - a failed preload just means CUDA will not load below
            pass
    providers = [CUDA, CPU] if want_cuda else [CPU]
    old_severity = None
    try:
        if want_cuda:
            # onnxruntime logs a multi-line error when the CUDA provider cannot load; under auto
            # that is the expected CPU fallback, and under cuda we say it in one line below.
            ort.set_default_logger_severity(4)
            old_severity = 2
        session = ort.InferenceSession(str(path), _session_options(ort, threads, want_cuda), providers=providers)
    except Exception as e:  # onnxruntime raises its own Fail/InvalidGraph/... types
        raise ModelError(f"cannot load model {path}: {first_line(e)}") from None
    finally:
        if old_severity is not None:
            ort.set_default_logger_severity(old_severity)
    active = session.get_providers()
    provider = active[0] if active else CPU
    if device == "cuda" and provider != CUDA:
        raise ModelError("--device cuda: onnxruntime's CUDA provider did not load (the CUDA/cuDNN libraries "
                         "it was built for are missing, or no usable GPU); use --device cpu or auto")
    return session, check_contract(session, path), provider


def check_contract(session, path) -> ModelInfo:
    """The session's signature and metadata against the contract (cnnx.runtime.contract)."""
    try:
        meta = parse_metadata(session.get_modelmeta().custom_metadata_map)
        inputs, outputs = session.get_inputs(), session.get_outputs()
        check_signature(inputs, outputs, meta)
    except ContractError as e:
        raise ModelError(f"{path}: not a cnnx model: {e}") from None
    return ModelInfo(path=Path(path), class_names=meta.class_names, spec=meta.spec, arch=meta.arch,
                     version=meta.version, input_name=inputs[0].name, output_name=outputs[0].name)


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax of (N, C) logits, in float64 (stable scores)."""
    z = logits.astype(np.float64)
    z -= z.max(axis=1, keepdims=True)
    p = np.exp(z)
    p /= p.sum(axis=1, keepdims=True)
    return p


def softmax_topk(logits: np.ndarray, k: int):
    """-> (indices (N, k), probabilities (N, k)), best first. float64 softmax for stable scores."""
    p = softmax(logits)
    idx = np.argsort(-p, axis=1, kind="stable")[:, :k]
    return idx, np.take_along_axis(p, idx, axis=1)
