"""Where onnxruntime's time goes inside the model, operator by operator, as cnnx's decode
processes run it on the CPU (one thread, 64 images a run, uint8 NCHW input): what is left to
gain on the CPU bound of issue 8's goal 2 from the input side (a channels-last input, the
normalization folded into the first convolution) against the convolutions and the dense layers.

    flock /tmp/cnnx-cpu.lock python benchmarks/ort_ops.py

onnxruntime's own profiler (SessionOptions.enable_profiling) over --warmup and then --runs runs
of random uint8 images (the session's options those of a decode process); each node's kernel
time summed over them all, by node and by group; run_us_median over the --runs only:
  input          Cast, Mul, Sub, Add, Div, Transpose: the uint8 input made float and
                 normalized inside the graph
  layout         ReorderInput, ReorderOutput: the blocked layout (NCHWc) that onnxruntime's
                 optimizer gives the convolutions, and back
  convolution    Conv, FusedConv, MaxPool, AveragePool, GlobalAveragePool
  dense          Gemm, FusedGemm, MatMul
  other          the rest
Writes benchmarks/results/ort_ops.json.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from _results import RESULTS, write_result  # noqa: E402
from bench_classify import build_model  # noqa: E402

GROUPS = {"input": ("Cast", "Mul", "Sub", "Add", "Div", "Transpose"),
          "layout": ("ReorderInput", "ReorderOutput"),
          "convolution": ("Conv", "FusedConv", "MaxPool", "AveragePool", "GlobalAveragePool"),
          "dense": ("Gemm", "FusedGemm", "MatMul")}


def group_of(op: str) -> str:
    return next((g for g, ops in GROUPS.items() if op in ops), "other")


def profile(model: Path, rows: int, runs: int, warmup: int) -> dict:
    import onnxruntime as ort

    from cnnx.runtime.model import _session_options, open_model

    _session, info, _ = open_model(model, "cpu", threads=1)  # the contract check, the input's name and size
    h, w = info.spec["size"]
    x = np.random.default_rng(0).integers(0, 256, (rows, 3, h, w), dtype=np.uint8)
    options = _session_options(ort, 1, True, False)  # a decode process's session (procdecode._WorkerModel)
    options.enable_profiling = True
    options.profile_file_prefix = os.path.join(tempfile.mkdtemp(), "ort")
    session = ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])
    for _ in range(warmup):
        session.run(None, {info.input_name: x})
    for _ in range(runs):
        session.run(None, {info.input_name: x})
    path = session.end_profiling()
    with open(path) as f:
        events = json.load(f)
    os.unlink(path)
    by_node = collections.Counter()
    op_of = {}
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            node = e["name"][: -len("_kernel_time")]
            by_node[node] += e["dur"]
            op_of[node] = e["args"].get("op_name", "?")
    run_us = [e["dur"] for e in events if e.get("name") == "model_run"]  # in order: the warm-up's first
    total = sum(by_node.values())  # every run's, the warm-up's included: the shares hardly move
    nodes = [{"node": n, "op": op_of[n], "group": group_of(op_of[n]), "share": round(us / total, 4),
              "us_per_run": round(us / len(run_us), 1)} for n, us in by_node.most_common()]
    run_us = run_us[warmup:]
    groups = collections.Counter()
    for n in nodes:
        groups[n["group"]] += n["share"]
    return {"rows": rows, "runs": len(run_us), "run_us_median": float(np.median(run_us)),
            "kernel_us_per_run": round(total / len(run_us), 1),
            "group_share": {g: round(groups[g], 4) for g in (*GROUPS, "other")}, "nodes": nodes}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, help="an exported cnnx model (default: bench_classify's seed-cnn)")
    ap.add_argument("--rows", type=int, default=64, help="images a run (procdecode.WORKER_RUN_ROWS)")
    ap.add_argument("--runs", type=int, default=300)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--out", type=Path, default=RESULTS / "ort_ops.json")
    a = ap.parse_args(argv)
    model = a.model or build_model()
    got = profile(model, a.rows, a.runs, a.warmup)
    write_result(a.out, {"model": str(model), **got}, None if argv is None else [__file__, *argv])
    return 0


if __name__ == "__main__":
    sys.exit(main())
