"""Checkpoint module -> one self-contained ONNX file with cnnx metadata, checked by onnx.

torch 2.14's default (dynamo) exporter writes weights to a separate `.data` file unless told
otherwise; cnnx's contract is one file, so the ModelProto is saved here with every
initializer inline (fine below protobuf's 2 GB limit, which every zoo model is far under).
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import warnings

from cnnx.export.errors import ExportError
from cnnx.runtime.contract import INPUT_NAME, OUTPUT_NAME, metadata_props
from cnnx.runtime.files import first_line

# torchlib implements the ATen ops at opset 18; asked for less, torch runs onnx's version
# converter and silently keeps 18 when that fails, so lower opsets are refused up front.
MIN_OPSET = 18


def supported_opsets() -> range:
    """Opsets the installed torch exporter can write and the installed onnx can check."""
    import onnx

    try:
        from torch.onnx._constants import ONNX_MAX_OPSET as torch_max
    except ImportError:  # a future torch that moved the constant: trust onnx's own maximum
        torch_max = onnx.defs.onnx_opset_version()
    return range(MIN_OPSET, min(torch_max, onnx.defs.onnx_opset_version()) + 1)


def check_opset(opset) -> int | None:
    if opset is None:
        return None
    ok = supported_opsets()
    if int(opset) not in ok:
        raise ExportError(
            f"opset {opset} is not one the installed exporter can produce; supported: {ok.start}..{ok.stop - 1}"
        )
    return int(opset)


@contextlib.contextmanager
def quiet():
    """The exporter talks on stdout and through logging; cnnx keeps stdout for results."""
    # "" is the root logger: onnxruntime.quantization warns through it. Its shape inference logs
    # a traceback as an error, then raises what cnnx says in one line (a full $TMPDIR).
    quieter = {"": logging.ERROR, "torch.onnx": logging.ERROR, "onnxscript": logging.ERROR,
               "torch.export": logging.ERROR, "torch._export": logging.ERROR,
               "onnxruntime.quantization": logging.CRITICAL + 1}
    loggers = [logging.getLogger(n) for n in quieter]
    levels = [lg.level for lg in loggers]
    try:
        for lg, level in zip(loggers, quieter.values()):
            lg.setLevel(level)
        with warnings.catch_warnings(), contextlib.redirect_stdout(sys.stderr):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, lv in zip(loggers, levels):
            lg.setLevel(lv)


def set_metadata(model, meta: dict) -> None:
    """Replace the cnnx.* metadata_props of a ModelProto (other keys are kept)."""
    keep = [(p.key, p.value) for p in model.metadata_props if not p.key.startswith("cnnx.")]
    del model.metadata_props[:]
    for k, v in keep + sorted(metadata_props(meta).items()):
        p = model.metadata_props.add()
        p.key, p.value = k, v


def save_model(model, path) -> None:
    """Write `model` whole (no external data), declaring what other runtimes read it by (_declare)."""
    import onnx

    _declare(model)
    onnx.save_model(model, os.fspath(path), save_as_external_data=False)


def _declare(model) -> None:
    """Declare only the operator sets the model's nodes use, and the IR version those need.
    torch's exporter stamps its own newest IR version whatever --opset asked (10 for opset 18,
    which needs 8; and for opset 23, which needs 11), and onnxruntime's optimiser (int8's
    pre-processing) declares every domain it knows, its own internal ones among them: a runtime
    older than either refuses the file, though it runs every node in it (onnxruntime 1.17:
    "Unsupported model IR version: 10"; "support for domain ai.onnx.ml is till opset 4")."""
    from onnx import NodeProto, helper

    parts = list(_parts(model))
    # The exporter's notes on nodes, graphs, values and weights (its fx nodes, the Python stack
    # with this machine's paths) are IR 10 fields: kept, they would make the file need IR 10,
    # and they are no part of the model. Only the model's own metadata_props (cnnx.*) stay.
    for part in parts:
        del part.metadata_props[:]
    used = {"", "ai.onnx", *(f.domain for f in model.functions)}
    used.update(part.domain for part in parts if isinstance(part, NodeProto))
    kept = [o for o in model.opset_import if o.domain in used]
    if len(kept) != len(model.opset_import):
        del model.opset_import[:]
        model.opset_import.extend(kept)
    model.ir_version = helper.find_min_ir_version_for(list(model.opset_import), ignore_unknown=True)


def _parts(model):
    """Every graph, node, value info and tensor of the model, and its functions, those of the
    subgraphs (If, Loop, Scan) included."""
    from onnx import AttributeProto

    def nodes(found):
        for node in found:
            yield node
            for a in node.attribute:
                if a.type == AttributeProto.TENSOR:
                    yield a.t
                elif a.type == AttributeProto.GRAPH:
                    yield from graph(a.g)
                elif a.type == AttributeProto.GRAPHS:
                    for sub in a.graphs:
                        yield from graph(sub)

    def graph(g):
        yield g
        yield from (*g.input, *g.output, *g.value_info, *g.initializer)
        yield from nodes(g.node)

    yield from graph(model.graph)
    for f in model.functions:
        yield f
        yield from f.value_info
        yield from nodes(f.node)


def export_onnx(module, example, path, *, meta: dict, opset: int | None = None):
    """Export `module` (uint8 images -> logits) to `path`; returns the checked ModelProto. The
    exporter's own exceptions propagate: cnnx.export.writers.run_writer turns them into one line."""
    import torch

    batch = torch.export.Dim("batch", min=1)
    with quiet():
        program = torch.onnx.export(
            module, (example,), input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
            dynamic_shapes={INPUT_NAME: {0: batch}}, opset_version=opset, dynamo=True,
            external_data=False, verbose=False,
        )
    model = program.model_proto
    if opset is not None:
        got = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
        if got != opset:
            raise ExportError(f"opset {opset} is not one the installed exporter can produce (it wrote opset {got})")
    set_metadata(model, meta)
    save_model(model, path)
    check_onnx(path)
    return model


def check_onnx(path) -> None:
    """onnx.checker (full check) and strict shape inference, plus the cnnx signature."""
    import onnx

    path = os.fspath(path)
    try:
        onnx.checker.check_model(path, full_check=True)
        model = onnx.load(path)
        onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True)
    except Exception as e:  # noqa: BLE001 - onnx raises its own types for every kind of check
        raise ExportError(f"the exported ONNX file fails onnx's checks: {first_line(e)}") from None
    ins = [(i.name, i.type.tensor_type.elem_type) for i in model.graph.input]
    outs = [o.name for o in model.graph.output]
    if ins != [(INPUT_NAME, onnx.TensorProto.UINT8)] or outs != [OUTPUT_NAME]:
        raise ExportError(f"the exported ONNX signature is {ins} -> {outs}, not uint8 {INPUT_NAME} -> {OUTPUT_NAME}")
    dim0 = model.graph.input[0].type.tensor_type.shape.dim[0]
    if not dim0.dim_param:
        raise ExportError("the exported ONNX input has a fixed batch size; the contract is a dynamic one")
