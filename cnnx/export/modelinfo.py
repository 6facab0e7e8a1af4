"""What `cnnx info` shows about an exported model, without torch: ONNX files through
onnxruntime, TorchScript / pt2 archives by reading their cnnx.json from the zip (never
unpickling anything)."""

from __future__ import annotations

import json
import os
import zipfile

from cnnx.runtime import cuda
from cnnx.runtime.contract import EXTRA_FILE, KEY_TTA_VIEWS, checkpoint_not_model_line, torch_archive_kind
from cnnx.runtime.files import first_line
from cnnx.runtime.model import ort_error_line

# cnnx writes a few KiB of metadata; a member claiming more is not one of its models (and a
# deflated member of 2 GiB fits in 2 MiB of zip: its header says how much it would inflate to).
MAX_METADATA_BYTES = 16 << 20
ORT_TYPES = {"tensor(uint8)": "uint8", "tensor(float)": "float32", "tensor(float16)": "float16",
             "tensor(int64)": "int64", "tensor(int8)": "int8", "tensor(int32)": "int32"}


class ModelInfoError(Exception):
    """A file `cnnx info` cannot describe; one line for the user."""


def _decode(meta: dict) -> dict:
    out = {}
    for k, v in sorted(meta.items()):
        try:
            out[k] = json.loads(v) if k.startswith("cnnx.") and v[:1] in "[{" else v
        except (ValueError, RecursionError):  # RecursionError: JSON nested thousands deep
            out[k] = v
    return out


def _providers(path) -> dict:
    """provider -> "yes" / "no (why)" / "not checked": whether a session really runs on it."""
    ort = cuda.onnxruntime()
    result = {}
    for p in ort.get_available_providers():
        if p == "CPUExecutionProvider":
            result[p] = "yes"
            continue
        if p == cuda.TENSORRT_PROVIDER:
            status = cuda.diagnose_tensorrt()
            # A TensorRT session builds its engine when created (minutes): diagnosed, not probed.
            result[p] = "libraries load; engine built on first use" if status.usable else f"no ({status.reason})"
            continue
        if p != "CUDAExecutionProvider":
            result[p] = "available, not checked"
            continue
        status = cuda.diagnose()
        if not status.usable:
            result[p] = f"no ({status.reason})"
            continue
        try:
            opts = ort.SessionOptions()
            opts.log_severity_level = 4
            s = cuda.new_session(ort, os.fspath(path), opts, [p, "CPUExecutionProvider"])
            problem = None if s.get_providers()[0] == p else cuda.provider_library_problem(ort)
            result[p] = "yes" if s.get_providers()[0] == p else \
                f"no (the session fell back to CPU{f': {problem}' if problem else ''})"
        except Exception as e:  # noqa: BLE001 - any failure means "not usable here"
            result[p] = f"no ({first_line(e, 120)})"
    if "CUDAExecutionProvider" not in result:  # a CPU-only build, or two builds in one folder: say which and why
        result["CUDAExecutionProvider"] = f"no ({cuda.diagnose().reason})"
    return result


def describe_onnx(path) -> dict:
    ort = cuda.onnxruntime()
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    try:
        s = cuda.new_session(ort, path, opts, ["CPUExecutionProvider"])
    except Exception as e:  # noqa: BLE001 - onnxruntime raises its own exception types for bad files
        raise ModelInfoError(f"onnxruntime cannot load {path}: {ort_error_line(e)}") from None

    def io(args):
        return [{"name": a.name, "dtype": ORT_TYPES.get(a.type, a.type), "shape": list(a.shape)} for a in args]

    m = s.get_modelmeta()
    info = {"path": os.fspath(path), "format": "onnx", "producer": m.producer_name, "inputs": io(s.get_inputs()),
            "outputs": io(s.get_outputs()), "metadata": _decode(dict(m.custom_metadata_map))}
    try:  # the opset needs the onnx package (the [train] extra); the base install goes without
        import onnx

        proto = onnx.load(os.fspath(path), load_external_data=False)
        info["opset"] = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)
    except Exception:  # noqa: BLE001 - optional detail
        pass
    info["tta_views"] = _views(info["metadata"])
    info["providers"] = _providers(path)
    return info


def _read_metadata(z: zipfile.ZipFile, name: str, path) -> dict:
    """The member's JSON object, refused by its header's size beyond MAX_METADATA_BYTES and
    read with a bounded read (a header that lies still cannot make it read more)."""
    size = z.getinfo(name).file_size
    if size > MAX_METADATA_BYTES:
        raise ModelInfoError(f"{path}: its {EXTRA_FILE} would inflate to {size / (1 << 20):.1f} MiB, more than the "
                             f"{MAX_METADATA_BYTES >> 20} MiB any cnnx metadata needs: not a model cnnx exported")
    with z.open(name) as f:
        data = f.read(MAX_METADATA_BYTES + 1)
    if len(data) > MAX_METADATA_BYTES:
        raise ModelInfoError(f"{path}: its {EXTRA_FILE} is larger than {MAX_METADATA_BYTES >> 20} MiB")
    meta = json.loads(data)
    if not isinstance(meta, dict):
        raise ModelInfoError(f"{path}: its {EXTRA_FILE} is not a JSON object")
    return meta


def describe_archive(path) -> dict:
    try:
        with zipfile.ZipFile(os.fspath(path)) as z:
            names = z.namelist()
            extra = [n for n in names if n.endswith("/extra/" + EXTRA_FILE)]
            if not extra:
                raise ModelInfoError(checkpoint_not_model_line(path) if torch_archive_kind(names) == "checkpoint" else
                                     f"{path} is a torch archive without {EXTRA_FILE}: not a model cnnx exported "
                                     "(checkpoints are exported with `cnnx export`)")
            meta = _read_metadata(z, extra[0], path)
    except zipfile.BadZipFile:
        raise ModelInfoError(f"{path} is not an ONNX file or a TorchScript / pt2 archive") from None
    except (ValueError, KeyError, OSError, RuntimeError, EOFError) as e:  # RuntimeError: encrypted members
        raise ModelInfoError(f"cannot read the metadata of {path}: {first_line(e, 200)}") from None
    fmt = "pt2" if torch_archive_kind(names) == "pt2" else "torchscript"
    loader = "torch.export.load(path).module()" if fmt == "pt2" else "torch.jit.load(path)"
    return {"path": os.fspath(path), "format": fmt, "inputs": _signature(meta, "cnnx.inputs", path),
            "outputs": _signature(meta, "cnnx.outputs", path),
            "metadata": {k: v for k, v in sorted(meta.items()) if k not in ("cnnx.inputs", "cnnx.outputs")},
            "tta_views": _views(meta),
            "providers": {"onnxruntime": f"no: a {fmt} model runs in PyTorch ({loader})"}}


def _signature(meta: dict, key: str, path) -> list:
    """The archive's cnnx.inputs / cnnx.outputs: a list of {name, dtype, shape}, or
    ModelInfoError (format_info prints each of them)."""
    value = meta.get(key, [])
    ok = isinstance(value, list) and all(
        isinstance(t, dict) and isinstance(t.get("name"), str) and isinstance(t.get("dtype"), str)
        and isinstance(t.get("shape"), list) for t in value)
    if not ok:
        raise ModelInfoError(f"{path}: bad {key} in its {EXTRA_FILE} (a list of name, dtype, shape): "
                             "not a model cnnx exported")
    return value


def describe(path) -> dict:
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ModelInfoError(f"{path}: {'not a file' if os.path.exists(path) else 'no such file'}")
    if zipfile.is_zipfile(path):
        return describe_archive(path)
    return describe_onnx(path)


def _views(metadata: dict) -> int:
    """Test-time views per image the model runs (cnnx.tta_views; models without it run 1)."""
    v = str(metadata.get(KEY_TTA_VIEWS, 1))
    return int(v) if v.isascii() and v.isdigit() else 1  # isdigit alone takes "²", which int() refuses


def format_info(info: dict) -> str:
    """The lines `cnnx info` prints; the model's own strings (names, metadata: anyone's file)
    through files.printable, so none of them writes escape sequences to the terminal. The path
    is the one given, its own bytes (a script reads it back)."""
    from cnnx.runtime.files import printable

    def shape(s):
        return "[" + ", ".join(str(d) if d not in (None, "") else "?" for d in s) + "]"

    lines = [f"model:    {info['path']}", f"format:   {info['format']}"
             + (f" (opset {info['opset']})" if info.get("opset") else ""),
             f"views:    {info.get('tta_views', 1)} per image (test-time augmentation; each view is a forward pass)"]
    for key in ("inputs", "outputs"):
        lines.append(f"{key}:")
        for t in info[key]:
            lines.append(f"  {printable(t['name'])}  {t['dtype']}  {printable(shape(t['shape']))}")
    lines.append("metadata:")
    for k, v in info["metadata"].items():
        if k == "cnnx.class_names" and isinstance(v, list):
            text = f"{len(v)} classes: " + ", ".join(map(str, v[:20])) + (", ..." if len(v) > 20 else "")
        else:
            text = v if isinstance(v, str) else json.dumps(v)
        lines.append(f"  {printable(k)}: {printable(text)}")
    lines.append("providers:")
    for p, ok in info["providers"].items():
        lines.append(f"  {p}: {ok}")
    return "\n".join(lines)
