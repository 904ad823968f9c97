#!/usr/bin/env bash
# One prepared GPU run, sized for a 15-minute lease (call with timeout_s=570; it ends in ~9 min):
#   t=0      build the wheel (CUDA, sm_90)         ||  train the default model (tools/train_default.py)
#   build ok GPU tests (pytest), while training runs
#   then     benchmarks alone on the GPU: bench_model, bench_ops, bench_embed
# Results come back as at most 8 files: $OUT/results.tgz (re-packed after every stage, so a
# timeout still returns what finished), $OUT/model.safetensors + $OUT/config.json of the trained
# model, and $OUT/log.txt.
#   device run: bash bench/gpu_check.sh        (carry: gpu_data = ../shared/data copied, git-ignored)
# Stage limits (seconds) can be overridden: TRAIN_MIN, TEST_S, BM_S, BO_S, BE_S.
set -uo pipefail
OUT="${OUT:-$PWD/gpu_out}"
W="${GPU_WORK:-/tmp/gpu_work}"
rm -rf "$W"; mkdir -p "$OUT" "$W"
exec > >(tee "$OUT/log.txt") 2>&1
export PYTHONUNBUFFERED=1
# Inductor's compile workers died in subprocesses on the H200 image (2026-11-30): compile in-process.
export TORCHINDUCTOR_COMPILE_THREADS=1
T0=$(date +%s)
el() { echo "[$(( $(date +%s) - T0 )) s] $*"; }
pack() { tar -C "$W" --exclude=checkpoint --exclude="*.safetensors" -czf "$OUT/results.tgz.tmp" . 2>/dev/null && mv "$OUT/results.tgz.tmp" "$OUT/results.tgz"; }

nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv | tee "$W/gpu.txt"
python -c "import torch, triton, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$W/gpu.txt"
DATA=gpu_data
[ -d "$DATA" ] && [ -z "${SKIP_TRAIN:-}" ] || { el "no gpu_data/ (or SKIP_TRAIN set): no training run"; DATA=""; }

# Build (CPU) and training (GPU, from the source tree: it needs no compiled module) in parallel.
(ASTROMER_FAST_CUDA=1 ASTROMER_FAST_CUDA_ARCHS="${ASTROMER_FAST_CUDA_ARCHS:-90}" CMAKE_BUILD_PARALLEL_LEVEL=12 \
   python -m pip install --no-build-isolation --no-deps . > "$W/build.txt" 2>&1; echo $? > "$W/build.rc") &
BUILD=$!
if [ -n "$DATA" ]; then
  (PYTHONPATH="$PWD" timeout "${TRAIN_TIMEOUT:-300}" python tools/train_default.py \
     --data "$DATA" --out "$W/train" --minutes "${TRAIN_MIN:-3.3}" > "$W/train.txt" 2>&1; echo $? > "$W/train.rc") &
  TRAIN=$!
fi
wait $BUILD
el "build rc=$(cat "$W/build.rc")"; tail -3 "$W/build.txt"
if [ "$(cat "$W/build.rc")" = 0 ]; then
  (cd /tmp && astromer-fast info) 2>&1 | tee "$W/info.txt"
  [ -n "$DATA" ] && export ASTROMER_FAST_SHARED_DATA="$PWD/$DATA"
  # The tests that exercise the GPU (kernels on every backend, the whole model per backend,
  # CUDA graphs); the CPU-only suite is CI's job.
  # Order: what has never passed on a GPU first. pytest-timeout (in the image) stops one stalled
  # test (Triton fp32 attention stalled at L >= 7 on 2026-11-30) instead of the whole stage.
  TO=$(python -c "import pytest_timeout" 2>/dev/null && echo "--timeout=60")
  timeout "${TEST_S:-240}" pytest -v -ra $TO --durations=10 -p no:cacheprovider \
      python_tests/test_kernels_weighted_rmse.py python_tests/test_kernels_masked_attention.py \
      python_tests/test_model.py "python_tests/test_embed.py::test_cuda_graphs_match_eager" \
      python_tests/test_kernels_input_embedding.py > "$W/tests.txt" 2>&1
  el "tests rc=$?"; grep -E "FAILED|ERROR|passed|failed" "$W/tests.txt" | tail -25
else
  tail -60 "$W/build.txt"
fi
pack
if [ -n "${TRAIN:-}" ]; then
  wait $TRAIN
  el "training rc=$(cat "$W/train.rc")"; tail -8 "$W/train.txt"
  cp "$W/train/model.safetensors" "$W/train/config.json" "$OUT/" 2>/dev/null
  pack
fi
[ "$(cat "$W/build.rc")" = 0 ] || { el "no build: benchmarks skipped"; exit 1; }
cd /tmp  # benchmarks import the installed package, not the source tree
B="$OLDPWD/bench"
timeout "${BM_S:-150}" python "$B/bench_model.py" --device cuda --windows 4096 --compile --compile-timeout 45 --skip "${BENCH_SKIP:-triton fp32}" --json "$W/bench_model.json" > "$W/bench_model.txt" 2>&1
el "bench_model rc=$?"; tail -25 "$W/bench_model.txt"; pack
timeout "${BO_S:-75}" python "$B/bench_ops.py" --device cuda --windows 4096 --compile --compile-timeout 20 --skip "${BENCH_SKIP:-triton fp32}" --json "$W/bench_ops.json" > "$W/bench_ops.txt" 2>&1
el "bench_ops rc=$?"; tail -25 "$W/bench_ops.txt"; pack
timeout "${BE_S:-90}" python "$B/bench_embed.py" --device cuda --curves 50000 --naive-curves 200 --batch-size 4096 --read-rows 8192 --json "$W/bench_embed.json" > "$W/bench_embed.txt" 2>&1
el "bench_embed rc=$?"; tail -20 "$W/bench_embed.txt"; pack
timeout "${BT_S:-60}" python "$B/bench_train.py" --device cuda --batch-size 512 --steps 150 --json "$W/bench_train.json" > "$W/bench_train.txt" 2>&1
el "bench_train rc=$?"; tail -5 "$W/bench_train.txt"; pack
el "done"
