"""What every exported model carries: the contract's metadata (cnnx.runtime.contract, which
`cnnx classify` reads with) filled in from a checkpoint."""

from __future__ import annotations

import json

from cnnx import __version__
from cnnx.runtime.contract import encode_metadata


def model_metadata(ckpt: dict, checkpoint_sha256: str, variant: str = "fp32", tta_views: int = 1) -> dict:
    """Plain-JSON metadata of an exported model; keys are the ONNX metadata_props names."""
    return encode_metadata(class_names=ckpt["class_names"], preprocess=ckpt["preprocess"], arch=ckpt["arch"],
                           version=__version__, checkpoint_sha256=checkpoint_sha256, variant=variant,
                           tta_views=tta_views)


def extra_file_bytes(meta: dict) -> bytes:
    """The same metadata for TorchScript / pt2, as one JSON document (values not re-encoded)."""
    return json.dumps(meta, indent=1, sort_keys=True).encode()
