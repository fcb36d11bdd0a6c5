"""Prediction CSVs from a real 2-step run, checked against the trainer's eval pipeline."""

import csv
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from PIL import Image

from ftjax import data as data_lib
from ftjax import metrics, models, predict, train

sys.path.insert(0, str(Path(__file__).parent))
from conftest import REPO, subprocess_env, tiny_config  # noqa: E402


@pytest.fixture(scope="module")
def run(tiny_vit_npz, tmp_path_factory):
  wd = tmp_path_factory.mktemp("run")
  train.train_and_evaluate(tiny_config(tiny_vit_npz, **{"train.total_steps": 2, "train.eval_every": 0}),
                           str(wd))
  return wd


@pytest.fixture(scope="module")
def images(tmp_path_factory):
  """Digits test images as PNG and JPEG in class folders, one RGBA non-square PNG, a corrupt
  JPEG at the top level and a text file that is not an image."""
  root = tmp_path_factory.mktemp("images")
  cfg = data_lib.default_config()
  cfg.source = "digits"
  ds = data_lib.build(cfg, split="test")
  for i in range(24):
    folder = root / str(ds.label(i))
    folder.mkdir(exist_ok=True)
    Image.fromarray(ds.image(i)).save(folder / f"img{i:02d}.{'png' if i % 2 else 'jpg'}")
  rgba = np.random.default_rng(0).integers(0, 256, (30, 40, 4), dtype=np.uint8)
  Image.fromarray(rgba, "RGBA").save(root / "3" / "wide.png")
  (root / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
  (root / "notes.txt").write_text("not an image")
  return root


def _read(path):
  with open(path, newline="") as f:
    return list(csv.DictReader(f))


@pytest.mark.slow  # 20 s or more on 2 slow cores; CI runs it (-m slow)
def test_one_row_per_image_with_probabilities_of_the_eval_pipeline(run, images, tmp_path):
  out = predict.predict(run, images, top=10, out=tmp_path / "p.csv", batch_size=8)
  rows = _read(out)
  # The folder source's order (torchvision's): a folder's own files, then its sub-folders'.
  expected = ["broken.jpg"] + sorted(str(p.relative_to(images)) for p in images.glob("[0-9]/*"))
  assert len(expected) == 26 and [r["path"] for r in rows] == expected
  bad = [r for r in rows if r["error"]]
  assert [r["path"] for r in bad] == ["broken.jpg"] and bad[0]["top1_class"] == ""
  good = [r for r in rows if not r["error"]]
  probs = np.array([[float(r[f"top{j}_prob"]) for j in range(1, 11)] for r in good])
  assert np.all((probs >= 0) & (probs <= 1)) and np.all(np.diff(probs, axis=1) <= 0)
  np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=2e-5)  # all 10 classes: the whole softmax
  assert {r["top1_class"] for r in good} <= {str(i) for i in range(10)}

  # Reference: the trainer's own eval path over the same files (folder source, eval iterator).
  model, variables, report = models.from_pretrained(str(run))
  cfg = data_lib.default_config()
  cfg.source, cfg.root, cfg.val_fraction, cfg.image_size = "folder", str(images), 0.0, 32
  ds = data_lib.build(cfg, split="train")
  logits, labels = [], []
  for batch in data_lib.eval_iterator(ds, cfg, global_batch=32, image_size=32, mean=report.mean,
                                      std=report.std):
    m = np.asarray(batch["mask"], bool)
    logits.append(np.asarray(model.apply(variables, batch["image"], train=False))[m])
    labels.append(np.asarray(batch["label"])[m])
  logits, labels = np.concatenate(logits), np.concatenate(labels)
  want = np.asarray(jax.nn.softmax(logits))
  by_path = {r["path"]: r for r in good}
  for i in range(ds.num_examples):
    r = by_path[str(Path(ds.describe(i)).relative_to(images))]
    got = np.zeros(10)
    for j in range(1, 11):
      got[int(r[f"top{j}_class"])] = float(r[f"top{j}_prob"])
    np.testing.assert_allclose(got, want[i], atol=1e-6)

  # Calibration: the evaluator's ECE equals the ECE of the CSV's top-1 confidences.
  counts = metrics.eval_counts(logits, labels, np.ones(len(labels), bool), 10)
  ece = metrics.summarize(counts)["ece"]
  conf = np.array([float(by_path[str(Path(ds.describe(i)).relative_to(images))]["top1_prob"])
                   for i in range(ds.num_examples)])
  correct = np.array([by_path[str(Path(ds.describe(i)).relative_to(images))]["top1_class"]
                      == ds.class_names[labels[i]] for i in range(ds.num_examples)])
  bins = np.minimum((conf * 15).astype(int), 14)
  ref = sum(abs(correct[bins == b].sum() - conf[bins == b].sum()) for b in range(15)) / len(conf)
  assert abs(ece - ref) < 1e-5


def test_cli_top_k_and_one_line_errors(run, images, tmp_path, capsys):
  out = tmp_path / "cli.csv"
  res = subprocess.run([sys.executable, "-m", "ftjax.predict", f"--workdir={run}", f"--images={images}",
                        "--top_k=3", f"--out={out}"], cwd=REPO, env=subprocess_env(),
                       capture_output=True, text=True, timeout=300)
  assert res.returncode == 0, res.stderr
  assert "skipping" in res.stderr and "broken.jpg" in res.stderr
  header = _read(out)[0].keys()
  assert list(header) == ["path", "top1_class", "top1_prob", "top2_class", "top2_prob", "top3_class",
                          "top3_prob", "error"]
  empty = tmp_path / "empty"
  empty.mkdir()
  # symbolic-link cycles: a link to a folder above it, and a link to itself (ELOOP on stat)
  looped, selfed = tmp_path / "looped" / "sub", tmp_path / "selfed"
  for d in (looped, selfed):
    d.mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(d / "a.png")
  (looped / "up").symlink_to("..", target_is_directory=True)
  (selfed / "self").symlink_to("self")
  cases = [([f"--workdir={run}", f"--images={looped.parent}"], 3,
            f"symbolic-link cycle in an image folder ({looped}/up)"),
           ([f"--workdir={run}", f"--images={selfed}"], 3,
            f"symbolic-link cycle in an image folder ({selfed}/self)"),
           ([f"--workdir={tmp_path / 'nope'}", f"--images={images}"], 2, "workdir not found"),
           ([f"--workdir={run}", f"--images={empty}"], 3, "no images in folder"),
           ([f"--workdir={empty}", f"--images={images}"], 3, "checkpoint"),
           ([f"--workdir={run}", f"--images={images}", "--top_k=0"], 2, "top_k must be"),
           ([f"--workdir={run}", f"--images={images}", "--step=newest"], 2,
            "unknown checkpoint step (--step): 'newest'; latest, best or a step number"),
           ([f"--workdir={run}", f"--images={images}", "--step=7"], 3, "checkpoint step not found"),
           # a file where a folder belongs is named as such (both said "not found")
           ([f"--workdir={run}", f"--images={out}"], 3, f"--images is not a folder ({out})"),
           ([f"--workdir={out}", f"--images={images}"], 2, f"workdir is not a directory ({out})"),
           # before the model runs, not a traceback after it (a directory, a file in the path)
           ([f"--workdir={run}", f"--images={images}", f"--out={empty}"], 2,
            f"cannot write the predictions ({empty}): a directory is in the way"),
           ([f"--workdir={run}", f"--images={images}", f"--out={out}/p.csv"], 2,
            f"cannot write the predictions ({out}/p.csv): {out} is not a directory")]
  for argv, code, what in cases:
    assert predict.main(argv) == code
    err = capsys.readouterr().err.strip()
    assert err.startswith("ftjax: error: ") and what in err and "\n" not in err


def test_a_checkpoint_directory_reads_the_runs_resize_and_crop(tiny_vit_npz, tmp_path, recwarn):
  # Given WORKDIR/checkpoints, the eval transform is the run's (it fell back to the defaults).
  wd = tmp_path / "run"
  cfg = tiny_config(tiny_vit_npz, **{"train.total_steps": 1, "train.eval_every": 0,
                                     "data.resize": "squash", "data.crop_fraction": 1.0})
  train.train_and_evaluate(cfg, str(wd))
  assert predict.run_eval_resize(wd) == predict.run_eval_resize(wd / "checkpoints") == ("squash", 1.0)
  assert not [w for w in recwarn if "config.json" in str(w.message)]
  # Checkpoints copied without the run's config: the defaults, said once.
  import shutil
  shutil.copytree(wd / "checkpoints", tmp_path / "copy" / "checkpoints")
  with pytest.warns(UserWarning, match=r"no config.json of the run at .*copy/checkpoints/config.json: "
                                       r"resizing and cropping as the data defaults do \(resize "
                                       r"'shorter_side', crop_fraction 0.875\)"):
    assert predict.run_eval_resize(tmp_path / "copy" / "checkpoints") == ("shorter_side", 0.875)
