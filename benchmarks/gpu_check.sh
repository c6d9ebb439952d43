#!/usr/bin/env bash
# The GPU checks of one lent-device session, in priority order inside a fixed time: the CUDA-only tests, eager
# mixed precision, then the BHN/BN training ratios of issue 14 compiled (BN/BHN pairs only: GN's take minutes).
# Each step gets what is left of the budget, so a slow compile cuts the steps after it short rather than the
# whole run. JSON results go to $OUT.
#
#   OUT=runs/gpu bash benchmarks/gpu_check.sh [budget seconds, default 520] 2>&1 | tee runs/gpu/gpu_check.log
set -u
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
out=${OUT:-runs/gpu}; mkdir -p "$out"
deadline=$(( $(date +%s) + ${1:-520} ))
step() {  # step NAME BUDGET_S COMMAND...: run COMMAND with at most BUDGET_S, never past the deadline
    local name=$1 budget=$2; shift 2
    local left=$(( deadline - $(date +%s) ))
    (( left < budget )) && budget=$left
    if (( budget < 20 )); then echo "## $name: skipped, ${left}s left"; return; fi
    echo "## $name (at most ${budget}s)"
    local start=$(date +%s)
    timeout "$budget" "$@" 2>&1
    echo "## $name: exit $? after $(( $(date +%s) - start ))s"
}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__)"
bench="python benchmarks/bench_hypernorm.py --device cuda --modes train --reps 5"
# the CUDA-only tests: CUDA graphs equal eager; float16 autocast training follows float32
step tests 90 python -m pytest -q -p no:cacheprovider tests/engine/test_cuda_graphs.py \
    tests/nn/test_fast_paths.py -k "cuda"
# eager mixed precision (its backward failed before session 6's fix), then the best compiled settings
step resnet50_cl_amp 60 $bench --models resnet50 --batches 32 --pairs bn --channels-last --amp \
    --json "$out/resnet50_cl_amp.json"
step resnet20_reduce_overhead 130 $bench --models resnet20 --batches 128 --pairs bn --compile \
    --compile-mode reduce-overhead --json "$out/resnet20_reduce_overhead.json"
step resnet50_reduce_overhead_cl_amp 200 $bench --models resnet50 --batches 32 --pairs bn --compile \
    --compile-mode reduce-overhead --channels-last --amp --json "$out/resnet50_reduce_overhead_cl_amp.json"
step resnet20_compile 130 $bench --models resnet20 --batches 128 --pairs bn --compile \
    --json "$out/resnet20_compile.json"
