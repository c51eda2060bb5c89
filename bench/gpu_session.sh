#!/usr/bin/env bash
# Everything one GPU-machine call should do, in one go: the GPU test tier, the default
# benchmark, a token sweep with its plot, the other real shapes, and the quantization
# variants (issue: accuracy at hybrid speed). Results go to $RES (default ./gpu_out); copy
# them into bench/results/ with the device name and commit. Each step has its own timeout,
# so a slow step cannot eat the others' time.
#   RES=/tmp/res bash bench/gpu_session.sh [tests|core|extra|all]   (core: default + sweep)
set -o pipefail
OUT=${RES:-gpu_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
what=${1:-all}
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv,noheader | tee "$OUT/device.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/device.txt"

if [[ $what == tests || $what == all ]]; then
  timeout 230 python3 -m pytest -q -n 8 tests -p no:cacheprovider 2>&1 | tee "$OUT/pytest_gpu.log" \
    | grep -E "FAILED|ERROR|passed|failed" | tail -n 40
fi
if [[ $what == core || $what == all ]]; then
  timeout 110 python3 -m bench --json "$OUT/default.json" 2>&1 | tee "$OUT/default.log" | tail -n 22
  timeout 150 python3 -m bench --tokens 1,16,64,256,1024,4096,8192,16384 \
    --backends triton,cutlass,bf16 --iters 30 --json "$OUT/sweep.json" --plot "$OUT/sweep.png" \
    2>&1 | tee "$OUT/sweep.log" | grep -E "^(triton|cutlass|bf16) " | tail -n 30
fi
if [[ $what == extra || $what == all ]]; then
  timeout 120 python3 -m bench --shape qwen3-30b-a3b,mixtral-8x7b,deepseek-v3 \
    --num-tokens 1024 --backends triton,cutlass,bf16 --iters 30 --json "$OUT/shapes.json" \
    2>&1 | tee "$OUT/shapes.log" | grep -E "^(triton|cutlass|bf16) " | tail -n 12
  for variant in "--scale-rounding nearest --super-group-size 256 --allow-int32-overflow --act-block-m auto" \
                 "--act-block-m auto" "--scale-rounding nearest --super-group-size 4"; do
    tag=$(echo "$variant" | tr -d '-' | tr ' ' '_')
    timeout 60 python3 -m bench --backends triton $variant --iters 30 \
      --json "$OUT/variant_$tag.json" 2>&1 | grep -E "^triton " | sed "s/^/[$variant] /"
  done
fi
