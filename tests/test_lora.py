"""LoRA: exact parameter counts, training through the param-group machinery, merging, memory."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ftjax import lora, metrics, models, optim, train
from ftjax.errors import ConfigError
from ftjax.tree import flatten, unflatten

SIZE = 32


@pytest.fixture(scope="module")
def base():
  """The tiny ViT ('test': width 32, 2 blocks, 2 heads, MLP 64) with a random, non-zero head."""
  model, _ = models.create("vit", {"variant": "test"}, num_classes=5, image_size=SIZE)
  params = flatten(models.init_variables(model, SIZE, seed=0)["params"])
  head = np.random.default_rng(0).normal(0, 0.5, params["head/kernel"].shape)
  params["head/kernel"] = head.astype(np.float32)
  return model, jax.tree.map(np.asarray, unflatten(params))


def _size(tree):
  return sum(int(np.prod(np.shape(x))) for x in jax.tree.leaves(tree))


@pytest.mark.parametrize("rank", [1, 4])
def test_rank_r_adds_exactly_r_times_in_plus_out(base, rank):
  _, params = base
  spec = lora.LoraSpec(rank=rank)
  # per block: query/key/value/out 32 -> 32 (4 x (32 + 32)); Dense_0 32 -> 64, Dense_1 64 -> 32
  per_block = 4 * (32 + 32) + 2 * (32 + 64)
  assert lora.num_lora_params(params, spec) == rank * 2 * per_block
  with_lora = lora.add_lora(params, spec, jax.random.key(0))
  assert _size(with_lora) - _size(params) == rank * 2 * per_block
  shapes = lora.target_shapes(params, spec)
  assert shapes["Transformer/encoderblock_1/MultiHeadDotProductAttention_1/out/kernel"] == (32, 32)
  assert shapes["Transformer/encoderblock_0/MlpBlock_3/Dense_1/kernel"] == (64, 32)
  assert len(shapes) == 12


def test_layer_decay_gives_adapters_their_kernels_rate(base):
  # Test variant: embedding depth 0, blocks 1 and 2, head 3; decay 0.5 -> blocks x0.25, x0.5.
  _, params = base
  params = lora.add_lora(params, lora.LoraSpec(rank=2), jax.random.key(0))
  config = {"name": "sgd", "kwargs": {}, "lr": 1.0, "schedule": {"name": "constant"},
            "layer_decay": 0.5, "weight_decay": 0.0, "param_groups": lora.PARAM_GROUPS}
  tx = optim.make_optimizer(params, config, family="vit", total_steps=10)
  grads = jax.tree.map(np.ones_like, params)
  updates = flatten(tx.update(grads, tx.init(params), params)[0])
  for block, mult in ((0, 0.25), (1, 0.5)):
    for leaf in ("a", "b"):
      key = f"lora/Transformer/encoderblock_{block}/MlpBlock_3/Dense_0/kernel/{leaf}"
      np.testing.assert_array_equal(updates[key], -mult * np.ones_like(updates[key]))
  np.testing.assert_array_equal(updates["head/bias"], -np.ones(5, np.float32))
  assert not np.any(updates["Transformer/encoderblock_1/MlpBlock_3/Dense_0/kernel"])  # frozen


def test_targets_regex_selects_and_bad_targets_fail(base):
  _, params = base
  only_q = lora.LoraSpec(rank=2, targets=(r".*/query/kernel",))
  assert sorted(lora.target_shapes(params, only_q)) == [
      f"Transformer/encoderblock_{i}/MultiHeadDotProductAttention_1/query/kernel" for i in (0, 1)]
  with pytest.raises(ConfigError, match="LoRA target matches no parameter"):
    lora.target_shapes(params, lora.LoraSpec(rank=2, targets=("nothing/kernel",)))
  with pytest.raises(ConfigError, match="not a dense kernel"):
    lora.target_shapes(params, lora.LoraSpec(rank=2, targets=(r".*/query/bias",)))
  # the patch embedding is a Conv: refused when the adapters are made, not at the first apply
  with pytest.raises(ConfigError, match=r"not a dense kernel \(embedding/kernel\).*convolution"):
    lora.add_lora(params, lora.LoraSpec(rank=2, targets=(r"embedding/kernel",)), jax.random.key(0))
  with pytest.raises(ConfigError, match="rank must be a positive integer"):
    lora.LoraSpec(rank=0)
  # a damaged lora subtree (a run's checkpoint, read for export) is a one-line error, not a KeyError
  adapters = flatten(lora.add_lora(params, only_q, jax.random.key(0))["lora"])
  q0 = "Transformer/encoderblock_0/MultiHeadDotProductAttention_1/query/kernel"
  for damage, match in [({"elsewhere/kernel/a": np.zeros((2, 2)), "elsewhere/kernel/b": np.zeros((2, 2))},
                         "kernel the model does not have"),
                        ({f"{q0}/a": np.zeros((5, 2))}, "does not fit its kernel"),
                        ({f"{q0}/c": np.zeros((2, 2))}, "not exactly a pair")]:
    with pytest.raises(ConfigError, match=match):
      lora.merge({**params, "lora": unflatten({**adapters, **damage})}, only_q)


def test_init_bounds_keys_and_spec_checks():
  # PEFT's init: a uniform in +-1/sqrt(in) (so its max nears the bound), b zeros; each
  # adapter its own key.
  params = {"block0": {"query": {"kernel": np.zeros((64, 16), np.float32)},
                       "key": {"kernel": np.zeros((64, 16), np.float32)}}}
  spec = lora.LoraSpec(8, targets=r"block0/.*/kernel")
  assert spec.targets == (r"block0/.*/kernel",)  # a lone string is one regex, not its characters
  adapters = flatten(lora.add_lora(params, spec, jax.random.key(0))["lora"])
  q, k = (np.asarray(adapters[f"block0/{name}/kernel/a"]) for name in ("query", "key"))
  for a in (q, k):
    assert a.shape == (64, 8) and 0.9 / 8 < np.abs(a).max() <= 1 / 8
  assert not np.array_equal(q, k)
  assert all(not np.any(adapters[f"block0/{name}/kernel/b"]) for name in ("query", "key"))
  with pytest.raises(ConfigError, match="LoRA alpha must be positive"):
    lora.LoraSpec(2, alpha=0)
  with pytest.raises(ConfigError, match="already hold LoRA adapters"):
    lora.add_lora(lora.add_lora(params, spec, jax.random.key(0)), spec, jax.random.key(1))


def test_merge_of_bfloat16_kernels_rounds_the_float32_sum_once():
  # Scale 2: 1 + (2**-8 + 2**-17) rounds up to 1 + 2**-7 in bfloat16; rounding the update
  # to bfloat16 first (2**-8) and then the sum (a tie, to even) would give 1.
  w = np.array([[1.0, 2.0, -3.0], [0.5, 1.0, 4.0]], jnp.bfloat16)
  a = np.array([[1.0], [0.5]], np.float32)
  b = np.array([[2.0 ** -9 + 2.0 ** -18, 0.25, -1.0]], np.float32)
  merged = lora.merge({"d": {"kernel": w}, "lora": {"d": {"kernel": {"a": a, "b": b}}}},
                      lora.LoraSpec(1, alpha=2.0, targets=("d/kernel",)))["d"]["kernel"]
  expected = (w.astype(np.float64) + 2.0 * a.astype(np.float64) @ b).astype(np.float32)
  assert merged.dtype == jnp.bfloat16
  np.testing.assert_array_equal(np.asarray(merged), expected.astype(jnp.bfloat16))
  assert float(merged[0, 0]) == 1.0 + 2.0 ** -7


def test_starts_equal_to_the_base_model(base):
  model, params = base
  lm = lora.LoraModel(model, lora.LoraSpec(rank=4, alpha=8))
  x = jnp.asarray(np.random.default_rng(1).normal(size=(2, SIZE, SIZE, 3)), jnp.float32)
  p = lora.add_lora(params, lm.spec, jax.random.key(0))
  np.testing.assert_array_equal(lm.apply({"params": p}, x), model.apply({"params": params}, x))


def _train(model, params, config, steps):
  tx = optim.make_optimizer(params, config, total_steps=100)
  trainable = train.trainable_paths(optim.trainable_mask(params, config))
  state = train.initial_state(params, None, tx, seed=0, ema=False)
  step = jax.jit(functools.partial(train.train_step, model=model, tx=tx, trainable=trainable,
                                   opts=train.StepOptions(num_classes=5)))
  rng = np.random.default_rng(2)
  losses = []
  for _ in range(steps):
    batch = {"image": jnp.asarray(rng.normal(size=(8, SIZE, SIZE, 3)), jnp.float32),
             "label": jnp.asarray(rng.integers(0, 5, 8), jnp.int32)}
    state, m = step(state, batch)
    losses.append(float(m["loss"]))
  return state, trainable, losses


def test_train_merge_logits_and_frozen_base(base):
  model, params = base
  spec = lora.LoraSpec(rank=4, alpha=8)
  lm = lora.LoraModel(model, spec)
  start = lora.add_lora(params, spec, jax.random.key(0))
  config = {"name": "adam", "kwargs": {}, "lr": 3e-2, "param_groups": lora.PARAM_GROUPS}
  state, trainable, losses = _train(lm, start, config, steps=4)
  assert all(p.startswith(("lora/", "head/")) for p in trainable)
  assert len(trainable) == 2 * 12 + 2  # a and b of 12 adapted kernels, head kernel and bias
  trained = jax.tree.map(np.asarray, state.params)
  assert np.abs(flatten(trained["lora"])["Transformer/encoderblock_1/MlpBlock_3/Dense_0/kernel/b"]).max() > 0
  # every base weight but the head is bit-identical to the checkpoint it started from
  before, after = flatten(params), flatten(lora.split_lora(trained)[0])
  for path, value in before.items():
    if not path.startswith("head/"):
      np.testing.assert_array_equal(after[path], value, err_msg=path)
  x = jnp.asarray(np.random.default_rng(3).normal(size=(4, SIZE, SIZE, 3)), jnp.float32)
  unmerged = np.asarray(lm.apply({"params": trained}, x))
  merged_params = lora.merge(trained, spec)
  assert "lora" not in merged_params and sorted(flatten(merged_params)) == sorted(before)
  merged = np.asarray(model.apply({"params": merged_params}, x))
  assert np.abs(merged - unmerged).max() < 1e-5
  # ... and the adapters did change the function (the head alone would not explain it)
  head_only = {**lora.split_lora(trained)[0]}
  assert np.abs(np.asarray(model.apply({"params": head_only}, x)) - unmerged).max() > 1e-3


def test_fine_tuning_plan_counts_adapters_and_their_optimizer_state(base):
  _, params = base
  spec = lora.LoraSpec(rank=4)
  p = lora.add_lora(params, spec, jax.random.key(0))
  plan = optim.fine_tuning_plan(p, {"name": "adam", "kwargs": {}, "param_groups": lora.PARAM_GROUPS},
                                total_steps=10)
  n_head = 32 * 5 + 5
  assert plan.trainable_params == lora.num_lora_params(params, spec) + n_head
  assert plan.frozen_params == _size(params) - n_head
  # adam: mu and nu in float32 per trainable param, plus two int32 step counts (adam's, schedule's)
  assert plan.row("g0").state_bytes == 2 * 4 * lora.num_lora_params(params, spec) + 8
  # Weight decay by default on the adapters, as on the kernels they adapt (PEFT under HF's
  # Trainer decays all but biases and norms); the head's kernel decays, its bias does not.
  plan = optim.fine_tuning_plan(p, {"weight_decay": 0.1, "param_groups": lora.PARAM_GROUPS},
                                total_steps=10)
  assert plan.row("g0").decayed_params == lora.num_lora_params(params, spec)
  assert plan.row("g1").decayed_params == 32 * 5


def _step_peak(model, params, groups, batch, image_size):
  """XLA's peak bytes of one AdamW train step (shapes only: nothing is allocated)."""
  config = {"name": "adamw", "kwargs": {}, "lr": 1e-3, "param_groups": groups}
  tx = optim.make_optimizer(params, config, total_steps=100)
  trainable = train.trainable_paths(optim.trainable_mask(params, config))
  state = jax.eval_shape(lambda q: train.initial_state(q, None, tx, 0, False), params)
  b = {"image": jax.ShapeDtypeStruct((batch, image_size, image_size, 3), jnp.float32),
       "label": jax.ShapeDtypeStruct((batch,), jnp.int32)}
  fn = functools.partial(train.train_step, model=model, tx=tx, trainable=trainable,
                         opts=train.StepOptions(num_classes=10))
  return metrics.step_memory(jax.jit(fn, donate_argnums=0).lower(state, b).compile())["peak"]


def _full_and_lora_peaks(arch, batch, image_size):
  spec = lora.LoraSpec(rank=8)
  base_model, _ = models.create("vit", arch, num_classes=10, image_size=image_size)
  params = jax.eval_shape(lambda: models.init_variables(base_model, image_size))["params"]
  lp = jax.eval_shape(lambda q: lora.add_lora(q, spec, jax.random.key(0)), params)
  full = _step_peak(base_model, params, [(".*", {})], batch, image_size)
  low = _step_peak(lora.LoraModel(base_model, spec), lp, lora.PARAM_GROUPS, batch, image_size)
  return full, low


@pytest.mark.slow  # 20 s or more on 2 slow cores; CI runs it (-m slow)
def test_remat_keeps_less_for_the_backward_pass():
  # Regression: with flax's plain nn.remat, XLA:CPU ran the recomputation in the forward pass
  # and the step needed *more* memory than without remat.
  arch = {"variant": "S/16", "num_layers": 4}
  plain, _ = _full_and_lora_peaks(arch, 16, 224)
  remat, low = _full_and_lora_peaks({**arch, "remat": True}, 16, 224)
  assert remat < 0.85 * plain, (remat, plain)
  assert low < remat


@pytest.mark.parametrize("batch,remat", [(1, False), (8, True)])  # about 20 s each (shapes only)
@pytest.mark.slow  # 20 s or more on 2 slow cores; CI runs it (-m slow)
def test_vit_b16_lora_step_memory_versus_full_fine_tune(batch, remat):
  """Compiled memory (XLA memory_analysis) of one AdamW train step, ViT-B/16 at 224, fp32, shapes only.

  LoRA removes the base's gradients and AdamW state (about 1 GB); it keeps the activations
  that the backward pass needs, like any training through the backbone, so the ratio rises
  with the batch.  Measured on CPU (2026-11-27), peak = arguments + outputs + temporaries -
  aliased, LoRA r=8 vs full:
  - no remat: batch 1 0.76 vs 2.02 GB (0.38x); batch 8 2.95 vs 3.80 (0.78x); batch 32 0.93x.
  - remat on both (the ViT option; what a memory-bound run turns on): batch 8 0.94 vs
    2.26 GB (0.41x), batch 32 1.97 vs 3.12 GB (0.63x); in bf16 compute, batch 8 0.80 vs
    2.08 GB (0.39x).
  """
  full, low = _full_and_lora_peaks({"variant": "B/16", "remat": remat}, batch, 224)
  print(f"ViT-B/16 batch {batch} remat {remat} step peak: full {full / 1e9:.2f} GB, "
        f"LoRA r=8 {low / 1e9:.2f} GB, ratio {low / full:.3f}")
  assert low <= 0.5 * full
