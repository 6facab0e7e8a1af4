"""The CPU pipeline running onnxruntime in its decode threads (pipeline.decoded_batches' infer):
the same batches, logits and order as decoding first and running each batch in the caller; a
failure inside infer reaches the caller at its batch; the concurrent session's options."""

from __future__ import annotations

import numpy as np
import pytest

from cnnx.runtime.discover import Discovery
from cnnx.runtime.model import open_model
from cnnx.runtime.pipeline import PipelineConfig, batched, decoded_batches
from tests._runtime_util import tiny_onnx_model


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return tiny_onnx_model(tmp_path_factory.mktemp("model") / "tiny.onnx")


@pytest.fixture(scope="module")
def folder(cifar_subset, tmp_path_factory):
    """40 real CIFAR JPEGs plus two files that do not decode, among them in sorted order."""
    src = cifar_subset(4)
    dest = tmp_path_factory.mktemp("mixed")
    for i, p in enumerate(sorted(src.rglob("*.jpg"))):
        (dest / f"{i:03d}.jpg").write_bytes(p.read_bytes())
    (dest / "005b.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
    (dest / "031b.jpg").write_bytes(b"")
    return dest


def batches(folder, spec, config, infer=None):
    return list(decoded_batches(batched(iter(Discovery([str(folder)])), config.batch_size), spec, config,
                                infer=infer))


@pytest.mark.parametrize("workers", [1, 2, 3])
def test_infer_in_the_workers_gives_the_callers_logits_in_order(model, folder, workers):
    session, info, _ = open_model(model, "cpu", concurrent=True)
    config = PipelineConfig(batch_size=8, workers=workers)

    def infer(images):
        return session.run([info.output_name], {info.input_name: images})[0]

    plain = batches(folder, info.spec, config)
    inferred = batches(folder, info.spec, config, infer)
    assert [b.paths for _, b in inferred] == [b.paths for _, b in plain]
    assert [b.failed for _, b in inferred] == [b.failed for _, b in plain]
    assert sum(len(b.failed) for _, b in plain) == 2
    for (_, mine), (_, ref) in zip(inferred, plain):
        assert mine.images.shape == (8, 3, 32, 32)  # one shape for onnxruntime, the last batch padded
        np.testing.assert_array_equal(mine.logits, infer(ref.images))
        assert ref.logits is None  # without infer nothing is run


def test_a_batch_with_nothing_decoded_is_not_run(model, tmp_path):
    _session, info, _ = open_model(model, "cpu")
    for i in range(3):
        (tmp_path / f"{i}.jpg").write_bytes(b"not an image")
    calls = []
    out = batches(tmp_path, info.spec, PipelineConfig(batch_size=2, workers=2), lambda x: calls.append(x))
    assert calls == [] and [b.logits for _, b in out] == [None, None]  # 2 + 1 files
    assert sum(len(b.failed) for _, b in out) == 3


def test_a_failure_inside_infer_reaches_the_caller_at_its_batch(model, folder):
    session, info, _ = open_model(model, "cpu", concurrent=True)
    seen = []

    def infer(images):
        seen.append(1)
        if len(seen) == 3:
            raise RuntimeError("onnxruntime failed")
        return session.run([info.output_name], {info.input_name: images})[0]

    config = PipelineConfig(batch_size=8, workers=1)  # one worker: batches are run in order
    got = decoded_batches(batched(iter(Discovery([str(folder)])), 8), info.spec, config, infer=infer)
    n_classes = len(info.class_names)
    assert next(got)[1].logits.shape == (8, n_classes) and next(got)[1].logits.shape == (8, n_classes)
    with pytest.raises(RuntimeError, match="onnxruntime failed"):
        next(got)


def test_concurrent_cpu_session_takes_one_thread_and_no_memory_pattern(model):
    session, _info, provider = open_model(model, "cpu", concurrent=True)
    assert provider == "CPUExecutionProvider"
    so = session.get_session_options()
    assert so.intra_op_num_threads == 1 and not so.enable_mem_pattern
    default, _info, _ = open_model(model, "cpu")
    assert default.get_session_options().intra_op_num_threads == 0  # onnxruntime's own: all cores
    named, _info, _ = open_model(model, "cpu", threads=2, concurrent=True)
    assert named.get_session_options().intra_op_num_threads == 2  # the caller's choice wins


# --- ahead_in_thread: the GPU path's discovery in a thread of its own ---------------------------------

def test_ahead_in_thread_gives_every_item_in_order_and_raises_where_the_source_did():
    import itertools

    from cnnx.runtime.pipeline import ahead_in_thread

    assert list(ahead_in_thread(range(1000), 3)) == list(range(1000))
    assert list(ahead_in_thread([], 3)) == []

    def failing():
        yield from (1, 2)
        raise OSError("the disk went away")

    got = []
    with pytest.raises(OSError, match="the disk went away"):
        for item in ahead_in_thread(failing(), 2):
            got.append(item)
    assert got == [1, 2]  # what came before the error, then the error itself
    # and the depth bounds how far it runs ahead: never more than depth + 1 beyond what was taken
    produced = []
    counting = (produced.append(i) or i for i in itertools.count())
    ahead = ahead_in_thread(counting, 3)
    assert next(ahead) == 0
    import time

    time.sleep(0.3)
    assert 1 <= len(produced) <= 1 + 3 + 1, produced
    ahead.close()


def test_ahead_in_thread_stops_when_its_consumer_does():
    import itertools
    import threading
    import time

    from cnnx.runtime.pipeline import ahead_in_thread

    ahead = ahead_in_thread(itertools.count(), 2, name="cnnx-ahead-test")
    assert [next(ahead) for _ in range(5)] == [0, 1, 2, 3, 4]
    ahead.close()  # the consumer stops early: an endless source must not keep the thread alive
    deadline = time.monotonic() + 5
    while any(t.name == "cnnx-ahead-test" for t in threading.enumerate()) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(t.name == "cnnx-ahead-test" for t in threading.enumerate())


def test_the_gpu_path_counts_and_rows_with_discovery_in_its_thread(model, folder, monkeypatch):
    """io_binding=True (the GPU path, forced on the CPU) walks the folders in a thread of its
    own: the same rows, in the same order, and the same counts as the CPU loop (which keeps
    the walk in its one thread)."""
    from cnnx.runtime import Classifier, api

    threads = []

    def recorded(iterable, depth, name):
        threads.append(name)
        return ahead(iterable, depth, name)

    ahead = api.ahead_in_thread
    monkeypatch.setattr(api, "ahead_in_thread", recorded)
    (folder / "notes.txt").write_text("not an image")
    try:
        with Classifier(model, "cpu", batch_size=8) as clf:
            plain = clf.classify([str(folder)])
            plain_rows = list(plain)
        assert threads == []
        with Classifier(model, "cpu", batch_size=8, io_binding=True) as clf:
            bound = clf.classify([str(folder)])
            bound_rows = list(bound)
    finally:
        (folder / "notes.txt").unlink()
    assert bound_rows == plain_rows and len(plain_rows) > 8
    assert (bound.found, bound.ignored, bound.already_done) == (plain.found, plain.ignored, plain.already_done)
    assert bound.ignored == 1 and threads == ["cnnx-discover"]
