"""The catalogue of malformed inputs: each fails with its one line and exit code, fast, writing nothing.

Configs, checkpoints, data and command lines a user can get wrong.  Each case
fails before the workdir is created or touched (the listing of the test's
directory is the same before and after), before any train step is compiled,
within 10 s.  Cases that only the command line can produce go through the real
``launch.py``; the rest call :func:`ftjax.train.train_and_evaluate`, which is
what ``launch.py`` calls, and check the line and exit code it would print.
"""

import subprocess
import sys
import time
from pathlib import Path

import ml_collections
import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from _harness import REPO, listing, subprocess_env, tiny_config, write_config  # noqa: E402

from ftjax import config as config_lib  # noqa: E402
from ftjax import train  # noqa: E402
from ftjax.errors import FtjaxError  # noqa: E402

pytestmark = pytest.mark.faults


# ------------------------------------------------------------------ inputs the cases are made of

def _npz(tmp: Path, npz: str, name: str, edit) -> str:
  arrays = dict(np.load(npz, allow_pickle=False))
  edit(arrays)
  path = tmp / name
  np.savez(path, **arrays)
  return str(path)


def _bytes(tmp: Path, name: str, data: bytes) -> str:
  path = tmp / name
  path.write_bytes(data)
  return str(path)


def _folder(tmp: Path, corrupt: bool) -> str:
  from PIL import Image
  root = tmp / ("corrupt_images" if corrupt else "empty_folder")
  root.mkdir()
  if corrupt:
    for c in ("a", "b"):
      (root / c).mkdir()
      for i in range(3):
        Image.new("RGB", (8, 8), (40 * i, 0, 0)).save(root / c / f"{i}.png")
    (root / "b" / "3.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)  # a header, no picture
  return str(root)


def _arrays(tmp: Path, **arrays) -> str:
  """An arrays .npz of two classes, with ``arrays`` over its members."""
  path = tmp / "arrays.npz"
  images, labels = np.zeros((4, 8, 8), np.uint8), np.array([0, 1, 0, 1])
  np.savez(path, **{"train_images": images, "train_labels": labels, "test_images": images,
                    "test_labels": labels, **arrays})
  return str(path)


def _stored_run(tmp: Path, stored: str) -> str:
  """A workdir holding a run: its config.json and a step (refused before the step is read)."""
  wd = tmp / "wd"
  (wd / "checkpoints" / "1").mkdir(parents=True)
  (wd / "config.json").write_text(stored)
  return str(wd)


def _other_config_json(npz: str) -> str:
  import json
  d = config_lib.to_dict(tiny_config(npz))
  d["optim"]["lr"] = 0.5
  return json.dumps(d)


def _hand_built(npz: str, edit):
  d = config_lib.to_dict(tiny_config(npz))
  edit(d)
  return ml_collections.ConfigDict(d)


# ------------------------------------------------------------------ in-process cases
# (name, build(tmp, npz) -> (config, workdir), expected line with {tmp} for the test's dir, exit code)

def C(**overrides):  # a tiny config with overrides; workdir tmp/wd
  return lambda tmp, npz: (tiny_config(npz, **overrides), str(tmp / "wd"))


def S(source_fn):  # a tiny config whose model.source is made in tmp
  return lambda tmp, npz: (tiny_config(npz, **{"model.source": source_fn(tmp, npz)}), str(tmp / "wd"))


def D(**overrides_fn):  # data overrides computed from tmp
  return lambda tmp, npz: (tiny_config(npz, **{k: f(tmp) for k, f in overrides_fn.items()}),
                           str(tmp / "wd"))


def _del(key):
  return lambda a: a.pop(key)


def _set(key, value):
  return lambda a: a.__setitem__(key, value)


def _nan(a):
  a["Transformer/encoderblock_0/MlpBlock_3/Dense_0/kernel"][0, 0] = np.nan


def _truncated(tmp, npz):
  data = Path(npz).read_bytes()
  return _bytes(tmp, "truncated.npz", data[:len(data) // 2])


IN_PROCESS = [
    # configs
    ("total steps zero", C(**{"train.total_steps": 0}),
     "ftjax: error: train.total_steps must be positive (train.total_steps): 0", 2),
    ("negative batch", C(**{"train.batch_size": -4}),
     "ftjax: error: train.batch_size must be positive (train.batch_size): -4", 2),
    ("bad on_nan choice", C(**{"train.on_nan": "explode"}),
     "ftjax: error: train.on_nan must be one of ('stop', 'skip') (train.on_nan): 'explode'", 2),
    ("bad dtype", C(**{"model.dtype": "float64"}),
     "ftjax: error: model.dtype must be float32, bfloat16 or float16 (model.dtype): 'float64'", 2),
    ("unknown ViT attention", C(**{"model.attention": "flash"}),
     "ftjax: error: unknown ViT attention implementation (arch.attention): 'flash'; "
     "one of ['xla', 'cudnn', 'auto']", 2),
    ("label smoothing out of range", C(**{"train.label_smoothing": 1.5}),
     "ftjax: error: train.label_smoothing must be in [0, 1) (train.label_smoothing): 1.5", 2),
    ("EMA decay NaN", C(**{"train.ema_decay": float("nan")}),
     "ftjax: error: train.ema_decay must be in [0, 1) (train.ema_decay): nan", 2),
    ("total steps beyond int32", C(**{"train.total_steps": 3_000_000_000}),
     "ftjax: error: train.total_steps is too large (train.total_steps): 3000000000; at most "
     "2,147,483,647 (the step counter is int32)", 2),
    ("negative seed", C(**{"seed": -1}),
     "ftjax: error: seed must be in [0, 2**63) (seed): -1", 2),
    ("hand-built config, misspelled key", lambda tmp, npz: (
        _hand_built(npz, lambda d: d["train"].__setitem__("batch_sizee", 8)), str(tmp / "wd")),
     "ftjax: error: unknown config key (train.batch_sizee); did you mean train.batch_size?", 2),
    ("hand-built config, wrong type", lambda tmp, npz: (
        _hand_built(npz, lambda d: d["train"].__setitem__("total_steps", "6")), str(tmp / "wd")),
     "ftjax: error: wrong type (train.total_steps); expected int, got str '6'", 2),
    ("hand-built config, missing key", lambda tmp, npz: (
        _hand_built(npz, lambda d: d["train"].pop("on_nan")), str(tmp / "wd")),
     "ftjax: error: missing config key (train.on_nan); start config files from "
     "ftjax.config.default_config()", 2),
    ("warm-up longer than the run", C(**{"optim.schedule.warmup_steps": 10}),
     'ftjax: error: warm-up as long as the run (optim.schedule.warmup_steps): 10; the run has 6 steps', 2),
    ("warm-up of NaN epochs", C(**{"optim.schedule.warmup_epochs": float("nan")}),
     "ftjax: error: warmup_epochs must be finite numbers of epochs >= 0 (optim.schedule.warmup_epochs): nan",
     2),
    ("rule matching no parameter", C(**{"optim.param_groups": [("nomatch/.*", None), (".*", {})]}),
     "ftjax: error: param group matches no parameter (param group #0): 'nomatch/.*'; paths look like "
     "'Transformer/encoder_norm/bias'", 2),
    ("learning rate x lr_mult overflows",
     C(**{"optim.lr": 10.0, "optim.param_groups": [("head/.*", {"lr_mult": 1e308}), (".*", None)]}),
     "ftjax: error: learning rate x lr_mult is not finite (optim.param_groups #0.lr_mult): 10.0 x 1e+308; "
     "lower lr_mult or optim.lr", 2),
    ("parameter no rule covers", C(**{"optim.param_groups": [("head/.*", {})]}),
     "ftjax: error: parameter covered by no param group (Transformer/encoder_norm/bias, "
     "Transformer/encoder_norm/scale, Transformer/encoderblock_0/LayerNorm_0/bias, "
     "Transformer/encoderblock_0/LayerNorm_0/scale, Transformer/encoderblock_0/LayerNorm_2/bias, "
     "Transformer/encoderblock_0/LayerNorm_2/scale, "
     "Transformer/encoderblock_0/MlpBlock_3/Dense_0/bias, "
     "Transformer/encoderblock_0/MlpBlock_3/Dense_0/kernel, ... (38 in all)); add a catch-all rule "
     "such as ('.*', ...)", 2),
    ("unknown optimizer", C(**{"optim.name": "adamz"}),
     "ftjax: error: unknown optimizer (optim.name): 'adamz'; did you mean adam? (any optax optimizer "
     "by name)", 2),
    ("optimizer argument misspelled", C(**{"optim.name": "sgd", "optim.kwargs": {"momentumm": 0.9}}),
     'ftjax: error: sgd takes no argument momentumm (optim.kwargs.momentumm): 0.9; it takes '
     'momentum, nesterov, accumulator_dtype', 2),
    ("unfreeze step beyond the run", C(**{"optim.unfreeze": [(100, "Transformer/.*")]}),
     "ftjax: error: unfreeze step beyond the run (optim.unfreeze #0): 100; the run has steps 0..5: move or "
     "drop the rule (--config.optim.unfreeze='[]'), or set the length by the config file's argument "
     "(configs/default.py:steps=N), which moves its rules", 2),
    ("accum steps not dividing the batch", C(**{"optim.accum_steps": 3}),
     "ftjax: error: batch size not divisible by accum_steps x devices (optim.accum_steps): 16 / (3 x 1)", 2),
    ("no checkpoint kept", C(**{"train.keep_latest": 0}),
     "ftjax: error: keep at least the latest checkpoint (train.keep_latest / keep_best): 0 / 1; "
     "keep_latest >= 1, keep_best >= 0", 2),
    ("shard rule matching no parameter", C(**{"train.shard_params": ("nomatch/.*",)}),
     "ftjax: error: train.shard_params rule matches no parameter (train.shard_params rule #0): "
     "'nomatch/.*'; paths look like 'Transformer/encoder_norm/bias'", 2),
    ("unknown best metric", C(**{"train.best_metric": "test/top7"}),
     "ftjax: error: unknown evaluation metric (train.best_metric): 'test/top7'; <split>/<metric>, "
     "metric one of top1, top5, loss, mean_class_accuracy, ece", 2),
    ("early stopping on a split not evaluated",
     C(**{"train.early_stopping_patience": 2, "train.best_metric": "val/top1"}),
     "ftjax: error: early stopping watches a split that is not evaluated (train.best_metric): "
     "'val/top1'; evaluated splits: ['test'] (--config.train.best_metric=top1 takes the first)", 2),
    ("best checkpoints ranked by a split not evaluated", C(**{"train.best_metric": "val/top1"}),
     "ftjax: error: keep_best ranks by a split that is not evaluated (train.best_metric): "
     "'val/top1'; evaluated splits: ['test'] (--config.train.best_metric=top1 takes the first)", 2),
    ("early stopping with a negative min_delta",
     C(**{"train.early_stopping_patience": 2, "train.early_stopping_min_delta": -1.0}),
     "ftjax: error: early stopping min_delta must be >= 0 (early_stopping.min_delta): -1.0", 2),
    ("image size not divisible by patch size", C(**{"data.image_size": 30}),
     'ftjax: error: image size not divisible by the ViT patch size (image_size): 30x30; patch 8: try '
     '32x32', 2),
    ("class count disagrees with the data", C(**{"model.num_classes": 5}),
     "ftjax: error: class count disagrees with the data (model.num_classes): config 5 vs data 10; "
     "fix model.num_classes or the dataset", 3),
    ("resume with another config", lambda tmp, npz: (
        tiny_config(npz), _stored_run(tmp, _other_config_json(npz))),
     "ftjax: error: workdir holds a run with another config ({tmp}/wd/config.json): optim.lr 0.5 -> 0.001; "
     "use a new --workdir, or the stored config", 2),
    ("stored config unreadable", lambda tmp, npz: (tiny_config(npz), _stored_run(tmp, "{not json")),
     "ftjax: error: stored config unreadable ({tmp}/wd/config.json): JSONDecodeError: Expecting property "
     "name enclosed in double quotes: line 1 column 2 (char 1); restore the file, or use a new --workdir", 2),
    ("workdir is a file", lambda tmp, npz: (tiny_config(npz), _bytes(tmp, "wd", b"x")),
     "ftjax: error: workdir is not writable ({tmp}/wd): a file is in the way; choose another --workdir", 2),
    # checkpoints
    ("weights file not found", S(lambda tmp, npz: f"npz:test@{tmp}/absent.npz"),
     'ftjax: error: weight file not found ({tmp}/absent.npz); check the path', 3),
    ("malformed source", S(lambda tmp, npz: "npz:test"),
     'ftjax: error: malformed checkpoint source (npz:test); expected npz:<name>@<file or URL>', 2),
    ("unknown source form", S(lambda tmp, npz: f"{tmp}/nothing_here"),
     'ftjax: error: unknown checkpoint source ({tmp}/nothing_here); use hf:, timm:, npz:, '
     'torchvision:, efficientnet: or a checkpoint directory', 3),
    ("wrong format", S(lambda tmp, npz: "npz:test@" + _bytes(tmp, "text.npz", b"hello, not a zip\n" * 8)),
     "ftjax: error: not an .npz file (no zip header) ({tmp}/text.npz); pass a .npz written by numpy.savez",
     3),
    ("wrong family", S(lambda tmp, npz: f"torchvision:resnet18@{npz}"),
     'ftjax: error: unreadable PyTorch file ({npz}): Expected hasRecord("version") to be true, but '
     'got false. (Could this error message be improved? If so, please report an enhancement request '
     'to PyTorch.)', 3),
    ("wrong variant", S(lambda tmp, npz: f"npz:S/16@{npz}"),
     'ftjax: error: shape mismatch (params/Transformer/encoder_norm/bias): checkpoint (32,) vs model '
     '(384,); a checkpoint for another architecture or variant?', 3),
    ("truncated checkpoint", S(lambda tmp, npz: "npz:test@" + _truncated(tmp, npz)),
     'ftjax: error: corrupted .npz file ({tmp}/truncated.npz): File is not a zip file', 3),
    ("empty checkpoint", S(lambda tmp, npz: "npz:test@" + _bytes(tmp, "empty.npz", b"")),
     'ftjax: error: empty weight file ({tmp}/empty.npz); the download or copy did not finish', 3),
    ("missing key", S(lambda tmp, npz: "npz:test@" + _npz(tmp, npz, "missing.npz", _del("cls"))),
     "ftjax: error: npz has no class token 'cls' (npz:test); its position embedding has a class "
     "token's row: a damaged file?", 3),
    ("extra key", S(lambda tmp, npz: "npz:test@" + _npz(
        tmp, npz, "extra.npz", _set("Transformer/extra/kernel", np.ones((2, 2), np.float32)))),
     'ftjax: error: checkpoint key the model does not have (npz:test@{tmp}/extra.npz): '
     'params/Transformer/extra/kernel (2, 2); a checkpoint for another architecture or variant?', 3),
    ("NaN inside weights", S(lambda tmp, npz: "npz:test@" + _npz(tmp, npz, "nan.npz", _nan)),
     "ftjax: error: non-finite value in the pretrained weights (npz:test@{tmp}/nan.npz): "
     "params/Transformer/encoderblock_0/MlpBlock_3/Dense_0/kernel; the file is damaged; nothing was trained",
     3),
    ("an ftjax checkpoint directory that is not one", S(lambda tmp, npz: str(tmp)),
     'ftjax: error: no checkpoint found ({tmp}); expected <dir>/<step>/ or <workdir>/checkpoints/<step>/', 3),
    # data
    ("unknown data source", C(**{"data.source": "mnist"}),
     "ftjax: error: unknown data source (config.data.source): 'mnist'; choose one of mnist5k, "
     "digits, folder, tfds, arrays", 2),
    ("folder not found", D(**{"data.source": lambda tmp: "folder",
                              "data.root": lambda tmp: f"{tmp}/no_such_folder"}),
     "ftjax: error: image folder not found ({tmp}/no_such_folder); expected root/<class>/<images>, "
     "images at any depth under <class>", 3),
    ("empty folder", D(**{"data.source": lambda tmp: "folder", "data.root": lambda tmp: _folder(tmp, False)}),
     "ftjax: error: no class folders ({tmp}/empty_folder): 0; expected root/<class>/<images>, "
     "images at any depth under <class>", 3),
    ("corrupt images", D(**{"data.source": lambda tmp: "folder", "data.on_corrupt": lambda tmp: "error",
                            "data.root": lambda tmp: _folder(tmp, True)}),
     "ftjax: error: corrupt image ({tmp}/corrupt_images/b/3.png): UnidentifiedImageError: cannot "
     "identify image file '{tmp}/corrupt_images/b/3.png'; remove the file or set "
     "config.data.on_corrupt=skip", 3),
    ("unprepared tfds dataset", D(**{"data.source": lambda tmp: "tfds", "data.name": lambda tmp: "mnist",
                                     "data.data_dir": lambda tmp: f"{tmp}/tfds"}),
     "ftjax: error: tfds dataset is not prepared ({tmp}/tfds/mnist/3.0.1): mnist; prepare it with: "
     "pip install 'ftjax[prepare]' && tfds build mnist --data_dir={tmp}/tfds "
     "--file_format=array_record", 3),
    ("zero-size images", D(**{"data.source": lambda tmp: "arrays", "data.path": lambda tmp: _arrays(
        tmp, train_images=np.zeros((4, 0, 0), np.uint8))}),
     "ftjax: error: images have zero height or width ({tmp}/arrays.npz/train): (4, 0, 0); images must be "
     "[N, H, W] or [N, H, W, C] with H, W >= 1", 3),
    ("scalar class names", D(**{"data.source": lambda tmp: "arrays", "data.path": lambda tmp: _arrays(
        tmp, class_names=np.array("abc"))}),
     "ftjax: error: class_names must be a 1-D array, one name per class ({tmp}/arrays.npz:class_names): "
     "shape (); e.g. np.array(['cat', 'dog'])", 3),
    ("a single class", D(**{"data.source": lambda tmp: "arrays", "data.path": lambda tmp: _arrays(
        tmp, train_labels=np.zeros(4, np.int64), test_labels=np.zeros(4, np.int64))}),
     "ftjax: error: a classifier needs at least 2 classes ({tmp}/arrays.npz/train): 1 class, '0'; give the "
     "data a second class (a class folder, a label)", 3),
    ("too few examples for per_class", C(**{"data.per_class": 10_000}),
     "ftjax: error: too few examples for per_class (digits/train class '0'): 143 < 10000; lower "
     "config.data.per_class", 3),
]


# ------------------------------------------------------------------ command-line cases (real launch.py)
# (name, build(tmp, npz) -> (argv after launch.py, extra env), expected line, exit code)

def _file(tmp: Path, name: str, body: str) -> str:
  path = tmp / name
  path.write_text(body)
  return str(path)


_MISSPELLED = """
from ftjax.config import default_config
def get_config(arg=""):
  c = default_config()
  c.train.batch_sizee = 3
  return c
"""
_WRONG_TYPE = _MISSPELLED.replace("c.train.batch_sizee = 3", "c.train.total_steps = 'ten'")
_SYNTAX = _MISSPELLED.replace("c.train.batch_sizee = 3", "c.train.batch_size = = 3")
_RAISES = _MISSPELLED.replace("c.train.batch_sizee = 3", "raise RuntimeError('no such recipe')")
_ARG = _MISSPELLED.replace("c.train.batch_sizee = 3", "config_lib.parse_arg(arg, steps=3)").replace(
    "from ftjax.config import default_config", "from ftjax import config as config_lib\n"
    "from ftjax.config import default_config")


def CLI(*args, config=lambda tmp, npz: write_config(tmp, npz), workdir=lambda tmp: str(tmp / "wd"), **env):
  def build(tmp, npz):
    argv = [f"--config={config(tmp, npz)}"] if config else []
    if workdir is not None:
      argv.append(f"--workdir={workdir(tmp)}")
    return argv + [a.format(tmp=tmp) for a in args], env
  return build


COMMAND_LINE = [
    ("cli: unknown key on the command line", CLI("--config.train.batch_sizee=3"),
     "ftjax: error: unknown config key (--config.train.batch_sizee): 'batch_sizee'; "
     "did you mean batch_size?", 2),
    ("cli: misspelled key inside a config file", CLI(config=lambda tmp, npz: _file(tmp, "c.py", _MISSPELLED)),
     "ftjax: error: unknown config key ({tmp}/c.py): 'batch_sizee'; did you mean batch_size?", 2),
    ("cli: wrong type on the command line", CLI("--config.train.total_steps=abc"),
     "ftjax: error: bad value (--config.train.total_steps): invalid literal for int() with base 10: 'abc'", 2),
    ("cli: wrong type inside a config file", CLI(config=lambda tmp, npz: _file(tmp, "c.py", _WRONG_TYPE)),
     "ftjax: error: wrong type for config key ({tmp}/c.py): total_steps = 'ten' is str; expected int", 2),
    ("cli: syntax error in a config file", CLI(config=lambda tmp, npz: _file(tmp, "c.py", _SYNTAX)),
     "ftjax: error: syntax error in config file ({tmp}/c.py:5): invalid syntax", 2),
    ("cli: config file raises", CLI(config=lambda tmp, npz: _file(tmp, "c.py", _RAISES)),
     "ftjax: error: config file failed ({tmp}/c.py): RuntimeError: no such recipe", 2),
    ("cli: bad config argument", CLI(config=lambda tmp, npz: _file(tmp, "c.py", _ARG) + ":stepz=3"),
     "ftjax: error: unknown config argument (:stepz=3): 'stepz'; known: steps", 2),
    ("cli: nonexistent config file", CLI(config=lambda tmp, npz: f"{tmp}/absent.py"),
     "ftjax: error: config file not found ({tmp}/absent.py); check --config", 2),
    ("cli: missing workdir", CLI(workdir=lambda tmp: ""),
     "ftjax: error: no workdir given (--workdir); pass --workdir DIR", 2),
    ("cli: unwritable workdir", CLI(workdir=lambda tmp: _file(tmp, "blocker", "x") + "/wd"),
     "ftjax: error: workdir is not writable ({tmp}/blocker/wd): {tmp}/blocker is not a directory; "
     "choose another --workdir", 2),
    ("cli: positional argument", CLI("extra"),
     "ftjax: error: unexpected arguments: extra; use --flag=value", 2),
    ("cli: batch not divisible by the device count", CLI(
        "--config.train.batch_size=12", XLA_FLAGS="--xla_force_host_platform_device_count=8"),
     "ftjax: error: batch size not divisible by the device count (train.batch_size): 12 / 8 devices", 2),
]

CASES = [(name, "call", build, expected, code) for name, build, expected, code in IN_PROCESS] + \
        [(name, "cli", build, expected, code) for name, build, expected, code in COMMAND_LINE]


def _run_cli(build, tmp_path, npz):
  argv, env = build(tmp_path, npz)
  before = listing(tmp_path)
  t0 = time.time()
  r = subprocess.run([sys.executable, str(REPO / "launch.py"), *argv], capture_output=True, text=True,
                     timeout=60, env=subprocess_env(PYTHONDONTWRITEBYTECODE="1", **env))
  elapsed = time.time() - t0
  assert "Traceback" not in r.stderr, r.stderr[-3000:]
  lines = r.stderr.strip().splitlines()
  assert len(lines) == 1, r.stderr[-3000:]  # exactly one line: no warnings, no usage dump
  return lines[0], r.returncode, before, elapsed


def _run_call(build, tmp_path, npz, monkeypatch):
  def refuse(*a, **k):  # reaching the workdir means a check came too late
    raise AssertionError("got past the checks: the workdir would be written")
  monkeypatch.setattr(train, "_make_workdir", refuse)
  config, workdir = build(tmp_path, npz)
  before = listing(tmp_path)
  t0 = time.time()
  with pytest.raises(FtjaxError) as info:
    train.train_and_evaluate(config, workdir)
  return str(info.value), info.value.exit_code, before, time.time() - t0


@pytest.mark.parametrize("name,how,build,expected,code", CASES, ids=[c[0] for c in CASES])
@pytest.mark.slow  # 20 s or more on 2 slow cores; CI runs it (-m slow)
def test_malformed_input_fails_with_one_line(tiny_vit_npz, tmp_path, monkeypatch, name, how, build,
                                             expected, code):
  if how == "cli":
    line, got_code, before, elapsed = _run_cli(build, tmp_path, tiny_vit_npz)
  else:
    line, got_code, before, elapsed = _run_call(build, tmp_path, tiny_vit_npz, monkeypatch)
  print(f"\n{name}: [{got_code}] {line}")
  assert "\n" not in line and line.startswith("ftjax: error: ")
  if expected is not None:
    assert line == expected.format(tmp=tmp_path, npz=tiny_vit_npz)
  assert got_code == code
  assert listing(tmp_path) == before  # nothing written: no workdir, no config.json, no checkpoints/
  assert elapsed < 30  # refused before any training (a CLI's start-up alone takes 5-10 s on 2 slow cores)


def test_catalogue_has_thirty_cases():
  assert len(CASES) >= 30 and len({c[0] for c in CASES}) == len(CASES)
