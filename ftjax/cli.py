"""The command line's parsing aids for ``launch.py``: override values and one-line errors.

``--config.KEY=VALUE`` for list-valued keys (:class:`ListParser`) and for new keys
of free-form sections (:func:`split_free_form`, :func:`apply_free_form`), and
absl's or ml_collections' failures turned into ftjax's one line
(:func:`explain`).  ``launch.py`` keeps the flags, the parsing and ``main``.
:class:`ToolParser` gives ``python -m ftjax.predict/export/fewshot`` the same one-line errors.
"""

from __future__ import annotations

import argparse
import ast
import difflib
import logging
import re
import signal
import sys
import warnings

from absl import flags

from ftjax.config import FREE_FORM
from ftjax.errors import ConfigError


class ToolParser(argparse.ArgumentParser):
  """argparse for ftjax's tools: a bad command line is one ``ftjax: error:`` line, exit 2
  (argparse prints its usage block first).

  >>> p = ToolParser(prog="python -m ftjax.export")
  >>> _ = p.add_argument("--format", choices=["hf", "timm"], required=True)
  >>> try:
  ...   p.parse_args(["--format", "onnx"])
  ... except SystemExit as e:
  ...   print(e.code)
  2
  """

  def error(self, message: str):
    print(str(ConfigError("bad command line", where=self.prog, value=message, hint="see --help")),
          file=sys.stderr)
    sys.exit(2)


def warning_line(text: str) -> str:
  """An ftjax warning as the one line the command line prints.

  >>> warning_line("ftjax: skipping corrupt image a.png: truncated")
  'ftjax: warning: skipping corrupt image a.png: truncated'
  >>> warning_line("ftjax: warning: damaged checkpoint skipped (ckpt/6): sha256 mismatch")
  'ftjax: warning: damaged checkpoint skipped (ckpt/6): sha256 mismatch'
  """
  return "ftjax: warning: " + text.removeprefix("ftjax: ").removeprefix("warning: ")


class _PlainFormatter(logging.Formatter):

  def format(self, record):
    return warning_line(record.getMessage())


class _StderrHandler(logging.StreamHandler):
  """Writes to ``sys.stderr`` as it is when a record comes, not as it was when the handler was
  made: a command run in-process (tests, notebooks) may have swapped it since."""

  def emit(self, record):
    self.stream = sys.stderr
    super().emit(record)


def plain_warnings() -> None:
  """ftjax's warnings on stderr as one line each: not behind absl's ``W1127 18:03:23.25 ... file.py:504]``
  prefix (its handler on the root logger), nor followed by Python's source line (``warnings.warn``)."""
  log = logging.getLogger("ftjax")
  if not any(isinstance(h.formatter, _PlainFormatter) for h in log.handlers):
    handler = _StderrHandler()
    handler.setFormatter(_PlainFormatter())
    log.addHandler(handler)
  log.propagate = False
  show = warnings.showwarning
  if getattr(show, "ftjax_plain", False):
    return

  def showwarning(message, category, filename, lineno, file=None, line=None):
    if str(message).startswith("ftjax: "):
      print(warning_line(str(message)), file=sys.stderr if file is None else file, flush=True)
    else:
      show(message, category, filename, lineno, file, line)

  showwarning.ftjax_plain = True
  warnings.showwarning = showwarning


def flag_value(argv, name: str) -> str | None:
  """The value of ``--name=V`` or ``--name V`` in ``argv``, before absl has parsed it.

  >>> flag_value(["launch.py", "--workdir", "runs/a", "--config=c.py:steps=5"], "config")
  'c.py:steps=5'
  """
  for i, a in enumerate(argv):
    if a.startswith(f"--{name}="):
      return a.split("=", 1)[1]
    if a == f"--{name}" and i + 1 < len(argv):
      return argv[i + 1]
  return None


def literal(text: str):
  """A command-line value as Python: the literal it spells, else the text itself.

  >>> literal("0.9"), literal("true"), literal("[1, 2]"), literal("bfloat16")
  (0.9, True, [1, 2], 'bfloat16')
  """
  text = {"true": "True", "false": "False"}.get(text, text)  # absl spells booleans in lower case
  try:
    return ast.literal_eval(text)
  except (SyntaxError, ValueError):
    return text


class ListParser(flags.ArgumentParser):
  """``--config.KEY=VALUE`` for a list-valued key: VALUE is a Python list or tuple literal.

  ml_collections parses tuple-valued keys this way but refuses list-valued ones.

  >>> ListParser().parse('[("head/.*", {}), (".*", None)]')
  [('head/.*', {}), ('.*', None)]
  >>> ListParser().parse("()")
  []
  >>> ListParser().parse("[(1,")
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


def drop_superseded(argv) -> list[str]:
  """argv without the ``--config.KEY=VALUE`` flags a later flag overrides: the same key, or a
  section holding it.

  absl applies repeated flags in order, but ``=None`` and free-form keys are taken out
  and applied after the rest (:func:`split_none`, :func:`split_free_form`), which would
  let them win wherever they stand. Dropping what is overridden keeps "the last one wins".

  >>> drop_superseded(["launch.py", "--config.optim.layer_decay=None", "--config.optim.layer_decay=0.75"])
  ['launch.py', '--config.optim.layer_decay=0.75']
  >>> drop_superseded(["launch.py", "--config.optim.kwargs.nesterov=True", "--config.optim.kwargs={}",
  ...                  "--config.optim.kwargs.eps=1.0"])
  ['launch.py', '--config.optim.kwargs={}', '--config.optim.kwargs.eps=1.0']
  """
  keys = [(m.group(1) if m else None, bool(m and m.group(2)))
          for m in (re.match(r"--(?:no)?config\.([\w.]+)(=)?", a) for a in argv)]
  keep = []
  for i, a in enumerate(argv):
    key, has_value = keys[i]
    later = (k for k, _ in keys[i + 1:] if k)
    if key and has_value and any(key == k or key.startswith(k + ".") for k in later):
      continue
    keep.append(a)
  return keep


def split_free_form(argv) -> tuple[list[str], list[tuple[str, str, str]]]:
  """Takes ``--config.SECTION.NAME=VALUE`` for free-form sections (``optim.kwargs``) out of argv.

  absl cannot add a key to a locked config, and these sections take any key
  (optax checks them): :func:`apply_free_form` sets them once the config is loaded.

  >>> split_free_form(["launch.py", "--config.optim.kwargs.nesterov=True", "--config.optim.lr=1"])
  (['launch.py', '--config.optim.lr=1'], [('optim.kwargs', 'nesterov', 'True')])
  """
  keep, taken = [], []
  for a in argv:
    m = re.fullmatch(r"--config\.([\w.]+)\.(\w+)=(.*)", a, re.DOTALL)
    if m and m.group(1) in FREE_FORM:
      taken.append(m.groups())
    else:
      keep.append(a)
  return keep, taken


def apply_free_form(config, overrides) -> None:
  """Sets ``(section, name, text)`` overrides: an existing key keeps its type, a new one is added."""
  for section, name, text in overrides:
    node = config
    for part in section.split("."):
      node = node[part]
    value = literal(text)
    try:
      with node.unlocked():
        node[name] = value
    except TypeError:
      raise ConfigError("wrong type for config key", where=f"--config.{section}.{name}",
                        value=f"{value!r} is {type(value).__name__}",
                        hint=f"expected {type(node[name]).__name__}") from None


def split_none(argv) -> tuple[list[str], list[str]]:
  """Takes ``--config.KEY=None`` out of argv: absl would parse the text "None" as the key's type.

  ``None`` is how a config says "the default" for its optional keys (``model.num_classes``:
  from the data; ``optim.layer_decay``: none); :func:`apply_none` sets them once the
  config is loaded.

  >>> split_none(["launch.py", "--config.optim.layer_decay=None", "--config.optim.lr=1"])
  (['launch.py', '--config.optim.lr=1'], ['optim.layer_decay'])
  """
  keep, taken = [], []
  for a in argv:
    m = re.fullmatch(r"--config\.([\w.]+)=None", a)
    if m and m.group(1).rpartition(".")[0] not in FREE_FORM:  # there None is a value like any other
      taken.append(m.group(1))
    else:
      keep.append(a)
  return keep, taken


def apply_none(config, keys, schema) -> None:
  """Sets each dotted key to None; only keys whose ``schema`` default is None (optional ones) take it."""
  for key in keys:
    *parents, name = key.split(".")
    node, section = config, schema
    for i, part in enumerate(key.split(".")):
      if not hasattr(section, "keys") or part not in section:
        near = difflib.get_close_matches(part, list(section.keys()) if hasattr(section, "keys") else [], n=1)
        raise ConfigError("unknown config key", where=f"--config.{key}", value=repr(part),
                          hint=f"did you mean {near[0]}?" if near else None)
      if i < len(parents):
        node, section = node[part], section[part]
    if section[name] is not None:
      raise ConfigError("config key cannot be None", where=f"--config.{key}", value="None",
                        hint=f"give it a value, e.g. {section[name]!r}")
    node[name] = None


def config_arg(argv, default: str) -> str:
  """The config file ``--config`` names (its ``:arg`` cut off), else ``default``."""
  for i, a in enumerate(argv):
    if a.startswith("--config="):
      return a.split("=", 1)[1].split(":")[0]
    if a == "--config" and i + 1 < len(argv):
      return argv[i + 1].split(":")[0]
  return default


def explain(e: BaseException, argv, default_config: str) -> str:
  """A one-line ftjax error for a config/flag failure raised by absl or ml_collections."""
  msg = " ".join(str(e).replace("\\n", " ").replace("\\'", "'").split())
  hint = re.search(r'Did you mean "([^"]+)"', msg)
  hint = f"; did you mean {hint.group(1)}?" if hint else ""
  key = re.search(r'Key "([^"]+)" does not exist', msg) or re.match(r"^[\"']+([\w.]+)'", msg)
  # The flag naming the key anywhere in its path: --config.optim.lrr, and --config.optimm.lr
  # (that one used to be blamed on the config file).
  flag = next((a.split("=")[0] for a in argv[1:] if a.startswith("--config.") and key
               and f".{key.group(1)}." in "." + a.split("=")[0].removeprefix("--config.") + "."), None)
  if key:
    where = flag or config_arg(argv, default_config)
    if flag and flag.removeprefix("--config.").rpartition(".")[0] in FREE_FORM:  # --config.optim.kwargs.x
      hint = f"; give it a value: {flag}=VALUE"
    return f"ftjax: error: unknown config key ({where}): {key.group(1)!r}{hint}"
  cast = re.search(r"override field '([\w.]+)'.*? (\S*) is of original type <class '(\w+)'> and cannot be "
                   r"casted to type <class '(\w+)'>", msg)
  if cast:
    where = next((a.split("=")[0] for a in argv[1:] if a.startswith("--config.")
                  and a.split("=")[0].endswith("." + cast.group(1))), config_arg(argv, default_config))
    return (f"ftjax: error: wrong type for config key ({where}): {cast.group(1)} = {cast.group(2)!r} "
            f"is {cast.group(3)}; expected {cast.group(4)}")
  if "Error whilst parsing config file" in msg:  # the config file raised: its last line says why
    return f"ftjax: error: bad config file ({config_arg(argv, default_config)}): {msg.rsplit('File ', 1)[-1][-300:]}"
  flag = re.search(r"flag (--[\w.]+)=", msg)
  if flag:
    # absl says "flag --NAME=VALUE: why"; VALUE (a literal, say) may hold ': ' itself.
    given = " ".join((flag_value(argv, flag.group(1)[2:]) or "").split())
    prefix = f"flag {flag.group(1)}={given}: "
    why = msg.split(prefix, 1)[1] if prefix in msg else msg.split(": ", 1)[-1]
    # absl's boolean parser raises ValueError(text, argument), which prints as a tuple.
    why = re.sub(r"^\('(.*)', '(.*)'\)$", r"\1: '\2'; expected true or false", why)
    return f"ftjax: error: bad value ({flag.group(1)}): {why[:200]}"
  return f"ftjax: error: bad command line: {msg[:300]}"


# ---------------------------------------------------------------------------
# Signals before the training loop's own handler (ftjax.train._SigtermFlag) takes over.

SIGNALS_SEEN: list[int] = []  # every SIGINT / SIGTERM caught by catch_signals_early


class Terminated(BaseException):
  """SIGTERM outside the training loop (a BaseException, as KeyboardInterrupt is: no
  ``except Exception`` on the way mistakes it for a failure of its own)."""


def catch_signals_early() -> None:
  """Ctrl-C raises KeyboardInterrupt and SIGTERM :class:`Terminated`, each recorded in
  :data:`SIGNALS_SEEN`.  Python swallows an exception raised inside a garbage-collection
  callback (jax registers one): the record still stops the run, at the training loop's
  start-up check, which reads it.  Without this a Ctrl-C during start-up could be lost,
  and the run trained to its end and exited 0."""
  def handle(signum, frame):
    SIGNALS_SEEN.append(signum)
    raise KeyboardInterrupt if signum == signal.SIGINT else Terminated()

  for sig in (signal.SIGINT, signal.SIGTERM):
    signal.signal(sig, handle)


def drop_closed_event_loop_noise() -> None:
  """Drops "Event loop is closed" from the unraisable-exception hook, passes on the rest.

  A checkpoint write that fails in orbax (a full disk) leaves tensorstore calling back
  into its closed event loop: hundreds of tracebacks on stderr above the run's one-line
  error, which says what happened (``FTJAX_TRACEBACK=1`` shows them).
  """
  default = sys.unraisablehook

  def hook(unraisable):
    if isinstance(unraisable.exc_value, RuntimeError) and str(unraisable.exc_value) == "Event loop is closed":
      return
    default(unraisable)

  sys.unraisablehook = hook
