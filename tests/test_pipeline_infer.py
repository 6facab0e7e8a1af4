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
