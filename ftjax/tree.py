"""'/'-joined parameter paths and the one regex selector every feature uses.

Parameters are plain nested dicts (or FrozenDicts).  A leaf is addressed by the
keys on its way joined with '/', for example
``Transformer/encoderblock_3/MlpBlock_0/Dense_0/kernel``.  Freezing, learning-rate
multipliers, weight-decay masks, "do not load" lists and sharding rules are all
lists of ``(regex, value)`` rules compiled by :func:`rule_tree`: the regex must
match the whole path, the first matching rule wins, and a leaf no rule covers is
an error.

>>> params = {"head": {"kernel": 1, "bias": 2}, "body": {"kernel": 3}}
>>> flatten(params)
{'body/kernel': 3, 'head/bias': 2, 'head/kernel': 1}
>>> rule_tree(params, [("head/.*", "train"), (".*", "frozen")])
{'body': {'kernel': 'frozen'}, 'head': {'bias': 'train', 'kernel': 'train'}}
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import jax

from ftjax.errors import ConfigError

Rules = Sequence[tuple[str, Any]]


def _key_str(key) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def path_str(key_path) -> str:
  """'/'-joins a ``jax.tree_util`` key path."""
  return "/".join(_key_str(k) for k in key_path)


def flatten(tree) -> dict[str, Any]:
  """Nested mapping -> ``{path: leaf}`` with sorted '/'-joined paths."""
  out = {}
  for kp, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    out[path_str(kp)] = leaf
  return dict(sorted(out.items()))


def unflatten(flat: Mapping[str, Any]) -> dict:
  """``{path: leaf}`` -> nested plain dicts.

  >>> unflatten({"a/b": 1, "a/c": 2, "d": 3})
  {'a': {'b': 1, 'c': 2}, 'd': 3}
  >>> unflatten({"a": 1, "a/b": 2})
  Traceback (most recent call last):
  ...
  ValueError: path 'a/b' goes through a leaf at 'a'
  """
  out: dict = {}
  for path, leaf in flat.items():
    node = out
    *parents, last = path.split("/")
    for p in parents:
      node = node.setdefault(p, {})
      if not isinstance(node, dict):
        raise ValueError(f"path {path!r} goes through a leaf at {p!r}")
    node[last] = leaf
  return out


def map_with_path(fn: Callable[[str, Any], Any], tree):
  """Like ``jax.tree.map`` but ``fn(path, leaf)`` also gets the '/'-joined path.

  The output keeps the input's container types (dict or FrozenDict).
  """
  return jax.tree_util.tree_map_with_path(lambda kp, x: fn(path_str(kp), x), tree)


def compile_rules(rules: Rules, what: str = "rule") -> list[tuple[re.Pattern, Any, str]]:
  compiled = []
  for i, rule in enumerate(rules):
    if not (isinstance(rule, (tuple, list)) and len(rule) == 2 and isinstance(rule[0], str)):
      raise ConfigError(f"a {what} must be a (regex, value) pair", where=f"{what} #{i}",
                        value=repr(rule))
    try:
      compiled.append((re.compile(rule[0]), rule[1], rule[0]))
    except re.error as e:
      raise ConfigError(f"invalid regex in {what}", where=f"{what} #{i}", value=repr(rule[0]),
                        hint=str(e)) from None
  return compiled


def first_match(path: str, compiled) -> int | None:
  """Index of the first compiled rule whose regex fully matches ``path``."""
  for i, (rx, _, _) in enumerate(compiled):
    if rx.fullmatch(path):
      return i
  return None


def rule_tree(tree, rules: Rules, *, what: str = "rule", default: Any = ...,
              allow_unused: bool = False):
  """Maps every leaf of ``tree`` to the value of the first rule fully matching its path.

  Args:
    tree: a nested mapping of leaves (params, shapes, anything).
    rules: ``[(regex, value), ...]``; ``re.fullmatch`` on the '/'-joined path.
    what: the name used in error messages ("param group", "wd rule", ...).
    default: value for leaves no rule covers; without it an uncovered leaf is
      an error that lists the uncovered paths.
    allow_unused: unless true, a rule that matches no leaf is an error (it is
      almost always a typo).

  Returns:
    a tree of the same structure holding the chosen values.

  >>> rule_tree({"a": 0, "b": 0}, [("a", 1)], default=0)
  {'a': 1, 'b': 0}
  >>> rule_tree({"head": {"kernel": 0, "kernel_scale": 0}}, [("head/kernel", "t"), (".*", "f")])
  {'head': {'kernel': 't', 'kernel_scale': 'f'}}
  >>> rule_tree({"a": 0}, [("a", 1), ("c", 2)])
  Traceback (most recent call last):
  ...
  ftjax.errors.ConfigError: ftjax: error: rule matches no parameter (rule #1): 'c'; paths look like 'a'
  >>> rule_tree({"a": 0}, [(".*", 1), ("a", 2)])
  Traceback (most recent call last):
  ...
  ftjax.errors.ConfigError: ftjax: error: rule is shadowed by an earlier one (rule #1): 'a'; rule #0 ('.*') takes 'a' first; the first matching rule wins: put the narrower rule first
  """
  compiled = compile_rules(rules, what)
  used = [False] * len(compiled)
  uncovered = []

  def pick(path, _):
    i = first_match(path, compiled)
    if i is None:
      if default is ...:
        uncovered.append(path)
      return default
    used[i] = True
    return compiled[i][1]

  out = map_with_path(pick, tree)
  if uncovered:
    shown = ", ".join(uncovered[:8]) + (f", ... ({len(uncovered)} in all)" if len(uncovered) > 8 else "")
    raise ConfigError(f"parameter covered by no {what}", where=shown, value=None,
                      hint="add a catch-all rule such as ('.*', ...)")
  if not allow_unused:
    for i, u in enumerate(used):
      if not u:
        paths = list(flatten(tree))
        shadowed = [p for p in paths if compiled[i][0].fullmatch(p)]
        if shadowed:  # it matches, but an earlier rule takes every path first
          j = first_match(shadowed[0], compiled)
          raise ConfigError(f"{what} is shadowed by an earlier one", where=f"{what} #{i}",
                            value=repr(compiled[i][2]),
                            hint=f"{what} #{j} ({compiled[j][2]!r}) takes {shadowed[0]!r} first; "
                                 "the first matching rule wins: put the narrower rule first")
        raise ConfigError(f"{what} matches no parameter", where=f"{what} #{i}",
                          value=repr(compiled[i][2]), hint=f"paths look like {paths[0] if paths else ''!r}")
  return out


def select(tree, regex: str) -> list[str]:
  """Sorted paths of ``tree`` fully matching ``regex``.

  >>> select({"a": {"kernel": 0, "bias": 0}}, ".*/kernel")
  ['a/kernel']
  >>> select({"a": {"kernel": 0}, "ba": {"kernel": 0}}, "a/kernel")
  ['a/kernel']
  """
  rx = re.compile(regex)
  return [p for p in flatten(tree) if rx.fullmatch(p)]


def any_match(path: str, regexes: Iterable[str], what: str = "regex") -> bool:
  """Whether any of ``regexes`` fully matches ``path``; a malformed one is a ConfigError.

  >>> any_match("head/kernel", ["body/.*", "head/.*"])
  True
  >>> any_match("head/kernel", ["head/("], what="model.dont_load")
  Traceback (most recent call last):
  ...
  ftjax.errors.ConfigError: ftjax: error: invalid regex (model.dont_load): 'head/('; missing ), unterminated subpattern at position 5
  """
  for r in regexes:
    try:
      if re.fullmatch(r, path):
        return True
    except re.error as e:
      raise ConfigError("invalid regex", where=what, value=repr(r), hint=str(e)) from None
  return False
