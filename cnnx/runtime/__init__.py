"""The torch-free half of cnnx: image decoding (the one preprocess implementation) and
onnxruntime inference. Nothing in this package may import torch, cnnx.train or cnnx.export.

The Python API (cnnx.runtime.api) is re-exported here and loaded on first use, so
`import cnnx.runtime` stays cheap (no numpy, Pillow or onnxruntime until a name is used).
"""

_API = ("Classifier", "Classification", "BatchResult", "Prediction", "Skipped", "Note")
__all__ = [*_API, "ModelError", "ModelInfo"]


def __getattr__(name):
    if name in _API:
        from cnnx.runtime import api

        return getattr(api, name)
    if name in ("ModelError", "ModelInfo"):
        from cnnx.runtime import model

        return getattr(model, name)
    raise AttributeError(f"module 'cnnx.runtime' has no attribute {name!r}")
