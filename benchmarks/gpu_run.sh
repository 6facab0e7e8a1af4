#!/usr/bin/env bash
# The GPU machine's calls for issues 7 and 8, in order (device tool `run`, from the repository root;
# the machine is given back after ~30 s idle, so make them back to back; /tmp survives between
# calls on the same machine). Prepare here once: `python benchmarks/gpu_classify.py --prepare`.
#
#   run(command="bash benchmarks/gpu_run.sh train", carry=[".data", ".ortgpu-decode"], timeout_s=200)
#   run(command="bash benchmarks/gpu_run.sh part 1", carry=[".ortgpu1"], timeout_s=60)   # ... part 4
#   run(command="bash benchmarks/gpu_run.sh classify", carry=[".ortgpu5", ".data"], timeout_s=560)
#
# train: cnnx's GPU recipe for 5 seeds (issue 7 goal 2) -> $OUT/train/gpu_train.json; its seed-0
#        best.pt stays in /tmp for the classify call (a trained airnet: GPU-decode agreement needs
#        a model that gives every class). Also parks the GPU-decoding wheels in /tmp/gpudecode.
# classify: joins and installs onnxruntime-gpu, then benchmarks/gpu_classify.py's whole run
#        (issue 8) -> $OUT/results/gpu_classify.json. Copy both JSONs to benchmarks/results/.
set -euo pipefail
case "${1:-}" in
  train)
    mkdir -p /tmp/gpudecode && cp .ortgpu-decode/* /tmp/gpudecode/
    python3 -m pip install -q --no-index --no-deps --target /tmp/site-train .data/wheels/simplejpeg*.whl
    PYTHONPATH=/tmp/site-train:. timeout 170 python3 benchmarks/gpu_train.py \
      --data .data/cifar10-train.tar.gz --out "$OUT/train" --budget-s 150
    ;;
  part)
    mkdir -p /tmp/ortgpu && cp ".ortgpu$2"/* /tmp/ortgpu/ && ls /tmp/ortgpu
    ;;
  classify)
    mkdir -p /tmp/ortgpu && cp .ortgpu5/* /tmp/ortgpu/
    trained=/tmp/cnnx-gpu-train/runs/seed0-compiled/best.pt
    timeout 540 python3 benchmarks/gpu_classify.py --wheel-parts /tmp/ortgpu --wheels .data/wheels \
      --wheels /tmp/gpudecode --cifar-tar .data/cifar10-train.tar.gz --results "$OUT/results" \
      --budget-s 500 --photos 960 $( [ -f $trained ] && echo --airnet-checkpoint $trained )
    ;;
  *)
    echo "usage: gpu_run.sh train | part N | classify" >&2
    exit 2
    ;;
esac
