"""The model contract between `cnnx export` (which writes it) and the runtime (which reads it),
written once: tensor names, `cnnx.*` metadata keys and their parsing, the devices, the image
extensions a folder walk picks up, and the one CUDA-driver probe. The exporter imports this
module; nothing here imports torch (or, at import time, anything beyond the standard library:
click commands read DEVICES while `cnnx --help` runs).

An exported ONNX model: input `images` uint8 [N, 3, H, W] (N dynamic), output `logits`
float32 [N, num_classes]; metadata_props are strings (JSON for anything that is not a string).
"""

from __future__ import annotations

import json
import os
import stat
from dataclasses import dataclass
from operator import itemgetter

INPUT_NAME = "images"
OUTPUT_NAME = "logits"
EXTRA_FILE = "cnnx.json"  # TorchScript _extra_files / pt2 extra_files name (the same keys, one JSON)

# metadata_props keys
KEY_CLASS_NAMES = "cnnx.class_names"  # JSON list of str, index = label id
KEY_PREPROCESS = "cnnx.preprocess"  # JSON preprocess spec (cnnx.runtime.preprocess)
KEY_ARCH = "cnnx.arch"
KEY_VERSION = "cnnx.version"
KEY_CHECKPOINT_SHA256 = "cnnx.checkpoint_sha256"
KEY_VARIANT = "cnnx.variant"  # fp32 | fp16 | int8
KEY_INPUTS = "cnnx.inputs"  # the signature, for readers without the framework (cnnx info on a .pt2)
KEY_OUTPUTS = "cnnx.outputs"
KEY_TTA_VIEWS = "cnnx.tta_views"  # views each image is run through (test-time augmentation); absent = 1
MAX_TTA_VIEWS = 64
REQUIRED_KEYS = (KEY_CLASS_NAMES, KEY_PREPROCESS)

DEVICES = ("auto", "cpu", "cuda")  # where cnnx trains and runs models
INFERENCE_DEVICES = (*DEVICES, "tensorrt")  # runtime only: onnxruntime's TensorRT provider (optional)
CPU_PROVIDER, CUDA_PROVIDER = "CPUExecutionProvider", "CUDAExecutionProvider"
# How the CUDA provider runs a model, in export's parity gate and in classify alike: TF32 off
# (onnxruntime's default is on), so an fp32 model runs in fp32, as the gate's 1e-4 bound checks it;
# TF32's 10-bit mantissa can move logits by far more. The fp16 variant (export --fp16) is the fast one.
CUDA_PROVIDER_ENTRY = (CUDA_PROVIDER, {"use_tf32": "0"})

# The largest input side a model may ask for: 4096x4096x3 uint8 is 48 MiB an image, already
# more than any classifier of this kind uses; metadata asking for more is refused, not obeyed.
MAX_INPUT_SIDE = 4096
MAX_CLASSES = 100_000

# Extensions of the files a folder walk picks up (classify, the training data, --verify-data);
# other files in a folder are ignored (a README beside the photos is not an error). Files
# named on the command line are always tried, whatever their name.
IMAGE_EXTENSIONS = frozenset(
    ".jpg .jpeg .jpe .jfif .png .gif .bmp .dib .tif .tiff .webp .ppm .pgm .pbm .pnm .tga .ico "
    ".heic .heif .avif".split()
)


# Folders that systems write into photo folders, whose images are not the user's photos:
# __MACOSX (the "._" files of a zip made on a Mac), @eaDir (a Synology NAS's thumbnails of
# each photo, named like it: they trained as near-copies, spread over train and val), and the
# Windows recycle bin and volume folder at a drive's top.
SYSTEM_FOLDERS = frozenset({"__MACOSX", "@eaDir", "$RECYCLE.BIN", "System Volume Information"})


def is_hidden_name(name: str) -> bool:
    """A name every folder walk passes over (counted as ignored): a dot name (Unix hidden; the
    "._" AppleDouble file macOS writes beside each photo copied to a foreign disk, which is no
    image) and SYSTEM_FOLDERS."""
    return name[:1] == "." or name in SYSTEM_FOLDERS


def is_image_name(name: str) -> bool:
    """A visible name with an image extension: what a folder walk classifies or trains on."""
    dot = name.rfind(".")
    return dot > 0 and name[0] != "." and name[dot:].lower() in IMAGE_EXTENSIONS


_LAST_4 = itemgetter(slice(-4, None))


def image_names(names: list) -> list:
    """The names is_image_name keeps (a folder walk's hot path). A folder whose names all end
    in one image extension of 3 letters (".jpg"), after at least one character, none of them a
    dot name, keeps them all: told with no Python code run a name. Else one comprehension:
    rfind from index 1 finds no dot at 0, as `dot > 0` wants."""
    tails = set(map(_LAST_4, names))
    if len(tails) == 1:
        tail = tails.pop()
        if tail[:1] == "." and tail.lower() in IMAGE_EXTENSIONS and min(map(len, names)) > 4 \
                and "/." not in "/" + "/".join(names):  # no dot name ("/" is in no name): one scan in C
            return list(names)
    return [n for n in names if n[n.rfind(".", 1):].lower() in IMAGE_EXTENSIONS and n[0] != "."]


class ContractError(ValueError):
    """Metadata or a signature that is not the cnnx contract; one line for the user."""


@dataclass(frozen=True)
class ModelMeta:
    class_names: tuple
    spec: dict
    arch: str
    version: str
    variant: str
    tta_views: int = 1
    checkpoint_sha256: str | None = None  # the weights the model was exported from


def encode_metadata(*, class_names, preprocess: dict, arch: str, version: str, checkpoint_sha256: str,
                    variant: str = "fp32", tta_views: int = 1) -> dict:
    """Plain-JSON metadata of an exported model (what the exporter writes); keys above."""
    h, w = preprocess["size"]
    return {
        KEY_CLASS_NAMES: list(class_names),
        KEY_PREPROCESS: dict(preprocess),
        KEY_ARCH: arch,
        KEY_VERSION: version,
        KEY_CHECKPOINT_SHA256: checkpoint_sha256,
        KEY_VARIANT: variant,
        KEY_TTA_VIEWS: str(int(tta_views)),
        KEY_INPUTS: [{"name": INPUT_NAME, "dtype": "uint8", "shape": ["N", 3, int(h), int(w)]}],
        KEY_OUTPUTS: [{"name": OUTPUT_NAME, "dtype": "float32", "shape": ["N", len(class_names)]}],
    }


def metadata_props(meta: dict) -> dict:
    """ONNX metadata_props are string -> string: strings stay as they are, the rest is JSON."""
    return {k: v if isinstance(v, str) else json.dumps(v, separators=(",", ":")) for k, v in meta.items()}


def check_class_names(names) -> tuple:
    if not (isinstance(names, (list, tuple)) and names and all(isinstance(c, str) for c in names)):
        raise ContractError("class names must be a non-empty list of strings")
    if len(names) > MAX_CLASSES:
        raise ContractError(f"{len(names)} class names exceed the limit of {MAX_CLASSES}")
    for i, c in enumerate(names):
        try:
            c.encode("utf-8")  # JSON can spell a lone surrogate ("\ud800"); no output can write it
        except UnicodeEncodeError:
            raise ContractError(f"class name {i + 1} is not UTF-8 text: {ascii(c)}") from None
    return tuple(names)


def check_size(spec: dict) -> dict:
    h, w = spec["size"]
    if h > MAX_INPUT_SIDE or w > MAX_INPUT_SIDE:
        raise ContractError(f"preprocess size {h}x{w} exceeds the limit of {MAX_INPUT_SIDE} pixels a side")
    return spec


def parse_metadata(props: dict) -> ModelMeta:
    """metadata_props (str -> str) of a cnnx model -> ModelMeta; ContractError otherwise."""
    from cnnx.runtime.preprocess import SpecError, validate_spec  # numpy + Pillow: not for `cnnx --help`

    missing = [k for k in REQUIRED_KEYS if k not in props]
    if missing:
        raise ContractError(f"metadata {missing[0]} is missing")
    try:
        names = json.loads(props[KEY_CLASS_NAMES])
        spec = validate_spec(json.loads(props[KEY_PREPROCESS]))
    except (ValueError, SpecError) as e:  # JSONDecodeError and SpecError are ValueErrors
        raise ContractError(f"bad cnnx metadata: {e}") from None
    except RecursionError:  # JSON nested thousands deep
        raise ContractError("bad cnnx metadata: JSON nested too deep") from None
    views = props.get(KEY_TTA_VIEWS, "1")
    if not (views.isascii() and views.isdigit() and 1 <= int(views) <= MAX_TTA_VIEWS):  # isdigit takes "²"
        raise ContractError(f"bad cnnx metadata: {KEY_TTA_VIEWS} must be a whole number 1..{MAX_TTA_VIEWS}, "
                            f"got {views[:20]!r}")
    return ModelMeta(class_names=check_class_names(names), spec=check_size(spec), arch=props.get(KEY_ARCH, "?"),
                     version=props.get(KEY_VERSION, "?"), variant=props.get(KEY_VARIANT, "fp32"),
                     tta_views=int(views), checkpoint_sha256=props.get(KEY_CHECKPOINT_SHA256))


def check_signature(inputs, outputs, meta: ModelMeta) -> None:
    """onnxruntime NodeArg lists against the contract and the metadata: one uint8 input
    [N, 3, H, W] whose batch is dynamic and whose H, W (when fixed) are the spec's; a float32
    output [N, C] with the same batch dimension and C (when fixed) = the number of classes."""
    if len(inputs) != 1:
        raise ContractError(f"expected one input {INPUT_NAME!r}, found {len(inputs)}")
    inp = inputs[0]
    if inp.name != INPUT_NAME or inp.type != "tensor(uint8)" or len(inp.shape) != 4:
        raise ContractError(f"input is {inp.name!r} {inp.type} {inp.shape}, expected {INPUT_NAME!r} "
                            "tensor(uint8) [N, 3, H, W]")
    if len(outputs) < 1 or outputs[0].type != "tensor(float)" or len(outputs[0].shape) != 2:
        raise ContractError("first output must be float32 [N, num_classes]")
    n, c, h, w = inp.shape
    if isinstance(n, int):
        raise ContractError(f"input batch dimension is fixed at {n}; the contract is a dynamic batch")
    if c != 3 or (isinstance(h, int) and isinstance(w, int) and [h, w] != list(meta.spec["size"])):
        raise ContractError(f"input shape {inp.shape} does not match the preprocess size {meta.spec['size']}")
    out_n, k = outputs[0].shape
    # A graph that reduces over the batch (logits [1, C] for any N) would yield fewer rows
    # than images. A symbolic output batch cannot be proven equal to the input's here (the
    # quantizer renames dims), so the runtime also checks the row count of every batch.
    if isinstance(out_n, int):
        raise ContractError(f"output batch dimension is {out_n!r}, not the input's {n!r}: "
                            "the model would not give one row per image")
    if isinstance(k, int) and k != len(meta.class_names):
        raise ContractError(f"{k} logits but {len(meta.class_names)} class names")


def torch_archive_kind(names) -> str:
    """What a PyTorch zip archive is, from its members' names alone (nothing in it is unpickled):
    "pt2" (torch.export.save), "torchscript" (torch.jit.save: its code/ and constants.pkl), or
    "checkpoint" (torch.save: data.pkl only, e.g. a training run's best.pt)."""
    if any(n.endswith("/models/model.json") or n.endswith("/archive_format") for n in names):
        return "pt2"
    if any("/code/" in n or n.endswith("/constants.pkl") for n in names):
        return "torchscript"
    return "checkpoint"


def checkpoint_not_model_line(path) -> str:
    """What to say where a model is expected and a training checkpoint was given."""
    return (f"{path} is a training checkpoint (torch.save), not an exported model: `cnnx export {path}` writes "
            f"its ONNX model (export/model.onnx beside it)")


MAX_METADATA_ENTRY_BYTES = 64 << 20  # MAX_CLASSES names are a few MB of JSON: a larger entry is not read


def peek_metadata_props(path) -> dict | None:
    """An ONNX model's metadata_props read straight from its file (a few reads; the graph is
    skipped, not read), for decisions taken before onnxruntime is imported; None when the file
    is not a readable ONNX model (the loader then says why). ONNX's ModelProto is protobuf:
    metadata_props is field 14, each entry a message of key (1) and value (2)."""
    props = {}
    try:
        # Non-blocking: a FIFO given as the model must not hang here before the loader refuses it.
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
        with open(fd, "rb") as f:
            st = os.fstat(f.fileno())
            if not stat.S_ISREG(st.st_mode):
                return None
            size = st.st_size
            for field, wire, value in _fields(f, size):
                if field != 14 or wire != 2:
                    continue
                start, length = value
                if length > MAX_METADATA_ENTRY_BYTES:
                    return None
                f.seek(start)
                entry = f.read(length)
                if len(entry) != length:
                    return None
                key, text = _string_pair(entry)
                props[key] = text
            if f.tell() != size:  # the last field runs past the end: a cut-short file
                return None
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    return props


def _varint(f) -> int:
    value = shift = 0
    while True:
        byte = f.read(1)
        if not byte or shift > 63:
            raise ValueError("truncated or bad varint")
        value |= (byte[0] & 0x7F) << shift
        if byte[0] < 0x80:
            return value
        shift += 7


def _string_pair(entry: bytes):
    """A StringStringEntryProto's (key, value)."""
    import io

    f, pair = io.BytesIO(entry), {1: "", 2: ""}
    while f.tell() < len(entry):
        field, wire = divmod(_varint(f), 8)
        if wire != 2:
            raise ValueError("not a string field")
        length = _varint(f)
        data = f.read(length)
        if len(data) != length:
            raise ValueError("a string cut short")
        if field in pair:
            pair[field] = data.decode("utf-8")
    return pair[1], pair[2]


def _fields(f, end: int):
    """(field number, wire type, value) of each field of the message from f's position to `end`:
    a varint's value, a length-delimited field's (start, length) (skipped, not read)."""
    while f.tell() < end:
        field, wire = divmod(_varint(f), 8)
        if wire == 0:
            yield field, wire, _varint(f)
        elif wire in (1, 5):
            f.seek(8 if wire == 1 else 4, os.SEEK_CUR)
        elif wire == 2:
            length = _varint(f)
            start = f.tell()
            yield field, wire, (start, length)
            f.seek(start + length)
        else:
            raise ValueError(f"wire type {wire}")


# Where TensorProtos sit in an ONNX model, by message: field number -> what the field holds
# (ModelProto graph 7; GraphProto node 1, initializer 5, sparse_initializer 15; NodeProto
# attribute 5; AttributeProto t 5, g 6, tensors 10, graphs 11, sparse_tensor 22, sparse_tensors
# 23; SparseTensorProto values 1, indices 2). A TensorProto's external_data is field 13.
_ONNX_FIELDS = {
    "model": {7: "graph"},
    "graph": {1: "node", 5: "tensor", 15: "sparse"},
    "node": {5: "attribute"},
    "attribute": {5: "tensor", 6: "graph", 10: "tensor", 11: "graph", 22: "sparse", 23: "sparse"},
    "sparse": {1: "tensor", 2: "tensor"},
}


def external_data_files(model: bytes) -> list:
    """The files an ONNX model keeps tensor data in (the `location` of each tensor whose data is
    external: initializers, Constant nodes' values, those of If/Loop/Scan subgraphs), read from
    the model's bytes without onnx or onnxruntime, a walk of its messages (_ONNX_FIELDS) with a
    stack, not recursion. ValueError for bytes that are no model."""
    import io

    f, found = io.BytesIO(model), []
    todo = [("model", 0, len(model))]
    while todo:
        kind, start, length = todo.pop()
        f.seek(start)
        for field, wire, value in list(_fields(f, start + length)):
            if wire != 2:
                continue
            if kind == "tensor":
                if field == 13:
                    key, location = _string_pair(model[value[0]:value[0] + value[1]])
                    if key == "location" and location not in found:
                        found.append(location)
            elif field in _ONNX_FIELDS[kind]:
                todo.append((_ONNX_FIELDS[kind][field], *value))
    return found


def peek_preprocess_size(path):
    """The model's input (H, W) from its cnnx.preprocess metadata, read without onnxruntime
    (peek_metadata_props); None when it cannot be read. A hint only: the loader checks it."""
    props = peek_metadata_props(path)
    try:
        h, w = json.loads(props[KEY_PREPROCESS])["size"]
        return int(h), int(w)
    except (TypeError, KeyError, ValueError, OverflowError):  # OverflowError: a size of 1e999 (JSON's inf)
        return None


def driver_library():
    """ctypes handle of the NVIDIA driver's CUDA library (a cheap dlopen, no GPU work), or None
    where it cannot be loaded (load_driver_library also says why)."""
    return load_driver_library()[0]


def load_driver_library():
    """(the driver's CUDA library, None) or (None, the dynamic loader's line for why not): a
    libcuda.so.1 that is there but cannot load (another architecture, a missing dependency) is
    not the same fix as no driver."""
    import ctypes
    import sys

    from cnnx.runtime.files import first_line

    error = "no CUDA driver library on this platform"
    for i, name in enumerate({"linux": ("libcuda.so.1", "libcuda.so"), "win32": ("nvcuda.dll",)}.get(sys.platform, ())):
        try:
            return ctypes.CDLL(name), None
        except OSError as e:
            if i == 0:  # the driver's own name; the unversioned one is a development link
                error = first_line(e)
    return None, error


def cuda_driver_present() -> bool:
    """Whether the driver's CUDA library loads: without it onnxruntime's CUDA provider cannot
    load and only logs errors when asked to."""
    return driver_library() is not None
