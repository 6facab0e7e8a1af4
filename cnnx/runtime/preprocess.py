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
import math
import os
import re
import struct
import zlib

import numpy as np
from PIL import Image, ImageOps

from cnnx.runtime.files import first_line

# 2: JPEGs decoded by libjpeg-turbo (simplejpeg) with DCT scaling, EXIF orientation applied
#    to the decoded array; pixels differ slightly from version 1 (Pillow) for JPEGs.
# 3: whatever Pillow raises is the file's ImageError; JPEGs padded before a marker, with an EXIF
#    orientation of another integer type, or larger than max_pixels only before their DCT
#    scaling are decoded; negative 32-bit pixels are black.
# 4: transparency of a PNG colour key (tRNS) composited over white, as an alpha channel is; a
#    JPEG's XMP orientation applied where EXIF has none, as Pillow applies it to other formats.
PREPROCESS_VERSION = 4

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
    if not (isinstance(size, (list, tuple)) and len(size) == 2
            and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in size)):
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
        # finite: an infinite std made every image the same input (one label for all, the parity gate agreeing)
        if not (isinstance(v, (list, tuple)) and len(v) == 3
                and all(isinstance(x, (int, float)) and not isinstance(x, bool) and _finite(x) for x in v)):
            raise SpecError(f"preprocess {key} must be 3 finite numbers, got {v!r}")
    if any(s <= 0 for s in spec["std"]):
        raise SpecError("preprocess std must be positive")
    return spec


def _finite(x) -> bool:
    try:
        return math.isfinite(x)
    except OverflowError:  # an int too large for a float (metadata's 400-digit mean)
        return False


def _to_rgb(img: Image.Image) -> Image.Image:
    """Any Pillow mode -> 8-bit RGB. Transparency is composited over white: an alpha channel,
    a palette's transparent index and a PNG's colour key (tRNS) alike. 16-bit grayscale is
    scaled down by 8 bits; 32-bit integer grayscale (I) too where a value exceeds 255 (such
    files hold 16-bit data or 8-bit data), else taken as it is; float (F) is clipped to 0..255."""
    mode = img.mode
    keyed = img.info.get("transparency") is not None  # a transparent palette index or colour key
    if mode == "RGB" and not keyed:
        return img
    if keyed and mode in ("P", "RGB", "L", "1"):
        img, mode = img.convert("RGBA"), "RGBA"
    if mode in ("RGBA", "LA", "RGBa", "La", "PA"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if mode.startswith("I;16") or mode == "I" or mode == "F":
        a = np.asarray(img)
        key = img.info.get("transparency") if mode != "F" else None
        transparent = a == key if isinstance(key, int) else None
        if mode != "F" and a.size and (mode.startswith("I;16") or a.max() > 255):
            a = np.clip(a, 0, 65535) >> 8
        # negative values are black, not wrapped round to bright
        a = np.clip(a, 0, 255).astype(np.uint8)
        if transparent is not None:
            a[transparent] = 255
        return Image.fromarray(a, "L").convert("RGB")
    return img.convert("RGB")


def _crop_box(w: int, h: int, out_h: int, out_w: int):
    """Source-pixel box that, scaled by the shorter-side factor, is the centre crop."""
    scale = max(out_h / h, out_w / w)
    cw, ch = min(out_w / scale, w), min(out_h / scale, h)  # min: w / (w / out) can exceed w by an ulp
    left, top = max((w - cw) / 2.0, 0.0), max((h - ch) / 2.0, 0.0)
    return (left, top, left + cw, top + ch)


# Files larger than this are refused before reading: no photo is this big, and reading one
# whole into a worker would make memory depend on the input.
MAX_FILE_BYTES = 1 << 30
# Files up to this size are read whole in one call before their type is looked at (one read,
# not a peek and a read); a small PNG's oversized metadata chunk (an inflating zTXt) is then
# dropped from the bytes in memory by the same plan that reads a larger file around it.
READ_WHOLE_BYTES = 1 << 20
_JPEG_MAGIC = b"\xff\xd8\xff"
# ISO-BMFF brands of HEIF/HEIC/AVIF; Pillow reads AVIF itself (when built with it), never HEIC.
_HEIF_BRANDS = (b"heic", b"heix", b"heim", b"heis", b"hevc", b"hevx", b"mif1", b"msf1", b"avif", b"avis")


def read_file(path):
    """The bytes of a regular file -> (bytes, note). Never blocks on a FIFO or device
    (O_NONBLOCK + fstat before any read) and refuses files over MAX_FILE_BYTES; a PNG's
    oversized metadata chunks are never read (see png_plan; the note says so). Raises
    ImageError(stage='open')."""
    import stat

    try:
        fd = os.open(os.fspath(path), os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except OSError as e:
        raise ImageError("open", f"cannot open: {e.strerror or first_line(e)}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ImageError("open", "not a regular file")
        if st.st_size > MAX_FILE_BYTES:
            raise ImageError("open", f"file of {st.st_size} bytes exceeds the limit of {MAX_FILE_BYTES}")
        if st.st_size <= READ_WHOLE_BYTES:  # one read; a PNG's plan is then made in memory (_from_bytes)
            return _from_bytes(_read_exactly(fd, 0, st.st_size + 1))
        if os.pread(fd, len(PNG_SIGNATURE), 0) == PNG_SIGNATURE:
            keep, note = png_plan(lambda pos, n: os.pread(fd, n, pos), st.st_size)
            if note is not None:
                return b"".join(_read_exactly(fd, start, end - start) for start, end in keep), note
        return _read_exactly(fd, 0, st.st_size + 1), None  # +1 notices a file that grew
    except OSError as e:
        raise ImageError("open", f"cannot read: {e.strerror or first_line(e)}") from None
    finally:
        os.close(fd)


def _read_exactly(fd, offset: int, want: int) -> bytes:
    """Up to `want` bytes from `offset` (fewer at end of file); loops over short reads."""
    chunks = []
    while want > 0:
        chunk = os.pread(fd, want, offset)
        if not chunk:
            break
        chunks.append(chunk)
        want -= len(chunk)
        offset += len(chunk)
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


# PNG chunks other than pixel data (text, ICC profile, EXIF, unknown ancillary ones) are read
# whole by Pillow, often more than once, and compressed ones are inflated: a file under the
# size cap carrying a 1 GB text chunk would peak at several GiB in one decode thread. Such a
# chunk is left out before decoding (with a note), so neither Pillow nor this module ever
# holds it; this does not depend on Pillow's own (global, changeable) text limits.
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PNG_PIXEL_CHUNKS = (b"IDAT", b"fdAT")
PNG_CRITICAL_CHUNKS = (b"IHDR", b"PLTE", b"IEND")
MAX_PNG_METADATA_BYTES = 16 << 20  # stored or inflated; an ICC profile or EXIF block is far smaller


def png_plan(read_at, size: int):
    """Walk a PNG's chunk headers (read_at(pos, n) -> bytes) -> (byte ranges to keep, note).
    note is None when every chunk is kept (then ranges cover the whole file)."""
    keep, dropped, pos = [(0, len(PNG_SIGNATURE))], [], len(PNG_SIGNATURE)
    while pos + 8 <= size:
        head = read_at(pos, 8)
        if len(head) < 8:
            break
        length, kind = struct.unpack(">I4s", head)
        end = min(pos + 12 + length, size)
        too_large = None
        if kind not in PNG_PIXEL_CHUNKS and kind not in PNG_CRITICAL_CHUNKS:
            too_large = _png_metadata_too_large(read_at, pos + 8, length, kind)
        if too_large is None:
            keep.append((pos, end))
        else:
            dropped.append(f"{kind.decode('latin-1')} {too_large}")
        pos = end
        if kind == b"IEND":
            break
    if pos < size:
        keep.append((pos, size))  # whatever follows (or a cut-short chunk) is the decoder's to judge
    if not dropped:
        return [(0, size)], None
    chunks = "chunks" if len(dropped) > 1 else "chunk"
    return keep, f"PNG metadata {chunks} over {MAX_PNG_METADATA_BYTES >> 20} MiB ignored: " + ", ".join(dropped)


def _png_metadata_too_large(read_at, start: int, length: int, kind: bytes):
    """None when the chunk is within the limit, else what is too large about it."""
    if length > MAX_PNG_METADATA_BYTES:
        return f"of {length:,} bytes"
    if kind not in (b"zTXt", b"iTXt", b"iCCP"):
        return None
    data = read_at(start, length)
    keyword_end = data.find(b"\0")
    if keyword_end < 0:
        return None
    if kind == b"iTXt":  # keyword \0 flag method language \0 translated keyword \0 text
        if data[keyword_end + 1:keyword_end + 2] != b"\1":
            return None  # stored uncompressed: its stored length was checked above
        lang_end = data.find(b"\0", keyword_end + 3)
        text_start = data.find(b"\0", lang_end + 1) + 1 if lang_end >= 0 else 0
        if text_start <= 0:
            return None
        compressed = data[text_start:]
    else:  # keyword \0 method data
        compressed = data[keyword_end + 2:]
    inflater = zlib.decompressobj()
    try:
        inflater.decompress(compressed, MAX_PNG_METADATA_BYTES)
    except zlib.error:
        return None  # Pillow ignores text it cannot inflate
    return f"of {length:,} bytes inflating past that" if inflater.unconsumed_tail else None


def _jpeg_segments(data: bytes):
    """(marker, position, segment length) of a JPEG's header segments, up to and including its
    first start of scan (SOS, 0xDA); nothing more where no marker is where one must be (the
    decoder then judges the file) or at the end of the image."""
    n, pos = len(data), 2
    while pos + 4 <= n:
        if data[pos] != 0xFF:
            return
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:
            pos += 2
            continue
        if marker == 0xD9:
            return
        (seglen,) = struct.unpack_from(">H", data, pos + 2)
        yield marker, pos, seglen
        if marker == 0xDA:
            return
        pos += 2 + seglen


def jpeg_orientation(data: bytes):
    """Orientation (1..8) of a JPEG from its header, read without decoding, as Pillow's
    exif_transpose takes it: the first EXIF block's tag, else (no EXIF, or none in it) the XMP
    packet's tiff:Orientation. Returns (orientation, note): 1 and no note when neither says;
    "malformed EXIF ignored" when the EXIF block cannot be parsed (1; XMP's where it is cut short)."""
    if b"\xff\xe1" not in data:  # no APP1 segment (EXIF's and XMP's), as the walk would find without a
        return 1, None             # Python step a marker: 0xFF in the entropy-coded data is never followed by 0xE1
    exif = xmp = None
    for marker, pos, seglen in _jpeg_segments(data):
        if marker != 0xE1:
            continue
        body = data[pos + 4:pos + 2 + seglen]
        if body[:6] == b"Exif\0\0" and exif is None:  # Pillow keeps the first
            exif = body[6:]
        elif body.startswith(_XMP_HEADER):  # and the last
            xmp = body[len(_XMP_HEADER):]
    value = note = None
    if exif is not None:
        try:
            value = _tiff_orientation(exif)
        except ValueError:  # not TIFF, or an orientation that is no integer: Pillow applies none
            return 1, "malformed EXIF ignored"
        except struct.error:  # cut short: Pillow reads what it holds (no tag), then XMP's
            note = "malformed EXIF ignored"
    if value is None and xmp is not None and (match := _XMP_ORIENTATION.search(xmp)):
        value = int(match[2])
    # Pillow's exif_transpose ignores values outside 1..8; so do we.
    return (value if value is not None and 1 <= value <= 8 else 1), note


_XMP_HEADER = b"http://ns.adobe.com/xap/1.0/\0"
_XMP_ORIENTATION = re.compile(rb'tiff:Orientation(="|>)([0-9])')  # Pillow's Image.getexif reads it so


# Start-of-frame markers of progressive JPEGs (Huffman and arithmetic, plain and differential)
_PROGRESSIVE_SOF = (0xC2, 0xC6, 0xCA, 0xCE)


def jpeg_holds_whole_image(data: bytes) -> bool:
    """Whether libjpeg keeps the whole image's DCT coefficients in memory to decode this JPEG,
    at any output scale: progressive, or its first scan without every component (a
    multi-scan sequential file). Its memory then follows the stored size, not the decoded one.
    A header this walk cannot follow to its first scan (a stray byte before a marker, which
    libjpeg skips) counts as held whole: the limit fails closed."""
    components = None
    for marker, pos, _seglen in _jpeg_segments(data):
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):  # a start of frame
            if marker in _PROGRESSIVE_SOF:
                return True
            components = data[pos + 9] if pos + 9 < len(data) else None
        elif marker == 0xDA:
            return components is None or pos + 4 >= len(data) or data[pos + 4] < components
    return True


# TIFF field types holding one integer in the entry's value field: BYTE, SHORT, LONG, SBYTE,
# SSHORT, SLONG -> its struct format.
_TIFF_INTEGER_TYPES = {1: "B", 3: "H", 4: "I", 6: "b", 8: "h", 9: "i"}


def _tiff_orientation(tiff: bytes) -> int | None:
    """The orientation tag's value in an EXIF block (TIFF), None where it has none (an empty
    block too: Pillow reads it as no EXIF)."""
    if not tiff:
        return None
    order = {b"II": "<", b"MM": ">"}.get(tiff[:2])
    if order is None:
        raise ValueError("bad byte order")
    magic, ifd = struct.unpack_from(order + "HI", tiff, 2)
    if magic != 42:
        raise ValueError("bad TIFF magic")
    (count,) = struct.unpack_from(order + "H", tiff, ifd)
    for i in range(count):
        tag, typ, _n = struct.unpack_from(order + "HHI", tiff, ifd + 2 + 12 * i)
        if tag == 0x0112:
            if typ not in _TIFF_INTEGER_TYPES:  # Pillow reads any integer type (writers use SHORT or LONG)
                raise ValueError("orientation is not an integer")
            (value,) = struct.unpack_from(order + _TIFF_INTEGER_TYPES[typ], tiff, ifd + 2 + 12 * i + 8)
            return value
    return None


def orient(arr: np.ndarray, orientation: int) -> np.ndarray:
    """Apply an orientation (EXIF's values 1..8) to an (H, W, C) array: the same permutation of pixels as
    PIL.ImageOps.exif_transpose (2 mirror, 3 rotate 180, 4 flip, 5 transpose, 6 rotate 90
    clockwise, 7 transverse, 8 rotate 90 counter-clockwise)."""
    if orientation == 2:
        return arr[:, ::-1]
    if orientation == 3:
        return arr[::-1, ::-1]
    if orientation == 4:
        return arr[::-1]
    if orientation == 5:
        return arr.transpose(1, 0, 2)
    if orientation == 6:
        return np.rot90(arr, -1)
    if orientation == 7:
        return arr[::-1, ::-1].transpose(1, 0, 2)
    if orientation == 8:
        return np.rot90(arr, 1)
    return arr


def _resize_array(arr: np.ndarray, out_h: int, out_w: int, resample) -> np.ndarray:
    """(H, W, 3) uint8 -> (out_h, out_w, 3): shorter side to the output size, centre crop."""
    h, w = arr.shape[:2]
    if (h, w) != (out_h, out_w):
        img = Image.fromarray(np.ascontiguousarray(arr), "RGB")
        arr = np.asarray(img.resize((out_w, out_h), resample, box=_crop_box(w, h, out_h, out_w)))
    return arr


def _load_jpeg(data: bytes, out_h: int, out_w: int, resample, max_pixels: int):
    """libjpeg-turbo path (simplejpeg): DCT-scaled decode straight to RGB, the orientation
    (jpeg_orientation) applied to the decoded array. Returns None for JPEGs it does not handle
    (CMYK/YCCK, headers it cannot read) so Pillow gets them; corrupt or truncated data is an error."""
    import simplejpeg

    try:
        h, w, colorspace, _sub = simplejpeg.decode_jpeg_header(data)
    except ValueError:
        return None
    if colorspace in ("CMYK", "YCCK"):
        return None  # Pillow knows Adobe's inverted CMYK; turbojpeg's conversion differs
    if w < 1 or h < 1:
        raise ImageError("open", f"image has no pixels ({w}x{h})")
    orientation, note = jpeg_orientation(data)
    stored_out = (out_w, out_h) if orientation >= 5 else (out_h, out_w)  # the input's sides as the JPEG stores them
    # Decode at the smallest DCT scale (k/8) that still covers the resized image, then let the
    # antialiased resize do the rest; 0 = full size when the image is not larger than needed.
    min_h, min_w = _dct_minimum(h, w, *stored_out)
    if h * w > max_pixels:  # (under the limit as stored: under it however decoded, and no work a file)
        # What libjpeg holds is what takes memory: the decoded image (a 108 MP photo at 1/8 is no
        # bomb), or every coefficient of the stored one where it keeps them all (a progressive file).
        k, _ = dct_scale(h, w, *stored_out)
        dh, dw = (h, w) if jpeg_holds_whole_image(data) else (-(-h * k // 8), -(-w * k // 8))
        if dw * dh > max_pixels:
            raise ImageError("open", _bomb_message(w, h, dw, dh, max_pixels))
    try:
        arr = simplejpeg.decode_jpeg(data, colorspace="RGB", min_height=min_h, min_width=min_w)
    except ValueError as strict_error:
        # strict mode turns libjpeg's warnings (corrupt entropy data, premature end) into
        # errors; if the lenient decode works, the file is damaged, not unsupported, unless
        # all that is wrong is zero bytes padding the end marker (some writers add them).
        try:
            simplejpeg.decode_jpeg(data, colorspace="RGB", min_height=min_h, min_width=min_w, strict=False)
        except ValueError:
            return None
        unpadded = _without_end_padding(data)
        try:
            arr = simplejpeg.decode_jpeg(unpadded, colorspace="RGB", min_height=min_h, min_width=min_w)
        except ValueError:
            raise ImageError("decode", f"corrupt JPEG data: {strict_error}") from None
        padding = f"{len(data) - len(unpadded):,} zero bytes before the JPEG's end marker ignored"
        note = f"{note}; {padding}" if note else padding
    return _resize_array(orient(arr, orientation), out_h, out_w, resample), note


def _without_end_padding(data: bytes) -> bytes:
    """A JPEG without the zero bytes right before its end marker (FFD9): the pixels are all in
    the scans before them (libjpeg warns of "extraneous bytes" and decodes the image whole)."""
    end = data.rfind(b"\xff\xd9")
    if end < 0:
        return data
    start = len(data[:end].rstrip(b"\0"))
    return data[:start] + data[end:]


def dct_scale(h: int, w: int, out_h: int, out_w: int) -> tuple:
    """(k, 8): the scale k/8 at which load_image has libjpeg-turbo decode an h x w JPEG (as
    stored) for an out_h x out_w input (its sides as stored: swapped for an orientation tag's
    rotation by 90 degrees): the smallest k/8 whose decoded size, ceil(h * k / 8) x ceil(w * k / 8), still
    covers the shorter-side resize, as simplejpeg's min_height/min_width pick it; (8, 8) when
    the image is not larger than needed."""
    min_h, min_w = _dct_minimum(h, w, out_h, out_w)
    if not (min_h or min_w):
        return 8, 8
    return next((k, 8) for k in range(1, 9) if -(-h * k // 8) >= min_h and -(-w * k // 8) >= min_w)


def _dct_minimum(h: int, w: int, out_h: int, out_w: int) -> tuple[int, int]:
    """The least decoded size of an h x w JPEG that covers the shorter-side resize to an
    out_h x out_w input (simplejpeg's min_height/min_width); (0, 0), full size, where the image
    is not larger than needed."""
    scale = max(out_h / h, out_w / w)
    if scale >= 1:
        return 0, 0
    return math.ceil(h * scale - 1e-6), math.ceil(w * scale - 1e-6)


def _heif_hint(data: bytes):
    if len(data) >= 12 and data[4:8] == b"ftyp" and data[8:12] in _HEIF_BRANDS:
        return "HEIC/HEIF image and no decoder for it: convert it to JPEG/PNG or install pillow-heif"
    return None


def load_image(source, spec: dict, *, max_pixels: int = DEFAULT_MAX_PIXELS):
    """Decode a file path (or bytes) into a uint8 array of shape (3, H, W), RGB.

    Returns (array, note); note is None or a short remark for the user (e.g. that only the
    first frame of an animation was used). Raises ImageError for anything unusable.
    The orientation tag (EXIF, else XMP, as Pillow reads it) is applied before resizing; an
    image already H x W passes through.
    JPEGs go through libjpeg-turbo (simplejpeg, DCT-scaled); everything else, and the JPEGs
    it declines, through Pillow. Which path a file takes depends only on its bytes.
    """
    arr, note = _decode(source, spec, max_pixels)
    return np.ascontiguousarray(arr.transpose(2, 0, 1)), note


def load_image_into(out: np.ndarray, source, spec: dict, *, max_pixels: int = DEFAULT_MAX_PIXELS):
    """load_image, its pixels written into `out` (a (3, H, W) uint8 view, e.g. a batch's row)
    as they are laid out there: one copy, not a contiguous array and then a copy. -> note."""
    arr, note = _decode(source, spec, max_pixels)
    out[...] = arr.transpose(2, 0, 1)
    return note


def _decode(source, spec: dict, max_pixels: int):
    """load_image's work -> ((H, W, 3) uint8 array, note): the layout decoders give."""
    out_h, out_w = spec["size"]
    resample = INTERPOLATIONS[spec["interpolation"]]
    if isinstance(source, (bytes, bytearray, memoryview)):
        data, read_note = _from_bytes(bytes(source))
    else:
        data, read_note = read_file(source)
    if not data:
        raise ImageError("open", "empty file (0 bytes)")
    done = None
    if data[:3] == _JPEG_MAGIC:
        done = _load_jpeg(data, out_h, out_w, resample, max_pixels)
    if done is None:
        done = _load_with_pillow(data, out_h, out_w, resample, max_pixels)
    arr, note = done
    return arr, "; ".join(n for n in (read_note, note) if n) or None


def _from_bytes(data: bytes):
    """In-memory input: the same PNG metadata limit as a file (see png_plan)."""
    if data[:len(PNG_SIGNATURE)] != PNG_SIGNATURE:
        return data, None
    keep, note = png_plan(lambda pos, n: data[pos:pos + n], len(data))
    if note is None:
        return data, None
    return b"".join(data[start:end] for start, end in keep), note


def _load_with_pillow(data: bytes, out_h: int, out_w: int, resample, max_pixels: int):
    """Pillow's path. Whatever Pillow raises on a file's bytes is that file's ImageError: a
    damaged file can fail anywhere in a plugin's code (a cut multi-page TIFF raises TypeError
    counting its frames), and every stage must skip it alike (train, export and classify)."""
    note = None
    try:
        img = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as e:  # Pillow refuses twice its own limit, before max_pixels is asked
        raise ImageError("open", f"decompression bomb refused: {first_line(e)}") from None
    except Image.UnidentifiedImageError:
        raise ImageError("open", _heif_hint(data) or "not an image Pillow can identify") from None
    except Exception as e:  # noqa: BLE001 - see above
        raise ImageError("open", f"cannot open: {_pillow_error(e)}") from None
    with img:
        stage, mode = "decode", img.mode
        try:
            w, h = img.size
            if w < 1 or h < 1:
                raise ImageError("open", f"image has no pixels ({w}x{h})")
            if img.format == "JPEG":
                # DCT-domain downscaling, as on the libjpeg-turbo path (and the limit on what it decodes)
                scale = max(out_h / h, out_w / w)
                img.draft("RGB", (max(1, int(w * scale + 0.999)), max(1, int(h * scale + 0.999))))
            # held to the limit as _load_jpeg holds it: at the decoded size, or the stored one
            dw, dh = (w, h) if img.format == "JPEG" and w * h > max_pixels and jpeg_holds_whole_image(data) \
                else img.size
            if dw * dh > max_pixels:
                raise ImageError("open", _bomb_message(w, h, dw, dh, max_pixels))
            n_frames = getattr(img, "n_frames", 1)
            if n_frames > 1:
                note = f"first frame of {n_frames}"
            img.load()
            try:
                img = ImageOps.exif_transpose(img)
            except Exception:  # noqa: BLE001 - malformed EXIF: keep the pixels as stored
                note = ((note + "; ") if note else "") + "malformed EXIF ignored"
            stage, mode = "convert", img.mode
            img = _to_rgb(img)
            stage = "resize"
            w, h = img.size
            if (h, w) != (out_h, out_w):
                img = img.resize((out_w, out_h), resample, box=_crop_box(w, h, out_h, out_w))
            arr = np.asarray(img, dtype=np.uint8)
        except ImageError:
            raise
        except Exception as e:  # noqa: BLE001 - see above
            what = {"decode": "cannot decode", "convert": f"cannot convert {mode} to RGB",
                    "resize": "cannot resize"}[stage]
            raise ImageError(stage, f"{what}: {_pillow_error(e)}") from None
    return arr, note


def _pillow_error(e: Exception) -> str:
    """A Pillow failure in one line: its message, or its type where it has none (KeyError: 256)."""
    return first_line(e) if str(e) else type(e).__name__


def _bomb_message(w: int, h: int, dw: int, dh: int, max_pixels: int) -> str:
    decoded = f"{w}x{h} pixels" if (dw, dh) == (w, h) else f"{w}x{h} pixels (decoded at {dw}x{dh})"
    return f"decompression bomb refused: {decoded} exceeds the limit of {max_pixels}"

