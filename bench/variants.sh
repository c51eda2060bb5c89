#!/usr/bin/env bash
# Times the quantization variants of issue 6 (the default = per-token scales, 128-row tiles,
# the reference design with tiles and per token) at two shapes on the GPU machine; one line
# per variant. Run from the repository root.
set -o pipefail
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
for shape in 35B-A3B qwen3-30b-a3b; do
  for variant in "" "--act-block-m auto" \
                 "--scale-rounding nearest --super-group-size 256 --allow-int32-overflow --act-block-m auto" \
                 "--scale-rounding nearest --super-group-size 256 --allow-int32-overflow"; do
    timeout 60 python3 -m bench --shape $shape --backends triton $variant --iters 30 --json /tmp/v.json 2>&1 \
      | grep -E "^triton +$shape +8192 +[0-9.]+ " | head -1 | sed "s/^/[$shape ${variant:-default}] /"
  done
done
