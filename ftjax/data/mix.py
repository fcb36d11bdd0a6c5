"""Mixup and CutMix on device, per batch, inside the jitted train step.

Each example is mixed with its mirror in the batch (example ``i`` with ``B-1-i``, as
timm does): no permutation to draw, and still a different partner for every example.
The labels are mixed in the same proportion as the pixels, so soft labels keep summing
to 1.

>>> import jax, jax.numpy as jnp
>>> x = jnp.arange(2 * 2 * 2 * 3, dtype=jnp.float32).reshape(2, 2, 2, 3)
>>> y = jax.nn.one_hot(jnp.array([0, 1]), 2)
>>> xm, ym = mixup_cutmix(jax.random.key(0), x, y, mixup_alpha=0.0, cutmix_alpha=0.0)
>>> bool((xm == x).all() and (ym == y).all())
True
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _mixup(images, labels, lam):
  return (lam * images + (1 - lam) * images[::-1],
          lam * labels + (1 - lam) * labels[::-1])


def _cutmix(key, images, labels, lam):
  _, h, w, _ = images.shape
  cut = jnp.sqrt(1.0 - lam)
  ky, kx = jax.random.split(key)
  cy = jax.random.uniform(ky, (), minval=0.0, maxval=h)
  cx = jax.random.uniform(kx, (), minval=0.0, maxval=w)
  y0 = jnp.clip(jnp.round(cy - cut * h / 2), 0, h)
  y1 = jnp.clip(jnp.round(cy + cut * h / 2), 0, h)
  x0 = jnp.clip(jnp.round(cx - cut * w / 2), 0, w)
  x1 = jnp.clip(jnp.round(cx + cut * w / 2), 0, w)
  rows = jnp.arange(h)[:, None]
  cols = jnp.arange(w)[None, :]
  inside = (rows >= y0) & (rows < y1) & (cols >= x0) & (cols < x1)
  mixed = jnp.where(inside[None, :, :, None], images[::-1], images)
  # The box was clipped at the border: weigh labels by the area actually pasted.
  kept = 1.0 - (y1 - y0) * (x1 - x0) / (h * w)
  return mixed, kept * labels + (1 - kept) * labels[::-1]


def mixup_cutmix(rng: jax.Array, images: jax.Array, labels_onehot: jax.Array, *,
                 mixup_alpha: float, cutmix_alpha: float,
                 switch_prob: float = 0.5) -> tuple[jax.Array, jax.Array]:
  """Mixes a batch; returns (images, soft labels). Identity when both alphas are 0.

  Args:
    rng: a JAX key, one per step.
    images: float [B, H, W, C].
    labels_onehot: float [B, num_classes] (one-hot or already smoothed).
    mixup_alpha, cutmix_alpha: Beta(alpha, alpha) concentration; 0 turns one off.
      Python floats: they choose the code that is traced.
    switch_prob: with both on, the chance that a batch uses CutMix rather than mixup.
  """
  if mixup_alpha <= 0 and cutmix_alpha <= 0:
    return images, labels_onehot
  labels = labels_onehot.astype(jnp.float32)
  k_switch, k_lam, k_box = jax.random.split(rng, 3)
  if mixup_alpha > 0 and cutmix_alpha > 0:
    use_cutmix = jax.random.uniform(k_switch) < switch_prob
    alpha = jnp.where(use_cutmix, cutmix_alpha, mixup_alpha)
  else:
    use_cutmix = jnp.asarray(cutmix_alpha > 0)
    alpha = jnp.asarray(max(mixup_alpha, cutmix_alpha), jnp.float32)
  lam = jax.random.beta(k_lam, alpha, alpha).astype(jnp.float32)
  mx, my = _mixup(images, labels, lam.astype(images.dtype))
  cx, cy = _cutmix(k_box, images, labels, lam)
  out_dtype = labels_onehot.dtype if jnp.issubdtype(labels_onehot.dtype, jnp.floating) else jnp.float32
  return (jnp.where(use_cutmix, cx, mx).astype(images.dtype),
          jnp.where(use_cutmix, cy, my).astype(out_dtype))
