"""JPEG decoding on the GPU (nvImageCodec) with the resize on the GPU (a small ONNX graph on
onnxruntime's CUDA provider); `preprocess.load_image` on the CPU stays the reference and the
fallback for every file the GPU path does not take.

Optional: `pip install 'cnnx[gpu-decode]'` (nvidia-nvimgcodec-cu13, the nvJPEG library
nvidia-nvjpeg, and onnx, which builds the resize graph). Nothing here imports torch;
nvImageCodec, onnx and onnxruntime are imported inside functions.

Per batch of files (`decode_images`, the same contract as pipeline.decode_images):
  1. read and route each file (CPU threads): `jpeg_route` reads the JPEG header only. A
     baseline or extended-sequential 8-bit Huffman JPEG, gray or YCbCr, without an orientation
     tag (EXIF's or XMP's), within max_pixels, ending in its EOI marker, goes to the GPU; everything else
     (progressive, CMYK/YCCK, 12-bit, arithmetic, RGB-coded, rotated, truncated, not a JPEG,
     unreadable) to `load_image`, so its pixels, notes and errors rows are exactly the CPU path's.
  2. the GPU files in one nvImageCodec batch call per DEVICE_BYTES of decoded pixels; a file it
     returns None for (corrupt, unsupported) goes to `load_image` as well. With share_threads
     (--decoder auto), CPU threads take files from the other end of the batch meanwhile and
     decode them with `load_image`, until the two ends meet.
  3. each decoded image through the resize graph, one run of it per image in the CPU threads
     while the next group decodes: load_image's centre crop of the shorter-side resize, with
     the geometry of its DCT-scaled decode (`crop_feeds`), a box filter standing for that DCT
     scaling (`pool_factor`), then onnxruntime's Resize (linear, antialias: Pillow's filter)
     to the model's H x W, uint8 NCHW out; the edge is repeated past the image only where the
     crop needs it (a second graph, without those copies, takes the rest). The box filter is
     also what makes the GPU path right: onnxruntime's CUDA Resize with antialias gives wrong
     pixels when it shrinks several-fold, and the same as its CPU provider after the box filter
     (measured on an H100, onnxruntime 1.31.1: benchmarks/results/gpu_classify.json,
     "gpu_decode_diagnose").
A file damaged inside its scan data but ending in its EOI marker passes the router: the GPU
decoder decodes what it can (as libjpeg's lenient mode does) where load_image, strict, reports
it corrupt; only files the GPU decoder refuses fall back.
The pixels differ a little from load_image's (libjpeg-turbo's DCT-scaled decode is close to a
box filter, not equal to one): top-1 agreement through the model is the measure
(benchmarks/gpu_classify.py). With share_threads, which side takes a file depends on timing,
and with it these two differences: a run is then not repeatable to the pixel.

`device="cpu"` runs the same code path on nvImageCodec's libjpeg-turbo backend and onnxruntime's
CPU provider: that is how it is tested without a GPU.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import struct
import sys
import threading
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from cnnx.runtime.files import first_line, quiet_stderr
from cnnx.runtime.preprocess import ImageError, dct_scale, jpeg_orientation, read_file
from cnnx.runtime.workers import PROCESS_DECODE_MAX_SIDE

DECODERS = ("cpu", "gpu", "auto")  # --decoder
INSTALL_HINT = "pip install 'cnnx[gpu-decode]'"
DEVICE_BYTES = 1 << 29  # decoded pixels on the device per nvImageCodec call (12 MP RGB is 36 MB)
# Batches decoded at once: one reads its files, or resizes, while the other's nvImageCodec call
# runs (one call at a time). Each holds at most two calls' pixels on the device, so together
# they hold at most 4 x DEVICE_BYTES.
FEEDERS = 2
RESIZE_OPSET = 18  # Resize's antialias attribute

# Why a file goes to the CPU decoder (jpeg_route); None = the GPU decoder takes it.
NOT_JPEG = "not a JPEG"
PROGRESSIVE = "progressive JPEG"
LOSSLESS = "lossless or hierarchical JPEG"
ARITHMETIC = "arithmetic-coded JPEG"
NOT_8_BIT = "not 8 bits a sample"
COLOR = "CMYK, YCCK or RGB-coded JPEG"
ROTATED = "orientation tag"  # EXIF's, or XMP's where EXIF has none (jpeg_orientation)
TOO_LARGE = "more pixels than max_pixels"
NO_HEADER = "no readable frame header"
NO_END = "no end-of-image marker (truncated?)"
UNREADABLE = "cannot be read"  # load_image words the error
REFUSED = "refused by the GPU decoder"  # step 2: nvImageCodec returned no image
SHARED = "shared with the CPU threads"  # not a fallback: share_threads took it (--decoder auto)


class DecoderUnavailable(Exception):
    """--decoder gpu where it cannot run; the message is one line naming the cause."""


# --- routing (pure Python, header bytes only) -----------------------------------------------------

_SOF_PROGRESSIVE = (0xC2,)
_SOF_LOSSLESS = (0xC3, 0xC5, 0xC6, 0xC7)  # lossless, differential (hierarchical) Huffman
_SOF_ARITHMETIC = (0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF)
_RGB_COMPONENT_IDS = (b"RGB", b"rgb")
_EOI_TAIL = 4096  # bytes at the end searched for the end-of-image marker (some writers pad after it)


@dataclass(frozen=True)
class JpegFrame:
    """What a JPEG's frame header (SOF) and Adobe APP14 segment say, and where its first scan
    starts."""

    marker: int  # 0xC0 baseline, 0xC1 extended, 0xC2 progressive, ...
    precision: int  # bits a sample
    height: int
    width: int
    component_ids: bytes  # one byte a component
    adobe_transform: int | None  # APP14's colour transform: 0 none (RGB/CMYK), 1 YCbCr, 2 YCCK
    scan_offset: int | None  # the first SOS marker's offset; None when the bytes end before it


def jpeg_frame(data: bytes) -> JpegFrame | None:
    """The frame header of a JPEG, read from its markers without decoding; None when there is
    none before the first scan (or the bytes end first). The markers are read on to the first
    scan, as libjpeg reads them: an APP14 segment may come after the frame header."""
    adobe_transform = frame = None
    n, pos = len(data), 2
    while pos + 4 <= n:
        if data[pos] != 0xFF:
            break
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:  # no length
            pos += 2
            continue
        if marker in (0xDA, 0xD9):  # the first scan, or the end
            if frame is None:
                return None
            return JpegFrame(*frame, adobe_transform, pos if marker == 0xDA else None)
        (seglen,) = struct.unpack_from(">H", data, pos + 2)
        if marker == 0xEE and data[pos + 4:pos + 9] == b"Adobe" and seglen >= 12 and pos + 15 < n:
            adobe_transform = data[pos + 15]
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC) and frame is None:  # SOFn (not DHT, JPG, DAC)
            if seglen < 8 or pos + 10 > n:
                return None
            precision, h, w, components = struct.unpack_from(">BHHB", data, pos + 4)
            ids = bytes(data[pos + 10 + 3 * i] for i in range(components) if pos + 10 + 3 * i < n)
            frame = (marker, precision, h, w, ids)
        pos += 2 + seglen
    return None if frame is None else JpegFrame(*frame, adobe_transform, None)


def jpeg_route(data: bytes, max_pixels: int) -> str | None:
    """None when the GPU decoder takes this file, else why it goes to load_image (one of the
    constants above). Reads the header only: the frame (SOF), the Adobe colour transform, and
    the orientation as preprocess reads it (EXIF, else XMP)."""
    if data[:3] != b"\xff\xd8\xff":
        return NOT_JPEG
    frame = jpeg_frame(data)
    if frame is None or frame.height == 0 or frame.width == 0:  # height 0: given later by a DNL marker
        return NO_HEADER
    if frame.marker in _SOF_PROGRESSIVE:
        return PROGRESSIVE
    if frame.marker in _SOF_LOSSLESS:
        return LOSSLESS
    if frame.marker in _SOF_ARITHMETIC:
        return ARITHMETIC
    if frame.precision != 8:
        return NOT_8_BIT
    if len(frame.component_ids) not in (1, 3):
        return COLOR
    # libjpeg's rules for 3 components: Adobe transform 0 means RGB; so do ids 'R','G','B'.
    if len(frame.component_ids) == 3 and (frame.adobe_transform == 0 or frame.component_ids in _RGB_COMPONENT_IDS):
        return COLOR
    if frame.width * frame.height > max_pixels:
        return TOO_LARGE
    orientation, note = jpeg_orientation(data)
    if orientation != 1 or note is not None:
        return ROTATED
    # A cut-off file: load_image reports it (libjpeg in strict mode); nvJPEG might fill in the
    # rest. EOI cannot occur inside entropy-coded data, so it is looked for near the end only,
    # and after the first scan starts: the header's tables and thumbnails may hold its bytes.
    if frame.scan_offset is None or data.rfind(b"\xff\xd9", max(frame.scan_offset, len(data) - _EOI_TAIL)) < 0:
        return NO_END
    return None


# --- the resize graph ----------------------------------------------------------------------------

def pool_factor(h: int, w: int, out_h: int, out_w: int) -> int:
    """The box filter (f x f average) the resize graph applies before its Resize: the largest
    power of 2 <= 8/k, where k/8 is load_image's DCT scale for this image (dct_scale). libjpeg's
    k/8 decode is close to a k/8 box filter, so the GPU path shrinks the way load_image does, and
    the antialiased Resize after it only ever shrinks by less than about 2x (onnxruntime's CUDA
    Resize is wrong beyond that: see the module docstring)."""
    k, d = dct_scale(h, w, out_h, out_w)
    f = 1
    while 2 * f * k <= d:
        f *= 2
    return f


def resize_model_bytes(pool: int = 1, padded: bool = True) -> bytes:
    """The ONNX graph that turns one decoded image into model input:
    pixels uint8 [H, P] (rows of interleaved RGB, P >= 3W bytes: a device row pitch may pad)
    -> Slice rows [top, bottom), bytes [3 left, 3 right) -> Reshape [h, w, 3]
    -> the last column repeated `pad_right` [1, n, 1] times, the last row `pad_bottom` [n, 1, 1]
       times (Expand + Concat; n may be 0)
    -> Transpose, Unsqueeze [1, 3, h, w] -> Resize(linear, antialias, half_pixel) to `sizes`
    -> uint8 [1, 3, H', W'].
    pool > 1: the [1, 3, h, w] image (h and w multiples of pool: crop_feeds(pool=)) is averaged
    over pool x pool blocks in float first (AveragePool), then resized and rounded back to uint8.
    padded False: the graph for a crop that needs no edge repeated (pad_right and pad_bottom 0,
    as for most cameras' sizes): no Expand and Concat, which copy the whole image twice, and no
    inputs for them."""
    import onnx
    from onnx import TensorProto, helper

    nodes = [
        helper.make_node("Slice", ["pixels", "starts", "ends"], ["crop"]),
        helper.make_node("Reshape", ["crop", "hwc"], ["cropped" if padded else "padded"]),
    ]
    if padded:
        nodes += [
            helper.make_node("Slice", ["cropped", "last", "end", "axis1"], ["last_column"]),
            helper.make_node("Expand", ["last_column", "pad_right"], ["right_edge"]),
            helper.make_node("Concat", ["cropped", "right_edge"], ["wide"], axis=1),
            helper.make_node("Slice", ["wide", "last", "end", "axis0"], ["last_row"]),
            helper.make_node("Expand", ["last_row", "pad_bottom"], ["bottom_edge"]),
            helper.make_node("Concat", ["wide", "bottom_edge"], ["padded"], axis=0),
        ]
    nodes += [
        helper.make_node("Transpose", ["padded"], ["chw_image"], perm=[2, 0, 1]),
        helper.make_node("Unsqueeze", ["chw_image", "axis0"], ["nchw_image"]),
    ]
    resize = dict(mode="linear", antialias=1, coordinate_transformation_mode="half_pixel")
    floats = []
    if pool == 1:
        nodes.append(helper.make_node("Resize", ["nchw_image", "", "", "sizes"], ["images"], **resize))
    else:
        nodes += [
            helper.make_node("Cast", ["nchw_image"], ["float_image"], to=TensorProto.FLOAT),
            helper.make_node("AveragePool", ["float_image"], ["pooled"], kernel_shape=[pool, pool], strides=[pool, pool]),
            helper.make_node("Resize", ["pooled", "", "", "sizes"], ["resized"], **resize),
            helper.make_node("Round", ["resized"], ["rounded"]),
            helper.make_node("Clip", ["rounded", "zero", "max_level"], ["clipped"]),
            helper.make_node("Cast", ["clipped"], ["images"], to=TensorProto.UINT8),
        ]
        floats = [helper.make_tensor("zero", TensorProto.FLOAT, [], [0.0]),
                  helper.make_tensor("max_level", TensorProto.FLOAT, [], [255.0])]
    i64 = lambda name, n: helper.make_tensor_value_info(name, TensorProto.INT64, [n])  # noqa: E731
    const = lambda name, value: helper.make_tensor(name, TensorProto.INT64, [1], [value])  # noqa: E731
    pads = [i64("pad_right", 3), i64("pad_bottom", 3)] if padded else []
    edges = [const("axis1", 1), const("last", -1), const("end", 1 << 62)] if padded else []
    graph = helper.make_graph(
        nodes, "cnnx_resize",
        [helper.make_tensor_value_info("pixels", TensorProto.UINT8, ["H", "P"]),
         i64("starts", 2), i64("ends", 2), i64("hwc", 3), *pads, i64("sizes", 4)],
        [helper.make_tensor_value_info("images", TensorProto.UINT8, [1, 3, "out_h", "out_w"])],
        initializer=[const("axis0", 0), *edges, *floats])
    # IR 9 (onnx 1.15's): read by every onnxruntime that has Resize-18's antialias.
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", RESIZE_OPSET)], ir_version=9)
    onnx.checker.check_model(model)
    return model.SerializeToString()


def crop_feeds(h: int, w: int, out_h: int, out_w: int, pool: int = 1) -> dict:
    """The small inputs of the resize graph for an h x w image: load_image's centre crop of the
    shorter-side resize, taken as load_image takes it from the DCT-scaled image (whose last
    block row/column stands for up to 8/k full-size pixels past the edge: those are the
    edge repeated), in whole full-size pixels; and the output size. With pool > 1 the crop
    grows right and down (into the image, else by repeating its edge) by less than pool
    pixels, to whole pool x pool blocks."""
    from cnnx.runtime.preprocess import _crop_box

    k, d = dct_scale(h, w, out_h, out_w)
    scaled_h, scaled_w = -(-h * k // d), -(-w * k // d)
    left, top, right, bottom = (round(v * d / k) for v in _crop_box(scaled_w, scaled_h, out_h, out_w))
    left, top = min(left, w - 1), min(top, h - 1)
    right, bottom = max(right, left + 1), max(bottom, top + 1)
    right += -(right - left) % pool
    bottom += -(bottom - top) % pool
    pad_right, pad_bottom = max(0, right - w), max(0, bottom - h)
    right, bottom = min(right, w), min(bottom, h)
    return {"starts": np.array([top, 3 * left], np.int64), "ends": np.array([bottom, 3 * right], np.int64),
            "hwc": np.array([bottom - top, right - left, 3], np.int64),
            "pad_right": np.array([1, pad_right, 1], np.int64), "pad_bottom": np.array([pad_bottom, 1, 1], np.int64),
            "sizes": np.array([1, 3, out_h, out_w], np.int64)}


def resize_feeds(h: int, w: int, out_h: int, out_w: int, pool: int) -> tuple:
    """(padded, feeds): whether this crop needs the edge repeated past the image (the graph
    resize_model_bytes(pool, padded) then runs it), and the feeds of that graph: crop_feeds',
    less the pad inputs where it needs none."""
    feeds = crop_feeds(h, w, out_h, out_w, pool)
    padded = bool(feeds["pad_right"][1] or feeds["pad_bottom"][0])
    if not padded:
        del feeds["pad_right"], feeds["pad_bottom"]
    return padded, feeds


# --- nvImageCodec --------------------------------------------------------------------------------

_IMPORT_LOCK = threading.Lock()


def import_nvimgcodec():
    """nvidia.nvimgcodec (ImportError when not installed), its import-time notes hidden and its
    per-image warnings off (a file it refuses is handled: load_image decodes it)."""
    with _IMPORT_LOCK:
        if "nvidia.nvimgcodec" in sys.modules:
            return sys.modules["nvidia.nvimgcodec"]
        os.environ.setdefault("PYNVIMGCODEC_VERBOSITY", "0")
        with quiet_stderr():  # its notes of optional libraries it lacks (nvJPEG2000, nvTIFF)
            import nvidia.nvimgcodec as nvimgcodec
        return nvimgcodec


def _nvidia_lib(soname: str):
    """ctypes handle of a CUDA library by soname: already loaded or on the loader's path, else
    from the nvidia-* wheels' folders (nvidia/cu13/lib, ...). None when it cannot be loaded."""
    try:
        return ctypes.CDLL(soname)
    except OSError:
        pass
    import importlib.util

    spec = importlib.util.find_spec("nvidia")
    for root in (spec.submodule_search_locations or []) if spec else []:
        for sub in sorted(os.listdir(root)):
            candidate = os.path.join(root, sub, "lib", soname)
            if os.path.exists(candidate):
                try:
                    return ctypes.CDLL(candidate)
                except OSError:
                    continue
    return None


@dataclass(frozen=True)
class GpuDecodeStatus:
    usable: bool
    reason: str  # one line: what was found, or what is missing and how to fix it


def diagnose(device_id: int = 0) -> GpuDecodeStatus:
    """Can JPEGs be decoded on GPU device_id here? Checked in order, each cheap: onnxruntime's
    CUDA provider usable (cnnx.runtime.cuda: the driver and the GPU first, whose fixes come
    before any package's; the resize runs on that provider); nvImageCodec and onnx installed;
    the nvJPEG library loadable; one tiny JPEG decoded on the GPU (nvImageCodec's own error
    lines kept off stderr: the reason is this status's one line)."""
    import importlib.util

    from cnnx.runtime import cuda

    status = cuda.diagnose()
    if not status.usable:
        return GpuDecodeStatus(False, f"GPU decoding needs onnxruntime's CUDA provider: {status.reason}")
    if importlib.util.find_spec("nvidia") is None or importlib.util.find_spec("nvidia.nvimgcodec") is None:
        return GpuDecodeStatus(False, f"nvImageCodec is not installed: {INSTALL_HINT}")
    if importlib.util.find_spec("onnx") is None:  # builds the resize graph (resize_model_bytes)
        return GpuDecodeStatus(False, f"onnx is not installed: {INSTALL_HINT}")
    try:
        nvimgcodec = import_nvimgcodec()
    except ImportError as e:
        return GpuDecodeStatus(False, f"nvImageCodec cannot be imported ({first_line(e)}): {INSTALL_HINT}")
    major = int(nvimgcodec.__cuda_version__) // 1000
    if _nvidia_lib(f"libnvjpeg.so.{major}") is None:
        return GpuDecodeStatus(False, f"nvJPEG library libnvjpeg.so.{major} cannot be loaded: {INSTALL_HINT}")
    try:
        with quiet_stderr():
            probe = _gpu_decoder(nvimgcodec, device_id)
            ok = probe.decode([nvimgcodec.CodeStream(_probe_jpeg())], params=_decode_params(nvimgcodec))[0] is not None
    except Exception as e:  # noqa: BLE001 - nvImageCodec raises RuntimeError/ValueError of its own
        return GpuDecodeStatus(False, f"nvImageCodec cannot decode on GPU {device_id}: {first_line(e)}")
    if not ok:
        return GpuDecodeStatus(False, f"nvImageCodec has no GPU JPEG decoder for GPU {device_id}")
    return GpuDecodeStatus(True, f"nvImageCodec {nvimgcodec.__version__} on GPU {device_id}")


def _probe_jpeg() -> bytes:
    import simplejpeg

    return simplejpeg.encode_jpeg(np.full((16, 16, 3), 128, np.uint8), quality=90, colorspace="RGB")


def _decode_params(nvimgcodec):
    # Orientation: rotated files never reach nvImageCodec (jpeg_route), so it has nothing to apply.
    return nvimgcodec.DecodeParams(apply_exif_orientation=False, color_spec=nvimgcodec.ColorSpec.SRGB,
                                   allow_any_depth=False)


def _gpu_decoder(nvimgcodec, device_id: int):
    """A decoder on the GPU's backends only: a file none of them takes comes back None (and
    goes to load_image) rather than through nvImageCodec's own CPU decoder."""
    kinds = (nvimgcodec.BackendKind.HW_GPU_ONLY, nvimgcodec.BackendKind.GPU_ONLY,
             nvimgcodec.BackendKind.HYBRID_CPU_GPU)
    return nvimgcodec.Decoder(device_id=device_id, backends=[nvimgcodec.Backend(k) for k in kinds])


class _CudaRuntime:
    """The CUDA runtime calls this module needs, through ctypes (no torch, no cupy)."""

    def __init__(self, device_id: int):
        self.lib = _nvidia_lib("libcudart.so.13") or _nvidia_lib("libcudart.so.12")
        if self.lib is None:
            raise DecoderUnavailable(f"the CUDA runtime library (libcudart) cannot be loaded: {INSTALL_HINT}")
        self.device_id = device_id

    def synchronize(self, streams):
        """Wait for the work queued on each of `streams` (cudaStream_t as integers): nvImageCodec
        leaves each decoded image ready on its image's own stream (Image.cuda_stream), and the
        resize on onnxruntime's stream reads those pixels."""
        self._check("cudaSetDevice", self.device_id)
        for stream in set(streams):
            if stream is not None:
                self._check("cudaStreamSynchronize", ctypes.c_void_p(stream))

    def synchronize_device(self):
        self._check("cudaSetDevice", self.device_id)
        self._check("cudaDeviceSynchronize")

    def _check(self, call, *args):
        err = getattr(self.lib, call)(*args)
        if err != 0:
            raise RuntimeError(f"{call} failed with CUDA error {err}")


# --- the decoder ---------------------------------------------------------------------------------

class GpuDecoder:
    """nvImageCodec + the resize graph (any model spec). device "cuda": the GPU (device_id);
    "cpu": nvImageCodec's libjpeg-turbo backend and onnxruntime's CPU provider (tests).
    workers: CPU threads that read files and run load_image for the files the GPU does not take.
    share_threads: CPU threads, at a lower priority, that also decode files the GPU could take
    (load_image, the reference), from the other end of each batch, until the two meet: where
    CPU decoding is a good share of GPU decoding (photos: the CPU decodes them DCT-scaled, the
    GPU at full size), the two together beat either. 0: the GPU takes all it can.
    resize_sessions: sessions of the resize graph per box-filter factor, the threads spread over
    them (each thread keeps its own): whether the resizes of one session wait for each other is
    what benchmarks/gpu_classify.py's gpu_decode_steps measures against more of them.
    Counts what went where: `on_gpu`, `to_cpu` {reason: files} (read by --decoder's summary)."""

    def __init__(self, *, device: str = "cuda", device_id: int = 0, workers: int = 1, share_threads: int = 0,
                 resize_sessions: int = 1):
        if device not in ("cuda", "cpu"):
            raise ValueError(f"device must be 'cuda' or 'cpu', got {device!r}")
        self.device, self.device_id = device, device_id
        self.nvimgcodec = import_nvimgcodec()
        nv = self.nvimgcodec
        if device == "cuda":
            self.decoder = _gpu_decoder(nv, device_id)
            self.cudart = _CudaRuntime(device_id)
            providers = [("CUDAExecutionProvider", {"device_id": str(device_id)})]
        else:
            self.decoder = nv.Decoder(device_id=nv.NVIMGCODEC_DEVICE_CPU_ONLY,
                                      backends=[nv.Backend(nv.BackendKind.CPU_ONLY)])
            self.cudart = None
            providers = ["CPUExecutionProvider"]
        self.params = _decode_params(nv)
        self._providers = providers
        self._sessions = {}
        self._sessions_lock = threading.Lock()
        self.resize_sessions = max(1, resize_sessions)
        self._thread_slot = threading.local()  # which of the resize_sessions this thread uses
        self._slots_given = 0
        if device == "cuda" and self.session(1).get_providers()[0] != "CUDAExecutionProvider":
            raise DecoderUnavailable("the GPU resize did not get onnxruntime's CUDA provider")
        self.pool = ThreadPoolExecutor(max(1, workers), thread_name_prefix="cnnx-gpudecode-cpu")
        self.share_threads = max(0, share_threads)
        self.share_pool = ThreadPoolExecutor(self.share_threads, thread_name_prefix="cnnx-gpudecode-share",
                                             initializer=_lower_priority) if self.share_threads else None
        self._decode_lock = threading.Lock()  # one nvImageCodec batch call at a time
        self._count_lock = threading.Lock()
        self.on_gpu = 0
        self.to_cpu = {}

    def summary(self) -> str:
        """One clause for cnnx classify's summary: how many files each decoder took."""
        on_cpu = sum(self.to_cpu.values())
        shared = self.to_cpu.get(SHARED, 0)
        return f"decoder {'nvImageCodec' if self.device == 'cuda' else 'nvImageCodec-cpu'}: {self.on_gpu:,} files, " \
               f"{on_cpu:,} by the CPU decoder" + (f" ({shared:,} of them shared)" if shared else "")

    def close(self):
        self.pool.shutdown(wait=True, cancel_futures=True)
        if self.share_pool is not None:
            self.share_pool.shutdown(wait=True, cancel_futures=True)
        self._sessions, self.decoder = {}, None

    def session(self, pool: int, padded: bool = True):
        """This thread's session of the resize graph for this box-filter factor, with or without
        the edge padding (made on first use)."""
        key = (pool, padded) if self.resize_sessions == 1 else (pool, padded, self._slot())
        session = self._sessions.get(key)  # every resize asks: no lock, no import once made
        if session is not None:
            return session
        import onnxruntime as ort

        from cnnx.runtime.cuda import new_session

        with self._sessions_lock:
            if key not in self._sessions:
                options = ort.SessionOptions()
                options.log_severity_level = 3
                self._sessions[key] = new_session(ort, resize_model_bytes(pool, padded), options, self._providers)
            return self._sessions[key]

    def _slot(self) -> int:
        slot = getattr(self._thread_slot, "slot", None)
        if slot is None:
            with self._sessions_lock:
                slot = self._thread_slot.slot = self._slots_given % self.resize_sessions
                self._slots_given += 1
        return slot

    def decode_images(self, paths, spec, max_pixels: int):
        """Like pipeline.decode_images: paths in order -> (uint8 (k, 3, H, W) of the k that
        decoded, their paths, failed [(path, stage, message)], notes [(path, note)])."""
        from cnnx.runtime.pipeline import decode_images as cpu_decode

        out_h, out_w = spec["size"]
        routed = list(self.pool.map(lambda p: self._read_and_route(p, max_pixels), paths))
        cpu_jobs = {path: self.pool.submit(cpu_decode, [path], spec, max_pixels)
                    for path, _data, reason in routed if reason is not None}
        gpu = deque((path, data) for path, data, reason in routed if reason is None)
        gpu_lock = threading.Lock()  # the GPU takes groups from the left, share_threads files from the right
        resized, shared = {}, {}

        def share():
            while True:
                with gpu_lock:
                    if not gpu:
                        return
                    path, _data = gpu.pop()
                shared[path] = cpu_decode([path], spec, max_pixels)
                self._count(SHARED)

        sharing = [self.share_pool.submit(share) for _ in range(self.share_threads)] if gpu and self.share_pool else []

        def take(resizes):
            for path, future in resizes:
                arr = None if future is None else future.result()
                if arr is None:
                    self._count(REFUSED)
                    cpu_jobs[path] = self.pool.submit(cpu_decode, [path], spec, max_pixels)
                else:
                    resized[path] = arr

        # Each group's images are resized in the pool's threads (each a run of the resize graph)
        # while the next group decodes; a group's decoded pixels are freed once resized, and
        # at most two groups' are held.
        previous = []
        while group := _device_group(gpu, gpu_lock):
            images = self._decode_on_gpu([d for _, d in group])
            current = [(path, None if img is None else self.pool.submit(self._resize, img, out_h, out_w))
                       for (path, _data), img in zip(group, images)]
            take(previous)
            previous = current
        take(previous)
        for future in sharing:
            future.result()
        with self._count_lock:
            self.on_gpu += len(resized)
        images = np.empty((len(paths), 3, out_h, out_w), np.uint8)
        ok, failed, notes = [], [], []
        for path in paths:
            if path in resized:
                images[len(ok)] = resized[path]
                ok.append(path)
                continue
            arr, ok_paths, fails, path_notes = shared[path] if path in shared else cpu_jobs[path].result()
            failed += fails
            notes += path_notes
            if ok_paths:
                images[len(ok)] = arr[0]
                ok.append(path)
        return images[:len(ok)], ok, failed, notes

    def _read_and_route(self, path, max_pixels):
        """(path, bytes, None) for the GPU, (path, None, reason) for load_image."""
        try:
            data, _note = read_file(path)  # load_image re-reads a file it gets (and words its errors)
        except ImageError:
            reason = UNREADABLE
        else:
            reason = jpeg_route(data, max_pixels)
            if reason is None:
                return path, data, None
        self._count(reason)
        return path, None, reason

    def _count(self, reason):
        with self._count_lock:
            self.to_cpu[reason] = self.to_cpu.get(reason, 0) + 1

    def _decode_on_gpu(self, datas) -> list:
        """One nvImageCodec batch call -> its decoded images (on the device, synchronised), None
        where nvImageCodec could not take the file."""
        nv = self.nvimgcodec
        streams = []
        for data in datas:
            try:
                streams.append(nv.CodeStream(data))
            except Exception:  # noqa: BLE001 - a header nvImageCodec cannot parse: load_image decides
                streams.append(None)
        valid = [s for s in streams if s is not None]
        try:
            with self._decode_lock:
                decoded = self.decoder.decode(valid, params=self.params) if valid else []
                if self.cudart is not None:
                    self.cudart.synchronize(img.cuda_stream for img in decoded if img is not None)
                decoded = iter(decoded)
        except Exception:  # noqa: BLE001 - the whole call failed (device error): every file to the CPU
            return [None] * len(datas)
        return [next(decoded) if s is not None else None for s in streams]

    def _resize(self, img, out_h: int, out_w: int, pool: int | None = None):
        """One decoded image (device or host memory, as nvImageCodec left it: rows may be padded)
        bound in place to the resize graph's input -> (3, out_h, out_w) uint8 on the host.
        pool: the graph's box-filter factor; None = pool_factor's."""
        if img.ndim != 3 or img.shape[2] != 3:
            return None
        h, w = img.shape[0], img.shape[1]
        if pool is None:
            pool = pool_factor(h, w, out_h, out_w)
        on_gpu = self.device == "cuda"
        buffer = img.__cuda_array_interface__ if on_gpu else img.__array_interface__
        pitch = buffer["strides"][0] if buffer.get("strides") else 3 * w
        padded, feeds = resize_feeds(h, w, out_h, out_w, pool)
        try:
            session = self.session(pool, padded)
            binding = session.io_binding()
            binding.bind_input("pixels", "cuda" if on_gpu else "cpu", self.device_id if on_gpu else 0, np.uint8,
                               [h, pitch], buffer["data"][0])
            for name, value in feeds.items():
                binding.bind_cpu_input(name, value)
            binding.bind_output("images", "cpu")
            session.run_with_iobinding(binding)
            return binding.copy_outputs_to_cpu()[0][0]
        except Exception:  # noqa: BLE001 - onnxruntime's own types; load_image takes the file
            return None


def _device_group(items: deque, lock) -> list:
    """Take from the left of `items` [(path, jpeg bytes)] the next group whose decoded pixels fit
    DEVICE_BYTES (from the header's size; every item passed jpeg_route, so it has one); [] when
    none are left."""
    group, total = [], 0
    with lock:
        while items:
            frame = jpeg_frame(items[0][1])
            size = 3 * frame.height * frame.width
            if group and total + size > DEVICE_BYTES:
                break
            group.append(items.popleft())
            total += size
    return group


def _lower_priority():
    """A share thread's initializer: a lower CPU priority (Linux sets it per thread), so the
    GPU's feeding threads (reads, nvImageCodec and resize calls) are not kept waiting by it."""
    with contextlib.suppress(AttributeError, OSError):
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)


# --- choosing a decoder and the batches ------------------------------------------------------------

def open_decoder(choice: str, *, workers: int, size=None, device_id: int = 0):
    """--decoder: "cpu" -> None (pipeline.decode_images); "gpu" -> a GpuDecoder or
    DecoderUnavailable naming the cause; "auto" -> a GpuDecoder that shares each batch with
    `workers` CPU threads (share_threads) where diagnose() says it runs and the model's input
    (size: (H, W)) is larger than PROCESS_DECODE_MAX_SIDE, else None: images that small decode
    many times faster in the CPU decode processes (on an H100,
    benchmarks/results/gpu_classify.json, "gpu_decode_classify_airnet_cifar")."""
    if choice not in DECODERS:
        raise ValueError(f"decoder must be one of {', '.join(DECODERS)}, got {choice!r}")
    if choice == "cpu" or (choice == "auto" and size is not None and max(size) <= PROCESS_DECODE_MAX_SIDE):
        return None
    status = diagnose(device_id)
    if not status.usable:
        if choice == "gpu":
            raise DecoderUnavailable(f"--decoder gpu: {status.reason}")
        return None
    try:
        return GpuDecoder(device="cuda", device_id=device_id, workers=workers,
                          share_threads=workers if choice == "auto" else 0)
    except DecoderUnavailable as e:
        if choice == "gpu":
            raise DecoderUnavailable(f"--decoder gpu: {e}") from None
        return None
    except Exception as e:  # noqa: BLE001 - nvImageCodec / onnxruntime types
        if choice == "gpu":
            raise DecoderUnavailable(f"--decoder gpu: cannot start the GPU decoder: {first_line(e)}") from None
        return None


def decoded_batches(item_batches, spec, config, decoder: GpuDecoder):
    """pipeline.decoded_batches with the GPU decoder: yield (items, DecodedBatch) in order. Each
    batch is one decode_images call (one nvImageCodec batch per DEVICE_BYTES) in one of FEEDERS
    threads, up to config.read_ahead(spec) batches ahead of the one being run: the same memory
    bound as the CPU pipeline."""
    from cnnx.runtime.pipeline import assemble

    depth = config.read_ahead(spec)
    with ThreadPoolExecutor(max_workers=FEEDERS, thread_name_prefix="cnnx-gpudecode") as feeder:
        pending = deque()
        try:
            for items in item_batches:
                paths = [item.path for item in items if item.reason is None]
                pending.append((items, feeder.submit(decoder.decode_images, paths, spec, config.max_pixels)))
                if len(pending) > depth:
                    items, future = pending.popleft()
                    yield items, assemble([future.result()], spec, config.batch_size)
            while pending:
                items, future = pending.popleft()
                yield items, assemble([future.result()], spec, config.batch_size)
        finally:
            for _items, future in pending:
                future.cancel()
