#!/usr/bin/env bash
# The whole device call of issue 6 (and issue 7's LoRA memory on the GPU), prepared on the CPU.
#
# Run from the repo root on the GPU machine, with .gpu_carry/ carried (bench/NOTES.md says how
# to fill it: the timm baseline script and the wheels the device image lacks):
#   bash bench/gpu_session.sh            # BUDGET=480 seconds for the bench by default
#   SMOKE=1 bash bench/gpu_session.sh    # here, on the CPU: the same steps at tiny sizes, no timm
#   SET=finish bash bench/gpu_session.sh # what session 8's budget left out, ViT: LoRA, layer decay,
#                                        # the levers not yet measured; no attention probe
#   SET=finish-resnet bash bench/gpu_session.sh  # the same for ResNet-50 (a second, short call)
# Writes under $OUT (or /tmp/ftjax-bench): attention.jsonl, bench.jsonl, bench.log and the
# kernel summaries vit-full.profile.json, resnet-full.profile.json, vit-head_only.profile.json.
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

SET=${SET:-all}
case "$SET" in all|finish|finish-resnet) ;;
  *) echo "gpu_session.sh: unknown SET '$SET': all, finish or finish-resnet" >&2; exit 2;; esac

# 1. Attention alone: XLA against cuDNN at each token padding (about 30 s; a diagnostic).
# The finish sets skip it: session 8's probe found padding to 16 fastest (1.257 ms against
# 1.311 at 8).
if [ "$SET" != all ]; then
  echo '{"bench": "attention", "best_cudnn_pad_multiple": 16, "from": "session 8 probe"}' >"$OUT/attention.jsonl"
else
  timeout 75 python3 bench/attention.py $SMOKE 2>&1 | tee "$OUT/attention.jsonl"
fi

# The fastest cuDNN padding the probe saw, when it is not the default 8: one more ViT run with it.
BEST_PAD=$(python3 -c "
import json, sys
best = None
for line in open(sys.argv[1]):
  try:
    best = json.loads(line).get('best_cudnn_pad_multiple', best)
  except ValueError:
    pass
print(best if best not in (None, 8) else '')" "$OUT/attention.jsonl" 2>/dev/null)

# 2. The timm baseline, then ours, most important first; the table prints at the end.
# Plain runs use the defaults (ViT attention "auto": cuDNN, the tokens padded once to a
# multiple of 8 before the blocks, the attention's key and value biases folded away,
# LayerNorm's backward from the forward's row statistics; ResNet BatchNorm moments in one
# pass; ResNet's max-pool gradient gathered from an int8 map of each window's chosen tap;
# frozen weights cast to bf16 once, not every step).  Levers: [flaxpool] ResNet's stem
# max-pool differentiated by JAX (a select-and-scatter; max_pool_impl "flax"); [nocast] every step
# casts the frozen weights itself (the bench-only arch key frozen_cast false); [nofold]
# every attention bias added where the checkpoint's model adds it (fold_attention_bias
# false); [flaxln] flax's LayerNorm differentiated by JAX (layer_norm_impl "flax");
# [attnpad] the per-layer padding of sessions 1-2 (token_padding "attention"); [fast] the
# tanh GELU (opt-in: about 1e-3 off; XLA's deviceless compile: no GEMM epilogue, and 3.5 GiB
# more bytes written a step than the erf GELU as ftjax now writes it); [merge] lets XLA's
# dot merger join the q/k/v projections (it skips dots over 32 MB of operands and result,
# ours are 155 MB; since the biases are folded, k and v then need copies out of the merged
# GEMM for cuDNN: 8.8 GiB more traffic in the deviceless compile); [det] --xla_gpu_deterministic_ops (train.deterministic: its cost, and
# whether repeats then agree); [pad] the probe's best padding (only when not 8); [xla]
# XLA's attention.  The plain full and head-only runs are profiled (kernel time by
# category, bench/kernel_profile.py); the plain full runs and [det] also run two steps
# twice and compare the results bit for bit.
RUNS="vit:full,resnet:full,vit:head_only,vit:forward,resnet:full[flaxpool]"
RUNS="$RUNS,vit:head_only[nocast],vit:full[nofold]"
RUNS="$RUNS,vit:full[flaxln],vit:full[attnpad],vit:full[det],vit:full[fast]"
RUNS="$RUNS,vit:full[merge]${BEST_PAD:+,vit:full[pad]},vit:lora,vit:full[xla]"
RUNS="$RUNS,resnet:head_only,vit:layer_decay,resnet:forward"
PROFILED=vit:full,resnet:full,vit:head_only
REPEATED="vit:full,resnet:full,vit:full[det]"
if [ "$SET" = finish ]; then
  # Session 8 measured the first seven above; its [det] crashed compiling (IndexError from
  # absl's raw_hash_map::at) with the autotune cache the plain runs had filled, so [det]
  # now keeps its own cache. The plain ViT run again: the levers' reference in this call.
  # [convpatch]: the patch embedding as nn.Conv again (session 8's code), against the
  # plain runs' 1 x 1 convolution over the patches. ViT only: timm's baseline then runs
  # ViT alone (session 8: a ViT run takes about 45 s, process start to exit).
  RUNS="vit:full,vit:full[convpatch],vit:lora,vit:layer_decay,vit:head_only,vit:head_only[convpatch]"
  RUNS="$RUNS,vit:full[attnpad],vit:full[fast],vit:full[det],vit:full[pad],vit:full[merge],vit:full[xla]"
  PROFILED=vit:full
  REPEATED="vit:full[det]"
elif [ "$SET" = finish-resnet ]; then
  # [s2d]: the stem convolution on 2 x 2 blocks (opt-in stem_conv_impl "space_to_depth").
  RUNS="resnet:full,resnet:full[s2d],resnet:layer_decay,resnet:head_only,resnet:forward"
  PROFILED=""
  REPEATED=""
fi
python3 bench/train_throughput.py $SMOKE $BASELINE --out "$OUT/bench.jsonl" \
  --budget "$BUDGET" --timeout 150 --runs "$RUNS" --variant-configs "" \
  --arch-variant 'flaxpool={"max_pool_impl": "flax"}' \
  --arch-variant 'nocast={"frozen_cast": false}' \
  --arch-variant 'nofold={"fold_attention_bias": false}' \
  --arch-variant 'flaxln={"layer_norm_impl": "flax"}' \
  --arch-variant 'attnpad={"token_padding": "attention"}' \
  --arch-variant 'fast={"gelu_approximate": true}' --variant 'det=--xla_gpu_deterministic_ops=true --xla_gpu_per_fusion_autotune_cache_dir=/tmp/ftjax-autotune-det' \
  --variant merge=--xla_gpu_dot_merger_threshold_mb=1024 \
  --arch-variant "pad={\"attention_pad_multiple\": ${BEST_PAD:-8}}" \
  --arch-variant 'xla={"attention": "xla"}' \
  --arch-variant 'convpatch={"patch_embed_impl": "flax"}' \
  --arch-variant 's2d={"stem_conv_impl": "space_to_depth"}' \
  --profile-runs "$PROFILED" --profile-dir /tmp/ftjax-profile \
  --repeat-runs "$REPEATED" 2>&1 | grep --line-buffered -v -i \
  -e 'constant folding' -e slow_operation -e 'necessarily a bug' -e 'file a bug' -e '^ *%' \
  | tee "$OUT/bench.log"
# The full summaries (top ops with their HLO) come back too: 3 files of the 8 allowed.
cp /tmp/ftjax-profile/*.profile.json "$OUT/" 2>/dev/null
true
