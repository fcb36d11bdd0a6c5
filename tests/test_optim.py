"""Tests of ftjax.optim: param groups, freezing, layer decay, unfreezing, wd, schedules, plan."""

from __future__ import annotations

import functools
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax.core import FrozenDict

from ftjax import optim
from ftjax import tree as tree_lib
from ftjax.errors import ConfigError

F32 = jnp.float32


# ----------------------------------------------------------------------------- synthetic trees


def sds(*shape):
  return jax.ShapeDtypeStruct(shape, F32)


def vit_shapes(layers=12, hidden=768, mlp=3072, classes=10, tokens=197, patch=16,
               pre_logits=False):
  """A ViT parameter tree (vit_jax naming) of ShapeDtypeStructs: ViT-B/16 by default."""
  def dense(i, o):
    return {"kernel": sds(i, o), "bias": sds(o)}

  def norm():
    return {"scale": sds(hidden), "bias": sds(hidden)}

  heads, head_dim = 12, hidden // 12
  attn = {name: {"kernel": sds(hidden, heads, head_dim), "bias": sds(heads, head_dim)}
          for name in ("query", "key", "value")}
  attn["out"] = {"kernel": sds(heads, head_dim, hidden), "bias": sds(hidden)}
  block = {"LayerNorm_0": norm(), "MultiHeadDotProductAttention_1": attn, "LayerNorm_2": norm(),
           "MlpBlock_3": {"Dense_0": dense(hidden, mlp), "Dense_1": dense(mlp, hidden)}}
  transformer = {f"encoderblock_{i}": block for i in range(layers)}
  transformer["posembed_input"] = {"pos_embedding": sds(1, tokens, hidden)}
  transformer["encoder_norm"] = norm()
  params = {"embedding": {"kernel": sds(patch, patch, 3, hidden), "bias": sds(hidden)},
            "cls": sds(1, 1, hidden), "Transformer": transformer, "head": dense(hidden, classes)}
  if pre_logits:
    params["pre_logits"] = dense(hidden, hidden)
  return params


def resnet50_shapes(classes=10, v2=False):
  """A ResNet-50 parameter tree (ftjax resnet naming) of ShapeDtypeStructs."""
  def conv(k, i, o):
    return {"kernel": sds(k, k, i, o)}

  def bn(c):
    return {"scale": sds(c), "bias": sds(c)}

  params = {"stem": {"conv": conv(7, 3, 64), "bn": bn(64)}}
  cin = 64
  for s, (blocks, width) in enumerate(zip((3, 4, 6, 3), (64, 128, 256, 512)), start=1):
    stage = {}
    for b in range(blocks):
      block = {"conv1": conv(1, cin, width), "bn1": bn(width), "conv2": conv(3, width, width),
               "bn2": bn(width), "conv3": conv(1, width, 4 * width), "bn3": bn(4 * width)}
      if b == 0:
        block["proj"] = conv(1, cin, 4 * width)
        block["proj_bn"] = bn(4 * width)
      stage[f"block{b}"] = block
      cin = 4 * width
    params[f"stage{s}"] = stage
  if v2:
    params["norm"] = bn(cin)
  params["head"] = {"kernel": sds(cin, classes), "bias": sds(classes)}
  return params


def materialize(shapes, seed=0):
  """Random float32 arrays for a tree of ShapeDtypeStructs."""
  flat = tree_lib.flatten(shapes)
  rng = np.random.default_rng(seed)
  return tree_lib.unflatten({p: rng.standard_normal(s.shape).astype(np.float32)
                             for p, s in flat.items()})


def small_tree():
  return materialize({"body": {"kernel": sds(4, 4), "bias": sds(4)},
                      "mid": {"kernel": sds(4, 4), "scale": sds(4)},
                      "head": {"kernel": sds(4, 3), "bias": sds(3)}})


def float_count(state) -> int:
  return sum(x.size for x in jax.tree.leaves(state) if jnp.issubdtype(x.dtype, jnp.floating))


# ----------------------------------------------------------------------------- groups and labels


def test_sgd_update_is_exactly_minus_lr_times_lr_mult_times_grad():
  params = small_tree()
  grads = materialize(jax.tree.map(lambda x: sds(*x.shape), params), seed=1)
  lr = 0.01
  mults = {"head": 10.0, "mid": 0.3, "body": 1.0}
  config = {"name": "sgd", "kwargs": {}, "lr": lr, "schedule": {"name": "constant"},
            "param_groups": [("head/.*", {"lr_mult": 10.0}), ("mid/.*", {"lr_mult": 0.3}),
                             (".*", {})]}
  tx = optim.make_optimizer(params, config, total_steps=10)
  updates, _ = jax.jit(tx.update)(grads, tx.init(params), params)
  for path, u in tree_lib.flatten(updates).items():
    g = tree_lib.flatten(grads)[path]
    expected = np.float32(-(lr * mults[path.split("/")[0]])) * g
    np.testing.assert_array_equal(np.asarray(u), expected, err_msg=path)
  assert tree_lib.flatten(optim.param_labels(params, config)) == {
      "body/bias": "g2", "body/kernel": "g2", "head/bias": "g0", "head/kernel": "g0",
      "mid/kernel": "g1", "mid/scale": "g1"}


def test_frozendict_params_and_labels_keep_their_container():
  params = FrozenDict(small_tree())
  config = {"name": "adam", "kwargs": {}, "lr": 0.1, "weight_decay": 0.1,
            "param_groups": [("head/.*", {}), (".*", None)], "grad_clip_norm": 1.0}
  labels = optim.param_labels(params, config)
  assert isinstance(labels, FrozenDict) and labels["head"]["kernel"] == "g0"
  tx = optim.make_optimizer(params, config, total_steps=10)
  grads = jax.tree.map(jnp.ones_like, params)
  updates, _ = jax.jit(tx.update)(grads, tx.init(params), params)
  assert isinstance(updates, FrozenDict)
  assert float(jnp.abs(updates["body"]["kernel"]).sum()) == 0.0
  assert float(jnp.abs(updates["head"]["kernel"]).min()) > 0.0
  # Built from a plain dict, used with a FrozenDict: labels follow the tree they are given.
  tx = optim.make_optimizer(small_tree(), config, total_steps=10)
  mixed, _ = jax.jit(tx.update)(grads, tx.init(params), params)
  assert _leaves_equal(mixed, updates)


def _loss(params, x, y):
  h = jnp.tanh(x @ params["body"]["kernel"] + params["body"]["bias"])
  h = jnp.tanh(h @ params["mid"]["kernel"]) * params["mid"]["scale"]
  logits = h @ params["head"]["kernel"] + params["head"]["bias"]
  return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def _batch(step, n=8):
  key = jax.random.fold_in(jax.random.key(0), step)
  kx, ky = jax.random.split(key)
  return jax.random.normal(kx, (n, 4)), jax.random.randint(ky, (n,), 0, 3)


def _train_step(tx, params, state, step):
  x, y = _batch(step)
  loss, grads = jax.value_and_grad(_loss)(params, x, y)
  updates, state = tx.update(grads, state, params)
  return optax.apply_updates(params, updates), state, loss


def test_frozen_leaves_bit_identical_after_50_steps_with_weight_decay():
  params = small_tree()
  config = {"name": "adamw", "kwargs": {}, "lr": 0.05, "weight_decay": 0.5, "grad_clip_norm": 1.0,
            "wd_rules": [(".*", 1.0)],  # decay everything that trains, biases included
            "param_groups": [("body/.*", None), (".*", {})]}
  tx = optim.make_optimizer(params, config, total_steps=50)
  step = jax.jit(functools.partial(_train_step, tx))
  new, state = params, tx.init(params)
  for s in range(50):
    new, state, _ = step(new, state, s)
  for path, leaf in tree_lib.flatten(params).items():
    after = np.asarray(tree_lib.flatten(new)[path])
    if path.startswith("body/"):
      assert after.tobytes() == leaf.tobytes(), path
    else:
      assert not np.array_equal(after, leaf), path
  # No optimizer state for the frozen leaves: adam moments for mid + head only.
  assert float_count(state) == 2 * (16 + 4 + 12 + 3)


def test_default_weight_decay_is_kernels_only_and_rules_override():
  params = materialize(vit_shapes(layers=1, hidden=24, mlp=8, classes=3, tokens=5, patch=2))
  zeros = jax.tree.map(np.zeros_like, params)
  base = {"name": "sgd", "kwargs": {}, "lr": 0.1, "weight_decay": 0.5,
          "schedule": {"name": "constant"}}
  tx = optim.make_optimizer(params, base, total_steps=10)
  updates = tree_lib.flatten(tx.update(zeros, tx.init(params), params)[0])
  flat = tree_lib.flatten(params)
  for path, u in updates.items():
    if path.endswith("kernel"):
      np.testing.assert_array_equal(u, -np.float32(0.1 * 0.5) * flat[path], err_msg=path)
    else:  # biases, norms, pos embedding, class token
      np.testing.assert_array_equal(u, np.zeros_like(u), err_msg=path)
  config = dict(base, wd_rules=[("Transformer/posembed_input/.*", 2.0), ("head/kernel", 0.0)],
                param_groups=[("embedding/.*", {"wd_mult": 0.0}), (".*", {"wd_mult": 1.0})])
  tx = optim.make_optimizer(params, config, total_steps=10)
  updates = tree_lib.flatten(tx.update(zeros, tx.init(params), params)[0])
  pos = "Transformer/posembed_input/pos_embedding"
  np.testing.assert_array_equal(updates[pos], -np.float32(0.1 * 0.5 * 2.0) * flat[pos])
  assert not np.any(updates["head/kernel"]) and not np.any(updates["embedding/kernel"])
  dense = "Transformer/encoderblock_0/MlpBlock_3/Dense_0/kernel"
  np.testing.assert_array_equal(updates[dense], -np.float32(0.1 * 0.5) * flat[dense])


def test_per_group_optimizer_and_schedule():
  params = small_tree()
  grads = jax.tree.map(np.ones_like, params)
  config = {"name": "sgd", "kwargs": {"momentum": 0.9}, "lr": 0.1,
            "schedule": {"name": "warmup_cosine", "warmup_steps": 5},
            "param_groups": [("head/.*", {"name": "adam", "kwargs": {"b1": 0.5},
                                          "schedule": {"name": "constant", "warmup_steps": 0}}),
                             (".*", {})]}
  tx = optim.make_optimizer(params, config, total_steps=20)
  state = tx.init(params)
  updates, state = tx.update(grads, state, params)
  # The head runs adam at a constant 0.1: first step -0.1 * g / (|g| + eps).
  ref = optax.adam(0.1, b1=0.5)
  ref_u, _ = ref.update(grads["head"], ref.init(params["head"]), params["head"])
  np.testing.assert_array_equal(updates["head"]["kernel"], ref_u["kernel"])
  # The others run sgd with warm-up: step 0 has lr 0.
  assert not np.any(updates["body"]["kernel"])
  assert float_count(state.inner_states["g0"]) == 2 * (12 + 3)  # adam mu + nu, head only
  assert float_count(state.inner_states["g1"]) == 16 + 4 + 16 + 4  # sgd trace


def _clip_config(**extra):
  return dict({"name": "sgd", "kwargs": {}, "lr": 1.0, "schedule": {"name": "constant"},
               "grad_clip_norm": 1.0}, **extra)


def test_grad_clip_norm_scales_the_gradient_to_the_norm():
  # |[3, 4]| = 5 > 1: SGD at lr 1 steps by -[3, 4] / 5.
  params = {"w": np.zeros(2, np.float32)}
  tx = optim.make_optimizer(params, _clip_config(), total_steps=10)
  updates, _ = tx.update({"w": np.array([3.0, 4.0], np.float32)}, tx.init(params), params)
  np.testing.assert_allclose(updates["w"], [-0.6, -0.8], rtol=1e-6)


def test_frozen_gradients_stay_out_of_the_clip_norm():
  # A huge frozen gradient in the norm would shrink the trainable step to ~0.
  params = {"head": {"w": np.zeros(2, np.float32)}, "body": {"w": np.zeros(2, np.float32)}}
  grads = {"head": {"w": np.array([3.0, 4.0], np.float32)},
           "body": {"w": np.full(2, 1e6, np.float32)}}
  tx = optim.make_optimizer(params, _clip_config(param_groups=[("head/.*", {}), (".*", None)]),
                            total_steps=10)
  updates, _ = tx.update(grads, tx.init(params), params)
  np.testing.assert_allclose(updates["head"]["w"], [-0.6, -0.8], rtol=1e-6)
  np.testing.assert_array_equal(updates["body"]["w"], [0.0, 0.0])


# ----------------------------------------------------------------------------- layer decay


def test_vit_b16_layer_decay_multipliers_and_plan():
  params = vit_shapes()
  mults = tree_lib.flatten(optim.layer_decay_multipliers(params, "vit", 0.75))
  assert mults["head/kernel"] == 1.0 and mults["Transformer/encoder_norm/scale"] == 1.0
  assert mults["Transformer/encoderblock_11/LayerNorm_0/scale"] == 0.75
  assert mults["Transformer/encoderblock_0/MlpBlock_3/Dense_0/kernel"] == 0.75 ** 12
  for emb in ("embedding/kernel", "cls", "Transformer/posembed_input/pos_embedding"):
    assert mults[emb] == 0.75 ** 13
  config = {"layer_decay": 0.75, "lr": 0.01, "weight_decay": 0.05}
  plan = optim.fine_tuning_plan(params, config, family="vit", total_steps=1000)
  assert str(plan).splitlines()[0] == (
      "fine-tuning plan: 1,000 steps, layer_decay 0.75 (vit), weight_decay 0.05")
  assert len(plan.rows) == 14
  assert plan.row("g0.d13").lr_mult == 1.0
  assert plan.row("g0.d13").modules == "Transformer/encoder_norm, head"
  assert plan.row("g0.d12").lr_mult == 0.75
  assert plan.row("g0.d12").modules == "Transformer/encoderblock_11"
  assert plan.row("g0.d0").lr_mult == 0.75 ** 13
  assert plan.row("g0.d0").modules == "Transformer/posembed_input, cls, embedding"
  lines = {line.split()[0]: line.split() for line in str(plan).splitlines()[2:16]}
  assert lines["g0.d13"][3] == "1" and lines["g0.d12"][3] == "0.75"
  assert lines["g0.d0"][3] == f"{0.75 ** 13:.6g}" == "0.0237573"
  assert plan.trainable_params == 85_806_346 and plan.frozen_params == 0
  # Layer decay multiplies with the regex multipliers.
  config = {"layer_decay": 0.75, "param_groups": [("head/.*", {"lr_mult": 10.0}), (".*", {})]}
  plan = optim.fine_tuning_plan(params, config, family="vit", total_steps=1000)
  assert plan.row("g0.d13").lr_mult == 10.0 and plan.row("g0.d13").modules == "head"
  assert plan.row("g1.d13").lr_mult == 1.0
  assert plan.row("g1.d1").lr_mult == 0.75 ** 12


def test_resnet50_stage_multipliers_and_plan():
  params = resnet50_shapes()
  mults = tree_lib.flatten(optim.layer_decay_multipliers(params, "resnet", 0.5))
  assert mults["stem/conv/kernel"] == 0.5 ** 5
  assert mults["stage1/block2/conv3/kernel"] == 0.5 ** 4
  assert mults["stage2/block3/bn1/scale"] == 0.5 ** 3
  assert mults["stage3/block5/conv2/kernel"] == 0.5 ** 2
  assert mults["stage4/block0/proj/kernel"] == 0.5
  assert mults["head/bias"] == 1.0
  plan = optim.fine_tuning_plan(params, {"layer_decay": 0.5}, family="resnet", total_steps=100)
  assert [(r.label, r.lr_mult, r.modules) for r in plan.rows] == [
      ("g0.d5", 1.0, "head"), ("g0.d4", 0.5, "stage4/block0, stage4/block1, stage4/block2"),
      ("g0.d3", 0.25, plan.row("g0.d3").modules), ("g0.d2", 0.125, plan.row("g0.d2").modules),
      ("g0.d1", 0.0625, "stage1/block0, stage1/block1, stage1/block2"),
      ("g0.d0", 0.03125, "stem/bn, stem/conv")]
  assert plan.trainable_params == 23_528_522  # torchvision resnet50 with a 10-class head
  v2 = tree_lib.flatten(optim.layer_decay_multipliers(resnet50_shapes(v2=True), "resnetv2", 0.5))
  assert v2["norm/scale"] == 1.0 and v2["stage4/block1/conv1/kernel"] == 0.5


def test_efficientnet_depths():
  params = {"stem": {"conv": {"kernel": 0}}, "stage0": {"block0": {"kernel": 0}},
            "stage6": {"block0": {"kernel": 0}}, "conv_head": {"kernel": 0},
            "head": {"kernel": 0, "bias": 0}}
  assert tree_lib.flatten(optim.layer_depths(params, "efficientnet")) == {
      "conv_head/kernel": 8, "head/bias": 8, "head/kernel": 8, "stage0/block0/kernel": 1,
      "stage6/block0/kernel": 7, "stem/conv/kernel": 0}


def test_layer_depths_cover_the_ftjax_model_families():
  """The contract with ftjax.models: every parameter of each family has a depth."""
  from ftjax.models import efficientnet, resnet, vit
  images = jnp.ones((1, 32, 32, 3), F32)
  cases = [("vit", vit.create_model({"variant": "Ti/16"}, 10), 13),
           ("vit", vit.create_model({"variant": "Ti/16", "pooling": "gap", "fc_norm": True}, 10), 13),
           ("vit", vit.create_model({"variant": "Ti/16", "pooling": "map", "posemb": "sincos2d"}, 10), 13),
           ("vit", vit.create_model({"variant": "Ti/16", "reg_tokens": 4, "layer_scale": 1e-5}, 10), 13),
           ("resnet", resnet.create_resnet({"variant": "resnet18"}, 10), 5),
           ("resnetv2", resnet.create_resnetv2({"variant": "R50x1"}, 10), 5),
           ("efficientnet", efficientnet.create_model({"variant": "lite0"}, 10), 8)]
  for family, model, top in cases:
    params = jax.eval_shape(lambda m=model: m.init(jax.random.key(0), images))["params"]
    depths = tree_lib.flatten(optim.layer_depths(params, family))
    assert sorted(set(depths.values())) == list(range(top + 1)), family
    assert depths["head/kernel"] == top, family
    # big_vision's attention pooling is part of the head, as in timm's layer decay
    assert all(d == top for p, d in depths.items() if p.startswith("MAPHead_0/")), family


def test_a_parameter_outside_the_depth_table_is_an_error():
  params = {"head": {"kernel": 0}, "adapter": {"kernel": 0}}
  with pytest.raises(ConfigError, match=r"parameter outside the vit layer-depth table \(adapter/kernel\)"):
    optim.make_optimizer(params, {"layer_decay": 0.5}, family="vit", total_steps=10)


# ----------------------------------------------------------------------------- state size


def test_head_only_vit_b16_keeps_state_for_the_head_only():
  params = vit_shapes(classes=100)
  head_floats = 768 * 100 + 100
  for name, kwargs, moments in (("adamw", {}, 2), ("sgd", {"momentum": 0.9}, 1), ("lion", {}, 1)):
    config = {"name": name, "kwargs": kwargs, "lr": 1e-3, "weight_decay": 0.05,
              "grad_clip_norm": 1.0, "param_groups": [("head/.*", {}), (".*", None)]}
    tx = optim.make_optimizer(params, config, total_steps=100)
    assert float_count(jax.eval_shape(tx.init, params)) == moments * head_floats, name
  plan = optim.fine_tuning_plan(params, config, total_steps=100)
  assert plan.trainable_params == head_floats
  assert plan.row("frozen").state_bytes == 0


@pytest.mark.parametrize("name", ["sgd", "adam", "adamw", "lamb", "lion", "adafactor", "rmsprop"])
def test_any_optax_optimizer_by_name_keeps_state_for_trainable_leaves_only(name):
  params = small_tree()
  config = {"name": name, "kwargs": {}, "lr": 0.01, "weight_decay": 0.1, "grad_clip_norm": 1.0,
            "param_groups": [("head/.*", {}), (".*", None)]}
  tx = optim.make_optimizer(params, config, total_steps=10)
  state = tx.init(params)
  # Exactly the floats the same optimizer keeps for the head alone.
  assert float_count(state) == float_count(getattr(optax, name)(0.01).init(params["head"]))
  grads = jax.tree.map(np.ones_like, params)
  updates, _ = jax.jit(tx.update)(grads, state, params)
  assert not np.any(updates["body"]["kernel"]) and not np.any(updates["mid"]["scale"])
  assert np.all(np.isfinite(updates["head"]["kernel"])) and np.all(updates["head"]["kernel"] != 0)


# ----------------------------------------------------------------------------- compiled cost


class _Block(nn.Module):
  hidden: int
  mlp: int

  @nn.compact
  def __call__(self, x):
    y = nn.LayerNorm(name="LayerNorm_0")(x)
    y = nn.MultiHeadDotProductAttention(num_heads=2, name="MultiHeadDotProductAttention_1")(y, y)
    x = x + y
    y = nn.LayerNorm(name="LayerNorm_2")(x)
    return x + _Mlp(self.hidden, self.mlp, name="MlpBlock_3")(y)


class _Mlp(nn.Module):
  hidden: int
  mlp: int

  @nn.compact
  def __call__(self, x):
    x = nn.gelu(nn.Dense(self.mlp, name="Dense_0")(x))
    return nn.Dense(self.hidden, name="Dense_1")(x)


class _PosEmbed(nn.Module):
  @nn.compact
  def __call__(self, x):
    return x + self.param("pos_embedding", nn.initializers.normal(0.02), x.shape[1:])[None]


class TinyViT(nn.Module):
  """A ViT with vit_jax parameter names, small enough to compile in a second."""
  hidden: int = 32
  mlp: int = 64
  layers: int = 2
  classes: int = 10

  @nn.compact
  def __call__(self, images):
    x = nn.Conv(self.hidden, (4, 4), strides=4, padding="VALID", name="embedding")(images)
    x = x.reshape(x.shape[0], -1, self.hidden)
    cls = self.param("cls", nn.initializers.zeros, (1, 1, self.hidden))
    x = jnp.concatenate([jnp.tile(cls, (x.shape[0], 1, 1)), x], axis=1)
    x = _Encoder(self.hidden, self.mlp, self.layers, name="Transformer")(x)
    return nn.Dense(self.classes, name="head")(x[:, 0])


class _Encoder(nn.Module):
  hidden: int
  mlp: int
  layers: int

  @nn.compact
  def __call__(self, x):
    x = _PosEmbed(name="posembed_input")(x)
    for i in range(self.layers):
      x = _Block(self.hidden, self.mlp, name=f"encoderblock_{i}")(x)
    return nn.LayerNorm(name="encoder_norm")(x)


def _flops(compiled) -> float:
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):  # older jax: one dict per device
    cost = cost[0]
  return float(cost["flops"])


@pytest.mark.slow  # 20 s or more on 2 slow cores; CI runs it (-m slow)
def test_compiled_cost_of_head_only_and_full_steps():
  model = TinyViT(layers=1)
  images = jnp.ones((8, 16, 16, 3), F32)
  labels = jnp.arange(8) % 10
  params = model.init(jax.random.key(0), images)["params"]
  assert {"Transformer/posembed_input/pos_embedding", "cls",
          "Transformer/encoderblock_0/MlpBlock_3/Dense_0/kernel"} <= set(tree_lib.flatten(params))

  def loss(p, x, y):
    return optax.softmax_cross_entropy_with_integer_labels(model.apply({"params": p}, x), y).mean()

  forward = _flops(jax.jit(loss).lower(params, images, labels).compile())

  def step_flops(config_or_tx):
    tx = config_or_tx
    if isinstance(config_or_tx, dict):
      tx = optim.make_optimizer(params, config_or_tx, total_steps=100)

    def step(p, s, x, y):
      value, grads = jax.value_and_grad(loss)(p, x, y)
      updates, s = tx.update(grads, s, p)
      return optax.apply_updates(p, updates), s, value

    return _flops(jax.jit(step).lower(params, tx.init(params), images, labels).compile())

  base = {"name": "sgd", "kwargs": {"momentum": 0.9}, "grad_clip_norm": 1.0, "weight_decay": 1e-4}
  head_only = step_flops(dict(base, param_groups=[("head/.*", {}), (".*", None)]))
  full = step_flops(base)
  # The control: clipping over all gradients reads the frozen ones, and the
  # backward pass comes back; so the FLOP count does see frozen gradient work.
  head_tx = optim.make_optimizer(params, {"param_groups": [("head/.*", {}), (".*", None)]},
                                 total_steps=100)
  leaky = step_flops(optax.chain(optax.clip_by_global_norm(1.0), head_tx))
  print(f"flops: forward {forward:.0f}, head-only step {head_only / forward:.3f}x, "
        f"full step {full / forward:.3f}x, head-only clipping all grads {leaky / forward:.3f}x")
  assert head_only <= 1.1 * forward, (head_only, forward)
  assert 2.5 * forward <= full <= 3.5 * forward, (full, forward)
  assert leaky > 2.0 * forward, (leaky, forward)


# ----------------------------------------------------------------------------- unfreezing


def _separable_loss(params, step):
  """Each leaf's gradient depends on that leaf only, so groups cannot influence each other."""
  t = jnp.sin(jnp.arange(3, dtype=F32) + step)
  return sum(jnp.sum((leaf - t * (i + 1)) ** 2)
             for i, leaf in enumerate(jax.tree.leaves(params)))


def _separable_step(tx, params, state, step):
  grads = jax.grad(_separable_loss)(params, step)
  updates, state = tx.update(grads, state, params)
  return optax.apply_updates(params, updates), state


def test_unfreezing_keeps_old_moments_and_gives_new_leaves_fresh_ones():
  params = {"body": {"kernel": jnp.zeros(3, F32)}, "head": {"kernel": jnp.ones(3, F32)}}
  base = {"name": "adam", "kwargs": {}, "lr": 0.1, "total_steps": 20,
          "schedule": {"name": "warmup_cosine", "warmup_steps": 4}}
  config = dict(base, param_groups=[("head/.*", {}), ("body/.*", {})], unfreeze=[(5, "body/.*")])
  reference = dict(base, param_groups=[("head/.*", {}), ("body/.*", None)])
  assert optim.unfreeze_phases(config) == [0, 5]
  txs = [optim.make_optimizer(params, config, phase=i) for i in (0, 1)]
  ref_tx = optim.make_optimizer(params, reference)
  p, state = params, txs[0].init(params)
  ref_p, ref_state = params, ref_tx.init(params)
  for s in range(20):
    phase = optim.phase_at(s, config)
    if s == 5:
      state = optim.transition_opt_state(state, txs[1], p)
      fresh = state.inner_states["g1.p1"].inner_state[0]
      assert int(fresh.count) == 0 and not np.any(fresh.mu["body"]["kernel"])
      # The first update of the unfrozen leaf: adam's first step at the global lr of step 5.
      lr5 = float(optim.make_schedule(config)(5))
      ref_adam = optax.adam(lr5)
      g = jax.grad(_separable_loss)(p, s)["body"]
      expected, _ = ref_adam.update(g, ref_adam.init(g), p["body"])
    before = p
    p, state = _separable_step(txs[phase], p, state, s)
    ref_p, ref_state = _separable_step(ref_tx, ref_p, ref_state, s)
    if s < 5:
      assert np.asarray(p["body"]["kernel"]).tobytes() == np.zeros(3, np.float32).tobytes()
    if s == 5:
      np.testing.assert_array_equal(p["body"]["kernel"] - before["body"]["kernel"],
                                    expected["kernel"])
      assert not np.array_equal(p["body"]["kernel"], before["body"]["kernel"])
    # The head's moments, count and values are those of the run without the transition.
    for a, b in zip(jax.tree.leaves(state.inner_states["g0"]),
                    jax.tree.leaves(ref_state.inner_states["g0"])):
      assert np.asarray(a).tobytes() == np.asarray(b).tobytes(), s
    assert np.asarray(p["head"]["kernel"]).tobytes() == np.asarray(ref_p["head"]["kernel"]).tobytes()


def _leaves_equal(a, b) -> bool:
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  return len(la) == len(lb) and all(np.asarray(x).tobytes() == np.asarray(y).tobytes()
                                    for x, y in zip(la, lb))


def test_resume_mid_phase_from_a_saved_state_matches_the_uninterrupted_run(tmp_path):
  config = {"name": "adamw", "kwargs": {}, "lr": 0.05, "weight_decay": 0.1, "grad_clip_norm": 0.5,
            "schedule": {"name": "warmup_cosine", "warmup_steps": 3},
            "unfreeze": [(4, "mid/.*"), (8, "body/.*")], "total_steps": 20}
  # Device arrays, as a trainer holds them (a numpy argument is a separate jit cache entry).
  init = jax.tree.map(jnp.asarray, small_tree())

  def build():  # what a fresh process does: one optimizer and one compiled step per phase
    txs = [optim.make_optimizer(init, config, phase=i)
           for i in range(len(optim.unfreeze_phases(config)))]
    return txs, [jax.jit(functools.partial(_train_step, tx)) for tx in txs]

  def run(params, state, phase, steps, txs, fns):
    for s in steps:
      if optim.phase_at(s, config) != phase:
        phase = optim.phase_at(s, config)
        state = optim.transition_opt_state(state, txs[phase], params)
      params, state, _ = fns[phase](params, state, s)
      if s < 4:
        assert np.asarray(params["mid"]["kernel"]).tobytes() == np.asarray(init["mid"]["kernel"]).tobytes()
      if s < 8:
        assert np.asarray(params["body"]["kernel"]).tobytes() == np.asarray(init["body"]["kernel"]).tobytes()
    return params, state, phase

  txs, fns = build()
  full_p, full_s, _ = run(init, txs[0].init(init), 0, range(20), txs, fns)
  assert [f._cache_size() for f in fns] == [1, 1, 1]  # one compilation per phase
  assert not np.array_equal(full_p["body"]["kernel"], init["body"]["kernel"])

  part_p, part_s, _ = run(init, txs[0].init(init), 0, range(13), txs, fns)
  flat, _ = jax.tree.flatten((part_p, part_s))
  np.savez(tmp_path / "ckpt.npz", *[np.asarray(x) for x in flat])

  txs, fns = build()
  phase = optim.phase_at(13, config)
  template = (init, txs[phase].init(init))
  with np.load(tmp_path / "ckpt.npz") as saved:
    leaves = [jnp.asarray(saved[f"arr_{i}"]) for i in range(len(saved.files))]
  params, state = jax.tree.unflatten(jax.tree.structure(template), leaves)
  resumed_p, resumed_s, _ = run(params, state, phase, range(13, 20), txs, fns)
  assert _leaves_equal(resumed_p, full_p)
  assert _leaves_equal(resumed_s, full_s)


def _phased_updates(config, params, grads_at, steps):
  """Each step's updates, with one optimizer per phase and the trainer's transitions."""
  txs = [optim.make_optimizer(params, config, phase=i)
         for i in range(len(optim.unfreeze_phases(config)))]
  phase, state, out = 0, txs[0].init(params), []
  for s in steps:
    if optim.phase_at(s, config) != phase:
      phase = optim.phase_at(s, config)
      state = optim.transition_opt_state(state, txs[phase], params)
    updates, state = txs[phase].update(grads_at(s), state, params)
    params = optax.apply_updates(params, updates)
    out.append(tree_lib.flatten(updates))
  return out


def test_unfreeze_warmup_0_is_the_schedule_without_it():
  config = {"name": "adamw", "kwargs": {}, "lr": 0.05, "weight_decay": 0.1,
            "schedule": {"name": "warmup_cosine", "warmup_steps": 3},
            "unfreeze": [(4, "mid/.*"), (8, "body/.*")], "total_steps": 20}
  params = small_tree()
  grads_at = lambda s: jax.tree.map(lambda x: jnp.sin(x + s), params)
  without = _phased_updates(config, params, grads_at, range(20))
  zero = _phased_updates(dict(config, unfreeze_warmup_steps=0), params, grads_at, range(20))
  assert all(_leaves_equal(a, b) for a, b in zip(without, zero))


def test_unfreeze_warmup_ramps_the_unfrozen_group_and_its_weight_decay():
  # SGD at a constant lr 0.5, W = 4, body unfrozen at step 3: body's update at 3 + k is
  # -0.5 * min(1, k/4) * (grad + 0.5 * param) on its kernel (weight decay 0.5), without the
  # decay term on its bias; the head trains at the full lr throughout.  Dyadic values: exact.
  config = {"name": "sgd", "kwargs": {}, "lr": 0.5, "schedule": {"name": "constant"},
            "weight_decay": 0.5, "unfreeze": [(3, "body/.*")], "unfreeze_warmup_steps": 4,
            "total_steps": 20}
  params = {"body": {"kernel": jnp.array([1.0, -2.0, 4.0], F32), "bias": jnp.array([1.0, 2.0], F32)},
            "head": {"kernel": jnp.array([0.5, -1.0], F32)}}
  grads = {"body": {"kernel": jnp.array([2.0, 1.0, -0.5], F32), "bias": jnp.array([4.0, -8.0], F32)},
           "head": {"kernel": jnp.array([1.0, 0.25], F32)}}
  updates = _phased_updates(config, params, lambda s: grads, range(20))
  p = tree_lib.flatten(params)
  g = tree_lib.flatten(grads)
  for s, u in enumerate(updates):
    np.testing.assert_array_equal(u["head/kernel"], -0.5 * (g["head/kernel"] + 0.5 * p["head/kernel"]))
    f = np.float32(min(1.0, (s - 3) / 4) if s >= 3 else 0.0)  # 0 while frozen
    np.testing.assert_array_equal(u["body/bias"], -0.5 * f * g["body/bias"])
    np.testing.assert_array_equal(u["body/kernel"], -0.5 * f * (g["body/kernel"] + 0.5 * p["body/kernel"]))
    p = {k: p[k] + u[k] for k in p}
  ramp = [float(updates[3 + k]["body/bias"][0] / (-0.5 * g["body/bias"][0])) for k in (0, 1, 2, 4, 10)]
  assert ramp == [0.0, 0.25, 0.5, 1.0, 1.0]


def test_unfreeze_warmup_scales_the_global_cosine_schedule():
  # With SGD and unit gradients an update is minus the lr of its label and step.
  config = {"name": "sgd", "kwargs": {}, "lr": 0.1, "total_steps": 40,
            "schedule": {"name": "warmup_cosine", "warmup_steps": 2},
            "unfreeze": [(5, "body/.*"), (20, "mid/.*")], "unfreeze_warmup_steps": 8}
  params = small_tree()
  updates = _phased_updates(config, params, lambda s: jax.tree.map(jnp.ones_like, params), range(40))
  schedule = optim.make_schedule(config)
  for s, u in enumerate(updates):
    lr = schedule(s)
    assert float(-u["head/kernel"][0, 0]) == float(lr), s
    for path, start in (("body/kernel", 5), ("mid/kernel", 20)):
      expected = 0.0 if s < start else float(lr * jnp.minimum(1.0, F32(s - start) / 8))
      assert float(-u[path][0, 0]) == expected, (path, s)
  assert float(-updates[9]["body/kernel"][0, 0]) == float(schedule(9)) / 2  # halfway up
  assert float(-updates[13]["body/kernel"][0, 0]) == float(schedule(13))


def test_unfreeze_warmup_in_the_plan():
  config = {"unfreeze": [(60, "body/.*")], "unfreeze_warmup_steps": 20}
  plan = optim.fine_tuning_plan(small_tree(), config, total_steps=100)
  assert plan.row("g0").schedule == "warmup_cosine(end=0)"
  assert plan.row("g0.p1").schedule == "warmup_cosine(end=0) + 20-step warm-up"
  assert "g0.p1  60" in str(plan) and plan.warnings == ()
  late = optim.fine_tuning_plan(small_tree(), dict(config, unfreeze_warmup_steps=40), total_steps=100)
  assert late.warnings == ("unfreeze_warmup_steps 40 outlasts the run: what is unfrozen at step 60 "
                           "never reaches its full lr",)
  # peak_lr: the highest rate a label trains at. The late label joins the cosine at step 60
  # and warms up over 20 steps as it decays: not the schedule's peak, which it printed.
  s = optim.make_schedule(config, total_steps=100)
  assert plan.row("g0").peak_lr == pytest.approx(max(float(s(t)) for t in range(100)))
  for p, warmup in ((plan, 20), (late, 40)):
    assert p.row("g0.p1").peak_lr == pytest.approx(
        max(float(s(60 + k)) * min(1, k / warmup) for k in range(40)), rel=1e-6)
  assert plan.row("g0.p1").peak_lr < 0.4 * plan.row("g0").peak_lr


def test_gradual_unfreezing_of_a_vit_by_two_blocks():
  params = vit_shapes(layers=4, hidden=24, mlp=8, tokens=5, patch=2, classes=3)
  rules = optim.gradual_unfreezing("vit", depth=4, every=10, k=2)
  config = {"unfreeze": rules, "layer_decay": 0.5}
  assert optim.unfreeze_phases(config, 40) == [0, 10, 20, 30]

  def trains(phase):
    mask = tree_lib.flatten(optim.trainable_mask(params, config, phase))
    return sorted({"/".join(p.split("/")[:2]) for p, on in mask.items() if on})

  assert trains(0) == ["Transformer/encoder_norm", "head/bias", "head/kernel"]
  assert trains(1) == ["Transformer/encoder_norm", "Transformer/encoderblock_2",
                       "Transformer/encoderblock_3", "head/bias", "head/kernel"]
  assert len(trains(2)) == 7 and "Transformer/encoderblock_0" in trains(2)
  assert len(trains(3)) == 11 and "cls" in trains(3) and "cls" not in trains(2)
  labels = tree_lib.flatten(optim.param_labels(params, config, family="vit", phase=1))
  assert labels["Transformer/encoderblock_2/LayerNorm_0/scale"] == "g0.d3.p1"
  assert labels["Transformer/encoderblock_1/LayerNorm_0/scale"] == "frozen"
  plan = optim.fine_tuning_plan(params, config, family="vit", total_steps=40)
  assert [(r.label, r.start_step, r.lr_mult) for r in plan.rows] == [
      ("g0.d5", 0, 1.0), ("g0.d4.p1", 10, 0.5), ("g0.d3.p1", 10, 0.25), ("g0.d2.p2", 20, 0.125),
      ("g0.d1.p2", 20, 0.0625), ("g0.d0.p3", 30, 0.03125)]
  assert plan.trainable_params == 24 * 2 + 24 * 3 + 3
  assert plan.final_trainable_params == plan.trainable_params + plan.frozen_params
  assert "unfreezing at steps [10, 20, 30]" in str(plan)


def test_gradual_unfreezing_default_depths_of_efficientnet_and_resnet():
  # EfficientNet: stages 6..0 then the stem; ResNet: stages 4..1 then the stem.
  eff = optim.gradual_unfreezing("efficientnet", every=10)
  assert eff == [(10 * (j + 1), f"stage{6 - j}/.*") for j in range(7)] + [(80, "stem/.*")]
  res = optim.gradual_unfreezing("resnet", every=10)
  assert [step for step, _ in res] == [10, 20, 30, 40, 50]
  assert [rx for _, rx in res[:4]] == ["stage4/.*", "stage3/.*", "stage2/.*", "stage1/.*"]
  assert "stem/.*" in res[-1][1].split("|")


# ----------------------------------------------------------------------------- schedules


@pytest.mark.parametrize("schedule, expected", [
    ({"name": "warmup_cosine"}, {0: 0.0, 5: 0.5, 10: 1.0, 60: 0.5, 110: 0.0, 200: 0.0}),
    ({"name": "cosine", "end_factor": 0.1}, {10: 1.0, 60: 0.55, 110: 0.1}),
    ({"name": "linear"}, {5: 0.5, 10: 1.0, 35: 0.75, 110: 0.0}),
    ({"name": "constant"}, {5: 0.5, 10: 1.0, 109: 1.0}),
    ({"name": "rsqrt", "timescale": 100}, {10: 1.0, 110: 2 ** -0.5, 310: 0.5}),
    ({"name": "step", "boundaries": [50, 80]}, {10: 1.0, 49: 1.0, 50: 0.1, 79: 0.1, 80: 0.01}),
    ({"name": "step", "warmup_steps": 0, "warmup_epochs": 2.0, "boundary_epochs": [10, 16]},
     {5: 0.5, 10: 1.0, 50: 0.1, 80: 0.01}),
])
def test_schedules(schedule, expected):
  config = {"lr": 1.0, "schedule": dict({"warmup_steps": 10}, **schedule)}
  fn = optim.make_schedule(config, total_steps=110, steps_per_epoch=5)
  for step, value in expected.items():
    np.testing.assert_allclose(float(fn(step)), value, rtol=1e-6, atol=1e-7, err_msg=str(step))


def test_warmup_epochs_round_to_the_nearest_step():
  # 0.26 epochs of 10 steps is 2.6 steps: 3 warm-up steps (truncating would give 2).
  fn = optim.make_schedule({"lr": 1.0, "schedule": {"name": "constant", "warmup_epochs": 0.26}},
                           total_steps=100, steps_per_epoch=10)
  np.testing.assert_allclose([float(fn(t)) for t in (1, 2, 3)], [1 / 3, 2 / 3, 1.0], rtol=1e-6)


# ----------------------------------------------------------------------------- errors and plan


@pytest.mark.parametrize("config, kwargs, fragment", [
    ({"param_groups": [("head/.*", {})]}, {},
     "parameter covered by no param group (body/bias, body/kernel, mid/kernel, mid/scale)"),
    ({"param_groups": [("heads/.*", {}), (".*", {})]}, {},
     "param group matches no parameter (param group #0): 'heads/.*'"),
    ({"param_groups": [(".*", {"lr_mult": -1.0})]}, {},
     "must be a finite non-negative number (optim.param_groups #0.lr_mult): -1.0"),
    ({"param_groups": [(".*", {"wd_mult": -0.5})]}, {}, "(optim.param_groups #0.wd_mult): -0.5"),
    ({"param_groups": [(".*", {"lr_mul": 2.0})]}, {},
     "unknown param group key (optim.param_groups #0.lr_mul): 2.0; did you mean lr_mult?"),
    ({"param_groups": [(".*", {}), ("head/.*", {"lr_mult": 10.0})]}, {},
     "param group is shadowed by an earlier one (param group #1): 'head/.*'; param group #0 ('.*') "
     "takes 'head/bias' first"),
    ({"layer_decay": -0.5}, {}, "layer_decay must be positive (optim.layer_decay): -0.5"),
    ({"layer_decay": "0.75"}, {"family": "vit"}, "layer_decay must be positive (optim.layer_decay): '0.75'"),
    ({"grad_clip_norm": "1.0"}, {}, "grad_clip_norm must be positive or None (optim.grad_clip_norm): '1.0'"),
    ({"schedule": "cosine"}, {}, "expected a dict (optim.schedule): 'cosine'; e.g. {'name': 'cosine'}"),
    ({"param_groups": [(".*", {"schedule": "cosine"})]}, {},
     "expected a dict (optim.param_groups #0.schedule): 'cosine'"),
    ({"kwargs": "momentum=0.9"}, {}, "expected a dict (optim.kwargs): 'momentum=0.9'"),
    ({"weight_decay": 0.1, "wd_rules": [("head/kernel", None), (".*", 0.0)]}, {},
     "must be a finite non-negative number (optim.wd_rules #0): None"),
    ({"schedule": {"name": "step", "boundaries": [50], "decay_factor": None}}, {},
     "must be a finite non-negative number (optim.schedule.decay_factor): None"),
    ({"schedule": {"name": "rsqrt", "timescale": 0}}, {}, "rsqrt needs a positive timescale"),
    ({"layer_decay": 0.5}, {}, "layer_decay needs the model family"),
    ({"layer_decay": 0.5}, {"family": "vitt"}, "unknown model family for layer decay (family): 'vitt'"),
    ({"name": "adamww"}, {}, "unknown optimizer (optim.name): 'adamww'; did you mean adamw?"),
    ({"name": "chain"}, {}, "unknown optimizer (optim.name): 'chain'"),
    ({"name": "adamw"}, {}, "adamw takes no argument momentum (optim.kwargs.momentum): 0.9; it takes "
     "b1, b2, eps, eps_root, mu_dtype, nesterov; optim.kwargs still holds the default sgd's "
     "momentum=0.9: set optim.kwargs to {} (--config.optim.kwargs='{}')"),
    ({"name": "adamw", "kwargs": {"weight_decay": 0.1}}, {},
     "adamw kwarg weight_decay is set elsewhere (optim.kwargs.weight_decay): 0.1; use optim.weight_decay"),
    ({"schedule": {"name": "cosin"}}, {}, "unknown learning-rate schedule (optim.schedule.name): 'cosin'"),
    ({"schedule": {"warmup_steps": 100}}, {}, "warm-up as long as the run"),
    ({"schedule": {"warmup_epochs": 1.0}}, {}, "a length in epochs needs steps_per_epoch"),
    # NaN and inf epochs were a ValueError / OverflowError traceback in int(round(...))
    ({"schedule": {"warmup_epochs": float("nan")}}, {"steps_per_epoch": 5},
     "warmup_epochs must be finite numbers of epochs >= 0 (optim.schedule.warmup_epochs): nan"),
    ({"schedule": {"name": "step", "boundary_epochs": [1.0, float("inf")]}}, {"steps_per_epoch": 5},
     "boundary_epochs must be finite numbers of epochs >= 0 (optim.schedule.boundary_epochs): [1.0, inf]"),
    ({"schedule": {"warmup_epochs": -1.0}}, {"steps_per_epoch": 5},
     "warmup_epochs must be finite numbers of epochs >= 0 (optim.schedule.warmup_epochs): -1.0"),
    ({"param_groups": [(".*", {"schedule": {"warmup_steps": 2.5}})]}, {},
     "warmup_steps must be whole numbers of steps >= 0 (optim.param_groups #0.schedule.warmup_steps): 2.5"),
    ({"schedule": {"name": "step", "boundaries": [10, float("nan")]}}, {},
     "boundaries must be whole numbers of steps >= 0 (optim.schedule.boundaries): [10, nan]"),
    ({"unfreeze": [(100, "body/.*")]}, {},
     "unfreeze step beyond the run (optim.unfreeze #0): 100; the run has steps 0..99"),
    ({"unfreeze": [(10, "bdy/.*")]}, {}, "unfreeze rule matches no parameter"),
    # inf passed the checks, compiled, and ended in a NaN loss after the workdir was written
    ({"lr": float("inf")}, {}, "must be a finite non-negative number (optim.lr): inf"),
    # True is an int to Python, not a learning rate
    ({"lr": True}, {}, "must be a finite non-negative number (optim.lr): True"),
    # a boundary at the last step never takes effect
    ({"schedule": {"name": "step", "boundaries": [100]}}, {},
     "step decay needs increasing boundaries inside the run"),
    ({"weight_decay": float("inf")}, {}, "must be a finite non-negative number (optim.weight_decay): inf"),
    ({"param_groups": [(".*", {"lr_mult": float("inf")})]}, {},
     "must be a finite non-negative number (optim.param_groups #0.lr_mult): inf"),
    ({"layer_decay": float("inf")}, {"family": "vit"}, "layer_decay must be positive (optim.layer_decay): inf"),
    # each finite, the product not: the plan showed peak_lr inf
    ({"lr": 10.0, "param_groups": [("head/.*", {"lr_mult": 1e308}), (".*", None)]}, {},
     "learning rate x lr_mult is not finite (optim.param_groups #0.lr_mult): 10.0 x 1e+308; "
     "lower lr_mult or optim.lr"),
    ({"unfreeze": [(10, "body/.*")], "param_groups": [("body/.*", None), (".*", {})]}, {},
     "unfreeze rule matches a parameter its param group freezes for good"),
    ({"lrr": 0.1}, {}, "unknown optimizer key (optim.lrr): 0.1; did you mean lr?"),
    ({"accum_steps": 0}, {}, "accum_steps must be a positive integer"),
    ({"unfreeze_warmup_steps": -1}, {},
     "unfreeze_warmup_steps must be a non-negative integer (optim.unfreeze_warmup_steps): -1"),
    ({"unfreeze_warmup_steps": True}, {}, "(optim.unfreeze_warmup_steps): True"),
    ({"unfreeze_warmup_steps": 2.5}, {}, "(optim.unfreeze_warmup_steps): 2.5"),
    ({"unfreeze_warmup_steps": "10"}, {}, "(optim.unfreeze_warmup_steps): '10'"),
    ({"unfreeze_warmup_steps": 10}, {},
     "unfreeze_warmup_steps without unfreeze rules (optim.unfreeze_warmup_steps): 10; set "
     "optim.unfreeze (steps > 0), or leave it 0"),
    ({"unfreeze_warmup_steps": 10, "unfreeze": [(0, "body/.*")]}, {},
     "unfreeze_warmup_steps without unfreeze rules"),
    ({"unfreeze_warmup_step": 10}, {},
     "unknown optimizer key (optim.unfreeze_warmup_step): 10; did you mean unfreeze_warmup_steps?"),
    ({}, {"phase": 1}, "no such training phase (phase): 1"),
])
def test_config_errors_are_one_line_config_errors(config, kwargs, fragment):
  with pytest.raises(ConfigError) as info:
    optim.make_optimizer(small_tree(), config, total_steps=100, **kwargs)
  message = str(info.value)
  assert fragment in message and "\n" not in message and info.value.exit_code == 2, message


@pytest.mark.parametrize("config,expected", [
    # decay ** depth overflowed a float: an OverflowError traceback
    ({"layer_decay": 1e300}, "layer_decay ** depth is not finite (optim.layer_decay): 1e+300; 0.65-0.9 is usual"),
    # each finite, the product not: the plan showed peak_lr inf
    ({"lr": 1e300, "layer_decay": 1e10}, "learning rate x lr_mult x layer decay is not finite "
     "(optim.layer_decay): 10000000000.0 at Transformer/encoderblock_0/w; 0.65-0.9 is usual"),
])
def test_a_layer_decay_overflowing_the_rate_is_refused(config, expected):
  params = {"cls": np.zeros((1, 1, 4), np.float32), "head": {"kernel": np.zeros((4, 2), np.float32)},
            "Transformer": {"encoderblock_0": {"w": np.zeros(4, np.float32)}}}
  with pytest.raises(ConfigError, match=re.escape(expected)):
    optim.fine_tuning_plan(params, config, family="vit", total_steps=10)


def test_numpy_scalars_are_numbers():
  # Values computed with numpy (a sweep's np.linspace) are numbers like any other.
  params = {"cls": np.zeros((1, 1, 4), np.float32), "head": {"kernel": np.zeros((4, 2), np.float32)},
            "Transformer": {"encoderblock_0": {"w": np.zeros(4, np.float32)}}}
  plan = optim.fine_tuning_plan(params, {"layer_decay": np.float32(0.5), "lr": np.float64(0.1)},
                                family="vit", total_steps=np.int64(10))
  assert plan.layer_decay == 0.5 and plan.row("g0.d0").lr_mult == 0.25
  assert optim.gradual_unfreezing("resnet", every=np.int64(100), k=np.int32(2))[0] == (
      100, "stage4/.*|stage3/.*")


def test_default_config_drives_make_optimizer():
  config = optim.default_config()
  config.total_steps = 100
  config.lr = 0.1
  config.param_groups = [("head/.*", {"lr_mult": 2.0}), (".*", None)]
  config.lock()
  params = small_tree()
  tx = optim.make_optimizer(params, config)
  state = tx.init(params)
  assert float_count(state) == 12 + 3  # sgd momentum trace, head only
  with pytest.raises(AttributeError):
    config.lrr = 0.1  # a locked config refuses typos before optim sees them


def test_plan_warnings():
  params = small_tree()

  def warnings(config, n=None):
    return optim.fine_tuning_plan(params, config, total_steps=100, num_train_examples=n).warnings

  assert warnings({"param_groups": [(".*", None)]}) == (
      "nothing trains at step 0: every parameter is frozen (the head too?)",)
  assert "the head is frozen" in warnings({"param_groups": [("head/.*", None), (".*", {})]})[0]
  full = {"name": "adamw", "kwargs": {}, "lr": 1e-2}
  assert "full fine-tune of all 55 parameters with adamw lr 0.01" in warnings(full, 5_000)[0]
  assert warnings(full, 50_000) == () and warnings(dict(full, lr=1e-4), 5_000) == ()
  assert warnings({"name": "sgd", "lr": 0.5}, 5_000)[0].startswith("full fine-tune")
  # Not quite full: most of the network still trains at the high rate (warned); when the
  # high-rate backbone leaves hold under half of it, no warning.
  assert "fine-tune of 51 of 55 parameters with adamw lr 0.01 (> 0.001, " in warnings(
      dict(full, param_groups=[("body/bias", None), (".*", {})]), 5_000)[0]
  assert warnings(dict(full, param_groups=[("body/.*", None), (".*", {})]), 5_000) == ()
  # Each leaf under its own group's optimizer and learning rate: adamw named by the group,
  # a high rate on the head alone (no warning), a run that ends as a full fine-tune.
  assert "with adamw lr 0.05 (> 0.001, body/" in warnings(
      {"name": "sgd", "lr": 0.05, "param_groups": [(".*", {"name": "adamw"})]}, 5_000)[0]
  assert warnings({"name": "adamw", "kwargs": {}, "lr": 1e-4,
                   "param_groups": [("head/.*", {"lr_mult": 100.0}), (".*", {})]}, 5_000) == ()
  assert "from step 50 with sgd lr 0.5 (> 0.1, body/" in warnings(
      {"name": "sgd", "lr": 0.5, "param_groups": [("head/.*", {}), (".*", {})],
       "unfreeze": [(50, "body/.*|mid/.*")]}, 5_000)[0]
  assert "has lr_mult 0" in warnings({"param_groups": [(".*", {"lr_mult": 0.0})]})[0]
  assert "no trainable parameter decays" in warnings(
      {"weight_decay": 0.1, "param_groups": [("head/bias", {}), (".*", None)]})[0]
  assert "over half" in warnings({"schedule": {"warmup_steps": 60}})[0]


@pytest.mark.parametrize("name,key,value,accepted", [
    ("adamw", "b1", 1.5, False), ("adamw", "b2", -0.5, False), ("adamw", "eps", -1.0, False),
    ("adamw", "b2", float("nan"), False), ("sgd", "momentum", -0.9, False),
    ("rmsprop", "decay", 1.0, False), ("adamw", "eps_root", -1e-8, False),
    ("adamw", "b1", 0.0, True), ("adamw", "eps", 0.0, True), ("sgd", "momentum", None, True),
    ("sgd", "momentum", 0.95, True), ("rmsprop", "decay", 0.9, True)])
def test_optimizer_arguments_out_of_range_are_refused_as_torch_refuses_them(name, key, value, accepted):
  # b2 -0.5 trained to NaN a few steps in (after the workdir was written), eps -1 to a 0%
  # model, b1 1.5 silently: torch.optim refuses all three.
  if accepted:
    optim.named_optimizer(name, {key: value}, 0.1)
    return
  with pytest.raises(ConfigError, match=rf"optimizer argument out of range \(optim.kwargs.{key}\)"):
    optim.named_optimizer(name, {key: value}, 0.1)
  with pytest.raises(ConfigError, match=rf"\(optim.param_groups #0.kwargs.{key}\)"):  # a group's own too
    optim.make_optimizer({"w": np.zeros(2)}, {"name": "lion", "kwargs": {},
                                              "param_groups": [(".*", {"name": name, "kwargs": {key: value}})]},
                         total_steps=10)
