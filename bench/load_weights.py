"""Times loading a ViT-B/16-sized safetensors file: ``safetensors.numpy.load_file`` vs ftjax.

Acceptance (issue 2): ``ftjax.models.from_pretrained`` takes at most 2x the
time of ``safetensors.numpy.load_file`` on the same file.  Run::

  python bench/load_weights.py [--repeats 5]

It writes a file with random weights in timm's ``vit_base_patch16_224`` layout
(86.6M parameters, 346 MB) to a temporary directory, then prints the best of
``--repeats`` runs of each loader and their ratio.  Both read the file from the
page cache after the first run; the numbers are wall-clock seconds on this
machine, not a property of the code alone.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import safetensors.numpy

from ftjax.models import from_pretrained

NAME = "vit_base_patch16_224"


def timm_vit_b16_tensors(seed: int = 0) -> dict[str, np.ndarray]:
  """Random float32 tensors with the names and shapes of timm's vit_base_patch16_224."""
  rng = np.random.default_rng(seed)
  d, mlp, layers, classes = 768, 3072, 12, 1000
  shapes = {"cls_token": (1, 1, d), "pos_embed": (1, 197, d), "patch_embed.proj.weight": (d, 3, 16, 16),
            "patch_embed.proj.bias": (d,), "norm.weight": (d,), "norm.bias": (d,),
            "head.weight": (classes, d), "head.bias": (classes,)}
  for i in range(layers):
    b = f"blocks.{i}."
    shapes.update({b + "norm1.weight": (d,), b + "norm1.bias": (d,), b + "attn.qkv.weight": (3 * d, d),
                   b + "attn.qkv.bias": (3 * d,), b + "attn.proj.weight": (d, d), b + "attn.proj.bias": (d,),
                   b + "norm2.weight": (d,), b + "norm2.bias": (d,), b + "mlp.fc1.weight": (mlp, d),
                   b + "mlp.fc1.bias": (mlp,), b + "mlp.fc2.weight": (d, mlp), b + "mlp.fc2.bias": (d,)})
  return {k: rng.standard_normal(s, dtype=np.float32) * 0.02 for k, s in shapes.items()}


def best_time(fn, repeats: int) -> float:
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return min(times)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--repeats", type=int, default=5)
  args = parser.parse_args()
  with tempfile.TemporaryDirectory() as tmp:
    path = Path(tmp) / "model.safetensors"
    tensors = timm_vit_b16_tensors()
    safetensors.numpy.save_file(tensors, str(path))
    count = sum(t.size for t in tensors.values())
    megabytes = path.stat().st_size / 1e6
    del tensors
    # One untimed run of the reader first: the page cache is warm for both loaders.
    safetensors.numpy.load_file(str(path))
    start = time.perf_counter()
    from_pretrained(f"timm:{NAME}@{path}")  # the first call also traces the model once
    t_first = time.perf_counter() - start
    t_st = best_time(lambda: safetensors.numpy.load_file(str(path)), args.repeats)
    t_ft = best_time(lambda: from_pretrained(f"timm:{NAME}@{path}"), args.repeats)
  print(f"file: {NAME}, {count / 1e6:.1f}M float32 parameters, {megabytes:.0f} MB")
  print(f"safetensors.numpy.load_file: {t_st * 1e3:8.1f} ms (best of {args.repeats})")
  print(f"ftjax from_pretrained:       {t_ft * 1e3:8.1f} ms (best of {args.repeats})")
  print(f"ratio ftjax / safetensors:   {t_ft / t_st:8.2f} (acceptance: <= 2)")
  print(f"ftjax first call in process: {t_first * 1e3:8.1f} ms (includes tracing the model, "
        f"{t_first / t_st:.2f}x)")


if __name__ == "__main__":
  main()
