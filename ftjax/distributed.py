"""Several hosts: joining the JAX cluster, and reading replicated values back on each host.

``initialize()`` wraps ``jax.distributed.initialize``: on SLURM, Cloud TPU and the
other clusters JAX detects, nothing is needed; elsewhere (and on CPU) set
``JAX_COORDINATOR_ADDRESS=host:port``, ``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID``
on every process.  CPU processes talk through gloo collectives.
"""

from __future__ import annotations

import os

import jax
import numpy as np

from ftjax.errors import ConfigError


def initialize() -> None:
  """Joins this process to the cluster (once); the arguments come from the environment."""
  if jax.distributed.is_initialized():
    return
  kwargs = {}
  for env, key in (("JAX_NUM_PROCESSES", "num_processes"), ("JAX_PROCESS_ID", "process_id")):
    if os.environ.get(env):
      try:
        kwargs[key] = int(os.environ[env])
      except ValueError:
        raise ConfigError(f"{env} must be an integer", where=env, value=os.environ[env]) from None
  try:
    jax.distributed.initialize(**kwargs)
  except (ValueError, RuntimeError) as e:
    raise ConfigError("cannot join the JAX cluster", where="train.distributed",
                      value=" ".join(str(e).split())[:200],
                      hint="set JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID") from None


def host_value(x):
  """A replicated (or fully addressable) array as numpy on this host, without a collective.

  ``jax.device_get`` refuses arrays that span other processes' devices; a
  replicated array holds the whole value on each of this host's devices.
  """
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    if not x.sharding.is_fully_replicated:
      raise ValueError("host_value needs a replicated array; this one is sharded across hosts")
    return np.asarray(x.addressable_data(0))
  return jax.device_get(x)


def host_tree(tree):
  """:func:`host_value` over a pytree."""
  return jax.tree.map(host_value, tree)
