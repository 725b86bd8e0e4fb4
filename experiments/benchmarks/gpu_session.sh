#!/usr/bin/env bash
# The GPU rows of the benchmarks still missing, for one lent H100/H200 call (no network there): run from the
# repository root with the wheels of what the device image lacks in .whl/ (diffusers for the PyTorch rows,
# `pip download --no-deps ... -d .whl diffusers==0.42.1`; experiments/benchmarks/README.md), results to $OUT.
#
#   PARTS="profile padded sample" bash experiments/benchmarks/gpu_session.sh    # one call (<= 600 s)
#   PARTS="remat torch" bash experiments/benchmarks/gpu_session.sh              # a second one if time is left
#
# Parts, in order of what the README still lacks most (each under its own time limit, LIMIT_<part> seconds):
#   profile  SD-1.5 bf16 training step at 64x64 latents, batch 32, no remat, with a per-op trace of 3 steps
#            (what keeps MFU at 28.5%)                                                        ~150 s
#   padded   the profiled step with cross-attention on cuDNN too (keys padded 77 -> 128, masked) ~150 s
#   remat    the same step with remat at batch 32                                              ~150 s
#   sample   512x512 50-step guided DDIM, batch 1 and 8, cuDNN attention                       ~150 s
#   torch    diffusers' UNet2DConditionModel: training step at 64x64 batch 16, 50-step sampling ~150 s
set -u
PARTS=${PARTS:-profile padded sample}
OUT=${OUT:-/tmp/gpu_bench}
PY=${PYTHON:-python3}
B=experiments/benchmarks/unet_gpu.py
mkdir -p "$OUT"
if [ -d .whl ] && [ -z "${NO_INSTALL:-}" ]; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 1
  export PYTHONPATH=/tmp/site:$PWD
fi
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null
part() {  # part NAME DEFAULT_LIMIT ARGS...: runs unet_gpu.py under a limit, its log beside its json
  local name=$1 limit_var="LIMIT_$1" default=$2
  shift 2
  echo "[$(date +%T)] $name"
  timeout "${!limit_var:-$default}" $PY $B "$@" --out="$OUT/gpu_$name.json" > "$OUT/gpu_$name.log" 2>&1
  echo "[$(date +%T)] $name exit $?"
  tail -n 3 "$OUT/gpu_$name.log"
}
for p in $PARTS; do
  case $p in
    profile) part profile 200 jax_train --remat=off --batches="64:32" --warmup=2 --iters=5 --profile=3 ;;
    padded) part padded 200 jax_train --remat=off --batches="64:32" --warmup=2 --iters=5 --attention=cudnn_padded ;;
    remat) part remat 200 jax_train --remat=on --batches="64:32" --warmup=2 --iters=5 ;;
    sample) part sample 200 jax_sample --iters_sample=2 ;;
    torch) part torch_train 150 torch_train --batches="64:16" --warmup=2 --iters=5
           part torch_sample 150 torch_sample --iters_sample=2 ;;
    *) echo "unknown part '$p': use profile, padded, remat, sample or torch"; exit 2 ;;
  esac
done
