"""Files from strangers: payloads never run, hostile headers allocate and read nothing, workdirs run no code.

Each hostile file goes through the public entry points (``from_pretrained`` and
the trainer), not the readers alone (tests/test_weights.py covers those).  A
payload, if it ran, would create a marker file; no test may find one.
"""

import ast
import json
import os
import struct
import subprocess
import sys
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from _harness import REPO, cached_env, checkpoint, rows, tiny_config  # noqa: E402

from ftjax import models, train  # noqa: E402
from ftjax.errors import CheckpointError, FtjaxError  # noqa: E402

pytestmark = pytest.mark.faults
torch = pytest.importorskip("torch")


class Payload:
  """Unpickling this runs ``touch <marker>``."""

  def __init__(self, marker: Path):
    self.marker = str(marker)

  def __reduce__(self):
    return (os.system, (f"touch {self.marker}",))


def _safetensors(path: Path, header: dict, data: bytes = b"") -> Path:
  raw = json.dumps(header).encode()
  path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
  return path


def _hf_dir(tmp: Path, header: dict, data: bytes = b"") -> str:
  d = tmp / "hf"
  d.mkdir()
  (d / "config.json").write_text(json.dumps({"model_type": "vit", "hidden_size": 32, "num_hidden_layers": 1,
                                             "num_attention_heads": 2, "intermediate_size": 64,
                                             "image_size": 32, "patch_size": 8}))
  _safetensors(d / "model.safetensors", header, data)
  return f"hf:{d}"


# (name, make(tmp, marker) -> source, the start of the expected line)
HOSTILE = [
    ("npz object array with a payload",
     lambda tmp, m: (np.savez(tmp / "evil.npz", cls=np.array([Payload(m)], dtype=object)),
                     f"npz:test@{tmp}/evil.npz")[1],
     "ftjax: error: refused .npz holding pickled objects ({tmp}/evil.npz)"),
    ("torch pickle with a payload",
     lambda tmp, m: (torch.save({"fc.weight": Payload(m)}, tmp / "evil.pth"),
                     f"torchvision:resnet18@{tmp}/evil.pth")[1],
     "ftjax: error: refused PyTorch file: it holds objects other than tensors ({tmp}/evil.pth)"),
    ("legacy torch pickle with a payload",  # the pre-zip format, where bypasses were found
     lambda tmp, m: (torch.save({"w": Payload(m)}, tmp / "legacy.pth", _use_new_zipfile_serialization=False),
                     f"efficientnet:lite0@{tmp}/legacy.pth")[1],
     "ftjax: error: refused PyTorch file: it holds objects other than tensors ({tmp}/legacy.pth)"),
    ("safetensors claiming 2^82 bytes",
     lambda tmp, m: "timm:vit_tiny_patch16_224@" + str(_safetensors(tmp / "absurd.safetensors", {
         "cls_token": {"dtype": "F32", "shape": [2**40, 2**40], "data_offsets": [0, 16]}}, b"\0" * 16)),
     "ftjax: error: safetensors entry size disagrees with its shape ({tmp}/absurd.safetensors:cls_token)"),
    ("safetensors offsets past the end",
     lambda tmp, m: "timm:vit_tiny_patch16_224@" + str(_safetensors(tmp / "far.safetensors", {
         "cls_token": {"dtype": "F32", "shape": [2**28], "data_offsets": [0, 2**30]}}, b"\0" * 16)),
     "ftjax: error: truncated safetensors file ({tmp}/far.safetensors:cls_token)"),
    ("safetensors header length of 2^62",
     lambda tmp, m: "timm:vit_tiny_patch16_224@" + str(
         (tmp / "long.safetensors").write_bytes(struct.pack("<Q", 2**62) + b"{}") and tmp / "long.safetensors"),
     "ftjax: error: invalid safetensors header length ({tmp}/long.safetensors)"),
    ("Hugging Face folder with a hostile safetensors",
     lambda tmp, m: _hf_dir(tmp, {"w": {"dtype": "F32", "shape": [-1, 4], "data_offsets": [0, 16]}},
                            b"\0" * 16),
     "ftjax: error: negative dimension in safetensors entry ({tmp}/hf/model.safetensors:w)"),
]


@pytest.mark.parametrize("name,make,expected", HOSTILE, ids=[h[0] for h in HOSTILE])
def test_hostile_weight_file_is_refused_and_runs_nothing(tmp_path, name, make, expected):
  marker = tmp_path / "PAYLOAD_RAN"
  source = make(tmp_path, marker)
  tracemalloc.start()
  try:
    with pytest.raises(CheckpointError) as info:
      models.from_pretrained(source, num_classes=10, image_size=32)
    _, peak = tracemalloc.get_traced_memory()
  finally:
    tracemalloc.stop()
  assert str(info.value).startswith(expected.format(tmp=tmp_path)), str(info.value)
  assert info.value.exit_code == 3
  assert not marker.exists()
  assert peak < 64 << 20  # nothing near a claimed size was allocated


def test_trainer_refuses_a_payload_checkpoint_before_writing(tiny_vit_npz, tmp_path):
  marker = tmp_path / "PAYLOAD_RAN"
  np.savez(tmp_path / "evil.npz", cls=np.array([Payload(marker)], dtype=object))
  cfg = tiny_config(tiny_vit_npz, **{"model.source": f"npz:test@{tmp_path}/evil.npz"})
  with pytest.raises(FtjaxError) as info:
    train.train_and_evaluate(cfg, str(tmp_path / "wd"))
  assert info.value.exit_code == 3 and "refused .npz holding pickled objects" in str(info.value)
  assert not marker.exists() and not (tmp_path / "wd").exists()


def test_torch_release_with_known_bypasses_is_refused(tmp_path, monkeypatch):
  marker = tmp_path / "PAYLOAD_RAN"
  torch.save({"fc.weight": torch.zeros(2)}, tmp_path / "plain.pth")
  monkeypatch.setattr(torch, "__version__", "2.5.1")
  with pytest.raises(CheckpointError, match="known weights_only bypasses"):
    models.from_pretrained(f"torchvision:resnet18@{tmp_path}/plain.pth", num_classes=10)
  assert not marker.exists()


PLANTED = '''
import pathlib
pathlib.Path({marker!r}).write_text("ran")
from ftjax.config import default_config
def get_config(arg=""):
  pathlib.Path({marker!r}).write_text("ran")
  return default_config()
'''


@pytest.mark.slow  # 20 s or more on 2 slow cores; CI runs it (-m slow)
def test_resume_by_workdir_uses_stored_json_never_a_planted_config_py(tiny_vit_npz, tmp_path,
                                                                      jax_cache):
  wd = tmp_path / "wd"
  # A workdir as a run leaves it before its first step: checked, created, config.json stored.
  run, _ = train.prepare(tiny_config(tiny_vit_npz, **{"train.total_steps": 2, "train.eval_every": 0}), str(wd))
  train.record_config(run)
  marker = tmp_path / "PLANTED_RAN"
  for name in ("config.py", "cfg.py", "configs/default.py"):
    (wd / name).parent.mkdir(exist_ok=True)
    (wd / name).write_text(PLANTED.format(marker=str(marker)))
  # In the workdir, no --config: the run's own config.json is the config.
  r = subprocess.run([sys.executable, str(REPO / "launch.py"), f"--workdir={wd}"], cwd=wd,
                     capture_output=True, text=True, timeout=180, env=cached_env(jax_cache))
  assert r.returncode == 0, r.stderr[-3000:]
  assert not marker.exists()
  assert [row["step"] for row in rows(wd) if row["kind"] == "train"] == [1, 2]  # the stored total_steps
  _, extra = checkpoint.read_checkpoint(wd / "checkpoints")
  assert extra["model"]["family"] == "vit" and extra["data_step"] == 2


# ------------------------------------------------------------------ no code path that unpickles or evaluates

def unsafe_calls(source: str) -> list[str]:
  """Calls that may run code hidden in data: ``(line: call)`` for each one in ``source``."""
  found = []
  for node in ast.walk(ast.parse(source)):
    if not isinstance(node, ast.Call):
      continue
    f = node.func
    name = ast.unparse(f)
    kw = {k.arg: k.value for k in node.keywords}
    const = lambda key, value: isinstance(kw.get(key), ast.Constant) and kw[key].value is value
    bad = (
        (isinstance(f, ast.Name) and f.id in ("eval", "exec", "__import__"))
        or name in ("pickle.load", "pickle.loads", "pickle.Unpickler", "cPickle.load", "marshal.load",
                    "marshal.loads", "dill.load", "joblib.load", "shelve.open", "yaml.load")
        or (name in ("np.load", "numpy.load") and not const("allow_pickle", False))
        or (name == "torch.load" and not const("weights_only", True)))
    if bad:
      found.append(f"{node.lineno}: {name}")
  return found


def test_unsafe_call_finder_finds_each_kind():
  snippet = "\n".join(["import pickle, numpy as np, torch", "pickle.load(f)", "pickle.loads(b)",
                       "np.load(p)", "np.load(p, allow_pickle=True)", "np.load(p, allow_pickle=False)",
                       "torch.load(p)", "torch.load(p, weights_only=False)",
                       "torch.load(p, weights_only=True)", "eval('1')", "exec('x=1')", "model.eval()"])
  assert unsafe_calls(snippet) == ["2: pickle.load", "3: pickle.loads", "4: np.load", "5: np.load",
                                   "7: torch.load", "8: torch.load", "10: eval", "11: exec"]


def test_package_has_no_unsafe_load_eval_or_exec():
  found = {}
  for path in sorted((REPO / "ftjax").rglob("*.py")):
    calls = unsafe_calls(path.read_text())
    if calls:
      found[str(path.relative_to(REPO))] = calls
  for path in [REPO / "launch.py"]:
    calls = unsafe_calls(path.read_text())
    if calls:
      found["launch.py"] = calls
  assert found == {}
