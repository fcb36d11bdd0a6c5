"""ftjax.flops: model FLOPs counted from a lowered program's HLO, against exact hand counts."""

import jax
import jax.numpy as jnp
import pytest

from ftjax import flops, models


def _count(fn, *args) -> float:
  return flops.hlo_flops(jax.jit(fn).lower(*args).as_text(dialect="hlo"))


def test_matrix_products_count_two_per_multiply_add():
  x, w = jnp.ones((16, 32)), jnp.ones((32, 8))
  assert _count(lambda x, w: jnp.tanh(x @ w) + 1, x, w) == 2 * 16 * 32 * 8  # elementwise: not counted
  a, b = jnp.ones((4, 5, 6)), jnp.ones((4, 6, 7))
  assert _count(lambda a, b: jnp.einsum("bij,bjk->bik", a, b), a, b) == 2 * 4 * 5 * 6 * 7


@pytest.mark.parametrize("stride, groups", [(1, 1), (2, 1), (1, 8), (2, 8)])
def test_convolutions_and_their_gradients_count_the_forward_work(stride, groups):
  x = jnp.ones((2, 16, 16, 8))
  w = jnp.ones((3, 3, 8 // groups, 4 * (groups > 1) + 4))
  out_features = w.shape[-1]

  def conv(x, w):
    return jax.lax.conv_general_dilated(x, w, (stride, stride), ((1, 1), (1, 1)),
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                        feature_group_count=groups).sum()

  out = jax.eval_shape(lambda x, w: jax.lax.conv_general_dilated(
      x, w, (stride, stride), ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC"),
      feature_group_count=groups), x, w).shape
  forward = 2 * out[0] * out[1] * out[2] * out_features * 3 * 3 * (8 // groups)
  assert _count(conv, x, w) == forward
  # Each gradient is a convolution too (the input's dilated by the stride, the kernel's
  # batch-grouped when the forward was grouped): the same multiply-adds as the forward.
  assert _count(jax.grad(conv, argnums=0), x, w) == forward
  assert _count(jax.grad(conv, argnums=1), x, w) == forward


def test_called_computations_count_once_per_call():
  inner = jax.jit(lambda x: x @ x)
  x = jnp.ones((8, 8))
  text = jax.jit(lambda x: inner(inner(inner(x)))).lower(x).as_text(dialect="hlo")
  assert text.count(" call(") == 3  # one callee, called three times
  assert flops.hlo_flops(text) == 3 * 2 * 8 ** 3
  branches = lambda p, x: jax.lax.cond(p, lambda x: x @ x @ x, lambda x: x, x)
  assert _count(branches, True, x) == 2 * 2 * 8 ** 3  # the larger branch


def test_a_loop_body_counts_once_per_trip():
  x, w = jnp.ones((4, 16, 32)), jnp.ones((32, 8))
  once = 2 * 16 * 32 * 8
  scan = lambda x, w: jax.lax.scan(lambda c, xi: (c + jnp.tanh(xi @ w).sum(), None), 0.0, x)[0]
  assert _count(scan, x, w) == 4 * once  # gradient accumulation's scan over micro-batches
  assert _count(jax.grad(scan, argnums=1), x, w) == 4 * 2 * once  # forward and the kernel's gradient
  fori = lambda x, w: jax.lax.fori_loop(2, 7, lambda i, c: c + (x[0] @ w).sum(), 0.0)
  assert _count(fori, x, w) == 5 * once
  # A loop whose trip count depends on the data: its body once (the count cannot know).
  until = lambda x, w: jax.lax.while_loop(lambda c: c < 10.0, lambda c: c + (x[0] @ w).sum(), 0.0)
  assert _count(until, x, w) == once


def test_vit_b16_forward_equals_the_analytic_count():
  model, _ = models.create("vit", {"variant": "B/16"}, num_classes=1000, image_size=224)
  params = jax.eval_shape(lambda: models.init_variables(model, 224))["params"]
  x = jax.ShapeDtypeStruct((2, 224, 224, 3), jnp.float32)
  counted = _count(lambda p, x: model.apply({"params": p}, x, train=False), params, x) / 2
  t, d, mlp = 197, 768, 3072
  block = 2 * t * d * 3 * d + 2 * 2 * t * t * d + 2 * t * d * d + 2 * 2 * t * d * mlp
  # Once per call, not per image: the folded value bias through each output projection.
  folded = 12 * 2 * d * d / 2
  analytic = 2 * 196 * 16 * 16 * 3 * d + 12 * block + 2 * d * 1000 + folded
  assert counted == analytic  # 35.13 GFLOP: the anchors' 35.2
  assert counted == pytest.approx(35.2e9, rel=0.005)


def test_resnet50_forward_is_torchvisions_count():
  model, _ = models.create("resnet", {"variant": "resnet50"}, num_classes=1000, image_size=224)
  variables = jax.eval_shape(lambda: models.init_variables(model, 224))
  x = jax.ShapeDtypeStruct((1, 224, 224, 3), jnp.float32)
  counted = _count(lambda v, x: model.apply(v, x, train=False), variables, x)
  assert counted / 2 == pytest.approx(4.09e9, rel=0.002)  # torchvision's table: 4.09 G multiply-adds


# cuDNN attention as jax 0.10.2 lowers it for an H100 (bench/gpu_aot.py's compile-only target;
# the CPU cannot lower it): forward and backward custom calls, query and key as (B, T, N, H).
_ATTENTION_HLO = """
HloModule jit_step

ENTRY main.1 {
  q.1 = bf16[8,200,12,64]{3,2,1,0} parameter(0)
  k.1 = bf16[8,200,12,64]{3,2,1,0} parameter(1)
  v.1 = bf16[8,200,12,64]{3,2,1,0} parameter(2)
  s.1 = s32[8]{0} parameter(3)
  dot_product_attention_fwd.5 = (bf16[8,12,200,64]{3,1,2,0}, f32[8,12,200]{2,1,0}, u8[0]{0}) custom-call(q.1, k.1, v.1, s.1, s.1), custom_call_target="__cudnn$fmhaSoftmax", operand_layout_constraints={bf16[8,200,12,64]{3,2,1,0}, bf16[8,200,12,64]{3,2,1,0}, bf16[8,200,12,64]{3,2,1,0}, s32[8]{0}, s32[8]{0}}, api_version=API_VERSION_STATUS_RETURNING, backend_config={"operation_queue_id": "0"}
  o.1 = bf16[8,12,200,64]{3,1,2,0} get-tuple-element(dot_product_attention_fwd.5), index=0
  stats.1 = f32[8,12,200]{2,1,0} get-tuple-element(dot_product_attention_fwd.5), index=1
  ROOT dot_product_attention_bwd.8 = (bf16[8,12,200,64]{3,1,2,0}, bf16[8,12,200,64]{3,1,2,0}, bf16[8,12,200,64]{3,1,2,0}, u8[0]{0}) custom-call(q.1, k.1, v.1, stats.1, q.1, o.1, s.1, s.1), custom_call_target="__cudnn$fmhaSoftmaxBackward", operand_layout_constraints={bf16[8,200,12,64]{3,2,1,0}, bf16[8,200,12,64]{3,2,1,0}, bf16[8,200,12,64]{3,2,1,0}, f32[8,12,200]{2,1,0}, bf16[8,200,12,64]{3,2,1,0}, bf16[8,200,12,64]{3,2,1,0}, s32[8]{0}, s32[8]{0}}, api_version=API_VERSION_STATUS_RETURNING
}
"""


def test_cudnn_attention_counts_the_products_of_unfused_attention():
  # Forward: q k^T and p v, 2 x 2 B N T^2 H; backward: dv, dp, dq, dk, twice that.
  b, t, n, h = 8, 200, 12, 64
  assert flops.hlo_flops(_ATTENTION_HLO) == (4 + 8) * b * n * t * t * h
  # The same products written out for XLA: forward and its gradients (no softmax counted).
  q = jnp.ones((b, t, n, h), jnp.bfloat16)

  def attention(q, k, v):  # a loss that needs the output itself, as a training loss does
    return jnp.square(jax.nn.dot_product_attention(q, k, v, implementation="xla").astype(jnp.float32)).sum()

  assert _count(attention, q, q, q) == 4 * b * n * t * t * h
  assert _count(jax.grad(attention, argnums=(0, 1, 2)), q, q, q) == (4 + 8) * b * n * t * t * h
