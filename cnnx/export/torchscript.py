"""TorchScript export (deprecated upstream, kept because users ask for it).

cnnx writes TorchScript but never loads it (torch.jit.load unpickles): the parity gate runs
the very ScriptModule object that was saved, and the tests check the saved file."""

from __future__ import annotations

import warnings

from cnnx.export.metadata import extra_file_bytes
from cnnx.runtime.contract import EXTRA_FILE
from cnnx.train.checkpoint import save_torch_file


def export_torchscript(module, example, path, *, meta: dict):
    """Trace `module` (eval mode, no control flow on data in the zoo) and save it with the
    cnnx metadata as an extra file; returns the traced module for the parity gate."""
    import torch

    with torch.inference_mode(False), torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "torch.jit.trace is deprecated": said in the docs instead
        traced = torch.jit.trace(module, (example,), check_trace=False)
        # through Python, not traced.save(path): torch aborts the process on a full disk then
        save_torch_file(path, lambda f: torch.jit.save(traced, f, _extra_files={EXTRA_FILE: extra_file_bytes(meta)}))
    return traced
