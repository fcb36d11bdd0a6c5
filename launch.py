"""Fine-tune a pretrained model: ``python launch.py --config configs/<name>.py[:arg] --workdir DIR``.

With no arguments it runs ``configs/default.py`` into ``runs/default``.
``--config.key=value`` overrides any config key; an unknown key or a wrong type
fails at once.  Errors print one line and exit with the codes in the README
(2 usage/config, 3 data/checkpoint, 4 numerics, 75 preempted: rerun to resume).
Set ``FTJAX_TRACEBACK=1`` for a traceback.
"""

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", default="configs/default.py",
                                          help_string="config file (get_config(arg)) and optional :arg",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "where checkpoints, metrics and plots go "
                               "(default: runs/<config name>)")


def _fail(line: str, code: int):
  print(line, file=sys.stderr)
  sys.exit(code)


def _parse(argv):
  """absl flag parsing, with ftjax's one-line errors instead of usage dumps."""
  from ftjax.errors import EXIT_USAGE
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    msg = " ".join(str(e).split())
    if os.environ.get("FTJAX_TRACEBACK"):
      raise
    _fail(f"ftjax: error: bad command line: {msg}", EXIT_USAGE)


def main(argv):
  logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
  if len(argv) > 1:
    _fail(f"ftjax: error: unexpected arguments: {' '.join(argv[1:])}; use --flag=value", 2)
  from ftjax.errors import FtjaxError
  try:
    config = _CONFIG.value
  except Exception as e:  # a config file that does not load: bad key, bad type, syntax
    if os.environ.get("FTJAX_TRACEBACK"):
      raise
    _fail(f"ftjax: error: bad config ({flags.FLAGS['config'].config_filename}): "
          f"{' '.join(str(e).split())[:300]}", 2)
  workdir = _WORKDIR.value
  if workdir is None:
    name = os.path.splitext(os.path.basename(flags.FLAGS["config"].config_filename))[0]
    workdir = os.path.join("runs", name)
  from ftjax import train
  try:
    train.train_and_evaluate(config, workdir)
  except FtjaxError as e:
    if os.environ.get("FTJAX_TRACEBACK"):
      raise
    _fail(str(e), e.exit_code)


if __name__ == "__main__":
  app.run(main, flags_parser=_parse)
