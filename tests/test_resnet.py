"""ftjax.models.resnet: logit parity with torchvision / timm / transformers, BiT .npz, counts, BatchNorm.

Every reference is a random-initialised PyTorch model (BatchNorm statistics and
norm affine parameters randomised too) written to ``tmp_path`` in its real
on-disk format and read back through ``ftjax.models.from_pretrained``.
"""

from __future__ import annotations


import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
timm = pytest.importorskip("timm")
torchvision = pytest.importorskip("torchvision")
transformers = pytest.importorskip("transformers")
import safetensors.torch  # noqa: E402  (after the skips: part of the test extras)

from ftjax import models  # noqa: E402
from ftjax.errors import CheckpointError, ConfigError  # noqa: E402
from ftjax.models import common, resnet  # noqa: E402
from ftjax.tree import flatten  # noqa: E402

torch.set_num_threads(1)


def _randomise_norms(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
  """Non-trivial BatchNorm statistics and norm affine parameters, so the test sees them."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for mod in model.modules():
      if isinstance(mod, (torch.nn.BatchNorm2d, torch.nn.GroupNorm)):
        mod.weight.copy_(torch.rand(mod.weight.shape, generator=g) + 0.5)
        mod.bias.copy_(torch.rand(mod.bias.shape, generator=g) - 0.5)
      if isinstance(mod, torch.nn.BatchNorm2d):
        mod.running_mean.copy_(torch.rand(mod.running_mean.shape, generator=g) - 0.5)
        mod.running_var.copy_(torch.rand(mod.running_var.shape, generator=g) + 0.5)
  return model.eval()


def _images(n: int, size: int, seed: int = 1) -> torch.Tensor:
  return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _nhwc(x: torch.Tensor) -> np.ndarray:
  return x.permute(0, 2, 3, 1).numpy()


def _ours(model, variables, x: torch.Tensor) -> np.ndarray:
  return np.asarray(jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, _nhwc(x)))


def _assert_parity(ours: np.ndarray, ref: np.ndarray):
  assert ours.shape == ref.shape
  tol = 1e-4 * max(1.0, float(np.abs(ref).max()))
  assert float(np.abs(ours - ref).max()) <= tol


def _timm_checkpoint(tmp_path, name: str, **kwargs):
  torch.manual_seed(0)
  ref = _randomise_norms(timm.create_model(name, **kwargs))
  path = tmp_path / f"{name}.safetensors"
  safetensors.torch.save_file(ref.state_dict(), str(path))
  return ref, path


@pytest.fixture(scope="module")
def timm_resnet18(tmp_path_factory):
  return _timm_checkpoint(tmp_path_factory.mktemp("timm18"), "resnet18")


# --------------------------------------------------------------------------------------------
# Parity, float32, eval mode
# --------------------------------------------------------------------------------------------

def test_timm_resnet18_parity(timm_resnet18):
  ref, path = timm_resnet18
  x = _images(2, 64)
  model, variables, report = models.from_pretrained(f"timm:resnet18.a1_in1k@{path}")
  with torch.no_grad():
    expected = ref(x).numpy()
  _assert_parity(_ours(model, variables, x), expected)
  assert report.family == "resnet" and report.arch == {"variant": "resnet18"}
  assert report.num_classes == 1000 and report.mean == (0.485, 0.456, 0.406)
  assert len(report.matched) == 102 and not report.reinitialized
  assert report.dropped[0][0] == "*.num_batches_tracked (20 tensors)"
  assert "  dropped from checkpoint (20 tensors):\n" in str(report)  # it counted one line


def test_timm_training_checkpoint_gives_its_ema_weights_as_timms_load_checkpoint_does(timm_resnet18, tmp_path):
  import argparse
  ref, _ = timm_resnet18
  raw = timm.create_model("resnet18")  # other weights: the EMA copy is what must come out
  path = tmp_path / "model_best.pth.tar"
  torch.save({"epoch": 9, "state_dict": raw.state_dict(), "state_dict_ema": ref.state_dict(),
              "args": argparse.Namespace(model="resnet18")}, path)
  model, variables, report = models.from_pretrained(f"timm:resnet18@{path}")
  x = _images(2, 64)
  with torch.no_grad():
    _assert_parity(_ours(model, variables, x), ref(x).numpy())
  assert ("state_dict", "raw weights: the EMA weights (state_dict_ema) were read, as timm's "
                        "load_checkpoint does") in report.dropped
  assert ("args", "training state, not model weights") in report.dropped


def test_timm_resnet50_parity(tmp_path):
  ref, path = _timm_checkpoint(tmp_path, "resnet50", num_classes=7)
  x = _images(2, 64)
  model, variables, report = models.from_pretrained(f"timm:resnet50@{path}")
  with torch.no_grad():
    expected = ref(x).numpy()
  _assert_parity(_ours(model, variables, x), expected)
  assert report.num_classes == 7
  assert variables["batch_stats"]["stage3"]["block0"]["downsample"]["bn"]["var"].shape == (1024,)


def test_timm_bit_parity(tmp_path):
  ref, path = _timm_checkpoint(tmp_path, "resnetv2_50x1_bit", num_classes=10)
  x = _images(2, 64)
  model, variables, report = models.from_pretrained(f"timm:resnetv2_50x1_bit.goog_in21k_ft_in1k@{path}")
  with torch.no_grad():
    expected = ref(x).numpy()
  _assert_parity(_ours(model, variables, x), expected)
  assert (report.family, report.arch, report.num_classes) == ("resnetv2", {"variant": "R50x1"}, 10)
  assert report.mean == (0.5, 0.5, 0.5) and report.image_size == (448, 448)
  assert "batch_stats" not in variables


def test_torchvision_resnet18_parity(tmp_path):
  torch.manual_seed(0)
  ref = _randomise_norms(torchvision.models.resnet18(num_classes=5))
  path = tmp_path / "resnet18.pth"
  torch.save(ref.state_dict(), path)
  # A non-square size other than the checkpoint's 224: a convnet needs no resampling.
  x = torch.randn(3, 3, 48, 80, generator=torch.Generator().manual_seed(1))
  model, variables, report = models.from_pretrained(f"torchvision:resnet18@{path}", image_size=(48, 80))
  with torch.no_grad():
    expected = ref(x).numpy()
  _assert_parity(_ours(model, variables, x), expected)
  assert report.num_classes == 5 and report.image_size == (48, 80) and not report.resized


@pytest.mark.parametrize("layer_type, extra", [
    ("basic", {"downsample_in_first_stage": True}),
    ("bottleneck", {"downsample_in_bottleneck": True}),
    ("bottleneck", {}),
])
def test_hf_resnet_parity(tmp_path, layer_type, extra):
  widths = [16, 32, 64] if layer_type == "basic" else [32, 64, 128]
  config = transformers.ResNetConfig(
      embedding_size=16, hidden_sizes=widths, depths=[1, 2, 1], layer_type=layer_type,
      num_labels=3, id2label={0: "cat", 1: "dog", 2: "eel"}, label2id={"cat": 0, "dog": 1, "eel": 2},
      **extra)
  torch.manual_seed(0)
  ref = _randomise_norms(transformers.ResNetForImageClassification(config))
  ref.save_pretrained(tmp_path)
  x = _images(2, 40)
  model, variables, report = models.from_pretrained(f"hf:{tmp_path}")
  with torch.no_grad():
    expected = ref(pixel_values=x).logits.numpy()
  _assert_parity(_ours(model, variables, x), expected)
  assert report.class_names == ["cat", "dog", "eel"]
  assert report.arch["block"] == layer_type and report.arch["widths"] == widths
  assert report.arch["stride_in_1x1"] == extra.get("downsample_in_bottleneck", False)
  assert report.arch["first_stage_stride"] == (2 if extra.get("downsample_in_first_stage") else 1)


def test_hf_headless_resnet_model(tmp_path):
  config = transformers.ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1],
                                     layer_type="basic")
  torch.manual_seed(0)
  ref = _randomise_norms(transformers.ResNetModel(config))
  ref.save_pretrained(tmp_path)
  with pytest.raises(ConfigError, match="checkpoint has no classifier head; pass num_classes"):
    models.from_pretrained(f"hf:{tmp_path}")
  model, variables, report = models.from_pretrained(f"hf:{tmp_path}", num_classes=16)
  assert [p for p, _ in report.reinitialized] == ["params/head/bias", "params/head/kernel"]
  # An identity head exposes the pooled features, which must equal transformers' pooler output.
  variables["params"]["head"]["kernel"] = np.eye(16, dtype=np.float32)
  x = _images(2, 32)
  with torch.no_grad():
    expected = ref(pixel_values=x).pooler_output.flatten(1).numpy()
  _assert_parity(_ours(model, variables, x), expected)


# --------------------------------------------------------------------------------------------
# BiT .npz, read by ftjax and by timm's own reader
# --------------------------------------------------------------------------------------------

def _write_bit_npz(model, path):
  """timm ResNetV2 weights -> the official BiT .npz key layout (HWIO kernels, 1-D GroupNorm)."""
  sd = {k: v.numpy() for k, v in model.state_dict().items()}
  hwio = lambda w: w.transpose(2, 3, 1, 0)
  arrays = {"resnet/root_block/standardized_conv2d/kernel": hwio(sd["stem.conv.weight"]),
            "resnet/group_norm/gamma": sd["norm.weight"], "resnet/group_norm/beta": sd["norm.bias"],
            "resnet/head/conv2d/kernel": hwio(sd["head.fc.weight"]),
            "resnet/head/conv2d/bias": sd["head.fc.bias"]}
  for s, stage in enumerate(model.stages):
    for b in range(len(stage.blocks)):
      unit, t = f"resnet/block{s + 1}/unit{b + 1:02d}", f"stages.{s}.blocks.{b}"
      for letter, i in zip("abc", "123"):
        arrays[f"{unit}/{letter}/standardized_conv2d/kernel"] = hwio(sd[f"{t}.conv{i}.weight"])
        arrays[f"{unit}/{letter}/group_norm/gamma"] = sd[f"{t}.norm{i}.weight"]
        arrays[f"{unit}/{letter}/group_norm/beta"] = sd[f"{t}.norm{i}.bias"]
      if f"{t}.downsample.conv.weight" in sd:
        arrays[f"{unit}/a/proj/standardized_conv2d/kernel"] = hwio(sd[f"{t}.downsample.conv.weight"])
  np.savez(path, **arrays)
  return arrays


def test_bit_npz_matches_timm_reader(tmp_path):
  torch.manual_seed(0)
  source = _randomise_norms(timm.create_model("resnetv2_50x1_bit", num_classes=6), seed=3)
  path = tmp_path / "BiT-M-R50x1.npz"
  arrays = _write_bit_npz(source, path)
  torch.manual_seed(1)
  ref = timm.create_model("resnetv2_50x1_bit", num_classes=6).eval()
  timm.models.resnetv2._load_weights(ref, str(path))
  x = _images(2, 64)
  model, variables, report = models.from_pretrained(f"npz:BiT-M-R50x1@{path}")
  with torch.no_grad():
    expected = ref(x).numpy()
  _assert_parity(_ours(model, variables, x), expected)
  assert len(report.matched) == len(arrays) == 153
  np.testing.assert_array_equal(variables["params"]["head"]["kernel"],
                                arrays["resnet/head/conv2d/kernel"][0, 0])

  # The same file named as another variant: one error naming the key and both shapes.
  with pytest.raises(CheckpointError, match="shape mismatch \\(params/head/kernel\\): "
                                            "checkpoint \\(2048, 6\\) vs model \\(6144, 6\\)"):
    models.from_pretrained(f"npz:BiT-M-R50x3@{path}")
  with pytest.raises(CheckpointError,
                     match="model key missing.*stage3/block10/conv1/kernel \\(1, 1, 1024, 256\\)"):
    models.from_pretrained(f"npz:R101x1@{path}")
  with pytest.raises(ConfigError, match="unknown BiT ResNetV2 variant.*'R51x1'"):
    models.from_pretrained(f"npz:R51x1@{path}")




# --------------------------------------------------------------------------------------------
# Parameter counts: exact integers of the reference implementations
# --------------------------------------------------------------------------------------------

# timm.create_model(name, num_classes=1000) on the meta device; torchvision's resnet18..152 agree.
V1_COUNTS = {"resnet18": 11_689_512, "resnet26": 15_995_176, "resnet34": 21_797_672,
             "resnet50": 25_557_032, "resnet101": 44_549_160, "resnet152": 60_192_808,
             "resnet200": 64_673_832}
# timm resnetv2_{50x1,50x3,101x1,101x3,152x2,152x4}_bit, num_classes=1000.
BIT_COUNTS = {"R50x1": 25_549_352, "R50x3": 217_319_080, "R101x1": 44_541_480,
              "R101x3": 387_934_888, "R152x2": 236_335_208, "R152x4": 936_533_224}


def _param_count(family: str, variant: str) -> int:
  _, shapes = models.create(family, {"variant": variant}, num_classes=1000, image_size=224)
  return sum(int(np.prod(s.shape)) for p, s in shapes.items() if p.startswith("params/"))


def test_parameter_counts():
  assert set(V1_COUNTS) == set(resnet.V1_VARIANTS) and set(BIT_COUNTS) == set(resnet.BIT_VARIANTS)
  assert {v: _param_count("resnet", v) for v in V1_COUNTS} == V1_COUNTS
  assert {v: _param_count("resnetv2", v) for v in BIT_COUNTS} == BIT_COUNTS


def test_parameter_paths_follow_the_naming_contract():
  _, v1 = models.create("resnet", {"variant": "resnet50"}, num_classes=2, image_size=64)
  assert {"params/stem/conv/kernel", "params/stem/bn/scale", "batch_stats/stem/bn/mean",
          "params/stage1/block0/downsample/conv/kernel", "batch_stats/stage4/block2/bn3/var",
          "params/stage4/block2/conv3/kernel", "params/head/kernel", "params/head/bias"} <= set(v1)
  _, v2 = models.create("resnetv2", {"variant": "R50x1"}, num_classes=2, image_size=64)
  assert {"params/stem/conv/kernel", "params/stage1/block0/norm1/scale",
          "params/stage2/block0/downsample/conv/kernel", "params/stage4/block2/conv3/kernel",
          "params/norm/bias", "params/head/kernel"} <= set(v2)
  assert not any(p.startswith("batch_stats") for p in v2)


# --------------------------------------------------------------------------------------------
# BatchNorm in training mode
# --------------------------------------------------------------------------------------------

def test_train_step_updates_batch_stats_like_torch(tmp_path):
  torch.manual_seed(0)
  ref = _randomise_norms(torchvision.models.resnet18(num_classes=4))
  path = tmp_path / "r18.pth"
  torch.save(ref.state_dict(), path)
  # 64 px, batch 2: stage 4 sees 2x2 maps, n = 8 values per channel, where the unbiased
  # running variance torch keeps is 8/7 of the biased one.  (At n = 2 the batch-normalised
  # values are +-1 and the logits ill-conditioned: float32 rounding alone moves them 2e-3.)
  x = _images(2, 64)
  model, variables, _ = models.from_pretrained(f"torchvision:resnet18@{path}")
  logits, updated = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]))(
      variables, _nhwc(x))
  ref.train()
  with torch.no_grad():
    expected = ref(x).numpy()
  _assert_parity(np.asarray(logits), expected)
  state = {k: v.numpy() for k, v in ref.state_dict().items()}
  want = {p: a for p, a in resnet.convert_torchvision("resnet18", state).variables.items()
          if p.startswith("batch_stats/")}
  got = flatten({"batch_stats": updated["batch_stats"]})
  assert set(got) == set(want) and len(got) == 40
  for p in want:
    np.testing.assert_allclose(np.asarray(got[p]), want[p], rtol=0, atol=1e-5, err_msg=p)
  before = flatten({"batch_stats": variables["batch_stats"]})
  var = "batch_stats/stage4/block1/bn2/var"
  assert not np.allclose(got[var], before[var])

  # frozen_bn: train mode uses and keeps the running statistics (frozen backbones).
  frozen, fvars, _ = models.from_pretrained(f"torchvision:resnet18@{path}", frozen_bn=True)
  flogits, fstats = frozen.apply(fvars, _nhwc(x), train=True, mutable=["batch_stats"])
  ref.load_state_dict(torch.load(path, weights_only=True))
  with torch.no_grad():
    _assert_parity(np.asarray(flogits), ref.eval()(x).numpy())
  for p, a in flatten({"batch_stats": fstats["batch_stats"]}).items():
    np.testing.assert_array_equal(np.asarray(a), before[p])


def test_batch_norm_statistics_far_from_zero():
  # One-pass moments: E[x^2] - E[x]^2 in float32 would cancel at an offset of 1000 (E[x^2]
  # about 1e6, float32 spacing there 0.06); the sums around a value from the batch do not.
  x = 1000.0 + 3.0 * np.random.default_rng(0).standard_normal((4, 5, 5, 8)).astype(np.float32)
  bn = resnet.BatchNorm(use_running_average=False)
  variables = bn.init(jax.random.key(0), x)
  y, updated = jax.jit(lambda v, x: bn.apply(v, x, mutable=["batch_stats"]))(variables, x)
  x64 = x.astype(np.float64)
  mean, var = x64.mean((0, 1, 2)), x64.var((0, 1, 2))
  np.testing.assert_allclose(np.asarray(y), (x64 - mean) / np.sqrt(var + common.BN_EPS), rtol=0, atol=1e-4)
  n = 4 * 5 * 5
  want_var = 0.9 + 0.1 * var * n / (n - 1)
  np.testing.assert_allclose(np.asarray(updated["batch_stats"]["var"]), want_var, rtol=1e-5)
  np.testing.assert_allclose(np.asarray(updated["batch_stats"]["mean"]), 0.1 * mean, rtol=1e-6)


@pytest.mark.parametrize("shape, padding, dtype", [
    ((2, 12, 12, 3), 1, np.float32),   # even sizes: the last window overhangs the edge
    ((3, 11, 9, 2), 1, np.float32),    # odd sizes
    ((2, 11, 11, 2), 0, np.float32),   # BiT's stem: padded by the caller, pooled VALID
    ((2, 12, 12, 3), 1, jnp.bfloat16),
])
def test_max_pool_values_and_gradients_equal_flax_and_torch(shape, padding, dtype):
  # Gathered gradient against JAX's select-and-scatter and torch's max_pool2d backward, with
  # ties (rounded, ReLU-like inputs: whole windows of zeros) where only the first maximum of
  # a window may get its gradient.  Integer cotangents make every sum exact in any order.
  rng = np.random.default_rng(0)
  x = jnp.asarray(np.maximum(np.round(2 * rng.standard_normal(shape)), 0), dtype)
  flax_pool = lambda x: nn.max_pool(x, (3, 3), (2, 2), ((padding, padding), (padding, padding)))
  y, pull = jax.vjp(lambda x: resnet.max_pool(x, 3, 2, padding), x)
  y_ref, pull_ref = jax.vjp(flax_pool, x)
  g = jnp.asarray(rng.integers(-3, 4, y.shape), dtype)
  (dx,), (dx_ref,) = pull(g), pull_ref(g)
  assert y.dtype == dx.dtype == dtype and dx.shape == x.shape
  np.testing.assert_array_equal(np.asarray(y, np.float32), np.asarray(y_ref, np.float32))
  np.testing.assert_array_equal(np.asarray(dx, np.float32), np.asarray(dx_ref, np.float32))
  assert float(jnp.sum(dx != 0)) > 0 and float(jnp.sum(x == 0)) > x.size / 3  # ties were there

  xt = torch.tensor(np.asarray(x, np.float32)).permute(0, 3, 1, 2).requires_grad_()
  yt = torch.nn.functional.max_pool2d(xt, 3, 2, padding)
  yt.backward(torch.tensor(np.asarray(g, np.float32)).permute(0, 3, 1, 2))
  np.testing.assert_array_equal(np.asarray(dx, np.float32), _nhwc(xt.grad))


def test_max_pool_nan_takes_the_gradient_like_torch():
  x = np.zeros((1, 4, 4, 1), np.float32)
  x[0, 1, 2, 0] = np.nan
  y, pull = jax.vjp(lambda x: resnet.max_pool(x, 3, 2, 1), jnp.asarray(x))
  dx = np.asarray(pull(jnp.ones_like(y))[0])
  xt = torch.tensor(x).permute(0, 3, 1, 2).requires_grad_()
  yt = torch.nn.functional.max_pool2d(xt, 3, 2, 1)
  yt.sum().backward()
  np.testing.assert_array_equal(np.isnan(np.asarray(y)), np.isnan(_nhwc(yt.detach())))
  np.testing.assert_array_equal(dx, _nhwc(xt.grad))
  assert dx[0, 1, 2, 0] == 2  # both windows holding the NaN route their gradient to it


@pytest.mark.parametrize("max_pool_impl, stem_conv_impl",
                         [("ftjax", "flax"), ("flax", "flax"), ("ftjax", "space_to_depth")])
@pytest.mark.slow  # 20 s or more on 2 slow cores; CI runs it (-m slow)
def test_train_mode_gradients_equal_torch(tmp_path, max_pool_impl, stem_conv_impl):
  # The whole backward (one-pass BatchNorm moments, the stem's max-pool gradient, gathered
  # or JAX's select-and-scatter, the stem convolution direct or on 2 x 2 blocks) against
  # torch autograd, in train mode with batch statistics.
  torch.manual_seed(0)
  ref = _randomise_norms(torchvision.models.resnet18(num_classes=4)).train()
  path = tmp_path / "r18.pth"
  torch.save(ref.state_dict(), path)
  model, variables, _ = models.from_pretrained(f"torchvision:resnet18@{path}",
                                               max_pool_impl=max_pool_impl,
                                               stem_conv_impl=stem_conv_impl)
  assert (model.max_pool_impl, model.stem_conv_impl) == (max_pool_impl, stem_conv_impl)
  with pytest.raises(ConfigError, match="unknown stem convolution implementation.*'im2col'"):
    models.from_pretrained(f"torchvision:resnet18@{path}", stem_conv_impl="im2col")
  x = _images(4, 64)
  w = torch.randn(4, 4, generator=torch.Generator().manual_seed(2))
  (ref(x) * w).sum().backward()

  def loss(params):
    logits, _ = model.apply({**variables, "params": params}, _nhwc(x), train=True,
                            mutable=["batch_stats"])
    return jnp.sum(logits * w.numpy())

  grads = flatten(jax.jit(jax.grad(loss))(variables["params"]))
  # The gradients in torch's layout, through the checkpoint converter (buffers as they are).
  torch_grads = {k: v.numpy() for k, v in ref.state_dict().items()}
  torch_grads.update({k: p.grad.numpy() for k, p in ref.named_parameters()})
  want = {p[len("params/"):]: a for p, a in
          resnet.convert_torchvision("resnet18", torch_grads).variables.items()
          if p.startswith("params/")}
  assert set(grads) == set(want) and len(want) == 62
  for p, a in want.items():
    scale = max(1e-3, float(np.abs(a).max()))
    assert float(np.abs(np.asarray(grads[p]) - a).max()) <= 2e-4 * scale, p


def test_zero_init_residual_and_bf16_compute():
  arch = {"block": "bottleneck", "depths": [1, 1], "widths": [32, 64], "stem_width": 16,
          "zero_init_residual": True}
  model, _ = models.create("resnet", arch, num_classes=3, image_size=32)
  # rbg keys: threefry's random-number kernels take seconds to compile on CPU.
  init = jax.jit(lambda key, x: model.init({"params": key}, x, train=False))
  variables = init(jax.random.key(0, impl="rbg"), jnp.zeros((1, 32, 32, 3)))
  assert not np.any(np.asarray(variables["params"]["stage2"]["block0"]["bn3"]["scale"]))
  assert np.all(np.asarray(variables["params"]["stage2"]["block0"]["bn2"]["scale"]) == 1)
  variables = jax.tree.map(lambda a: a + 0.1 if a.ndim == 1 else a, variables)  # wake the blocks
  x = _nhwc(_images(2, 32))
  f32 = jax.jit(model.apply)(variables, x)
  bf16_model, shapes = models.create("resnet", arch, num_classes=3, image_size=32, dtype=jnp.bfloat16)
  assert {s.dtype for s in shapes.values()} == {np.dtype(np.float32)}  # bf16 compute, float32 variables
  bf16 = jax.jit(bf16_model.apply)(variables, x)
  assert bf16.dtype == jnp.float32  # logits come out in float32 whatever the compute dtype
  assert float(jnp.abs(bf16 - f32).max()) <= 0.05 * max(1.0, float(jnp.abs(f32).max()))
  assert float(jnp.abs(bf16 - f32).max()) > 0  # it did compute in bf16


def test_bit_bf16_compute():
  arch = {"depths": [1], "width_factor": 1}
  model, _ = models.create("resnetv2", arch, num_classes=3, image_size=16)
  init = jax.jit(lambda key, x: model.init({"params": key}, x, train=False))
  variables = init(jax.random.key(0, impl="rbg"), jnp.zeros((1, 16, 16, 3)))
  x = _nhwc(_images(2, 16))
  f32 = jax.jit(model.apply)(variables, x)
  bf16_model, shapes = models.create("resnetv2", arch, num_classes=3, image_size=16,
                                     dtype=jnp.bfloat16)
  assert {s.dtype for s in shapes.values()} == {np.dtype(np.float32)}
  bf16 = jax.jit(bf16_model.apply)(variables, x)
  assert bf16.dtype == jnp.float32
  assert 0 < float(jnp.abs(bf16 - f32).max()) <= 0.05 * max(1.0, float(jnp.abs(f32).max()))


# --------------------------------------------------------------------------------------------
# Head replacement and refused checkpoints
# --------------------------------------------------------------------------------------------

def test_head_replacement_zero_head_rest_equal(timm_resnet18):
  _, path = timm_resnet18
  _, full, _ = models.from_pretrained(f"timm:resnet18@{path}")
  model, variables, report = models.from_pretrained(f"timm:resnet18@{path}", num_classes=10)
  flat, flat_full = flatten(variables), flatten(full)
  assert flat["params/head/kernel"].shape == (512, 10) and flat["params/head/bias"].shape == (10,)
  assert not np.any(flat["params/head/kernel"]) and not np.any(flat["params/head/bias"])
  assert set(flat) == set(flat_full)
  for p in flat:
    if not p.startswith("params/head/"):
      np.testing.assert_array_equal(flat[p], flat_full[p], err_msg=p)
  assert [p for p, _ in report.reinitialized] == ["params/head/bias", "params/head/kernel"]
  assert "new head, zeros (512, 10) (checkpoint (512, 1000))" in str(report)
  assert jax.eval_shape(model.apply, variables, jnp.zeros((1, 32, 32, 3))).shape == (1, 10)


def test_checkpoint_of_another_architecture_is_refused(timm_resnet18):
  _, path = timm_resnet18
  with pytest.raises(CheckpointError, match="model key missing.*stage1/block0/bn3/mean \\(256,\\)"):
    models.from_pretrained(f"timm:resnet50@{path}")
  # the hint names the likely cause first, not the way to load half a network
  with pytest.raises(CheckpointError, match="model key missing.*stage1/block2/bn1/mean \\(64,\\); a checkpoint "
                                            "for another architecture or variant\\?"):
    models.from_pretrained(f"timm:resnet34@{path}")
  with pytest.raises(ConfigError, match="unsupported timm ResNet model.*'resnet50d'"):
    models.from_pretrained(f"timm:resnet50d@{path}")
  with pytest.raises(CheckpointError, match="no ResNet layer has \\(cls_token\\): shape \\(1, 1, 8\\)"):
    resnet.convert_timm("resnet18", {"cls_token": np.zeros((1, 1, 8), np.float32)})


def test_timm_mean_and_std_follow_timms_pretrained_cfg_for_every_tag():
  from timm.models import get_pretrained_cfg
  from ftjax.models import resnet
  names = [n for n in timm.list_pretrained("resnet*") if n.partition(".")[0] in resnet.V1_VARIANTS]
  names += timm.list_pretrained("resnetv2_*_bit*")
  assert len(names) > 40  # resnet34.ra4_e3600_r224_in1k among them: mean and std 0.5
  for name in names:
    cfg = get_pretrained_cfg(name)
    mean, std = resnet.timm_stats(name)
    np.testing.assert_allclose(mean, cfg.mean, atol=1e-6, err_msg=name)
    np.testing.assert_allclose(std, cfg.std, atol=1e-6, err_msg=name)


@pytest.mark.slow  # 15 s or more on 2 slow cores (the default run neared 15 min); CI runs it (-m slow)
def test_bn_momentum_reaches_every_batchnorm_and_is_checked():
  # model.bn_momentum (flax's convention) was refused for ResNets as an unknown arch key.
  model, _ = models.create("resnet", {"variant": "resnet18", "bn_momentum": 0.5}, num_classes=3, image_size=32)
  variables = models.init_variables(model, 32)
  x = np.random.default_rng(0).normal(size=(2, 32, 32, 3)).astype(np.float32)
  _, upd = model.apply(variables, x, train=True, mutable=["batch_stats"])
  # stem: conv, then BatchNorm of its output with momentum 0.5
  conv = jax.lax.conv_general_dilated(x, variables["params"]["stem"]["conv"]["kernel"], (2, 2), ((3, 3), (3, 3)),
                                      dimension_numbers=("NHWC", "HWIO", "NHWC"))
  np.testing.assert_allclose(upd["batch_stats"]["stem"]["bn"]["mean"], 0.5 * np.asarray(conv).mean((0, 1, 2)),
                             rtol=1e-5, atol=1e-6)
  down = upd["batch_stats"]["stage2"]["block0"]["downsample"]["bn"]["var"]
  default, _ = models.create("resnet", {"variant": "resnet18"}, num_classes=3, image_size=32)
  _, upd9 = default.apply(variables, x, train=True, mutable=["batch_stats"])
  # var: m * 1 + (1 - m) * v, so (var - m) / (1 - m) is the same batch variance at both momenta
  np.testing.assert_allclose((np.asarray(down) - 0.5) / 0.5,
                             (np.asarray(upd9["batch_stats"]["stage2"]["block0"]["downsample"]["bn"]["var"]) - 0.9)
                             / 0.1, rtol=1e-3, atol=1e-4)
  for bad in (1.0, -0.1, "0.9"):
    with pytest.raises(ConfigError, match=r"BatchNorm momentum must be in \[0, 1\) \(bn_momentum\)"):
      models.create("resnet", {"variant": "resnet18", "bn_momentum": bad}, num_classes=3, image_size=32)
