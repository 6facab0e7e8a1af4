"""What every exported model carries (DESIGN.md "Exported models"): the keys below are a
contract with `cnnx classify`, which reads them from onnxruntime's custom_metadata_map."""

from __future__ import annotations

import hashlib
import json
import os

from cnnx import __version__

INPUT_NAME = "images"
OUTPUT_NAME = "logits"
EXTRA_FILE = "cnnx.json"  # TorchScript _extra_files / pt2 extra_files name


def file_sha256(path) -> str:
    h = hashlib.sha256()
    with open(os.fspath(path), "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def model_metadata(ckpt: dict, checkpoint_sha256: str, variant: str = "fp32") -> dict:
    """Plain-JSON metadata of an exported model; keys are the ONNX metadata_props names."""
    h, w = ckpt["preprocess"]["size"]
    return {
        "cnnx.class_names": list(ckpt["class_names"]),
        "cnnx.preprocess": dict(ckpt["preprocess"]),
        "cnnx.arch": ckpt["arch"],
        "cnnx.version": __version__,
        "cnnx.checkpoint_sha256": checkpoint_sha256,
        "cnnx.variant": variant,
        # The signature, so a reader without the framework (cnnx info on a .pt2) can show it.
        "cnnx.inputs": [{"name": INPUT_NAME, "dtype": "uint8", "shape": ["N", 3, int(h), int(w)]}],
        "cnnx.outputs": [{"name": OUTPUT_NAME, "dtype": "float32", "shape": ["N", len(ckpt["class_names"])]}],
    }


def onnx_props(meta: dict) -> dict:
    """metadata_props are string -> string: strings stay as they are, the rest is JSON."""
    return {k: v if isinstance(v, str) else json.dumps(v, separators=(",", ":")) for k, v in meta.items()}


def extra_file_bytes(meta: dict) -> bytes:
    """The same metadata for TorchScript / pt2, as one JSON document (values not re-encoded)."""
    return json.dumps(meta, indent=1, sort_keys=True).encode()
