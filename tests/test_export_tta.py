"""`cnnx export --tta N`: the exported model's test-time views are an export-time choice, written
into its metadata and parity.json and shown by `cnnx info`; the gate checks that same function."""

from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
import pytest

from _train_util import run_cli


@pytest.fixture(scope="module")
def airnet_run(cifar_subset, tmp_path_factory):
    data = cifar_subset(8)
    out = tmp_path_factory.mktemp("tta-run")
    r = run_cli(["train", "--data", data, "--arch", "airnet", "--epochs", "1",
                 "--batch-size", "32", "--device", "cpu", "--workers", "1", "--quiet", "--out", out, "--name", "a",
                 "--tta", "2"])
    assert r.exit_code == 0, r.stderr
    return data, out / "a" / "best.pt"


def _views_of(model_path) -> int:
    return int(ort.InferenceSession(str(model_path)).get_modelmeta().custom_metadata_map["cnnx.tta_views"])


def test_export_chooses_the_views_and_says_so(airnet_run, tmp_path):
    data, ckpt = airnet_run
    outs = {}
    for views in ("1", "6"):
        out = tmp_path / f"v{views}"
        r = run_cli(["export", ckpt, "--out", out, "--tta", views, "--verify-data", data, "--parity-images", "40"])
        assert r.exit_code == 0, r.stderr
        assert f"({views} test-time view(s) per image)" in r.stderr
        assert _views_of(out / "model.onnx") == int(views)
        doc = json.loads((out / "parity.json").read_text())
        assert doc["tta_views"] == int(views)
        assert all(row["max_abs"] <= 1e-4 for row in doc["results"] if row["variant"] == "fp32")
        info = run_cli(["info", out / "model.onnx", "--json"])
        assert info.exit_code == 0 and json.loads(info.stdout)["tta_views"] == int(views)
        assert f"views:    {views} per image" in run_cli(["info", out / "model.onnx"]).stdout
        outs[views] = out / "model.onnx"
    # Different functions: 6 views average shifted copies too, so the logits differ from 1 view's.
    x = np.random.default_rng(0).integers(0, 256, (4, 3, 32, 32), dtype=np.uint8)
    one, six = (ort.InferenceSession(str(outs[v])).run(None, {"images": x})[0] for v in ("1", "6"))
    assert not np.allclose(one, six)
    # Without --tta the checkpoint's own count (2, as trained) is kept.
    out = tmp_path / "own"
    assert run_cli(["export", ckpt, "--out", out, "--verify-data", data, "--parity-images", "40"]).exit_code == 0
    assert _views_of(out / "model.onnx") == 2


def test_bad_view_counts_are_one_line(airnet_run, tmp_path, cifar_subset):
    _data, ckpt = airnet_run
    r = run_cli(["export", ckpt, "--out", tmp_path / "x", "--tta", "0"])
    assert r.exit_code == 2 and "--tta" in r.stderr
    seed = tmp_path / "seed"
    t = run_cli(["train", "--data", cifar_subset(8), "--arch", "seed-cnn", "--epochs", "1", "--device", "cpu",
                 "--workers", "1", "--quiet", "--out", seed, "--name", "s"])
    assert t.exit_code == 0, t.stderr
    r = run_cli(["export", seed / "s" / "best.pt", "--out", tmp_path / "y", "--tta", "6"])
    assert r.exit_code == 1 and "has no test-time views" in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) <= 3 and not (tmp_path / "y").exists()
