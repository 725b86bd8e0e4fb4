#!/usr/bin/env bash
# The shapes noise-schedule study on one GPU machine without network: NUM_HOSTS sweep processes share the GPU
# (the CPU-scale models leave it mostly idle; the 16 host cores compile in parallel). Expects the wheels of the
# missing packages and the packed text encoder (pack_text_encoder.py) in .whl/, and $OUT for the results.
#   VARIANT=shapes NUM_HOSTS=12 bash experiments/noise_schedules/gpu_study.sh
set -u
VARIANT=${VARIANT:-shapes}; N=${NUM_HOSTS:-12}; W=${STUDY_DIR:-/tmp/study}; PY=${PYTHON:-python3}
DEADLINE=${DEADLINE:-100000}  # seconds after the start at which unfinished hosts are stopped (finished runs stay)
CFG=configs/ablation_noise_schedules.py:$VARIANT
if [ -d .whl ] && [ -z "${NO_INSTALL:-}" ]; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 1
  export PYTHONPATH=/tmp/site:$PWD
fi
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-/tmp/jaxcache}
mkdir -p "$W" "$OUT"
snapshot() {  # results, report, logs and per-run metrics; no checkpoints, data or caches
  tar czf "$OUT/study.tmp.tgz" -C "$W" --exclude='checkpoints' --exclude='latent_cache' --exclude='./data' . \
    2>/dev/null && mv "$OUT/study.tmp.tgz" "$OUT/study.tgz"
}
t0=$(date +%s)
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null
$PY -m ldm_jax sweep --config="$CFG" --workdir="$W" --prepare_only > "$W/prepare.log" 2>&1 \
  || { tail -40 "$W/prepare.log"; snapshot; exit 1; }
echo "prepared in $(( $(date +%s) - t0 )) s"
pids=()
for i in $(seq 0 $((N - 1))); do
  timeout $(( DEADLINE - ($(date +%s) - t0) )) \
    $PY -m ldm_jax sweep --config="$CFG" --workdir="$W" --num_hosts="$N" --host_index="$i" > "$W/host$i.log" 2>&1 &
  pids+=($!)
done
( while true; do sleep 40; snapshot; echo "$(( $(date +%s) - t0 )) s: $(cat "$W"/results*.jsonl 2>/dev/null | wc -l) runs done"; done ) &
watcher=$!
fails=0
for p in "${pids[@]}"; do wait "$p" || fails=$((fails + 1)); done
kill $watcher 2>/dev/null
echo "sweep hosts done in $(( $(date +%s) - t0 )) s, $fails failed"
for i in $(seq 0 $((N - 1))); do grep -m3 -iE "error|Traceback" "$W/host$i.log" | head -3; done
$PY -m ldm_jax sweep --config="$CFG" --workdir="$W" --report_only > "$W/report.log" 2>&1 || tail -20 "$W/report.log"
snapshot
echo "total $(( $(date +%s) - t0 )) s"
