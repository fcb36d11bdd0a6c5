"""What the fault tests share: launching the real CLI, reading a workdir back, hashing a state."""

import json
import subprocess
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(TESTS))
from conftest import REPO, launch_cmd, state_sha, subprocess_env, tiny_config, write_config  # noqa: E402,F401

from ftjax import checkpoint  # noqa: E402
from ftjax.tree import flatten  # noqa: E402


def cached_env(cache_dir, **extra) -> dict:
  """Subprocess env sharing one persistent compilation cache: a restart compiles nothing again."""
  return subprocess_env(JAX_COMPILATION_CACHE_DIR=str(cache_dir),
                        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                        JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0", **extra)


def launch(config_file: str, workdir, env: dict, *args: str, timeout: float = 180):
  return subprocess.run(launch_cmd(config_file, str(workdir), *args), capture_output=True, text=True,
                        timeout=timeout, env=env)




def rows(workdir) -> list[dict]:
  path = Path(workdir) / "metrics.jsonl"
  return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def listing(root) -> list[str]:
  """Every path under ``root`` (relative), with file sizes: a fingerprint of what a run wrote."""
  root = Path(root)
  return sorted(f"{p.relative_to(root)}:{p.stat().st_size if p.is_file() else 'dir'}"
                for p in root.rglob("*"))
