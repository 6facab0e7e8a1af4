"""Helpers for the runtime tests: contract-conforming ONNX models and test images.

`make_onnx_model` builds a real cnnx-contract model (uint8 `images` [N,3,H,W] -> float32
`logits`, normalisation inside the graph, metadata_props as DESIGN.md says) from
`cnnx.train.zoo.Uint8Input(create_model(...))`, exported with torch.onnx. Tests may use torch;
the runtime under test may not.
"""

from __future__ import annotations

import hashlib
import io
import json
import warnings
from pathlib import Path

import numpy as np

CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)


def make_onnx_model(path: Path, *, arch: str = "seed-cnn", size: int = 32, class_names=CLASSES, seed: int = 0,
                    metadata: dict | None = None, input_dtype: str = "uint8") -> Path:
    """Write a cnnx ONNX model with random (seeded) weights to `path`. `metadata` overrides or
    (value None) removes metadata_props; `input_dtype="float32"` makes a non-contract model."""
    import onnx
    import torch

    from cnnx.runtime.preprocess import make_spec
    from cnnx.train.zoo import Uint8Input, create_model

    torch.manual_seed(seed)
    model = Uint8Input(create_model(arch, len(class_names)), CIFAR_MEAN, CIFAR_STD).eval()
    dtype = torch.uint8 if input_dtype == "uint8" else torch.float32
    example = torch.randint(0, 256, (2, 3, size, size)).to(dtype)
    buf = io.BytesIO()
    with warnings.catch_warnings():  # the small TorchScript-based exporter is deprecated, and quick
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(model, (example,), buf, input_names=["images"], output_names=["logits"],
                          dynamic_axes={"images": {0: "N"}, "logits": {0: "N"}}, dynamo=False, opset_version=17)
    proto = onnx.load_from_string(buf.getvalue())
    props = {
        "cnnx.class_names": json.dumps(list(class_names)),
        "cnnx.preprocess": json.dumps(make_spec(size, CIFAR_MEAN, CIFAR_STD)),
        "cnnx.arch": arch,
        "cnnx.version": "test",
        "cnnx.checkpoint_sha256": hashlib.sha256(buf.getvalue()).hexdigest(),
    }
    for k, v in (metadata or {}).items():
        if v is None:
            props.pop(k, None)
        else:
            props[k] = v
    del proto.metadata_props[:]
    for k, v in props.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = k, v
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(proto, str(path))
    return path


def photo_like(h: int, w: int, seed: int = 0) -> np.ndarray:
    """A smooth, textured (H, W, 3) uint8 image: gradients plus low-frequency noise, so JPEG
    sizes and decode costs look like a photo's rather than a flat colour's."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    base = np.stack([xx / max(w, 1), yy / max(h, 1), (xx + yy) / max(w + h, 1)], axis=-1) * 180
    small = rng.random((max(2, h // 16), max(2, w // 16), 3)).astype(np.float32) * 60
    reps = (-(-h // small.shape[0]), -(-w // small.shape[1]), 1)
    noise = np.kron(small, np.ones(reps[:2] + (1,), np.float32))[:h, :w]
    fine = rng.normal(0, 6, (h, w, 3)).astype(np.float32)
    return np.clip(base + noise + fine, 0, 255).astype(np.uint8)


_EXPORTED: dict = {}


def exported_model(base: Path, *, arch: str = "seed-cnn", class_names=CLASSES, seed: int = 0) -> Path:
    """A real `cnnx export` ONNX model (checkpoint -> export_checkpoint, parity gate included)
    of a seeded, untrained model; built once per (arch, classes, seed) per test session."""
    key = (arch, tuple(class_names), seed)
    if key not in _EXPORTED:
        import torch

        from cnnx.export.api import export_checkpoint
        from cnnx.runtime.preprocess import make_spec
        from cnnx.train.checkpoint import build_checkpoint, save_checkpoint
        from cnnx.train.zoo import create_model

        torch.manual_seed(seed)
        model = create_model(arch, len(class_names))
        folder = Path(base) / f"export-{arch}-{seed}-{len(_EXPORTED)}"
        ckpt = build_checkpoint(model=model, arch=arch, arch_kwargs={}, class_names=list(class_names),
                                preprocess=make_spec(32, CIFAR_MEAN, CIFAR_STD), epoch=0, metrics={}, config={})
        save_checkpoint(ckpt, folder / "best.pt")
        result = export_checkpoint(folder / "best.pt", folder / "export", formats=("onnx",), parity_images=8)
        _EXPORTED[key] = Path(result.paths["onnx"])
    return _EXPORTED[key]


def tiny_onnx_model(path: Path, *, size=(32, 32), fixed_hw: bool = True, class_names=CLASSES,
                    batch_out: str = "per-image", checkpoint_sha256: str = "0" * 64, weight_scale: float = 1.0) -> Path:
    """A small cnnx-contract model built with onnx.helper (no torch): logits = the mean of the
    top-left 2x2 pixels of each channel times a fixed (3, C) matrix, so any H x W is cheap.

    size: the preprocess size in the metadata; fixed_hw=False leaves H and W symbolic in the
    graph (then only the metadata says the size). batch_out: "per-image" (the contract),
    "reduced" (logits averaged over the batch: [1, C], a fixed output batch), or "first-row"
    (a symbolic output batch that still returns 1 row for any N), "fewer-scores" (a row an
    image, one score fewer than the classes, in a symbolic output width), "times-rows" (the
    scores times the number of images in the run), "fails-when-lit" (onnxruntime fails on a
    run holding an image whose top-left 2x2 pixels are not near black), "nan-when-dark"
    (NaN scores for an image whose top-left 2x2 pixels are black). weight_scale: other weights,
    the same classes (another model's scores)."""
    import onnx
    from onnx import TensorProto, helper

    from cnnx.runtime.contract import encode_metadata, metadata_props
    from cnnx.runtime.preprocess import make_spec

    h, w = size
    c = len(class_names)
    weights = (np.arange(3 * c, dtype=np.float32).reshape(3, c) % 7 - 3) / 50 * np.float32(weight_scale)
    inits = [
        helper.make_tensor("starts", TensorProto.INT64, [2], [0, 0]),
        helper.make_tensor("ends", TensorProto.INT64, [2], [2, 2]),
        helper.make_tensor("axes", TensorProto.INT64, [2], [2, 3]),
        helper.make_tensor("W", TensorProto.FLOAT, [3, c], weights.ravel().tolist()),
    ]
    nodes = [
        helper.make_node("Slice", ["images", "starts", "ends", "axes"], ["corner"]),
        helper.make_node("Cast", ["corner"], ["corner_f"], to=TensorProto.FLOAT),
        helper.make_node("ReduceMean", ["corner_f"], ["pooled"], axes=[2, 3], keepdims=0),
        helper.make_node("MatMul", ["pooled", "W"], ["per_image"]),
    ]
    out_n = "N"
    if batch_out == "per-image":
        nodes.append(helper.make_node("Identity", ["per_image"], ["logits"]))
    elif batch_out == "reduced":
        nodes.append(helper.make_node("ReduceMean", ["per_image"], ["logits"], axes=[0], keepdims=1))
        out_n = 1
    elif batch_out == "first-row":
        inits += [helper.make_tensor("zero", TensorProto.INT64, [1], [0]),
                  helper.make_tensor("one", TensorProto.INT64, [1], [1])]
        nodes.append(helper.make_node("Slice", ["per_image", "zero", "one", "zero"], ["logits"]))
        out_n = "M"
    elif batch_out == "fewer-scores":  # a row an image, of one score fewer than the classes (symbolic: K)
        inits += [helper.make_tensor("zero", TensorProto.INT64, [1], [0]),
                  helper.make_tensor("last", TensorProto.INT64, [1], [c - 1]),
                  helper.make_tensor("one", TensorProto.INT64, [1], [1]),
                  helper.make_tensor("rest", TensorProto.INT64, [1], [-1])]
        nodes += [helper.make_node("Slice", ["per_image", "zero", "last", "one"], ["fewer"]),
                  # reshaped to (N, -1) by a shape computed at run time: no width to infer at load
                  helper.make_node("Shape", ["images"], ["batch"], start=0, end=1),
                  helper.make_node("Concat", ["batch", "rest"], ["shape"], axis=0),
                  helper.make_node("Reshape", ["fewer", "shape"], ["logits"])]
        c = "K"
    elif batch_out == "times-rows":  # the scores times the rows of the run: they tell how many it ran
        nodes += [helper.make_node("Shape", ["images"], ["rows"], start=0, end=1),
                  helper.make_node("Cast", ["rows"], ["rows_f"], to=TensorProto.FLOAT),
                  helper.make_node("Mul", ["per_image", "rows_f"], ["logits"])]
    elif batch_out == "fails-when-lit":  # a Gather of row max(corner) of W: out of its 3 rows, a runtime error
        nodes += [helper.make_node("ReduceMax", ["pooled"], ["brightest"], axes=[1], keepdims=0),
                  helper.make_node("Cast", ["brightest"], ["row"], to=TensorProto.INT64),
                  helper.make_node("Gather", ["W", "row"], ["logits"], axis=0)]
    elif batch_out == "nan-when-dark":  # the scores divided by the corner's sum: 0/0 for a black corner
        inits.append(helper.make_tensor("channel_axis", TensorProto.INT64, [1], [1]))
        nodes += [helper.make_node("ReduceSum", ["pooled", "channel_axis"], ["corner_sum"], keepdims=1),
                  helper.make_node("Div", ["per_image", "corner_sum"], ["logits"])]
    else:
        raise ValueError(batch_out)
    in_shape = ["N", 3, h, w] if fixed_hw else ["N", 3, "H", "W"]
    graph = helper.make_graph(nodes, "tiny", [helper.make_tensor_value_info("images", TensorProto.UINT8, in_shape)],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [out_n, c])], inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = 8
    meta = encode_metadata(class_names=class_names, preprocess=make_spec((h, w), CIFAR_MEAN, CIFAR_STD),
                           arch="tiny", version="test", checkpoint_sha256=checkpoint_sha256)
    for k, v in metadata_props(meta).items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = k, v
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(proto, str(path))
    return path
