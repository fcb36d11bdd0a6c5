"""Recipe configs: every file loads strictly, and the vit_jax recipe is reproduced key by key."""

import importlib.util
from pathlib import Path

import pytest

from ftjax.errors import ConfigError

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
  short = get_config("vit_b16_cifar10", "steps=500")
  assert short.train.total_steps == 500 and short.optim.schedule.warmup_steps == 50
  c100 = get_config("vit_b16_cifar10", "dataset=cifar100")
  assert c100.data.name == "cifar100" and c100.optim.lr == 0.03


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
