"""GPU JPEG decoding (cnnx.runtime.gpudecode, issue 8), tested where it can be: the header
routing on real JPEG variants; the resize graph against Pillow on onnxruntime's CPU provider;
the whole decoder on nvImageCodec's CPU backend against the CPU decoder (same rows, errors and
notes; close pixels; top-1 through a real model); `--decoder gpu` without a GPU (one line,
exit 1). The CUDA test skips without a usable GPU decoder and says why."""

from __future__ import annotations

import csv
import importlib.util
import io
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from cnnx.cli import cli
from cnnx.runtime import gpudecode
from cnnx.runtime.gpudecode import jpeg_route
from cnnx.runtime.pipeline import decode_images
from cnnx.runtime.preprocess import _crop_box, make_spec
from tests._runtime_util import make_onnx_model, photo_like

HAVE_NVIMGCODEC = importlib.util.find_spec("nvidia") is not None and \
    importlib.util.find_spec("nvidia.nvimgcodec") is not None
needs_nvimgcodec = pytest.mark.skipif(not HAVE_NVIMGCODEC, reason="nvImageCodec not installed "
                                      "(pip install nvidia-nvimgcodec-cu13 nvidia-nvjpeg)")
SPEC = make_spec(64, (0.5,) * 3, (0.25,) * 3)
BIG = 1 << 40


def jpeg(pixels, **kw) -> bytes:
    """JPEG bytes of an (H, W[, 3]) array or a Pillow image (e.g. CMYK)."""
    buf = io.BytesIO()
    img = pixels if isinstance(pixels, Image.Image) else Image.fromarray(pixels)
    img.save(buf, "JPEG", quality=90, **kw)
    return buf.getvalue()


def rotated_exif(value: int) -> bytes:
    ex = Image.Exif()
    ex[0x0112] = value
    return ex.tobytes()


def sof_offset(data: bytes) -> int:
    return data.index(b"\xff\xc0")


def patched(data: bytes, offset: int, new: bytes) -> bytes:
    return data[:offset] + new + data[offset + len(new):]


# --- routing ---------------------------------------------------------------------------------------

def test_baseline_and_gray_jpegs_go_to_the_gpu_the_rest_to_the_cpu_decoder():
    rgb = photo_like(48, 64)
    base = jpeg(rgb)
    sof = sof_offset(base)
    cases = {
        "baseline": (base, None),
        "gray": (jpeg(rgb[..., 0]), None),
        "4:4:4": (jpeg(rgb, subsampling=0), None),
        "exif orientation 1": (jpeg(rgb, exif=rotated_exif(1)), None),
        "progressive": (jpeg(rgb, progressive=True), gpudecode.PROGRESSIVE),
        "cmyk": (jpeg(Image.fromarray(rgb).convert("CMYK")), gpudecode.COLOR),
        "rotated": (jpeg(rgb, exif=rotated_exif(6)), gpudecode.ROTATED),
        "12-bit": (patched(base, sof + 4, b"\x0c"), gpudecode.NOT_8_BIT),
        "arithmetic": (patched(base, sof, b"\xff\xc9"), gpudecode.ARITHMETIC),
        "lossless": (patched(base, sof, b"\xff\xc3"), gpudecode.LOSSLESS),
        "first id R": (patched(base, sof + 10, b"R"), None),  # libjpeg wants all three ids R, G, B
        "png": (_png(rgb), gpudecode.NOT_JPEG),
        "header only": (base[:sof], gpudecode.NO_HEADER),
        "truncated": (base[:len(base) * 2 // 3], gpudecode.NO_END),
        "padded after EOI": (base + b"\0" * 100, None),
        "junk after SOI": (b"\xff\xd8\xff" + b"junk" * 20, gpudecode.NO_HEADER),
    }
    ids = base[sof + 10], base[sof + 13], base[sof + 16]
    assert ids == (1, 2, 3)  # Pillow's YCbCr component ids, so the patch below is what makes RGB
    rgb_coded = patched(patched(patched(base, sof + 10, b"R"), sof + 13, b"G"), sof + 16, b"B")
    cases["rgb-coded"] = (rgb_coded, gpudecode.COLOR)
    # libjpeg reads every marker up to the first scan: an Adobe segment saying RGB (transform 0)
    # after the frame header makes an RGB-coded file too.
    adobe_rgb = b"\xff\xee\x00\x0eAdobe\x00\x64\x00\x00\x00\x00\x00"
    sof_end = sof + 2 + int.from_bytes(base[sof + 2:sof + 4], "big")
    cases["adobe rgb after the frame"] = (base[:sof_end] + adobe_rgb + base[sof_end:], gpudecode.COLOR)
    # Cut inside the scan, with the end-of-image marker's bytes in the header (a table, a
    # thumbnail, a comment): it is looked for after the scan starts only.
    comment = b"\xff\xfe\x00\x04\xff\xd9"
    sos = base.index(b"\xff\xda")
    cases["truncated, ff d9 in the header"] = (base[:2] + comment + base[2:sos + 40], gpudecode.NO_END)
    got = {name: jpeg_route(data, BIG) for name, (data, _want) in cases.items()}
    assert got == {name: want for name, (_data, want) in cases.items()}
    assert jpeg_route(base, 48 * 64) is None and jpeg_route(base, 48 * 64 - 1) == gpudecode.TOO_LARGE


def bad_huffman_table(data: bytes) -> bytes:
    """The JPEG with its first Huffman table's code counts overwritten (libjpeg: bogus table)."""
    i = data.index(b"\xff\xc4")
    return data[:i + 5] + b"\xff" * 16 + data[i + 21:]


def _png(arr) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG")
    return buf.getvalue()


# --- the resize graph on the CPU provider ----------------------------------------------------------

@pytest.fixture(scope="module")
def resize_session():
    import onnxruntime as ort

    return ort.InferenceSession(gpudecode.resize_model_bytes(), providers=["CPUExecutionProvider"])


def run_resize(session, arr, out_h, out_w, pad: int = 0):
    h, w = arr.shape[:2]
    rows = np.zeros((h, 3 * w + pad), np.uint8)  # a device row pitch may be wider than 3W
    rows[:, :3 * w] = arr.reshape(h, 3 * w)
    return session.run(None, {"pixels": rows, **gpudecode.crop_feeds(h, w, out_h, out_w)})[0][0]


@pytest.mark.parametrize("h,w,out", [(600, 800, (64, 64)), (803, 450, (64, 64)), (501, 707, (48, 80)),
                                     (40, 30, (64, 64))])
def test_the_resize_graph_is_pillows_antialiased_resize_of_the_crop_it_is_given(resize_session, h, w, out):
    """The graph (slice, edge repeated past the image, Resize with antialias) against Pillow's
    bilinear antialiased resize (load_image's) of the same crop of the same pixels: within 4
    levels, 0.05 on average."""
    arr = photo_like(h, w, seed=h)
    mine = run_resize(resize_session, arr, *out)
    f = gpudecode.crop_feeds(h, w, *out)
    (top, left3), (bottom, right3) = f["starts"], f["ends"]
    padded = np.pad(arr, ((0, f["pad_bottom"][0]), (0, f["pad_right"][1]), (0, 0)), mode="edge")
    crop = padded[top:bottom + f["pad_bottom"][0], left3 // 3:right3 // 3 + f["pad_right"][1]]
    pil = np.asarray(Image.fromarray(crop).resize(out[::-1], Image.Resampling.BILINEAR)).transpose(2, 0, 1)
    diff = np.abs(mine.astype(int) - pil)
    assert mine.shape == (3, *out) and mine.dtype == np.uint8
    assert diff.max() <= 4 and diff.mean() < 0.05, (diff.max(), diff.mean())


@pytest.mark.parametrize("h,w,out", [(600, 800, (64, 64)), (803, 450, (64, 64)), (501, 707, (48, 80)),
                                     (1001, 1333, (224, 224)), (65, 64, (64, 64)), (40, 30, (64, 64))])
def test_crop_feeds_take_the_crop_where_load_image_does_from_its_dct_scaled_decode(h, w, out):
    """dct_scale is the size simplejpeg really decodes at for load_image, and the crop maps
    load_image's box on that image to full-size pixels (the last block standing for 8/k)."""
    import math

    import simplejpeg

    data = jpeg(photo_like(h, w))
    scale = max(out[0] / h, out[1] / w)
    need = (math.ceil(h * scale - 1e-6), math.ceil(w * scale - 1e-6)) if scale < 1 else (0, 0)
    decoded = simplejpeg.decode_jpeg(data, colorspace="RGB", min_height=need[0], min_width=need[1])
    k, d = gpudecode.dct_scale(h, w, *out)
    assert decoded.shape[:2] == (-(-h * k // d), -(-w * k // d))
    f = gpudecode.crop_feeds(h, w, *out)
    left, top, right, bottom = _crop_box(decoded.shape[1], decoded.shape[0], *out)
    full_box = (f["starts"][1] // 3, f["starts"][0], f["ends"][1] // 3 + f["pad_right"][1],
                f["ends"][0] + f["pad_bottom"][0])
    assert np.allclose(full_box, [v * d / k for v in (left, top, right, bottom)], atol=0.5)
    assert f["pad_right"][1] < d / k and f["pad_bottom"][0] < d / k


@pytest.mark.parametrize("h,w,out", [(1200, 1600, (64, 64)), (701, 333, (48, 80)), (900, 900, (224, 224))])
def test_the_pooled_graph_shrinks_whole_blocks_close_to_load_image(h, w, out):
    """pool_factor's box filter before the Resize (how the GPU path shrinks large photos): the
    crop grows by less than a block to whole blocks, and the pixels stay as close to
    load_image's as the plain graph's (the DCT-scaled decode is near a box filter itself)."""
    import onnxruntime as ort

    from cnnx.runtime.preprocess import load_image

    pool = gpudecode.pool_factor(h, w, *out)
    k, d = gpudecode.dct_scale(h, w, *out)
    assert pool > 1 and pool * k <= d < 2 * pool * k
    plain, pooled = gpudecode.crop_feeds(h, w, *out), gpudecode.crop_feeds(h, w, *out, pool=pool)
    size = [(e - b) // (3 if i else 1) + pad for i, (b, e, pad) in
            enumerate(zip(pooled["starts"], pooled["ends"], (pooled["pad_bottom"][0], pooled["pad_right"][1])))]
    assert size[0] % pool == 0 and size[1] % pool == 0
    assert np.array_equal(pooled["starts"], plain["starts"])
    arr = photo_like(h, w, seed=w)
    ref = load_image(jpeg(arr), make_spec(out, (0.5,) * 3, (0.25,) * 3))[0].astype(int)
    got = {}
    for p in (1, pool):
        session = ort.InferenceSession(gpudecode.resize_model_bytes(p), providers=["CPUExecutionProvider"])
        got[p] = session.run(None, {"pixels": np.ascontiguousarray(arr.reshape(h, -1)),
                                    **gpudecode.crop_feeds(h, w, *out, pool=p)})[0][0]
        assert got[p].shape == (3, *out) and got[p].dtype == np.uint8
    plain_diff, pooled_diff = (np.abs(got[p] - ref).mean() for p in (1, pool))
    assert pooled_diff < 2.5 and pooled_diff < plain_diff + 1.0, (pooled_diff, plain_diff)


@pytest.mark.parametrize("h,w,out", [(3024, 4032, (224, 224)), (1080, 1920, (224, 224)), (600, 800, (64, 64))])
def test_the_graph_without_edge_padding_gives_the_padded_graphs_pixels_where_the_crop_needs_none(h, w, out):
    """Camera sizes (multiples of 8) need no edge repeated: the plain graph (no Expand, no Concat,
    no pad inputs) gives exactly the padded graph's pixels, at each box-filter factor."""
    import onnxruntime as ort

    arr = photo_like(h, w, seed=h + w)
    rows = np.ascontiguousarray(arr.reshape(h, -1))
    for pool in sorted({1, gpudecode.pool_factor(h, w, *out)}):
        feeds = gpudecode.crop_feeds(h, w, *out, pool=pool)
        assert feeds["pad_right"][1] == 0 and feeds["pad_bottom"][0] == 0
        padded, plain = (ort.InferenceSession(gpudecode.resize_model_bytes(pool, p), providers=["CPUExecutionProvider"])
                         for p in (True, False))
        want = padded.run(None, {"pixels": rows, **feeds})[0]
        assert {i.name for i in plain.get_inputs()} == set(feeds) - {"pad_right", "pad_bottom"} | {"pixels"}
        got = plain.run(None, {"pixels": rows, **{k: v for k, v in feeds.items() if not k.startswith("pad_")}})[0]
        assert np.array_equal(got, want)


def test_the_resize_graph_passes_an_image_of_the_model_size_unchanged_and_ignores_row_padding(resize_session):
    arr = photo_like(64, 64, seed=3)
    assert np.array_equal(run_resize(resize_session, arr, 64, 64), arr.transpose(2, 0, 1))
    big = photo_like(300, 400, seed=4)
    assert np.array_equal(run_resize(resize_session, big, 64, 64, pad=0),
                          run_resize(resize_session, big, 64, 64, pad=64))


# --- the whole decoder on nvImageCodec's CPU backend -----------------------------------------------

@pytest.fixture(scope="module")
def mixed_folder(tmp_path_factory) -> Path:
    """Real files of every kind the router sends somewhere: baseline photos (GPU), progressive,
    CMYK, EXIF-rotated, PNG, truncated (CPU), a JPEG with a bogus Huffman table that passes the
    router (the decoder refuses it: CPU error row), junk, an empty file."""
    d = tmp_path_factory.mktemp("mixed")
    for i, (h, w) in enumerate([(480, 640), (640, 360), (300, 300), (700, 500), (50, 40)]):
        (d / f"a_photo{i}.jpg").write_bytes(jpeg(photo_like(h, w, seed=i)))
    rgb = photo_like(400, 520, seed=9)
    (d / "b_progressive.jpg").write_bytes(jpeg(rgb, progressive=True))
    (d / "c_cmyk.jpg").write_bytes(jpeg(Image.fromarray(rgb).convert("CMYK")))
    (d / "d_rotated.jpg").write_bytes(jpeg(rgb, exif=rotated_exif(8)))
    (d / "e_image.png").write_bytes(_png(rgb[:100, :120]))
    full = jpeg(rgb)
    (d / "f_truncated.jpg").write_bytes(full[:len(full) // 3])
    (d / "f_bad_huffman_table.jpg").write_bytes(bad_huffman_table(full))
    (d / "g_junk.jpg").write_bytes(b"\xff\xd8\xff" + b"junk" * 40)
    (d / "h_empty.jpg").write_bytes(b"")
    return d


@pytest.fixture(scope="module")
def cpu_backend_decoder():
    dec = gpudecode.GpuDecoder(device="cpu", workers=2)
    yield dec
    dec.close()


@needs_nvimgcodec
@pytest.mark.parametrize("device_bytes", [gpudecode.DEVICE_BYTES, 1])
def test_the_decoder_gives_the_cpu_decoders_rows_errors_and_notes(mixed_folder, cpu_backend_decoder, device_bytes,
                                                                   monkeypatch):
    """device_bytes 1: one nvImageCodec call a file, each group resized while the next decodes."""
    monkeypatch.setattr(gpudecode, "DEVICE_BYTES", device_bytes)
    paths = sorted(str(p) for p in mixed_folder.iterdir()) + [str(mixed_folder / "missing.jpg")]
    mine = cpu_backend_decoder.decode_images(paths, SPEC, BIG)
    ref = decode_images(paths, SPEC, BIG)
    assert mine[1] == ref[1]  # the same files decoded, in order
    assert mine[2] == ref[2] and len(ref[2]) == 5  # 2 truncated, junk, empty, missing: the CPU decoder's rows
    assert mine[3] == ref[3]
    on_gpu = [i for i, p in enumerate(ref[1]) if "a_photo" in p]
    on_cpu = [i for i, p in enumerate(ref[1]) if "a_photo" not in p]
    assert cpu_backend_decoder.on_gpu >= len(on_gpu) == 5
    assert np.array_equal(mine[0][on_cpu], ref[0][on_cpu])  # routed files: load_image's own pixels
    diff = np.abs(mine[0][on_gpu].astype(int) - ref[0][on_gpu])
    # load_image decodes DCT-scaled before its resize; the GPU path resizes from full size.
    assert diff.mean() < 1.0 and diff.max() <= 12, (diff.mean(), diff.max())
    assert cpu_backend_decoder.to_cpu[gpudecode.NO_END] >= 1  # the truncated file
    assert cpu_backend_decoder.to_cpu[gpudecode.REFUSED] >= 1  # the bad table: refused, then load_image


@needs_nvimgcodec
def test_resize_sessions_spread_the_threads_over_that_many_sessions_with_the_same_pixels(mixed_folder,
                                                                                       cpu_backend_decoder):
    """resize_sessions 2: each thread takes the next of two sessions of a box-filter factor, and
    keeps it; the pixels are those of the one shared session."""
    paths = sorted(str(p) for p in mixed_folder.iterdir())
    one = cpu_backend_decoder.decode_images(paths, SPEC, BIG)
    dec = gpudecode.GpuDecoder(device="cpu", workers=3, resize_sessions=2)
    seen, both_there = [], threading.Barrier(2)

    def ask():
        both_there.wait()  # two live threads: two slots
        seen.append((dec.session(1), dec.session(1)))

    try:
        two = dec.decode_images(paths, SPEC, BIG)
        threads = [threading.Thread(target=ask) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        dec.close()
    assert two[1] == one[1] and two[2] == one[2] and np.array_equal(two[0], one[0])
    assert all(first is again for first, again in seen)  # a thread keeps its session
    assert seen[0][0] is not seen[1][0]


@needs_nvimgcodec
def test_the_decoder_resizes_a_camera_size_image_with_the_plain_graph_and_an_odd_size_with_the_padded(
        cpu_backend_decoder):
    dec = cpu_backend_decoder
    camera, odd = photo_like(1080, 1920, seed=5), photo_like(1081, 1923, seed=6)
    for arr in (camera, odd):
        assert dec._resize(arr, 224, 224).shape == (3, 224, 224)
    pool = gpudecode.pool_factor(1080, 1920, 224, 224)
    assert (pool, False) in dec._sessions and (gpudecode.pool_factor(1081, 1923, 224, 224), True) in dec._sessions


@needs_nvimgcodec
def test_share_threads_take_files_from_the_other_end_with_load_images_pixels(mixed_folder, monkeypatch):
    """--decoder auto's sharing: CPU threads decode files the GPU could take, from the end of the
    batch, until the two sides meet. The rows, errors and notes are the CPU decoder's; a shared
    file's pixels are load_image's own. Both sides are slowed (the GPU one file a call, 0.3 s each;
    the CPU 0.2 s a file) so that both surely take some, even on a loaded machine."""
    import cnnx.runtime.pipeline as pipeline

    paths = sorted(str(p) for p in mixed_folder.iterdir())
    eligible = [p for p in paths if jpeg_route(Path(p).read_bytes(), BIG) is None]
    ref = decode_images(paths, SPEC, BIG)
    monkeypatch.setattr(gpudecode, "DEVICE_BYTES", 1)
    dec = gpudecode.GpuDecoder(device="cpu", workers=2, share_threads=2)

    def slowly(fn, seconds):
        def slow(*args):
            time.sleep(seconds)
            return fn(*args)
        return slow

    monkeypatch.setattr(dec, "_decode_on_gpu", slowly(dec._decode_on_gpu, 0.3))
    monkeypatch.setattr(pipeline, "decode_images", slowly(pipeline.decode_images, 0.2))
    try:
        mine = dec.decode_images(paths, SPEC, BIG)
    finally:
        dec.close()
    assert mine[1] == ref[1] and mine[2] == ref[2] and mine[3] == ref[3]
    shared = dec.to_cpu.get(gpudecode.SHARED, 0)
    refused = dec.to_cpu.get(gpudecode.REFUSED, 0)
    assert shared >= 1 and dec.on_gpu >= 1, dec.to_cpu
    assert dec.on_gpu + shared + refused == len(eligible) == 6
    # the GPU took from the front: its files are the first ones; the rest are load_image's pixels exactly
    decoded = {p: i for i, p in enumerate(mine[1])}
    tail = [p for p in eligible[dec.on_gpu + refused:] if p in decoded]
    assert tail and all(np.array_equal(mine[0][decoded[p]], ref[0][decoded[p]]) for p in tail)
    assert f"({shared:,} of them shared)" in dec.summary()


@needs_nvimgcodec
def test_a_file_damaged_inside_its_scan_is_the_gpu_decoders_to_judge(cpu_backend_decoder, tmp_path):
    """Known difference, documented: scan data cut short but with the end marker in place passes
    the router; nvImageCodec decodes it leniently (libjpeg's non-strict mode) where load_image,
    strict, reports it corrupt. Only files the GPU decoder refuses fall back."""
    full = jpeg(photo_like(300, 400, seed=5))
    path = tmp_path / "damaged.jpg"
    path.write_bytes(full[:len(full) // 2] + b"\xff\xd9")
    assert jpeg_route(path.read_bytes(), BIG) is None
    assert decode_images([str(path)], SPEC, BIG)[2][0][1] == "decode"
    assert cpu_backend_decoder.decode_images([str(path)], SPEC, BIG)[1] == [str(path)]


@pytest.fixture(scope="module")
def photo_model(tmp_path_factory) -> Path:
    return make_onnx_model(tmp_path_factory.mktemp("gpudecode-model") / "model.onnx", arch="airnet", size=64)


@needs_nvimgcodec
def test_classify_through_the_decoder_gives_the_same_rows_and_top1(photo_model, mixed_folder, tmp_path):
    from cnnx.runtime import Classifier, Prediction, Skipped

    photos = tmp_path / "photos"
    photos.mkdir()
    for i in range(24):
        h, w = [(480, 640), (640, 480), (500, 500), (360, 640)][i % 4]
        (photos / f"p{i:02d}.jpg").write_bytes(jpeg(photo_like(h, w, seed=100 + i)))
    inputs = [str(photos), str(mixed_folder)]
    with Classifier(photo_model, "cpu", batch_size=8) as clf:
        ref = list(clf.classify(inputs))
    with Classifier(photo_model, "cpu", batch_size=8, decoder=gpudecode.GpuDecoder(device="cpu", workers=2)) as clf:
        assert clf.decoder == "gpu"
        mine = list(clf.classify(inputs))
    assert [(type(r), r.path) for r in mine] == [(type(r), r.path) for r in ref]
    assert [r for r in mine if isinstance(r, Skipped)] == [r for r in ref if isinstance(r, Skipped)]
    top1 = [(a.indices[0], b.indices[0]) for a, b in zip(mine, ref) if isinstance(a, Prediction)]
    agree = sum(a == b for a, b in top1) / len(top1)
    print(f"top-1 agreement nvImageCodec-CPU + ONNX resize vs load_image: {agree:.3f} on {len(top1)} images")
    assert len(top1) == 24 + 9 and agree >= 0.9


# --- --decoder on the command line -----------------------------------------------------------------

def test_decoder_gpu_that_cannot_run_is_one_line_and_exit_1(photo_model, mixed_folder):
    status = gpudecode.diagnose()
    if status.usable:
        pytest.skip(f"GPU decoding runs here ({status.reason})")
    r = CliRunner().invoke(cli, ["classify", str(mixed_folder), "--model", str(photo_model), "--decoder", "gpu"])
    assert r.exit_code == 1
    lines = r.output.strip().splitlines()
    assert lines == [f"Error: --decoder gpu: {status.reason}"]
    assert "Traceback" not in r.output


def test_decoder_auto_without_a_gpu_decoder_classifies_on_the_cpu(photo_model, mixed_folder):
    if gpudecode.diagnose().usable:
        pytest.skip("GPU decoding runs here: auto picks it")
    r = CliRunner().invoke(cli, ["classify", str(mixed_folder), "--model", str(photo_model), "--decoder", "auto"])
    assert r.exit_code == 0, r.output
    rows = list(csv.DictReader(io.StringIO(r.stdout)))
    assert len(rows) == 9  # 5 photos, progressive, CMYK, rotated, PNG
    assert "decoder nvImageCodec" not in r.stderr


def test_decoder_gpu_with_the_ray_engine_is_a_usage_error(photo_model, mixed_folder):
    r = CliRunner().invoke(cli, ["classify", str(mixed_folder), "--model", str(photo_model), "--decoder", "gpu",
                                 "--engine", "ray"])
    assert r.exit_code == 2 and "--decoder gpu: only with --engine local" in r.output


# --- on a GPU ----------------------------------------------------------------------------------------

def test_gpu_decoding_on_cuda_gives_the_cpu_decoders_rows_and_close_pixels(mixed_folder, photo_model, tmp_path):
    status = gpudecode.diagnose()
    if not status.usable:
        pytest.skip(f"no GPU decoding here: {status.reason}")
    paths = sorted(str(p) for p in mixed_folder.iterdir())
    dec = gpudecode.GpuDecoder(device="cuda", workers=2)
    try:
        mine = dec.decode_images(paths, SPEC, BIG)
    finally:
        dec.close()
    ref = decode_images(paths, SPEC, BIG)
    assert (mine[1], mine[2], mine[3]) == (ref[1], ref[2], ref[3])
    assert dec.on_gpu >= 5
    diff = np.abs(mine[0].astype(int) - ref[0])
    assert diff.mean() < 2.5, diff.mean()
    r = CliRunner().invoke(cli, ["classify", str(mixed_folder), "--model", str(photo_model), "--decoder", "gpu",
                                 "-o", str(tmp_path / "out.csv")])
    assert r.exit_code == 0 and "decoder nvImageCodec: " in r.output, r.output


def test_decoder_auto_keeps_the_cpu_decoder_for_small_inputs(monkeypatch):
    """auto takes the GPU decoder only where it runs and the model's input is over
    PROCESS_DECODE_MAX_SIDE px: a 32 px model keeps the CPU decoder without trying it."""
    from cnnx.runtime.workers import PROCESS_DECODE_MAX_SIDE

    made = []
    monkeypatch.setattr(gpudecode, "diagnose", lambda device_id=0: gpudecode.GpuDecodeStatus(True, "stand-in"))
    monkeypatch.setattr(gpudecode, "GpuDecoder", lambda **kw: made.append(kw) or "a GPU decoder")
    small, large = (PROCESS_DECODE_MAX_SIDE,) * 2, (PROCESS_DECODE_MAX_SIDE + 1, 32)
    assert gpudecode.open_decoder("auto", workers=2, size=small) is None
    assert made == []
    assert gpudecode.open_decoder("auto", workers=2, size=large) == "a GPU decoder"
    assert gpudecode.open_decoder("gpu", workers=2, size=small) == "a GPU decoder"  # asked for: given
    # auto shares each batch with as many CPU threads as workers; gpu, asked for, leaves the CPU be
    assert [kw["share_threads"] for kw in made] == [2, 0]
