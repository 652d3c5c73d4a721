#!/usr/bin/env bash
# Everything that needs a GPU, as one bounded call (at most 8 minutes on one H100):
#   1. scripts/gpu_check.py: no host-device sync, fp16 GradScaler skip, bf16/fp16 training, eager
#      overhead ratios (plain_cnn110 batch 128, resnet50 batch 256, bf16);
#   2. scripts/reproduce.py depth: the depth suite (runs started until its deadline), then
#      scripts/reproduce.py defaults: the runs that chose the defaults, with three seeds;
#   3. scripts/gpu_check.py --compiled: the same ratios under torch.compile, while time is left.
# Results go to $OUT (or ./gpu_out): logs, depth.json, depth.png and defaults.json.
set -u
out=${OUT:-gpu_out}
mkdir -p "$out"
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 MPLBACKEND=Agg HF_HUB_OFFLINE=1
{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python3 -c "import torch, timm, sklearn; print('torch', torch.__version__, 'timm', timm.__version__)"
} 2>&1 | tee "$out/machine.txt"
timeout 100 python3 scripts/gpu_check.py --repeats 20 --deadline 70 2>&1 | tee "$out/gpu_check.txt"
timeout "${DEPTH_LIMIT:-230}" python3 scripts/reproduce.py depth --device cuda --jobs "${JOBS:-6}" \
  --deadline "${DEPTH_DEADLINE:-150}" --out "$out" 2>&1 | tr '\r' '\n' | grep -v "run/s\]\|s/run\]" | tee "$out/depth.txt"
timeout "${DEFAULTS_LIMIT:-70}" python3 scripts/reproduce.py defaults --device cuda --jobs "${JOBS:-6}" \
  --seeds 0 1 2 --deadline 25 --out "$out" 2>&1 | tr '\r' '\n' | grep -v "run/s\]\|s/run\]" | tee "$out/defaults.txt"
timeout "${COMPILE_LIMIT:-70}" python3 scripts/gpu_check.py --no-checks --no-eager --compiled --repeats 10 \
  --deadline 30 2>&1 | grep -v "^W1" | tee "$out/gpu_compiled.txt"
