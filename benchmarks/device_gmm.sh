#!/usr/bin/env bash
# Issue #7's GPU measurement in one call of a lent H100/H200 (the device tool runs it from the repository root):
#   bash benchmarks/device_gmm.sh
# It needs only jax with CUDA (the device image has it; r1jax.kernels imports nothing else). First it checks every gmm
# backend against ragged_dot with the kernels compiled for real (the tests can only interpret them), then times xla,
# pallas_gpu (Triton) and pallas_mosaic_gpu against dense at the DeepSeek-V3 expert shape (M=16384, K=7168, N=2048,
# G=32, bf16), then a few tilings of the two Pallas backends, forward + backward, skewed groups included. Each step
# has its own time limit; about 5-8 minutes in all. The log goes to $OUT (or /tmp) as gmm_device.txt.
source "$(dirname "$0")/device_common.sh"
log="${OUT:-/tmp}/gmm_device.txt"
{
  device_info
  bench 300 gmm.py --check --iters 20
  # Tilings: (tm, tk, tn) and pipeline stages. Mosaic's shared memory must fit 227 KiB (its lowering says if not).
  bench 60 gmm.py --backends pallas_mosaic_gpu --tiling 64,64,256 --stages 3 --iters 10  # a 128 x 256 f32 accumulator would spill
  bench 60 gmm.py --backends pallas_mosaic_gpu --tiling 64,64,128 --stages 6 --iters 10
  bench 60 gmm.py --backends pallas_mosaic_gpu --tiling 128,128,128 --stages 2 --iters 10
  bench 60 gmm.py --backends pallas_gpu --tiling 128,64,256 --stages 3 --iters 10
  bench 60 gmm.py --backends pallas_gpu --tiling 64,64,128 --stages 4 --iters 10
} 2>&1 | tee "$log"
