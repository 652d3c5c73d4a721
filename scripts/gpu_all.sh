#!/usr/bin/env bash
# Everything that needs a GPU, as one bounded call (about 9 minutes on one H100):
#   1. scripts/gpu_check.py: no host-device sync, fp16 GradScaler skip, bf16/fp16 training, eager
#      overhead ratios (plain_cnn110 batch 128, resnet50 batch 256, bf16);
#   2. scripts/reproduce.py deep: the step bound's size at 1202 layers (DEEP_GRID), two runs at a
#      time (a 1202-layer run takes about 2.5 minutes when three share the GPU; eight sharing
#      finished none in 4.5 minutes);
#   3. scripts/gpu_check.py --compiled: the same ratios under torch.compile for resnet50 (each
#      compile takes up to 90 s; plain_cnn110's compiled ratios are in docs/results.md).
#   4. scripts/reproduce.py paper --synthetic: the paper's CIFAR-10 protocol on a CIFAR-shaped
#      synthetic set for a few hundred updates per run: the throughput that times the 64k-update runs.
# The depth suite's 1202-layer row (`reproduce.py depth --depths 1202 --append`, about 2 hours) and
# the defaults grid (`reproduce.py defaults`) are separate calls. Results go to $OUT (or ./gpu_out).
set -u
out=${OUT:-gpu_out}
mkdir -p "$out"
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 MPLBACKEND=Agg HF_HUB_OFFLINE=1
{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python3 -c "import torch, timm, sklearn; print('torch', torch.__version__, 'timm', timm.__version__)"
} 2>&1 | tee "$out/machine.txt"
timeout 130 python3 scripts/gpu_check.py --repeats 20 --deadline 95 2>&1 | tee "$out/gpu_check.txt"
timeout "${DEEP_LIMIT:-220}" python3 scripts/reproduce.py deep --device cuda --jobs "${JOBS:-2}" \
  --seeds 0 --datasets digits --out "$out" 2>&1 | tr '\r' '\n' | grep -v "run/s\]\|s/run\]" | tee "$out/deep.txt"
timeout "${COMPILE_LIMIT:-200}" python3 scripts/gpu_check.py --no-checks --no-eager --compiled --repeats 10 \
  --models ${COMPILED_MODELS:-resnet50} --deadline 110 2>&1 | grep -v "^W1" | tee "$out/gpu_compiled.txt"
timeout "${PAPER_LIMIT:-150}" python3 scripts/reproduce.py paper --synthetic --steps "${PAPER_STEPS:-200}" \
  --models plain_cnn110 cifar_resnet110 --workers 4 --out "$out/paper" 2>&1 | grep -v "it/s\]" | tail -20 \
  | tee "$out/paper.txt"
