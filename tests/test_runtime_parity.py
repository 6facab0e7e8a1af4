"""Train-time evaluation and `cnnx classify` see the same pixels and make the same calls.

The folder mixes real CIFAR-10 JPEGs (passed through at 32x32) with files that exercise every
decode path: a large photo (DCT-scaled libjpeg-turbo decode + resize), an EXIF-rotated JPEG,
an RGBA PNG, a CMYK JPEG (Pillow path) and an animated GIF."""

from __future__ import annotations

import csv
import json
import shutil

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from cnnx.cli import cli
from tests._runtime_util import exported_model, photo_like

torch = pytest.importorskip("torch")


def test_train_time_evaluation_and_runtime_agree_bit_for_bit(cifar_subset, tmp_path, tmp_path_factory):
    from cnnx.runtime.model import open_model
    from cnnx.runtime.pipeline import decode_batch
    from cnnx.runtime.preprocess import DEFAULT_MAX_PIXELS
    from cnnx.train.checkpoint import load_checkpoint, model_from_checkpoint
    from cnnx.train.data import load_image_folder
    from cnnx.train.loop import evaluate
    from cnnx.train.zoo import Uint8Input

    root = tmp_path / "data"
    shutil.copytree(cifar_subset(3), root)
    Image.fromarray(photo_like(1500, 2000, seed=1)).save(root / "ship" / "big_photo.jpg", quality=90)
    ex = Image.Exif()
    ex[0x0112] = 8
    Image.fromarray(photo_like(90, 160, seed=2)).save(root / "cat" / "rotated.jpg", exif=ex.tobytes())
    Image.fromarray(np.dstack([photo_like(50, 70, 3), np.full((50, 70), 90, np.uint8)]), "RGBA").save(
        root / "dog" / "alpha.png")
    Image.fromarray(photo_like(64, 48, seed=4)).convert("CMYK").save(root / "frog" / "cmyk.jpg")
    frames = [Image.fromarray(photo_like(40, 40, seed=s)).convert("P") for s in range(2)]
    frames[0].save(root / "bird" / "anim.gif", save_all=True, append_images=frames[1:])

    model_path = exported_model(tmp_path_factory.mktemp("models"))
    ckpt = load_checkpoint(model_path.parent.parent / "best.pt")
    _session, info, _provider = open_model(model_path, "cpu")
    assert info.spec == ckpt["preprocess"] and list(info.class_names) == ckpt["class_names"]

    data = load_image_folder(root, ckpt["preprocess"], progress=False, use_cache=False)
    assert data.class_names == ckpt["class_names"] and len(data.paths) == 35 and not data.skipped

    # 1. Same uint8 arrays: the runtime's decode of each file equals train-time evaluation's.
    runtime = decode_batch(data.paths, info.spec, len(data.paths), DEFAULT_MAX_PIXELS)
    assert runtime.paths == data.paths and not runtime.failed
    assert np.array_equal(runtime.images, data.images.numpy())

    # 2. Same predictions: classify's labels equal eager PyTorch's argmax on the train-time
    # tensors, and the confusion matrix equals loop.evaluate's.
    out = tmp_path / "pred.csv"
    r = CliRunner().invoke(cli, ["classify", str(root), "--model", str(model_path), "-o", str(out)])
    assert r.exit_code == 0, r.stderr
    with open(out, newline="") as f:
        predicted = {row["path"]: row["label"] for row in csv.DictReader(f)}
    model = model_from_checkpoint(ckpt)
    wrapped = Uint8Input(model, ckpt["preprocess"]["mean"], ckpt["preprocess"]["std"]).eval()
    with torch.no_grad():
        eager = wrapped(data.images).argmax(1).tolist()
    assert [predicted[p] for p in data.paths] == [data.class_names[i] for i in eager]

    metrics = evaluate(model, data.images, data.labels, mean=ckpt["preprocess"]["mean"],
                       std=ckpt["preprocess"]["std"], num_classes=len(data.class_names))
    confusion = np.zeros((len(data.class_names),) * 2, dtype=np.int64)
    for path, label in zip(data.paths, data.labels.tolist()):
        confusion[label, data.class_names.index(predicted[path])] += 1
    assert confusion.tolist() == np.asarray(metrics["confusion"]).tolist(), json.dumps(metrics)[:300]
