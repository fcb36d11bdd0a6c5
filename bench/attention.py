"""ViT-B/16 self-attention alone: XLA against cuDNN flash attention at several token paddings.

One (batch 256, 197 tokens, 12 heads, 64 dims) bf16 attention, forward and
backward (the gradient of sum(out * w) for a fixed random w), per case: ``xla``
unpadded; ``cudnn`` unpadded; ``cudnn`` on tokens that arrive padded to a multiple
of 8, 16, 32 and 64 (200, 208, 224, 256: the ViT's ``token_padding="encoder"``,
only the key mask here); and ``cudnn`` padded to 200 around the call (q, k, v
padded, the output sliced: ``token_padding="attention"``, sessions 1-2's way).
Each case prints a JSON line: milliseconds (median of 20 after 3 warm-ups), the
largest difference of the gradients (over the 197 real tokens) from the XLA case
computed in float32, or the error that refused it, followed by a line naming the
fastest cuDNN padding so far among the padded-once cases (the ViT arch option
``attention_pad_multiple``).

Measured on an H100 (jax 0.11.2, 2026-11-27): xla 3.38 ms; cudnn unpadded refused
("Unsupported sequence length Q 197, KV 197"); cudnn padded to 200 tokens
(multiple 8) 1.52 ms.  The larger paddings were not reached in that call.

    python bench/attention.py            # GPU
    python bench/attention.py --smoke    # CPU: XLA only, small batch, checks both paddings
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp

from ftjax.models.vit import attend, padded_length


def timed(fn, *args, reps: int = 20) -> float:
  for _ in range(3):
    jax.block_until_ready(fn(*args))
  times = []
  for _ in range(reps):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t0)
  return statistics.median(times) * 1e3


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--smoke", action="store_true")
  a = ap.parse_args(argv)
  batch = 2 if a.smoke else 256
  q, k, v, w = jax.random.normal(jax.random.key(0), (4, batch, 197, 12, 64), jnp.float32)
  lo = [x.astype(jnp.bfloat16) for x in (q, k, v)]

  # Every array is an argument: closed over, XLA would constant-fold them for minutes.
  def loss_and_grads(impl, pad, once):
    # Once: the tokens arrive padded (token_padding "encoder"), only the mask here;
    # otherwise attend pads and slices around the call (token_padding "attention").
    multiple, valid = (1, 197) if once else (pad, None)

    def f(q, k, v, w):
      return (attend(q, k, v, impl, multiple, valid=valid).astype(jnp.float32) * w).sum()
    return jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2)))

  reference = jax.jit(jax.grad(lambda q, k, v, w: (attend(q, k, v, "xla", 1) * w).sum(),
                               argnums=(0, 1, 2)))
  ref = reference(*(x.astype(jnp.float32) for x in lo), w)
  # 197 tokens as they are (refused by jax 0.11.2), then padded once to 200, 208, 224 and
  # 256, then padded around the call to 200 (sessions 1-2's way, for the copies it costs).
  cases = [("xla", 1, False)]
  if a.smoke:
    cases += [("xla", 8, True), ("xla", 64, False)]
  else:
    cases += [("cudnn", 1, False)] + [("cudnn", m, True) for m in (8, 16, 32, 64)]
    cases += [("cudnn", 8, False)]
  best = None
  for impl, pad, once in cases:
    row = {"bench": "attention", "impl": impl, "pad_multiple": pad,
           "padding": "once" if once else "per call", "batch": batch}
    try:
      fn = loss_and_grads(impl, pad, once)
      args = [*lo, w]
      if once:
        widths = ((0, 0), (0, padded_length(197, pad) - 197), (0, 0), (0, 0))
        args = [jnp.pad(x, widths) for x in args]  # w zero there: the padding rows count nothing
      _, grads = fn(*args)
      row["grad_max_diff"] = max(float(jnp.abs(g[:, :197].astype(jnp.float32) - r).max())
                                 for g, r in zip(grads, ref))
      row["grad_max_ref"] = max(float(jnp.abs(r).max()) for r in ref)
      row["ms"] = round(timed(fn, *args), 3)
      if impl == "cudnn" and once and (best is None or row["ms"] < best[1]):
        best = (pad, row["ms"])
    except Exception as e:  # a refusal is a result here: report it and go on
      row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
    print(json.dumps(row), flush=True)
    # after each case: a run cut short still names the best padding it has seen
    print(json.dumps({"bench": "attention", "best_cudnn_pad_multiple": best and best[0]}), flush=True)
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
