"""Where the benchmarks' CIFAR-10 JPEG folder comes from, and how to make one.

The benchmarks read the 50,000 CIFAR-10 training images as JPEG files, DIR/<class>/<nnnn>.jpg
(10 classes x 5,000): `--data DIR` / `--cifar DIR`, else $CNNX_CIFAR_DIR, else /tmp/cifar10/train.
This script writes that folder from torchvision's CIFAR-10 download (through cnnx's own loader,
the one `cnnx train` uses), each image JPEG-compressed once at quality 75:

    python benchmarks/cifar_jpegs.py /tmp/cifar10/train [--data-root DIR_WITH_cifar-10-batches-py]

Accuracies on these JPEGs run slightly below those on the PNG-exact pickles.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tarfile
from pathlib import Path

DEFAULT_DIR = Path("/tmp/cifar10/train")
QUALITY = 75
# The development checkout keeps the same folder as a tarball beside it; used when present.
_BESIDE_CHECKOUT = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "cifar10-train.tar.gz"


def cifar_folder(explicit=None) -> Path:
    """The CIFAR-10 JPEG folder to benchmark on; exits with one line saying how to make it."""
    folder = Path(explicit or os.environ.get("CNNX_CIFAR_DIR") or DEFAULT_DIR)
    if (folder / "airplane").is_dir():
        return folder
    if explicit is None and folder == DEFAULT_DIR and _BESIDE_CHECKOUT.is_file():
        with tarfile.open(_BESIDE_CHECKOUT) as tar:  # holds cifar10/train/<class>/*.jpg
            tar.extractall(DEFAULT_DIR.parents[1], filter="data")
        return folder
    raise SystemExit(f"no CIFAR-10 JPEG folder at {folder} (DIR/airplane/*.jpg ...): make one with "
                     f"`python benchmarks/cifar_jpegs.py {folder}` or pass the folder")


def write_jpegs(images, labels, class_names, dest: Path) -> Path:
    """uint8 (N,3,H,W) images -> dest/<class>/<nnnn>.jpg, numbered per class; dest appears whole."""
    from PIL import Image

    tmp = dest.with_name(f".{dest.name}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    counts = [0] * len(class_names)
    for name in class_names:
        (tmp / name).mkdir(parents=True)
    for image, label in zip(images, labels):
        label = int(label)
        Image.fromarray(image.transpose(1, 2, 0)).save(tmp / class_names[label] / f"{counts[label]:04d}.jpg",
                                                       quality=QUALITY)
        counts[label] += 1
    os.replace(tmp, dest)
    return dest


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dest", type=Path, nargs="?", default=DEFAULT_DIR, help="folder to create (must not exist)")
    ap.add_argument("--data-root", type=Path, help="where torchvision's CIFAR-10 is (downloaded there if absent)")
    a = ap.parse_args(argv)
    if a.dest.exists():
        raise SystemExit(f"{a.dest} exists; remove it or name another folder")
    from cnnx.train.data import DataError, cache_dir, load_cifar10

    try:
        images, labels, names = load_cifar10(a.data_root or cache_dir() / "datasets", train=True)
    except DataError as e:
        raise SystemExit(str(e)) from None
    a.dest.parent.mkdir(parents=True, exist_ok=True)
    write_jpegs(images.numpy(), labels.numpy(), names, a.dest)
    print(f"wrote {len(labels)} JPEGs to {a.dest}", file=sys.stderr)


if __name__ == "__main__":
    main()
