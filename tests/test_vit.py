"""ViT: logit parity with transformers, timm and timm's Google .npz reader; resampling; counts.

Every reference is a random-initialised PyTorch model (its LayerNorm affine
parameters, class token and position embedding randomised too) written to
``tmp_path`` in its real on-disk format and read back through
``ftjax.models.from_pretrained``.  Logits must agree within
1e-4 * max(1, max |reference logit|), float32, eval mode.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.torch
import timm
import torch
import torch.nn.functional as F
from flax.errors import InvalidRngError
from timm.layers import resample_abs_pos_embed
from timm.models.vision_transformer import VisionTransformer as TimmViT
from timm.models.vision_transformer import _load_weights, checkpoint_filter_fn

from ftjax.errors import CheckpointError, ConfigError
from ftjax.models import create, from_pretrained, vit
from ftjax.tree import flatten, unflatten

torch.set_num_threads(1)

TIMM_TINY = "vit_tiny_patch16_224"


def _randomise(module: torch.nn.Module, seed: int, scale: float = 0.1) -> torch.nn.Module:
  """Adds N(0, scale) noise to every parameter (LN affine, tokens and head included); eval mode."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for _, p in sorted(module.named_parameters()):
      p.add_(torch.randn(p.shape, generator=g) * scale)
  return module.eval()


def _images(n: int, h: int, w: int, seed: int = 0) -> np.ndarray:
  return np.random.default_rng(seed).standard_normal((n, 3, h, w)).astype(np.float32)  # NCHW


def _torch_logits(model: torch.nn.Module, x: np.ndarray) -> np.ndarray:
  with torch.no_grad():
    out = model(torch.from_numpy(x))
  return (out.logits if hasattr(out, "logits") else out).numpy()


def _ftjax_logits(model, variables, x: np.ndarray) -> np.ndarray:
  return np.asarray(jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, x.transpose(0, 2, 3, 1)))


def _assert_parity(ours: np.ndarray, ref: np.ndarray) -> None:
  assert ours.shape == ref.shape
  tol = 1e-4 * max(1.0, float(np.abs(ref).max()))
  err = float(np.abs(ours - ref).max())
  assert err <= tol, f"max |diff| {err:.3g} > {tol:.3g}"
  assert np.abs(ref).max() > 0.5  # the reference logits are not trivially small


@pytest.fixture(scope="module")
def timm_tiny(tmp_path_factory):
  """A random timm vit_tiny_patch16_224 (1000 classes) saved as safetensors: (model, file)."""
  torch.manual_seed(0)
  model = _randomise(timm.create_model(TIMM_TINY, num_classes=1000), seed=1)
  path = tmp_path_factory.mktemp("timm_tiny") / "model.safetensors"
  safetensors.torch.save_file(model.state_dict(), str(path))
  return model, path


# ---------------------------------------------------------------------------------- parity

def test_hf_vit_for_image_classification_parity(tmp_path):
  from transformers import ViTConfig, ViTForImageClassification
  names = ["cat", "dog", "fish", "bird", "frog"]
  config = ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=48,
                     image_size=32, patch_size=8, num_labels=5, id2label=dict(enumerate(names)))
  torch.manual_seed(0)
  ref = _randomise(ViTForImageClassification(config), seed=2)
  ref.save_pretrained(tmp_path)
  model, variables, report = from_pretrained(f"hf:{tmp_path}")
  x = _images(2, 32, 32)
  _assert_parity(_ftjax_logits(model, variables, x), _torch_logits(ref, x))
  assert report.arch == {"hidden_size": 32, "num_layers": 2, "num_heads": 2, "mlp_dim": 48,
                         "patch_size": 8, "layer_norm_eps": 1e-12}
  assert report.class_names == names
  assert (report.mean, report.std) == ((0.5,) * 3, (0.5,) * 3)
  assert len(report.matched) == len(flatten(variables)) == 2 * 16 + 8
  # save_pretrained(max_shard_size=...): shards listed by model.safetensors.index.json
  ref.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
  assert len(list((tmp_path / "sharded").glob("model-*.safetensors"))) > 1
  _, sharded, _ = from_pretrained(f"hf:{tmp_path / 'sharded'}")
  for k, v in flatten(variables).items():
    np.testing.assert_array_equal(flatten(sharded)[k], v, err_msg=k)
  next((tmp_path / "sharded").glob("model-*.safetensors")).unlink()
  with pytest.raises(CheckpointError, match="weight file not found"):
    from_pretrained(f"hf:{tmp_path / 'sharded'}")


def test_hf_vit_with_the_tanh_gelu_parity(tmp_path):
  from transformers import ViTConfig, ViTForImageClassification
  config = ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=48,
                     image_size=32, patch_size=8, num_labels=3, hidden_act="gelu_pytorch_tanh")
  torch.manual_seed(0)
  ref = _randomise(ViTForImageClassification(config), seed=6, scale=0.5)
  ref.save_pretrained(tmp_path)
  model, variables, report = from_pretrained(f"hf:{tmp_path}")
  assert report.arch["gelu_approximate"] is True
  x = _images(2, 32, 32)
  _assert_parity(_ftjax_logits(model, variables, x), _torch_logits(ref, x))
  exact = vit.create_model({**report.arch, "gelu_approximate": False}, 3)
  assert np.abs(_ftjax_logits(exact, variables, x) - _torch_logits(ref, x)).max() > 1e-4  # it matters
  (tmp_path / "config.json").write_text((tmp_path / "config.json").read_text().replace(
      "gelu_pytorch_tanh", "relu"))
  with pytest.raises(CheckpointError, match="unsupported ViT activation.*'relu'"):
    from_pretrained(f"hf:{tmp_path}")


_SIGLIP_VISION = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=48,
                      image_size=32, patch_size=8)


def test_hf_siglip_for_image_classification_parity(tmp_path):
  """SiglipForImageClassification: the mean of every token into its classifier (its
  attention-pooling head unused, dropped and recorded); the tanh GELU, no class token."""
  from transformers import SiglipConfig, SiglipForImageClassification
  config = SiglipConfig(vision_config=_SIGLIP_VISION, text_config=dict(hidden_size=32, num_hidden_layers=1,
                                                                       num_attention_heads=2, vocab_size=64),
                        num_labels=4, id2label={i: n for i, n in enumerate(["a", "b", "c", "d"])})
  torch.manual_seed(0)
  ref = _randomise(SiglipForImageClassification(config), seed=7)
  ref.save_pretrained(tmp_path)
  model, variables, report = from_pretrained(f"hf:{tmp_path}")
  x = _images(2, 32, 32)
  _assert_parity(_ftjax_logits(model, variables, x), _torch_logits(ref, x))
  assert report.arch == {"hidden_size": 32, "num_layers": 2, "num_heads": 2, "mlp_dim": 48, "patch_size": 8,
                         "pooling": "gap", "class_token": False, "gelu_approximate": True}
  assert report.class_names == ["a", "b", "c", "d"] and report.image_size == (32, 32)
  assert report.dropped and all(k.startswith("vision_model.head.") for k, _ in report.dropped)


def test_hf_siglip_model_image_tower_features_equal_its_pooler_output(tmp_path):
  """SiglipModel (the hub's google/siglip-*): its image tower's MAP head output is the input of
  ftjax's new head; the text tower and the logit scale and bias are dropped and recorded."""
  from transformers import SiglipConfig, SiglipModel

  from ftjax import fewshot
  config = SiglipConfig(vision_config=_SIGLIP_VISION, text_config=dict(hidden_size=32, num_hidden_layers=1,
                                                                       num_attention_heads=2, vocab_size=64))
  torch.manual_seed(0)
  ref = _randomise(SiglipModel(config), seed=8)
  ref.save_pretrained(tmp_path)
  with pytest.raises(ConfigError, match="no classifier head"):
    from_pretrained(f"hf:{tmp_path}")
  model, variables, report = from_pretrained(f"hf:{tmp_path}", num_classes=3)
  assert report.arch["pooling"] == "map" and report.num_classes == 3
  dropped = {k for k, _ in report.dropped}
  assert {"logit_scale", "logit_bias"} <= dropped and all(
      k.startswith("text_model.") for k in dropped - {"logit_scale", "logit_bias"})
  x = _images(2, 32, 32)
  with torch.no_grad():
    want = ref.vision_model(torch.from_numpy(x)).pooler_output.numpy()
  got = np.asarray(fewshot.features(model, variables, jnp.asarray(x.transpose(0, 2, 3, 1))))
  _assert_parity(got, want)
  # The tower saved on its own: SiglipVisionModel, model_type siglip_vision_model.
  ref.vision_model.save_pretrained(tmp_path / "vision")
  model, variables, report = from_pretrained(f"hf:{tmp_path / 'vision'}", num_classes=3)
  assert not report.dropped and report.arch["pooling"] == "map"
  _assert_parity(np.asarray(fewshot.features(model, variables, jnp.asarray(x.transpose(0, 2, 3, 1)))), want)


_DINOV2 = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, mlp_ratio=2, image_size=28, patch_size=7,
               layerscale_value=0.5)


@pytest.mark.parametrize("registers", [0, 4])
def test_hf_dinov2_for_image_classification_parity(tmp_path, registers):
  """The class token and the patch mean side by side into the classifier (pooling "token_gap");
  LayerScale; with registers, transformers' position row of the class token is folded into it."""
  from transformers import (Dinov2Config, Dinov2ForImageClassification, Dinov2WithRegistersConfig,
                            Dinov2WithRegistersForImageClassification)
  torch.manual_seed(0)
  if registers:
    ref = Dinov2WithRegistersForImageClassification(
        Dinov2WithRegistersConfig(**_DINOV2, num_register_tokens=registers, num_labels=3))
  else:
    ref = Dinov2ForImageClassification(Dinov2Config(**_DINOV2, num_labels=3))
  ref = _randomise(ref, seed=10)
  ref.save_pretrained(tmp_path)
  model, variables, report = from_pretrained(f"hf:{tmp_path}")
  x = _images(2, 28, 28)
  _assert_parity(_ftjax_logits(model, variables, x), _torch_logits(ref, x))
  regs = {"reg_tokens": 4, "posemb_class_token": False} if registers else {}
  assert report.arch == {"hidden_size": 32, "num_layers": 2, "num_heads": 2, "mlp_dim": 64, "patch_size": 7,
                         "pooling": "token_gap", "layer_scale": 0.5, **regs}
  assert [k for k, _ in report.dropped] == [f"{'dinov2_with_registers' if registers else 'dinov2'}"
                                            ".embeddings.mask_token"]
  assert report.image_size == (28, 28) and variables["params"]["head"]["kernel"].shape == (64, 3)


def test_hf_dinov2_model_features_are_its_pooler_output(tmp_path):
  from transformers import Dinov2Config, Dinov2Model

  from ftjax import fewshot
  torch.manual_seed(0)
  ref = _randomise(Dinov2Model(Dinov2Config(**_DINOV2)), seed=11)
  ref.save_pretrained(tmp_path)
  model, variables, report = from_pretrained(f"hf:{tmp_path}", num_classes=5)
  assert report.arch.get("pooling", "token") == "token"
  x = _images(2, 28, 28)
  with torch.no_grad():
    want = ref(torch.from_numpy(x)).pooler_output.numpy()
  _assert_parity(np.asarray(fewshot.features(model, variables, jnp.asarray(x.transpose(0, 2, 3, 1)))), want)
  config = tmp_path / "config.json"
  config.write_text(config.read_text().replace('"use_swiglu_ffn": false', '"use_swiglu_ffn": true'))
  with pytest.raises(CheckpointError, match="unsupported DINOv2 config.*use_swiglu_ffn=True"):
    from_pretrained(f"hf:{tmp_path}", num_classes=5)


def test_position_embedding_and_pooling_options_are_checked():
  a = vit.resolve_arch({"variant": "test", "pooling": "map"})
  assert (a["class_token"], a["posemb"], a["posemb_class_token"]) == (False, "learn", False)
  a = vit.resolve_arch({"variant": "test", "posemb": "sincos2d"})  # token pooling, big_vision layout
  assert (a["class_token"], a["posemb_class_token"]) == (True, False)
  assert vit.resolve_arch({"variant": "test"})["posemb_class_token"] is True
  for arch, message in (({"posemb": "sincos"}, r"unknown ViT position embedding \(arch.posemb\): 'sincos'"),
                        ({"pooling": "mean"},
                         r"unknown ViT pooling.*'mean'; one of \['token', 'gap', 'map', 'token_gap'\]"),
                        ({"pooling": "token_gap", "class_token": False}, "token_gap pooling needs a class token"),
                        ({"posemb": "sincos2d", "posemb_class_token": True}, "has no class-token row"),
                        ({"posemb": "sincos2d", "hidden_size": 30, "num_heads": 2}, "multiple of 4")):
    with pytest.raises(ConfigError, match=message):
      vit.resolve_arch({"variant": "test", **arch})


def test_hf_vit_model_pooler_is_dropped_and_recorded(tmp_path):
  from transformers import ViTConfig, ViTModel
  config = ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                     image_size=32, patch_size=8)
  torch.manual_seed(0)
  ViTModel(config, add_pooling_layer=True).save_pretrained(tmp_path)
  with pytest.raises(ConfigError, match="no classifier head"):
    from_pretrained(f"hf:{tmp_path}")
  _, variables, report = from_pretrained(f"hf:{tmp_path}", num_classes=3)
  assert sorted(k for k, _ in report.dropped) == ["pooler.dense.bias", "pooler.dense.weight"]
  assert [p for p, _ in report.reinitialized] == ["params/head/bias", "params/head/kernel"]
  assert not np.any(variables["params"]["head"]["kernel"])
  assert "dropped from checkpoint (2 tensors)" in str(report)


def test_timm_class_token_parity(timm_tiny):
  ref, path = timm_tiny
  model, variables, report = from_pretrained(f"timm:{TIMM_TINY}@{path}")
  x = _images(2, 224, 224)
  _assert_parity(_ftjax_logits(model, variables, x), _torch_logits(ref, x))
  assert report.arch == {"variant": "Ti/16"} and report.image_size == (224, 224)
  assert report.num_classes == 1000 and len(report.matched) == 200


def test_timm_gap_parity(tmp_path):
  """vit_base_patch16_gap_224: timm's average-pooled ViT (no class token, norm then mean)."""
  torch.manual_seed(0)
  ref = _randomise(timm.create_model("vit_base_patch16_gap_224", num_classes=10), seed=3, scale=0.05)
  path = tmp_path / "model.safetensors"
  safetensors.torch.save_file(ref.state_dict(), str(path))
  model, variables, report = from_pretrained(f"timm:vit_base_patch16_gap_224@{path}")
  x = _images(1, 224, 224)
  _assert_parity(_ftjax_logits(model, variables, x), _torch_logits(ref, x))
  assert report.arch["pooling"] == "gap" and report.arch["class_token"] is False
  assert report.arch["num_heads"] == 16  # timm's gap B/16 has 16 heads, not 12
  assert "params/cls" not in flatten(variables)


def test_timm_siglip_tower_parity(tmp_path):
  """vit_base_patch32_siglip_256: attention pooling (attn_pool -> MAPHead_0), no class token,
  the tanh GELU of timm's SigLIP 2 ports; built at 64 px, which its position embedding says."""
  name = "vit_base_patch32_siglip_256"
  torch.manual_seed(0)
  ref = _randomise(timm.create_model(name, num_classes=6, img_size=64), seed=5, scale=0.05)
  path = tmp_path / "model.safetensors"
  safetensors.torch.save_file(ref.state_dict(), str(path))
  model, variables, report = from_pretrained(f"timm:{name}@{path}")
  x = _images(2, 64, 64)
  _assert_parity(_ftjax_logits(model, variables, x), _torch_logits(ref, x))
  assert report.arch == {"variant": "B/32", "pooling": "map", "class_token": False, "gelu_approximate": True}
  assert report.image_size == (64, 64) and len(report.matched) == len(flatten(variables))
  assert not report.dropped and not report.reinitialized
  probe = flatten(variables)["params/MAPHead_0/probe"]
  np.testing.assert_array_equal(probe, ref.attn_pool.latent.detach().numpy())


@pytest.mark.parametrize("name", ["vit_small_patch14_dinov2", "vit_small_patch14_reg4_dinov2.lvd142m"])
def test_timm_dinov2_parity(tmp_path, name):
  """DINOv2: LayerScale (ls1/ls2.gamma), and with reg4 four registers that the position
  embedding has no rows for (timm's no_embed_class); built at 56 px, which the table says."""
  torch.manual_seed(0)
  ref = _randomise(timm.create_model(name.split(".")[0], num_classes=5, img_size=56), seed=9, scale=0.05)
  path = tmp_path / "model.safetensors"
  safetensors.torch.save_file(ref.state_dict(), str(path))
  model, variables, report = from_pretrained(f"timm:{name}@{path}")
  x = _images(2, 56, 56)
  _assert_parity(_ftjax_logits(model, variables, x), _torch_logits(ref, x))
  reg = "reg4" in name
  assert report.arch == {"hidden_size": 384, "num_layers": 12, "num_heads": 6, "mlp_dim": 1536,
                         "patch_size": 14, "layer_scale": 1e-5,
                         **({"reg_tokens": 4, "posemb_class_token": False} if reg else {})}
  assert report.image_size == (56, 56) and (report.mean, report.std) == ((0.485, 0.456, 0.406),
                                                                         (0.229, 0.224, 0.225))
  assert len(report.matched) == len(flatten(variables)) and not report.reinitialized
  gamma = flatten(variables)["params/Transformer/encoderblock_3/layer_scale_mlp"]
  np.testing.assert_array_equal(gamma, ref.blocks[3].ls2.gamma.detach().numpy())
  # Another size resamples the patch rows only (the class row, if any, kept apart).
  _, variables, report = from_pretrained(f"timm:{name}@{path}", image_size=84)
  rows = 36 if reg else 37
  assert report.resized == [(vit.POSEMB_PATH, (1, rows - 20, 384), (1, rows, 384))]


@pytest.mark.parametrize("name", ["vit_small_patch14_dinov2", "vit_small_patch14_reg4_dinov2"])
def test_timm_dinov2_reads_facebooks_original_files_as_timm_does(tmp_path, name):
  """facebookresearch/dinov2's .pth (mask_token; with registers, register_tokens and a class-token
  row in pos_embed) loads under its timm name, as timm's checkpoint_filter_fn loads it."""
  torch.manual_seed(0)
  ref = _randomise(timm.create_model(name, num_classes=0, img_size=56), seed=12, scale=0.05)
  original = {k: v.clone() for k, v in ref.state_dict().items()}
  if "reg_token" in original:  # the inverse of timm's _convert_dinov2, with a non-zero class row
    row = torch.randn(1, 1, 384, generator=torch.Generator().manual_seed(0)) * 0.1
    original["register_tokens"] = original.pop("reg_token")
    original["cls_token"] = original.pop("cls_token") - row
    original["pos_embed"] = torch.cat([row, original.pop("pos_embed")], 1)
  original["mask_token"] = torch.zeros(1, 384)
  path = tmp_path / "dinov2_pretrain.pth"
  torch.save(original, path)
  check = timm.create_model(name, num_classes=0, img_size=56)
  check.load_state_dict(checkpoint_filter_fn(torch.load(path), check))  # timm reads it so
  model, variables, report = from_pretrained(f"timm:{name}@{path}", num_classes=3)
  assert report.dropped == [("mask_token", "DINOv2 pre-training mask token: unused by a classifier")]
  assert report.image_size == (56, 56)
  assert [k for k, _ in report.reinitialized] == ["params/head/bias", "params/head/kernel"]  # the new head only
  from ftjax import fewshot
  x = _images(2, 56, 56)
  got = np.asarray(fewshot.features(model, variables, jnp.asarray(x.transpose(0, 2, 3, 1))))
  _assert_parity(got, _torch_logits(ref, x))


def test_timm_avg_pool_with_fc_norm_parity(tmp_path):
  """timm global_pool='avg' (mean of patch tokens, then fc_norm), loaded with explicit overrides."""
  torch.manual_seed(0)
  ref = _randomise(timm.create_model(TIMM_TINY, num_classes=7, global_pool="avg", img_size=64), seed=4)
  path = tmp_path / "model.safetensors"
  safetensors.torch.save_file(ref.state_dict(), str(path))
  source = f"timm:{TIMM_TINY}@{path}"
  with pytest.raises(CheckpointError, match="missing.*encoder_norm"):  # the name says token pooling
    from_pretrained(source, image_size=64)
  model, variables, report = from_pretrained(source, pooling="gap", fc_norm=True, class_token=True)
  x = _images(2, 64, 64)
  _assert_parity(_ftjax_logits(model, variables, x), _torch_logits(ref, x))
  assert "encoder_norm" not in variables["params"]["Transformer"]
  # Built with img_size=64 under its 224 px name: the grid is the position embedding's (4x4),
  # and another size resamples that grid, as timm's own loader does.
  assert report.image_size == (64, 64) and not report.resized
  _, variables, report = from_pretrained(source, image_size=96, pooling="gap", fc_norm=True,
                                         class_token=True)
  assert report.resized == [(vit.POSEMB_PATH, (1, 17, 192), (1, 37, 192))]
  ref_96 = resample_abs_pos_embed(ref.pos_embed.detach(), new_size=[6, 6], num_prefix_tokens=1)
  np.testing.assert_allclose(flatten(variables)[vit.POSEMB_PATH], ref_96.numpy(), rtol=0, atol=1e-5)


def test_google_npz_parity_with_timm_reader(tmp_path):
  """An .npz in vit_jax's key layout, read by ftjax and by timm's ``_load_weights``."""
  _, shapes = create("vit", {"variant": "test"}, num_classes=5, image_size=32)
  rng = np.random.default_rng(0)
  arrays = {path.removeprefix("params/"): (rng.standard_normal(s.shape) * 0.2
                                           + path.endswith("/scale")).astype(np.float32)
            for path, s in shapes.items()}
  assert "Transformer/encoderblock_1/MultiHeadDotProductAttention_1/query/kernel" in arrays
  assert arrays["embedding/kernel"].shape == (8, 8, 3, 32)  # HWIO, as Google's files
  file = tmp_path / "ViT-test.npz"
  np.savez(file, **arrays)
  ref = TimmViT(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.0,
                num_classes=5).eval()
  _load_weights(ref, str(file))
  model, variables, report = from_pretrained(f"npz:test@{file}")
  x = _images(3, 32, 32)
  _assert_parity(_ftjax_logits(model, variables, x), _torch_logits(ref, x))
  assert (report.mean, report.std) == ((0.5,) * 3, (0.5,) * 3)
  assert report.image_size == (32, 32) and len(report.matched) == len(arrays)


def test_big_vision_gap_npz_parity_with_timm_reader(tmp_path):
  """big_vision's default ViT (pool_type 'gap', no class token), its unscanned .npz names."""
  arch = {"variant": "test", "pooling": "gap"}
  _, shapes = create("vit", arch, num_classes=5, image_size=32)
  rng = np.random.default_rng(1)
  arrays = {}
  for path, s in shapes.items():
    name = path.removeprefix("params/")
    for rx, repl in (("Transformer/posembed_input/pos_embedding", "pos_embedding"),
                     ("LayerNorm_2", "LayerNorm_1"), ("MlpBlock_3", "MlpBlock_0"),
                     ("MultiHeadDotProductAttention_1", "MultiHeadDotProductAttention_0")):
      name = name.replace(rx, repl)
    arrays[f"params/{name}"] = (rng.standard_normal(s.shape) * 0.2 + path.endswith("/scale")).astype(np.float32)
  file = tmp_path / "bv_gap.npz"
  np.savez(file, **arrays)
  ref = TimmViT(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.0,
                num_classes=5, class_token=False, global_pool="avg", fc_norm=False).eval()
  _load_weights(ref, str(file))
  model, variables, report = from_pretrained(f"npz:test@{file}")
  x = _images(2, 32, 32)
  _assert_parity(_ftjax_logits(model, variables, x), _torch_logits(ref, x))
  assert report.arch == arch and report.image_size == (32, 32) and len(report.matched) == len(arrays)


_BIG_VISION_NAMES = (("Transformer/posembed_input/pos_embedding", "pos_embedding"),
                     ("LayerNorm_2", "LayerNorm_1"), ("MlpBlock_3", "MlpBlock_0"),
                     ("MultiHeadDotProductAttention_1", "MultiHeadDotProductAttention_0"))


def _big_vision_arrays(arch, seed, *, scanned=False, prefix="params/"):
  """Random parameters of ``arch`` (test variant, 32 px) under big_vision's names, optionally
  scanned (one ``Transformer/encoderblock/...`` leaf per name, layers stacked first)."""
  _, shapes = create("vit", arch, num_classes=5, image_size=32)
  rng = np.random.default_rng(seed)
  arrays, blocks = {}, {}
  for path, s in shapes.items():
    name = path.removeprefix("params/")
    if name.startswith("Transformer/encoderblock_"):
      for rx, repl in _BIG_VISION_NAMES:
        name = name.replace(rx, repl)
    elif name.startswith("Transformer/posembed_input"):
      name = "pos_embedding"
    value = (rng.standard_normal(s.shape) * 0.2 + path.endswith("/scale")).astype(np.float32)
    m = re.fullmatch(r"Transformer/encoderblock_(\d+)/(.*)", name)
    if scanned and m:
      blocks.setdefault(m.group(2), {})[int(m.group(1))] = value
    else:
      arrays[prefix + name] = value
  for rest, layers in blocks.items():
    arrays[f"{prefix}Transformer/encoderblock/{rest}"] = np.stack([layers[i] for i in sorted(layers)])
  return arrays


def _timm_test_vit(**kwargs) -> TimmViT:
  return TimmViT(**{"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2,
                    "mlp_ratio": 2.0, "num_classes": 5, **kwargs}).eval()


def test_big_vision_map_head_scanned_two_tower_npz_parity_with_timm_reader(tmp_path):
  """A SigLIP-style image tower: big_vision's MAPHead, scanned blocks, under ``params/img/``
  beside a text tower; timm's ``_load_weights`` reads the same file (global_pool 'map')."""
  arrays = _big_vision_arrays({"variant": "test", "pooling": "map"}, seed=2, scanned=True,
                              prefix="params/img/")
  assert arrays["params/img/Transformer/encoderblock/LayerNorm_0/scale"].shape == (2, 32)
  assert "params/img/MAPHead_0/MultiHeadDotProductAttention_0/key/kernel" in arrays
  text = {"params/txt/Encoder_0/encoder_norm/scale": np.ones(32, np.float32),
          "params/t": np.ones(1, np.float32), "params/b": np.zeros(1, np.float32)}
  file = tmp_path / "siglip_like.npz"
  np.savez(file, **arrays, **text)
  ref = _timm_test_vit(class_token=False, global_pool="map")
  _load_weights(ref, str(file))
  model, variables, report = from_pretrained(f"npz:test@{file}")
  x = _images(2, 32, 32)
  _assert_parity(_ftjax_logits(model, variables, x), _torch_logits(ref, x))
  assert report.arch == {"variant": "test", "pooling": "map"} and report.image_size == (32, 32)
  assert sorted(k for k, _ in report.dropped) == sorted(text)
  assert "MAPHead_0" in variables["params"] and "cls" not in variables["params"]


def test_npz_of_a_size_the_variant_table_lacks_reads_its_size_from_the_file(tmp_path):
  """vit_jax's ``S_32``/``B_8`` augreg files and big_vision's other sizes: the width, depth,
  heads, MLP and patch come from the file's shapes (the name's patch must agree)."""
  _, shapes = create("vit", {"variant": "test"}, num_classes=5, image_size=32)
  rng = np.random.default_rng(5)
  arrays = {path.removeprefix("params/"): (rng.standard_normal(s.shape) * 0.2
                                           + path.endswith("/scale")).astype(np.float32)
            for path, s in shapes.items()}
  file = tmp_path / "Ti_8.npz"
  np.savez(file, **arrays)
  ref = _timm_test_vit()
  _load_weights(ref, str(file))
  model, variables, report = from_pretrained(f"npz:ViT-Ti_8@{file}")  # the table has Ti/16 only
  x = _images(2, 32, 32)
  _assert_parity(_ftjax_logits(model, variables, x), _torch_logits(ref, x))
  assert report.arch == {"hidden_size": 32, "num_layers": 2, "num_heads": 2, "mlp_dim": 64, "patch_size": 8}
  with pytest.raises(CheckpointError, match=r"the file's patch size is not the variant's \(npz:Ti/4\): "
                                            r"embedding/kernel 8 x 8 vs Ti/4; name it Ti/8"):
    from_pretrained(f"npz:Ti/4@{file}")
  with pytest.raises(ConfigError, match=r"unknown ViT variant \(npz:tiny\): 'tiny'; <size>/<patch>"):
    from_pretrained(f"npz:tiny@{file}")
  # A scanned big_vision image tower with a MAP head (SigLIP's layout), size read the same way.
  arrays = _big_vision_arrays({"variant": "test", "pooling": "map"}, seed=6, scanned=True, prefix="params/img/")
  np.savez(tmp_path / "g8.npz", **arrays)
  ref = _timm_test_vit(class_token=False, global_pool="map")
  _load_weights(ref, str(tmp_path / "g8.npz"))
  model, variables, report = from_pretrained(f"npz:g/8@{tmp_path / 'g8.npz'}")
  _assert_parity(_ftjax_logits(model, variables, x), _torch_logits(ref, x))
  assert report.arch["num_layers"] == 2 and report.arch["pooling"] == "map"
  assert [vit.canonical_variant(n) for n in ("ViT-S_32", "B_8", "So400m/14", "so400m_14")] == [
      "S/32", "B/8", "So400m/14", "So400m/14"]


def test_big_vision_token_pooled_npz_has_no_class_token_row_in_its_position_embedding(tmp_path):
  """big_vision adds the position embedding before it prepends the class token (timm's
  no_embed_class): the table has h*w rows, and resampling it keeps no class row apart."""
  arch = {"variant": "test", "posemb_class_token": False}
  arrays = _big_vision_arrays(arch, seed=3)
  assert arrays["params/pos_embedding"].shape == (1, 16, 32) and "params/cls" in arrays
  file = tmp_path / "bv_tok.npz"
  np.savez(file, **arrays)
  ref = _timm_test_vit(no_embed_class=True)
  _load_weights(ref, str(file))
  model, variables, report = from_pretrained(f"npz:test@{file}")
  x = _images(2, 32, 32)
  _assert_parity(_ftjax_logits(model, variables, x), _torch_logits(ref, x))
  assert report.arch == arch and report.image_size == (32, 32)
  model, variables, report = from_pretrained(f"npz:test@{file}", image_size=48)
  assert report.resized == [(vit.POSEMB_PATH, (1, 16, 32), (1, 36, 32))]
  # All 16 rows resampled as a grid, as timm's resample_abs_pos_embed does with no prefix
  # tokens (its .npz reader resamples bilinearly instead; its safetensors path, bicubic).
  table = resample_abs_pos_embed(torch.from_numpy(arrays["params/pos_embedding"]), new_size=[6, 6],
                                 num_prefix_tokens=0)
  np.testing.assert_allclose(flatten(variables)[vit.POSEMB_PATH], table.numpy(), rtol=0, atol=1e-5)
  ref_48 = _timm_test_vit(no_embed_class=True, img_size=48)
  _load_weights(ref_48, str(file))
  with torch.no_grad():
    ref_48.pos_embed.copy_(table)
  x = _images(2, 48, 48)
  _assert_parity(_ftjax_logits(model, variables, x), _torch_logits(ref_48, x))


def _big_vision_sincos(h: int, w: int, width: int) -> torch.Tensor:
  """big_vision's ``posemb_sincos_2d``, transcribed in torch (float32, as big_vision computes it)."""
  y, x = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32),
                        indexing="ij")
  omega = 1.0 / 10_000.0 ** (torch.arange(width // 4, dtype=torch.float32) / (width // 4 - 1))
  y, x = y.flatten()[:, None] * omega[None], x.flatten()[:, None] * omega[None]
  return torch.cat([x.sin(), x.cos(), y.sin(), y.cos()], dim=1)[None]


@pytest.mark.parametrize("size", [32, 48])
def test_big_vision_sincos2d_npz_parity_at_any_image_size(tmp_path, size):
  """big_vision's "plain ViT" (posemb 'sincos2d', pool_type 'gap'): no position embedding in
  the file.  timm, which has no fixed table, gets the transcribed one as its pos_embed."""
  arrays = _big_vision_arrays({"variant": "test", "pooling": "gap"}, seed=4)
  del arrays["params/pos_embedding"]
  file = tmp_path / "bv_plain.npz"
  np.savez(file, **arrays)
  ref = _timm_test_vit(class_token=False, global_pool="avg", fc_norm=False, img_size=size)
  table = _big_vision_sincos(size // 8, size // 8, 32)
  np.savez(tmp_path / "with_table.npz", **arrays, **{"params/pos_embedding": table.numpy()})
  _load_weights(ref, str(tmp_path / "with_table.npz"))
  model, variables, report = from_pretrained(f"npz:test@{file}", image_size=size)
  x = _images(2, size, size)
  _assert_parity(_ftjax_logits(model, variables, x), _torch_logits(ref, x))
  assert report.arch == {"variant": "test", "pooling": "gap", "posemb": "sincos2d"}
  assert "posembed_input" not in variables["params"]["Transformer"] and not report.resized
  np.testing.assert_allclose(vit.posemb_sincos_2d(size // 8, size // 8, 32), table.numpy(), rtol=0, atol=2e-6)


def test_google_npz_pre_logits_and_big_vision_names():
  _, shapes = create("vit", {"variant": "test", "representation_size": 32}, num_classes=4, image_size=32)
  arrays = {p.removeprefix("params/"): np.zeros(s.shape, np.float32) for p, s in shapes.items()}
  conv = vit.convert_npz("test", arrays)
  assert conv.arch == {"variant": "test", "representation_size": 32}
  renamed = {re.sub(r"MlpBlock_3", "MlpBlock_0", re.sub("LayerNorm_2", "LayerNorm_1", k)): v
             for k, v in arrays.items()}
  renamed["pos_embedding"] = renamed.pop("Transformer/posembed_input/pos_embedding")
  big = vit.convert_npz("test", {f"params/{k}": v for k, v in renamed.items()})
  assert sorted(big.variables) == sorted(conv.variables) == sorted(shapes)


def test_a_new_head_drops_the_pre_logits_layer_as_vit_jax_fine_tunes(tmp_path):
  """An ImageNet-21k .npz has a tanh pre-logits layer: vit_jax's fine-tuning configs
  (representation_size None) drop it with the head, and so does ftjax unless told otherwise."""
  _, shapes = create("vit", {"variant": "test", "representation_size": 32}, num_classes=4, image_size=32)
  file = tmp_path / "i21k.npz"
  np.savez(file, **{p.removeprefix("params/"): np.ones(s.shape, np.float32) for p, s in shapes.items()})
  _, variables, report = from_pretrained(f"npz:test@{file}")  # the same head: all of it kept
  assert "pre_logits" in variables["params"] and report.arch["representation_size"] == 32
  _, variables, report = from_pretrained(f"npz:test@{file}", num_classes=10)
  assert "pre_logits" not in variables["params"] and "representation_size" not in report.arch
  assert [k for k, _ in report.dropped] == ["params/pre_logits/bias", "params/pre_logits/kernel"]
  assert "dropped from checkpoint (2 tensors)" in str(report)
  _, variables, report = from_pretrained(f"npz:test@{file}", num_classes=10, representation_size=32)
  np.testing.assert_array_equal(variables["params"]["pre_logits"]["kernel"], np.ones((32, 32)))
  assert not report.dropped


# ---------------------------------------------------------------------- resolution change

def test_resample_matches_torch_antialiased_bicubic():
  rng = np.random.default_rng(0)
  for old, new in [((14, 14), (24, 24)), ((14, 14), (8, 20)), ((7, 9), (12, 5)), ((24, 24), (14, 14))]:
    grid = rng.standard_normal((*old, 6)).astype(np.float32)
    ref = F.interpolate(torch.from_numpy(grid).permute(2, 0, 1)[None], size=new, mode="bicubic",
                        antialias=True, align_corners=False)[0].permute(1, 2, 0).numpy()
    np.testing.assert_allclose(vit.resample_grid(grid, new), ref, rtol=0, atol=1e-5)
  pe = rng.standard_normal((1, 1 + 14 * 14, 6)).astype(np.float32)
  ref = resample_abs_pos_embed(torch.from_numpy(pe), new_size=[10, 16], num_prefix_tokens=1).numpy()
  ours = vit.resample_posemb(pe, (10, 16), num_prefix_tokens=1)
  np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-5)
  assert np.array_equal(ours[:, :1], pe[:, :1])  # the class token row is kept apart, unchanged


@pytest.mark.parametrize("size", [(384, 384), (128, 320)])
def test_resolution_change_matches_timm(timm_tiny, size):
  ref_224, path = timm_tiny
  ref = timm.create_model(TIMM_TINY, num_classes=1000, img_size=size).eval()
  ref.load_state_dict(checkpoint_filter_fn(ref_224.state_dict(), ref))  # timm's own resampling
  model, variables, report = from_pretrained(f"timm:{TIMM_TINY}@{path}", image_size=size)
  x = _images(1, *size)
  _assert_parity(_ftjax_logits(model, variables, x), _torch_logits(ref, x))
  grid = (size[0] // 16) * (size[1] // 16)
  assert report.resized == [(vit.POSEMB_PATH, (1, 197, 192), (1, 1 + grid, 192))]


# ------------------------------------------------------------------------ head replacement

def test_head_replacement_zero_head_everything_else_loaded(timm_tiny):
  _, path = timm_tiny
  _, variables, report = from_pretrained(f"timm:{TIMM_TINY}@{path}", num_classes=10)
  flat = flatten(variables)
  tensors = {k: v.numpy() for k, v in safetensors.torch.load_file(str(path)).items()}
  checkpoint = vit.convert_timm(TIMM_TINY, tensors)
  assert flat["params/head/kernel"].shape == (192, 10) and flat["params/head/bias"].shape == (10,)
  assert not flat["params/head/kernel"].any() and not flat["params/head/bias"].any()
  others = sorted(set(flat) - {"params/head/kernel", "params/head/bias"})
  assert others == sorted(set(checkpoint.variables) - {"params/head/kernel", "params/head/bias"})
  for p in others:
    np.testing.assert_array_equal(flat[p], checkpoint.variables[p], err_msg=p)
  assert [p for p, _ in report.reinitialized] == ["params/head/bias", "params/head/kernel"]
  assert "(checkpoint (1000,))" in str(report) and "re-initialised (2 tensors)" in str(report)
  assert report.num_classes == 10 and report.class_names is None
  headless = {k: v for k, v in tensors.items() if not k.startswith("head.")}  # e.g. timm's orig_in21k
  assert vit.convert_timm(TIMM_TINY, headless).num_classes == 0


# -------------------------------------------------------------------------- counts, names

# timm.create_model(<name>, num_classes=1000) on the meta device, timm 1.0.31, 224 px.
TIMM_PARAM_COUNTS = {
    "Ti/16": 5_717_416,  # vit_tiny_patch16_224
    "S/16": 22_050_664,  # vit_small_patch16_224
    "S/32": 22_878_952,  # vit_small_patch32_224
    "B/8": 86_576_872,  # vit_base_patch8_224
    "B/16": 86_567_656,  # vit_base_patch16_224
    "B/32": 88_224_232,  # vit_base_patch32_224
    "L/16": 304_326_632,  # vit_large_patch16_224
    "L/32": 306_535_400,  # vit_large_patch32_224
    "H/14": 632_045_800,  # vit_huge_patch14_224
    # timm VisionTransformer(img_size=224, patch_size=14, embed_dim=1152, depth=27, num_heads=16,
    # mlp_ratio=4304 / 1152, num_classes=1000): SigLIP's So400m tower with a class token
    "So400m/14": 413_597_656,
    # timm VisionTransformer(img_size=224, patch_size=8, embed_dim=32, depth=2, num_heads=2,
    # mlp_ratio=2.0, num_classes=1000)
    "test": 81_480,
}


@pytest.mark.parametrize("variant", list(TIMM_PARAM_COUNTS))
def test_parameter_count_equals_timm(variant):
  assert set(TIMM_PARAM_COUNTS) == set(vit.VARIANTS)
  _, shapes = create("vit", {"variant": variant}, num_classes=1000, image_size=224)
  assert sum(int(np.prod(s.shape)) for s in shapes.values()) == TIMM_PARAM_COUNTS[variant]


@pytest.mark.slow  # 20 s or more on 2 slow cores; CI runs it (-m slow)
def test_timm_names_give_timm_architectures():
  names = [n for n in timm.list_models("vit_*") if vit._TIMM_NAME.fullmatch(n) or vit._TIMM_DINOV2.fullmatch(n)]
  assert len(names) >= 20
  for name in names:
    with torch.device("meta"):
      ref = timm.create_model(name)
    arch, size = vit.timm_arch(name)
    a = vit.resolve_arch(arch)
    got = (a["hidden_size"], a["num_layers"], a["num_heads"], a["mlp_dim"], a["patch_size"], size,
           a["class_token"], a["pooling"], a["fc_norm"], a["gelu_approximate"])
    act = ref.blocks[0].mlp.act
    want = (ref.embed_dim, len(ref.blocks), ref.blocks[0].attn.num_heads, ref.blocks[0].mlp.fc1.out_features,
            ref.patch_embed.patch_size[0], tuple(ref.patch_embed.img_size), ref.cls_token is not None,
            {"token": "token", "avg": "gap", "map": "map"}[ref.global_pool],
            not isinstance(ref.fc_norm, torch.nn.Identity),
            type(act).__name__ == "GELUTanh" or getattr(act, "approximate", "none") == "tanh")
    assert got == want, name
    assert (ref.attn_pool is not None) == (a["pooling"] == "map"), name
    assert (a["reg_tokens"], a["posemb_class_token"]) == (ref.num_reg_tokens, not ref.no_embed_class
                                                          and ref.num_prefix_tokens > 0), name
    ls = ref.blocks[0].ls1
    assert a["layer_scale"] == (None if isinstance(ls, torch.nn.Identity) else ls.init_values), name
  assert any("_siglip_" in n for n in names) and any("so400m" in n for n in names)
  assert any("reg4_dinov2" in n for n in names)


def test_timm_tags_give_timm_preprocessing():
  from timm.models import get_pretrained_cfg
  tagged = [n for n in timm.list_models("vit_*", pretrained=True)
            if vit._TIMM_NAME.fullmatch(n.split(".")[0])]
  assert len(tagged) >= 40
  for name in tagged:
    cfg = get_pretrained_cfg(name)
    mean, std = vit.timm_preprocessing(name)
    np.testing.assert_allclose(mean, cfg.mean, atol=1e-6, err_msg=name)
    np.testing.assert_allclose(std, cfg.std, atol=1e-6, err_msg=name)


def test_resizer_for_a_non_square_checkpoint_grid():
  pe = np.random.default_rng(0).standard_normal((1, 1 + 4 * 6, 5)).astype(np.float32)
  [resize] = vit.resizers({"variant": "test"}, (40, 24), old_image_size=(32, 48)).values()
  want = vit.resample_posemb(pe, (5, 3), 1, old_hw=(4, 6))
  np.testing.assert_array_equal(resize(pe, (1, 16, 5)), want)
  ref = resample_abs_pos_embed(torch.from_numpy(pe), new_size=[5, 3], old_size=[4, 6],
                               num_prefix_tokens=1).numpy()
  np.testing.assert_allclose(want, ref, rtol=0, atol=1e-5)
  with pytest.raises(CheckpointError, match=r"position embedding does not fit the model .*: checkpoint "
                                            r"\(1, 25, 5\) vs model \(1, 16, 5\)"):
    vit.resizers({"variant": "test"}, (40, 24))[re.escape(vit.POSEMB_PATH)](pe, (1, 16, 5))


# ------------------------------------------------------------------ dtypes, train, errors

def _random_test_variables(arch, num_classes=5, seed=0):
  """Random float32 variables of a 32 px model (numpy: no init compile)."""
  _, shapes = create("vit", arch, num_classes=num_classes, image_size=32)
  rng = np.random.default_rng(seed)
  return unflatten({p: (rng.standard_normal(s.shape) * 0.2 + p.endswith("/scale")).astype(np.float32)
                    for p, s in shapes.items()})


def test_bf16_compute_close_to_fp32():
  model32 = vit.create_model({"variant": "test"}, 5)
  model16 = vit.create_model({"variant": "test"}, 5, dtype=jnp.bfloat16)
  variables = _random_test_variables({"variant": "test"})
  x = _images(4, 32, 32).transpose(0, 2, 3, 1)
  y32 = np.asarray(jax.jit(model32.apply)(variables, x))
  y16 = jax.jit(model16.apply)(variables, x)
  assert y16.dtype == jnp.float32  # logits are float32 whatever the compute dtype
  assert "bf16" in str(jax.make_jaxpr(model16.apply)(variables, x))
  assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(variables))
  err = np.abs(np.asarray(y16) - y32).max()
  assert 0 < err <= 0.05 * max(1.0, np.abs(y32).max())


def test_train_mode_dropout_and_droppath():
  arch = {"variant": "test", "dropout_rate": 0.1, "attention_dropout_rate": 0.1, "droppath_rate": 0.2}
  model = vit.create_model(arch, 5)
  plain = vit.create_model({"variant": "test"}, 5)
  variables = _random_test_variables(arch)
  x = _images(4, 32, 32).transpose(0, 2, 3, 1)

  def jitted(m, train):
    return jax.jit(lambda v, x, rngs: m.apply(v, x, train=train, rngs=rngs))

  evaluated = np.asarray(jitted(model, False)(variables, x, {}))
  np.testing.assert_array_equal(evaluated, jitted(plain, False)(variables, x, {}))
  np.testing.assert_array_equal(evaluated, jitted(plain, True)(variables, x, {}))  # rates 0: no change
  train = jitted(model, True)
  # unsafe_rbg keys only to keep XLA's CPU compile short (threefry's takes ~10 s here).
  a, b, c = (np.asarray(train(variables, x, {"dropout": jax.random.key(k, impl="unsafe_rbg")}))
             for k in (0, 0, 1))
  np.testing.assert_array_equal(a, b)
  assert np.abs(a - evaluated).max() > 1e-3 and np.abs(a - c).max() > 1e-3
  with pytest.raises(InvalidRngError, match="dropout"):
    train(variables, x, {})  # dropout without an rng


def test_create_test_variant_and_arch_errors():
  model, shapes = create("vit", {"variant": "test"}, num_classes=3, image_size=32)
  assert shapes["params/head/kernel"].shape == (32, 3)
  assert shapes["params/Transformer/posembed_input/pos_embedding"].shape == (1, 17, 32)
  with pytest.raises(ConfigError, match="unknown ViT variant.*'Z/16'"):
    create("vit", {"variant": "Z/16"}, num_classes=3, image_size=32)
  with pytest.raises(ConfigError, match="not divisible by the ViT patch size.*36x32"):
    create("vit", {"variant": "test"}, num_classes=3, image_size=(36, 32))
  with pytest.raises(ConfigError, match="unknown ViT arch option.*'droppath'"):
    create("vit", {"variant": "test", "droppath": 0.1}, num_classes=3, image_size=32)
  with pytest.raises(ConfigError, match="unsupported timm ViT"):
    vit.timm_arch("vit_medium_patch16_gap_256")


def test_checkpoint_errors_name_the_key(timm_tiny, tmp_path):
  _, path = timm_tiny
  with pytest.raises(CheckpointError, match=r"shape mismatch \(params/Transformer/encoder_norm/bias\): "
                                            r"checkpoint \(192,\) vs model \(384,\)"):
    from_pretrained(f"timm:vit_small_patch16_224@{path}")  # a Ti/16 file under an S/16 name
  other = tmp_path / "resnet.safetensors"
  safetensors.torch.save_file({"conv1.weight": torch.zeros(8, 3, 7, 7)}, str(other))
  with pytest.raises(CheckpointError, match="ViT checkpoint does not have.*conv1.weight"):
    from_pretrained(f"timm:{TIMM_TINY}@{other}")


def test_malformed_checkpoints_are_one_line_errors_naming_the_key():
  """A damaged file is a CheckpointError naming the key and its shape, not an IndexError or
  TypeError from inside the converter."""
  kernel = {"params/embedding/kernel": np.zeros((8, 8, 3, 32), np.float32)}
  for arrays, message in (
      ({**kernel, "params/Transformer/encoderblock/LayerNorm_0/scale": np.zeros((), np.float32)},
       r"scanned block without a layer axis \(npz:test\): params/Transformer/encoderblock/LayerNorm_0/scale "
       r"shape \(\)"),
      ({**kernel, "params/cls": np.zeros((1, 1, 32), np.float32), "params/pos_embedding": np.zeros(32, np.float32)},
       r"position embedding is not \(1, tokens, width\) \(npz:test\): params/pos_embedding shape \(32,\)"),
      ({**kernel, "params/pos_embedding": np.zeros((16, 32), np.float32)},
       r"position embedding is not .*params/pos_embedding shape \(16, 32\)")):
    with pytest.raises(CheckpointError, match=message):
      vit.convert_npz("test", arrays)
  for act in (["gelu"], {"name": "gelu"}):
    with pytest.raises(CheckpointError, match=r"unsupported ViT activation \(config.json\): "):
      vit.convert_hf({"hidden_act": act}, {})


def test_hf_heads_that_do_not_divide_the_width_name_the_key_and_both_shapes():
  """config.json claiming 5 heads for width 32: the query kernel cannot split into heads;
  the error names the key, the tensor's shape and the head count it was asked to fit."""
  config = {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 5,
            "intermediate_size": 48, "patch_size": 8}
  key = "vit.encoder.layer.0.attention.attention.query.weight"
  with pytest.raises(CheckpointError, match=(r"tensor does not fit the architecture \(Hugging Face ViT "
                                             rf"checkpoint: {re.escape(key)}\): \(32, 32\) \(32 features "
                                             r"do not split into 5 heads\)")):
    vit.convert_hf(config, {key: np.zeros((32, 32), np.float32)})


def test_malformed_hf_configs_are_one_line_errors_naming_the_field():
  """A config.json field of the wrong type (a list for hidden_act, null or a string for a
  number) is a CheckpointError naming the field, not a TypeError or ValueError from the converter."""
  dinov2 = {"model_type": "dinov2_with_registers", "hidden_size": 32, "num_hidden_layers": 2,
            "num_attention_heads": 2, "num_register_tokens": 4}
  siglip = {"model_type": "siglip", "vision_config": {"hidden_size": 32, "num_hidden_layers": 2,
                                                      "num_attention_heads": 2, "intermediate_size": 48}}
  plain = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 48,
           "patch_size": 8}
  from ftjax.models import resnet
  for convert, config, message in (
      (vit.convert_hf_dinov2, {**dinov2, "hidden_act": ["gelu"]}, r"unsupported DINOv2 config.*\['gelu'\]"),
      (vit.convert_hf_dinov2, {**dinov2, "hidden_size": None}, r"not an integer \(config.json\): hidden_size=None"),
      (vit.convert_hf_dinov2, {**dinov2, "mlp_ratio": "4"}, r"not a number \(config.json\): mlp_ratio='4'"),
      (vit.convert_hf_dinov2, {**dinov2, "layerscale_value": None}, r"not a number.*layerscale_value=None"),
      (vit.convert_hf_dinov2, {**dinov2, "num_register_tokens": "x"}, r"not an integer.*num_register_tokens='x'"),
      (vit.convert_hf_dinov2, {k: v for k, v in dinov2.items() if k != "num_hidden_layers"},
       r"config.json lacks a field \(config.json\): 'num_hidden_layers'"),
      (vit.convert_hf_siglip, {**siglip, "vision_config": {**siglip["vision_config"], "hidden_act": ["gelu"]}},
       r"unsupported SigLIP vision config.*\['gelu'\]"),
      (vit.convert_hf_siglip, {**siglip, "vision_config": {**siglip["vision_config"], "patch_size": 8.5}},
       r"not an integer \(config.json: vision_config\): patch_size=8.5"),
      (vit.convert_hf_siglip, {**siglip, "vision_config": {**siglip["vision_config"], "image_size": "32"}},
       r"image_size is not .*\(config.json: vision_config\): image_size='32'"),
      (vit.convert_hf, {**plain, "layer_norm_eps": None}, r"not a number \(config.json\): layer_norm_eps=None"),
      (vit.convert_hf, {**plain, "hidden_size": "32"}, r"not an integer \(config.json\): hidden_size='32'"),
      (vit.convert_hf, {k: v for k, v in plain.items() if k != "patch_size"},
       r"config.json lacks a field \(config.json\): 'patch_size'"),
      (resnet.convert_hf, {"hidden_sizes": None}, r"not a list of positive integers \(config.json\): hidden_sizes=None"),
      (resnet.convert_hf, {"depths": [1, "x"]}, r"not a list of positive integers \(config.json\): depths=\[1, 'x'\]"),
      (resnet.convert_hf, {"num_channels": None}, r"not an integer \(config.json\): num_channels=None")):
    with pytest.raises(CheckpointError, match=message):
      convert(config, {})


@pytest.mark.slow  # 20 s or more on 2 slow cores; CI runs it (-m slow)
def test_remat_blocks_give_the_same_logits_and_gradients():
  from ftjax import models
  plain, _ = models.create("vit", {"variant": "test"}, num_classes=3, image_size=32)
  remat, _ = models.create("vit", {"variant": "test", "remat": True}, num_classes=3, image_size=32)
  variables = models.init_variables(plain, 32)
  variables = jax.tree.map(lambda a: a + 0.05 * jax.random.normal(jax.random.key(2), a.shape), variables)
  x = jax.random.normal(jax.random.key(0), (4, 32, 32, 3))
  train = lambda model, p: model.apply({"params": p}, x, train=True, rngs={"dropout": jax.random.key(1)})

  def grads(model):
    return jax.grad(lambda p: (train(model, p) ** 2).sum())(variables["params"])

  np.testing.assert_allclose(plain.apply(variables, x), remat.apply(variables, x), atol=1e-6)
  for a, b in zip(jax.tree.leaves(grads(plain)), jax.tree.leaves(grads(remat))):
    np.testing.assert_allclose(a, b, atol=1e-5)
  assert any(np.abs(a).max() > 1e-3 for a in jax.tree.leaves(grads(plain)))  # not vacuous


@pytest.mark.slow  # 20 s or more on 2 slow cores; CI runs it (-m slow)
def test_remat_with_dropout_differentiates_the_function_it_computes():
  # Dropout masks under remat are drawn from other rng splits than without it, so the two
  # models differ in training mode; what must hold is that the recomputation in the backward
  # pass uses the forward's masks: the gradient matches a central difference of the loss.
  from ftjax import models
  arch = {"variant": "test", "remat": True, "dropout_rate": 0.1, "droppath_rate": 0.3}
  model, _ = models.create("vit", arch, num_classes=3, image_size=32)
  params = models.init_variables(model, 32)["params"]
  params = jax.tree.map(lambda a: a + 0.05 * jax.random.normal(jax.random.key(2), a.shape), params)
  x = jax.random.normal(jax.random.key(0), (4, 32, 32, 3))
  fn = lambda p: (model.apply({"params": p}, x, train=True, rngs={"dropout": jax.random.key(1)}) ** 2).sum()
  loss, g = jax.jit(fn), jax.jit(jax.grad(fn))(params)  # as the train step: jit(grad(...))
  keys = iter(jax.random.split(jax.random.key(3), len(jax.tree.leaves(params))))
  d = jax.tree.map(lambda a: jax.random.normal(next(keys), a.shape), params)
  eps = 3e-4  # small: the weights are about 0.05
  step = lambda sign: jax.tree.map(lambda p, v: p + sign * eps * v, params, d)
  numeric = (loss(step(1)) - loss(step(-1))) / (2 * eps)
  analytic = sum(jnp.vdot(a, b) for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(d)))
  assert abs(float(analytic)) > 1e-2
  np.testing.assert_allclose(float(numeric), float(analytic), rtol=1e-3)


@pytest.mark.parametrize("multiple", [1, 8, 64])
@pytest.mark.slow  # 20 s or more on 2 slow cores; CI runs it (-m slow)
def test_padded_attention_equals_unpadded(multiple):
  # The cuDNN path pads the token axis and masks the padding keys; on the CPU the same
  # padding runs through XLA and must not change a value (nor, through the mask, a gradient).
  from ftjax.models.vit import attend
  q, k, v = jax.random.normal(jax.random.key(0), (3, 2, 197, 4, 16))
  plain = jax.nn.dot_product_attention(q, k, v)
  np.testing.assert_allclose(attend(q, k, v, "xla", multiple), plain, atol=2e-6)
  g = lambda fn: jax.grad(lambda k: (fn(q, k, v) * v).sum())(k)
  np.testing.assert_allclose(g(lambda *a: attend(*a, "xla", multiple)),
                             g(jax.nn.dot_product_attention), atol=2e-5)


def _logits_and_grads(model, params, x, **kw):
  """``model``'s logits on ``x`` and ``{path: gradient}`` of their sum of squares."""
  fn = lambda p: model.apply({"params": p}, x, **kw)
  return fn(params), flatten(jax.grad(lambda p: (fn(p) ** 2).sum())(params))


@pytest.mark.parametrize("arch", [{}, {"pooling": "gap", "fc_norm": True}])
@pytest.mark.slow  # 20 s or more on 2 slow cores; CI runs it (-m slow)
def test_token_padding_once_or_per_layer_equals_unpadded(monkeypatch, arch):
  # On a GPU cuDNN attention gets the tokens padded, either once for the whole encoder (the
  # padding tokens run through every block, masked out as keys) or around each attention.
  # Here XLA's attention is padded the same way: logits and gradients must not move.
  from ftjax import models
  x = jax.random.normal(jax.random.key(0), (3, 48, 48, 3))  # 36 patches + class token = 37
  base = {"variant": "test", "attention": "xla", **arch}
  plain, _ = models.create("vit", base, num_classes=3, image_size=48)
  variables = models.init_variables(plain, 48)
  variables = jax.tree.map(lambda a: a + 0.05 * jax.random.normal(jax.random.key(2), a.shape), variables)
  want, want_g = _logits_and_grads(plain, variables["params"], x)
  monkeypatch.setattr(vit, "PADDED_IMPLEMENTATIONS", ("cudnn", "xla"))
  # (another pad multiple per case: the blocks' traces are cached by their attributes)
  for extra in ({"token_padding": "encoder"}, {"token_padding": "attention", "attention_pad_multiple": 16}):
    padded, _ = models.create("vit", {**base, **extra}, num_classes=3, image_size=48)
    got, got_g = _logits_and_grads(padded, variables["params"], x)
    np.testing.assert_allclose(got, want, atol=2e-6, err_msg=str(extra))
    assert got_g.keys() == want_g.keys()
    for path, b in want_g.items():
      np.testing.assert_allclose(got_g[path], b, atol=2e-5, err_msg=f"{extra}: {path}")
  assert max(np.abs(g).max() for g in want_g.values()) > 1e-3  # not vacuous
  # The padding really happened: 37 tokens went in, the blocks saw 40.
  seen = []
  monkeypatch.setattr(vit, "attend", lambda q, *a, **kw: seen.append(q.shape[1]) or
                      jax.nn.dot_product_attention(q, *a[:2]))
  models.create("vit", {**base, "attention_pad_multiple": 20}, num_classes=3,
                image_size=48)[0].apply(variables, x)
  assert seen == [40, 40]


@pytest.mark.parametrize("case", ["plain", "padded", "lora", "dropout"])
@pytest.mark.slow  # 20 s or more on 2 slow cores; CI runs it (-m slow)
def test_folded_attention_bias_is_the_same_function(monkeypatch, case):
  # fold_attention_bias leaves the key bias out (softmax ignores it) and applies the value
  # bias after the output projection: logits and gradients must equal the literal model's,
  # with the tokens padded for attention, through LoRA adapters on value and out, and with
  # attention dropout (which keeps the value bias in place).
  from ftjax import lora, models
  x = jax.random.normal(jax.random.key(0), (3, 48, 48, 3))  # 36 patches + class token
  base = {"variant": "test", "attention": "xla"}
  if case == "padded":
    monkeypatch.setattr(vit, "PADDED_IMPLEMENTATIONS", ("cudnn", "xla"))
    base["attention_pad_multiple"] = 24  # 37 tokens -> 48 (a multiple of its own: see above)
  if case == "dropout":
    base.update(attention_dropout_rate=0.3, attention_pad_multiple=40)
  literal, _ = models.create("vit", {**base, "fold_attention_bias": False}, num_classes=3, image_size=48)
  folded, _ = models.create("vit", base, num_classes=3, image_size=48)
  params = models.init_variables(literal, 48)["params"]
  params = jax.tree.map(lambda a: a + 0.2 * jax.random.normal(jax.random.key(2), a.shape), params)
  if case == "lora":
    spec = lora.LoraSpec(rank=2, targets=(r".*/(?:value|out)/kernel",))
    params = jax.tree.map(lambda a: a + 0.1, lora.add_lora(params, spec, jax.random.key(3)))  # b != 0
    literal, folded = lora.LoraModel(literal, spec), lora.LoraModel(folded, spec)
  kw = {"train": True, "rngs": {"dropout": jax.random.key(4)}} if case == "dropout" else {}
  want, want_g = _logits_and_grads(literal, params, x, **kw)
  got, got_g = _logits_and_grads(folded, params, x, **kw)
  assert np.abs(want).max() > 0.1  # not vacuous
  np.testing.assert_allclose(got, want, atol=1e-5 * np.abs(want).max())
  scale = max(np.abs(g).max() for g in want_g.values())
  assert got_g.keys() == want_g.keys()
  for path, b in want_g.items():
    a = got_g[path]
    np.testing.assert_allclose(a, b, atol=2e-5 * scale, err_msg=path)
    if re.search(r"/key/bias$", path):  # no path from the key bias to the loss any more
      assert not np.any(a), path
      assert np.abs(b).max() < 1e-5 * scale, path  # in the literal model, rounding only
  # The folded model computes a different expression: the value bias is added elsewhere.
  value_bias = "Transformer/encoderblock_0/MultiHeadDotProductAttention_1/value/bias"
  bumped = unflatten({k: v + (k == value_bias) for k, v in flatten(params).items()})
  moved = folded.apply({"params": bumped}, x, **kw)
  assert np.abs(moved - got).max() > 1e-3


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_layer_norm_equals_flax_values_and_gradients(dtype):
  # ViT's LayerNorm: flax's values (two-pass variance), its own backward pass (the forward's
  # row statistics reused); on a residual stream with large offsets, as trained ViTs have.
  import flax.linen as nn
  k = jax.random.split(jax.random.key(0), 4)
  x = (jax.random.normal(k[0], (4, 5, 64)) * 2 + 50 * jax.random.normal(k[1], (64,))).astype(dtype)
  scale = 1 + 0.3 * jax.random.normal(k[2], (64,))
  bias = 0.3 * jax.random.normal(k[3], (64,))
  ref = nn.LayerNorm(epsilon=1e-6, dtype=dtype, use_fast_variance=False)
  ref_fn = lambda x, s, b: ref.apply({"params": {"scale": s, "bias": b}}, x)
  ours = lambda x, s, b: vit.LayerNorm(1e-6, dtype).apply({"params": {"scale": s, "bias": b}}, x)
  y = ours(x, scale, bias)
  assert y.dtype == dtype
  np.testing.assert_array_equal(np.asarray(y, np.float32), np.asarray(ref_fn(x, scale, bias), np.float32))
  w = jax.random.normal(jax.random.key(5), y.shape)
  loss = lambda fn: lambda *a: jnp.sum(fn(*a).astype(jnp.float32) * w)
  got = jax.grad(loss(ours), argnums=(0, 1, 2))(x, scale, bias)
  want = jax.grad(loss(ref_fn), argnums=(0, 1, 2))(x, scale, bias)
  tol = 1e-5 if dtype == jnp.float32 else 1e-2  # bf16: the input gradient is rounded to bf16
  for name, a, b in zip(("x", "scale", "bias"), got, want):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    assert a.shape == b.shape and np.abs(b).max() > 1e-2, name
    np.testing.assert_allclose(a, b, atol=tol * np.abs(b).max(), rtol=0, err_msg=name)
  # eps enters the statistics: a different eps gives another function
  other = vit.LayerNorm(1e2, dtype).apply({"params": {"scale": scale, "bias": bias}}, x)
  assert np.abs(np.asarray(other, np.float32) - np.asarray(y, np.float32)).max() > 1e-3


@pytest.mark.slow  # 20 s or more on 2 slow cores; CI runs it (-m slow)
def test_model_with_flax_layer_norm_is_the_same_function():
  from ftjax import models
  x = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
  ours, _ = models.create("vit", {"variant": "test", "pooling": "gap", "fc_norm": True}, num_classes=3,
                          image_size=32)
  flax_ln, _ = models.create("vit", {"variant": "test", "pooling": "gap", "fc_norm": True,
                                     "layer_norm_impl": "flax"}, num_classes=3, image_size=32)
  params = models.init_variables(ours, 32)["params"]
  params = jax.tree.map(lambda a: a + 0.1 * jax.random.normal(jax.random.key(2), a.shape), params)
  got_logits, got = _logits_and_grads(ours, params, x)
  want_logits, want = _logits_and_grads(flax_ln, params, x)
  np.testing.assert_array_equal(got_logits, want_logits)
  scale = max(np.abs(v).max() for v in want.values())
  assert scale > 1e-3 and any("LayerNorm" in k and np.abs(v).max() > 1e-4 for k, v in want.items())
  for k, v in want.items():
    np.testing.assert_allclose(got[k], v, atol=1e-5 * scale, err_msg=k)


def test_patch_embedding_as_a_matrix_product_is_the_convolution():
  """patch_embed_impl "ftjax" (patches, then a 1 x 1 convolution) and "flax" (nn.Conv, stride =
  kernel = patch): one parameter tree, the same initial values, logits and gradients."""
  from ftjax import models
  x = jax.random.normal(jax.random.key(0), (2, 40, 24, 3))  # 5 x 3 patches: not square
  ours, _ = models.create("vit", {"variant": "test"}, num_classes=3, image_size=(40, 24))
  conv, _ = models.create("vit", {"variant": "test", "patch_embed_impl": "flax"}, num_classes=3,
                          image_size=(40, 24))
  params = models.init_variables(ours, (40, 24))["params"]
  same = jax.tree.map(lambda a, b: bool(np.array_equal(a, b)), params,
                      models.init_variables(conv, (40, 24))["params"])
  assert all(jax.tree.leaves(same)) and params["embedding"]["kernel"].shape == (8, 8, 3, 32)
  params = jax.tree.map(lambda a: a + 0.1 * jax.random.normal(jax.random.key(2), a.shape), params)
  got_logits, got = _logits_and_grads(ours, params, x)
  want_logits, want = _logits_and_grads(conv, params, x)
  np.testing.assert_allclose(got_logits, want_logits, atol=1e-5 * np.abs(want_logits).max())
  assert np.abs(want["embedding/kernel"]).max() > 1e-3
  scale = max(np.abs(v).max() for v in want.values())
  for k, v in want.items():
    np.testing.assert_allclose(got[k], v, atol=1e-5 * scale, err_msg=k)
  with pytest.raises(ConfigError, match="unknown ViT patch_embed_impl"):
    models.create("vit", {"variant": "test", "patch_embed_impl": "im2col"}, num_classes=3, image_size=32)


def test_attention_and_gelu_options():
  from ftjax import models
  from ftjax.models.vit import attention_implementation
  x = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
  plain, _ = models.create("vit", {"variant": "test"}, num_classes=3, image_size=32)
  variables = models.init_variables(plain, 32)
  variables = jax.tree.map(lambda a: a + 0.05 * jax.random.normal(jax.random.key(2), a.shape), variables)
  auto, _ = models.create("vit", {"variant": "test", "attention": "auto"}, num_classes=3, image_size=32)
  np.testing.assert_array_equal(plain.apply(variables, x), auto.apply(variables, x))  # CPU: xla
  assert attention_implementation("auto", jnp.bfloat16, dropout=False) == (
      "cudnn" if jax.default_backend() == "gpu" else "xla")
  assert attention_implementation("auto", jnp.bfloat16, dropout=True) == "xla"
  tanh, _ = models.create("vit", {"variant": "test", "gelu_approximate": True}, num_classes=3,
                          image_size=32)
  diff = np.abs(plain.apply(variables, x) - tanh.apply(variables, x)).max()
  assert 0 < diff < 1e-2  # a different function, close to the erf one
  for bad, match in (({"attention": "flash"}, "unknown ViT attention implementation"),
                     ({"attention_pad_multiple": 0}, "attention_pad_multiple must be a positive"),
                     ({"token_padding": "never"}, "unknown ViT token_padding"),
                     ({"layer_norm_impl": "apex"}, "unknown ViT layer_norm_impl"),
                     ({"attention": "cudnn", "attention_dropout_rate": 0.1},
                      "cuDNN attention has no attention dropout")):
    with pytest.raises(ConfigError, match=match):
      models.create("vit", {"variant": "test", **bad}, num_classes=3, image_size=32)


def test_auto_attention_falls_back_to_xla_where_cudnn_refuses(monkeypatch):
  # "auto" on a GPU tries cuDNN; a refusal while tracing (here: no cuDNN on this machine)
  # must leave the XLA path's values, not an error.
  from ftjax import models
  x = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
  xla, _ = models.create("vit", {"variant": "test", "attention": "xla"}, num_classes=3,
                         image_size=32, dtype=jnp.bfloat16)
  variables = models.init_variables(xla, 32)
  variables = jax.tree.map(lambda a: a + 0.05 * jax.random.normal(jax.random.key(2), a.shape), variables)
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  auto, _ = models.create("vit", {"variant": "test"}, num_classes=3, image_size=32, dtype=jnp.bfloat16)
  np.testing.assert_array_equal(auto.apply(variables, x), xla.apply(variables, x))
  with pytest.raises(RuntimeError, match="cuDNN"):  # asked for by name: no fallback
    models.create("vit", {"variant": "test", "attention": "cudnn"}, num_classes=3, image_size=32,
                  dtype=jnp.bfloat16)
