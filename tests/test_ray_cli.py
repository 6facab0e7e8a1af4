"""`cnnx classify --engine ray` as a user runs it: a real `python -m cnnx` process, its exit
code and its stderr. Skipped until the command has the --engine option."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest
from PIL import Image

from tests._ray_util import read_errors, read_predictions
from tests._runtime_util import exported_model, photo_like

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return exported_model(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("images")
    for i in range(6):
        Image.fromarray(photo_like(40 + i, 50, seed=i)).save(root / f"img{i}.jpg", "JPEG", quality=90)
    (root / "empty.jpg").write_bytes(b"")
    return root


def cnnx(*args, timeout=180, preamble=""):
    code = textwrap.dedent(f"""
        import sys
        {preamble}
        from cnnx.cli import main
        sys.argv = ["cnnx", *{[str(a) for a in args]!r}]
        main()
    """) if preamble else None
    cmd = [sys.executable, "-c", code] if code else [sys.executable, "-m", "cnnx", *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def error_lines(stderr: str) -> list:
    return [line for line in stderr.splitlines() if line.startswith("Error:")]


def test_ray_engine_writes_parquet_parts(model, images, tmp_path):
    pytest.importorskip("ray.data", reason="Ray Data is not installed (pip install 'cnnx[ray]')")
    out = tmp_path / "preds.parquet"
    result = cnnx("classify", "--engine", "ray", images, "--model", model, "-o", str(out) + "/", "--num-workers", 1)
    assert result.returncode == 0, result.stderr
    assert [p for p, _, _ in read_predictions(out)] == [str(images / f"img{i}.jpg") for i in range(6)]
    assert read_errors(tmp_path / "preds.parquet.errors.csv") == [  # its own name kept: not preds.csv's
        (str(images / "empty.jpg"), "open", "empty file (0 bytes)")]
    assert "classified 6 images; skipped 1 (open: 1)" in result.stderr


def test_unreachable_address_exit_1(model, images, tmp_path):
    pytest.importorskip("ray.data", reason="Ray Data is not installed (pip install 'cnnx[ray]')")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    result = cnnx("classify", "--engine", "ray", images, "--model", model, "-o", tmp_path / "p.csv",
                  "--address", f"127.0.0.1:{port}", timeout=30)
    assert result.returncode == 1
    assert error_lines(result.stderr) == [f"Error: cannot reach the Ray cluster at 127.0.0.1:{port}: Connection "
                                          "refused (is `ray start --head` running there, and the port open?)"]
    assert "Traceback" not in result.stderr and not (tmp_path / "p.csv").exists()


def test_an_address_where_something_else_answers_is_one_line_not_an_endless_wait(model, images, tmp_path):
    """The dashboard's port (8265, which `ray job submit --address` takes), or any service that
    is not Ray's GCS: the TCP check passed and ray.init retried for ever (10 minutes seen)."""
    import http.server
    import threading

    pytest.importorskip("ray.data", reason="Ray Data is not installed (pip install 'cnnx[ray]')")
    server = http.server.HTTPServer(("127.0.0.1", 0), http.server.SimpleHTTPRequestHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        address = f"127.0.0.1:{server.server_address[1]}"
        result = cnnx("classify", "--engine", "ray", images, "--model", model, "-o", tmp_path / "p.csv",
                      "--address", address, timeout=60)
    finally:
        server.shutdown()
    assert result.returncode == 1, result.stderr[-2000:]
    assert error_lines(result.stderr) == [
        f"Error: {address} answers, but not as a Ray cluster's head does (its GCS speaks gRPC): pass the port of "
        "`ray start --head` (6379 unless --port), not the dashboard's (8265)"]


def test_ray_engine_that_could_read_nothing_fails_as_the_local_one_does(model, tmp_path):
    folder = tmp_path / "links"
    folder.mkdir()
    os.symlink(tmp_path / "nowhere.jpg", folder / "a.jpg")
    r = cnnx("classify", folder, "--model", model, "--engine", "ray", "-o", tmp_path / "p.csv")
    assert r.returncode == 1, r.stderr[-2000:]
    assert error_lines(r.stderr) == [f"Error: nothing under {folder} could be read: 1 path(s) failed before any "
                                     "image was opened (each is listed with its reason)"]


def test_ray_engine_ends_a_run_on_sigterm_as_terminated_not_with_a_native_crash(model, cifar_subset, tmp_path):
    """ray.init installs Ray's failure-signal handler: a SIGTERM (`ray job stop`, docker stop)
    printed a native stack dump and aborted (exit 134). The rows then stop at a whole one."""
    out = tmp_path / "p.csv"
    proc = subprocess.Popen([sys.executable, "-m", "cnnx", "classify", str(cifar_subset(500)), "--model", str(model),
                             "--engine", "ray", "--num-workers", "1", "--batch-size", "8", "-o", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    deadline = time.monotonic() + 120
    while not (out.exists() and out.stat().st_size > 1000):
        assert proc.poll() is None and time.monotonic() < deadline, "the run ended before any row came"
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _out, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-3000:]
    assert err.strip().splitlines()[-1] == "terminated" and "SIGTERM received" not in err, err[-3000:]
    assert out.read_text().endswith("\n")


def test_a_sigterm_while_ray_starts_ends_the_run_as_terminated_and_stops_what_it_started(model, images, tmp_path):
    """ray.init sets a SIGTERM handler of its own while it runs (sys.exit(15)): a SIGTERM then,
    once its GCS is up, ended the run with exit 15 and no line."""
    import psutil

    proc = subprocess.Popen([sys.executable, "-m", "cnnx", "classify", str(images), "--model", str(model), "--engine",
                             "ray", "--num-workers", "1", "-o", str(tmp_path / "p.csv")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    parent, deadline = psutil.Process(proc.pid), time.monotonic() + 120
    while not any(child.name().startswith("gcs_server") for child in _children(parent)):
        assert proc.poll() is None and time.monotonic() < deadline, "Ray's GCS never started"
        time.sleep(0.02)
    started = _children(parent)
    proc.send_signal(signal.SIGTERM)
    _out, err = proc.communicate(timeout=120)
    assert proc.returncode == 143 and err.strip() == "terminated", err[-3000:]
    assert not (tmp_path / "p.csv").exists()
    _gone, alive = psutil.wait_procs(started, timeout=30)
    assert not alive, alive


def _children(process):
    import psutil

    with contextlib.suppress(psutil.Error):
        return process.children(recursive=True)
    return []


def test_ray_engine_without_address_starts_its_own_ray_beside_a_head_that_ray_start_left(model, images, tmp_path):
    """ray.init(num_cpus=...) joins the cluster that `ray start --head` recorded on this machine,
    and refuses num_cpus for it: a 41-line traceback. Its record alone (here pointing nowhere)
    is what ray.init reads."""
    temp = Path(tempfile.mkdtemp(prefix="cr", dir="/tmp"))  # short: Ray's socket paths must fit 107 bytes
    try:
        (temp / "ray").mkdir()
        (temp / "ray" / "ray_current_cluster").write_text("127.0.0.1:1")
        r = subprocess.run([sys.executable, "-m", "cnnx", "classify", str(images), "--model", str(model), "--engine",
                            "ray", "--num-workers", "1", "-o", str(tmp_path / "p.csv")], capture_output=True, text=True,
                           timeout=300, cwd=ROOT, env={**os.environ, "TMPDIR": str(temp), "RAY_TMPDIR": str(temp)})
    finally:
        shutil.rmtree(temp, ignore_errors=True)
    assert r.returncode == 0, r.stderr[-3000:]
    assert len(read_predictions(tmp_path / "p.csv")) == 6


def test_a_model_with_its_weights_in_another_file_is_refused_by_the_ray_engine_in_one_line(images, tmp_path):
    """The actors get the .onnx file's bytes alone: they failed to load it, naming a temp folder
    of theirs. The local engine runs it (the data file beside it)."""
    import onnx
    from onnx import numpy_helper

    from tests._runtime_util import tiny_onnx_model

    one = tiny_onnx_model(tmp_path / "one.onnx")
    split = tmp_path / "split" / "model.onnx"
    split.parent.mkdir()
    proto = onnx.load(str(one))
    for t in proto.graph.initializer:  # the weights as raw bytes, which are what goes to an external file
        if t.name == "W":
            t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t), t.name))
    onnx.save(proto, str(split), save_as_external_data=True, all_tensors_to_one_file=True, location="weights.bin",
              size_threshold=0)
    assert (split.parent / "weights.bin").stat().st_size > 0
    result = cnnx("classify", images, "--model", split, "--engine", "ray", "-o", tmp_path / "p.csv")
    assert result.returncode == 1, result.stderr[-2000:]
    assert error_lines(result.stderr) == [
        f"Error: {split} keeps its weights in other files (weights.bin), and the Ray engine sends the model file "
        "alone to its workers: save it as one file (onnx.save(model, path, save_as_external_data=False); cnnx "
        "export writes one), or classify with --engine local"]
    assert cnnx("classify", images, "--model", split, "-o", tmp_path / "q.csv").returncode == 0


def test_external_data_is_found_in_subgraphs_and_constant_nodes_too():
    """contract.external_data_files read the main graph's initializers only: a model keeping an
    If branch's initializer or a Constant node's value in another file went to the actors."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper
    from onnx.external_data_helper import convert_model_to_external_data

    from cnnx.runtime.contract import external_data_files

    weights = numpy_helper.from_array(np.ones((64, 64), np.float32), "branch_w")
    then_g = helper.make_graph([helper.make_node("Identity", ["branch_w"], ["a"])], "then", [],
                               [helper.make_tensor_value_info("a", TensorProto.FLOAT, [64, 64])], [weights])
    const = numpy_helper.from_array(np.zeros((64, 64), np.float32), "constant_w")
    else_g = helper.make_graph([helper.make_node("Constant", [], ["b"], value=const)], "else", [],
                               [helper.make_tensor_value_info("b", TensorProto.FLOAT, [64, 64])])
    main = helper.make_graph([helper.make_node("If", ["cond"], ["y"], then_branch=then_g, else_branch=else_g)], "main",
                             [helper.make_tensor_value_info("cond", TensorProto.BOOL, [])],
                             [helper.make_tensor_value_info("y", TensorProto.FLOAT, [64, 64])])
    model = helper.make_model(main)
    assert external_data_files(model.SerializeToString()) == []
    convert_model_to_external_data(model, all_tensors_to_one_file=False, size_threshold=0, convert_attribute=True)
    assert sorted(external_data_files(model.SerializeToString())) == ["branch_w", "constant_w"]


def test_ray_missing_exit_1(model, images, tmp_path):
    result = cnnx("classify", "--engine", "ray", images, "--model", model, "-o", tmp_path / "p.csv",
                  preamble='sys.modules["ray"] = None  # `import ray` fails as where Ray is not installed')
    assert result.returncode == 1, result.stderr
    assert error_lines(result.stderr) == [
        "Error: --engine ray needs Ray Data, which is not installed: pip install 'cnnx[ray]'"]


def test_ray_options_need_engine_ray(model, images, tmp_path):
    result = cnnx("classify", images, "--model", model, "-o", tmp_path / "p.csv", "--num-workers", 2)
    assert result.returncode == 2
    assert error_lines(result.stderr) == ["Error: --num-workers: only with --engine ray"]


def test_options_of_one_engine_are_refused_by_the_other_never_ignored(model, images, tmp_path):
    # Before Ray starts: the local engine's decoding options, and a --format beside a Parquet output.
    result = cnnx("classify", "--engine", "ray", images, "--model", model, "-o", tmp_path / "p.csv",
                  "--workers", 7, "--decode", "processes")
    assert result.returncode == 2, result.stderr
    assert error_lines(result.stderr) == ["Error: --workers 7, --decode processes: only with --engine local"]
    # their values that Ray runs with pass (scripts give them): the next check is what stops this one
    result = cnnx("classify", "--engine", "ray", images, "--model", model, "-o", tmp_path / "p.csv",
                  "--workers", 0, "--decode", "auto", "--decoder", "cpu", "--report", tmp_path / "r.html")
    assert error_lines(result.stderr) == ["Error: --report is not available with --engine ray"]
    result = cnnx("classify", "--engine", "ray", images, "--model", model, "-o", tmp_path / "p.parquet",
                  "--format", "jsonl")
    assert result.returncode == 2, result.stderr
    assert error_lines(result.stderr) == [f"Error: --format jsonl: --output {tmp_path / 'p.parquet'} names a folder "
                                          "of Parquet part files (a file's name gets --format's rows)"]
    # The local engine writes no Parquet: a name that asks for it is refused, not given CSV text.
    for name in ("p.parquet", "new/"):
        out = f"{tmp_path}/{name}"
        result = cnnx("classify", images, "--model", model, "-o", out)
        assert result.returncode == 2, result.stderr
        assert error_lines(result.stderr) == [f"Error: --output {out} names a folder of Parquet part files: give a "
                                              "file (Parquet folders need --engine ray)"]
    assert list(tmp_path.iterdir()) == []
