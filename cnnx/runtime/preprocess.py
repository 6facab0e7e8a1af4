"""The preprocess spec and its one implementation (numpy + Pillow only).

Every stage that turns an image file into model input goes through `load_image`: the
training cache of an image folder, train-time evaluation, the exporter's parity images and
`cnnx classify`. Changing what it returns for a file changes results everywhere, so bump
`PREPROCESS_VERSION` (it keys the training cache) when it does.

The spec (stored in checkpoints and exported models):
    {"size": [H, W], "resize": "shorter-side+center-crop", "interpolation": "bilinear",
     "antialias": true, "mean": [r, g, b], "std": [r, g, b], "channels": "RGB"}

mean/std are in 0..1 units of the uint8 pixel / 255; they are applied inside the model
(train loop and exported graph), never here: this module yields uint8 only.
"""

from __future__ import annotations

import io
import os
import warnings

import numpy as np
from PIL import Image, ImageOps

PREPROCESS_VERSION = 1

RESIZE_MODES = ("shorter-side+center-crop",)
INTERPOLATIONS = {"bilinear": Image.Resampling.BILINEAR}

# Pillow's own bomb threshold; above it a file is refused rather than decoded.
DEFAULT_MAX_PIXELS = 89_478_485


class ImageError(Exception):
    """An image that cannot be turned into model input. `stage` says where it failed
    (open, decode, convert, resize); the message is one line for an errors file."""

    def __init__(self, stage: str, message: str):
        super().__init__(message)
        self.stage = stage


class SpecError(ValueError):
    """A preprocess spec that is not the cnnx contract."""


def make_spec(size, mean, std, *, interpolation: str = "bilinear") -> dict:
    h, w = (int(size), int(size)) if isinstance(size, int) else (int(size[0]), int(size[1]))
    return validate_spec(
        {
            "size": [h, w],
            "resize": "shorter-side+center-crop",
            "interpolation": interpolation,
            "antialias": True,
            "mean": [float(m) for m in mean],
            "std": [float(s) for s in std],
            "channels": "RGB",
        }
    )


def validate_spec(spec) -> dict:
    """Return the spec if it is one this implementation can apply exactly, else SpecError."""
    if not isinstance(spec, dict):
        raise SpecError(f"preprocess spec must be a JSON object, got {type(spec).__name__}")
    need = {"size", "resize", "interpolation", "antialias", "mean", "std", "channels"}
    missing = need - set(spec)
    if missing:
        raise SpecError(f"preprocess spec lacks {sorted(missing)}")
    size = spec["size"]
    if not (isinstance(size, (list, tuple)) and len(size) == 2 and all(isinstance(v, int) and v > 0 for v in size)):
        raise SpecError(f"preprocess size must be [H, W] positive ints, got {size!r}")
    if spec["resize"] not in RESIZE_MODES:
        raise SpecError(f"unknown resize mode {spec['resize']!r}; known: {', '.join(RESIZE_MODES)}")
    if spec["interpolation"] not in INTERPOLATIONS:
        raise SpecError(f"unknown interpolation {spec['interpolation']!r}; known: {', '.join(INTERPOLATIONS)}")
    if spec["antialias"] is not True:
        raise SpecError("only antialias=true is implemented")
    if spec["channels"] != "RGB":
        raise SpecError(f"only RGB channels are implemented, got {spec['channels']!r}")
    for key in ("mean", "std"):
        v = spec[key]
        if not (isinstance(v, (list, tuple)) and len(v) == 3 and all(isinstance(x, (int, float)) for x in v)):
            raise SpecError(f"preprocess {key} must be 3 numbers, got {v!r}")
    if any(s <= 0 for s in spec["std"]):
        raise SpecError("preprocess std must be positive")
    return spec


def _to_rgb(img: Image.Image) -> Image.Image:
    """Any Pillow mode -> 8-bit RGB. Transparency is composited over white; 16/32-bit
    grayscale is scaled down by its bit depth, not clipped."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode == "P" and "transparency" in img.info:
        img, mode = img.convert("RGBA"), "RGBA"
    if mode in ("RGBA", "LA", "RGBa", "La", "PA"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if mode.startswith("I;16") or mode == "I" or mode == "F":
        a = np.asarray(img)
        if mode == "F":
            a = np.clip(a, 0, 255)
        elif a.size and (mode.startswith("I;16") or a.max() > 255):
            a = np.clip(a, 0, 65535) >> 8
        return Image.fromarray(a.astype(np.uint8), "L").convert("RGB")
    return img.convert("RGB")


def _crop_box(w: int, h: int, out_h: int, out_w: int):
    """Source-pixel box that, scaled by the shorter-side factor, is the centre crop."""
    scale = max(out_h / h, out_w / w)
    cw, ch = out_w / scale, out_h / scale
    left, top = (w - cw) / 2.0, (h - ch) / 2.0
    return (left, top, left + cw, top + ch)


def load_image(source, spec: dict, *, max_pixels: int = DEFAULT_MAX_PIXELS):
    """Decode a file path (or bytes) into a uint8 array of shape (3, H, W), RGB.

    Returns (array, note); note is None or a short remark for the user (e.g. that only the
    first frame of an animation was used). Raises ImageError for anything unusable.
    EXIF orientation is applied before resizing; an image already H x W passes through.
    """
    out_h, out_w = spec["size"]
    resample = INTERPOLATIONS[spec["interpolation"]]
    note = None
    try:
        fp = io.BytesIO(source) if isinstance(source, (bytes, bytearray, memoryview)) else os.fspath(source)
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(fp)
    except Image.DecompressionBombError as e:
        raise ImageError("open", f"decompression bomb refused: {e}") from None
    except Image.DecompressionBombWarning as e:
        raise ImageError("open", f"decompression bomb refused: {e}") from None
    except Image.UnidentifiedImageError:
        raise ImageError("open", "not an image Pillow can identify") from None
    except OSError as e:
        raise ImageError("open", f"cannot open: {e.strerror or e}") from None
    with img:
        w, h = img.size
        if w < 1 or h < 1:
            raise ImageError("open", f"image has no pixels ({w}x{h})")
        if w * h > max_pixels:
            raise ImageError("open", f"decompression bomb refused: {w}x{h} pixels exceeds the limit of {max_pixels}")
        n_frames = getattr(img, "n_frames", 1)
        if n_frames > 1:
            note = f"first frame of {n_frames}"
        try:
            if img.format == "JPEG":
                # DCT-domain downscaling: decode at 1/2, 1/4 or 1/8 when that still covers the
                # resized size; much faster for photos far larger than the model input.
                scale = max(out_h / h, out_w / w)
                img.draft("RGB", (max(1, int(w * scale + 0.999)), max(1, int(h * scale + 0.999))))
            img.load()
        except (OSError, SyntaxError, ValueError) as e:
            raise ImageError("decode", f"cannot decode: {e}") from None
        try:
            img = ImageOps.exif_transpose(img)
        except Exception:  # malformed EXIF: keep the pixels as stored
            note = ((note + "; ") if note else "") + "malformed EXIF ignored"
        try:
            img = _to_rgb(img)
        except (OSError, ValueError) as e:
            raise ImageError("convert", f"cannot convert {img.mode} to RGB: {e}") from None
        w, h = img.size
        if (h, w) != (out_h, out_w):
            img = img.resize((out_w, out_h), resample, box=_crop_box(w, h, out_h, out_w))
        arr = np.asarray(img, dtype=np.uint8)
    return np.ascontiguousarray(arr.transpose(2, 0, 1)), note
