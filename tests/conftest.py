"""Shared fixtures: a tiny ViT checkpoint in Google's .npz layout and a config that trains it on digits."""

import os
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def tiny_vit_npz(tmp_path_factory) -> str:
  """A random ViT 'test' variant saved with vit_jax's key names (what npz:test@file reads)."""
  from ftjax import models
  from ftjax.tree import flatten

  model, _ = models.create("vit", {"variant": "test"}, num_classes=10, image_size=32)
  variables = models.init_variables(model, 32, seed=3)
  flat = {k.removeprefix("params/"): np.asarray(v) for k, v in flatten(variables).items()}
  rng = np.random.default_rng(0)
  flat["head/kernel"] = rng.normal(0, 0.02, flat["head/kernel"].shape).astype(np.float32)
  path = tmp_path_factory.mktemp("ckpt") / "vit_test.npz"
  np.savez(path, **flat)
  return str(path)


def tiny_config(npz: str, **overrides):
  """A locked config training the tiny ViT on sklearn digits at 32 px; overrides by dotted key."""
  from ftjax.config import default_config

  c = default_config()
  c.model.source = f"npz:test@{npz}"
  c.data.source = "digits"
  c.data.image_size = 32
  c.data.augment.random_resized_crop = False
  c.data.augment.flip = False
  c.train.total_steps = 6
  c.train.batch_size = 16
  c.train.eval_batch_size = 64
  c.train.eval_every = 3
  c.train.log_every = 1
  c.train.checkpoint_every = 3
  c.train.async_checkpoint = False
  c.train.plots = False
  c.train.tensorboard = False
  c.optim.name = "adamw"
  c.optim.kwargs = {}
  c.optim.lr = 1e-3
  c.optim.weight_decay = 1e-4
  for key, value in overrides.items():
    node = c
    *parents, last = key.split(".")
    for p in parents:
      node = node[p]
    node[last] = value
  return c


def sgd_step_setup(npz: str, num_batches: int):
  """The tiny ViT's train step with SGD + momentum, for the parallel-equivalence scripts.

  Returns ``(params, tx, fn, batches)``: ``fn(state, batch, opts)`` is
  ``train.train_step`` bound to the model; ``batches`` are ``num_batches`` random
  global batches of 16.  SGD with momentum (the vit_jax recipe), not Adam: Adam's
  normalisation would amplify the float reduction-order noise of different shardings
  in leaves with ~0 gradients.
  """
  from ftjax import models, optim, train

  cfg = tiny_config(npz, **{"optim.name": "sgd", "optim.kwargs": {"momentum": 0.9}, "optim.lr": 0.1})
  model, variables, _ = models.from_pretrained(cfg.model.source, num_classes=10, image_size=32)
  params = variables["params"]
  tx = optim.make_optimizer(params, cfg.optim, family="vit", total_steps=6)
  trainable = train.trainable_paths(optim.trainable_mask(params, cfg.optim))
  fn = lambda state, batch, opts: train.train_step(state, batch, model=model, tx=tx,
                                                   trainable=trainable, opts=opts)
  rng = np.random.default_rng(0)
  batches = [{"image": rng.normal(size=(16, 32, 32, 3)).astype(np.float32),
              "label": rng.integers(0, 10, 16).astype(np.int32)} for _ in range(num_batches)]
  return params, tx, fn, batches


CONFIG_TEMPLATE = '''
import sys
sys.path.insert(0, {tests!r})
from conftest import tiny_config

def get_config(arg=""):
  return tiny_config({npz!r}, **{overrides!r})
'''


def write_config(tmp_path, npz: str, name: str = "cfg.py", **overrides) -> str:
  """A config file for launch.py that builds :func:`tiny_config`."""
  path = Path(tmp_path) / name
  path.write_text(CONFIG_TEMPLATE.format(tests=str(REPO / "tests"), npz=npz, overrides=overrides))
  return str(path)


def launch_cmd(config: str, workdir: str, *extra: str) -> list[str]:
  return [sys.executable, str(REPO / "launch.py"), f"--config={config}", f"--workdir={workdir}", *extra]


def state_sha(workdir) -> str:
  """sha256 over the params and optimizer state of a run's newest verified checkpoint."""
  import hashlib
  from ftjax import checkpoint
  from ftjax.tree import flatten
  tree, _ = checkpoint.read_checkpoint(Path(workdir) / "checkpoints")
  flat = flatten(tree)
  h = hashlib.sha256()
  for k in sorted(flat):
    if k.startswith(("params/", "opt_state/")):
      h.update(k.encode())
      h.update(np.ascontiguousarray(flat[k]).tobytes())
  return h.hexdigest()


def subprocess_env(**extra) -> dict:
  env = dict(os.environ)
  env.pop("FTJAX_TRACEBACK", None)
  env.update(extra)
  return env
