"""Fine-tune a pretrained model: ``python launch.py --config configs/<name>.py[:arg] --workdir DIR``.

Without ``--config`` it runs the repository's ``configs/default.py`` (never a file
of that name in the current directory) into ``runs/default``.
``--config.key=value`` overrides any config key; an unknown key or a wrong type
fails at once.  List-valued keys take a Python literal
(``--config.optim.param_groups='[("head/.*", {}), (".*", None)]'``), and keys of a
free-form section (``optim.kwargs``) may be added (``--config.optim.kwargs.nesterov=True``).
An optional key (one whose default is None) is reset with ``None``
(``--config.optim.layer_decay=None``).
Errors print one line and exit with the codes in the README
(2 usage/config, 3 data/checkpoint, 4 numerics, 75 preempted, 130 Ctrl-C: rerun to resume).
Set ``FTJAX_TRACEBACK=1`` for a traceback.

A rerun resumes from the newest checkpoint that verifies; if checkpoints exist and none
does, it refuses (exit 3) unless ``--allow_fresh_start``.
``python launch.py --workdir DIR`` alone resumes the run in DIR with its stored
``DIR/config.json`` (never a ``config.py`` found there).
``--config.train.deterministic=true`` sets ``XLA_FLAGS=--xla_gpu_deterministic_ops=true``
before JAX starts: bit-identical reruns and resumes on GPUs too (CPUs are deterministic anyway).
"""

import contextlib
import logging as pylogging
import os
import re
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from ftjax import cli

# No default here: absl would load (run) a default config file at parse time, resolved against
# the current directory, which may be a stranger's workdir.
_CONFIG = config_flags.DEFINE_config_file("config", default=None,
                                          help_string="config file (get_config(arg)) and optional :arg",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "where checkpoints, metrics and plots go "
                               "(default: runs/<config name>)")
_ALLOW_FRESH = flags.DEFINE_bool("allow_fresh_start", False, "when the workdir holds checkpoints but "
                                 "none verifies, move them aside and start from step 0 (default: refuse)")
_PLAN = flags.DEFINE_bool("plan", False, "print the load report, the fine-tuning plan and its warnings, "
                          "then exit without compiling or writing anything")


DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "default.py")


def _fail(line: str, code: int):
  print(line, file=sys.stderr)
  sys.exit(code)


def _parse(argv):
  """absl flag parsing, with ftjax's one-line errors instead of usage dumps."""
  from ftjax.errors import EXIT_USAGE, FtjaxError
  workdir = cli.flag_value(argv, "workdir")
  resuming = workdir and os.path.isfile(os.path.join(workdir, "config.json"))
  if cli.flag_value(argv, "config") is None and resuming:
    # Resuming a run by its workdir alone (main reads its config.json): absl knows no
    # --config.KEY flags without --config and would call them unknown.
    if any(re.match(r"--(no)?config\.", a) for a in argv[1:]):
      _fail("ftjax: error: --config.KEY overrides need --config (--workdir): resuming from "
            f"{os.path.join(workdir, 'config.json')}; pass --config as well", EXIT_USAGE)
  elif cli.flag_value(argv, "config") is None:
    argv = [argv[0], f"--config={DEFAULT_CONFIG}", *argv[1:]]
  config_flags.register_flag_parser_for_type(list, cli.ListParser())  # config_flags' hook for a type
  argv = cli.drop_superseded(argv)  # the last of several flags for one key wins, =None too
  argv, _ = cli.split_free_form(argv)  # main applies them to the loaded config
  argv, _ = cli.split_none(argv)  # and these
  try:
    with _argv_seen_by_config_flags(argv):
      return flags.FLAGS(argv)
  except Exception as e:  # the config file is user code: it may raise anything, even a SyntaxError
    if os.environ.get("FTJAX_TRACEBACK"):
      raise
    if isinstance(e, FtjaxError):  # raised by get_config itself (e.g. a bad :arg)
      _fail(str(e), e.exit_code)
    # get_config raised a ConfigError (e.g. a bad :arg) that config_flags wrapped: its own line is last.
    own = re.findall(r"ftjax: error: (?:(?!ftjax: error: ).)*$", str(e))
    if own and "Traceback" not in own[-1]:
      _fail(own[-1].strip(), EXIT_USAGE)
    if isinstance(e, SyntaxError):
      # A file that is no Python source at all (null bytes: a binary) has no file name or line.
      where = f"{e.filename}:{e.lineno}" if e.filename else cli.config_arg(argv, DEFAULT_CONFIG)
      _fail(f"ftjax: error: syntax error in config file ({where}): {e.msg}", EXIT_USAGE)
    if not isinstance(e, (flags.Error, AttributeError, KeyError, TypeError, ValueError)):
      detail = " ".join(str(e).split())[:200]
      _fail(f"ftjax: error: config file failed ({cli.config_arg(argv, DEFAULT_CONFIG)}): {type(e).__name__}: {detail}",
            EXIT_USAGE)
    _fail(cli.explain(e, argv, DEFAULT_CONFIG), EXIT_USAGE)


@contextlib.contextmanager
def _argv_seen_by_config_flags(argv):
  """config_flags finds ``--config.KEY`` overrides in sys.argv, not in the argv it is given."""
  saved = sys.argv
  sys.argv = list(argv)
  try:
    yield
  finally:
    sys.argv = saved


def main(argv):
  logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
  if not os.environ.get("FTJAX_TRACEBACK"):
    # orbax reports a failed write with a traceback through absl's logger; ftjax
    # reports it as one line (ftjax's own warnings use their own loggers).
    pylogging.getLogger("absl").setLevel(pylogging.CRITICAL)
  if len(argv) > 1:
    _fail(f"ftjax: error: unexpected arguments: {' '.join(argv[1:])}; use --flag=value", 2)
  cli.plain_warnings()
  from ftjax import config as config_lib
  from ftjax import train  # imports jax; the backend starts later, after XLA_FLAGS is final
  from ftjax.errors import FtjaxError
  workdir = _WORKDIR.value
  try:
    if cli.flag_value(sys.argv, "config") is None and workdir and train.stored_config(workdir) is not None:
      # Resuming a run by its workdir alone: the stored JSON is the config (a config.py
      # found there is never executed).  _parse refused --config.KEY overrides.
      config = train.stored_config(workdir)
    else:
      config = _load_config()
      # A hand-built config file may lack whole sections: name the key before reading one.
      config_lib.check_schema(config)
      argv, free_form = cli.split_free_form(cli.drop_superseded(sys.argv))
      cli.apply_none(config, cli.split_none(argv)[1], config_lib.default_config())
      cli.apply_free_form(config, free_form)
    if config.train.deterministic:
      # XLA reads XLA_FLAGS once, when the backend starts: set it before anything runs.
      os.environ["XLA_FLAGS"] = train.with_deterministic_flag(os.environ.get("XLA_FLAGS"))
    if workdir is None:
      name = os.path.splitext(os.path.basename(flags.FLAGS["config"].config_filename))[0]
      workdir = os.path.join("runs", name)
    if _PLAN.value:
      train.print_plan(config, workdir)
    else:
      train.train_and_evaluate(config, workdir, allow_fresh=_ALLOW_FRESH.value)
  except FtjaxError as e:
    if os.environ.get("FTJAX_TRACEBACK"):
      raise
    _fail(str(e), e.exit_code)


def _load_config():
  try:
    config = _CONFIG.value
    config.to_dict()  # config_flags defers load errors; surface them here
  except Exception as e:  # a config file that does not load: missing, bad key, bad type, syntax
    if os.environ.get("FTJAX_TRACEBACK"):
      raise
    path = flags.FLAGS["config"].config_filename
    if isinstance(e, OSError) and not os.path.exists(path):
      _fail(f"ftjax: error: config file not found ({path}); check --config", 2)
    what = "cannot load config file" if isinstance(e, OSError) else "bad config"
    detail = " ".join(str(e).split()).replace("Failed loading config file config_config ", "")
    _fail(f"ftjax: error: {what} ({path}): {detail[:300]}", 2)
  return config


def run():
  """``main`` under absl, with a Ctrl-C or SIGTERM outside the training loop (or a second
  Ctrl-C in it) as one line and the signal's exit code (cli.catch_signals_early)."""
  cli.catch_signals_early()
  if not os.environ.get("FTJAX_TRACEBACK"):
    cli.drop_closed_event_loop_noise()
  try:
    app.run(main, flags_parser=_parse)
  except (KeyboardInterrupt, cli.Terminated) as e:
    if os.environ.get("FTJAX_TRACEBACK"):
      raise
    if isinstance(e, KeyboardInterrupt):
      _fail("ftjax: error: interrupted by Ctrl-C: quit without saving the step in progress; rerun the "
            "same command to resume from the last checkpoint", 130)
    _fail("ftjax: error: preempted by SIGTERM outside the training loop: nothing new saved; rerun the "
          "same command to resume from the last checkpoint", 75)


if __name__ == "__main__":
  run()
