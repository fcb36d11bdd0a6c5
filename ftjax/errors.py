"""User-facing errors: one line, a category, an exit code.

Every failure a user can cause is raised as a subclass of :class:`FtjaxError`.
The CLI prints ``str(err)`` (one line) and exits with ``err.exit_code``; a
traceback is printed only with ``FTJAX_TRACEBACK=1``.

The line reads ``ftjax: error: <what> (<where>): <value>; <hint>``.

>>> e = ConfigError("unknown config key", where="--config.optim.lrr", value="0.1",
...                 hint="did you mean optim.lr?")
>>> print(e)
ftjax: error: unknown config key (--config.optim.lrr): 0.1; did you mean optim.lr?
>>> e.exit_code
2
"""

from __future__ import annotations

import os
import sys

EXIT_USAGE = 2  # bad config, bad command line, bad argument
EXIT_DATA = 3  # bad data or bad checkpoint
EXIT_NUMERICS = 4  # non-finite loss / parameters
EXIT_PREEMPTED = 75  # preempted (SIGTERM) after a clean save: rerun to resume (EX_TEMPFAIL)
EXIT_INTERRUPTED = 130  # Ctrl-C after a clean save (128 + SIGINT, as shells report it)


class FtjaxError(Exception):
  """Base class: a one-line, user-facing error with an exit code."""

  exit_code = 1

  def __init__(self, what: str, *, where: str | None = None, value=None,
               hint: str | None = None):
    self.what = what
    self.where = where
    self.value = value
    self.hint = hint
    super().__init__(self._line())

  def _line(self) -> str:
    line = f"ftjax: error: {self.what}"
    if self.where is not None:
      line += f" ({self.where})"
    if self.value is not None:
      line += f": {self.value}"
    if self.hint:
      line += f"; {self.hint}"
    # Exactly one line, whatever the parts contain.
    return " ".join(line.splitlines())

  def __str__(self) -> str:
    return self._line()


class ConfigError(FtjaxError, ValueError):
  """A bad config value, config key, argument or command line."""

  exit_code = EXIT_USAGE


class DataError(FtjaxError, ValueError):
  """Bad or missing data: empty folders, unprepared datasets, class counts."""

  exit_code = EXIT_DATA


class CheckpointError(FtjaxError, ValueError):
  """A missing, damaged, refused or mismatching checkpoint or weight file."""

  exit_code = EXIT_DATA


class NumericsError(FtjaxError, FloatingPointError):
  """A non-finite loss, gradient or parameter."""

  exit_code = EXIT_NUMERICS


class Preempted(FtjaxError):
  """The run was asked to stop (SIGTERM) and saved; rerun the command to resume."""

  exit_code = EXIT_PREEMPTED


class Interrupted(Preempted):
  """Ctrl-C: the run saved at the end of its step; rerun the command to resume."""

  exit_code = EXIT_INTERRUPTED


def report(error: FtjaxError) -> int:
  """What a command-line ``main`` does with an FtjaxError it caught: print its one line to
  stderr and return its exit code; with ``FTJAX_TRACEBACK=1`` re-raise it instead."""
  if os.environ.get("FTJAX_TRACEBACK"):
    raise error
  print(str(error), file=sys.stderr)
  return error.exit_code
