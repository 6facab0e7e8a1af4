"""Every architecture of the zoo exports to ONNX, TorchScript and pt2 and passes the parity gate
(fp32 bounds unchanged). The torchvision ImageNet models are checked at a 32x32 preprocess size
(their adaptive pooling accepts it), and every arch but seed-cnn on fewer parity images (real
and random: batch 32 instead of 256), to keep the suite in seconds. The bounds never change;
test_export.py runs the full gate (1, 7, 256) on seed-cnn."""

from __future__ import annotations

import json

import onnxruntime as ort
import pytest

from _export_util import make_checkpoint
from cnnx.export.api import export_checkpoint
from cnnx.train.zoo import ARCHS

CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
# arch -> (real parity images, random batch sizes); the default is the full gate's sizes
PARITY = {"seed-cnn": (50, (1, 7, 256))}
SMALLER = (20, (1, 7, 32))


@pytest.mark.parametrize("arch", list(ARCHS))
def test_every_arch_exports_every_format_with_parity(arch, cifar_subset, tmp_path):
    real = cifar_subset(5, offset=2000)  # 50 real JPEGs
    ckpt = make_checkpoint(tmp_path / "run" / "best.pt", arch, CLASSES, size=32)
    n_real, batch_sizes = PARITY.get(arch, SMALLER)
    result = export_checkpoint(ckpt, formats=("all",), verify_data=real, parity_images=n_real,
                               random_batch_sizes=batch_sizes)
    out = ckpt.parent / "export"
    assert sorted(p.name for p in out.iterdir()) == ["model.onnx", "model.pt2", "model.torchscript.pt", "parity.json"]
    doc = json.loads(result.paths["parity"].read_text())
    assert doc["inputs"]["real"]["count"] == n_real
    assert doc["inputs"]["random"]["batch_sizes"] == list(batch_sizes)
    backends = {r["backend"] for r in doc["results"]}
    assert {"onnxruntime-cpu", "torchscript", "pt2"} <= backends
    assert all(r["max_abs"] <= 1e-4 and r["top1_agreement"] == 1.0 for r in doc["results"])
    meta = ort.InferenceSession(str(result.paths["onnx"]), providers=["CPUExecutionProvider"]).get_modelmeta()
    assert meta.custom_metadata_map["cnnx.arch"] == arch


# ATen ops some supported torch's ONNX exporter cannot translate (torch 2.11's dynamo exporter has
# no function for adaptive_max_pool2d: airnet's export failed there, on the GPU machine's torch).
UNTRANSLATED_BY_SOME_TORCH = {"aten.adaptive_max_pool2d.default"}


@pytest.mark.parametrize("arch", ["airnet", "seed-cnn", "seed-vgg", "resnet18-cifar"])
def test_the_cifar_archs_use_only_ops_every_supported_exporter_translates(arch):
    import torch

    from cnnx.train.zoo import create_model

    model = create_model(arch, 10).eval()
    program = torch.export.export(model, (torch.zeros(2, 3, 32, 32),))
    ops = {str(n.target) for n in program.run_decompositions().graph.nodes if n.op == "call_function"}
    assert not ops & UNTRANSLATED_BY_SOME_TORCH, ops & UNTRANSLATED_BY_SOME_TORCH
