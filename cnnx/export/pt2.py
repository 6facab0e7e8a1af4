"""torch.export ExportedProgram (.pt2), TorchScript's maintained successor."""

from __future__ import annotations

import os
import warnings

from cnnx.export.metadata import extra_file_bytes
from cnnx.runtime.contract import EXTRA_FILE, INPUT_NAME
from cnnx.train.checkpoint import save_torch_file


def export_pt2(module, example, path, *, meta: dict):
    """Export with a dynamic batch axis, save, and load the saved file back (torch.export's
    own format, no pickle) so the parity gate checks what the user gets."""
    import torch

    batch = torch.export.Dim("batch", min=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.export.export(module, (example,), dynamic_shapes={INPUT_NAME: {0: batch}})
        for node in program.graph.nodes:  # no part of the model: the Python stack, with this machine's paths
            node.meta.pop("stack_trace", None)
        # through Python, not to the path: torch aborts the process on a full disk then
        save_torch_file(path, lambda f: torch.export.save(program, f, extra_files={EXTRA_FILE: extra_file_bytes(meta).decode()}))
        loaded = torch.export.load(os.fspath(path))
    return loaded.module()
