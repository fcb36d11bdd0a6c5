#!/usr/bin/env bash
# The whole device call of issue 6 (and issue 7's LoRA memory on the GPU), prepared on the CPU.
#
# Run from the repo root on the GPU machine, with .gpu_carry/ carried (bench/NOTES.md says how
# to fill it: the timm baseline script and the wheels the device image lacks):
#   bash bench/gpu_session.sh            # BUDGET=480 seconds for the bench by default
#   SMOKE=1 bash bench/gpu_session.sh    # here, on the CPU: the same steps at tiny sizes, no timm
# Writes under $OUT (or /tmp/ftjax-bench): attention.jsonl, bench.jsonl, bench.log.
set -u -o pipefail
OUT=${OUT:-/tmp/ftjax-bench}
BUDGET=${BUDGET:-480}
mkdir -p "$OUT"
SMOKE=${SMOKE:+--smoke}
BASELINE="--baseline .gpu_carry/timm_baseline.py"
if [ -n "$SMOKE" ]; then
  BASELINE=""
else
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .gpu_carry/whl/*.whl || exit 1
fi
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
# GEMM autotuning results shared between the bench's processes: compile time only.
export XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_per_fusion_autotune_cache_dir=/tmp/ftjax-autotune"
[ -n "$SMOKE" ] || nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv
python3 -c "import jax, jaxlib, flax, optax, torch, timm; print('jax', jax.__version__, 'jaxlib', jaxlib.__version__, 'flax', flax.__version__, 'optax', optax.__version__, 'torch', torch.__version__, 'timm', timm.__version__, jax.devices())" || exit 1
python3 -c "import ftjax.train" || exit 1

# 1. Attention alone: XLA against cuDNN at each token padding (about 30 s; a diagnostic).
timeout 75 python3 bench/attention.py $SMOKE 2>&1 | tee "$OUT/attention.jsonl"

# 2. The timm baseline, then ours, most important first; the table prints at the end.
# Plain runs use the defaults (ViT attention "auto": cuDNN, tokens padded to a multiple of 8);
# [xla] is the XLA attention path (the first GPU session's plain runs), [fast] adds the tanh
# GELU, [remat] recomputes the blocks in the backward pass.
RUNS="vit:full,vit:head_only,vit:forward,resnet:full,vit:lora,vit:full[xla],vit:full[fast]"
RUNS="$RUNS,resnet:head_only,vit:layer_decay,resnet:forward,vit:lora[remat],vit:full[remat]"
RUNS="$RUNS,resnet:layer_decay"
python3 bench/train_throughput.py $SMOKE $BASELINE --out "$OUT/bench.jsonl" \
  --budget "$BUDGET" --timeout 150 --runs "$RUNS" \
  --arch-variant 'xla={"attention": "xla"}' --arch-variant 'fast={"gelu_approximate": true}' \
  --arch-variant 'remat={"remat": true}' 2>&1 | grep --line-buffered -v -i \
  -e 'constant folding' -e slow_operation -e 'necessarily a bug' -e 'file a bug' -e '^ *%' \
  | tee "$OUT/bench.log"
