"""What every exported model carries: the contract's metadata (cnnx.runtime.contract, which
`cnnx classify` reads with) filled in from a checkpoint, and the checkpoint's hash."""

from __future__ import annotations

import hashlib
import json
import os

from cnnx import __version__
from cnnx.runtime.contract import encode_metadata


def file_sha256(path) -> str:
    h = hashlib.sha256()
    with open(os.fspath(path), "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def model_metadata(ckpt: dict, checkpoint_sha256: str, variant: str = "fp32", tta_views: int = 1) -> dict:
    """Plain-JSON metadata of an exported model; keys are the ONNX metadata_props names."""
    return encode_metadata(class_names=ckpt["class_names"], preprocess=ckpt["preprocess"], arch=ckpt["arch"],
                           version=__version__, checkpoint_sha256=checkpoint_sha256, variant=variant,
                           tta_views=tta_views)


def extra_file_bytes(meta: dict) -> bytes:
    """The same metadata for TorchScript / pt2, as one JSON document (values not re-encoded)."""
    return json.dumps(meta, indent=1, sort_keys=True).encode()
