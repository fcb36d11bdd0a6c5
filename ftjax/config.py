"""The schema of every config key ftjax understands, and the checks that run before any work.

Config files start from :func:`default_config` (locked), so a misspelled key in
a file or on the command line (``--config.optim.lrr=0.1``) fails at once, and
ml_collections checks the type of every override.

>>> c = default_config()
>>> c.train.batch_size
256
>>> c.optim.lrr = 0.1
Traceback (most recent call last):
...
AttributeError: ...
"""

from __future__ import annotations

import difflib
import json
from collections.abc import Mapping

import ml_collections as mc
from ml_collections.config_dict import placeholder

from ftjax.errors import ConfigError

# Keys whose change makes a stored run a different experiment: resuming a
# workdir whose config.json differs in one of these is refused, and every
# checkpoint records them (its fingerprint, compared on the keys both sides
# record, so a key added here does not lock older checkpoints out; a key added
# inside a section, such as optim, holds its default there: with_defaults).  The data
# keys are those that decide which examples are trained on, which labels they
# carry, how they are transformed, and what the "val" split holds; keys that
# only change speed or failure handling (num_workers, prefetch, on_corrupt)
# are not, nor eval_splits (which splits are reported, each under its own
# name) or data.seed (the trainer seeds the data with the top-level seed).
# The loss and the regularisers (label smoothing, dropout, stochastic depth,
# BatchNorm statistics, EMA, the LoRA scale) are the experiment as much as
# mixup is.
RESUME_KEYS = ("seed", "model.source", "model.num_classes", "model.dtype", "data.image_size", "model.scratch",
               "model.dont_load", "model.lora_rank", "data.source", "data.name", "data.root", "data.train_root",
               "data.per_class", "train.batch_size", "optim",
               "data.data_dir", "data.path", "data.image_key", "data.label_key", "data.train_split",
               "data.val_root", "data.val_fraction", "data.split_seed", "data.verify_images",
               "data.resize", "data.crop_fraction", "data.augment", "data.mixup_alpha",
               "data.cutmix_alpha", "data.mix_switch_prob",
               "train.label_smoothing", "train.ema_decay", "train.freeze_bn", "model.dropout_rate",
               "model.droppath_rate", "model.bn_momentum", "model.lora_alpha", "model.lora_targets",
               "model.arch")


def model_config() -> mc.ConfigDict:
  c = mc.ConfigDict()
  c.source = "efficientnet:lite0"  # see ftjax.models: hf:, timm:, npz:, torchvision:, efficientnet:, a dir
  c.num_classes = placeholder(int)  # None: from the data
  c.dtype = "float32"  # compute dtype: float32 | bfloat16 (parameters stay float32)
  c.dont_load = ()  # regexes of params/... paths to initialise instead of loading
  c.scratch = False  # same architecture, random initialisation (a baseline)
  c.dropout_rate = placeholder(float)  # None: the family's default (dropout before the head / in blocks)
  c.droppath_rate = placeholder(float)  # stochastic depth; None: the family's default
  # BatchNorm running-statistics momentum, flax's convention (0.9 is torch's 0.1); None: the
  # family's (ResNet 0.9, EfficientNet 0.99)
  c.bn_momentum = placeholder(float)
  c.remat = placeholder(bool)  # ViT: recompute each block in the backward pass (less memory, ~1/3 more compute)
  c.attention = placeholder(str)  # ViT: "auto" (cuDNN flash attention on a GPU in bf16) | "xla" | "cudnn"
  # Any other architecture option of the family that keeps the checkpoint's parameter shapes,
  # over the checkpoint's: --config.model.arch.stem_conv_impl=space_to_depth (ResNet),
  # --config.model.arch.layer_norm_eps=1e-6 (ViT).  The family refuses an option it lacks.
  c.arch = {}
  c.lora_rank = 0  # > 0: LoRA adapters of this rank on lora_targets; the base stays frozen
  c.lora_alpha = placeholder(float)  # update scale alpha / rank; None: 1
  c.lora_targets = ()  # regexes of kernel paths; empty: ViT attention and MLP kernels
  return c


def train_config() -> mc.ConfigDict:
  c = mc.ConfigDict()
  c.total_steps = 1000
  c.batch_size = 256  # global, over all devices and hosts
  c.eval_batch_size = 256
  c.eval_every = 200  # steps; 0: only at the end
  c.log_every = 20
  c.checkpoint_every = 200  # steps; 0: only at the end (and on SIGTERM)
  c.keep_latest = 2
  c.keep_best = 1
  c.best_metric = "top1"  # "<split>/<metric>" from the evaluation; a bare metric: the first eval split's
  c.best_mode = "max"
  c.early_stopping_patience = 0  # evaluations without improvement; 0: off
  c.early_stopping_min_delta = 0.0
  c.label_smoothing = 0.0
  c.ema_decay = 0.0  # 0: no EMA
  # BatchNorm running statistics in training. auto: a layer's move only while its scale and bias
  # train (phase by phase: a head-only phase moves none); yes: never; no: always (timm's train mode).
  c.freeze_bn = "auto"
  c.on_nan = "stop"  # stop | skip
  c.max_consecutive_skips = 10
  c.parallel = "jit"  # jit (sharded over a mesh) | pmap
  c.shard_params = ()  # FSDP-style: regexes of params to shard over the data axis
  c.distributed = False  # call jax.distributed.initialize() (multi-host)
  c.deterministic = False  # GPU: --xla_gpu_deterministic_ops=true (bit-identical reruns)
  c.async_checkpoint = True
  c.plots = True
  c.tensorboard = True
  return c


def default_config() -> mc.ConfigDict:
  """Every key ftjax understands, with defaults; locked."""
  from ftjax import data, optim  # their sub-schemas live with their code

  c = mc.ConfigDict()
  c.seed = 0
  c.model = model_config()
  c.data = data.default_config()
  c.optim = optim.default_config()
  c.train = train_config()
  c.lock()
  return c


def parse_arg(arg: str, **defaults) -> dict:
  """Parses a config file's ``:arg`` string (``key=value,key=value``) strictly.

  Keys must be among ``defaults`` and values take the type of the default.

  >>> parse_arg("steps=500", steps=10_000, dataset="cifar10")
  {'steps': 500, 'dataset': 'cifar10'}
  >>> parse_arg("eval=True", eval=False)
  {'eval': True}
  >>> parse_arg("eval=ture", eval=False)
  Traceback (most recent call last):
  ...
  ftjax.errors.ConfigError: ftjax: error: bad config argument value (:eval=ture): 'ture'; expected bool (true or false)
  >>> parse_arg("stepz=500", steps=10_000)
  Traceback (most recent call last):
  ...
  ftjax.errors.ConfigError: ftjax: error: unknown config argument (:stepz=500): 'stepz'; known: steps
  """
  out = dict(defaults)
  for item in filter(None, (arg or "").split(",")):
    key, sep, value = item.partition("=")
    key = key.strip()
    if not sep or key not in defaults:
      raise ConfigError("unknown config argument", where=f":{item}", value=repr(key),
                        hint=f"known: {', '.join(defaults)}")
    kind = type(defaults[key])
    try:
      if kind is bool:  # a typo ("ture") must not read as False
        out[key] = {"1": True, "true": True, "yes": True, "0": False, "false": False, "no": False}[value.lower()]
      else:
        out[key] = kind(value)
    except (KeyError, ValueError):
      raise ConfigError("bad config argument value", where=f":{item}", value=repr(value),
                        hint=f"expected {kind.__name__}" + (" (true or false)" if kind is bool else "")) from None
  return out


def to_dict(config) -> dict:
  """A JSON-able plain dict (tuples become lists)."""
  if isinstance(config, mc.ConfigDict):
    config = config.to_dict()
  return json.loads(json.dumps(config, default=lambda o: list(o) if isinstance(o, tuple) else str(o)))


def _get(d: Mapping, dotted: str, default=None):
  for part in dotted.split("."):
    if not isinstance(d, Mapping) or part not in d:
      return default
    d = d[part]
  return d


def resume_mismatches(stored: Mapping, current: Mapping) -> list[str]:
  """Keys in :data:`RESUME_KEYS` whose values differ between two config dicts.

  A key a dict lacks counts as its default: a ``config.json`` written before
  the key existed describes a run that behaved as the default does.

  A section of the keys (``optim``) is named down to the keys that differ in it.

  >>> resume_mismatches({"seed": 0, "optim": {"lr": 1}}, {"seed": 0, "optim": {"lr": 2}})
  ['optim.lr']
  >>> resume_mismatches({"data": {"name": ""}}, {"data": {"train_split": "test"}})
  ['data.train_split']
  """
  defaults = to_dict(default_config())
  missing = object()

  def value(d: Mapping, key: str):
    v = _get(d, key, missing)
    return _get(defaults, key) if v is missing else with_defaults(v, key, defaults)

  return [path for k in RESUME_KEYS for path in differing_keys(value(stored, k), value(current, k), k)]


def with_defaults(value, key: str = "", defaults: Mapping | None = None):
  """``value``, the config dict or its section at dotted ``key``, with the keys it lacks at their defaults.

  A config (or checkpoint fingerprint) written before a key existed, at any
  depth, describes a run that behaved as the default does.  Free-form sections
  (:data:`FREE_FORM`) hold values, not keys, and stay as they are.

  >>> with_defaults({"lr": 0.5}, "optim")["unfreeze_warmup_steps"]
  0
  >>> with_defaults({"kwargs": {}}, "optim")["kwargs"]
  {}
  """
  defaults = to_dict(default_config()) if defaults is None else defaults
  default = _get(defaults, key) if key else defaults
  if not (isinstance(value, Mapping) and isinstance(default, Mapping)) or key in FREE_FORM:
    return value
  out = dict(value)
  for k, d in default.items():
    out[k] = with_defaults(value[k], f"{key}.{k}" if key else k, defaults) if k in value else d
  return out


def differing_keys(a, b, prefix: str) -> list[str]:
  """Dotted paths below ``prefix`` where two (nested dict) values differ; ``[prefix]`` for leaves.

  >>> differing_keys({"lr": 1, "schedule": {"name": "cosine"}}, {"lr": 1, "schedule": {"name": "linear"}}, "optim")
  ['optim.schedule.name']
  """
  if isinstance(a, Mapping) and isinstance(b, Mapping):
    return [path for k in sorted(set(a) | set(b), key=str)
            for path in differing_keys(a.get(k), b.get(k), f"{prefix}.{k}")]
  return [] if a == b else [prefix]


def validate(config) -> None:
  """Checks the config's values before anything is read or compiled."""
  t = config.train
  if t.total_steps <= 0:
    raise ConfigError("train.total_steps must be positive", where="train.total_steps", value=t.total_steps)
  if t.total_steps >= 2**31:  # the step counter is int32 on the device
    raise ConfigError("train.total_steps is too large", where="train.total_steps", value=t.total_steps,
                      hint=f"at most {2**31 - 1:,} (the step counter is int32)")
  for key in ("batch_size", "eval_batch_size"):
    if t[key] <= 0:
      raise ConfigError(f"train.{key} must be positive", where=f"train.{key}", value=t[key])
  for key in ("eval_every", "log_every", "checkpoint_every", "early_stopping_patience"):
    if t[key] < 0:
      raise ConfigError(f"train.{key} must be >= 0", where=f"train.{key}", value=t[key])
  if t.log_every == 0:
    raise ConfigError("train.log_every must be positive", where="train.log_every", value=0)
  choices = {"on_nan": ("stop", "skip"), "parallel": ("jit", "pmap"), "best_mode": ("max", "min"),
             "freeze_bn": ("auto", "yes", "no")}
  for key, allowed in choices.items():
    if t[key] not in allowed:
      raise ConfigError(f"train.{key} must be one of {allowed}", where=f"train.{key}", value=repr(t[key]))
  if config.model.dtype not in ("float32", "bfloat16", "float16"):
    raise ConfigError("model.dtype must be float32, bfloat16 or float16", where="model.dtype",
                      value=repr(config.model.dtype))
  if config.model.num_classes is not None and config.model.num_classes <= 0:
    raise ConfigError("model.num_classes must be positive", where="model.num_classes",
                      value=config.model.num_classes)
  if not 0 <= t.ema_decay < 1:  # this form refuses NaN too (NaN passed `if ema_decay:`)
    raise ConfigError("train.ema_decay must be in [0, 1)", where="train.ema_decay", value=t.ema_decay)
  if not 0 <= config.seed < 2**63:
    # The loader refused a negative seed, but only after the workdir was written; jax takes an int64.
    raise ConfigError("seed must be in [0, 2**63)", where="seed", value=config.seed)
  if config.data.seed != 0:
    # data.seed is train_iterator's default for research code; a trainer's run would
    # silently ignore it.
    raise ConfigError("data.seed is not read by the trainer", where="data.seed", value=config.data.seed,
                      hint="the top-level seed orders and augments the data: set --config.seed")
  if not 0 <= t.label_smoothing < 1:
    raise ConfigError("train.label_smoothing must be in [0, 1)", where="train.label_smoothing",
                      value=t.label_smoothing)


# Sections whose keys are not ftjax's: optax checks optim.kwargs, the model family model.arch.
FREE_FORM = ("optim.kwargs", "model.arch")


def _type_fits(value, kind, default) -> bool:
  if value is None:
    return default is None  # placeholders only
  if kind is bool:
    return isinstance(value, bool)
  if kind is int:
    return isinstance(value, int) and not isinstance(value, bool)
  if kind is float:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
  if kind is str:
    return isinstance(value, str)
  if kind in (list, tuple):
    return isinstance(value, (list, tuple))
  if kind is mc.ConfigDict:
    return hasattr(value, "keys")
  return True


def schema_problems(config, schema=None, prefix: str = "") -> list[tuple[str, str, str | None]]:
  """``(key, problem, hint)`` for each key that ftjax's schema lacks, misses or types otherwise.

  ``schema`` defaults to :func:`default_config`.  A config built from that
  (locked) schema cannot go wrong; one built by hand can, and would otherwise
  fail deep in the run or, worse, be ignored.

  >>> d = to_dict(default_config())
  >>> schema_problems(mc.ConfigDict(d))
  []
  >>> d["train"]["batch_sizee"], d["train"]["total_steps"] = 8, "10"
  >>> for problem in schema_problems(mc.ConfigDict(d)):
  ...   print(problem)
  ('train.batch_sizee', 'unknown config key', 'did you mean train.batch_size?')
  ('train.total_steps', 'wrong type', "expected int, got str '10'")
  """
  schema = default_config() if schema is None else schema
  if not hasattr(config, "keys"):
    return [(prefix.rstrip(".") or "config", "expected a section", f"got {type(config).__name__}")]
  have, want = set(config.keys()), set(schema.keys())
  out = []
  for key in sorted(have - want):
    near = difflib.get_close_matches(key, sorted(want), n=1)
    out.append((prefix + key, "unknown config key", f"did you mean {prefix}{near[0]}?" if near else None))
  for key in sorted(want - have):
    out.append((prefix + key, "missing config key", "start config files from ftjax.config.default_config()"))
  for key in sorted(have & want):
    name, value, default = prefix + key, config[key], schema[key]
    if isinstance(default, mc.ConfigDict) and name not in FREE_FORM:
      out.extend(schema_problems(value, default, name + "."))
      continue
    kind = schema.get_type(key)
    if not _type_fits(value, kind, default):
      out.append((name, "wrong type", f"expected {kind.__name__}, got {type(value).__name__} {value!r}"[:160]))
  return out


def best_metric_key(best_metric: str, eval_splits) -> str:
  """``train.best_metric`` as ``<split>/<metric>``: a bare metric is the first eval split's.

  >>> best_metric_key("top1", ["val"]), best_metric_key("test/loss", ["val"]), best_metric_key("top1", [])
  ('val/top1', 'test/loss', 'top1')
  """
  if "/" in best_metric or not eval_splits:
    return best_metric
  return f"{eval_splits[0]}/{best_metric}"


def check_schema(config) -> None:
  """Raises a ConfigError naming the first of :func:`schema_problems` (and how many more)."""
  problems = schema_problems(config)
  if problems:
    key, what, hint = problems[0]
    more = f" (+{len(problems) - 1} more)" if len(problems) > 1 else ""
    raise ConfigError(what, where=key, value=f"{len(problems)} problem(s){more}" if more else None,
                      hint=hint)
