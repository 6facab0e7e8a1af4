"""fp16 and int8 variants of an exported fp32 ONNX file (inputs stay uint8, logits float32).

fp16: onnxruntime.transformers.float16 (onnxconverter-common's converter, shipped inside
onnxruntime) with keep_io_types, so the uint8 -> float Cast becomes uint8 -> float16.
int8: onnxruntime.quantization.quantize_static in QDQ form, per-channel int8 weights and
uint8 activations, calibrated on real uint8 images. The input scaling (Cast, Mul, Sub) and the
classifier head stay in float: quantising them adds error for no measurable speed.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from cnnx.export.errors import ExportError
from cnnx.runtime.contract import INPUT_NAME
from cnnx.export.onnx import check_onnx, quiet, save_model, set_metadata

COMPUTE_OPS = ("Conv", "Gemm", "MatMul")


def to_fp16(src, dst, *, meta: dict) -> None:
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    with quiet():
        model = convert_float_to_float16(onnx.load(os.fspath(src)), keep_io_types=True)
    set_metadata(model, meta)
    save_model(model, dst)
    check_onnx(dst)


def input_scaling_nodes(model) -> list:
    """Names of the nodes between the uint8 input and the first conv/matmul."""
    frontier, names = {INPUT_NAME}, []
    for node in model.graph.node:  # topologically sorted by the ONNX spec
        if not frontier.intersection(node.input):
            continue
        if node.op_type in COMPUTE_OPS:
            continue
        if node.name:
            names.append(node.name)
        frontier.update(node.output)
    return names


def output_head_nodes(model) -> list:
    """Names of the last conv/matmul ops before the logits (and the ops after them).

    Keeping the classifier head in float is the usual practice for post-training int8: it is
    a sliver of the compute, and its rounding is what flips top-1 between near-tied classes
    (the parity figures `cnnx export --int8` records say what it gives for a model)."""
    producer = {o: n for n in model.graph.node for o in n.output}
    todo, seen, names = [o.name for o in model.graph.output], set(), []
    while todo:
        node = producer.get(todo.pop())
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        if node.name:
            names.append(node.name)
        if node.op_type not in COMPUTE_OPS:
            todo.extend(node.input)
    return names


class _Reader:
    """onnxruntime CalibrationDataReader over uint8 image batches (kept uint8: the model's input)."""

    def __init__(self, images: np.ndarray, batch_size: int):
        self._batches = [images[i:i + batch_size] for i in range(0, len(images), batch_size)]
        self._i = 0

    def get_next(self):
        if self._i >= len(self._batches):
            return None
        self._i += 1
        return {INPUT_NAME: self._batches[self._i - 1]}

    def rewind(self):
        self._i = 0


def to_int8(src, dst, *, calibration: np.ndarray, meta: dict, batch_size: int = 32) -> None:
    import onnx
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if calibration is None or len(calibration) == 0:
        raise ExportError("--int8 needs real calibration images: the run's validation split or --verify-data DIR")
    dst = Path(dst)
    pre = dst.with_name(dst.name + ".pre.onnx")
    reader = type("Reader", (_Reader, CalibrationDataReader), {})(np.ascontiguousarray(calibration, np.uint8), batch_size)
    try:
        with quiet():
            # symbolic shape inference (meant for transformers) fails on some zoo graphs (airnet);
            # onnx shape inference is enough: the only dynamic dim is the batch.
            quant_pre_process(os.fspath(src), os.fspath(pre), skip_symbolic_shape=True)
            graph = onnx.load(os.fspath(pre))
            exclude = input_scaling_nodes(graph) + output_head_nodes(graph)
            quantize_static(
                os.fspath(pre), os.fspath(dst), reader, quant_format=QuantFormat.QDQ, per_channel=True,
                activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, nodes_to_exclude=exclude,
                # min/max averaged over calibration batches, not the extremes of one outlier batch
                extra_options={"CalibMovingAverage": True},
            )
    finally:
        pre.unlink(missing_ok=True)
    model = onnx.load(os.fspath(dst))
    set_metadata(model, meta)
    save_model(model, dst)
    check_onnx(dst)
