#!/usr/bin/env bash
# The fused training attention measured in one call of a lent H100/H200 (the device tool runs it from the repository
# root):   bash benchmarks/device_attention.sh
# It needs only jax with CUDA. First it checks flash_gpu and cuDNN, compiled for real (the tests can only interpret
# flash_gpu), against r1jax's XLA attention (values and gradients, bf16, packed rows of an odd length), then times
# xla, flash_gpu and jax's cuDNN flash attention (the peer) at the Qwen2.5-32B (GQA, L 8192) and DeepSeek-V3 (MLA
# 192/128, L 4096) per-device shapes, forward and forward + backward, then a few flash_gpu tilings. About 3-5
# minutes; each step has its own time limit. The log goes to $OUT (or /tmp) as attention_device.txt.
source "$(dirname "$0")/device_common.sh"
log="${OUT:-/tmp}/attention_device.txt"
{
  device_info
  bench 240 attention.py --check --iters 10
  # Tilings (block_q rows = positions x G query heads, block_k keys, warps, stages); defaults are in the run above.
  bench 60 attention.py --impls flash_gpu --shapes gqa --block_q 128 --block_k 128 --num_warps 8 --num_stages 2 --iters 10
  bench 60 attention.py --impls flash_gpu --shapes gqa --block_q 64 --block_k 64 --num_warps 4 --num_stages 3 --iters 10
  bench 60 attention.py --impls flash_gpu --shapes mla --block_q 128 --block_k 32 --num_warps 8 --num_stages 2 --iters 10
  bench 60 attention.py --impls flash_gpu --shapes mla --block_q 64 --block_k 64 --num_warps 8 --num_stages 2 --iters 10
} 2>&1 | tee "$log"
