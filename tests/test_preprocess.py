"""The one preprocess implementation: libjpeg-turbo fast path, EXIF orientation, Pillow path,
and the errors it raises. Real files written with Pillow; nothing is mocked."""

from __future__ import annotations

import io
import itertools
import struct
import warnings

import numpy as np
import pytest
import simplejpeg
from PIL import Image, ImageOps

from cnnx.runtime.preprocess import (PREPROCESS_VERSION, READ_WHOLE_BYTES, ImageError, SpecError, _crop_box,
                                     jpeg_orientation, load_image, load_image_into, make_spec, orient, read_file,
                                     validate_spec)
from tests._runtime_util import photo_like

SPEC32 = make_spec(32, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))


def jpeg_bytes(arr, quality=92, exif=None, **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG", quality=quality, **({"exif": exif} if exif is not None else {}), **kw)
    return buf.getvalue()


def exif_with_orientation(value: int) -> bytes:
    ex = Image.Exif()
    ex[0x0112] = value
    return ex.tobytes()


def quadrants(h=60, w=80):
    """Red top-left, green top-right, blue bottom-left, white bottom-right."""
    a = np.zeros((h, w, 3), np.uint8)
    a[: h // 2, : w // 2] = (255, 0, 0)
    a[: h // 2, w // 2:] = (0, 255, 0)
    a[h // 2:, : w // 2] = (0, 0, 255)
    a[h // 2:, w // 2:] = (255, 255, 255)
    return a


def test_version_bumped_for_the_libjpeg_turbo_path():
    assert PREPROCESS_VERSION >= 2


@pytest.mark.parametrize("orientation", range(1, 9))
def test_orient_is_the_same_permutation_as_pillow_exif_transpose(orientation):
    arr = np.random.default_rng(orientation).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG", exif=exif_with_orientation(orientation))
    expected = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(buf.getvalue()))))
    assert np.array_equal(orient(arr, orientation), expected)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_is_read_from_the_jpeg_header(orientation):
    data = jpeg_bytes(quadrants(), exif=exif_with_orientation(orientation))
    assert jpeg_orientation(data) == (orientation, None)


def test_exif_rotated_photo_is_rotated_before_resizing():
    # Stored landscape 80x60, orientation 6 = "rotate 90 clockwise to view": viewed portrait,
    # red (stored top-left) ends up top-right.
    data = jpeg_bytes(quadrants(), quality=98, exif=exif_with_orientation(6))
    spec = make_spec((40, 30), (0.5,) * 3, (0.25,) * 3)
    arr, note = load_image(data, spec)
    assert note is None and arr.shape == (3, 40, 30)
    top_right, top_left = arr[:, 5, 25], arr[:, 5, 5]
    assert top_right[0] > 200 and top_right[1] < 60  # red
    assert top_left[2] > 200 and top_left[0] < 60  # blue (stored bottom-left)


def test_malformed_exif_keeps_the_pixels_and_says_so():
    good = jpeg_bytes(quadrants(), quality=95)
    bad_exif = b"Exif\0\0" + b"XX*\0garbage"  # byte order that is neither II nor MM
    seg = b"\xff\xe1" + struct.pack(">H", len(bad_exif) + 2) + bad_exif
    data = good[:2] + seg + good[2:]
    arr, note = load_image(data, make_spec((60, 80), (0.5,) * 3, (0.25,) * 3))
    assert note == "malformed EXIF ignored"
    expected, _ = load_image(good, make_spec((60, 80), (0.5,) * 3, (0.25,) * 3))
    assert np.array_equal(arr, expected)


def test_image_of_the_model_size_passes_through_the_decoder_unchanged():
    arr = photo_like(32, 32, seed=1)
    data = jpeg_bytes(arr)
    out, _ = load_image(data, SPEC32)
    assert np.array_equal(out, simplejpeg.decode_jpeg(data, colorspace="RGB").transpose(2, 0, 1))
    png = io.BytesIO()
    Image.fromarray(arr).save(png, "PNG")
    out, _ = load_image(png.getvalue(), SPEC32)
    assert np.array_equal(out, arr.transpose(2, 0, 1))


def test_large_jpeg_is_dct_scaled_and_close_to_a_full_decode():
    arr = photo_like(1200, 1600, seed=2)
    data = jpeg_bytes(arr)
    fast, _ = load_image(data, SPEC32)
    full = Image.open(io.BytesIO(data)).convert("RGB")
    ref = np.asarray(full.resize((32, 32), Image.Resampling.BILINEAR, box=(200, 0, 1400, 1200))).transpose(2, 0, 1)
    assert fast.shape == (3, 32, 32) and fast.dtype == np.uint8
    assert np.abs(fast.astype(int) - ref.astype(int)).mean() < 4


def test_truncated_jpeg_is_an_error_not_a_gray_image():
    data = jpeg_bytes(photo_like(200, 300, seed=3))
    for cut in (len(data) // 2, len(data) - 10):
        with pytest.raises(ImageError) as e:
            load_image(data[:cut], SPEC32)
        assert e.value.stage == "decode"


def test_corrupt_jpeg_data_is_an_error():
    # JPEG has no checksum, so only damage libjpeg notices can be reported: a stray restart
    # marker mid-scan, or a run of zeros that leaves extraneous bytes before the end marker
    # (libjpeg's warning for zero padding too, which the next test decodes).
    data = jpeg_bytes(photo_like(200, 300, seed=4))
    n = len(data)
    for damaged in (data[: n // 2] + b"\xff\xd3" + data[n // 2:], data[: n // 2] + b"\0" * 200 + data[n // 2 + 200:]):
        with pytest.raises(ImageError, match="corrupt JPEG data") as e:
            load_image(damaged, SPEC32)
        assert e.value.stage == "decode"


def test_zero_padding_before_the_end_marker_loses_no_pixel_and_is_noted():
    data = jpeg_bytes(photo_like(200, 300, seed=4))
    assert data.endswith(b"\xff\xd9")
    padded = data[:-2] + b"\0" * 100 + data[-2:]
    with pytest.raises(ValueError):  # libjpeg's warning, strict
        simplejpeg.decode_jpeg(padded)
    spec = make_spec((200, 300), (0.5,) * 3, (0.25,) * 3)
    arr, note = load_image(padded, spec)
    assert np.array_equal(arr, load_image(data, spec)[0])
    assert note == "100 zero bytes before the JPEG's end marker ignored"


def test_jpeg_bomb_is_refused_from_the_header():
    data = bytearray(jpeg_bytes(photo_like(16, 16)))
    sof = data.find(b"\xff\xc0")
    struct.pack_into(">HH", data, sof + 5, 60000, 60000)  # claims 3.6 gigapixels: 225 million decoded at 2/8
    with pytest.raises(ImageError, match="decompression bomb.*decoded at 15000x15000") as e:
        load_image(bytes(data), make_spec(8000, (0.5,) * 3, (0.25,) * 3))
    assert e.value.stage == "open"


@pytest.mark.parametrize("cmyk", [False, True])
def test_the_pixel_limit_applies_to_a_jpeg_as_dct_scaling_decodes_it(cmyk):
    # A 108 MP phone photo decodes at 1/8 for a small model: what is decoded takes the memory.
    img = Image.fromarray(photo_like(1200, 1600, seed=9))
    buf = io.BytesIO()
    (img.convert("CMYK") if cmyk else img).save(buf, "JPEG", quality=90)
    arr, _ = load_image(buf.getvalue(), SPEC32, max_pixels=1_000_000)  # 1.92 MP stored, 200x150 decoded
    assert arr.shape == (3, 32, 32)
    with pytest.raises(ImageError, match=r"decompression bomb refused: 1600x1200 pixels( \(decoded at 1400x1050\))? exceeds") as e:
        load_image(buf.getvalue(), make_spec(1000, (0.5,) * 3, (0.25,) * 3), max_pixels=1_000_000)
    assert e.value.stage == "open"


def test_png_over_the_pixel_limit_is_refused_before_decoding():
    buf = io.BytesIO()
    Image.new("L", (3000, 3000)).save(buf, "PNG")  # compresses to a few KB
    with pytest.raises(ImageError, match="decompression bomb") as e:
        load_image(buf.getvalue(), SPEC32, max_pixels=4_000_000)
    assert e.value.stage == "open"


def test_cmyk_jpeg_goes_through_pillow():
    buf = io.BytesIO()
    Image.fromarray(photo_like(40, 40, seed=5)).convert("CMYK").save(buf, "JPEG", quality=95)
    out, _ = load_image(buf.getvalue(), make_spec(40, (0.5,) * 3, (0.25,) * 3))
    ref = np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB")).transpose(2, 0, 1)
    assert np.array_equal(out, ref)


def test_a_jpeg_libjpeg_holds_whole_is_held_to_the_limit_at_its_stored_size():
    """A progressive JPEG's coefficients are all in memory at any output scale: a 3 KB file
    claiming 20000x20000 took over a gigabyte to fail."""
    buf = io.BytesIO()
    Image.fromarray(photo_like(64, 64, seed=11)).save(buf, "JPEG", progressive=True)
    data = bytearray(buf.getvalue())
    sof = data.find(b"\xff\xc2")
    struct.pack_into(">HH", data, sof + 5, 20000, 20000)
    with pytest.raises(ImageError, match=r"decompression bomb refused: 20000x20000 pixels exceeds") as e:
        load_image(bytes(data), make_spec(224, (0.5,) * 3, (0.25,) * 3))
    assert e.value.stage == "open"
    # a stray byte before its start of frame (libjpeg skips it) no longer hides what it is
    struct.pack_into(">HH", data, sof + 5, 12000, 12000)  # under twice Pillow's limit, which Pillow refuses itself
    stray = bytes(data[:sof]) + b"\0" + bytes(data[sof:])
    with pytest.raises(ImageError, match=r"decompression bomb refused: 12000x12000 pixels exceeds"):
        load_image(stray, make_spec(224, (0.5,) * 3, (0.25,) * 3))
    photo = Image.fromarray(photo_like(1200, 1600, seed=12))
    for (progressive, refused), mode in itertools.product(((False, False), (True, True)), ("RGB", "CMYK")):
        buf = io.BytesIO()
        photo.convert(mode).save(buf, "JPEG", quality=90, progressive=progressive)
        if refused:
            with pytest.raises(ImageError, match="decompression bomb refused: 1600x1200 pixels exceeds"):
                load_image(buf.getvalue(), SPEC32, max_pixels=1_000_000)
        else:
            assert load_image(buf.getvalue(), SPEC32, max_pixels=1_000_000)[0].shape == (3, 32, 32)


def test_a_jpeg_not_larger_than_the_input_is_held_to_the_limit_at_full_size():
    # its shorter side is under the input's: decoded whole, not at 1/8 (as the limit once took it)
    buf = io.BytesIO()
    Image.fromarray(photo_like(2000, 16, seed=13)).save(buf, "JPEG")
    with pytest.raises(ImageError, match="decompression bomb refused: 16x2000 pixels exceeds the limit of 20000"):
        load_image(buf.getvalue(), SPEC32, max_pixels=20_000)


def test_negative_32_bit_gray_is_black_not_wrapped_round():
    a = np.full((32, 32), 100, np.int32)
    a[:16] = -56  # as uint8 that would be 200
    buf = io.BytesIO()
    Image.fromarray(a, "I").save(buf, "TIFF")
    out, _ = load_image(buf.getvalue(), SPEC32)
    assert out[:, :16].max() == 0 and out[:, 16:].min() == 100


@pytest.mark.parametrize("tiff_type", [3, 4])  # SHORT, as Pillow writes it, and LONG, as some cameras do
def test_exif_orientation_of_any_integer_type_is_applied_as_pillow_applies_it(tiff_type):
    data = jpeg_bytes(quadrants(), quality=98, exif=exif_with_orientation(6))
    short = b"\x01\x12\x00\x03\x00\x00\x00\x01\x00\x06\x00\x00"  # Pillow's big-endian entry: tag, SHORT, 1, 6
    assert data.count(short) == 1
    if tiff_type == 4:
        data = data.replace(short, b"\x01\x12\x00\x04\x00\x00\x00\x01\x00\x00\x00\x06")
    assert ImageOps.exif_transpose(Image.open(io.BytesIO(data))).size == (60, 80)
    assert jpeg_orientation(data) == (6, None)
    arr, note = load_image(data, make_spec((80, 60), (0.5,) * 3, (0.25,) * 3))
    assert note is None and arr.shape == (3, 80, 60)
    assert arr[0, 5, 55] > 200 and arr[1, 5, 55] < 60  # red, stored top-left, is top-right when viewed


def test_whatever_pillow_raises_on_a_damaged_file_is_the_file_s_image_error():
    # A multi-page TIFF cut short: Pillow raises TypeError counting its frames (not OSError).
    img = Image.fromarray(photo_like(120, 160, seed=10))
    buf = io.BytesIO()
    img.save(buf, "TIFF", save_all=True, append_images=[img.rotate(a) for a in (90, 180, 270)])
    cut = buf.getvalue()[:len(buf.getvalue()) // 2]
    with pytest.raises(ImageError, match="cannot decode: Missing dimensions") as e:
        load_image(cut, SPEC32)
    assert e.value.stage == "decode"


def test_sixteen_bit_gray_is_scaled_not_clipped():
    a = np.full((32, 32), 40000, np.uint16)
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, "PNG")
    out, _ = load_image(buf.getvalue(), SPEC32)
    assert out.min() == out.max() == 40000 >> 8


def test_load_image_into_writes_what_load_image_returns(tmp_path):
    """The decoders' rows (pipeline.decode_into) are filled by load_image_into: the same pixels
    and note as load_image for every path a file can take."""
    gray = io.BytesIO()
    Image.fromarray(photo_like(50, 70, seed=2)).convert("L").save(gray, "PNG")
    cmyk = io.BytesIO()
    Image.fromarray(photo_like(40, 40, seed=5)).convert("CMYK").save(cmyk, "JPEG", quality=95)
    sources = {"jpeg, rotated": jpeg_bytes(quadrants(), exif=exif_with_orientation(6)),
               "jpeg, DCT-scaled": jpeg_bytes(photo_like(300, 200, seed=1)),
               "jpeg, model size": jpeg_bytes(photo_like(32, 32, seed=3)),
               "png, gray": gray.getvalue(), "jpeg, cmyk": cmyk.getvalue()}
    rows = np.full((len(sources), 3, 32, 32), 7, np.uint8)
    for row, (what, data) in zip(rows, sources.items()):
        path = tmp_path / what.replace(", ", "-")
        path.write_bytes(data)
        want, note = load_image(str(path), SPEC32)
        assert load_image_into(row, str(path), SPEC32) == note, what
        assert np.array_equal(row, want), what


def test_a_small_file_is_read_in_one_go_with_the_same_png_plan(tmp_path):
    """Up to READ_WHOLE_BYTES a file is read whole and a PNG's oversized metadata is dropped
    from the bytes in memory, as read_file drops it reading a larger file by the plan: the
    file's bytes less that chunk (IEND once: the plan once kept it twice)."""
    import zlib

    pixels = io.BytesIO()
    Image.fromarray(photo_like(20, 20, seed=4)).save(pixels, "PNG")
    png = pixels.getvalue()
    text = b"Comment\0\0" + zlib.compress(b"A" * (40 << 20), 9)  # 40 MiB of text, a few KB on disk
    chunk = struct.pack(">I", len(text)) + b"zTXt" + text + struct.pack(">I", zlib.crc32(b"zTXt" + text))
    path = tmp_path / "t.png"
    path.write_bytes(png[:33] + chunk + png[33:])  # after IHDR (8 + 25 bytes)
    assert path.stat().st_size <= READ_WHOLE_BYTES
    data, note = read_file(str(path))
    assert data == png and note.startswith("PNG metadata chunk over") and "zTXt" in note


def test_empty_and_not_an_image():
    with pytest.raises(ImageError, match="empty") as e:
        load_image(b"", SPEC32)
    assert e.value.stage == "open"
    with pytest.raises(ImageError, match="not an image"):
        load_image(b"hello, I am text\n", SPEC32)


def test_heic_without_a_decoder_is_skipped_with_a_hint():
    data = struct.pack(">I", 24) + b"ftypheic" + b"\0\0\0\0mif1heic" + b"\0" * 64
    with pytest.raises(ImageError, match="HEIC"):
        load_image(data, SPEC32)


def test_fifo_is_never_opened_for_reading(tmp_path):
    import os
    fifo = tmp_path / "pipe.jpg"
    os.mkfifo(fifo)
    with pytest.raises(ImageError, match="not a regular file"):
        load_image(fifo, SPEC32)  # would block forever if it were read


def test_spec_validation_names_the_valid_choices():
    bad = dict(SPEC32, interpolation="lanczos")
    with pytest.raises(SpecError, match="bilinear"):
        validate_spec(bad)
    with pytest.raises(SpecError, match="lacks"):
        validate_spec({"size": [32, 32]})


@pytest.mark.parametrize("key,value", [("std", [float("inf")] * 3), ("std", [float("nan")] * 3),
                                       ("mean", [0.5, float("nan"), 0.5]), ("mean", [True, 0.5, 0.5]),
                                       ("size", [True, True]), ("mean", [10 ** 400, 0.5, 0.5])])
def test_a_spec_of_non_finite_or_boolean_numbers_is_refused(key, value):
    """std = inf passed (every image the same input: one label for all, and the parity gate
    agreeing); NaN passed too, and info --json then printed Infinity, which JSON readers refuse."""
    with pytest.raises(SpecError, match=f"preprocess {key} must be"):
        validate_spec(dict(SPEC32, **{key: value}))


def test_crop_box_stays_inside_the_image_for_every_size():
    # Pillow refuses a box that pokes outside the image by even an ulp; w / (w / 32) can.
    for w in range(1, 700):
        for h in (1, 31, 32, 33, 146, 259, 341, 511, w, 2 * w + 1):
            for out_h, out_w in ((32, 32), (224, 224), (40, 30)):
                left, top, right, bottom = _crop_box(w, h, out_h, out_w)
                assert 0 <= left <= right <= w and 0 <= top <= bottom <= h, (w, h, out_h, out_w)
    arr = photo_like(341, 511, seed=6)
    for size in ((32, 32), (224, 224)):
        out, _ = load_image(jpeg_bytes(arr), make_spec(size, (0.5,) * 3, (0.25,) * 3))
        assert out.shape == (3, *size)


def _xmp(orientation: int, attribute: bool = True) -> bytes:
    """An XMP packet with tiff:Orientation, as an attribute or as an element (both are written)."""
    tag = (f'tiff:Orientation="{orientation}"/>' if attribute
           else f"><tiff:Orientation>{orientation}</tiff:Orientation></rdf:Description>")
    return ('<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
            f'<rdf:Description xmlns:tiff="http://ns.adobe.com/tiff/1.0/" {tag}</rdf:RDF></x:xmpmeta>').encode()


@pytest.mark.parametrize("attribute", [True, False])
@pytest.mark.parametrize("mode", ["RGB", "CMYK"])  # the libjpeg-turbo route and Pillow's
def test_a_jpeg_s_xmp_orientation_is_applied_as_pillow_applies_it_to_every_format(mode, attribute):
    # A photo whose only orientation is XMP's tiff:Orientation (an editor's export): one rule
    # for both JPEG routes and the Pillow formats, Pillow's (EXIF first, else XMP).
    img = Image.fromarray(quadrants()).convert(mode)
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=98, xmp=_xmp(6, attribute))
    data = buf.getvalue()
    assert b"Exif\0\0" not in data
    assert ImageOps.exif_transpose(Image.open(io.BytesIO(data))).size == (60, 80)  # Pillow rotates it
    arr, note = load_image(data, make_spec((80, 60), (0.5,) * 3, (0.25,) * 3))
    assert note is None and arr.shape == (3, 80, 60)
    assert arr[0, 5, 55] > 200 and arr[1, 5, 55] < 60  # red, stored top-left, is top-right when viewed
    if mode == "RGB":
        assert jpeg_orientation(data) == (6, None)
    # EXIF's tag, where there is one, wins over XMP's (as in Pillow)
    buf = io.BytesIO()
    Image.fromarray(quadrants()).save(buf, "JPEG", quality=98, xmp=_xmp(6, attribute), exif=exif_with_orientation(3))
    assert ImageOps.exif_transpose(Image.open(io.BytesIO(buf.getvalue()))).size == (80, 60)
    assert jpeg_orientation(buf.getvalue()) == (3, None)


@pytest.mark.parametrize("mode", ["RGB", "L", "I;16"])
def test_a_png_colour_key_is_composited_over_white_as_an_alpha_channel_is(mode):
    # tRNS in an RGB or gray PNG marks one colour transparent: the same picture saved with an
    # alpha channel is fed to the model over white, so this one must be too.
    a = np.zeros((40, 40, 3), np.uint8)
    a[10:30, 10:30] = (200, 30, 30)
    if mode == "RGB":
        img, key = Image.fromarray(a), (0, 0, 0)
    elif mode == "L":
        img, key = Image.fromarray(a[..., 0]), 0
    else:
        img, key = Image.fromarray(a[..., 0].astype(np.uint16) * 257), 0
    buf = io.BytesIO()
    img.save(buf, "PNG", transparency=key)
    assert Image.open(io.BytesIO(buf.getvalue())).mode == mode
    arr, _ = load_image(buf.getvalue(), make_spec(40, (0.5,) * 3, (0.25,) * 3))
    assert arr[:, 0, 0].tolist() == [255, 255, 255]  # the transparent ground
    assert arr[0, 20, 20] == 200  # the square keeps its colour (scaled down from 16 bits alike)


@pytest.mark.parametrize("exif_body,expected", [
    (b"", (6, None)),  # an empty block: no EXIF to Pillow, so XMP's orientation
    (b"II*\0\x08\0\0\0\x01\0\x12\x01", (6, "malformed EXIF ignored")),  # cut short in its entry: XMP's too
    (b"XX*\0garbage", (1, "malformed EXIF ignored")),  # not TIFF: Pillow applies none
])
def test_a_damaged_exif_block_beside_an_xmp_orientation_is_read_as_pillow_reads_it(exif_body, expected):
    good = jpeg_bytes(quadrants(), quality=95, xmp=_xmp(6))
    segment = b"Exif\0\0" + exif_body
    data = good[:2] + b"\xff\xe1" + struct.pack(">H", len(segment) + 2) + segment + good[2:]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Pillow's "Corrupt EXIF data"
        viewed = ImageOps.exif_transpose(Image.open(io.BytesIO(data))).size
    assert viewed == ((60, 80) if expected[0] == 6 else (80, 60))
    assert jpeg_orientation(data) == expected
