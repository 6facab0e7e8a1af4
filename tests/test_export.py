"""cnnx export on a briefly-trained seed-cnn: the ONNX contract, TorchScript / pt2 / fp16 / int8,
the parity gate (passing on real images, failing on a real model that disagrees), cnnx info."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from click.testing import CliRunner

from _export_util import decode_folder, eager_logits, make_checkpoint, with_held_out_digest
import cnnx
from cnnx.cli import cli
from cnnx.export.api import export_checkpoint
from cnnx.export.errors import ParityError
from cnnx.export.parity import BOUNDS

CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


@pytest.fixture(scope="module")
def trained(cifar_subset, tmp_path_factory):
    """A seed-cnn trained for a few steps on 50 JPEGs per class (images 0..49)."""
    return make_checkpoint(tmp_path_factory.mktemp("run") / "best.pt", "seed-cnn", CLASSES,
                           train_dir=cifar_subset(50))


@pytest.fixture(scope="module")
def verify_dir(cifar_subset):
    """30 other JPEGs per class (images 1000..1029): the parity images."""
    return cifar_subset(30, offset=1000)


@pytest.fixture(scope="module")
def exported(trained, verify_dir):
    """Every format and both variants, written to the default folder beside the checkpoint."""
    return export_checkpoint(trained, formats=("all",), verify_data=verify_dir, fp16=True, int8=True)


def _sha256(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_onnx_is_one_checked_file_with_the_contract(exported, trained):
    out = trained.parent / "export"
    assert exported.out_dir == out
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["model.onnx", "model.fp16.onnx", "model.int8.onnx", "model.torchscript.pt", "model.pt2", "parity.json"])
    path = out / "model.onnx"
    onnx.checker.check_model(str(path), full_check=True)  # one file: external data would fail here
    model = onnx.load(str(path), load_external_data=False)
    assert not any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer)
    onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True)
    (inp,), (outp,) = model.graph.input, model.graph.output
    assert inp.name == "images" and inp.type.tensor_type.elem_type == onnx.TensorProto.UINT8
    dims = inp.type.tensor_type.shape.dim
    assert dims[0].dim_param and [d.dim_value for d in dims[1:]] == [3, 32, 32]
    assert outp.name == "logits" and outp.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    meta = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).get_modelmeta().custom_metadata_map
    assert json.loads(meta["cnnx.class_names"]) == CLASSES
    spec = json.loads(meta["cnnx.preprocess"])
    assert spec["size"] == [32, 32] and spec["mean"] == pytest.approx([0.4914, 0.4822, 0.4465])
    assert meta["cnnx.arch"] == "seed-cnn" and meta["cnnx.version"]
    assert meta["cnnx.checkpoint_sha256"] == _sha256(trained)


def test_onnx_matches_eager_on_real_images_at_any_batch(exported, trained, verify_dir):
    x, y = decode_folder(verify_dir, json.loads(json.dumps(torch.load(trained, weights_only=True)["preprocess"])), CLASSES)
    ref = eager_logits(trained, x)
    sess = ort.InferenceSession(str(exported.paths["onnx"]), providers=["CPUExecutionProvider"])
    for b in (1, 7, len(x)):
        got = np.concatenate([sess.run(None, {"images": x[i:i + b]})[0] for i in range(0, len(x), b)])
        assert np.abs(got - ref).max() <= 1e-4
        assert (got.argmax(1) == ref.argmax(1)).all()
    # the briefly-trained model is better than chance, so top-1 agreement is a real check
    assert (ref.argmax(1) == y).mean() > 0.2


def test_torchscript_and_pt2_same_numbers_and_metadata(exported, trained, verify_dir):
    x, _ = decode_folder(verify_dir, torch.load(trained, weights_only=True)["preprocess"], CLASSES)
    x = x[::10]
    ref = eager_logits(trained, x)
    extra = {"cnnx.json": ""}
    ts = torch.jit.load(str(exported.paths["torchscript"]), _extra_files=extra)  # tests may load; cnnx/ never does
    meta = json.loads(extra["cnnx.json"])
    assert meta["cnnx.class_names"] == CLASSES and meta["cnnx.checkpoint_sha256"] == _sha256(trained)
    extra2 = {"cnnx.json": ""}
    prog = torch.export.load(str(exported.paths["pt2"]), extra_files=extra2)
    assert json.loads(extra2["cnnx.json"]) == meta
    with torch.no_grad():
        for b in (1, 7):
            assert torch.equal(ts(torch.from_numpy(x[:b])), torch.from_numpy(ref[:b])) or \
                np.abs(ts(torch.from_numpy(x[:b])).numpy() - ref[:b]).max() <= 1e-4
        assert np.abs(prog.module()(torch.from_numpy(x)).numpy() - ref).max() <= 1e-4


def test_parity_json_reports_every_backend_and_input_set(exported):
    doc = json.loads(exported.paths["parity"].read_text())
    assert doc["arch"] == "seed-cnn" and doc["bounds"]["fp32"] == {"max_abs": 1e-4, "min_top1": 1.0}
    assert sorted(doc["files"].values()) == sorted(p.name for p in exported.paths.values() if p.name != "parity.json")
    assert doc["inputs"]["real"]["count"] == 300 and doc["inputs"]["real"]["labelled"] is True
    rows = {(r["backend"], r["inputs"]): r for r in doc["results"]}
    for be in ("onnxruntime-cpu", "torchscript", "pt2", "onnxruntime-cpu fp16", "onnxruntime-cpu int8"):
        for inputs in ("real", "random b=1", "random b=7", "random b=256"):
            assert (be, inputs) in rows, (be, inputs)
    for (be, inputs), r in rows.items():
        assert r["n"] == {"real": 300, "random b=1": 1, "random b=7": 7, "random b=256": 256}[inputs]
        if r["variant"] == "fp32":
            assert r["gated"] and r["max_abs"] <= 1e-4 and r["top1_agreement"] == 1.0
    for be, variant in (("onnxruntime-cpu fp16", "fp16"), ("onnxruntime-cpu int8", "int8")):
        r = rows[(be, "real")]
        assert r["gated"] and r["top1_agreement"] >= BOUNDS[variant].min_top1
        assert r["accuracy"] is not None and r["accuracy_change"] == pytest.approx(r["accuracy"] - doc["eager_accuracy"])
        assert not rows[(be, "random b=256")]["gated"]  # noise inputs are reported, not gated
    assert set(doc["export_seconds"]) == {"onnx", "torchscript", "pt2", "onnx-fp16", "onnx-int8"}
    written = onnx.load(str(exported.paths["onnx"]), load_external_data=False).opset_import
    assert doc["opset"] == next(o.version for o in written if o.domain in ("", "ai.onnx"))  # not null: --opset unset


def test_fp16_and_int8_variants_keep_uint8_input_and_metadata(exported, trained):
    m16 = onnx.load(str(exported.paths["onnx-fp16"]))
    assert m16.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.UINT8
    assert m16.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    big = [t for t in m16.graph.initializer if len(t.dims) >= 2]
    assert big and all(t.data_type == onnx.TensorProto.FLOAT16 for t in big)
    m8 = onnx.load(str(exported.paths["onnx-int8"]))
    assert m8.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.UINT8
    ops = [n.op_type for n in m8.graph.node]
    assert "QuantizeLinear" in ops and "DequantizeLinear" in ops
    assert ops[:3] == ["Cast", "Mul", "Sub"] or ops.index("Sub") < ops.index("QuantizeLinear")
    for m, variant in ((m16, "fp16"), (m8, "int8")):
        props = {p.key: p.value for p in m.metadata_props}
        assert props["cnnx.variant"] == variant and json.loads(props["cnnx.class_names"]) == CLASSES
        assert props["cnnx.checkpoint_sha256"] == _sha256(trained)
    x = np.random.default_rng(3).integers(0, 256, (5, 3, 32, 32), dtype=np.uint8)
    for key in ("onnx-fp16", "onnx-int8"):
        s = ort.InferenceSession(str(exported.paths[key]), providers=["CPUExecutionProvider"])
        assert s.run(None, {"images": x})[0].shape == (5, 10)
    # what an older runtime reads them by: only the operator sets their nodes use (int8's
    # pre-processing declared all of onnxruntime's, its internal ones too), and the IR version
    # those need (the exporter stamps its newest): onnxruntime 1.17 refused all three before
    for key in ("onnx", "onnx-fp16", "onnx-int8"):
        m = onnx.load(str(exported.paths[key]))
        assert {o.domain for o in m.opset_import} == {n.domain for n in m.graph.node} | {""}, key
        assert m.ir_version == onnx.helper.find_min_ir_version_for(list(m.opset_import), ignore_unknown=True), key
        # nor the exporter's notes (IR 10 fields): its fx nodes and Python stacks, with this machine's paths
        assert not m.graph.metadata_props and not any(n.metadata_props for n in m.graph.node), key
        assert not any(v.metadata_props for v in (*m.graph.value_info, *m.graph.initializer)), key
        assert os.fsencode(Path(cnnx.__file__).parent) not in exported.paths[key].read_bytes(), key
    pt2 = zipfile.ZipFile(exported.paths["pt2"])  # its nodes' Python stacks dropped too
    assert not [n for n in pt2.namelist() if os.fsencode(Path(cnnx.__file__).parent) in pt2.read(n)]


@pytest.mark.parametrize("opset,ir", [(18, 8), (20, 9), (23, 11)])
def test_a_saved_model_declares_the_ir_version_its_opset_needs_and_only_the_domains_it_uses(tmp_path, opset, ir):
    from onnx import helper

    from cnnx.export.onnx import save_model

    inner = helper.make_graph([helper.make_node("Neg", ["x"], ["y"])], "inner", [],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])])
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["r"]),
         helper.make_node("If", ["c"], ["y"], then_branch=inner, else_branch=inner)], "g",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1]),
         helper.make_tensor_value_info("c", onnx.TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])])
    unused = [helper.make_opsetid("ai.onnx.ml", 5), helper.make_opsetid("com.microsoft.nchwc", 1)]
    model = helper.make_model(graph, ir_version=10, opset_imports=[helper.make_opsetid("", opset), *unused])
    save_model(model, tmp_path / "m.onnx")
    saved = onnx.load(str(tmp_path / "m.onnx"))
    assert saved.ir_version == ir and [(o.domain, o.version) for o in saved.opset_import] == [("", opset)]
    onnx.checker.check_model(saved, full_check=True)
    if opset <= 20:  # what the installed onnxruntime's CPU provider has kernels for in every case
        out = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"]).run(
            None, {"x": np.array([2.0], np.float32), "c": np.array(True)})
        assert out[0].tolist() == [-2.0]


def test_gate_refuses_a_real_model_that_disagrees(exported, trained, verify_dir, tmp_path, monkeypatch):
    """An exporter bug simulated for real: the ONNX file written is the model with its last bias
    shifted by 1e-3, so onnxruntime runs a real, slightly wrong model. The export must fail,
    say which backend and by how much, and leave the previous export untouched."""
    import cnnx.export.onnx as onnx_mod

    real_export = onnx_mod.export_onnx

    def export_shifted(module, example, path, **kw):
        with torch.no_grad():
            module.model.classifier[-1].bias += 1e-3
        try:
            return real_export(module, example, path, **kw)
        finally:
            with torch.no_grad():
                module.model.classifier[-1].bias -= 1e-3

    monkeypatch.setattr(onnx_mod, "export_onnx", export_shifted)
    out = tmp_path / "export"
    out.mkdir()
    shutil.copy(exported.paths["onnx"], out / "model.onnx")  # a previous export
    previous = (out / "model.onnx").read_bytes()
    with pytest.raises(ParityError) as e:
        export_checkpoint(trained, out, ("onnx",), verify_data=verify_dir)
    msg = str(e.value)
    assert "onnxruntime-cpu" in msg and "max abs logit difference" in msg and "1e-04" not in msg
    assert float(msg.split("difference ")[1].split()[0]) == pytest.approx(1e-3, rel=0.01)
    assert sorted(os.listdir(out)) == ["model.onnx"] and (out / "model.onnx").read_bytes() == previous

    r = CliRunner().invoke(cli, ["export", str(trained), "--out", str(out), "--verify-data", str(verify_dir)])
    assert r.exit_code == 1
    assert "parity gate failed: onnxruntime-cpu" in r.stderr and "FAIL" in r.stderr
    assert r.stdout == "" and sorted(os.listdir(out)) == ["model.onnx"]


def test_cli_defaults_to_newest_run(trained, verify_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs" / "old").mkdir(parents=True)
    (tmp_path / "runs" / "new").mkdir(parents=True)
    old, new = tmp_path / "runs/old/best.pt", tmp_path / "runs/new/best.pt"
    old.write_bytes(trained.read_bytes())
    new.write_bytes(trained.read_bytes())
    os.utime(old, (1, 1))
    r = CliRunner().invoke(cli, ["export", "--verify-data", str(verify_dir), "--parity-images", "50"])
    assert r.exit_code == 0, r.stderr
    assert "runs/new/best.pt" in r.stderr and "parity gate passed" in r.stderr
    assert r.stdout.split() == ["runs/new/export/model.onnx", "runs/new/export/parity.json"]
    assert not (tmp_path / "runs/old/export").exists()
    assert not [p for p in (tmp_path / "runs/new/export").iterdir() if p.name.startswith(".")]
    assert "note:" not in r.stderr


def test_the_newest_run_picked_is_said_to_be_still_training_or_dated_in_the_future(tmp_path):
    """`cnnx export` with no CHECKPOINT exported a run still training (its best.pt so far) and a
    best.pt dated in the future (unpacked from elsewhere) for ever after, without a word."""
    import fcntl
    import time

    from cnnx.export.command import newest_checkpoint, newest_checkpoint_notes
    from cnnx.train.run import LOCK_NAME

    (tmp_path / "runs" / "live").mkdir(parents=True)
    live = tmp_path / "runs" / "live" / "best.pt"
    live.write_bytes(b"")
    now = time.time()
    assert newest_checkpoint_notes(live, now) == []
    fd = os.open(tmp_path / "runs" / "live" / LOCK_NAME, os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)  # as cnnx train holds its run folder
    try:
        assert newest_checkpoint_notes(live, now) == [f"{live.parent} is still training: this is its best checkpoint "
                                                      "so far"]
    finally:
        os.close(fd)
    assert newest_checkpoint_notes(live, now) == []  # a run that ended leaves its lock file, unlocked
    (tmp_path / "runs" / "old").mkdir()
    old = tmp_path / "runs" / "old" / "best.pt"
    old.write_bytes(b"")
    os.utime(old, (now + 86400 * 365, now + 86400 * 365))
    assert newest_checkpoint(tmp_path / "runs") == old
    notes = newest_checkpoint_notes(old, now)
    assert len(notes) == 1 and "is dated in the future" in notes[0] and "name the checkpoint" in notes[0]


def test_info_describes_each_format(exported):
    r = CliRunner().invoke(cli, ["info", str(exported.paths["onnx"])])
    assert r.exit_code == 0, r.output
    assert "images  uint8  [batch, 3, 32, 32]" in r.stdout and "logits  float32  [batch, 10]" in r.stdout
    assert "cnnx.class_names: 10 classes: airplane" in r.stdout and "CPUExecutionProvider: yes" in r.stdout
    r = CliRunner().invoke(cli, ["info", "--json", str(exported.paths["onnx-int8"])])
    d = json.loads(r.stdout)
    assert d["metadata"]["cnnx.variant"] == "int8" and d["metadata"]["cnnx.class_names"] == CLASSES
    for key, fmt in (("pt2", "pt2"), ("torchscript", "torchscript")):
        d = json.loads(CliRunner().invoke(cli, ["info", "--json", str(exported.paths[key])]).stdout)
        assert d["format"] == fmt and d["inputs"][0]["dtype"] == "uint8"
        assert d["metadata"]["cnnx.arch"] == "seed-cnn"


def test_info_never_imports_torch_and_refuses_non_models(exported, trained, tmp_path):
    code = ("import sys; from cnnx.cli import main\n"
            "try:\n    main(['info', sys.argv[1]])\nexcept SystemExit as e:\n    assert not e.code, e.code\n"
            "assert 'torch' not in sys.modules, 'torch imported'\n")
    out = subprocess.run([sys.executable, "-c", code, str(exported.paths["onnx"])], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(os.urandom(200))
    for path in (junk, trained):  # random bytes; a checkpoint (a zip without cnnx.json)
        r = CliRunner().invoke(cli, ["info", str(path)])
        assert r.exit_code == 1 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "is a training checkpoint (torch.save), not an exported model: `cnnx export" in r.stderr
    assert CliRunner().invoke(cli, ["info", str(tmp_path / "nope.onnx")]).exit_code == 2


def test_default_parity_images_are_the_runs_validation_split(trained, cifar_subset, tmp_path, monkeypatch):
    """A checkpoint this user's cnnx wrote, whose config names its data (as `cnnx train` writes
    it), is gated on that run's validation split, re-created through cnnx.train.data with the
    user's own cache (never the cache_dir stored in the checkpoint); no data: random only."""
    from cnnx.train.checkpoint import load_checkpoint, save_checkpoint

    import shutil

    from cnnx.train.data import SPLIT_BY_NAME

    monkeypatch.setenv("CNNX_CACHE", str(tmp_path / "my-cache"))
    ckpt = load_checkpoint(trained)
    data = tmp_path / "data"  # a copy: photos are added to it below
    shutil.copytree(cifar_subset(10, offset=3000), data)
    ckpt["config"] = {"data": str(data), "data_root": None, "cache_dir": str(tmp_path / "cache"),
                      "preprocess": ckpt["preprocess"], "val_fraction": 0.5, "split_seed": 0, "split": SPLIT_BY_NAME}
    ckpt["config"] = with_held_out_digest(ckpt["config"], tmp_path / "scratch")
    save_checkpoint(ckpt, tmp_path / "run" / "best.pt")
    result = export_checkpoint(tmp_path / "run" / "best.pt", tmp_path / "out", ("onnx",))
    real = json.loads(result.paths["parity"].read_text())["inputs"]["real"]
    assert real["source"].startswith("validation split of") and real["count"] == 50 and real["labelled"]
    assert 0 <= result.parity.eager_accuracy <= 100
    assert not (tmp_path / "cache").exists()

    # Photos added since the run: its held-out images cannot be told again (the re-drawn split
    # would score images it trained on as held out, its accuracy among the figures): random only.
    for c in ("cat", "dog"):
        for f in sorted((data / c).iterdir())[:3]:
            shutil.copyfile(f, data / c / f"new-{f.name}")
    result = export_checkpoint(tmp_path / "run" / "best.pt", tmp_path / "out3", ("onnx",))
    doc = json.loads(result.paths["parity"].read_text())
    assert doc["inputs"]["real"] is None and "held out cannot be told again" in doc["notes"][0], doc["notes"]
    assert "files added, removed or renamed since the run" in doc["notes"][0], doc["notes"]
    # a run whose cnnx did not record its held-out files: said so, not "files added"
    ckpt["config"] = {k: v for k, v in ckpt["config"].items() if k not in ("val_files_sha256", "val_relpaths_sha256")}
    save_checkpoint(ckpt, tmp_path / "old-run" / "best.pt")
    doc = json.loads(export_checkpoint(tmp_path / "old-run" / "best.pt", tmp_path / "out4",
                                       ("onnx",)).paths["parity"].read_text())
    assert doc["inputs"]["real"] is None and "the cnnx that ran it did not record them" in doc["notes"][0], doc

    ckpt["config"] = {}
    save_checkpoint(ckpt, tmp_path / "run2" / "best.pt")
    result = export_checkpoint(tmp_path / "run2" / "best.pt", tmp_path / "out2", ("onnx",))
    doc = json.loads(result.paths["parity"].read_text())
    assert doc["inputs"]["real"] is None and "random uint8 inputs only" in doc["notes"][0]
    assert {r["inputs"] for r in doc["results"]} == {"random b=1", "random b=7", "random b=256"}


def test_verify_data_of_cnnx_trains_split_layout_uses_its_val_folder(trained, cifar_subset, tmp_path):
    """--verify-data DIR with DIR/{train,val}/<class>/* (a layout `cnnx train --data` takes):
    train/ and val/ were taken as two unknown classes, every image unlabelled, no accuracy."""
    import shutil

    data = tmp_path / "d"
    shutil.copytree(cifar_subset(2, offset=1100), data / "train")
    shutil.copytree(cifar_subset(3, offset=1200), data / "val")
    said = []
    result = export_checkpoint(trained, tmp_path / "out", ("onnx",), verify_data=data, log=said.append)
    real = json.loads(result.paths["parity"].read_text())["inputs"]["real"]
    assert real["count"] == 30 and real["labelled"], real
    assert any("split layout): the images of val/ are used" in s for s in said), said
    assert 0 <= result.parity.eager_accuracy <= 100
