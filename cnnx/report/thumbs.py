"""Thumbnails as small JPEG data: URIs, from decoded arrays or from image files (through the
one preprocess implementation, so a thumbnail shows the crop the model saw)."""

from __future__ import annotations

import base64
import io
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from PIL import Image

from cnnx.runtime.files import first_line

THUMB_SIDE = 96  # px: the longest side of a stored thumbnail (the page shows them at 96 CSS px)
JPEG_QUALITY = 85  # ~1.5 KB for a 32x32 CIFAR image, ~4 KB for a 96x96 photo crop


def array_data_uri(image) -> str:
    """uint8 (3, H, W) RGB (a numpy array, or anything np.asarray reads, e.g. a CPU tensor)
    -> a data: URI of a JPEG at most THUMB_SIDE on its longest side."""
    a = np.asarray(image)
    if a.dtype != np.uint8 or a.ndim != 3 or a.shape[0] not in (1, 3):
        raise ValueError(f"a thumbnail needs a uint8 (3, H, W) array, got {a.dtype} {a.shape}")
    hwc = np.ascontiguousarray(a.transpose(1, 2, 0))
    img = Image.fromarray(hwc[:, :, 0] if a.shape[0] == 1 else hwc)
    if max(img.size) > THUMB_SIDE:
        img.thumbnail((THUMB_SIDE, THUMB_SIDE), Image.Resampling.BILINEAR)
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=JPEG_QUALITY)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def thumb_spec(model_spec: dict | None) -> dict:
    """The preprocess spec for thumbnails: the model's crop (shorter side + centre crop, same
    aspect), at most THUMB_SIDE on its longest side; a square THUMB_SIDE crop without a spec."""
    from cnnx.runtime.preprocess import make_spec, validate_spec

    if model_spec is None:
        return make_spec(THUMB_SIDE, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
    validate_spec(model_spec)
    h, w = model_spec["size"]
    f = min(1.0, THUMB_SIDE / max(h, w))
    return make_spec([max(1, round(h * f)), max(1, round(w * f))], model_spec["mean"], model_spec["std"],
                     interpolation=model_spec["interpolation"])


def file_thumbnail(path: str, spec: dict) -> tuple[str | None, str]:
    """(data URI, '') for an image file, or (None, why) when it cannot be shown. A report is
    written after the job, and the file may have changed or gone since: any failure to read
    or decode it becomes a placeholder on the page, never an exception."""
    from cnnx.runtime.preprocess import ImageError, load_image

    try:
        array, _note = load_image(path, spec)
        return array_data_uri(array), ""
    except ImageError as e:
        return None, f"{e.stage}: {first_line(e)}"
    except Exception as e:  # noqa: BLE001 - a decoder's unexpected failure must not lose the report
        return None, first_line(e)


def file_thumbnails(paths, spec: dict, *, workers: int | None = None) -> dict:
    """{path: (uri or None, why)} for distinct paths, decoded on a few threads (decoding
    releases the GIL)."""
    import os

    distinct = list(dict.fromkeys(paths))
    if not distinct:
        return {}
    workers = workers or min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return dict(zip(distinct, pool.map(lambda p: file_thumbnail(p, spec), distinct)))
