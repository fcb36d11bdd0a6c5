"""Recipe configs: every file loads strictly, and the vit_jax recipe is reproduced key by key.

Also ftjax.config's resume rule: which changed keys make a workdir another experiment.
"""

import copy
import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest

from ftjax import config as config_lib
from ftjax import train
from ftjax.checkpoint import Checkpointer
from ftjax.data import transforms
from ftjax.errors import ConfigError

sys.path.insert(0, str(Path(__file__).parent))
from conftest import tiny_config  # noqa: E402

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def get_config(name: str, arg: str = ""):
  spec = importlib.util.spec_from_file_location(name, CONFIGS / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


@pytest.mark.parametrize("name", sorted(p.stem for p in CONFIGS.glob("*.py")))
def test_every_config_loads_locked_with_its_command_in_the_docstring(name):
  config = get_config(name)
  with pytest.raises(AttributeError):
    config.train.no_such_key = 1  # locked: a typo cannot add a key
  spec = importlib.util.spec_from_file_location(name, CONFIGS / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  assert "python launch.py" in module.__doc__ and "Expected" in module.__doc__


def test_vit_b16_cifar10_is_the_vit_jax_recipe():
  c = get_config("vit_b16_cifar10")
  assert c.model.source.startswith("npz:B/16@") and c.model.source.endswith("imagenet21k/ViT-B_16.npz")
  assert c.data.source == "tfds" and c.data.name == "cifar10" and c.data.image_size == 384
  assert c.train.total_steps == 10_000 and c.train.batch_size == 512
  assert c.optim.name == "sgd" and dict(c.optim.kwargs) == {"momentum": 0.9}
  assert c.optim.lr == 0.01 and c.optim.schedule.name == "warmup_cosine"
  assert c.optim.schedule.warmup_steps == 500 and c.optim.grad_clip_norm == 1.0
  assert c.optim.weight_decay == 0.0 and c.model.dropout_rate == 0.0
  assert list(c.optim.param_groups) == [(".*", {})]  # everything trains; the new head starts at zero
  # input_pipeline.py: area_range (0.05, 1) crop and flip; eval resizes the whole image.
  assert c.data.augment.random_resized_crop and tuple(c.data.augment.scale) == (0.05, 1.0)
  assert c.data.resize == "squash" and c.data.crop_fraction == 1.0
  short = get_config("vit_b16_cifar10", "steps=500")
  assert short.train.total_steps == 500 and short.optim.schedule.warmup_steps == 50
  # The README's 1,000-step runs warmed up 100 steps (this gave 500, half the run).
  assert get_config("vit_b16_cifar10", "steps=1000").optim.schedule.warmup_steps == 100
  c100 = get_config("vit_b16_cifar10", "dataset=cifar100")
  assert c100.data.name == "cifar100" and c100.optim.lr == 0.03
  for name in ("vit_b16_cifar10", "bit_r50x1_cifar10"):  # a rule written out for CIFAR only
    with pytest.raises(ConfigError, match=r"\(:dataset\): 'oxford_iiit_pet'"):
      get_config(name, "dataset=oxford_iiit_pet")


def test_config_arguments_are_strict():
  with pytest.raises(ConfigError, match="unknown config argument"):
    get_config("vit_b16_cifar10", "stepz=5")
  with pytest.raises(ConfigError, match="bad config argument value"):
    get_config("vit_b16_cifar10", "steps=many")


def test_head_only_config_freezes_everything_but_the_head():
  c = get_config("vit_head_only")
  assert list(c.optim.param_groups) == [("head/.*", {}), (".*", None)]


def test_bit_config_is_the_hyperrule():
  c = get_config("bit_r50x1_cifar10")
  assert c.optim.name == "sgd" and c.optim.lr == 0.003 and c.train.batch_size == 512
  assert c.data.mixup_alpha == 0.1 and list(c.optim.schedule.boundaries) == [3000, 6000, 9000]
  # CIFAR: resize to 160 px, random 128 px crop, flip; eval resizes the whole image to 128 px.
  train = transforms.Preprocess.from_config(c.data, c.data.image_size, train=True)
  box = transforms.inception_box(np.random.default_rng(0), 32, 32, train.scale, train.ratio)
  assert box[2] - box[0] == box[3] - box[1] == round(32 * 128 / 160)
  assert train.flip and c.data.resize == "squash" and c.data.crop_fraction == 1.0


# (dotted key, a changed value, the resume key that names it)
DATA_CHANGES = [
    ("data.train_split", "test"),
    ("data.split_seed", 1),
    ("data.path", "/other.npz"),
    ("data.data_dir", "/other/tfds"),
    ("data.image_key", "image_left"),
    ("data.label_key", "coarse_label"),
    ("data.val_root", "/other/val"),
    ("data.val_fraction", 0.2),
    ("data.verify_images", False),
    ("data.resize", "squash"),
    ("data.crop_fraction", 1.0),
    ("data.augment.flip", False),
    ("data.augment.scale", (0.5, 1.0)),
    ("data.augment.randaugment_num_ops", 2),
    ("data.mixup_alpha", 0.2),
    ("data.cutmix_alpha", 1.0),
    ("data.mix_switch_prob", 0.25),
    # the loss and the regularisers, as much the experiment as mixup (they were not checked)
    ("train.label_smoothing", 0.1),
    ("train.ema_decay", 0.999),
    ("train.freeze_bn", "no"),
    ("model.dropout_rate", 0.1),
    ("model.droppath_rate", 0.1),
    ("model.bn_momentum", 0.9),
    ("model.lora_alpha", 16.0),
    ("model.lora_targets", (".*/kernel",)),
    ("model.arch.layer_norm_eps", 1e-5),  # an entry of a free-form section, named as such
    ("model.dtype", "bfloat16"),  # the compute dtype is the arithmetic of every step
]


def _with(d: dict, dotted: str, value) -> dict:
  d = copy.deepcopy(d)
  *parents, last = dotted.split(".")
  node = d
  for part in parents:
    node = node[part]
  node[last] = list(value) if isinstance(value, tuple) else value  # as config.json holds it
  return d


def test_resuming_with_other_data_or_augmentation_is_another_experiment():
  stored = config_lib.to_dict(config_lib.default_config())
  for key, value in DATA_CHANGES:  # each named down to the key that changed
    assert config_lib.resume_mismatches(stored, _with(stored, key, value)) == [key], key
  # Speed, failure handling, the splits reported and the unused data.seed are not the experiment.
  for key, value in [("data.num_workers", 4), ("data.prefetch", 8), ("data.on_corrupt", "error"),
                     ("data.eval_splits", ["val"]), ("data.seed", 7), ("train.total_steps", 5000)]:
    assert config_lib.resume_mismatches(stored, _with(stored, key, value)) == [], key


def test_a_stored_config_that_predates_a_key_holds_its_default():
  old = config_lib.to_dict(config_lib.default_config())
  del old["data"]["split_seed"], old["data"]["augment"]
  now = config_lib.to_dict(config_lib.default_config())
  assert config_lib.resume_mismatches(old, now) == []
  assert config_lib.resume_mismatches(old, _with(now, "data.split_seed", 1)) == ["data.split_seed"]
  assert config_lib.resume_mismatches(old, _with(now, "data.augment.flip", False)) == ["data.augment.flip"]
  # A key added inside a section (optim) holds its default too; a change of it is refused.
  del old["optim"]["unfreeze_warmup_steps"]
  assert config_lib.resume_mismatches(old, now) == []
  assert config_lib.resume_mismatches(old, _with(now, "optim.unfreeze_warmup_steps", 50)) == [
      "optim.unfreeze_warmup_steps"]
  assert config_lib.resume_mismatches(now, _with(now, "optim.unfreeze_warmup_steps", 50)) == [
      "optim.unfreeze_warmup_steps"]
  # ... while a free-form section's entries are values: dropping one is a change.
  assert config_lib.resume_mismatches(now, _with(now, "optim.kwargs", {})) == ["optim.kwargs.momentum"]


def test_a_workdir_recorded_before_a_key_existed_loads_with_its_default(tmp_path):
  old = config_lib.to_dict(config_lib.default_config())
  old["optim"]["lr"] = 0.5
  del old["optim"]["unfreeze_warmup_steps"]
  (tmp_path / "config.json").write_text(json.dumps(old))
  config = train.stored_config(tmp_path)
  assert config.optim.lr == 0.5 and config.optim.unfreeze_warmup_steps == 0


def test_a_workdir_trained_on_one_split_refuses_another(tmp_path):
  npz = str(tmp_path / "never_read.npz")  # refused before any weight or data is read
  wd = tmp_path / "wd"
  (wd / "checkpoints" / "1").mkdir(parents=True)  # a run with a checkpoint (never read either)
  (wd / "config.json").write_text(json.dumps(config_lib.to_dict(tiny_config(npz))))
  with pytest.raises(ConfigError) as err:
    train.train_and_evaluate(tiny_config(npz, **{"data.train_split": "test"}), str(wd))
  assert str(err.value) == (f"ftjax: error: workdir holds a run with another config ({wd}/config.json): "
                            "data.train_split 'train' -> 'test'; use a new --workdir, or the stored config")


# The checkpoint fingerprint's keys before the data keys joined RESUME_KEYS.
_FINGERPRINT_BEFORE = ("seed", "model.source", "model.num_classes", "data.image_size", "model.scratch",
                       "model.dont_load", "model.lora_rank", "data.source", "data.name", "data.root",
                       "data.train_root", "data.per_class", "train.batch_size", "optim")


def test_checkpoints_fingerprinted_before_the_data_keys_still_resume(tmp_path):
  state = {"params": {"w": np.arange(4, dtype=np.float32)}, "step": np.int32(3)}
  stored = config_lib.to_dict(config_lib.default_config())
  # What ftjax.train gives the Checkpointer: the RESUME_KEYS of the run's config.
  fingerprint = lambda keys, d: {k: config_lib._get(d, k) for k in keys}
  with Checkpointer(tmp_path / "old", async_save=False,
                    fingerprint=fingerprint(_FINGERPRINT_BEFORE, stored)) as c:
    c.save(3, state)
  now = Checkpointer(tmp_path / "old", fingerprint=fingerprint(config_lib.RESUME_KEYS, stored))
  assert now.restore_latest(state)[0] == 3
  # One written before optim.unfreeze_warmup_steps existed ran with its default, 0.
  older = copy.deepcopy(stored)
  del older["optim"]["unfreeze_warmup_steps"]
  with Checkpointer(tmp_path / "older", async_save=False,
                    fingerprint=fingerprint(config_lib.RESUME_KEYS, older)) as c:
    c.save(3, state)
  assert Checkpointer(tmp_path / "older", fingerprint=fingerprint(config_lib.RESUME_KEYS, stored)
                      ).restore_latest(state)[0] == 3
  warm = fingerprint(config_lib.RESUME_KEYS, _with(stored, "optim.unfreeze_warmup_steps", 50))
  with pytest.raises(ConfigError, match=r"config differs from the checkpointed run "
                                        r"\(optim.unfreeze_warmup_steps\): 0 in step 3, now 50"):
    Checkpointer(tmp_path / "older", fingerprint=warm).restore_latest(state)
  # A checkpoint that records the data keys refuses a change of them.
  with Checkpointer(tmp_path / "new", async_save=False,
                    fingerprint=fingerprint(config_lib.RESUME_KEYS, stored)) as c:
    c.save(3, state)
  other = fingerprint(config_lib.RESUME_KEYS, _with(stored, "data.train_split", "test"))
  with pytest.raises(ConfigError, match=r"config differs from the checkpointed run \(data.train_split\): "
                                        r"'train' in step 3, now 'test'"):
    Checkpointer(tmp_path / "new", fingerprint=other).restore_latest(state)


def test_default_config_scales_its_unfreezing_and_refuses_arguments_its_variant_ignores():
  # every: a tenth of the steps (20 for the recipe's 200), so a short run unfreezes inside it.
  assert [s for s, _ in get_config("default").optim.unfreeze] == [20, 40]
  assert [s for s, _ in get_config("default", "steps=30").optim.unfreeze] == [3, 6]
  assert get_config("default", "variant=layer_decay,decay=0.5").optim.layer_decay == 0.5
  with pytest.raises(ConfigError, match=r"config argument unused by this variant \(:decay=0.5\): 'full'"):
    get_config("default", "variant=full,decay=0.5")
  with pytest.raises(ConfigError, match=r"unknown variant \(:variant\): 'ful'"):
    get_config("default", "variant=ful")


def test_a_data_seed_the_trainer_would_ignore_is_refused():
  # The trainer seeds the data with the top-level seed; a data.seed set on the command line
  # once changed nothing and said nothing.
  c = config_lib.default_config()
  config_lib.validate(c)
  c.data.seed = 7
  with pytest.raises(ConfigError) as e:
    config_lib.validate(c)
  assert str(e.value) == ("ftjax: error: data.seed is not read by the trainer (data.seed): 7; the "
                          "top-level seed orders and augments the data: set --config.seed")
  assert e.value.exit_code == 2


@pytest.mark.parametrize("key,value,expected", [
    # NaN passed `if ema_decay:` and crashed at compile time.
    ("train.ema_decay", float("nan"), r"train.ema_decay must be in \[0, 1\) \(train.ema_decay\): nan$"),
    ("train.ema_decay", 1.0, r"train.ema_decay must be in \[0, 1\) \(train.ema_decay\): 1.0$"),
    # The int32 step counter overflowed with a traceback.
    ("train.total_steps", 2**31, r"train.total_steps is too large \(train.total_steps\): 2147483648; "
     r"at most 2,147,483,647 \(the step counter is int32\)$"),
    # The loader refused a negative seed, after the workdir was written; jax's key overflowed on 2**63.
    ("seed", -1, r"seed must be in \[0, 2\*\*63\) \(seed\): -1$"),
    ("seed", 2**63, r"seed must be in \[0, 2\*\*63\) \(seed\): 9223372036854775808$"),
])
def test_validate_refuses_out_of_range_values(key, value, expected):
  c = config_lib.default_config()
  *section, name = key.split(".")
  (c[section[0]] if section else c)[name] = value
  with pytest.raises(ConfigError, match=expected):
    config_lib.validate(c)
