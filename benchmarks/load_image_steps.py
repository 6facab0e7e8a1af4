"""Where one small JPEG's decode time goes, step by step, and the command's other per-file
steps: one-core microseconds a file over CIFAR-10 JPEGs (the page cache warm), the least of
7 passes each.

    python benchmarks/load_image_steps.py

Steps of `preprocess.load_image` for a 32 px JPEG (read_file, the header, the EXIF walk,
libjpeg-turbo's decode through simplejpeg, the (3, H, W) layout) and of a batch row
(`load_image_into`), beside Pillow's decode of the same bytes; the command's per-file work
besides decoding: walking a folder (`Discovery._children`) and `softmax_topk` (10 classes,
top-1). Writes benchmarks/results/load_image_steps.json.
"""

from __future__ import annotations

import argparse
import io
import sys
import timeit
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]

from _results import RESULTS, write_result  # noqa: E402
from cifar_jpegs import cifar_folder  # noqa: E402

FILES = 2000
PASSES = 7


def per_file_us(fn, n: int) -> float:
    """The least of PASSES runs of fn() (which handles n files), in microseconds a file."""
    return round(min(timeit.repeat(fn, number=1, repeat=PASSES)) / n * 1e6, 2)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cifar", type=Path, help="CIFAR-10 JPEG folder (default $CNNX_CIFAR_DIR or /tmp/cifar10/train)")
    ap.add_argument("--out", type=Path, default=RESULTS / "load_image_steps.json")
    args = ap.parse_args(argv)

    import simplejpeg
    from PIL import Image

    from cnnx.runtime import preprocess as pp
    from cnnx.runtime.discover import Discovery
    from cnnx.runtime.model import softmax_topk

    folder = sorted(p for p in cifar_folder(args.cifar).iterdir() if p.is_dir())[0]
    in_folder = sorted(str(p) for p in folder.glob("*.jpg"))
    files = in_folder[:FILES]
    n = len(files)
    spec = pp.make_spec(32, (0.5,) * 3, (0.25,) * 3)
    datas = [pp.read_file(f)[0] for f in files]
    decoded = [simplejpeg.decode_jpeg(d, colorspace="RGB") for d in datas]
    rows = np.zeros((n, 3, 32, 32), np.uint8)

    def into_rows():
        for row, f in zip(rows, files):
            pp.load_image_into(row, f, spec)

    def pillow(d):
        with Image.open(io.BytesIO(d)) as im:
            return np.asarray(im.convert("RGB"))

    logits = np.random.default_rng(0).standard_normal((256, 10)).astype(np.float32)
    steps = {
        "load_image": per_file_us(lambda: [pp.load_image(f, spec) for f in files], n),
        "load_image_into (a batch row)": per_file_us(into_rows, n),
        "read_file": per_file_us(lambda: [pp.read_file(f) for f in files], n),
        "jpeg header": per_file_us(lambda: [simplejpeg.decode_jpeg_header(d) for d in datas], n),
        "EXIF orientation": per_file_us(lambda: [pp.jpeg_orientation(d) for d in datas], n),
        "libjpeg-turbo decode (simplejpeg)": per_file_us(
            lambda: [simplejpeg.decode_jpeg(d, colorspace="RGB", min_height=0, min_width=0) for d in datas], n),
        "(3, H, W) contiguous array": per_file_us(
            lambda: [np.ascontiguousarray(a.transpose(2, 0, 1)) for a in decoded], n),
        "Pillow decode (for comparison)": per_file_us(lambda: [pillow(d) for d in datas], n),
        "walking the folder (Discovery._children)": per_file_us(lambda: Discovery([folder])._children(str(folder)),
                                                                len(in_folder)),
        "softmax_topk, top-1 (a row)": per_file_us(lambda: [softmax_topk(logits, 1) for _ in range(n // 256)],
                                                   n // 256 * 256),
    }
    for step, us in steps.items():
        print(f"{step:45s} {us:8.2f} us")
    write_result(args.out, {"files": n, "folder": folder.name, "passes": PASSES, "us_per_file": steps},
                 None if argv is None else [__file__, *argv])


if __name__ == "__main__":
    main()
