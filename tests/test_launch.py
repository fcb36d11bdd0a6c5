"""launch.py in-process: what ``--config.KEY=VALUE`` puts into the config, and its one-line refusals.

Each test runs the real flag parsing and ``main`` with the trainer replaced by
a recorder, so nothing compiles.  The refusals that need a subprocess (a
config file that raises, an unwritable workdir, ...) are the command-line cases
of tests/faults/test_malformed_inputs.py.
"""

import importlib.util
import json
import logging as pylogging
import sys
import warnings
from pathlib import Path

import pytest
from absl import flags
from absl import logging as absl_logging

sys.path.insert(0, str(Path(__file__).parent))
from conftest import REPO, tiny_config, write_config  # noqa: E402

from ftjax import config as config_lib  # noqa: E402
from ftjax import train  # noqa: E402


def _import_launch():
  if "launch" in sys.modules:  # its flags live in absl's global FlagValues: define them once
    return sys.modules["launch"]
  spec = importlib.util.spec_from_file_location("launch", REPO / "launch.py")
  module = importlib.util.module_from_spec(spec)
  sys.modules["launch"] = module
  spec.loader.exec_module(module)
  return module


launch = _import_launch()

NPZ = "/nonexistent/vit_test.npz"  # never read: the trainer is replaced


@pytest.fixture
def run(monkeypatch, capsys):
  """``run(*args)`` -> (config handed to the trainer or None, exit code, stderr lines)."""
  absl_level, verbosity = pylogging.getLogger("absl").level, absl_logging.get_verbosity()
  ftjax_log, show = pylogging.getLogger("ftjax"), warnings.showwarning
  ftjax_handlers, ftjax_propagate = list(ftjax_log.handlers), ftjax_log.propagate

  def run_(*args):
    got = {}
    monkeypatch.setattr(train, "train_and_evaluate",
                        lambda config, workdir, allow_fresh: got.update(config=config))
    argv = ["launch.py", *args]
    monkeypatch.setattr(sys, "argv", argv)
    try:
      launch.main(launch._parse(argv))
      code = 0
    except SystemExit as e:
      code = e.code
    return got.get("config"), code, capsys.readouterr().err.strip().splitlines()

  yield run_
  # main quietens absl's logger; the overrides' flags stay defined in absl's global FlagValues.
  pylogging.getLogger("absl").setLevel(absl_level)
  absl_logging.set_verbosity(verbosity)
  ftjax_log.handlers[:], ftjax_log.propagate, warnings.showwarning = ftjax_handlers, ftjax_propagate, show
  for name in [n for n in flags.FLAGS if n.startswith("config.")]:
    delattr(flags.FLAGS, name)
  flags.FLAGS.unparse_flags()


def test_list_valued_keys_take_a_python_literal(run, tmp_path):
  config, code, err = run(
      f"--config={write_config(tmp_path, NPZ)}", f"--workdir={tmp_path / 'wd'}",
      "--config.data.eval_splits=()",
      '--config.optim.param_groups=[("head/.*", {"lr_mult": 2.0}), (".*", None)]',
      '--config.optim.unfreeze=[(100, "Transformer/.*")]',
      "--config.optim.schedule.boundaries=[10, 20]",
      '--config.optim.wd_rules=[(".*/bias", 0.0)]',
      '--config.model.dont_load=("head/.*",)')  # a tuple-valued key: ml_collections' own parser
  assert (code, err) == (0, [])
  assert config.data.eval_splits == []
  assert config.optim.param_groups == [("head/.*", {"lr_mult": 2.0}), (".*", None)]
  assert config.optim.unfreeze == [(100, "Transformer/.*")]
  assert config.optim.schedule.boundaries == [10, 20]
  assert config.optim.wd_rules == [(".*/bias", 0.0)]
  assert config.model.dont_load == ("head/.*",)
  assert config.optim.lr == 1e-3  # the file's value: only the overridden keys changed
  with pytest.raises(AttributeError):
    config.optim.no_such_key = 1  # still locked


def test_a_malformed_list_literal_is_one_line_naming_the_key(run, tmp_path):
  cfg = write_config(tmp_path, NPZ)
  config, code, err = run(f"--config={cfg}", f"--workdir={tmp_path / 'wd'}",
                          '--config.optim.param_groups=[("head/.*", {"lr_mult": 2}), (".*"')
  assert (config, code) == (None, 2)
  assert err == ["ftjax: error: bad value (--config.optim.param_groups): not a Python list literal: "
                 "'[(\"head/.*\", {\"lr_mult\": 2}), (\".*\"'; quote it for the shell, "
                 "e.g. '[]' or '[\"a\", \"b\"]'"]
  config, code, err = run(f"--config={cfg}", f"--workdir={tmp_path / 'wd'}", "--config.data.eval_splits=test")
  assert (config, code) == (None, 2)
  assert err == ["ftjax: error: bad value (--config.data.eval_splits): not a Python list literal: 'test'; "
                 "quote it for the shell, e.g. '[]' or '[\"a\", \"b\"]'"]


def test_a_free_form_section_takes_new_keys_and_keeps_the_types_of_its_own(run, tmp_path):
  cfg = tmp_path / "default.py"  # optim.kwargs as the schema has it: {"momentum": 0.9}, locked
  cfg.write_text("from ftjax.config import default_config\n"
                 "def get_config(arg=''):\n"
                 "  return default_config()\n")
  config, code, err = run(f"--config={cfg}", f"--workdir={tmp_path / 'wd'}",
                          "--config.optim.kwargs.momentum=1", "--config.optim.kwargs.nesterov=true",
                          "--config.optim.kwargs.accumulator_dtype=bfloat16")
  assert (code, err) == (0, [])
  kwargs = config.optim.kwargs
  assert kwargs.to_dict() == {"momentum": 1.0, "nesterov": True, "accumulator_dtype": "bfloat16"}
  assert type(kwargs.momentum) is float and kwargs.is_locked  # its own key kept its type; locked again
  config, code, err = run(f"--config={cfg}", f"--workdir={tmp_path / 'wd'}",
                          "--config.optim.kwargs.momentum=fast")
  assert (config, code) == (None, 2)
  assert err == ["ftjax: error: wrong type for config key (--config.optim.kwargs.momentum): 'fast' is str; "
                 "expected float"]
  config, code, err = run(f"--config={cfg}", f"--workdir={tmp_path / 'wd'}", "--config.optim.kwargs.nesterov")
  assert (config, code) == (None, 2)
  assert err == ["ftjax: error: unknown config key (--config.optim.kwargs.nesterov): 'nesterov'; "
                 "give it a value: --config.optim.kwargs.nesterov=VALUE"]


def test_model_arch_takes_the_family_options_from_the_command_line(run, tmp_path):
  cfg = write_config(tmp_path, NPZ)
  config, code, err = run(f"--config={cfg}", f"--workdir={tmp_path / 'wd'}",
                          "--config.model.arch.stem_conv_impl=space_to_depth",
                          "--config.model.arch.layer_norm_eps=1e-5")
  assert (code, err) == (0, [])
  assert config.model.arch.to_dict() == {"stem_conv_impl": "space_to_depth", "layer_norm_eps": 1e-5}


def test_a_config_file_missing_sections_is_a_missing_key_error(run, tmp_path):
  cfg = tmp_path / "partial.py"
  cfg.write_text("import ml_collections\n"
                 "def get_config(arg=''):\n"
                 "  c = ml_collections.ConfigDict()\n"
                 "  c.seed = 0\n"
                 "  return c\n")
  config, code, err = run(f"--config={cfg}", f"--workdir={tmp_path / 'wd'}")
  assert (config, code) == (None, 2)
  assert err == ["ftjax: error: missing config key (data): 4 problem(s) (+3 more); "
                 "start config files from ftjax.config.default_config()"]


def test_overrides_on_a_run_resumed_by_its_workdir_need_config(run, tmp_path):
  wd = tmp_path / "wd"
  wd.mkdir()
  (wd / "config.json").write_text(json.dumps(config_lib.to_dict(tiny_config(NPZ))))
  config, code, err = run(f"--workdir={wd}", "--config.train.total_steps=12")
  assert (config, code) == (None, 2)
  assert err == [f"ftjax: error: --config.KEY overrides need --config (--workdir): resuming from "
                 f"{wd}/config.json; pass --config as well"]
  config, code, err = run(f"--workdir={wd}")  # without overrides: the stored config
  assert (code, err) == (0, [])
  assert config.train.total_steps == 6 and config.model.source == f"npz:test@{NPZ}"


def test_an_optional_key_is_reset_with_none(run, tmp_path):
  # ml_collections parsed "None" as the key's type ("could not convert string to float"):
  # a layer decay or a class count set by a config file could not be taken back.
  cfg = write_config(tmp_path, NPZ, **{"optim.layer_decay": 0.75, "model.num_classes": 10})
  config, code, err = run(f"--config={cfg}", f"--workdir={tmp_path / 'wd'}",
                          "--config.optim.layer_decay=None", "--config.model.num_classes=None",
                          "--config.optim.lr=0.5")
  assert (code, err) == (0, [])
  assert (config.optim.layer_decay, config.model.num_classes, config.optim.lr) == (None, None, 0.5)
  config, code, err = run(f"--config={cfg}", f"--workdir={tmp_path / 'wd'}", "--config.train.total_steps=None")
  assert (config, code) == (None, 2)
  assert err == ["ftjax: error: config key cannot be None (--config.train.total_steps): None; "
                 "give it a value, e.g. 1000"]
  config, code, err = run(f"--config={cfg}", f"--workdir={tmp_path / 'wd'}", "--config.optim.layer_decayy=None")
  assert (config, code) == (None, 2)
  assert err == ["ftjax: error: unknown config key (--config.optim.layer_decayy): 'layer_decayy'; "
                 "did you mean layer_decay?"]
  # A misspelled section is the flag's fault too, not the config file's.
  config, code, err = run(f"--config={cfg}", f"--workdir={tmp_path / 'wd'}", "--config.optimm.lr=0.1")
  assert (config, code, err) == (None, 2, ["ftjax: error: unknown config key (--config.optimm.lr): 'optimm'; "
                                           "did you mean optim?"])



def test_the_last_flag_for_a_key_wins_none_and_free_form_keys_too(run, tmp_path):
  # =None and optim.kwargs.<key> are applied after absl's flags: they won wherever they stood,
  # so a README base line "layer_decay=None" silently beat a later "layer_decay=0.75".
  cfg = write_config(tmp_path, NPZ, **{"optim.layer_decay": 0.75})
  config, code, err = run(f"--config={cfg}", f"--workdir={tmp_path / 'wd'}",
                          "--config.optim.layer_decay=None", "--config.optim.layer_decay=0.6",
                          "--config.optim.grad_clip_norm=1.0", "--config.optim.grad_clip_norm=None",
                          "--config.optim.kwargs.nesterov=True", "--config.optim.kwargs={'eps': 0.001}",
                          "--config.optim.lr=0.1", "--config.optim.lr=0.002")
  assert (code, err) == (0, [])
  assert (config.optim.layer_decay, config.optim.grad_clip_norm, config.optim.lr) == (0.6, None, 0.002)
  assert dict(config.optim.kwargs) == {"eps": 0.001}
  # a later bad value is checked, not hidden behind an earlier None
  config, code, err = run(f"--config={cfg}", f"--workdir={tmp_path / 'wd'}",
                          "--config.optim.layer_decay=None", "--config.optim.layer_decay=abc")
  assert (config, code) == (None, 2) and "layer_decay" in err[0]
  # and the error quotes the flag that failed, not the first of that name (cut at the wrong ': ')
  config, code, err = run(f"--config={cfg}", f"--workdir={tmp_path / 'wd'}", '--config.optim.param_groups=[(".*", {})]',
                          '--config.optim.param_groups=[("head/.*", {"lr_mult": float("nan")})]')
  assert (config, code) == (None, 2)
  assert err[0].startswith("ftjax: error: bad value (--config.optim.param_groups): not a Python list literal: ")

def test_a_boolean_key_given_another_word_is_one_plain_line(run, tmp_path):
  config, code, err = run(f"--config={write_config(tmp_path, NPZ)}", f"--workdir={tmp_path / 'wd'}",
                          "--config.train.plots=maybe")
  assert (config, code) == (None, 2)
  assert err == ["ftjax: error: bad value (--config.train.plots): Non-boolean argument to boolean flag: "
                 "'maybe'; expected true or false"]  # it printed the exception's argument tuple


def test_warnings_print_as_one_plain_line(run, tmp_path, capsys):
  # absl's handler put "W1127 18:03:23.258123 1400... checkpoint.py:504] " before a logged
  # warning, and Python printed "folder.py:231: UserWarning: ..." and the source line.
  import logging
  _, code, _ = run(f"--config={write_config(tmp_path, NPZ)}", f"--workdir={tmp_path / 'wd'}")
  assert code == 0
  logging.getLogger("ftjax.checkpoint").warning("ftjax: warning: damaged checkpoint skipped (%s): %s", "c/6", "bad")
  warnings.warn("ftjax: skipping corrupt image a.png: truncated", stacklevel=1)
  assert capsys.readouterr().err.splitlines() == [
      "ftjax: warning: damaged checkpoint skipped (c/6): bad",
      "ftjax: warning: skipping corrupt image a.png: truncated"]


def test_a_binary_given_as_config_file_is_named(run, tmp_path):
  binary = tmp_path / "weights.npz"
  binary.write_bytes(b"PK\x03\x04\x00\x00binary")
  config, code, err = run(f"--config={binary}", f"--workdir={tmp_path / 'wd'}")
  assert (config, code) == (None, 2)
  # It said "(None:None)": a source with null bytes has no file name or line.
  assert err == [f"ftjax: error: syntax error in config file ({binary}): source code string cannot contain "
                 "null bytes"]


def test_plan_prints_the_plan_and_writes_nothing(run, tmp_path, monkeypatch, tiny_vit_npz, capsys):
  planned = []
  monkeypatch.setattr(train, "print_plan", lambda config, workdir: planned.append((config, workdir)))
  cfg = write_config(tmp_path, NPZ)
  config, code, err = run(f"--config={cfg}", f"--workdir={tmp_path / 'wd'}", "--plan",
                          "--config.optim.lr=0.5")
  assert (config, code, err) == (None, 0, [])  # the trainer never ran
  assert planned[0][0].optim.lr == 0.5 and planned[0][1] == str(tmp_path / "wd")
  monkeypatch.undo()
  train.print_plan(tiny_config(tiny_vit_npz, **{"optim.param_groups": [("head/.*", {}), (".*", None)]}),
                   str(tmp_path / "wd"))
  out = capsys.readouterr().out
  assert "fine-tuning plan: 6 steps" in out and "trainable at step 0: " in out
  # What it trains on, so that a per_class or val_fraction cut shows before anything runs.
  assert ("\ndata: train digits/train: 1,437 examples, 10 classes; eval test: 360; 6 steps of "
          "batch 16 = 0.0668 epochs\nfine-tuning plan: ") in out
  assert not (tmp_path / "wd").exists()


@pytest.mark.parametrize("tool, argv, message", [
    ("export", ["--workdir", "w", "--out", "o", "--format", "onnx"],
     "argument --format: invalid choice: 'onnx'"),  # then the choices, quoted by Python version
    ("predict", ["--workdir", "w"], "the following arguments are required: --images"),
    ("fewshot", ["--workdir", "w", "--bogus"], "unrecognized arguments: --bogus"),
])
def test_the_tools_bad_command_line_is_one_line(tool, argv, message, capsys):
  # argparse printed its usage block before the error; now one line, exit 2, as launch.py.
  import importlib
  main = importlib.import_module(f"ftjax.{tool}").main
  with pytest.raises(SystemExit) as e:
    main(argv)
  assert e.value.code == 2
  err = capsys.readouterr().err
  assert err.startswith(f"ftjax: error: bad command line (python -m ftjax.{tool}): {message}")
  assert err.endswith("; see --help\n") and err.count("\n") == 1


def test_closed_event_loop_noise_is_dropped_and_other_unraisables_pass(monkeypatch, capsys):
  # A checkpoint write failing on a full disk: orbax's tensorstore callbacks into its closed
  # event loop printed some 200 tracebacks above the run's one-line error.
  from ftjax import cli
  monkeypatch.setattr(sys, "unraisablehook", sys.__unraisablehook__)
  cli.drop_closed_event_loop_noise()

  class Raises:
    def __init__(self, message):
      self.message = message

    def __del__(self):
      raise RuntimeError(self.message)

  Raises("Event loop is closed")
  assert capsys.readouterr().err == ""
  Raises("something else")
  err = capsys.readouterr().err
  assert "RuntimeError: something else" in err and "Event loop" not in err
