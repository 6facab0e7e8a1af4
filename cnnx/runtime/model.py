"""An exported cnnx ONNX model opened for inference: contract checks, metadata, providers.

The contract is cnnx.runtime.contract. Anything else is refused with one line (ModelError),
never guessed around: size, mean, std and class names come from the model and nowhere else.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cnnx.runtime.contract import (CPU_PROVIDER as CPU, CUDA_PROVIDER as CUDA, CUDA_PROVIDER_ENTRY, INFERENCE_DEVICES,
                                   ContractError, check_signature, checkpoint_not_model_line, cuda_driver_present,
                                   parse_metadata, torch_archive_kind)
from cnnx.runtime import cuda
from cnnx.runtime.cuda import TENSORRT_PROVIDER as TENSORRT
from cnnx.runtime.files import first_line, os_error_line


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
    variant: str = "fp32"
    tta_views: int = 1
    checkpoint_sha256: str | None = None

    def identity(self) -> dict:
        """What makes two models give the same rows, whatever their file (what --resume
        compares): the weights they were exported from, the variant, the views, the classes."""
        return {"checkpoint_sha256": self.checkpoint_sha256, "variant": self.variant, "tta_views": self.tta_views,
                "class_names": list(self.class_names)}


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


# onnxruntime intra-op threads of a CPU session opened for concurrent runs (open_model's
# concurrent=True, for a caller that runs one batch a core from its own threads, as
# pipeline.decoded_batches' infer does; Classifier does not: on the CPU its decode processes
# run the batches on one-thread sessions of their own, procdecode), when the caller names
# none: each run takes one core. A session spreading every operator over all cores would
# make each half wait for the other while a decoder holds one of them
# (benchmarks/bench_classify.py, "tuning").
CONCURRENT_CPU_INTRA_OP_THREADS = 1


def _session_options(ort, threads: int | None, on_cpu: bool, concurrent: bool):
    so = ort.SessionOptions()
    if threads is None and on_cpu and concurrent:
        threads = CONCURRENT_CPU_INTRA_OP_THREADS
    if threads:
        so.intra_op_num_threads = threads
    # Spinning worker threads would burn the cores the decoders need between batches.
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if on_cpu:
        # The memory pattern (one planned block a shape) made concurrent runs of the same
        # session slower, not faster, on the CPU (benchmarks/bench_classify.py, "tuning").
        so.enable_mem_pattern = False
    # onnxruntime's own log lines (a CUDA provider that fails to load, expected under auto;
    # a failed run) would duplicate the one line cnnx says (ModelError).
    so.log_severity_level = 4
    return so


def _is_zip(path: Path) -> bool:
    """Whether the file is a zip archive (TorchScript's and torch.export's format; an ONNX model
    is a protobuf, which never starts with a zip's local-header signature)."""
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"PK\x03\x04"
    except OSError:
        return False  # the loader says why


# Where onnxruntime's message says which C++ function raised it: "/onnxruntime_src/<file>:<line>
# <signature>(<arguments>) ", before the reason, which a line cut at its limit then lost.
_ORT_SOURCE = re.compile(r"/onnxruntime_src/\S+:\d+ [^()]*\((?:[^()]|\([^()]*\))*\) ")


def ort_error_line(error, limit: int = 300) -> str:
    """first_line of an onnxruntime exception, without the source location and signature of
    the function that raised it (e.g. a model of an opset newer than onnxruntime's)."""
    return first_line(_ORT_SOURCE.sub("", str(error)), limit)


def _zip_names(path: Path):
    """The members' names of a zip archive (nothing is extracted), None if it cannot be read."""
    import zipfile

    try:
        with zipfile.ZipFile(path) as z:
            return z.namelist()
    except (zipfile.BadZipFile, OSError, ValueError):
        return None


def open_model(path, device: str = "auto", *, threads: int | None = None, batch_size: int | None = None,
               concurrent: bool = False):
    """-> (onnxruntime.InferenceSession, ModelInfo, provider actually running).
    threads: onnxruntime's intra-op threads; None = all cores, or one with `concurrent` (the
    caller runs batches from one thread a core) on the CPU.
    device auto: CUDA when its provider really loads, else CPU (quietly); cuda / tensorrt:
    that provider or ModelError naming the cause in one line (cnnx.runtime.cuda), never a
    CPU run. batch_size: the --batch-size asked for; TensorRT's engine is built for it (as
    reduced by the pipeline's memory budget, the batch classify runs)."""
    ort = cuda.onnxruntime()

    if device not in INFERENCE_DEVICES:
        raise ModelError(f"unknown device {device!r}; known: {', '.join(INFERENCE_DEVICES)}")
    path = Path(os.fsdecode(path))  # str, bytes or os.PathLike, as classify's paths
    if path.is_dir():
        raise ModelError(f"{path} is a folder, not a model file (the model is {path}/model.onnx after cnnx export)")
    if not path.is_file():
        raise ModelError(f"model not found: {path}")
    if _is_zip(path):
        names = _zip_names(path)
        if names is not None and torch_archive_kind(names) == "checkpoint":
            raise ModelError(checkpoint_not_model_line(path))
        raise ModelError(f"{path} is a TorchScript or pt2 archive, which run in PyTorch: onnxruntime runs the ONNX "
                         f"export (cnnx export --format onnx writes model.onnx)")
    providers = _providers(ort, device, path, batch_size)
    want_gpu = providers[0] != CPU
    try:
        # A GPU provider that cannot load: under auto the expected CPU fallback, under
        # cuda/tensorrt said in one line below (new_session keeps onnxruntime's log quiet).
        so = _session_options(ort, threads, not want_gpu, concurrent)
        session = cuda.new_session(ort, path, so, providers)
    except Exception as e:  # onnxruntime raises its own Fail/InvalidGraph/... types
        raise ModelError(f"cannot load model {path}: {ort_error_line(e)}") from None
    active = session.get_providers()
    provider = active[0] if active else CPU
    wanted = {"cuda": CUDA, "tensorrt": TENSORRT}.get(device)
    if wanted is not None and provider != wanted:
        problem = cuda.provider_library_problem(ort)
        if problem is not None:
            raise ModelError(f"--device {device}: onnxruntime's CUDA provider library cannot be loaded "
                             f"({problem}): {cuda.INSTALL_HINT}")
        raise ModelError(f"--device {device}: onnxruntime's {wanted} did not load although its libraries do "
                         f"(no usable GPU visible? CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}); "
                         "use --device cpu or auto")
    return session, check_contract(session, path), provider


def _providers(ort, device: str, path: Path, batch_size: int | None) -> list:
    """The provider list to ask onnxruntime for. cuda and tensorrt are diagnosed first
    (cnnx.runtime.cuda: packages, driver, libraries) so a failure names its cause."""
    if device == "cpu":
        return [CPU]
    if device == "auto":
        # Cheap checks only (no package scan): without the provider or the driver library,
        # trying CUDA costs start-up time for nothing, so auto goes straight to the CPU.
        if CUDA not in ort.get_available_providers() or not cuda_driver_present():
            return [CPU]
        cuda.preload(ort)
        return [CUDA_PROVIDER_ENTRY, CPU]
    status = cuda.diagnose() if device == "cuda" else cuda.diagnose_tensorrt()
    if not status.usable:
        raise ModelError(f"--device {device}: {status.reason}")
    if device == "cuda":
        return [CUDA_PROVIDER_ENTRY, CPU]
    from cnnx.runtime.pipeline import batch_size_within_budget

    spec = _model_spec(ort, path)
    batch = batch_size_within_budget(batch_size or 256, spec)
    options = cuda.tensorrt_options(path, batch, spec["size"])
    try:
        os.makedirs(options["trt_engine_cache_path"], exist_ok=True)
    except OSError as e:
        raise ModelError(f"--device tensorrt: cannot create the engine cache: {os_error_line(e)}") from None
    # Nodes TensorRT cannot take run on CUDA (then the CPU): onnxruntime's own partitioning.
    return [(TENSORRT, options), CUDA_PROVIDER_ENTRY, CPU]


def _model_spec(ort, path: Path) -> dict:
    """The preprocess spec of a model before a GPU session exists (TensorRT's shape profile
    needs H and W): read from a CPU session without optimisation, which only parses."""
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    try:
        session = cuda.new_session(ort, path, so, [CPU])
    except Exception as e:  # noqa: BLE001 - onnxruntime's own exception types
        raise ModelError(f"cannot load model {path}: {ort_error_line(e)}") from None
    return check_contract(session, path).spec


def check_contract(session, path) -> ModelInfo:
    """The session's signature and metadata against the contract (cnnx.runtime.contract)."""
    try:
        meta = parse_metadata(session.get_modelmeta().custom_metadata_map)
        inputs, outputs = session.get_inputs(), session.get_outputs()
        check_signature(inputs, outputs, meta)
    except ContractError as e:
        raise ModelError(f"{path}: not a cnnx model: {e}") from None
    return ModelInfo(path=Path(path), class_names=meta.class_names, spec=meta.spec, arch=meta.arch,
                     version=meta.version, input_name=inputs[0].name, output_name=outputs[0].name,
                     variant=meta.variant, tta_views=meta.tta_views, checkpoint_sha256=meta.checkpoint_sha256)


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax of (N, C) logits, in float64 (stable scores); NaN for a row that is not
    all finite (finite_rows), without numpy's RuntimeWarning on the caller's stderr."""
    z = logits.astype(np.float64)
    with np.errstate(invalid="ignore"):
        z -= z.max(axis=1, keepdims=True)
        p = np.exp(z)
        p /= p.sum(axis=1, keepdims=True)
    return p


NON_FINITE_STAGE = "model"
NON_FINITE_LINE = "the model gave this image non-finite scores (NaN or inf: an fp16 export overflowing?)"


def finite_rows(logits: np.ndarray) -> np.ndarray | None:
    """The mask of the rows of (N, C) logits that are all finite, or None where every row is
    (the common batch: one check). A row with an inf or a NaN has no softmax: it was written
    as class 0 with score nan (a model whose fp16 export overflows), which evaluate refuses."""
    ok = np.isfinite(logits).all(axis=1)
    return None if ok.all() else ok


def softmax_topk(logits: np.ndarray, k: int):
    """-> (indices (N, k), probabilities (N, k)), best first. float64 softmax for stable scores."""
    p = softmax(logits)
    idx = np.argsort(-p, axis=1, kind="stable")[:, :k]
    return idx, np.take_along_axis(p, idx, axis=1)
