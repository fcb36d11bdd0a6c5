"""Few-shot ridge probes: separable features, a least-squares reference, features of real models."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ftjax import data as data_lib
from ftjax import fewshot, lora, models
from ftjax.errors import ConfigError, DataError
from ftjax.tree import flatten, unflatten


def _separable(num_classes=10, dim=64, per_class=40, seed=0):
  """Gaussian blobs around orthogonal centres 4 apart, noise 0.3: separable by a wide margin."""
  rng = np.random.default_rng(seed)
  centres = 4.0 * np.linalg.qr(rng.normal(size=(dim, num_classes)))[0].T
  labels = np.repeat(np.arange(num_classes), per_class)
  return centres[labels] + rng.normal(0, 0.3, (len(labels), dim)), labels


def test_separable_features_reach_100_percent_at_every_shot_count():
  x, y = _separable(per_class=90)
  test = np.arange(len(y)) % 3 == 0  # 30 test and 60 train examples per class
  acc = fewshot.fewshot_evaluate(x[~test], y[~test], x[test], y[test], shots=(1, 5, 10, 25),
                                 l2_reg=1.0)
  assert acc == {1: 1.0, 5: 1.0, 10: 1.0, 25: 1.0}


def test_labels_that_no_feature_predicts_stay_at_chance():
  rng = np.random.default_rng(0)
  x, y = rng.normal(size=(2000, 16)), rng.integers(0, 4, 2000)
  acc = fewshot.fewshot_evaluate(x[:1000], y[:1000], x[1000:], y[1000:], shots=(25,), l2_reg=1.0)
  assert 0.15 < acc[25] < 0.35


def test_features_are_standardised_as_big_vision_does_so_the_scale_of_a_feature_does_not_matter():
  # big_vision's l2_reg (2**10) is meant for features standardised on the shot set; without it
  # a feature's units decide how hard it is regularised (25 shots on digits: 34% against 42%).
  x, y = _separable(num_classes=4, dim=12, per_class=30)
  x = x + np.random.default_rng(1).normal(0, 2.0, x.shape)  # noisy enough not to be perfect
  test = np.arange(len(y)) % 2 == 0
  scale = np.exp(np.random.default_rng(2).normal(0, 2.0, x.shape[1]))
  shift = np.random.default_rng(3).normal(0, 50.0, x.shape[1])
  want = fewshot.fewshot_evaluate(x[~test], y[~test], x[test], y[test], shots=(1, 5, 10), l2_reg=1024.0)
  got = fewshot.fewshot_evaluate(x[~test] * scale + shift, y[~test], x[test] * scale + shift, y[test],
                                 shots=(1, 5, 10), l2_reg=1024.0)
  assert got == want and 0.3 < want[10] < 1.0
  # and the same numbers as big_vision's formula: standardise, then ridge with a free bias
  idx = fewshot.shot_indices(y[~test], 5, 4, seed=0)
  xs, ys = x[~test][idx], y[~test][idx]
  mean, std = xs.mean(0), xs.std(0) + 1e-5
  w, b = fewshot.ridge_fit((xs - mean) / std, 2.0 * np.eye(4)[ys] - 1.0, 1024.0)
  pred = np.argmax((x[test] - mean) / std @ w + b, axis=1)
  assert want[5] == float(np.mean(pred == y[test]))


@pytest.mark.parametrize("n,d", [(40, 8), (12, 50)], ids=["primal", "dual"])
@pytest.mark.parametrize("l2", [0.0, 0.5, 1024.0])
def test_ridge_matches_a_least_squares_reference(n, d, l2):
  rng = np.random.default_rng(n + d)
  x, y = rng.normal(size=(n, d)) + 3.0, rng.normal(size=(n, 3))
  w, b = fewshot.ridge_fit(x, y, l2)
  # Reference: ridge as one least-squares system over [w; b], the bias column unpenalised:
  # [[X, 1], [sqrt(l2) I, 0]] [w; b] = [Y; 0]; lstsq gives the minimum-norm solution when l2 = 0.
  a = np.block([[x, np.ones((n, 1))], [np.sqrt(l2) * np.eye(d), np.zeros((d, 1))]])
  rhs = np.concatenate([y, np.zeros((d, 3))])
  if l2 == 0.0 and n < d:
    # min-norm over w only (the bias stays free): solve on centred data
    xc, yc = x - x.mean(0), y - y.mean(0)
    ref_w = np.linalg.lstsq(xc, yc, rcond=None)[0]
    ref_b = y.mean(0) - x.mean(0) @ ref_w
  else:
    sol = np.linalg.lstsq(a, rhs, rcond=None)[0]
    ref_w, ref_b = sol[:d], sol[d]
  np.testing.assert_allclose(w, ref_w, rtol=1e-8, atol=1e-9)
  np.testing.assert_allclose(b, ref_b, rtol=1e-8, atol=1e-9)


def test_shots_are_nested_and_too_few_examples_is_an_error():
  labels = np.repeat(np.arange(3), 30)
  sets = [set(fewshot.shot_indices(labels, k, 3, seed=7)) for k in (1, 5, 10, 25)]
  assert all(a < b for a, b in zip(sets, sets[1:]))
  assert [np.bincount(labels[sorted(s)]).tolist() for s in sets[:2]] == [[1, 1, 1], [5, 5, 5]]
  with pytest.raises(DataError, match="too few training examples"):
    fewshot.shot_indices(labels, 31, 3, seed=0)


@pytest.mark.parametrize("shots", [(0,), (-1,), (5, -3), (), (True,)], ids=str)
def test_shots_must_be_positive_integers(tmp_path, capsys, shots):
  # 0 shots used to fail inside the feature extractor; -1 "scored" 1.0 (labels[:-1] per class).
  x, y = _separable(num_classes=3, dim=8, per_class=10)
  with pytest.raises(ConfigError, match=r"^ftjax: error: shots must be one or more positive "
                                        r"integers \(shots\): \[") as e:
    fewshot.fewshot_evaluate(x, y, x, y, shots=shots, l2_reg=1.0)
  assert "\n" not in str(e.value)
  train_ds = data_lib.from_arrays(np.zeros((6, 2, 2), np.uint8), [0, 1, 2] * 2)
  with pytest.raises(ConfigError, match="shots must be one or more positive integers"):
    fewshot.FewshotEvaluator(train_ds, train_ds, data_lib.default_config(), shots=shots)
  if shots and not isinstance(shots[0], bool):
    # the command line: one line, usage exit code, and no run read (this workdir does not exist)
    flag = ",".join(map(str, shots))
    assert fewshot.main([f"--workdir={tmp_path / 'none'}", f"--shots={flag}"]) == 2
    out = capsys.readouterr()
    assert out.out == "" and out.err == (
        f"ftjax: error: shots must be one or more positive integers (--shots): {list(shots)}; "
        "k shots train the probe on k examples of every class\n")


def test_a_one_class_pool_is_refused():
  one = data_lib.from_arrays(np.zeros((6, 2, 2), np.uint8), [0] * 6, ["cat"])
  with pytest.raises(DataError, match=r"^ftjax: error: a classifier needs at least 2 classes \(arrays\): "
                                      r"1 class, 'cat'"):
    fewshot.FewshotEvaluator(one, one, data_lib.default_config(), shots=(1,))


@pytest.fixture(scope="module")
def vit():
  model, _ = models.create("vit", {"variant": "test"}, num_classes=10, image_size=32)
  flat = flatten(models.init_variables(model, 32, seed=0))
  flat["params/head/kernel"] = np.random.default_rng(0).normal(
      0, 0.3, flat["params/head/kernel"].shape).astype(np.float32)
  return model, jax.tree.map(jnp.asarray, unflatten(flat))


def test_features_are_the_head_input_for_vit_lora_and_resnet(vit):
  model, variables = vit
  x = jnp.asarray(np.random.default_rng(0).normal(size=(3, 32, 32, 3)), jnp.float32)
  head = variables["params"]["head"]
  for m, v in [(model, variables),
               (lora.LoraModel(model, lora.LoraSpec(rank=2)),
                {"params": lora.add_lora(variables["params"], lora.LoraSpec(rank=2), jax.random.key(1))})]:
    f = fewshot.features(m, v, x)
    assert f.shape == (3, 32)
    np.testing.assert_allclose(f @ head["kernel"] + head["bias"], m.apply(v, x), atol=1e-5)
  rn, _ = models.create("resnet", {"block": "basic", "depths": (1,), "widths": (8,), "stem_width": 8},
                        num_classes=4, image_size=32)
  rv = models.init_variables(rn, 32)
  f = fewshot.features(rn, rv, x)
  assert f.shape == (3, 8)
  np.testing.assert_allclose(f @ rv["params"]["head"]["kernel"] + rv["params"]["head"]["bias"],
                             rn.apply(rv, x), atol=1e-5)


def test_evaluator_on_digits_equals_the_function_on_extracted_features(vit):
  model, variables = vit
  cfg = data_lib.default_config()
  cfg.source, cfg.image_size = "digits", 32
  train_ds, test_ds = data_lib.build(cfg, split="train"), data_lib.build(cfg, split="test")
  test_ds = test_ds.subset(np.arange(200))
  ev = fewshot.FewshotEvaluator(train_ds, test_ds, cfg, shots=(1, 5), l2_reg=1.0, seed=3)
  assert ev.train_ds.num_examples == 5 * 10
  got = ev(model, variables, image_size=32, mean=(0.5,) * 3, std=(0.5,) * 3)
  kw = dict(image_size=32, mean=(0.5,) * 3, std=(0.5,) * 3)
  xtr, ytr = fewshot.extract_features(model, variables, train_ds, cfg, **kw)  # every example
  xte, yte = fewshot.extract_features(model, variables, test_ds, cfg, **kw)
  assert xte.shape == (200, 32) and yte.tolist() == test_ds.labels.tolist()
  # Each k-shot score is that of k alone on the whole train split: embedding only the pool
  # changes nothing, nor do the other shot counts asked for (a k-shot set drawn again inside
  # the pool made the 1-shot score depend on max(shots)).
  want = {k: fewshot.fewshot_evaluate(xtr, ytr, xte, yte, (k,), 1.0, 3, 10)[k] for k in (1, 5)}
  assert got == {"fewshot_1shot": want[1], "fewshot_5shot": want[5]}
  alone = fewshot.FewshotEvaluator(train_ds, test_ds, cfg, shots=(1,), l2_reg=1.0, seed=3)
  assert alone(model, variables, **kw) == {"fewshot_1shot": want[1]}
  # even random-init ViT features beat chance (0.1) on digits with 5 shots (measured: 0.325)
  assert got["fewshot_5shot"] > 0.2


@pytest.mark.slow  # 15 s or more on 2 slow cores (the default run neared 15 min); CI runs it (-m slow)
def test_cli_on_a_trained_run(tiny_vit_npz, tmp_path, capsys):
  import json
  import sys
  from pathlib import Path
  sys.path.insert(0, str(Path(__file__).parent))
  from conftest import tiny_config

  from ftjax import train
  wd = tmp_path / "run"
  # fine-tuned on 2 digits per class: the probe still draws its 5 shots from the whole train split
  train.train_and_evaluate(tiny_config(tiny_vit_npz, **{"train.total_steps": 2, "train.eval_every": 0,
                                                        "data.per_class": 2}), str(wd))
  capsys.readouterr()  # the trainer's own output
  assert fewshot.main([f"--workdir={wd}", "--shots=1,5", "--l2_reg=1.0", "--step=2"]) == 0
  got = json.loads(capsys.readouterr().out)
  # the same evaluation by hand: the trained weights, the run's data config, digits train/test
  model, variables, report = models.from_pretrained(str(wd))
  cfg = fewshot.run_data_config(wd)
  assert cfg.source == "digits" and cfg.image_size == 32 and cfg.per_class == 2
  cfg.per_class = None
  ev = fewshot.FewshotEvaluator(data_lib.build(cfg, split="train"), data_lib.build(cfg, split="test"),
                                cfg, shots=(1, 5), l2_reg=1.0)
  assert got == ev(model, variables, image_size=32, mean=report.mean, std=report.std)
  assert fewshot.main([f"--workdir={wd}", "--shots=1,five"]) == 2
  assert capsys.readouterr().err.startswith("ftjax: error: shots must be comma-separated integers")
  # The checkpoint directory reads the run's config too; bad seeds and regularisers are one line.
  assert fewshot.run_data_config(wd / "checkpoints").per_class == 2
  for flag, err in (("--seed=-1", "few-shot seed must be a non-negative integer (--seed): -1"),
                    ("--l2_reg=nan", "few-shot l2_reg must be >= 0 (--l2_reg): nan")):
    assert fewshot.main([f"--workdir={wd}", "--shots=1", flag]) == 2
    assert capsys.readouterr().err == f"ftjax: error: {err}\n"
  x, y = _separable(num_classes=3, dim=8, per_class=10)
  with pytest.raises(ConfigError, match="l2_reg must be >= 0"):
    fewshot.fewshot_evaluate(x, y, x, y, shots=(1,), l2_reg=float("nan"))
  with pytest.raises(ConfigError, match=r"seed must be a non-negative integer \(seed\): -2"):
    fewshot.fewshot_evaluate(x, y, x, y, shots=(1,), seed=-2)
  # A run that evaluated no split: the probe needs --split.
  stored = json.loads((wd / "config.json").read_text())
  stored["data"]["eval_splits"] = []
  (wd / "config.json").write_text(json.dumps(stored))
  assert fewshot.main([f"--workdir={wd}", "--shots=1"]) == 2
  assert capsys.readouterr().err == ("ftjax: error: run evaluated no split to test the probe on "
                                     "(data.eval_splits): []; pass --split (e.g. test or val)\n")
