"""Export round trips: ftjax params -> transformers / timm files -> PyTorch logits equal ftjax's."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from ftjax import export, models
from ftjax.data.transforms import Preprocess, normalize
from ftjax.errors import ConfigError
from ftjax.tree import flatten, unflatten

VIT_ARCH = {"variant": "test"}
# Small, but with what timm's ResNet needs: four stages and the 64-wide stem.
RESNET_BASIC = {"block": "basic", "depths": (1, 2, 1, 1), "widths": (8, 16, 16, 32), "stem_width": 64}
RESNET_BOTTLENECK = {"block": "bottleneck", "depths": (2, 1, 1, 1), "widths": (16, 32, 32, 64),
                     "stem_width": 64}
CLASSES = ["cat", "dog", "emu"]


def _perturbed(family, arch, image_size, seed):
  """Random variables where every tensor is non-trivial (a head, cls token and BN stats that
  are not zeros or ones), so a wrong transpose or a swapped name changes the logits."""
  model, _ = models.create(family, arch, num_classes=len(CLASSES), image_size=image_size)
  flat = flatten(models.init_variables(model, image_size, seed=seed))
  rng = np.random.default_rng(seed)
  out = {}
  for path, v in flat.items():
    v = np.asarray(v)
    if path.endswith("/var"):
      out[path] = rng.uniform(0.5, 2.0, v.shape).astype(v.dtype)
    else:
      out[path] = (v + rng.normal(0, 0.1, v.shape)).astype(v.dtype)
  return model, unflatten(out)


def _meta(family, arch, image_size):
  return {"family": family, "arch": arch, "num_classes": len(CLASSES), "image_size": [image_size] * 2,
          "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5], "class_names": CLASSES}


def _images(size, seed=0):
  return np.random.default_rng(seed).normal(size=(2, size, size, 3)).astype(np.float32)


def _torch_logits(module, x_nhwc):
  module.eval()
  with torch.no_grad():
    out = module(torch.from_numpy(x_nhwc.transpose(0, 3, 1, 2).copy()))
  return (out.logits if hasattr(out, "logits") else out).numpy()


def _timm_model(directory):
  import timm
  cfg = json.loads((directory / "config.json").read_text())
  model = timm.create_model(cfg["architecture"], pretrained=False, **cfg["model_args"])
  # strict: every key of the export is a key of the model and none is missing
  model.load_state_dict(load_file(str(directory / "model.safetensors")), strict=True)
  return model, cfg


def _check_hf(directory, cls):
  model, info = cls.from_pretrained(str(directory), output_loading_info=True)
  assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
  assert [model.config.id2label[i] for i in range(len(CLASSES))] == CLASSES
  return model


@pytest.mark.parametrize("fmt,arch", [
    ("hf", VIT_ARCH), ("timm", VIT_ARCH),
    ("timm", {"variant": "test", "pooling": "gap", "fc_norm": True}),
    ("hf", {"variant": "test", "gelu_approximate": True}),
    ("timm", {"variant": "test", "pooling": "map", "gelu_approximate": True}),  # a SigLIP tower
    ("timm", {"variant": "test", "pooling": "map", "class_token": True, "posemb_class_token": False}),
    ("timm", {"variant": "test", "reg_tokens": 2, "posemb_class_token": False, "layer_scale": 0.1}),
    ("timm", {"variant": "test", "reg_tokens": 2, "pooling": "gap", "fc_norm": True}),
    # transformers' ViT with a zero class row, DINOv2 with and without registers or LayerScale
    # (ones), SigLIP's classifier (every token's mean, no class token)
    ("hf", {"variant": "test", "posemb_class_token": False}),
    ("hf", {"variant": "test", "pooling": "token_gap", "layer_scale": 0.1}),
    ("hf", {"variant": "test", "pooling": "token_gap"}),
    ("hf", {"variant": "test", "pooling": "token_gap", "layer_scale": 1.0, "reg_tokens": 3,
            "posemb_class_token": False}),
    ("hf", {"variant": "test", "pooling": "token_gap", "reg_tokens": 2}),
    ("hf", {"variant": "test", "pooling": "gap", "class_token": False, "gelu_approximate": True})],
    ids=["hf", "timm", "timm-gap-fc_norm", "hf-tanh", "timm-map-tanh", "timm-map-no_embed_class",
         "timm-dinov2-reg", "timm-reg-gap", "hf-no_embed_class", "hf-dinov2", "hf-dinov2-no_layer_scale",
         "hf-dinov2-reg-no_embed_class", "hf-dinov2-reg", "hf-siglip"])
@pytest.mark.slow  # 20 s or more on 2 slow cores; CI runs it (-m slow)
def test_vit_round_trip(tmp_path, fmt, arch):
  from transformers import AutoModelForImageClassification
  model, variables = _perturbed("vit", arch, 32, seed=1)
  x = _images(32)
  ours = np.asarray(model.apply(variables, jnp.asarray(x)))
  out = export.export(variables, _meta("vit", arch, 32), tmp_path / fmt, fmt)
  if fmt == "hf":
    torch_model = _check_hf(out, AutoModelForImageClassification)
    pooling = arch.get("pooling", "token")
    assert type(torch_model).__name__ == {
        "token": "ViTForImageClassification", "gap": "SiglipForImageClassification",
        "token_gap": "Dinov2WithRegistersForImageClassification" if arch.get("reg_tokens")
        else "Dinov2ForImageClassification"}[pooling]
    theirs = _torch_logits(torch_model, x)
    back, read, _ = models.from_pretrained(f"hf:{out}")  # and ftjax reads its export back
    assert np.abs(np.asarray(back.apply(read, jnp.asarray(x))) - ours).max() < 1e-5
  else:
    theirs = _torch_logits(_timm_model(out)[0], x)
  assert np.abs(theirs - ours).max() < 1e-4
  assert np.abs(ours).max() > 0.1  # logits carry signal, not a zero head


@pytest.mark.parametrize("arch", [RESNET_BASIC, RESNET_BOTTLENECK], ids=["basic", "bottleneck"])
@pytest.mark.parametrize("fmt", ["hf", "timm"])
@pytest.mark.slow  # 20 s or more on 2 slow cores; CI runs it (-m slow)
def test_resnet_round_trip_with_batch_stats(tmp_path, fmt, arch):
  from transformers import ResNetForImageClassification
  model, variables = _perturbed("resnet", arch, 64, seed=2)
  x = _images(64, seed=3)
  ours = np.asarray(model.apply(variables, jnp.asarray(x), train=False))
  out = export.export(variables, _meta("resnet", arch, 64), tmp_path / fmt, fmt)
  tensors = load_file(str(out / "model.safetensors"))
  stem = "resnet.embedder.embedder.normalization" if fmt == "hf" else "bn1"
  stem_mean = tensors[f"{stem}.running_mean"]
  np.testing.assert_array_equal(stem_mean.numpy(), variables["batch_stats"]["stem"]["bn"]["mean"])
  if fmt == "hf":
    theirs = _torch_logits(_check_hf(out, ResNetForImageClassification), x)
  else:
    theirs = _torch_logits(_timm_model(out)[0], x)
  assert np.abs(theirs - ours).max() < 1e-4
  assert np.abs(ours).max() > 0.1


def _smooth_image(width, height):
  """Slow colour waves: moving the sampling grid by a fraction of a pixel changes a pixel by
  about a grey level, so what the comparison sees is the geometry (which region, what scale)."""
  y, x = np.mgrid[0:height, 0:width] / max(width, height)
  rgb = [127.5 + 100 * np.sin(2 * np.pi * (1.5 * x + 0.5 * y)), 255 * x,
         127.5 + 100 * np.cos(4 * np.pi * y)]
  return Image.fromarray(np.stack(rgb, -1).round().astype(np.uint8))


def _processed(directory, image):
  """pixel_values of transformers' AutoImageProcessor for the export, HWC."""
  from transformers import AutoImageProcessor
  processor = AutoImageProcessor.from_pretrained(str(directory))
  return processor(image, return_tensors="np")["pixel_values"][0].transpose(1, 2, 0)


def _eval_transform(image, size, **kw):
  """ftjax's eval input for ``image`` with _meta's mean and std (0.5)."""
  return normalize(Preprocess(image_size=size, **kw).apply(image)[None], (0.5,) * 3, (0.5,) * 3)[0]


@pytest.mark.parametrize("family,arch", [("vit", VIT_ARCH), ("resnet", RESNET_BASIC)], ids=["vit", "resnet"])
def test_hf_image_processor_repeats_the_eval_transform(tmp_path, family, arch):
  # The processor used to squash the whole image (ViT) or refuse to run (ResNet: ConvNext's
  # processor wants a shortest_edge); ftjax resizes the shorter side and crops the centre 0.875.
  _, variables = _perturbed(family, arch, 224, seed=10)
  out = export.export(variables, _meta(family, arch, 224), tmp_path, "hf")
  image = _smooth_image(640, 427)  # a photo's shape, downscaled: antialiasing matters
  theirs, ours = _processed(out, image), _eval_transform(image, 224)
  levels = np.abs(theirs - ours) * 0.5 * 255  # std 0.5: back to 0..255 grey levels
  # Measured: mean 0.35, max 2 levels. The shorter side is exact (427 -> 256, crop 16 px);
  # the longer side is resized to a whole 383 px and cropped at a whole 79 px where ftjax's
  # box starts 79.5 px in. (A detailed photo, where half a pixel matters more: mean 3.)
  # Squashing the whole image, as the export did: mean 34 levels.
  assert levels.mean() < 0.5 and levels.max() <= 3.001
  squashed = _eval_transform(image, 224, resize="squash", crop_fraction=1.0)
  assert np.abs(theirs - squashed).mean() * 127.5 > 20


def test_export_command_repeats_the_runs_resize_and_crop(tmp_path):
  """``python -m ftjax.export`` reads data.resize and data.crop_fraction from the run."""
  from ftjax import checkpoint
  _, variables = _perturbed("vit", VIT_ARCH, 32, seed=11)
  with checkpoint.Checkpointer(tmp_path / "run" / "checkpoints", async_save=False) as c:
    c.save(1, variables, extra={"model": _meta("vit", VIT_ARCH, 32)})
  (tmp_path / "run" / "config.json").write_text(json.dumps({"data": {"resize": "squash",
                                                                      "crop_fraction": 0.9}}))
  assert export.main([f"--workdir={tmp_path / 'run'}", f"--out={tmp_path / 'hf'}"]) == 0
  config = json.loads((tmp_path / "hf" / "preprocessor_config.json").read_text())
  # 32 / 0.9 = 35.6: 36, an even 4 px more than 32, so the crop starts on a whole pixel
  assert (config["size"], config["crop_size"]) == ({"height": 36, "width": 36}, {"height": 32, "width": 32})
  image = _smooth_image(90, 150)
  levels = np.abs(_processed(tmp_path / "hf", image) -
                  _eval_transform(image, 32, resize="squash", crop_fraction=0.9)) * 127.5
  # Measured: mean 1.4, max 6 levels: 32 / 36 = 0.889 of each side instead of 0.9, 1.2% more
  assert levels.mean() < 2
  # timm reads the same transform from its config.json (not its bicubic, 0.875 defaults)
  import timm
  from timm.data import resolve_data_config
  assert export.main([f"--workdir={tmp_path / 'run'}", f"--out={tmp_path / 'timm'}", "--format=timm"]) == 0
  data_config = resolve_data_config({}, model=timm.create_model(f"local-dir:{tmp_path / 'timm'}"))
  assert {k: data_config[k] for k in ("interpolation", "crop_pct", "crop_mode")} == {
      "interpolation": "bilinear", "crop_pct": 0.9, "crop_mode": "squash"}


def test_hf_export_reads_back_into_ftjax_bit_identical(tmp_path):
  _, variables = _perturbed("vit", VIT_ARCH, 32, seed=4)
  out = export.export(variables, _meta("vit", VIT_ARCH, 32), tmp_path, "hf")
  _, loaded, report = models.from_pretrained(f"hf:{out}")
  assert report.class_names == CLASSES and report.image_size == (32, 32)
  a, b = flatten(variables), flatten(loaded)
  assert sorted(a) == sorted(b)
  for k in a:
    np.testing.assert_array_equal(np.asarray(b[k]), np.asarray(a[k]), err_msg=k)


def test_timm_named_variant_and_resnetv2_configs():
  assert export._vit_timm_config({"variant": "B/16"}, (224, 224), 10)["architecture"] == \
      "vit_base_patch16_224"
  # A SigLIP image tower is named as timm registers it, so that convert_timm (the exporter's
  # inverse) reads its architecture back from the name; "vit_base_patch16_224" would read as a
  # class-token model without the attention pool.
  import timm
  from ftjax.models import vit
  for arch, size, name in (
      ({"variant": "B/16", "pooling": "map", "class_token": False}, 224, "vit_base_patch16_siglip_224"),
      ({"variant": "B/32", "pooling": "map", "class_token": False, "gelu_approximate": True}, 256,
       "vit_base_patch32_siglip_256"),
      ({"hidden_size": 1152, "num_layers": 27, "num_heads": 16, "mlp_dim": 4304, "patch_size": 14,
        "pooling": "gap", "class_token": False}, 378, "vit_so400m_patch14_siglip_gap_378"),
      ({"variant": "B/32", "pooling": "map", "class_token": False}, 256, "vit_base_patch16_224"),  # erf GELU
      ({"variant": "B/16", "pooling": "map", "class_token": False, "droppath_rate": 0.1}, 384,
       "vit_base_patch16_siglip_384"),  # a training option is no architecture
      # the registered resolution nearest to the model's: convert_timm reads the real one from
      # the position table
      ({"variant": "B/16", "pooling": "map", "class_token": False}, 288, "vit_base_patch16_siglip_256"),
      ({"variant": "Ti/16"}, 64, "vit_tiny_patch16_224"),
      ({"variant": "B/16", "pooling": "gap", "class_token": False, "num_heads": 16}, 64,
       "vit_base_patch16_gap_224"),
      # 12 heads: not timm's gap B/16 (16), but a SigLIP tower's architecture (erf GELU)
      ({"variant": "B/16", "pooling": "gap", "class_token": False}, 224, "vit_base_patch16_siglip_gap_224"),
      # DINOv2 likewise (LayerScale and registers are in its name, not in vit_base_patch16_224's)
      ({"hidden_size": 768, "num_layers": 12, "num_heads": 12, "mlp_dim": 3072, "patch_size": 14,
        "layer_scale": 1e-5, "reg_tokens": 4, "posemb_class_token": False}, 224, "vit_base_patch14_reg4_dinov2"),
      ({"hidden_size": 384, "num_layers": 12, "num_heads": 6, "mlp_dim": 1536, "patch_size": 14,
        "layer_scale": 1e-5}, 518, "vit_small_patch14_dinov2"),
      # Another LayerScale start (transformers' DINOv2 configs: 1.0) is no other architecture:
      # the name still reads back (model_args carry init_values).
      ({"hidden_size": 384, "num_layers": 12, "num_heads": 6, "mlp_dim": 1536, "patch_size": 14,
        "layer_scale": 1.0}, 518, "vit_small_patch14_dinov2")):
    cfg = export._vit_timm_config(arch, (size, size), 10)
    assert cfg["architecture"] == name, arch
    assert timm.is_model(name)
    if name != "vit_base_patch16_224":
      read, want = vit.resolve_arch(vit.timm_arch(name)[0]), vit.resolve_arch(arch)
      keys = [k for k in export._TIMM_ARCH_KEYS if k != "layer_scale"]
      assert {k: read[k] for k in keys} == {k: want[k] for k in keys}
      assert (read["layer_scale"] is None) == (want["layer_scale"] is None)
  assert all(timm.is_model(n) for n in export._TIMM_SIGLIP_NAMES)
  assert all(timm.is_model(f"vit_{s}_patch{p}_{r}") for s, p, r in export._TIMM_VIT_NAMES)
  assert all(timm.is_model(f"vit_{s}_patch{p}_gap_{r}") for s, p, r in export._TIMM_VIT_GAP_NAMES)
  assert export._resnet_timm_config({"variant": "resnet50"}, 10) == \
      {"architecture": "resnet50", "model_args": {"num_classes": 10}}
  assert export._resnetv2_timm_config({"variant": "R101x3"}, 10) == {
      "architecture": "resnetv2_101x3_bit", "model_args": {"num_classes": 10}}


@pytest.mark.parametrize("registers", [0, 4])
def test_hf_dinov2_exported_to_timm_reads_back_by_its_name(tmp_path, registers):
  """A DINOv2 from transformers (LayerScale started at 1.0, its configs' layerscale_value) exported
  to timm is named vit_small_patch14[_reg4]_dinov2, which from_pretrained("timm:<name>@...") reads
  back to the same function (under vit_base_patch16_224 it read as another model)."""
  from transformers import Dinov2Config, Dinov2Model, Dinov2WithRegistersConfig, Dinov2WithRegistersModel
  dims = dict(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, image_size=28, patch_size=14)
  torch.manual_seed(0)
  ref = (Dinov2WithRegistersModel(Dinov2WithRegistersConfig(**dims, num_register_tokens=registers)) if registers
         else Dinov2Model(Dinov2Config(**dims)))
  ref.save_pretrained(tmp_path / "hf")
  model, variables, report = models.from_pretrained(f"hf:{tmp_path / 'hf'}", num_classes=len(CLASSES))
  assert report.arch["layer_scale"] == 1.0
  rng = np.random.default_rng(0)
  variables = jax.tree.map(lambda v: np.asarray(v) + rng.normal(0, 0.05, np.shape(v)).astype(np.float32),
                           variables)
  meta = {**_meta("vit", report.arch, 28), "mean": list(report.mean), "std": list(report.std)}
  out = export.export(variables, meta, tmp_path / "timm", "timm")
  name = json.loads((out / "config.json").read_text())["architecture"]
  assert name == f"vit_small_patch14_{'reg4_' if registers else ''}dinov2"
  theirs = _torch_logits(_timm_model(out)[0], _images(28))
  back, read, _ = models.from_pretrained(f"timm:{name}@{out / 'model.safetensors'}")
  x = _images(28)
  ours = np.asarray(model.apply(variables, jnp.asarray(x)))
  assert np.abs(np.asarray(back.apply(read, jnp.asarray(x))) - ours).max() < 1e-4
  assert np.abs(theirs - ours).max() < 1e-4 and np.abs(ours).max() > 0.1


@pytest.mark.parametrize("size", [(32, 32), (32, 48)])
@pytest.mark.slow  # 13-15 s each, and the default run is near its 15 minutes; CI runs it (-m slow)
def test_a_vit_fine_tuned_at_another_size_exports_under_its_own_timm_name(tmp_path, size):
  """A Ti/16 at 32 px is named vit_tiny_patch16_224 (the nearest registered resolution), which
  from_pretrained reads back (the position table gives the size); under vit_base_patch16_224,
  as before, it was refused: encoder_norm (192,) vs (768,)."""
  model, variables = _perturbed("vit", {"variant": "Ti/16"}, size, seed=2)
  out = export.export(variables, {**_meta("vit", {"variant": "Ti/16"}, 32), "image_size": list(size)},
                      tmp_path / "timm", "timm")
  name = json.loads((out / "config.json").read_text())["architecture"]
  assert name == "vit_tiny_patch16_224"
  back, read, report = models.from_pretrained(f"timm:{name}@{out / 'model.safetensors'}", image_size=size)
  assert (report.image_size, report.resized) == (size, [])
  x = np.random.default_rng(0).normal(size=(2, *size, 3)).astype(np.float32)
  ours = np.asarray(model.apply(variables, jnp.asarray(x)))
  np.testing.assert_array_equal(np.asarray(back.apply(read, jnp.asarray(x))), ours)
  assert np.abs(_torch_logits(_timm_model(out)[0], x) - ours).max() < 1e-4


@pytest.mark.parametrize("name", ["efficientnet_lite0", "tf_efficientnet_lite0"])
def test_efficientnet_timm_export_is_the_checkpoint_it_was_read_from(tmp_path, name):
  """timm's state dict -> ftjax -> export: timm builds the same architecture from config.json
  and every tensor comes back bit-identical (the converter's logit parity is test_efficientnet's)."""
  import timm

  from ftjax.models import efficientnet
  torch.manual_seed(0)
  ref = timm.create_model(name, num_classes=3)
  with torch.no_grad():
    for k, v in ref.state_dict().items():
      if v.is_floating_point():
        v.copy_(torch.rand(v.shape) + 0.5 if k.endswith("running_var") else torch.randn(v.shape))
  tensors = {k: v.numpy() for k, v in ref.state_dict().items()}
  conv = efficientnet.convert_timm(name, tensors)
  meta = {**_meta("efficientnet", conv.arch, 224), "num_classes": 3}
  out = export.export(conv.variables, meta, tmp_path, "timm")
  exported, cfg = _timm_model(out)  # strict load
  assert cfg["architecture"] == name and cfg["label_names"] == CLASSES
  for k, v in exported.state_dict().items():
    np.testing.assert_array_equal(v.numpy(), tensors[k], err_msg=k)
  with pytest.raises(ConfigError, match="cannot export to timm.*padding=symmetric bn_eps=0.001"):
    export.to_timm("efficientnet", {**conv.arch, "padding": "symmetric", "bn_eps": 1e-3}, conv.variables)


@pytest.mark.slow  # ~20 s: timm's BiT models come only in their full depths (R50x1 here)
def test_resnetv2_timm_round_trip(tmp_path):
  arch = {"variant": "R50x1"}
  model, variables = _perturbed("resnetv2", arch, 32, seed=8)
  x = _images(32, seed=9)
  ours = np.asarray(model.apply(variables, jnp.asarray(x)))
  out = export.export(variables, _meta("resnetv2", arch, 32), tmp_path, "timm")
  # 50 float32 layers with every weight perturbed: logits up to ~5 agree to ~2e-5 relative
  # (measured 1.1e-4 absolute), so the bound scales with the logits here.
  assert np.abs(_torch_logits(_timm_model(out)[0], x) - ours).max() < 1e-4 * np.abs(ours).max()
  assert np.abs(ours).max() > 0.1


@pytest.mark.slow  # 20 s or more on 2 slow cores; CI runs it (-m slow)
def test_unsupported_exports_are_config_errors(tmp_path):
  _, variables = _perturbed("vit", VIT_ARCH, 32, seed=5)
  gap = _meta("vit", {"variant": "test", "pooling": "gap", "fc_norm": True}, 32)
  with pytest.raises(ConfigError, match="cannot export to hf"):
    export.export(variables, gap, tmp_path, "hf")
  for arch, fmt in (({"variant": "test", "layer_scale": 0.1}, "hf"),
                    ({"variant": "test", "reg_tokens": 1}, "hf"),
                    ({"variant": "test", "pooling": "map"}, "hf"),
                    ({"variant": "test", "pooling": "token_gap"}, "timm"),
                    ({"variant": "test", "posemb": "sincos2d", "pooling": "gap"}, "timm"),
                    ({"variant": "test", "posemb": "sincos2d", "pooling": "gap"}, "hf")):
    _, other = _perturbed("vit", arch, 32, seed=5)
    with pytest.raises(ConfigError, match=f"cannot export to {fmt}.*(posemb|layer_scale|reg_tokens|pooling)"):
      export.export(other, _meta("vit", arch, 32), tmp_path / "out", fmt)
  assert not (tmp_path / "out").exists()  # refused before anything is written
  # A Dinov2ForImageClassification fine-tune goes to hf, where timm's refusal sends it, and
  # only at a square size (transformers' DINOv2 and SigLIP tables are square grids).
  dinov2 = {"variant": "test", "pooling": "token_gap", "layer_scale": 1.0, "reg_tokens": 4,
            "posemb_class_token": False}
  _, other = _perturbed("vit", dinov2, 32, seed=5)
  with pytest.raises(ConfigError, match="cannot export to timm.*token_gap; export to hf"):
    export.export(other, _meta("vit", dinov2, 32), tmp_path / "out", "timm")
  for arch in (dinov2, {"variant": "test", "pooling": "gap", "class_token": False}):
    _, other = _perturbed("vit", arch, (32, 48), seed=5)
    with pytest.raises(ConfigError, match=r"cannot export to hf.*needs a square image: 32x48"):
      export.export(other, {**_meta("vit", arch, 32), "image_size": [32, 48]}, tmp_path / "out", "hf")
  assert not (tmp_path / "out").exists()
  with pytest.raises(ConfigError, match="unknown export format"):
    export.export(variables, _meta("vit", VIT_ARCH, 32), tmp_path, "onnx")
  (tmp_path / "a_file").write_text("")
  for out in (tmp_path / "a_file", tmp_path / "a_file" / "sub"):  # one line, exit 2, no traceback
    with pytest.raises(ConfigError, match=r"cannot write the export \(.*a_file.*\): (File exists|Not a dir)"):
      export.export(variables, _meta("vit", VIT_ARCH, 32), out, "timm")


@pytest.mark.slow  # 15 s or more on 2 slow cores (the default run neared 15 min); CI runs it (-m slow)
def test_lora_run_is_merged_on_read_and_exports_the_adapted_function(tmp_path):
  """A run checkpoint holding LoRA adapters: read_run merges them (with the stored spec) and the
  transformers model computes what the unmerged LoRA model computes."""
  from transformers import ViTForImageClassification

  from ftjax import checkpoint, lora
  from ftjax.errors import CheckpointError
  model, variables = _perturbed("vit", VIT_ARCH, 32, seed=6)
  spec = lora.LoraSpec(rank=2, alpha=4.0)
  params = lora.add_lora(variables["params"], spec, jax.random.key(0))
  # stand-in for training: non-zero b, so the adapters change the function
  params["lora"] = jax.tree.map(lambda a: a + 0.05, params["lora"])
  meta = {**_meta("vit", VIT_ARCH, 32), "lora": spec.to_dict()}
  with checkpoint.Checkpointer(tmp_path / "run" / "checkpoints", async_save=False) as c:
    c.save(3, {"params": params}, extra={"model": meta})
  merged, read_meta = export.read_run(tmp_path / "run")
  assert "lora" not in merged["params"] and read_meta["lora"] == spec.to_dict()
  x = _images(32, seed=7)
  adapted = np.asarray(lora.LoraModel(model, spec).apply({"params": params}, jnp.asarray(x)))
  out = export.export(merged, read_meta, tmp_path / "hf", "hf")
  theirs = _torch_logits(_check_hf(out, ViTForImageClassification), x)
  assert np.abs(theirs - adapted).max() < 1e-4
  assert np.abs(adapted - np.asarray(model.apply(variables, jnp.asarray(x)))).max() > 1e-2
  assert export.main([f"--workdir={tmp_path / 'run'}", f"--out={tmp_path / 'timm'}", "--format=timm"]) == 0
  timm_model, cfg = _timm_model(tmp_path / "timm")
  assert cfg["label_names"] == CLASSES
  assert np.abs(_torch_logits(timm_model, x) - adapted).max() < 1e-4
  # ... and loading the run as a pretrained source gives the adapted function too
  from ftjax.models import from_pretrained
  loaded, loaded_vars, report = from_pretrained(str(tmp_path / "run"))
  np.testing.assert_allclose(np.asarray(loaded.apply(loaded_vars, jnp.asarray(x))), adapted, atol=1e-5)
  assert report.dropped == [("params/lora/*", "LoRA adapters (rank 2, alpha 4.0) merged into the kernels "
                                               "they adapt")]
  with checkpoint.Checkpointer(tmp_path / "bad" / "checkpoints", async_save=False) as c:
    c.save(1, {"params": params}, extra={"model": _meta("vit", VIT_ARCH, 32)})
  with pytest.raises(CheckpointError, match="LoRA adapters but no LoRA settings"):
    export.read_run(tmp_path / "bad")
  # Unmerged adapters handed to the API: export() merges them with the run's settings, the
  # converters refuse them (neither format holds them; leaving them out exported the base).
  direct = export.export({"params": params}, meta, tmp_path / "direct", "timm")
  assert np.abs(_torch_logits(_timm_model(direct)[0], x) - adapted).max() < 1e-4
  for convert in (export.to_hf, export.to_timm):
    with pytest.raises(ConfigError, match=r"LoRA adapters not merged into the weights \(params/lora/"):
      convert("vit", VIT_ARCH, {"params": params})
  with pytest.raises(ConfigError, match="LoRA adapters not merged"):
    export.export({"params": params}, _meta("vit", VIT_ARCH, 32), tmp_path / "nometa", "hf")
  assert not (tmp_path / "nometa").exists()


def test_a_missing_workdir_is_a_command_line_error_as_in_predict(tmp_path, capsys):
  # export said "checkpoint directory not found" with exit 3, predict and fewshot exit 2.
  assert export.main([f"--workdir={tmp_path / 'nope'}", f"--out={tmp_path / 'out'}"]) == 2
  assert capsys.readouterr().err == (f"ftjax: error: workdir not found ({tmp_path / 'nope'}); pass the "
                                     "--workdir of a training run\n")
  assert not (tmp_path / "out").exists()
