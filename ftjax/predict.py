"""Prediction with a trained run: top-k classes and probabilities for every image in a folder.

::

  python -m ftjax.predict --workdir RUN --images FOLDER --top_k 5 [--out preds.csv]

The model, its weights (LoRA adapters merged, see :func:`ftjax.export.read_run`)
and its preprocessing come from the run: image size, mean and std from the
checkpoint's model metadata, the eval resize and crop from the run's stored
``config.json`` (``data.resize``, ``data.crop_fraction``).  Images are found
recursively (``.jpg .jpeg .png .webp .bmp``, hidden files skipped) in sorted
order.  The CSV has one row per image::

  path,top1_class,top1_prob,...,topK_class,topK_prob,error

``path`` is relative to the folder; an image that does not decode gets a row
with only ``error`` filled (and a warning on stderr), the others still run.
"""

from __future__ import annotations

import csv
import io
import json
import os
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from ftjax.data.folder import ImageFile, image_paths
from ftjax.data.transforms import Preprocess, normalize
from ftjax.errors import ConfigError, DataError, FtjaxError, report
from ftjax.metrics import write_atomically


def list_images(folder: str | os.PathLike) -> list[str]:
  """Image paths under ``folder``, found and ordered as the folder source finds a class's
  (:func:`ftjax.data.folder.image_paths`: recursive, symbolic links followed, hidden files
  and folders skipped, torchvision ``ImageFolder``'s order).

  >>> import tempfile
  >>> d = Path(tempfile.mkdtemp()); (d / "b").mkdir(); (d / ".hidden").mkdir()
  >>> for name in ("b/x.PNG", "a.jpg", "notes.txt", ".hidden/y.jpg"): _ = (d / name).write_bytes(b"")
  >>> [os.path.relpath(p, d) for p in list_images(d)]
  ['a.jpg', 'b/x.PNG']
  """
  root = Path(folder)
  if not root.is_dir():
    raise DataError("image folder not found" if not root.exists() else "--images is not a folder",
                    where=str(root), hint="pass --images FOLDER (of images, searched recursively)")
  found, _ = image_paths(str(root))
  if not found:
    raise DataError("no images in folder", where=str(root), value=0,
                    hint="expected .jpg, .jpeg, .png, .webp or .bmp files")
  return found


def run_eval_resize(workdir: str | os.PathLike) -> tuple[str, float]:
  """(``data.resize``, ``data.crop_fraction``) of a run's stored config: how its eval
  transform resizes and crops.  ``workdir`` may be the run's checkpoint directory.  Without
  a stored config (checkpoints copied on their own) the data defaults, with a warning."""
  from ftjax.checkpoint import run_workdir
  from ftjax.data.config import default_config
  data = default_config()
  resize, crop = data.resize, data.crop_fraction
  stored = run_workdir(workdir) / "config.json"
  if stored.is_file():
    cfg = json.loads(stored.read_text()).get("data", {})
    resize, crop = cfg.get("resize", resize), cfg.get("crop_fraction", crop)
  else:
    warnings.warn(f"ftjax: no config.json of the run at {stored}: resizing and cropping as the data "
                  f"defaults do (resize {resize!r}, crop_fraction {crop}), not necessarily as the run did",
                  stacklevel=2)
  return resize, float(crop)


def run_preprocessing(workdir: str | os.PathLike, meta: dict) -> tuple[Preprocess, tuple, tuple]:
  """(eval transform, mean, std) of a run: sizes and statistics from its checkpoint metadata,
  resize mode and crop fraction from its stored config (:func:`run_eval_resize`)."""
  resize, crop = run_eval_resize(workdir)
  h, w = (int(s) for s in meta["image_size"])
  if h != w:
    raise ConfigError("prediction needs a square image size", where="checkpoint image_size",
                      value=f"{h}x{w}")
  return (Preprocess(image_size=h, resize=resize, crop_fraction=crop), tuple(meta["mean"]),
          tuple(meta["std"]))


def load_model(workdir: str | os.PathLike, *, ema: bool = False, step: int | str | None = None):
  """(flax module, variables, model metadata) of a run's checkpoint, LoRA merged: the newest,
  or ``step`` ("best" or a step number, :func:`ftjax.export.run_step`)."""
  from ftjax import export, models
  variables, meta = export.read_run(workdir, ema=ema, step=step)
  model, _ = models.create(meta["family"], meta["arch"], num_classes=int(meta["num_classes"]),
                           image_size=tuple(meta["image_size"]))
  return model, variables, meta


def top_k(probs: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
  """(indices, probabilities) of the ``k`` most probable classes per row, most probable first;
  ties go to the lower class index.

  >>> top_k(np.array([[0.2, 0.5, 0.3]]), 2)
  (array([[1, 2]]), array([[0.5, 0.3]]))
  """
  idx = np.argsort(-probs, axis=1, kind="stable")[:, :k]
  return idx, np.take_along_axis(probs, idx, axis=1)


def predict(workdir: str | os.PathLike, images: str | os.PathLike, *, top: int = 5,
            out: str | os.PathLike | None = None, batch_size: int = 32, ema: bool = False,
            step: int | str | None = None) -> Path:
  """Writes the prediction CSV (default ``<workdir>/predictions.csv``); returns its path."""
  if isinstance(top, bool) or not isinstance(top, int) or top < 1:
    raise ConfigError("top_k must be a positive integer", where="--top_k", value=top)
  if batch_size < 1:
    raise ConfigError("batch size must be positive", where="--batch_size", value=batch_size)
  paths = list_images(images)
  target = Path(out) if out is not None else Path(workdir) / "predictions.csv"
  if Path(workdir).is_dir():  # else load_model names the missing workdir
    _check_writable(target)  # before the work, not after it
  model, variables, meta = load_model(workdir, ema=ema, step=step)
  pre, mean, std = run_preprocessing(workdir, meta)
  num_classes = int(meta["num_classes"])
  names = list(meta.get("class_names") or [str(i) for i in range(num_classes)])
  k = min(top, num_classes)
  probs_fn = jax.jit(lambda v, x: jax.nn.softmax(model.apply(v, x, train=False).astype(jnp.float32)))

  rows: dict[str, list] = {}
  errors: dict[str, str] = {}
  for start in range(0, len(paths), batch_size):
    chunk, arrays = [], []
    for p in paths[start:start + batch_size]:
      try:
        arrays.append(pre.apply(ImageFile(p)))
        chunk.append(p)
      except DataError as e:
        errors[p] = e.value or e.what
        print(f"ftjax: warning: skipping {p}: {errors[p]}", file=sys.stderr)
    if not chunk:
      continue
    batch = np.stack(arrays)
    n = len(batch)
    # Pad to a fixed batch size: one compilation for the whole folder.
    batch = np.concatenate([batch, np.zeros((batch_size - n, *batch.shape[1:]), batch.dtype)])
    probs = np.asarray(probs_fn(variables, jnp.asarray(normalize(batch, mean, std))))[:n]
    idx, p = top_k(probs, k)
    for path, ii, pp in zip(chunk, idx, p):
      rows[path] = [x for i, q in zip(ii, pp) for x in (names[i], f"{q:.6f}")]

  header = ["path"] + [f"top{j}_{c}" for j in range(1, k + 1) for c in ("class", "prob")] + ["error"]
  text = io.StringIO(newline="")
  w = csv.writer(text)
  w.writerow(header)
  for path in paths:
    rel = os.path.relpath(path, images)
    if path in errors:
      w.writerow([rel] + [""] * (2 * k) + [errors[path]])
    else:
      w.writerow([rel] + rows[path] + [""])
  try:
    write_atomically(target, text.getvalue())  # a full disk leaves no half-written CSV
  except OSError as e:
    raise ConfigError("cannot write the predictions", where=str(target), value=e.strerror,
                      hint="pass another --out") from None
  return target


def _check_writable(target: Path) -> None:
  """Fails with one line now if the CSV could not be written at the end."""
  if target.is_dir():
    raise ConfigError("cannot write the predictions", where=str(target), value="a directory is in the way",
                      hint="pass --out FILE.csv")
  existing = next(p for p in target.absolute().parents if p.exists())
  if not existing.is_dir():
    raise ConfigError("cannot write the predictions", where=str(target), value=f"{existing} is not a directory",
                      hint="pass another --out")
  probe = target.with_name(f"{target.name}.tmp")
  try:
    target.parent.mkdir(parents=True, exist_ok=True)
    probe.open("w").close()
    probe.unlink()
  except OSError as e:
    raise ConfigError("cannot write the predictions", where=str(target), value=e.strerror,
                      hint="pass another --out") from None


def main(argv: Sequence[str] | None = None) -> int:
  from ftjax.cli import ToolParser
  parser = ToolParser(prog="python -m ftjax.predict", description=__doc__.split("\n")[0])
  parser.add_argument("--workdir", required=True, help="a training run's workdir")
  parser.add_argument("--images", required=True, help="folder of images (searched recursively)")
  parser.add_argument("--top_k", type=int, default=5)
  parser.add_argument("--out", default=None, help="CSV path; default WORKDIR/predictions.csv")
  parser.add_argument("--batch_size", type=int, default=32)
  parser.add_argument("--ema", action="store_true", help="use the EMA parameters")
  parser.add_argument("--step", default="latest", help="latest (default), best or a step number")
  args = parser.parse_args(argv)
  from ftjax.cli import plain_warnings
  plain_warnings()  # one line each, as launch.py prints them
  try:
    out = predict(args.workdir, args.images, top=args.top_k, out=args.out, batch_size=args.batch_size,
                  ema=args.ema, step=args.step)
  except FtjaxError as e:
    return report(e)
  print(f"wrote {out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())


__all__ = ["list_images", "load_model", "main", "predict", "run_eval_resize", "run_preprocessing", "top_k"]
