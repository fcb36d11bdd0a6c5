"""Few-shot linear probes on frozen features: closed-form ridge regression (big_vision's fewshot).

For ``k`` shots per class, ``k`` training examples of every class are drawn
(seeded, nested: the 1-shot set is inside the 5-shot set), a ridge regression
maps their features to targets ``2 * onehot - 1`` (in {-1, 1}, as big_vision),
and test examples take the class of the largest output.  As in big_vision, every
feature is first standardised with the mean and standard deviation (plus 1e-5)
of the shot set, train and test alike: ``l2_reg`` then means the same whatever a
feature's units, and big_vision's default 2**10 gives big_vision's numbers.
Features and targets are centred on the training means, so the bias is the
target mean and is not regularised; the weights solve ``(X^T X + l2 I) W = X^T Y``
(or its dual form ``W = X^T (X X^T + l2 I)^-1 Y`` when there are fewer examples
than features; the two are the same matrix).  Solved in float64 on the host: at most 25 shots
times the class count rows.

Features are the model's input to its ``head`` layer (the pre-logits
representation: ViT's pooled, normalised token; ResNet's pooled map), taken
with a flax method interceptor, so any ftjax model (and a LoRA model) works
unchanged.

On its own, for a training run (its data config, train split as the shot pool,
first eval split as the test set; prints JSON)::

  python -m ftjax.fewshot --workdir RUN --shots 1,5,10,25 [--l2_reg 1024] [--split test]

>>> rng = np.random.default_rng(0)
>>> centres = 5.0 * np.eye(3)
>>> labels = np.repeat(np.arange(3), 30)
>>> feats = centres[labels] + rng.normal(0, 0.3, (90, 3))
>>> fewshot_evaluate(feats, labels, feats, labels, shots=(1, 5), l2_reg=1.0)
{1: 1.0, 5: 1.0}
"""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ftjax import data as data_lib
from ftjax.errors import ConfigError, DataError, FtjaxError, report

SHOTS = (1, 5, 10, 25)
L2_REG = 2.0 ** 10  # big_vision's default regulariser for its fewshot evaluator


def ridge_fit(x: np.ndarray, y: np.ndarray, l2_reg: float) -> tuple[np.ndarray, np.ndarray]:
  """(W [d, c], b [c]) minimising ``|X W + b - Y|^2 + l2_reg |W|^2`` (bias not regularised).

  >>> x = np.array([[0.0], [1.0], [2.0]]); y = 2 * x + 1
  >>> w, b = ridge_fit(x, y, 0.0)
  >>> np.round(w, 6).tolist(), np.round(b, 6).tolist()
  ([[2.0]], [1.0])
  """
  x = np.asarray(x, np.float64)
  y = np.asarray(y, np.float64)
  if x.ndim != 2 or y.ndim != 2 or len(x) != len(y):
    raise ValueError(f"x [n, d] and y [n, c] expected, got {x.shape} and {y.shape}")
  x_mean, y_mean = x.mean(0), y.mean(0)
  xc, yc = x - x_mean, y - y_mean
  n, d = xc.shape
  if n < d:  # dual: an n x n system instead of d x d
    w = xc.T @ np.linalg.solve(xc @ xc.T + l2_reg * np.eye(n), yc) if l2_reg > 0 else \
        np.linalg.lstsq(xc, yc, rcond=None)[0]
  else:
    w = np.linalg.solve(xc.T @ xc + l2_reg * np.eye(d), xc.T @ yc) if l2_reg > 0 else \
        np.linalg.lstsq(xc, yc, rcond=None)[0]
  return w, y_mean - x_mean @ w


def check_shots(shots: Sequence[int], where: str = "shots") -> tuple[int, ...]:
  """``shots`` as a tuple of ints, or a ConfigError unless each is a positive integer.

  >>> check_shots([1, np.int64(5)])
  (1, 5)
  >>> check_shots([5, 0], where="--shots")
  Traceback (most recent call last):
  ...
  ftjax.errors.ConfigError: ftjax: error: shots must be one or more positive integers (--shots): [5, 0]; k shots train the probe on k examples of every class
  """
  shots = list(shots)
  # bool is an int to Python, and True would quietly mean 1 shot.
  if not shots or any(isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1 for k in shots):
    raise ConfigError("shots must be one or more positive integers", where=where,
                      value=[k.item() if isinstance(k, np.generic) else k for k in shots],
                      hint="k shots train the probe on k examples of every class")
  return tuple(int(k) for k in shots)


def shot_indices(labels: np.ndarray, shots: int, num_classes: int, seed: int) -> np.ndarray:
  """Sorted indices of ``shots`` examples of each class; nested across ``shots``.

  Class ``c`` draws from its own stream ``[seed, c]``, so the k-shot set is the
  first k of one fixed permutation of the class's examples.

  >>> labels = np.array([0, 0, 0, 1, 1, 1])
  >>> one, two = shot_indices(labels, 1, 2, 0), shot_indices(labels, 2, 2, 0)
  >>> set(one) <= set(two), len(two)
  (True, 4)
  """
  labels = np.asarray(labels)
  keep = []
  for c in range(num_classes):
    members = np.flatnonzero(labels == c)
    if len(members) < shots:
      raise DataError("too few training examples for few-shot", where=f"class {c}",
                      value=f"{len(members)} < {shots} shots", hint="use fewer shots or more data")
    keep.append(np.random.default_rng([seed, c]).permutation(members)[:shots])
  return np.sort(np.concatenate(keep))


def pool_draws(labels: np.ndarray, shots: Sequence[int], num_classes: int,
               seed: int) -> tuple[np.ndarray, dict[int, np.ndarray]]:
  """``(pool, rows)``: the largest shot set of ``labels``, and for each k the rows of the
  pool holding the k-shot set, the very set :func:`shot_indices` draws for k alone.

  Only the pool need be embedded, and a k-shot score does not depend on the other shot
  counts asked for (drawing the k-shot set again inside the pool did: another set).

  >>> labels = np.repeat(np.arange(3), 20)
  >>> pool, rows = pool_draws(labels, (1, 5), 3, 0)
  >>> len(pool), [len(r) for r in rows.values()]
  (15, [3, 15])
  >>> bool(np.array_equal(pool[rows[1]], shot_indices(labels, 1, 3, 0)))
  True
  """
  pool = shot_indices(labels, max(shots), num_classes, seed)
  return pool, {k: np.searchsorted(pool, shot_indices(labels, k, num_classes, seed)) for k in shots}


def fewshot_evaluate(features_train: np.ndarray, labels_train: np.ndarray, features_test: np.ndarray,
                     labels_test: np.ndarray, shots: Sequence[int] = SHOTS, l2_reg: float = L2_REG,
                     seed: int = 0, num_classes: int | None = None,
                     rows: Mapping[int, np.ndarray] | None = None) -> dict[int, float]:
  """Test accuracy of a ridge probe trained on ``k`` examples per class, for each ``k`` in ``shots``.

  Args:
    features_train, labels_train: the pool the shots are drawn from ([n, d], [n]).
    features_test, labels_test: evaluated in full.
    shots: examples per class.
    l2_reg: the ridge regulariser (>= 0; 0 is least squares, minimum-norm).
    seed: which examples are drawn.
    num_classes: default ``max(label) + 1`` over both sets.
    rows: for each k, the rows of ``features_train`` to train on (:func:`pool_draws`);
      default :func:`shot_indices` of ``labels_train``.
  """
  if not float(l2_reg) >= 0:  # NaN too
    raise ConfigError("few-shot l2_reg must be >= 0", where="l2_reg", value=l2_reg)
  if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
    raise ConfigError("few-shot seed must be a non-negative integer", where="seed", value=repr(seed))
  shots = check_shots(shots)
  labels_train = np.asarray(labels_train)
  labels_test = np.asarray(labels_test)
  if num_classes is None:
    num_classes = int(max(labels_train.max(), labels_test.max())) + 1
  test = np.asarray(features_test, np.float64)
  out = {}
  for k in shots:
    idx = rows[k] if rows is not None else shot_indices(labels_train, k, num_classes, seed)
    targets = 2.0 * np.eye(num_classes)[labels_train[idx]] - 1.0
    x = np.asarray(features_train, np.float64)[idx]
    # big_vision's whitening: its l2_reg is meant for unit-variance features.
    mean, std = x.mean(0), x.std(0) + 1e-5
    w, b = ridge_fit((x - mean) / std, targets, float(l2_reg))
    pred = np.argmax((test - mean) / std @ w + b, axis=1)
    out[k] = float(np.mean(pred == labels_test))
  return out


def _head_input(next_fun, args, kwargs, context):
  # The top-level head returns what it was given: the model's output becomes its features.
  if context.method_name == "__call__" and tuple(context.module.path) == ("head",):
    return args[0]
  return next_fun(*args, **kwargs)


def features(model, variables, images: jax.Array) -> jax.Array:
  """The input of ``model``'s top-level ``head`` layer for ``images`` (eval mode), float32.

  >>> from ftjax import models
  >>> m, shapes = models.create("vit", {"variant": "test"}, num_classes=3, image_size=32)
  >>> v = jax.eval_shape(m.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
  >>> jax.eval_shape(lambda v, x: features(m, v, x), v, jnp.zeros((2, 32, 32, 3))).shape
  (2, 32)
  """
  with nn.intercept_methods(_head_input):
    return model.apply(variables, images, train=False).astype(jnp.float32)


def extract_features(model, variables, ds: data_lib.Dataset, data_config, *, image_size: int,
                     mean, std, batch_size: int = 64) -> tuple[np.ndarray, np.ndarray]:
  """(features [n, d], labels [n]) of every example of ``ds`` with the eval preprocessing."""
  fn = jax.jit(lambda v, x: features(model, v, x))
  feats, labels = [], []
  for batch in data_lib.eval_iterator(ds, data_config, global_batch=batch_size, image_size=image_size,
                                      mean=mean, std=std):
    mask = np.asarray(batch["mask"], bool)
    feats.append(np.asarray(fn(variables, batch["image"]))[mask])
    labels.append(np.asarray(batch["label"])[mask])
  return np.concatenate(feats), np.concatenate(labels)


class FewshotEvaluator:
  """Few-shot accuracy of a model's current features, for the trainer's eval points or alone.

  Built once per run; each call embeds the pool and the test set with the
  variables it is given and returns ``{"fewshot_<k>shot": accuracy}``::

    evaluator = FewshotEvaluator(train_ds, test_ds, config.data, shots=(1, 5, 10, 25))
    evaluator(model, {"params": params}, image_size=224, mean=report.mean, std=report.std)

  The pool is the ``max(shots)`` examples per class drawn from ``train_ds``; it
  holds every smaller shot set (nested draws), so only the pool and ``test_ds``
  are embedded, and each k-shot set is the one ``shots=(k,)`` would draw.
  """

  def __init__(self, train_ds: data_lib.Dataset, test_ds: data_lib.Dataset, data_config, *,
               shots: Sequence[int] = SHOTS, l2_reg: float = L2_REG, seed: int = 0,
               batch_size: int = 64):
    data_lib.check_classifiable(train_ds)  # one class: every probe is "right", 100% by definition
    if test_ds.num_classes != train_ds.num_classes:
      raise DataError("few-shot train and test sets differ in classes", where=test_ds.name,
                      value=f"{test_ds.num_classes} vs {train_ds.num_classes}")
    self.shots, self.l2_reg, self.seed = check_shots(shots), float(l2_reg), seed
    self.num_classes = train_ds.num_classes
    # The largest draw holds every smaller one (nested draws), so embed just that.
    pool, self.rows = pool_draws(train_ds.labels, self.shots, self.num_classes, seed)
    self.train_ds = train_ds.subset(pool, name=f"{train_ds.name}[fewshot pool]")
    self.test_ds, self.data_config, self.batch_size = test_ds, data_config, batch_size

  def __call__(self, model, variables, *, image_size: int, mean, std) -> dict[str, float]:
    kw = dict(image_size=image_size, mean=mean, std=std, batch_size=self.batch_size)
    xtr, ytr = extract_features(model, variables, self.train_ds, self.data_config, **kw)
    xte, yte = extract_features(model, variables, self.test_ds, self.data_config, **kw)
    acc = fewshot_evaluate(xtr, ytr, xte, yte, self.shots, self.l2_reg, self.seed, self.num_classes,
                           rows=self.rows)
    return {f"fewshot_{k}shot": a for k, a in acc.items()}


def run_data_config(workdir: str | Path):
  """The data config a training run stored in ``<workdir>/config.json`` (``workdir`` may be its
  checkpoint directory)."""
  from ftjax.checkpoint import run_workdir
  from ftjax.data.config import default_config
  stored = run_workdir(workdir) / "config.json"
  if not stored.is_file():
    raise ConfigError("run has no stored config.json", where=str(workdir),
                      hint="pass the --workdir of a training run")
  config = default_config()
  config.update(json.loads(stored.read_text())["data"])
  return config


def evaluate_run(workdir: str | Path, *, shots: Sequence[int] = SHOTS, l2_reg: float = L2_REG,
                 seed: int = 0, split: str | None = None, batch_size: int = 64,
                 step: int | str | None = None) -> dict[str, float]:
  """Few-shot accuracies of a training run's newest checkpoint (or ``step``: "best" or a
  step number) on its own data.

  The shots are drawn from the whole train split: a run's ``data.per_class`` is its
  fine-tuning label budget, not a limit on the probe (the default run's 10 per class
  would rule out 25 shots).
  """
  from ftjax.predict import load_model
  model, variables, meta = load_model(workdir, step=step)
  config = run_data_config(workdir)
  if not split and not config.eval_splits:
    raise ConfigError("run evaluated no split to test the probe on", where="data.eval_splits",
                      value="[]", hint="pass --split (e.g. test or val)")
  test_split = split or config.eval_splits[0]
  pool = config.copy_and_resolve_references()
  pool.per_class = None
  evaluator = FewshotEvaluator(data_lib.build(pool, split=config.train_split),
                               data_lib.build(config, split=test_split), config, shots=shots,
                               l2_reg=l2_reg, seed=seed, batch_size=batch_size)
  return evaluator(model, variables, image_size=int(meta["image_size"][0]), mean=meta["mean"],
                   std=meta["std"])


def main(argv: Sequence[str] | None = None) -> int:
  from ftjax.cli import ToolParser
  parser = ToolParser(prog="python -m ftjax.fewshot", description=__doc__.split("\n")[0])
  parser.add_argument("--workdir", required=True, help="a training run's workdir")
  parser.add_argument("--shots", default=",".join(map(str, SHOTS)), help="comma-separated, e.g. 1,5")
  parser.add_argument("--l2_reg", type=float, default=L2_REG)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--split", default=None, help="test split; default the run's first eval split")
  parser.add_argument("--step", default="latest", help="latest (default), best or a step number")
  args = parser.parse_args(argv)
  from ftjax.cli import plain_warnings
  plain_warnings()  # one line each, as launch.py prints them
  try:
    try:
      shots = [int(k) for k in args.shots.split(",")]
    except ValueError:
      raise ConfigError("shots must be comma-separated integers", where="--shots",
                        value=repr(args.shots)) from None
    shots = check_shots(shots, where="--shots")  # before the run is read: fails at once
    if not args.l2_reg >= 0:
      raise ConfigError("few-shot l2_reg must be >= 0", where="--l2_reg", value=args.l2_reg)
    if args.seed < 0:
      raise ConfigError("few-shot seed must be a non-negative integer", where="--seed", value=args.seed)
    result = evaluate_run(args.workdir, shots=shots, l2_reg=args.l2_reg, seed=args.seed,
                          split=args.split, step=args.step)
  except FtjaxError as e:
    return report(e)
  print(json.dumps(result))
  return 0


if __name__ == "__main__":
  sys.exit(main())


__all__ = ["L2_REG", "SHOTS", "FewshotEvaluator", "check_shots", "evaluate_run", "extract_features",
           "features", "fewshot_evaluate", "main", "pool_draws", "ridge_fit", "run_data_config", "shot_indices"]
