"""Which parameters train, and how fast: param-group rules -> one ``optax.multi_transform``.

A fine-tuning recipe is data.  ``param_groups`` is a list of ``(regex, spec)``
rules over '/'-joined parameter paths (full match, first match wins, see
:mod:`ftjax.tree`); ``spec`` is ``None`` (frozen for the whole run) or a dict
``{lr_mult, wd_mult, schedule?, name?, kwargs?}``.  On top of the groups:

* ``layer_decay``: a per-depth learning-rate multiplier ``decay ** (top - depth)``
  whose depths each model family defines in :data:`LAYER_DEPTHS`;
* ``unfreeze``: ``[(step, regex), ...]``: matching leaves stay frozen until
  ``step``, then train with their group's spec (on the global schedule, ramped
  up from 0 over ``unfreeze_warmup_steps`` steps when that is set);
* decoupled weight decay on kernels and LoRA adapters only (``wd_rules`` override the mask).

Every leaf gets a *label*: ``frozen``, or ``g<group>[.d<depth>][.p<phase>]``.  A
label's leaves share one learning rate, so the rules compile into one
``optax.multi_transform`` whose frozen label is ``optax.set_to_zero()``: frozen
leaves keep no optimizer state, and since nothing reads their gradients (global
norm clipping is masked to trainable leaves) XLA drops their backward pass.

A trainer with ``unfreeze`` rules builds one optimizer (and one compiled step)
per phase of :func:`unfreeze_phases`: ``make_optimizer(..., phase=p)``; when
:func:`phase_at` moves to the next phase it calls :func:`transition_opt_state`
once; on resume the restore template is ``make_optimizer(..., phase=state_phase(step)).init``
(a state saved at a phase's first step still holds the previous phase's optimizer state).
:func:`fine_tuning_plan` is the table to print before compiling.

>>> import numpy as np
>>> params = {"body": {"kernel": np.ones((2, 2), np.float32)},
...           "head": {"bias": np.zeros(2, np.float32), "kernel": np.ones((2, 2), np.float32)}}
>>> config = {"name": "sgd", "kwargs": {}, "lr": 0.5, "schedule": {"name": "constant"},
...           "param_groups": [("head/.*", {}), (".*", None)]}
>>> param_labels(params, config)
{'body': {'kernel': 'frozen'}, 'head': {'bias': 'g0', 'kernel': 'g0'}}
>>> tx = make_optimizer(params, config, total_steps=10)
>>> grads = {"body": {"kernel": np.ones((2, 2), np.float32)},
...          "head": {"bias": np.ones(2, np.float32), "kernel": np.ones((2, 2), np.float32)}}
>>> updates, _ = tx.update(grads, tx.init(params), params)
>>> updates["body"]["kernel"].tolist(), updates["head"]["bias"].tolist()
([[0.0, 0.0], [0.0, 0.0]], [-0.5, -0.5])
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import math
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from ml_collections import config_dict

from ftjax import tree as tree_lib
from ftjax.errors import ConfigError

FROZEN = "frozen"

SCHEDULES = ("warmup_cosine", "cosine", "linear", "constant", "rsqrt", "step")

# Per-family layer depths for ``layer_decay``: ``(path regex, base depth)``.  In a
# regex, ``{i}`` stands for a block or stage index and the depth is ``base + i``;
# "top" is one more than the deepest other level, and its multiplier is 1.
#   vit:          embeddings (patch, cls, registers, pos) 0, encoderblock_i -> i + 1,
#                 encoder_norm (or fc_norm with GAP), MAPHead_0, pre_logits, head -> L + 1.
#   resnet(v2):   per stage: stem 0, stage s (1..4) -> s, final norm + head -> 5;
#                 ResNet-50 with decay d: head 1, stage4 d, stage3 d^2, stage2 d^3,
#                 stage1 d^4, stem d^5.
#   efficientnet: stem 0, stage s (0..6) -> s + 1, conv_head + head -> 8.
_TOP = "top"
_RESNET_DEPTHS = ((r"stem/.*", 0), (r"stage{i}/.*", 0), (r"norm/.*|head/.*", _TOP))
LAYER_DEPTHS: dict[str, tuple[tuple[str, int | str], ...]] = {
    "vit": ((r"embedding/.*|cls|reg|Transformer/posembed_input/.*", 0),
            (r"Transformer/encoderblock_{i}/.*", 1),
            (r"Transformer/encoder_norm/.*|fc_norm/.*|MAPHead_0/.*|pre_logits/.*|head/.*", _TOP)),
    "resnet": _RESNET_DEPTHS,
    "resnetv2": _RESNET_DEPTHS,
    "efficientnet": ((r"stem/.*", 0), (r"stage{i}/.*", 1), (r"conv_head/.*|head/.*", _TOP)),
}

# Weight decay by default: kernels (dense and conv) only; no biases, norms,
# position embeddings or class token.
# LoRA adapters (``lora/<kernel path>/{a,b}``, ftjax.lora) decay as their kernel would, as
# with PEFT under Hugging Face's Trainer (everything but biases and norms).
DEFAULT_WD_RULES = ((r"(?:.*/)?kernel", 1.0), (r"lora/.*/kernel/[ab]", 1.0), (r".*", 0.0))

# Optimizers whose step size does not scale with the gradient: the "high
# learning rate" warning uses a lower threshold for them than for SGD.
_ADAPTIVE = ("adam", "adamw", "nadam", "nadamw", "radam", "adamax", "adamaxw", "amsgrad", "lamb",
             "lion", "adafactor", "adabelief", "adan", "novograd", "rmsprop", "adagrad", "lars",
             "sm3", "yogi", "fromage", "adadelta")

# Optimizer kwargs that would bypass optim.lr / optim.weight_decay / optim.wd_rules.
_OWNED_KWARGS = {"learning_rate": "optim.lr", "weight_decay": "optim.weight_decay",
                 "weight_decay_rate": "optim.weight_decay", "weight_decay_mask": "optim.wd_rules",
                 "mask": "optim.wd_rules"}

# A leaf no user wd rule covers (None would vanish from a pytree).
_UNSET = object()

_GROUP_KEYS = ("lr_mult", "wd_mult", "schedule", "name", "kwargs")

# default_config()'s optimizer kwargs: the default sgd's, which another optimizer refuses.
_DEFAULT_KWARGS = {"momentum": 0.9}


def default_config() -> ml_collections.ConfigDict:
  """Every key :func:`make_optimizer` understands, with its default.

  The defaults are the vit_jax fine-tuning recipe: SGD with momentum 0.9, no
  weight decay, a cosine decay (set ``schedule.warmup_steps``).

  >>> c = default_config()
  >>> c.name, c.kwargs.momentum, c.param_groups, c.accum_steps
  ('sgd', 0.9, [('.*', {})], 1)
  """
  c = ml_collections.ConfigDict()
  c.name = "sgd"  # any optax optimizer taking learning_rate
  c.kwargs = dict(_DEFAULT_KWARGS)  # passed to it (set {} when naming another optimizer)
  c.lr = 0.01  # peak learning rate
  c.schedule = ml_collections.ConfigDict(dict(
      name="warmup_cosine",  # one of SCHEDULES; every schedule starts with the warm-up
      warmup_steps=0,
      warmup_epochs=config_dict.placeholder(float),  # instead of warmup_steps
      end_factor=0.0,  # cosine / linear: final lr as a fraction of the peak
      timescale=10_000,  # rsqrt: lr = peak / sqrt(1 + (step - warmup) / timescale)
      boundaries=[],  # step: global steps where lr is multiplied by decay_factor
      boundary_epochs=[],  # instead of boundaries
      decay_factor=0.1,
  ))
  c.total_steps = config_dict.placeholder(int)  # the trainer's total_steps wins
  c.weight_decay = 0.0  # decoupled: update -= lr * weight_decay * wd multiplier * param
  c.wd_rules = []  # [(regex, mult)], tried before the kernel-only default
  c.grad_clip_norm = config_dict.placeholder(float)  # global norm over trainable leaves
  c.param_groups = [(".*", {})]  # [(regex, None | {lr_mult, wd_mult, schedule, name, kwargs})]
  c.layer_decay = config_dict.placeholder(float)  # needs the model family
  c.unfreeze = []  # [(step, regex)]: leaves frozen until step
  c.unfreeze_warmup_steps = 0  # a group unfrozen at step s > 0 gets lr * min(1, (step - s) / this)
  c.accum_steps = 1  # microbatches per step (the trainer accumulates)
  return c


# ----------------------------------------------------------------------------- options


@dataclasses.dataclass(frozen=True)
class _Group:
  """One validated param-group spec; ``None`` stands for a frozen group."""
  rule: str
  lr_mult: float
  wd_mult: float
  schedule: dict
  name: str
  kwargs: dict
  own_schedule: bool  # errors then point at the group, not at optim.schedule


def _plain(value):
  """ConfigDicts (at any depth) -> dicts, so user and default values compare alike."""
  if isinstance(value, ml_collections.ConfigDict):
    return value.to_dict()
  if isinstance(value, Mapping):
    return {k: _plain(v) for k, v in value.items()}
  return value


def _close(word, options) -> str:
  match = difflib.get_close_matches(str(word), list(options), n=1)
  return f"did you mean {match[0]}?" if match else f"choose from {', '.join(options)}"


def _merge(defaults: dict, given: Mapping, where: str) -> dict:
  out = dict(defaults)
  for key, value in given.items():
    if key not in defaults:
      raise ConfigError("unknown optimizer key", where=f"{where}.{key}", value=repr(value),
                        hint=_close(key, defaults))
    out[key] = value
  return out


def _options(config) -> dict:
  """The optim config (ConfigDict, dict, or a bare param-group list) with defaults filled."""
  defaults = default_config().to_dict()
  if config is None:
    return defaults
  if isinstance(config, Sequence) and not isinstance(config, str):
    config = {"param_groups": list(config)}
  opts = _merge(defaults, _plain(config), "optim")
  opts["kwargs"] = _mapping(opts["kwargs"], "optim.kwargs", "{'momentum': 0.9}")
  opts["schedule"] = _merge(defaults["schedule"], _mapping(opts["schedule"], "optim.schedule"),
                            "optim.schedule")
  accum = opts["accum_steps"]
  if not (isinstance(accum, (int, np.integer)) and not isinstance(accum, bool) and accum >= 1):
    raise ConfigError("accum_steps must be a positive integer", where="optim.accum_steps",
                      value=repr(accum))
  warmup = opts["unfreeze_warmup_steps"]
  if not (isinstance(warmup, (int, np.integer)) and not isinstance(warmup, bool) and warmup >= 0):
    raise ConfigError("unfreeze_warmup_steps must be a non-negative integer",
                      where="optim.unfreeze_warmup_steps", value=repr(warmup))
  _nonnegative(opts["lr"], "optim.lr")
  _nonnegative(opts["weight_decay"], "optim.weight_decay")
  if opts["grad_clip_norm"] is not None:
    opts["grad_clip_norm"] = _positive(opts["grad_clip_norm"], "optim.grad_clip_norm",
                                       "grad_clip_norm must be positive or None")
  if opts["layer_decay"] is not None:
    opts["layer_decay"] = _positive(opts["layer_decay"], "optim.layer_decay",
                                    "layer_decay must be positive",
                                    hint="0.65-0.9 is usual; None turns it off")
  for i, rule in enumerate(opts["wd_rules"] or ()):
    if isinstance(rule, (tuple, list)) and len(rule) == 2:  # the rest: tree.compile_rules says
      _nonnegative(rule[1], f"optim.wd_rules #{i}")
  return opts


def _is_real(value) -> bool:
  return not isinstance(value, bool) and isinstance(value, (int, float, np.integer, np.floating))


def _nonnegative(value, where: str) -> float:
  # inf passes ">= 0": a rate of inf trained until the first step's loss was NaN.
  if not _is_real(value) or not (value >= 0 and math.isfinite(value)):
    raise ConfigError("multiplier or rate must be a finite non-negative number", where=where,
                      value=repr(value))
  return float(value)


def _positive(value, where: str, problem: str, hint: str | None = None) -> float:
  """``value`` as a float when it is a positive real number (numpy scalars too); else the error.

  >>> _positive(np.float32(0.5), "optim.layer_decay", "layer_decay must be positive")
  0.5
  >>> _positive("0.75", "optim.layer_decay", "layer_decay must be positive")
  Traceback (most recent call last):
  ...
  ftjax.errors.ConfigError: ftjax: error: layer_decay must be positive (optim.layer_decay): '0.75'
  """
  if not _is_real(value) or not (value > 0 and math.isfinite(value)):
    raise ConfigError(problem, where=where, value=repr(value), hint=hint)
  return float(value)


def _mapping(value, where: str, example: str = "{'name': 'cosine'}") -> dict:
  """A config dict (or None: empty); anything else is a one-line error."""
  value = _plain(value)
  if value is None:
    return {}
  if not isinstance(value, Mapping):
    raise ConfigError("expected a dict", where=where, value=repr(value), hint=f"e.g. {example}")
  return dict(value)


def _groups(opts: dict) -> list[_Group | None]:
  """Validates ``param_groups`` specs; ``None`` stays ``None`` (frozen)."""
  groups = []
  rules = opts["param_groups"]
  if not isinstance(rules, Sequence) or isinstance(rules, str):
    raise ConfigError("param_groups must be a list of (regex, spec)", where="optim.param_groups",
                      value=repr(rules))
  for i, rule in enumerate(rules):
    where = f"optim.param_groups #{i}"
    if not (isinstance(rule, (tuple, list)) and len(rule) == 2 and isinstance(rule[0], str)):
      raise ConfigError("a param group must be a (regex, spec) pair", where=where, value=repr(rule))
    spec = _plain(rule[1])
    if spec is None:
      groups.append(None)
      continue
    if not isinstance(spec, Mapping):
      raise ConfigError("a param group spec must be None (frozen) or a dict", where=where,
                        value=repr(spec), hint=f"keys: {', '.join(_GROUP_KEYS)}")
    for key in spec:
      if key not in _GROUP_KEYS:
        raise ConfigError("unknown param group key", where=f"{where}.{key}", value=repr(spec[key]),
                          hint=_close(key, _GROUP_KEYS))
    name = spec.get("name", opts["name"])
    # A group that names its own optimizer starts from empty kwargs: the global
    # kwargs belong to the global optimizer (momentum means nothing to adamw).
    kwargs = {} if "name" in spec else dict(opts["kwargs"])
    kwargs.update(_mapping(spec.get("kwargs"), f"{where}.kwargs", "{'momentum': 0.9}"))
    lr_mult = _nonnegative(spec.get("lr_mult", 1.0), f"{where}.lr_mult")
    # Each is finite, the product need not be: the plan showed peak_lr inf.
    if not math.isfinite(float(opts["lr"]) * lr_mult):
      raise ConfigError("learning rate x lr_mult is not finite", where=f"{where}.lr_mult",
                        value=f"{opts['lr']!r} x {lr_mult!r}", hint="lower lr_mult or optim.lr")
    groups.append(_Group(
        rule=rule[0],
        lr_mult=lr_mult,
        wd_mult=_nonnegative(spec.get("wd_mult", 1.0), f"{where}.wd_mult"),
        schedule=_merge(opts["schedule"], _mapping(spec.get("schedule"), f"{where}.schedule"),
                        f"{where}.schedule"),
        name=name, kwargs=kwargs, own_schedule="schedule" in spec))
  return groups


def _total_steps(opts: dict, total_steps: int | None) -> int:
  total = total_steps if total_steps is not None else opts["total_steps"]
  if total is None:
    raise ConfigError("the number of training steps is unknown", where="optim.total_steps",
                      hint="pass total_steps= or set optim.total_steps")
  if isinstance(total, bool) or not isinstance(total, (int, np.integer)) or total < 1:
    raise ConfigError("total_steps must be a positive integer", where="optim.total_steps",
                      value=repr(total))
  return int(total)


# ----------------------------------------------------------------------------- layer depths


def _family_rules(family: str | None):
  if family not in LAYER_DEPTHS:
    raise ConfigError("unknown model family for layer decay", where="family", value=repr(family),
                      hint=_close(family, LAYER_DEPTHS))
  return LAYER_DEPTHS[family]


def layer_depths(params, family: str):
  """Tree of depths per :data:`LAYER_DEPTHS`; every leaf must be covered.

  >>> params = {"cls": 0, "head": {"kernel": 0},
  ...           "Transformer": {"encoderblock_0": {"w": 0}, "encoderblock_1": {"w": 0}}}
  >>> layer_depths(params, "vit")
  {'Transformer': {'encoderblock_0': {'w': 1}, 'encoderblock_1': {'w': 2}}, 'cls': 0, 'head': {'kernel': 3}}
  >>> layer_depths({**params, "lora": {"Transformer": {"encoderblock_1": {"w": {"a": 0}}}}}, "vit")["lora"]
  {'Transformer': {'encoderblock_1': {'w': {'a': 2}}}}
  """
  table = _family_rules(family)
  # LoRA adapters (ftjax.lora: ``lora/<kernel path>/{a,b}``) take the depth of their kernel.
  regexes = ["(?:lora/)?(?:" + rx.replace("{i}", r"(\d+)") + ")" for rx, _ in table]
  which = tree_lib.flatten(tree_lib.rule_tree(
      params, [(rx, i) for i, rx in enumerate(regexes)], default=-1, allow_unused=True))
  outside = [p for p, i in which.items() if i < 0]
  if outside:
    raise ConfigError(f"parameter outside the {family} layer-depth table",
                      where=", ".join(outside[:8]) + (" ..." if len(outside) > 8 else ""),
                      hint="layer_decay needs a depth for every parameter (optim.LAYER_DEPTHS)")
  depth = {}
  for path, i in which.items():
    base = table[i][1]
    if base == _TOP:
      depth[path] = _TOP
    else:
      match = re.fullmatch(regexes[i], path)
      depth[path] = base + (int(match[1]) if match.groups() else 0)
  top = max((d for d in depth.values() if d != _TOP), default=-1) + 1
  return tree_lib.map_with_path(lambda p, _: top if depth[p] == _TOP else depth[p], params)


def layer_decay_multipliers(params, family: str, decay: float):
  """Tree of learning-rate multipliers ``decay ** (top - depth)`` (the head gets 1).

  >>> params = {"cls": 0, "head": {"kernel": 0},
  ...           "Transformer": {"encoderblock_0": {"w": 0}, "encoderblock_1": {"w": 0}}}
  >>> tree_lib.flatten(layer_decay_multipliers(params, "vit", 0.5))
  {'Transformer/encoderblock_0/w': 0.25, 'Transformer/encoderblock_1/w': 0.5, 'cls': 0.125, 'head/kernel': 1.0}
  """
  decay = _positive(decay, "optim.layer_decay", "layer_decay must be positive")
  depths = layer_depths(params, family)
  top = max(jax.tree.leaves(depths))
  try:
    return jax.tree.map(lambda d: decay ** (top - d), depths)
  except OverflowError:  # a layer_decay > 1 to a high power
    raise ConfigError("layer_decay ** depth is not finite", where="optim.layer_decay", value=repr(decay),
                      hint="0.65-0.9 is usual") from None


def gradual_unfreezing(family: str, *, depth: int | None = None, every: int,
                       k: int = 1) -> list[tuple[int, str]]:
  """``unfreeze`` rules that train the last ``k`` more levels every ``every`` steps.

  Levels are the family's depths below the head (:data:`LAYER_DEPTHS`): ViT
  blocks (``depth`` = number of blocks) then the embeddings; ResNet stages 4..1
  then the stem (``depth`` 4); EfficientNet stages 6..0 then the stem (``depth``
  7).  The head level trains from step 0; everything else must have a training
  spec in ``param_groups``.  ``depth`` must be the model's: with a smaller one
  the levels above it are in no rule and train from step 0 (the plan's
  ``from`` column shows it).

  >>> gradual_unfreezing("vit", depth=3, every=100, k=2)
  [(100, 'Transformer/encoderblock_2/.*|Transformer/encoderblock_1/.*'), (200, 'Transformer/encoderblock_0/.*|embedding/.*|cls|reg|Transformer/posembed_input/.*')]
  >>> gradual_unfreezing("resnet", every=50)[0]
  (50, 'stage4/.*')
  """
  table = _family_rules(family)
  if depth is None:
    if family == "vit":
      raise ConfigError("gradual unfreezing of a ViT needs its number of blocks", where="depth")
    depth = {"resnet": 4, "resnetv2": 4, "efficientnet": 7}[family]
  for value, name in ((every, "every"), (k, "k"), (depth, "depth")):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
      raise ConfigError("gradual unfreezing needs a positive integer", where=name, value=repr(value))
  every, k, depth = int(every), int(k), int(depth)

  def regex_at(d):
    parts = []
    for rx, base in table:
      if base == _TOP:
        continue
      if "{i}" in rx:
        if d - base >= 0:
          parts.append(rx.replace("{i}", str(d - base)))
      elif base == d:
        parts.append(rx)
    return "|".join(parts)

  levels = [regex_at(d) for d in range(depth, -1, -1)]
  levels = [rx for rx in levels if rx]
  return [(every * (j + 1), "|".join(levels[j * k:(j + 1) * k]))
          for j in range(math.ceil(len(levels) / k))]


# ----------------------------------------------------------------------------- unfreezing


def _unfreeze_rules(opts: dict) -> list[tuple[int, str]]:
  rules = opts["unfreeze"]
  if not isinstance(rules, Sequence) or isinstance(rules, str):
    raise ConfigError("unfreeze must be a list of (step, regex)", where="optim.unfreeze",
                      value=repr(rules))
  for i, rule in enumerate(rules):
    if not (isinstance(rule, (tuple, list)) and len(rule) == 2 and isinstance(rule[1], str)
            and isinstance(rule[0], (int, np.integer)) and not isinstance(rule[0], bool)):
      raise ConfigError("an unfreeze rule must be a (step, regex) pair", where=f"optim.unfreeze #{i}",
                        value=repr(rule))
  return [(int(s), rx) for s, rx in rules]


def unfreeze_phases(config, total_steps: int | None = None) -> list[int]:
  """Start steps of the training phases: ``[0]`` plus each distinct unfreeze step.

  >>> unfreeze_phases({"unfreeze": [(300, "a/.*"), (100, "b/.*"), (300, "c")]}, 1000)
  [0, 100, 300]
  >>> unfreeze_phases({"unfreeze_warmup_steps": 50}, 1000)
  Traceback (most recent call last):
  ...
  ftjax.errors.ConfigError: ftjax: error: unfreeze_warmup_steps without unfreeze rules (optim.unfreeze_warmup_steps): 50; set optim.unfreeze (steps > 0), or leave it 0
  >>> unfreeze_phases({"unfreeze": [(1000, "a/.*")]}, 1000)
  Traceback (most recent call last):
  ...
  ftjax.errors.ConfigError: ftjax: error: unfreeze step beyond the run (optim.unfreeze #0): 1000; the run has steps 0..999: move or drop the rule (--config.optim.unfreeze='[]'), or set the length by the config file's argument (configs/default.py:steps=N), which moves its rules
  """
  opts = _options(config)
  rules = _unfreeze_rules(opts)
  if total_steps is not None or opts["total_steps"] is not None:
    total = _total_steps(opts, total_steps)
    for i, (step, _) in enumerate(rules):
      if not 0 <= step < total:
        raise ConfigError("unfreeze step beyond the run", where=f"optim.unfreeze #{i}", value=step,
                          hint=f"the run has steps 0..{total - 1}: move or drop the rule "
                               "(--config.optim.unfreeze='[]'), or set the length by the config "
                               "file's argument (configs/default.py:steps=N), which moves its rules")
  starts = [0] + sorted({s for s, _ in rules if s > 0})
  if opts["unfreeze_warmup_steps"] and len(starts) == 1:
    # It would do nothing: only groups unfrozen after step 0 warm up.
    raise ConfigError("unfreeze_warmup_steps without unfreeze rules",
                      where="optim.unfreeze_warmup_steps", value=opts["unfreeze_warmup_steps"],
                      hint="set optim.unfreeze (steps > 0), or leave it 0")
  return starts


def phase_at(step: int, config) -> int:
  """Index of the phase that ``step`` belongs to.

  >>> [phase_at(s, {"unfreeze": [(100, "a")]}) for s in (0, 99, 100, 500)]
  [0, 0, 1, 1]
  """
  starts = unfreeze_phases(config)
  return sum(1 for s in starts if s <= step) - 1


def state_phase(step: int, config) -> int:
  """The phase whose optimizer state a train state holds after ``step`` updates.

  The update from ``step - 1`` made it, so a state saved at a phase's first step
  still holds the previous phase's optimizer state: the loop moves it to the new
  phase (:func:`transition_opt_state`) before the step's update, and a resume
  must rebuild the old phase's state to restore into.

  >>> [state_phase(s, {"unfreeze": [(100, "a")]}) for s in (0, 1, 100, 101)]
  [0, 0, 0, 1]
  """
  return phase_at(max(step - 1, 0), config)


# ----------------------------------------------------------------------------- leaf table


@dataclasses.dataclass(frozen=True)
class _Leaf:
  """How one parameter trains over the whole run."""
  group: int | None  # index into param_groups; None: frozen for the whole run
  depth: int | None  # layer-decay depth, None without layer decay
  lr_mult: float  # group lr_mult times the layer-decay multiplier
  wd: float  # weight_decay * group wd_mult * wd rule multiplier
  phase: int  # phase in which it starts training
  size: int

  def label(self, phase: int) -> str:
    if self.group is None or self.phase > phase:
      return FROZEN
    return (f"g{self.group}" + ("" if self.depth is None else f".d{self.depth}")
            + (f".p{self.phase}" if self.phase else ""))


def _size(leaf) -> int:
  return int(np.prod(leaf.shape if hasattr(leaf, "shape") else np.shape(leaf), dtype=np.int64))


def _leaf_table(params, opts: dict, *, family: str | None = None,
                total_steps: int | None = None, need_depths: bool = True) -> dict[str, _Leaf]:
  groups = _groups(opts)
  group_of = tree_lib.flatten(tree_lib.rule_tree(
      params, [(g[0], i) for i, g in enumerate(opts["param_groups"])], what="param group"))

  starts = unfreeze_phases(opts, total_steps)
  rules = _unfreeze_rules(opts)
  step_of = tree_lib.flatten(tree_lib.rule_tree(
      params, [(rx, s) for s, rx in rules], what="unfreeze rule", default=0)) if rules else {}
  for path, step in step_of.items():
    if step and groups[group_of[path]] is None:
      raise ConfigError("unfreeze rule matches a parameter its param group freezes for good",
                        where=path, value=f"param group #{group_of[path]}",
                        hint="give it a training spec in param_groups; unfreeze only delays it")

  depth_of, decay_of = {}, {}
  if opts["layer_decay"] is not None and need_depths:
    if family is None:
      raise ConfigError("layer_decay needs the model family", where="optim.layer_decay",
                        value=opts["layer_decay"], hint=f"one of {', '.join(LAYER_DEPTHS)}")
    depth_of = tree_lib.flatten(layer_depths(params, family))
    decay_of = tree_lib.flatten(layer_decay_multipliers(params, family, opts["layer_decay"]))

  user_wd = tree_lib.flatten(tree_lib.rule_tree(params, opts["wd_rules"], what="wd rule",
                                                default=_UNSET))
  default_wd = tree_lib.flatten(tree_lib.rule_tree(params, DEFAULT_WD_RULES, what="wd rule",
                                                   allow_unused=True))
  table = {}
  for path, leaf in tree_lib.flatten(params).items():
    gi = group_of[path]
    group = groups[gi]
    wd_rule = default_wd[path] if user_wd[path] is _UNSET else user_wd[path]
    wd_rule = _nonnegative(wd_rule, f"optim.wd_rules ({path})")
    lr_mult = 0.0 if group is None else group.lr_mult * decay_of.get(path, 1.0)
    if not math.isfinite(float(opts["lr"]) * lr_mult):  # a layer_decay > 1 to a high power
      raise ConfigError("learning rate x lr_mult x layer decay is not finite", where="optim.layer_decay",
                        value=f"{opts['layer_decay']!r} at {path}", hint="0.65-0.9 is usual")
    table[path] = _Leaf(
        group=None if group is None else gi,
        depth=depth_of.get(path),
        lr_mult=lr_mult,
        wd=0.0 if group is None else float(opts["weight_decay"]) * group.wd_mult * wd_rule,
        phase=starts.index(step_of.get(path, 0)) if step_of.get(path, 0) else 0,
        size=_size(leaf))
  return table


def param_labels(params, config, *, family: str | None = None, phase: int = 0):
  """The label tree: ``frozen`` or ``g<group>[.d<depth>][.p<start phase>]`` per leaf.

  ``config`` is the optim config, or just the ``param_groups`` list.  The tree
  keeps the container types of ``params`` (dict or FrozenDict), which is what
  ``optax.multi_transform`` needs.

  >>> params = {"head": {"kernel": 0, "bias": 0}, "body": {"kernel": 0}}
  >>> param_labels(params, [("head/.*", {"lr_mult": 10}), (".*", {})])
  {'body': {'kernel': 'g1'}, 'head': {'bias': 'g0', 'kernel': 'g0'}}
  >>> param_labels(params, {"unfreeze": [(100, "body/.*")], "total_steps": 200})
  {'body': {'kernel': 'frozen'}, 'head': {'bias': 'g0', 'kernel': 'g0'}}
  """
  table = _leaf_table(params, _options(config), family=family)
  return tree_lib.map_with_path(lambda p, _: table[p].label(phase), params)


def trainable_mask(params, config, phase: int = 0):
  """Tree of bools, False for the leaves frozen during ``phase``.

  >>> trainable_mask({"a": 0, "b": 0}, {"param_groups": [("a", None), ("b", {})]})
  {'a': False, 'b': True}
  """
  table = _leaf_table(params, _options(config), need_depths=False)
  return tree_lib.map_with_path(lambda p, _: table[p].label(phase) != FROZEN, params)


def trainable_norm(tree, mask) -> jax.Array:
  """Global L2 norm over the leaves where ``mask`` is True (gradient logging).

  Reading the frozen gradients would bring their backward pass back; this does not.

  >>> float(trainable_norm({"a": np.full(4, 3.0), "b": np.ones(2)}, {"a": False, "b": True}))
  1.4142135381698608
  """
  leaves = [x for x, m in zip(jax.tree.leaves(tree), jax.tree.leaves(mask)) if m]
  if not leaves:
    return jnp.zeros([], jnp.float32)
  return jnp.sqrt(sum(jnp.sum(jnp.square(jnp.asarray(x, jnp.float32))) for x in leaves))


# ----------------------------------------------------------------------------- schedules


def _steps(cfg: dict, steps_key: str, epochs_key: str, steps_per_epoch, where: str):
  """A length (or list of them) given in steps or in epochs, as steps."""
  epochs = cfg.get(epochs_key)
  if epochs is None or (isinstance(epochs, (list, tuple)) and not epochs):
    steps = cfg[steps_key]
    for n in steps if isinstance(steps, (list, tuple)) else [steps]:
      if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
        raise ConfigError(f"{steps_key} must be whole numbers of steps >= 0",
                          where=f"{where}.{steps_key}", value=repr(steps))
    return steps
  if cfg[steps_key]:
    raise ConfigError(f"give {steps_key} or {epochs_key}, not both", where=f"{where}.{epochs_key}",
                      value=repr(epochs))
  # NaN and inf reached int(round(...)) below: a ValueError or OverflowError traceback.
  for e in epochs if isinstance(epochs, (list, tuple)) else [epochs]:
    if not _is_real(e) or not (e >= 0 and math.isfinite(e)):
      raise ConfigError(f"{epochs_key} must be finite numbers of epochs >= 0",
                        where=f"{where}.{epochs_key}", value=repr(epochs))
  if not steps_per_epoch:
    raise ConfigError("a length in epochs needs steps_per_epoch", where=f"{where}.{epochs_key}",
                      value=repr(epochs), hint="the trainer passes it; or give it in steps")
  if isinstance(epochs, (list, tuple)):
    return [int(round(e * steps_per_epoch)) for e in epochs]
  return int(round(epochs * steps_per_epoch))


def _schedule(cfg: dict, *, peak: float, total_steps: int, steps_per_epoch=None,
              where: str = "optim.schedule") -> Callable[[Any], jax.Array]:
  """Linear warm-up from 0 to ``peak``, then the named decay until ``total_steps``."""
  name = cfg["name"]
  if name not in SCHEDULES:
    raise ConfigError("unknown learning-rate schedule", where=f"{where}.name", value=repr(name),
                      hint=_close(name, SCHEDULES))
  warmup = _steps(cfg, "warmup_steps", "warmup_epochs", steps_per_epoch, where)
  if warmup >= total_steps:
    raise ConfigError("warm-up as long as the run", where=f"{where}.warmup_steps", value=warmup,
                      hint=f"the run has {total_steps} steps")
  length = total_steps - warmup
  end = _nonnegative(cfg["end_factor"], f"{where}.end_factor") * peak
  if name == "step":
    bounds = _steps(cfg, "boundaries", "boundary_epochs", steps_per_epoch, where)
    if not bounds or list(bounds) != sorted(bounds) or not 0 < bounds[0] or bounds[-1] >= total_steps:
      raise ConfigError("step decay needs increasing boundaries inside the run",
                        where=f"{where}.boundaries", value=repr(bounds),
                        hint=f"global steps in 1..{total_steps - 1}")
    # Python products, so each level is exactly peak * factor**n in float32.
    factor = _nonnegative(cfg["decay_factor"], f"{where}.decay_factor")
    levels = jnp.asarray([peak * factor ** n for n in range(len(bounds) + 1)], jnp.float32)
  if name == "rsqrt":
    timescale = _positive(cfg["timescale"], f"{where}.timescale", "rsqrt needs a positive timescale")

  def decay(t, step):  # t: steps since the warm-up ended; step: global step
    frac = jnp.clip(t / length, 0.0, 1.0)
    if name in ("warmup_cosine", "cosine"):
      return end + (peak - end) * (0.5 * (1.0 + jnp.cos(jnp.pi * frac)))
    if name == "linear":
      return peak + (end - peak) * frac
    if name == "rsqrt":
      return peak * jax.lax.rsqrt(1.0 + t / timescale)
    if name == "step":
      return levels[jnp.sum(step >= jnp.asarray(bounds))]
    return jnp.full([], peak, jnp.float32)

  def schedule(count):
    step = jnp.asarray(count, jnp.float32)
    if not warmup:
      return decay(step, step)
    return jnp.where(step < warmup, peak * step / warmup, decay(step - warmup, step))

  return schedule


def make_schedule(config, *, total_steps: int | None = None, steps_per_epoch: float | None = None,
                  lr_mult: float = 1.0) -> Callable[[Any], jax.Array]:
  """The learning rate at each global step (for logging, or for research code).

  >>> s = make_schedule({"lr": 0.1, "schedule": {"name": "warmup_cosine", "warmup_steps": 10}},
  ...                   total_steps=110)
  >>> [round(float(s(t)), 6) for t in (0, 5, 10, 60, 110)]
  [0.0, 0.05, 0.1, 0.05, 0.0]
  >>> make_schedule({"schedule": {"name": "cosin"}}, total_steps=10)
  Traceback (most recent call last):
  ...
  ftjax.errors.ConfigError: ftjax: error: unknown learning-rate schedule (optim.schedule.name): 'cosin'; did you mean cosine?
  """
  opts = _options(config)
  return _schedule(opts["schedule"], peak=float(opts["lr"]) * lr_mult,
                   total_steps=_total_steps(opts, total_steps), steps_per_epoch=steps_per_epoch)


def _describe_schedule(cfg: dict, steps_per_epoch=None) -> str:
  warmup = _steps(cfg, "warmup_steps", "warmup_epochs", steps_per_epoch, "optim.schedule")
  extra = {"warmup_cosine": f"end={cfg['end_factor']:g}", "cosine": f"end={cfg['end_factor']:g}",
           "linear": f"end={cfg['end_factor']:g}", "rsqrt": f"timescale={cfg['timescale']:g}",
           "constant": "",
           "step": f"x{cfg['decay_factor']:g} at "
                   f"{_steps(cfg, 'boundaries', 'boundary_epochs', steps_per_epoch, 'optim.schedule')}"}
  args = ", ".join(a for a in (f"warmup={warmup}" if warmup else "", extra.get(cfg["name"], "")) if a)
  return f"{cfg['name']}({args})"


# ----------------------------------------------------------------------------- optimizers


def _optimizer_names() -> list[str]:
  names = []
  for name in dir(optax):
    fn = getattr(optax, name)
    if name.startswith("_") or inspect.isclass(fn) or not callable(fn):
      continue
    try:
      if "learning_rate" in inspect.signature(fn).parameters:
        names.append(name)
    except (TypeError, ValueError):
      pass
  return names


# Ranges of optax's common optimizer arguments, as torch.optim checks them: a b2 of -0.5 would
# train to NaN some steps in, a negative eps to a 0% model, a b1 of 1.5 silently.
_KWARG_RANGES = {"b1": (0.0, 1.0), "b2": (0.0, 1.0), "decay": (0.0, 1.0), "momentum": (0.0, math.inf),
                 "eps": (0.0, math.inf), "eps_root": (0.0, math.inf)}


def _check_range(key: str, value, where: str) -> None:
  """A number outside ``_KWARG_RANGES[key]`` (``[low, high)``, or ``>= low``) is a ConfigError.

  >>> _check_range("b2", 0.999, "optim.kwargs.b2")
  >>> _check_range("b2", 1.5, "optim.kwargs.b2")
  Traceback (most recent call last):
  ...
  ftjax.errors.ConfigError: ftjax: error: optimizer argument out of range (optim.kwargs.b2): 1.5; b2 must be in [0, 1)
  """
  if key not in _KWARG_RANGES or isinstance(value, bool) or not isinstance(value, (int, float)):
    return  # None (sgd's momentum), a schedule, or a type optax itself refuses
  low, high = _KWARG_RANGES[key]
  if not low <= value < high:
    raise ConfigError("optimizer argument out of range", where=where, value=repr(value),
                      hint=f"{key} must be in [{low:g}, {high:g})" if high < math.inf else f"{key} must be >= {low:g}")


def named_optimizer(name: str, kwargs: Mapping[str, Any] | None,
                    learning_rate: float | Callable[[Any], Any], *,
                    where: str = "optim") -> optax.GradientTransformation:
  """``optax.<name>(learning_rate, **kwargs)`` with its built-in weight decay off.

  Weight decay is ours (decoupled, masked by rules), so ``weight_decay`` and
  friends are refused in ``kwargs``; optimizers that decay by default (adamw,
  lion) get ``weight_decay=0``.

  >>> tx = named_optimizer("sgd", {"momentum": 0.9}, 0.1)
  >>> named_optimizer("adamw", {"momentum": 0.5}, 0.1)
  Traceback (most recent call last):
  ...
  ftjax.errors.ConfigError: ftjax: error: adamw takes no argument momentum (optim.kwargs.momentum): 0.5; it takes b1, b2, eps, eps_root, mu_dtype, nesterov
  """
  kwargs = dict(_plain(kwargs) or {})
  fn = getattr(optax, name, None) if isinstance(name, str) and not name.startswith("_") else None
  try:
    signature = inspect.signature(fn) if callable(fn) and not inspect.isclass(fn) else None
  except (TypeError, ValueError):
    signature = None
  if signature is None or "learning_rate" not in signature.parameters:
    raise ConfigError("unknown optimizer", where=f"{where}.name", value=repr(name),
                      hint=_close(name, _optimizer_names()) + " (any optax optimizer by name)")
  accepted = [p for p in signature.parameters if p not in _OWNED_KWARGS]
  for key, value in kwargs.items():
    if key in _OWNED_KWARGS:
      raise ConfigError(f"{name} kwarg {key} is set elsewhere", where=f"{where}.kwargs.{key}",
                        value=repr(value), hint=f"use {_OWNED_KWARGS[key]}")
    if key not in signature.parameters:
      hint = f"it takes {', '.join(accepted)}"
      if _DEFAULT_KWARGS.get(key, _UNSET) == value:  # --config.optim.name=adamw alone
        hint += (f"; optim.kwargs still holds the default sgd's {key}={value!r}: set "
                 "optim.kwargs to {} (--config.optim.kwargs='{}')")
      raise ConfigError(f"{name} takes no argument {key}", where=f"{where}.kwargs.{key}",
                        value=repr(value), hint=hint)
    _check_range(key, value, f"{where}.kwargs.{key}")
  if "weight_decay" in signature.parameters:
    kwargs["weight_decay"] = 0.0
  try:
    return fn(learning_rate=learning_rate, **kwargs)
  except (TypeError, ValueError) as e:
    raise ConfigError(f"bad arguments for {name}", where=f"{where}.kwargs", value=repr(kwargs),
                      hint=str(e)) from None


def decoupled_weight_decay(learning_rate: float | Callable[[Any], Any],
                           rates: Mapping[str, float]) -> optax.GradientTransformation:
  """Adds ``-lr(step) * rate[path] * param`` to each update (AdamW-style, any optimizer).

  ``rates`` maps '/'-joined paths to decay rates; absent paths do not decay.  It
  goes after the optimizer in a chain, so the decay skips momentum and Adam's
  normalisation.  Works inside ``optax.multi_transform`` (masked leaves are
  skipped, paths are those of the full tree).

  >>> tx = decoupled_weight_decay(0.5, {"w": 0.1})
  >>> p = {"w": np.full(2, 2.0, np.float32), "b": np.full(2, 2.0, np.float32)}
  >>> u, _ = tx.update({"w": np.zeros(2, np.float32), "b": np.zeros(2, np.float32)}, tx.init(p), p)
  >>> u["w"].tolist(), u["b"].tolist()
  ([-0.10000000149011612, -0.10000000149011612], [0.0, 0.0])
  """

  def init(params):
    del params
    return optax.ScaleByScheduleState(count=jnp.zeros([], jnp.int32))

  def update(updates, state, params=None):
    if params is None:
      raise ValueError("decoupled_weight_decay needs params in update()")
    lr = learning_rate(state.count) if callable(learning_rate) else learning_rate

    def one(key_path, u, p):
      rate = rates.get(tree_lib.path_str(key_path), 0.0)
      if not rate:
        return u
      return u - jnp.asarray(lr * rate, p.dtype) * p

    new = jax.tree_util.tree_map_with_path(one, updates, params)
    return new, optax.ScaleByScheduleState(count=optax.safe_increment(state.count))

  return optax.GradientTransformation(init, update)


@dataclasses.dataclass(frozen=True)
class _LabelPlan:
  """Everything one label's transform is built from."""
  label: str
  group: _Group
  lr_mult: float
  phase: int
  start_step: int
  paths: tuple[str, ...]
  rates: dict


def _label_plans(table: dict[str, _Leaf], opts: dict, phase: int, starts: list[int]):
  groups = _groups(opts)
  by_label: dict[str, list[str]] = {}
  for path, leaf in table.items():
    by_label.setdefault(leaf.label(phase), []).append(path)
  plans = {}
  for label, paths in sorted(by_label.items()):
    if label == FROZEN:
      continue
    first = table[paths[0]]
    plans[label] = _LabelPlan(
        label=label, group=groups[first.group], lr_mult=first.lr_mult, phase=first.phase,
        start_step=starts[first.phase], paths=tuple(paths),
        rates={p: table[p].wd for p in paths if table[p].wd})
  return by_label, plans


def _unfrozen_schedule(base: Callable[[Any], jax.Array], start: int,
                       warmup: int) -> Callable[[Any], jax.Array]:
  """The schedule of a label unfrozen at global step ``start``, by the label's own step count.

  Its count starts at 0 with its fresh moments; shifting keeps its learning rate
  on the global schedule ``base``.  With ``warmup`` > 0 that rate is scaled by
  ``min(1, count / warmup)``: 0 on its first step, as the schedule's own warm-up
  starts, so fresh Adam moments do not take a full step (ULMFiT, fastai).

  >>> s = _unfrozen_schedule(lambda step: jnp.float32(0.5), start=100, warmup=4)
  >>> [float(s(k)) for k in (0, 1, 2, 4, 10)]
  [0.0, 0.125, 0.25, 0.5, 0.5]
  """
  if not warmup:
    return lambda count: base(count + start)
  return lambda count: base(count + start) * jnp.minimum(1.0, jnp.asarray(count, jnp.float32) / warmup)


def _label_schedule(plan: _LabelPlan, opts: dict, total_steps: int, steps_per_epoch):
  """A label's learning rate by its own step count (a late label's, from its start on)."""
  where = f"optim.param_groups #{plan.label[1:].split('.')[0]}"
  base = _schedule(plan.group.schedule, peak=float(opts["lr"]) * plan.lr_mult,
                   total_steps=total_steps, steps_per_epoch=steps_per_epoch,
                   where=f"{where}.schedule" if plan.group.own_schedule else "optim.schedule")
  if plan.start_step:
    return _unfrozen_schedule(base, plan.start_step, int(opts["unfreeze_warmup_steps"]))
  return base


def _highest_lr(schedule, steps: int, every_step_up_to: int = 2**20) -> float:
  """The highest rate ``schedule`` takes over counts 0 .. steps - 1 (0 for no step).

  Every count of a run up to ``every_step_up_to`` steps; beyond, the first half of that
  many counts and as many spread over the rest (a schedule's peak is a warm-up's end).

  >>> _highest_lr(lambda t: jnp.minimum(t, 1000 - t) / 500, 1000)
  1.0
  >>> _highest_lr(lambda t: t / 99, 100, every_step_up_to=10)  # counts 0-4, then 5 to 99 in 5: 99 sampled
  1.0
  """
  if steps <= 0:
    return 0.0
  counts = np.arange(steps)
  if steps > every_step_up_to:
    half = every_step_up_to // 2
    counts = np.concatenate([np.arange(half), np.linspace(half, steps - 1, half).astype(np.int64)])
  # Not jitted: a compilation per label cost each plan seconds; eagerly it is a few array ops.
  return float(jnp.max(jax.vmap(schedule)(jnp.asarray(counts, jnp.int32))))


def _label_transform(plan: _LabelPlan, opts: dict, total_steps: int, steps_per_epoch):
  where = f"optim.param_groups #{plan.label[1:].split('.')[0]}"
  schedule = _label_schedule(plan, opts, total_steps, steps_per_epoch)
  opt = named_optimizer(plan.group.name, plan.group.kwargs, schedule,
                        where="optim" if plan.group.name == opts["name"] else where)
  if plan.rates:
    opt = optax.chain(opt, decoupled_weight_decay(schedule, plan.rates))
  return opt


def make_optimizer(params, config, *, family: str | None = None, total_steps: int | None = None,
                   steps_per_epoch: float | None = None, phase: int = 0
                   ) -> optax.GradientTransformation:
  """The whole optimizer of one training phase, as one ``optax.GradientTransformation``.

  ``chain(masked(clip_by_global_norm, trainable), multi_transform({label: tx}))``
  where frozen leaves map to ``optax.set_to_zero()`` (no state, gradients never
  read) and each other label runs ``optax.<name>`` at ``lr * lr_mult`` followed
  by its decoupled weight decay.  Build one per phase of :func:`unfreeze_phases`
  and carry the state over with :func:`transition_opt_state`.

  >>> params = {"head": {"kernel": np.ones((3, 2), np.float32), "bias": np.zeros(2, np.float32)},
  ...           "body": {"kernel": np.ones((3, 3), np.float32)}}
  >>> tx = make_optimizer(params, {"name": "adamw", "kwargs": {}, "lr": 1e-3,
  ...                              "param_groups": [("head/.*", {}), (".*", None)]}, total_steps=100)
  >>> sum(x.size for x in jax.tree.leaves(tx.init(params)) if x.dtype == np.float32)  # mu + nu, head
  16
  """
  opts = _options(config)
  total = _total_steps(opts, total_steps)
  starts = unfreeze_phases(opts, total)
  if isinstance(phase, bool) or not isinstance(phase, (int, np.integer)) or not 0 <= phase < len(starts):
    raise ConfigError("no such training phase", where="phase", value=repr(phase),
                      hint=f"phases start at steps {starts}")
  table = _leaf_table(params, opts, family=family, total_steps=total)
  by_label, plans = _label_plans(table, opts, phase, starts)
  labels = {path: label for label, paths in by_label.items() for path in paths}

  def lookup(path):
    if path not in labels:
      raise ConfigError("parameter unknown to this optimizer", where=path,
                        hint="build the optimizer from the same params tree")
    return labels[path]

  transforms = {label: _label_transform(plan, opts, total, steps_per_epoch)
                for label, plan in plans.items()}
  if FROZEN in by_label:
    transforms[FROZEN] = optax.set_to_zero()
  # Callables (not fixed trees) so the labels follow whatever container the
  # caller's params and grads use: dict or FrozenDict (optax issues #160, #1148).
  tx = optax.multi_transform(
      transforms, lambda tree: tree_lib.map_with_path(lambda p, _: lookup(p), tree))
  if opts["grad_clip_norm"] is not None:
    # Masked, so the norm (and hence the step) never reads a frozen gradient.
    clip = optax.masked(
        optax.clip_by_global_norm(float(opts["grad_clip_norm"])),
        lambda tree: tree_lib.map_with_path(lambda p, _: lookup(p) != FROZEN, tree))
    tx = optax.chain(clip, tx)
  return tx


# ----------------------------------------------------------------------------- transitions


def _partition_state(state):
  """The ``multi_transform`` state inside a (chained) optimizer state."""
  if isinstance(state, optax.transforms.PartitionState):
    return state
  if isinstance(state, tuple):
    for sub in state:
      found = _partition_state(sub)
      if found is not None:
        return found
  return None


def _replace_partition(state, new):
  if isinstance(state, optax.transforms.PartitionState):
    return new
  if isinstance(state, tuple) and hasattr(state, "_fields"):
    return type(state)(*(_replace_partition(s, new) for s in state))
  if isinstance(state, tuple):
    return tuple(_replace_partition(s, new) for s in state)
  return state


def _shapes(tree):
  # jax.typeof, not np.result_type: a state may hold typed PRNG keys (optax.add_noise).
  return jax.tree.structure(tree), [(np.shape(x), str(jax.typeof(x).dtype)) for x in jax.tree.leaves(tree)]


def transition_opt_state(old_state, new_tx: optax.GradientTransformation, params):
  """The state for ``new_tx`` (next phase) that keeps every label already training.

  Labels present in ``old_state`` keep their state exactly (moments and step
  counts); labels new in this phase (the newly unfrozen leaves) start from
  ``new_tx.init``: zero moments, step count 0.  Transforms chained around the
  ``multi_transform`` (``optax.chain(my_transform, make_optimizer(...))``) keep
  their state too.  Call it once at each phase start.

  >>> p = {"a": np.ones(2, np.float32), "b": np.ones(2, np.float32)}
  >>> cfg = {"name": "adam", "kwargs": {}, "unfreeze": [(5, "b")], "total_steps": 10}
  >>> tx0, tx1 = make_optimizer(p, cfg, phase=0), make_optimizer(p, cfg, phase=1)
  >>> _, s0 = tx0.update(p, tx0.init(p), p)
  >>> s1 = transition_opt_state(s0, tx1, p)
  >>> sorted(s1.inner_states), int(s1.inner_states["g0"].inner_state[0].count)
  (['g0', 'g0.p1'], 1)
  >>> noisy = lambda phase: optax.chain(optax.add_noise(0.01, 0.55, 0), make_optimizer(p, cfg, phase=phase))
  >>> _, s0 = noisy(0).update(p, noisy(0).init(p), p)
  >>> int(transition_opt_state(s0, noisy(1), p)[0].count)  # the noise schedule goes on
  1
  """
  fresh = new_tx.init(params)
  old, new = _partition_state(old_state), _partition_state(fresh)
  if old is None or new is None:
    raise ConfigError("optimizer state is not a multi_transform state",
                      where="transition_opt_state", hint="build both with make_optimizer")
  inner = dict(new.inner_states)
  for label, state in old.inner_states.items():
    if label == FROZEN:
      continue
    if label not in inner:
      raise ConfigError("a training group disappears at the phase transition", where=label,
                        hint="unfreezing never freezes again; build both optimizers from one config")
    if _shapes(state) != _shapes(inner[label]):
      raise ConfigError("the optimizer state of a group changes shape at the transition",
                        where=label, hint="build both optimizers from one config and params tree")
    inner[label] = state
  merged = type(new)(inner)
  carried = _replace_partition(old_state, merged)
  if _shapes(carried) != _shapes(_replace_partition(fresh, merged)):
    raise ConfigError("the transforms around the param groups change at the phase transition",
                      where="transition_opt_state",
                      hint="chain the same transforms around make_optimizer in every phase")
  return carried


# ----------------------------------------------------------------------------- plan


@dataclasses.dataclass(frozen=True)
class PlanRow:
  """One label of the plan: a set of leaves sharing one transform."""
  label: str
  modules: str  # the modules the leaves belong to, shortened
  rule: str | None  # the param-group regex; None for the frozen row
  depth: int | None
  leaves: int
  params: int
  frozen: bool  # frozen for the whole run
  start_step: int  # first step it trains
  lr_mult: float  # group lr_mult * layer-decay multiplier
  peak_lr: float  # the highest lr it trains at, from start_step on (a late group's is lower)
  wd_mult: float
  decayed_params: int  # parameters with a non-zero weight decay
  optimizer: str
  schedule: str
  state_bytes: int


@dataclasses.dataclass(frozen=True)
class Plan:
  """What trains and how, per label; ``str(plan)`` is the table printed before compiling."""
  rows: tuple[PlanRow, ...]
  trainable_params: int  # at step 0
  frozen_params: int  # at step 0
  final_trainable_params: int  # after the last unfreezing
  state_bytes: int  # optimizer state of the last phase (the largest)
  total_steps: int
  phases: tuple[int, ...]
  family: str | None
  layer_decay: float | None
  weight_decay: float
  grad_clip_norm: float | None
  warnings: tuple[str, ...]

  def row(self, label: str) -> PlanRow:
    for r in self.rows:
      if r.label == label:
        return r
    raise KeyError(label)

  def __str__(self) -> str:
    head = (f"fine-tuning plan: {self.total_steps:,} steps"
            + (f", unfreezing at steps {list(self.phases[1:])}" if len(self.phases) > 1 else "")
            + (f", layer_decay {self.layer_decay:g} ({self.family})" if self.layer_decay else "")
            + (f", weight_decay {self.weight_decay:g}" if self.weight_decay else "")
            + (f", grad_clip_norm {self.grad_clip_norm:g} (trainable leaves)"
               if self.grad_clip_norm else ""))
    cols = ("label", "from", "params", "lr_mult", "peak_lr", "wd_mult", "decayed", "optimizer",
            "schedule", "state_bytes", "modules")
    cells = [cols]
    for r in self.rows:
      if r.frozen:
        cells.append((r.label, "-", f"{r.params:,}", "-", "-", "-", "-", "-", "-",
                      f"{r.state_bytes:,}", r.modules))
      else:
        cells.append((r.label, str(r.start_step), f"{r.params:,}", f"{r.lr_mult:.6g}",
                      f"{r.peak_lr:.6g}", f"{r.wd_mult:.6g}", f"{r.decayed_params:,}", r.optimizer,
                      r.schedule, f"{r.state_bytes:,}", r.modules))
    widths = [max(len(c[i]) for c in cells) for i in range(len(cols))]
    lines = [head] + ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells]
    lines.append(f"trainable at step 0: {self.trainable_params:,} params"
                 + (f" ({self.final_trainable_params:,} after unfreezing)"
                    if self.final_trainable_params != self.trainable_params else "")
                 + f"; frozen: {self.frozen_params:,}; optimizer state: {self.state_bytes:,} bytes"
                 + f" ({self.state_bytes / 2**20:.1f} MiB)")
    lines += [f"warning: {w}" for w in self.warnings]
    return "\n".join(lines)


def _modules(paths: Sequence[str], limit: int = 60) -> str:
  """``Transformer/encoderblock_3/.../kernel`` -> ``Transformer/encoderblock_3``, deduplicated."""
  seen = []
  for path in paths:
    parts = path.split("/")
    short = "/".join(parts[:2]) if len(parts) > 2 else (parts[0] if len(parts) == 2 else path)
    if short not in seen:
      seen.append(short)
  text = ", ".join(seen)
  return text if len(text) <= limit else text[:limit - 3] + "..."


def _state_bytes(tree) -> int:
  return sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def _plan_warnings(opts, table, rows, trainable0, final_params, total_params, num_train_examples,
                   total_steps, steps_per_epoch) -> list[str]:
  out = []
  head = [p for p in table if p.split("/")[0] == "head"]
  if trainable0 == 0:
    out.append("nothing trains at step 0: every parameter is frozen (the head too?)")
  elif float(opts["lr"]) == 0:
    out.append("optim.lr is 0: no parameter moves (BatchNorm statistics alone may)")
  elif head and all(table[p].group is None for p in head):
    out.append("the head is frozen for the whole run: a new head would keep its initialisation")
  groups = _groups(opts)
  last = max(leaf.phase for leaf in table.values())
  starts = unfreeze_phases(opts, total_steps)
  trained = {p: leaf for p, leaf in table.items() if leaf.label(last) != FROZEN}
  full = len(trained) == len(table)
  if num_train_examples is not None and num_train_examples < 10_000:
    # The backbone's learning rates, each under its own group's optimizer: the head may
    # take a high one (a new head often does), the pretrained features may not.  Warned
    # when the backbone leaves above the limit hold most of the network (a fine-tune
    # that freezes only the patch embedding is as exposed as a full one).
    worst, exposed = None, 0
    for path, leaf in trained.items():
      if path.split("/")[0] == "head":
        continue
      name = groups[leaf.group].name
      limit = 1e-3 if name in _ADAPTIVE else 0.1
      lr = float(opts["lr"]) * leaf.lr_mult
      if lr > limit:
        exposed += leaf.size
        if worst is None or lr / limit > worst[0] / worst[2]:
          worst = (lr, name, limit, path)
    if worst and (full or exposed >= total_params / 2):
      lr, name, limit, path = worst
      start = starts[last]
      out.append((f"full fine-tune of all {total_params:,} parameters" if full else
                  f"fine-tune of {final_params:,} of {total_params:,} parameters")
                 + (f" from step {start}" if start else "")
                 + f" with {name} lr {lr:g} (> {limit:g}, {path}) on {num_train_examples:,} examples:"
                 " likely to wreck the pretrained features; lower lr, freeze the backbone"
                 + ("" if opts["layer_decay"] is not None else " or use layer_decay"))
  for i, group in enumerate(groups):
    if group is not None and group.lr_mult == 0:
      out.append(f"param group #{i} ({group.rule!r}) has lr_mult 0: it still costs gradients and "
                 "optimizer state; use None to freeze it")
  if opts["layer_decay"] is not None and opts["layer_decay"] > 1:
    out.append(f"layer_decay {opts['layer_decay']:g} > 1: lower layers learn faster than the head")
  warmups = [_steps(g.schedule, "warmup_steps", "warmup_epochs", steps_per_epoch, "optim.schedule")
             for g in groups if g is not None]
  if warmups and max(warmups) > total_steps // 2:
    out.append(f"warm-up of {max(warmups)} steps is over half of the {total_steps}-step run")
  last_start = starts[-1]
  if last_start and last_start + opts["unfreeze_warmup_steps"] >= total_steps:
    out.append(f"unfreeze_warmup_steps {opts['unfreeze_warmup_steps']} outlasts the run: what is "
               f"unfrozen at step {last_start} never reaches its full lr")
  if float(opts["weight_decay"]) > 0 and not any(r.decayed_params for r in rows):
    out.append("weight_decay is set but no trainable parameter decays (check wd_rules)")
  return out


def fine_tuning_plan(params, config, *, family: str | None = None, total_steps: int | None = None,
                     num_train_examples: int | None = None,
                     steps_per_epoch: float | None = None) -> Plan:
  """The plan of the whole run as data; ``print(plan)`` before compiling.

  Rows are labels of the last phase (those unfrozen later say from which
  step), then one row for the leaves frozen for the whole run.  Works on arrays
  or ``jax.ShapeDtypeStruct`` leaves: the optimizer state is sized with
  ``jax.eval_shape``, nothing is allocated.

  >>> params = {"head": {"kernel": np.zeros((4, 2), np.float32), "bias": np.zeros(2, np.float32)},
  ...           "body": {"kernel": np.zeros((4, 4), np.float32)}}
  >>> plan = fine_tuning_plan(params, {"param_groups": [("head/.*", {}), (".*", None)]},
  ...                         total_steps=100)
  >>> plan.trainable_params, plan.frozen_params, plan.state_bytes  # sgd momentum: 10 floats, 1 step count
  (10, 16, 44)
  >>> print(plan)  # doctest: +NORMALIZE_WHITESPACE
  fine-tuning plan: 100 steps
  label   from  params  lr_mult  peak_lr  wd_mult  decayed  optimizer          schedule              state_bytes  modules
  g0      0     10      1        0.01     1        0        sgd(momentum=0.9)  warmup_cosine(end=0)  44           head
  frozen  -     16      -        -        -        -        -                  -                     0            body
  trainable at step 0: 10 params; frozen: 16; optimizer state: 44 bytes (0.0 MiB)
  """
  opts = _options(config)
  total = _total_steps(opts, total_steps)
  starts = unfreeze_phases(opts, total)
  last = len(starts) - 1
  table = _leaf_table(params, opts, family=family, total_steps=total)
  by_label, plans = _label_plans(table, opts, last, starts)
  tx = make_optimizer(params, opts, family=family, total_steps=total,
                      steps_per_epoch=steps_per_epoch, phase=last)
  state = _partition_state(jax.eval_shape(tx.init, params))
  warmup = opts["unfreeze_warmup_steps"]
  rows = []
  for label, plan in plans.items():
    g = plan.group
    kwargs = ", ".join(f"{k}={v!r}" for k, v in sorted(g.kwargs.items()))
    rows.append(PlanRow(
        label=label, modules=_modules(plan.paths), rule=g.rule,
        depth=table[plan.paths[0]].depth, leaves=len(plan.paths),
        params=sum(table[p].size for p in plan.paths), frozen=False, start_step=plan.start_step,
        lr_mult=plan.lr_mult, wd_mult=g.wd_mult,
        peak_lr=_highest_lr(_label_schedule(plan, opts, total, steps_per_epoch), total - plan.start_step),
        decayed_params=sum(table[p].size for p in plan.rates),
        optimizer=f"{g.name}({kwargs})",
        schedule=_describe_schedule(g.schedule, steps_per_epoch)
        + (f" + {warmup}-step warm-up" if plan.start_step and warmup else ""),
        state_bytes=_state_bytes(state.inner_states[label])))
  # Leaves that wait for a later phase train then; only the never-trained stay here.
  rows.sort(key=lambda r: (r.start_step, -(r.depth or 0), r.label))
  frozen = by_label.get(FROZEN, [])
  if frozen:
    rows.append(PlanRow(
        label=FROZEN, modules=_modules(frozen), rule=None, depth=None, leaves=len(frozen),
        params=sum(table[p].size for p in frozen), frozen=True, start_step=total, lr_mult=0.0,
        peak_lr=0.0, wd_mult=0.0, decayed_params=0, optimizer="-", schedule="-",
        state_bytes=_state_bytes(state.inner_states[FROZEN])))
  total_params = sum(leaf.size for leaf in table.values())
  trainable0 = sum(leaf.size for leaf in table.values() if leaf.label(0) != FROZEN)
  final = sum(leaf.size for leaf in table.values() if leaf.label(last) != FROZEN)
  warnings = _plan_warnings(opts, table, rows, trainable0, final, total_params, num_train_examples,
                            total, steps_per_epoch)
  return Plan(rows=tuple(rows), trainable_params=trainable0, frozen_params=total_params - trainable0,
              final_trainable_params=final, state_bytes=_state_bytes(jax.eval_shape(tx.init, params)),
              total_steps=total, phases=tuple(starts), family=family,
              layer_decay=opts["layer_decay"], weight_decay=float(opts["weight_decay"]),
              grad_clip_norm=opts["grad_clip_norm"], warnings=tuple(warnings))
