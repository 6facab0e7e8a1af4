"""The GPU path of `cnnx classify` (issue 8), tested where it can be: the IOBinding runner with
two batches in flight runs on the CPU provider here (same code, host memory bound as 'cpu')
and must give session.run's logits bit for bit, in order; the fp16 export variant runs
through it; --device cuda / tensorrt that cannot run is one line naming the cause; the
TensorRT provider options. Tests that need CUDA or TensorRT skip without them."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from cnnx.cli import cli
from cnnx.runtime import cuda
from cnnx.runtime.contract import cuda_driver_present
from cnnx.runtime.files import sha256_of
from tests._runtime_util import make_onnx_model, tiny_onnx_model

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def conv_model(tmp_path_factory) -> Path:
    # A real convolutional net (seed-cnn, seeded weights) of the contract, 32x32.
    return make_onnx_model(tmp_path_factory.mktemp("gpu-models") / "model.onnx")


@pytest.fixture(scope="module")
def fp16_model(conv_model) -> Path:
    """The exporter's own fp16 variant of conv_model (cnnx.export.quantize.to_fp16)."""
    import onnx

    from cnnx.export.quantize import to_fp16

    props = {p.key: p.value for p in onnx.load(str(conv_model)).metadata_props}
    meta = {k: json.loads(v) if v[:1] in "[{" else v for k, v in props.items()}
    dst = conv_model.with_name("model.fp16.onnx")
    to_fp16(conv_model, dst, meta=meta)
    return dst


def cpu_session(path):
    import onnxruntime as ort

    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def batches(n, batch_size, size=32, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (batch_size, 3, size, size), dtype=np.uint8) for _ in range(n)]


def run_cli(args):
    return CliRunner().invoke(cli, ["classify", *map(str, args)], catch_exceptions=False)


# --- the IOBinding runner ----------------------------------------------------------------------

@pytest.mark.parametrize("stop_early", [False, True])
def test_the_gil_switch_interval_is_short_while_batches_run_and_restored_after(conv_model, stop_early):
    import sys

    from cnnx.runtime.binding import GIL_SWITCH_S, BoundRunner

    before = sys.getswitchinterval()
    assert before > GIL_SWITCH_S  # Python's default, 5 ms
    jobs = batches(4, 16)
    runner = BoundRunner(cpu_session(conv_model), "images", "logits", 16, (32, 32), slots=2)
    try:
        seen = []
        runs = runner.run_in_order(range(len(jobs)), lambda i: jobs[i])
        for _ in runs:
            seen.append(sys.getswitchinterval())
            if stop_early:
                runs.close()
                break
    finally:
        runner.close()
    assert seen and all(s == GIL_SWITCH_S for s in seen)
    assert sys.getswitchinterval() == before


def test_bound_runs_give_session_run_logits_bit_for_bit_in_order(conv_model):
    from cnnx.runtime.binding import BoundRunner

    session = cpu_session(conv_model)
    jobs = batches(7, 16)
    runner = BoundRunner(session, "images", "logits", 16, (32, 32), slots=2)
    try:
        got = list(runner.run_in_order(range(len(jobs)), lambda i: jobs[i]))
    finally:
        runner.close()
    assert [i for i, _ in got] == list(range(7))
    for i, logits in got:
        want = session.run(["logits"], {"images": jobs[i]})[0]
        assert logits.dtype == want.dtype and np.array_equal(logits, want), i
    # Distinct batches give distinct logits, so a result handed to the wrong job would show.
    assert not np.array_equal(got[0][1], got[1][1])


@pytest.mark.parametrize("slots", [1, 2, 3])
def test_borrowed_images_are_copied_before_the_next_job_is_taken(conv_model, slots):
    """run_in_order copies a job's images into its slot, and must have done so before it takes
    the next job: here every job lends one buffer, spoilt the moment the next is asked for (as
    procdecode reuses a lent slot), so a copy made late would run the spoilt pixels."""
    from cnnx.runtime.binding import BoundRunner

    session = cpu_session(conv_model)
    want = batches(9, 8, seed=3)
    lent = np.empty_like(want[0])

    def jobs():
        for i, images in enumerate(want):
            lent[:] = images
            yield i
            lent[:] = 255  # the slot taken back and refilled

    runner = BoundRunner(session, "images", "logits", 8, (32, 32), slots=slots)
    try:
        got = list(runner.run_in_order(jobs(), lambda i: lent))
    finally:
        runner.close()
    assert [i for i, _ in got] == list(range(len(want)))
    for i, logits in got:
        assert np.array_equal(logits, session.run(["logits"], {"images": want[i]})[0]), i


def test_a_failed_run_is_raised_in_its_place_and_close_ends_every_slots_thread(conv_model, monkeypatch):
    """Batch 3's run fails: the 3 batches before it come out first, then its error, in the
    caller's thread; the runs started after it are waited for, and close() ends each slot's
    thread. (Which batch fails is told by its pixels: the slots' threads run in any order.)"""
    from cnnx.runtime.binding import BoundRunner, BoundSlot, RunFailed

    real, calls = BoundSlot.run, []

    def run(self, session, upload=True):
        calls.append(1)
        if self.host.array.flat[0] == 3:
            raise RunFailed("out of memory")
        return real(self, session, upload)

    monkeypatch.setattr(BoundSlot, "run", run)
    want = [np.full((8, 3, 32, 32), i, np.uint8) for i in range(6)]
    runner = BoundRunner(cpu_session(conv_model), "images", "logits", 8, (32, 32), slots=3)
    threads, got = list(runner._threads), []
    try:
        with pytest.raises(RunFailed, match="out of memory"):
            for i, _logits in runner.run_in_order(range(6), lambda i: want[i]):
                got.append(i)
    finally:
        runner.close()
    assert got == [0, 1, 2]
    assert len(calls) == 6  # the two started after the failed one ran to their end
    assert len(threads) == 3 and not any(t.is_alive() for t in threads)


def test_close_from_another_thread_ends_a_run_that_had_batches_left(conv_model):
    """Classifier.close() from another thread while a run reads its next batch (the GPU path):
    the batch queued before the close still runs, the next one raises RunnerClosed at once (it
    was queued to a slot whose thread had ended, and waited for ever)."""
    import threading

    from cnnx.runtime.binding import BoundRunner, RunnerClosed

    session = cpu_session(conv_model)
    want = batches(4, 8, seed=7)
    runner = BoundRunner(session, "images", "logits", 8, (32, 32), slots=2)
    threads = list(runner._threads)
    asked, go, got, raised = threading.Event(), threading.Event(), [], []

    def jobs():
        yield 0
        asked.set()
        go.wait()  # the reader is inside run_in_order, waiting for its next batch, as close() runs
        yield from (1, 2, 3)

    def read():
        try:
            for i, _logits in runner.run_in_order(jobs(), lambda i: want[i]):
                got.append(i)
        except RunnerClosed as e:
            raised.append(e)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    assert asked.wait(30)
    runner.close()
    go.set()
    reader.join(30)
    assert not reader.is_alive(), "the run waited for ever on a slot whose thread had ended"
    assert len(raised) == 1 and got == []  # batch 0 waited in its slot for a second one
    assert not any(t.is_alive() for t in threads)


def test_a_result_nobody_took_is_never_given_for_a_later_batch(conv_model):
    """A consumer interrupted while it waited (Ctrl-C in a notebook) leaves its run's result in
    the slot's queue; the next run_in_order drops it by its ticket and gives each batch its own
    logits."""
    from cnnx.runtime.binding import BoundRunner

    session = cpu_session(conv_model)
    want = batches(4, 8, seed=5)
    runner = BoundRunner(session, "images", "logits", 8, (32, 32), slots=2)
    try:
        for slot in runner._slots:  # what an interrupted wait leaves behind
            slot.done.put((-1, True, np.zeros((8, 10), np.float32)))
        got = list(runner.run_in_order(range(4), lambda i: want[i]))
    finally:
        runner.close()
    for i, logits in got:
        assert np.array_equal(logits, session.run(["logits"], {"images": want[i]})[0]), i


def test_a_slot_runs_its_device_buffer_which_each_run_refreshes_from_the_host(conv_model):
    """IOBinding copies an input that is not on the session's device when it is *bound*, so a
    host buffer bound once would be read once (on CUDA every batch then ran the first one's
    pixels). The slot binds a buffer on the session's device and copies the host buffer into
    it at each run: what the model reads is that buffer, never the host memory in place."""
    from cnnx.runtime.binding import BoundSlot

    session = cpu_session(conv_model)
    a, b = batches(2, 4, seed=5)
    slot = BoundSlot(session, "images", "logits", a.shape, pinned=False)
    assert slot.device_input.data_ptr() != slot.host.array.ctypes.data
    slot.host.array[:] = a
    want_a = session.run(["logits"], {"images": a})[0]
    assert np.array_equal(slot.run(session), want_a)
    slot.host.array[:] = b
    assert np.array_equal(slot.run(session, upload=False), want_a)  # the device buffer still holds a
    assert np.array_equal(slot.run(session), session.run(["logits"], {"images": b})[0])


def test_jobs_without_images_keep_their_place_and_are_not_run(conv_model):
    from cnnx.runtime.binding import BoundRunner

    session = cpu_session(conv_model)
    jobs = [None, *batches(3, 4, seed=1), None, None, *batches(1, 4, seed=2)]
    runner = BoundRunner(session, "images", "logits", 4, (32, 32), slots=2)
    try:
        got = list(runner.run_in_order(range(len(jobs)), lambda i: jobs[i]))
    finally:
        runner.close()
    assert [i for i, _ in got] == list(range(len(jobs)))
    for i, logits in got:
        if jobs[i] is None:
            assert logits is None
        else:
            assert np.array_equal(logits, session.run(["logits"], {"images": jobs[i]})[0])


def test_a_batch_of_the_wrong_shape_is_refused(conv_model):
    from cnnx.runtime.binding import BoundRunner

    runner = BoundRunner(cpu_session(conv_model), "images", "logits", 4, (32, 32))
    try:
        with pytest.raises(ValueError, match="expected uint8"):
            list(runner.run_in_order([0], lambda _: np.zeros((3, 3, 32, 32), np.uint8)))
    finally:
        runner.close()


@pytest.mark.skipif(cuda_driver_present(), reason="this machine has an NVIDIA driver")
def test_pinned_buffers_fall_back_to_pageable_memory_without_a_gpu():
    from cnnx.runtime.binding import HostBuffer

    buf = HostBuffer((2, 3, 8, 8), pinned=True)
    assert buf.kind == "pageable" and buf.array.shape == (2, 3, 8, 8) and buf.array.dtype == np.uint8
    buf.array[:] = 7
    assert int(buf.array.sum()) == 7 * 2 * 3 * 8 * 8
    buf.close()


# --- Classifier / cnnx classify through the runner -------------------------------------------------

def test_classify_rows_are_the_same_with_two_batches_in_flight(conv_model, cifar_subset, tmp_path):
    from cnnx.runtime import Classifier

    folder = tmp_path / "images"  # a copy: the session's cifar_subset folders are shared by other tests
    shutil.copytree(cifar_subset(3), folder)  # 30 files + 1 broken: 8 batches of 4, the last one padded
    (folder / "cat" / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    with Classifier(conv_model, "cpu", batch_size=4, topk=3) as plain:
        assert plain.runner is None and plain.host_memory is None  # the CPU keeps its loop
        want = list(plain.classify([folder]))
    with Classifier(conv_model, "cpu", batch_size=4, topk=3, io_binding=True) as bound:
        assert bound.host_memory == "pageable"
        got = list(bound.classify([folder]))
    assert got == want
    assert len(got) == 31 and [r.path for r in got] == sorted(r.path for r in got)


def test_a_model_giving_one_row_per_batch_is_refused_on_the_bound_path_too(cifar_subset, tmp_path):
    from cnnx.runtime import Classifier, ModelError

    model = tiny_onnx_model(tmp_path / "reduced.onnx", batch_out="first-row")
    with Classifier(model, "cpu", batch_size=4, io_binding=True) as clf:
        with pytest.raises(ModelError, match="not one row per image"):
            list(clf.classify([cifar_subset(1)]))


def test_fp16_variant_runs_through_the_binding_with_float32_logits(conv_model, fp16_model, cifar_subset):
    from cnnx.runtime import Classifier, Prediction

    outputs = cpu_session(fp16_model).get_outputs()
    assert outputs[0].type == "tensor(float)"  # keep_io_types: float16 inside, float32 logits out
    folder = cifar_subset(2)
    with Classifier(fp16_model, "cpu", batch_size=8, io_binding=True) as half, \
            Classifier(fp16_model, "cpu", batch_size=8) as half_plain, Classifier(conv_model, "cpu", batch_size=8) as full:
        x = batches(1, 8)[0]
        logits = half.predict(x)
        assert logits.dtype == np.float32
        assert np.array_equal(logits, cpu_session(fp16_model).run(["logits"], {"images": x})[0])
        rows_half = list(half.classify([folder]))
        assert rows_half == list(half_plain.classify([folder]))
        rows_full = list(full.classify([folder]))
    top1 = [(a.indices[0], b.indices[0]) for a, b in zip(rows_half, rows_full)
            if isinstance(a, Prediction) and isinstance(b, Prediction)]
    assert len(top1) == 20
    # fp16 inside, but the same decisions on nearly every image (the export gate asks 99.5%).
    assert sum(a == b for a, b in top1) >= 19


# --- devices that cannot run: one line naming the cause -----------------------------------------

def one_line(r):
    assert r.exit_code == 1, (r.exit_code, r.stderr)
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in r.stderr + r.stdout, r.stderr
    return lines[0]


@pytest.mark.skipif(cuda.diagnose().usable, reason="CUDA runs here")
def test_device_cuda_that_cannot_run_names_the_diagnosed_cause(conv_model, cifar_subset, tmp_path):
    out = tmp_path / "p.csv"
    line = one_line(run_cli([cifar_subset(1), "--model", conv_model, "--device", "cuda", "-o", out]))
    assert line == f"Error: --device cuda: {cuda.diagnose().reason}"
    assert not out.exists()  # never a silent CPU run


@pytest.mark.skipif(cuda.diagnose_tensorrt().usable, reason="TensorRT runs here")
def test_device_tensorrt_that_cannot_run_names_the_diagnosed_cause(conv_model, cifar_subset, tmp_path):
    out = tmp_path / "p.csv"
    line = one_line(run_cli([cifar_subset(1), "--model", conv_model, "--device", "tensorrt", "-o", out]))
    assert line == f"Error: --device tensorrt: {cuda.diagnose_tensorrt().reason}"
    assert not out.exists()


def test_device_auto_without_cuda_stays_quiet_on_the_cpu(conv_model, cifar_subset):
    if cuda.diagnose().usable:
        pytest.skip("CUDA runs here")
    r = run_cli([cifar_subset(1), "--model", conv_model, "--device", "auto"])
    assert r.exit_code == 0 and "provider CPUExecutionProvider" in r.stderr
    assert sum(1 for line in r.stderr.splitlines() if line.strip()) == 1  # the summary only


def test_api_refuses_an_unknown_device_in_one_line(conv_model):
    from cnnx.runtime import Classifier, ModelError

    with pytest.raises(ModelError, match="unknown device 'tpu'; known: auto, cpu, cuda, tensorrt"):
        Classifier(conv_model, "tpu")


# --- TensorRT options ---------------------------------------------------------------------------

def test_tensorrt_options_cache_engines_by_model_gpu_and_batch(conv_model, tmp_path, monkeypatch):
    monkeypatch.setenv("CNNX_CACHE", str(tmp_path / "cache"))
    opts = cuda.tensorrt_options(conv_model, 64, (224, 200), gpu="nvidia-h100-80gb-hbm3-0123456789ab")
    sha = sha256_of(conv_model)
    folder = tmp_path / "cache" / "trt" / f"{sha[:16]}-nvidia-h100-80gb-hbm3-0123456789ab-b64"
    assert opts["trt_engine_cache_enable"] == "True" and opts["trt_engine_cache_path"] == str(folder)
    assert opts["trt_timing_cache_path"] == str(folder)
    assert opts["trt_fp16_enable"] == "False"
    assert (opts["trt_profile_min_shapes"], opts["trt_profile_opt_shapes"], opts["trt_profile_max_shapes"]) == (
        "images:1x3x224x200", "images:64x3x224x200", "images:64x3x224x200")
    # Another batch size is another engine, in its own folder (nothing rebuilt over it).
    assert cuda.tensorrt_options(conv_model, 128, (224, 200), gpu="g")["trt_engine_cache_path"].endswith("-g-b128")


def test_cache_root_follows_cnnx_cache_then_xdg(tmp_path, monkeypatch):
    from cnnx.runtime import files

    assert files.cache_root(tmp_path / "explicit") == tmp_path / "explicit"
    monkeypatch.delenv("CNNX_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert files.cache_root() == tmp_path / "xdg" / "cnnx"
    monkeypatch.setenv("CNNX_CACHE", str(tmp_path / "mine"))
    assert files.cache_root() == tmp_path / "mine"


def test_missing_tensorrt_libraries_are_named(monkeypatch):
    if cuda.load_tensorrt_libraries() is None:
        pytest.skip("TensorRT 10 loads here")
    # The wheel's folder does not hold them either: the first soname is the one named.
    assert cuda.load_tensorrt_libraries() == "libnvinfer.so.10"


# --- on a GPU (skipped here) ----------------------------------------------------------------------

@pytest.mark.skipif(not cuda.diagnose().usable, reason="onnxruntime's CUDA provider cannot run here")
def test_cuda_classify_runs_bound_with_pinned_buffers_and_agrees_with_the_cpu(conv_model, cifar_subset):
    from cnnx.runtime import Classifier, Prediction

    folder = cifar_subset(5)
    with Classifier(conv_model, "cuda", batch_size=16) as gpu, Classifier(conv_model, "cpu", batch_size=16) as cpu:
        assert gpu.provider == "CUDAExecutionProvider" and gpu.runner is not None
        assert gpu.host_memory.startswith("pinned"), gpu.host_memory
        # the options export's parity gate checks CUDA with: TF32 off (onnxruntime's default is on)
        assert gpu.session.get_provider_options()["CUDAExecutionProvider"]["use_tf32"] == "0"
        x = batches(1, 16)[0]
        assert np.allclose(gpu.predict(x), cpu.predict(x), atol=1e-3)
        on_gpu, on_cpu = list(gpu.classify([folder])), list(cpu.classify([folder]))
    assert [r.path for r in on_gpu] == [r.path for r in on_cpu]
    agree = sum(a.indices[0] == b.indices[0] for a, b in zip(on_gpu, on_cpu) if isinstance(a, Prediction))
    assert agree >= 49


@pytest.mark.skipif(not cuda.diagnose_tensorrt().usable, reason="onnxruntime's TensorRT provider cannot run here")
def test_tensorrt_classify_caches_its_engine(conv_model, cifar_subset, tmp_path, monkeypatch):
    from cnnx.runtime import Classifier

    monkeypatch.setenv("CNNX_CACHE", str(tmp_path / "cache"))
    with Classifier(conv_model, "tensorrt", batch_size=16) as trt:
        assert trt.provider == "TensorrtExecutionProvider"
        rows = list(trt.classify([cifar_subset(2)]))
        assert len(rows) == 20
        assert trt.predict(batches(1, 40)[0]).shape == (40, 10)  # more than the profile: in chunks
    assert list((tmp_path / "cache" / "trt").rglob("*.engine"))


def failing_model(path: Path) -> Path:
    """A contract model that fails inside onnxruntime on every run (a Gather of logit column
    10 of 10, out of bounds): what a run that cannot go on (e.g. out of GPU memory) looks
    like. Only running it shows the error: loading the model succeeds."""
    import onnx
    from onnx import TensorProto, helper

    from cnnx.runtime.contract import encode_metadata, metadata_props
    from cnnx.runtime.preprocess import make_spec
    from tests._runtime_util import CIFAR_MEAN, CIFAR_STD, CLASSES

    inits = [helper.make_tensor("W", TensorProto.FLOAT, [3, 10], [0.01 * i for i in range(30)]),
             helper.make_tensor("columns", TensorProto.INT64, [10], [*range(9), 10])]
    nodes = [helper.make_node("Cast", ["images"], ["f"], to=TensorProto.FLOAT),
             helper.make_node("ReduceMean", ["f"], ["pooled"], axes=[2, 3], keepdims=0),
             helper.make_node("MatMul", ["pooled", "W"], ["scores"]),
             helper.make_node("Gather", ["scores", "columns"], ["logits"], axis=1)]
    graph = helper.make_graph(nodes, "fails", [helper.make_tensor_value_info("images", TensorProto.UINT8, ["N", 3, 32, 32])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])], inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = 8
    meta = encode_metadata(class_names=CLASSES, preprocess=make_spec(32, CIFAR_MEAN, CIFAR_STD), arch="fails",
                           version="test", checkpoint_sha256="0" * 64)
    for k, v in metadata_props(meta).items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = k, v
    onnx.save(proto, str(path))
    return path


@pytest.mark.parametrize("io_binding", [False, True])
def test_a_run_that_fails_inside_onnxruntime_is_one_line(io_binding, cifar_subset, tmp_path):
    from cnnx.runtime import Classifier, ModelError

    model = failing_model(tmp_path / "fails.onnx")
    with Classifier(model, "cpu", batch_size=4, io_binding=io_binding) as clf:
        with pytest.raises(ModelError) as err:
            list(clf.classify([cifar_subset(1)]))
    line = str(err.value)
    assert "onnxruntime failed on a batch of 4 on CPUExecutionProvider" in line and "\n" not in line


def test_cnnx_classify_says_a_failed_run_in_one_line(cifar_subset, tmp_path):
    model = failing_model(tmp_path / "fails.onnx")
    line = one_line(run_cli([cifar_subset(1), "--model", model, "--device", "cpu", "--batch-size", "4"]))
    assert line.startswith(f"Error: {model}: onnxruntime failed on a batch of 4 on CPUExecutionProvider: ")
