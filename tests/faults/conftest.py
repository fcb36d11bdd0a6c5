"""The fault suite's shared compilation cache: its many restarts compile the tiny model once."""

import pytest


@pytest.fixture(scope="session")
def jax_cache(tmp_path_factory):
  """A persistent JAX compilation cache directory for the suite's subprocesses (see ``cached_env``)."""
  return tmp_path_factory.mktemp("jax_cache")
