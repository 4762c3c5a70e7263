#!/usr/bin/env bash
# The checks only a GPU can run, in one go (under 8 minutes on one H100/H200-class GPU):
#   1. the tests that need CUDA (float16 AMP and its GradScaler, gradient caching with the CUDA
#      generator replayed, a short training run on the device);
#   2. gradient caching at B = 4,096 with float16 AMP: peak GPU memory and time against the
#      whole-batch step (ResNet-18, 112 px; the plain step runs as far as it fits);
#   3. the images/s of a BN-Inception training step at 224 px (float16 AMP and float32).
# Usage, from the repository root on the GPU machine (after `make install`):
#   bash benchmarks/gpu_check.sh 2>&1 | tee gpu_check.txt
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
export PYTHONPATH=src
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
"$PY" -m pytest -q -p no:cacheprovider tests/test_cuda.py tests/test_gradient_cache.py \
    tests/test_engine.py -k "cuda or chunk or fp16 or bf16"
"$PY" benchmarks/chunked_step.py --device cuda --amp fp16 --batches 128 1024 4096 \
    --chunk 128 --plain-max 4096
"$PY" benchmarks/chunked_step.py --device cuda --amp fp16 --backbone bninception --size 224 \
    --batches 256
"$PY" benchmarks/chunked_step.py --device cuda --amp none --backbone bninception --size 224 \
    --batches 256
