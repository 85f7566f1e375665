#!/usr/bin/env bash
# Issue 16's GPU proof, in one run (about 5–8 minutes on one H100/H200): the CUDA tests, then the figures.
#   bash bench/gpu_check.sh 2>&1 | tee gpu_check.txt
# Prints: ms/image at batch 1 with the CUDA graph on/off and images/s at batch 64 (base, random weights, bf16),
# speculative decoding's codes/step, VQGAN f16_16384 encode/decode images/s at batch 64 bf16.
# Training tokens/s and MFU are not scripted here yet (see the issue).
set -u
cd "$(dirname "$0")/.."
python -c "import torch; print(torch.__version__, torch.cuda.get_device_name(0))" || exit 1
echo "== CUDA tests"; timeout 300 python -m pytest -q -p no:cacheprovider tests/gpu tests/test_speed_paths.py tests/test_sampling.py
echo "== text→image codes (base, bf16)"
(cd bench && timeout 300 python bench_t2i.py --device cuda --dtype bf16 --configs base --batches 1,64 --naive off \
  --weights fp32,bf16 --speculative 4 --repeats 2)
echo "== VQGAN f16_16384, batch 64"
timeout 200 python bench/bench_vqgan.py --preset f16_16384 --batch 64 --dtypes fp32,bf16 --iters 5
