"""torch.export ExportedProgram (.pt2), TorchScript's maintained successor."""

from __future__ import annotations

import os
import warnings

from cnnx.export.errors import ExportError
from cnnx.export.metadata import extra_file_bytes
from cnnx.runtime.contract import EXTRA_FILE


def export_pt2(module, example, path, *, meta: dict):
    """Export with a dynamic batch axis, save, and load the saved file back (torch.export's
    own format, no pickle) so the parity gate checks what the user gets."""
    import torch

    batch = torch.export.Dim("batch", min=1)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.export.export(module, (example,), dynamic_shapes={"images": {0: batch}})
            torch.export.save(program, os.fspath(path), extra_files={EXTRA_FILE: extra_file_bytes(meta).decode()})
            loaded = torch.export.load(os.fspath(path))
    except Exception as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ExportError(f"pt2 export failed: {msg[:300]}") from None
    return loaded.module()
