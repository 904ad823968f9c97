#!/usr/bin/env bash
# One prepared GPU check: build, CUDA/Triton tests, benchmarks; everything lands under $OUT.
# Run through the device tool from the repository root, e.g. with timeout_s=420:
#   bash bench/gpu_check.sh
# Real data for the data tests travels in gpu_data/ (git-ignored; name it in `carry`).
set -uo pipefail
OUT="${OUT:-$PWD/gpu_out}"
mkdir -p "$OUT"
exec > >(tee "$OUT/log.txt") 2>&1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
t0=$(date +%s)
ASTROMER_FAST_CUDA=1 ASTROMER_FAST_CUDA_ARCHS="${ASTROMER_FAST_CUDA_ARCHS:-90}" \
  pip install --no-build-isolation --no-deps . > "$OUT/build.txt" 2>&1 || { tail -40 "$OUT/build.txt"; exit 1; }
echo "build: $(( $(date +%s) - t0 )) s"
astromer-fast info
[ -d gpu_data ] && export ASTROMER_FAST_SHARED_DATA="$PWD/gpu_data"
pytest python_tests -q -x -ra 2>&1 | tail -25 | tee "$OUT/tests.txt"
python bench/bench_model.py --device cuda --windows 4096 --json "$OUT/bench_model.json" \
  | tee "$OUT/bench_model.txt"
python bench/bench_ops.py --device cuda --windows 4096 --json "$OUT/bench_ops.json" | tee "$OUT/bench_ops.txt"
python bench/bench_embed.py --device cuda --curves 100000 --naive-curves 200 --batch-size 4096 --json "$OUT/bench_embed.json" | tee "$OUT/bench_embed.txt"
