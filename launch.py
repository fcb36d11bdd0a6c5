"""Fine-tune a pretrained model: ``python launch.py --config configs/<name>.py[:arg] --workdir DIR``.

Without ``--config`` it runs the repository's ``configs/default.py`` (never a file
of that name in the current directory) into ``runs/default``.
``--config.key=value`` overrides any config key; an unknown key or a wrong type
fails at once.  List-valued keys take a Python literal
(``--config.optim.param_groups='[("head/.*", {}), (".*", None)]'``), and keys of a
free-form section (``optim.kwargs``) may be added (``--config.optim.kwargs.nesterov=True``).
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

import ast
import contextlib
import logging as pylogging
import os
import re
import sys

from absl import app, flags, logging
from ml_collections import config_flags

# No default here: absl would load (run) a default config file at parse time, resolved against
# the current directory, which may be a stranger's workdir.
_CONFIG = config_flags.DEFINE_config_file("config", default=None,
                                          help_string="config file (get_config(arg)) and optional :arg",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "where checkpoints, metrics and plots go "
                               "(default: runs/<config name>)")
_ALLOW_FRESH = flags.DEFINE_bool("allow_fresh_start", False, "when the workdir holds checkpoints but "
                                 "none verifies, move them aside and start from step 0 (default: refuse)")


DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "default.py")


def _flag_value(argv, name: str) -> str | None:
  for i, a in enumerate(argv):
    if a.startswith(f"--{name}="):
      return a.split("=", 1)[1]
    if a == f"--{name}" and i + 1 < len(argv):
      return argv[i + 1]
  return None


def _literal(text: str):
  """A command-line value as Python: the literal it spells, else the text itself.

  >>> _literal("0.9"), _literal("true"), _literal("[1, 2]"), _literal("bfloat16")
  (0.9, True, [1, 2], 'bfloat16')
  """
  text = {"true": "True", "false": "False"}.get(text, text)  # absl spells booleans in lower case
  try:
    return ast.literal_eval(text)
  except (SyntaxError, ValueError):
    return text


class _ListParser(flags.ArgumentParser):
  """``--config.KEY=VALUE`` for a list-valued key: VALUE is a Python list or tuple literal.

  ml_collections parses tuple-valued keys this way but refuses list-valued ones.

  >>> _ListParser().parse('[("head/.*", {}), (".*", None)]')
  [('head/.*', {}), ('.*', None)]
  >>> _ListParser().parse("()")
  []
  >>> _ListParser().parse("[(1,")
  Traceback (most recent call last):
  ...
  ValueError: not a Python list literal: '[(1,'; quote it for the shell, e.g. '[]' or '["a", "b"]'
  """

  def parse(self, argument):
    if isinstance(argument, (list, tuple)):  # the config's own value, which absl takes as the default
      return list(argument)
    try:
      value = ast.literal_eval(argument)
    except (SyntaxError, ValueError):
      value = None
    if not isinstance(value, (list, tuple)):
      raise ValueError(f"not a Python list literal: {argument!r}; quote it for the shell, "
                       "e.g. '[]' or '[\"a\", \"b\"]'")
    return list(value)

  def flag_type(self):
    return "list literal"


def _split_free_form(argv) -> tuple[list[str], list[tuple[str, str, str]]]:
  """Takes ``--config.SECTION.NAME=VALUE`` for free-form sections (``optim.kwargs``) out of argv.

  absl cannot add a key to a locked config, and these sections take any key
  (optax checks them): :func:`_apply_free_form` sets them once the config is loaded.

  >>> _split_free_form(["launch.py", "--config.optim.kwargs.nesterov=True", "--config.optim.lr=1"])
  (['launch.py', '--config.optim.lr=1'], [('optim.kwargs', 'nesterov', 'True')])
  """
  from ftjax.config import FREE_FORM
  keep, taken = [], []
  for a in argv:
    m = re.fullmatch(r"--config\.([\w.]+)\.(\w+)=(.*)", a, re.DOTALL)
    if m and m.group(1) in FREE_FORM:
      taken.append(m.groups())
    else:
      keep.append(a)
  return keep, taken


def _apply_free_form(config, overrides) -> None:
  """Sets ``(section, name, text)`` overrides: an existing key keeps its type, a new one is added."""
  from ftjax.errors import ConfigError
  for section, name, text in overrides:
    node = config
    for part in section.split("."):
      node = node[part]
    value = _literal(text)
    try:
      with node.unlocked():
        node[name] = value
    except TypeError:
      raise ConfigError("wrong type for config key", where=f"--config.{section}.{name}",
                        value=f"{value!r} is {type(value).__name__}",
                        hint=f"expected {type(node[name]).__name__}") from None


def _fail(line: str, code: int):
  print(line, file=sys.stderr)
  sys.exit(code)


def _config_arg(argv) -> str:
  for i, a in enumerate(argv):
    if a.startswith("--config="):
      return a.split("=", 1)[1].split(":")[0]
    if a == "--config" and i + 1 < len(argv):
      return argv[i + 1].split(":")[0]
  return DEFAULT_CONFIG


def _explain(e: BaseException, argv) -> str:
  """A one-line ftjax error for a config/flag failure raised by absl or ml_collections."""
  msg = " ".join(str(e).replace("\\n", " ").replace("\\'", "'").split())
  hint = re.search(r'Did you mean "([^"]+)"', msg)
  hint = f"; did you mean {hint.group(1)}?" if hint else ""
  key = re.search(r'Key "([^"]+)" does not exist', msg) or re.match(r"^[\"']+([\w.]+)'", msg)
  flag = next((a.split("=")[0] for a in argv[1:] if a.startswith("--config.")
               and key and a.split("=")[0].endswith("." + key.group(1))), None)
  if key:
    where = flag or _config_arg(argv)
    from ftjax.config import FREE_FORM
    if flag and flag.removeprefix("--config.").rpartition(".")[0] in FREE_FORM:  # --config.optim.kwargs.x
      hint = f"; give it a value: {flag}=VALUE"
    return f"ftjax: error: unknown config key ({where}): {key.group(1)!r}{hint}"
  cast = re.search(r"override field '([\w.]+)'.*? (\S*) is of original type <class '(\w+)'> and cannot be "
                   r"casted to type <class '(\w+)'>", msg)
  if cast:
    where = next((a.split("=")[0] for a in argv[1:] if a.startswith("--config.")
                  and a.split("=")[0].endswith("." + cast.group(1))), _config_arg(argv))
    return (f"ftjax: error: wrong type for config key ({where}): {cast.group(1)} = {cast.group(2)!r} "
            f"is {cast.group(3)}; expected {cast.group(4)}")
  if "Error whilst parsing config file" in msg:  # the config file raised: its last line says why
    return f"ftjax: error: bad config file ({_config_arg(argv)}): {msg.rsplit('File ', 1)[-1][-300:]}"
  flag = re.search(r"flag (--[\w.]+)=", msg)
  if flag:
    # absl says "flag --NAME=VALUE: why"; VALUE (a literal, say) may hold ': ' itself.
    given = " ".join((_flag_value(argv, flag.group(1)[2:]) or "").split())
    prefix = f"flag {flag.group(1)}={given}: "
    why = msg.split(prefix, 1)[1] if prefix in msg else msg.split(": ", 1)[-1]
    return f"ftjax: error: bad value ({flag.group(1)}): {why[:200]}"
  return f"ftjax: error: bad command line: {msg[:300]}"


def _parse(argv):
  """absl flag parsing, with ftjax's one-line errors instead of usage dumps."""
  from ftjax.errors import EXIT_USAGE, FtjaxError
  workdir = _flag_value(argv, "workdir")
  resuming = workdir and os.path.isfile(os.path.join(workdir, "config.json"))
  if _flag_value(argv, "config") is None and resuming:
    # Resuming a run by its workdir alone (main reads its config.json): absl knows no
    # --config.KEY flags without --config and would call them unknown.
    if any(re.match(r"--(no)?config\.", a) for a in argv[1:]):
      _fail("ftjax: error: --config.KEY overrides need --config (--workdir): resuming from "
            f"{os.path.join(workdir, 'config.json')}; pass --config as well", EXIT_USAGE)
  elif _flag_value(argv, "config") is None:
    argv = [argv[0], f"--config={DEFAULT_CONFIG}", *argv[1:]]
  config_flags.register_flag_parser_for_type(list, _ListParser())  # config_flags' hook for a type
  argv, _ = _split_free_form(argv)  # main applies them to the loaded config
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
      _fail(f"ftjax: error: syntax error in config file ({e.filename}:{e.lineno}): {e.msg}", EXIT_USAGE)
    if not isinstance(e, (flags.Error, AttributeError, KeyError, TypeError, ValueError)):
      detail = " ".join(str(e).split())[:200]
      _fail(f"ftjax: error: config file failed ({_config_arg(argv)}): {type(e).__name__}: {detail}",
            EXIT_USAGE)
    _fail(_explain(e, argv), EXIT_USAGE)


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
  from ftjax import config as config_lib
  from ftjax import train  # imports jax; the backend starts later, after XLA_FLAGS is final
  from ftjax.errors import FtjaxError
  workdir = _WORKDIR.value
  try:
    if _flag_value(sys.argv, "config") is None and workdir and train.stored_config(workdir) is not None:
      # Resuming a run by its workdir alone: the stored JSON is the config (a config.py
      # found there is never executed).  _parse refused --config.KEY overrides.
      config = train.stored_config(workdir)
    else:
      config = _load_config()
      # A hand-built config file may lack whole sections: name the key before reading one.
      config_lib.check_schema(config)
      _apply_free_form(config, _split_free_form(sys.argv)[1])
    if config.train.deterministic:
      # XLA reads XLA_FLAGS once, when the backend starts: set it before anything runs.
      os.environ["XLA_FLAGS"] = train.with_deterministic_flag(os.environ.get("XLA_FLAGS"))
    if workdir is None:
      name = os.path.splitext(os.path.basename(flags.FLAGS["config"].config_filename))[0]
      workdir = os.path.join("runs", name)
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


if __name__ == "__main__":
  app.run(main, flags_parser=_parse)
