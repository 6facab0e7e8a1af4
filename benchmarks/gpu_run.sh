#!/usr/bin/env bash
# The GPU machine's calls for issues 7 and 8 (device tool `run`, from the repository root; the
# machine is given back after ~30 s idle, so make them back to back; /tmp survives between calls on
# the same machine). Prepare here first, on this session's machine (the ignored folders do not
# outlive a machine), about 10 minutes of this CPU and no device time:
#   python benchmarks/gpu_classify.py --prepare --train-airnet --baseline-commit <commit to compare>
# (the onnxruntime-gpu wheel in 5 parts of 55 MiB: each call carries one and the working tree, under
# the 64 MiB a call; .data/airnet-best.pt, a trained airnet: GPU-decode agreement needs a model that
# gives every class).
#
#   run(command="bash benchmarks/gpu_run.sh part 1", carry=[".ortgpu1"], timeout_s=60)   # ... part 5
#   run(command="CNNX_TREE_COMMIT=<git rev-parse HEAD here> bash benchmarks/gpu_run.sh classify",
#       carry=[".data", ".ortgpu-decode"], timeout_s=440)
# (the machine's copy of .git can be older than the files it gets: the JSON's tree_commit says
# which commit's files ran; commit before the run)
# With a session's 15 minutes of device time, the stages of issue 8's goals and checks, in one call
# (about 380 s by the stages' times on the last H100 runs, and their need_s where never timed):
#   run(command="CNNX_TREE_COMMIT=<sha> BUDGET_S=480 PHOTOS=960 STAGES=classify_rows_cuda_vs_cpu_airnet,\
#     gpu_decode_classify_airnet_cifar,decode_only_photos,gpu_decode_ceiling,gpu_decode_backends,gpu_decode_steps,\
#     gpu_decode_only_photos,gpu_decode_classify_resnet18,profile_gpu_decode_resnet18,classify_airnet_fp32,\
#     steady_state_airnet_fp32,pytest_gpu,profile_airnet_fp32 bash benchmarks/gpu_run.sh classify \
#     > $OUT/log.txt 2>&1; rc=$?; tail -c 4000 $OUT/log.txt; exit $rc", carry=[".data", ".ortgpu-decode"], timeout_s=540)
# (one line in the call; --stages adds the exports, the ceiling and the 10x CIFAR folder they need)
#
# A steady-state A/B against other commits: --prepare's --baseline-commit (repeatable) puts each
# one's cnnx/ in .data/baseline-<commit>, with a COMMIT file.
# STAGES=a,b,... runs only those stages of gpu_classify.py (PHOTOS=N: fewer synthetic photos, made always).
# py-spy's wheel in .data/wheels gives the profile stage.
#
# classify: joins and installs onnxruntime-gpu and the GPU-decoding wheels, then
#        benchmarks/gpu_classify.py's whole run (issue 8) -> $OUT/results/gpu_classify.json.
# train: cnnx's GPU recipe for 5 seeds (issue 7 goal 2) -> $OUT/train/gpu_train.json; its seed-0
#        best.pt stays in /tmp, where classify takes it when .data has no airnet-best.pt.
#   run(command="bash benchmarks/gpu_run.sh train", carry=[".data"], timeout_s=200)
# Then `python benchmarks/gpu_collect.py <files_at>/results` (classify; train: copy $OUT/train/gpu_train.json).
set -euo pipefail
case "${1:-}" in
  train)
    python3 -m pip install -q --no-index --no-deps --target /tmp/site-train .data/wheels/simplejpeg*.whl
    PYTHONPATH=/tmp/site-train:. timeout 170 python3 benchmarks/gpu_train.py \
      --data .data/cifar10-train.tar.gz --out "$OUT/train" --budget-s 150
    ;;
  part)
    mkdir -p /tmp/ortgpu && cp ".ortgpu$2"/* /tmp/ortgpu/ && ls /tmp/ortgpu
    ;;
  classify)
    mkdir -p /tmp/gpudecode && cp .ortgpu-decode/* /tmp/gpudecode/
    trained=.data/airnet-best.pt
    [ -f $trained ] || trained=/tmp/cnnx-gpu-train/runs/seed0-compiled/best.pt
    timeout $(( ${BUDGET_S:-380} + 40 )) python3 benchmarks/gpu_classify.py --wheel-parts /tmp/ortgpu \
      --wheels .data/wheels --wheels /tmp/gpudecode --cifar-tar .data/cifar10-train.tar.gz \
      --results "$OUT/results" --budget-s ${BUDGET_S:-380} --photos ${PHOTOS:-960} \
      $( [ -f $trained ] && echo --airnet-checkpoint $trained ) \
      $( for b in .data/baseline*/; do [ -d "$b" ] && echo --baseline "$b"; done ) \
      $( [ -n "${STAGES:-}" ] && echo --stages "$STAGES" )
    ;;
  *)
    echo "usage: gpu_run.sh train | part N | classify" >&2
    exit 2
    ;;
esac
