"""ftjax.data: sources, transforms, loaders, mixing (issue 5 acceptance)."""

import json
import os
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

import ftjax.data as fd
from ftjax.data import transforms
from ftjax.errors import ConfigError, DataError

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


def _config(**kw):
  c = fd.default_config()
  c.prefetch = 0
  for k, v in kw.items():
    node, *rest = k.split("__")
    if rest:
      c[node][rest[0]] = v
    else:
      c[k] = v
  return c


def _plain(**kw):
  """No random augmentation; the whole image (crop_fraction 1)."""
  return _config(augment__random_resized_crop=False, augment__flip=False, crop_fraction=1.0, **kw)


def _batches(it, n):
  return [jax.tree.map(np.asarray, next(it)) for _ in range(n)]


# ---------------------------------------------------------------- tfds


def test_tfds_mock_cifar10_yields_normalised_batches(tmp_path):
  c = _plain(source="tfds", name="cifar10", data_dir=str(tmp_path))
  with tfds.testing.mock_data(num_examples=100):
    ds = fd.build(c, split="train")
    assert (ds.num_examples, ds.num_classes, ds.name) == (100, 10, "tfds:cifar10/train")
    it = fd.train_iterator(ds, c, global_batch=8, image_size=32, mean=MEAN, std=STD, seed=3)
    batch = _batches(it, 1)[0]
    _, examples = it.batches.examples(0)
    raw = [ds.source.source[int(i)] for i in examples]
    test = fd.build(c, split="test")
    evals = _batches(fd.eval_iterator(test, c, global_batch=32, image_size=32, mean=MEAN,
                                      std=STD), 4)
    few = fd.build(_plain(source="tfds", name="cifar10", data_dir=str(tmp_path), per_class=2),
                   split="train")
  assert [int(b["mask"].sum()) for b in evals] == [32, 32, 32, 4]
  assert np.concatenate([b["label"][b["mask"]] for b in evals]).tolist() == test.labels.tolist()
  assert np.bincount(few.labels).tolist() == [2] * 10
  assert batch["image"].shape == (8, 32, 32, 3) and batch["image"].dtype == np.float32
  assert batch["label"].dtype == np.int32
  expected = (np.stack([r["image"] for r in raw]) / 255.0 - np.array(MEAN)) / np.array(STD)
  np.testing.assert_allclose(batch["image"], expected, atol=2e-6)
  assert batch["label"].tolist() == [int(r["label"]) for r in raw]


def test_tfds_not_prepared_names_the_command(tmp_path):
  c = _config(source="tfds", name="cifar10", data_dir=str(tmp_path))
  with pytest.raises(DataError) as e:
    fd.build(c, split="train")
  assert str(e.value).endswith(
      f"pip install 'ftjax[prepare]' && tfds build cifar10 --data_dir={tmp_path} "
      "--file_format=array_record")
  assert "\n" not in str(e.value)


def _png(value: int) -> bytes:
  import io
  out = io.BytesIO()
  Image.fromarray(np.full((6, 8, 3), value, np.uint8)).save(out, format="PNG")
  return out.getvalue()


class TinyArrayRecord(tfds.core.GeneratorBasedBuilder):
  """Seven 6x8 PNGs, written as real array_record files (encoded bytes given: no TensorFlow)."""
  VERSION = tfds.core.Version("1.0.0")
  code_path = None  # tfds looks for checksums beside the defining module, which a test lacks

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        "image": tfds.features.Image(shape=(6, 8, 3), encoding_format="png"),
        "image16": tfds.features.Tensor(shape=(6, 8), dtype=np.uint16),
        "depth": tfds.features.Tensor(shape=(6, 8), dtype=np.float32),
        "label": tfds.features.ClassLabel(names=["a", "b", "c"])}))

  def _split_generators(self, dl_manager):
    return {"train": self._generate_examples(7), "test": self._generate_examples(5)}

  def _generate_examples(self, n):
    for i in range(n):
      yield i, {"image": _png(10 * i), "image16": np.full((6, 8), 2560 * i + 255, np.uint16),
                "depth": np.full((6, 8), 0.1 * i, np.float32), "label": i % 3}


def test_tfds_array_record_files_read_through_grain(tmp_path):
  TinyArrayRecord(data_dir=str(tmp_path), file_format="array_record").download_and_prepare()
  c = _plain(source="tfds", name="tiny_array_record", data_dir=str(tmp_path))
  train = fd.build(c, split="train")
  assert (train.num_examples, train.class_names) == (7, ("a", "b", "c"))
  # The label column comes from records whose image stays encoded: no image is decoded
  # to learn the labels (on ImageNet, 1.28M JPEG decodes before the first step).
  decoding = train.source.source

  class NoDecoding:
    def __len__(self):
      return len(decoding)

    def __getitem__(self, j):
      raise AssertionError(f"record {j} decoded to read its label")

  train.source.source = NoDecoding()
  labels = train.labels.tolist()
  train.source.source = decoding
  # every record decodes to its own pixels and label (tfds shuffles the records on disk)
  values = [int(train.image(i)[0, 0, 0]) // 10 for i in range(7)]
  assert sorted(values) == list(range(7)) and labels == [v % 3 for v in values]
  test = fd.build(c, split="test")
  batches = _batches(fd.eval_iterator(test, c, global_batch=2, image_size=8, mean=(0, 0, 0),
                                      std=(1, 1, 1)), 3)
  pixels = np.concatenate([np.rint(b["image"][b["mask"]][:, 0, 0, 0] * 255) for b in batches])
  labels = np.concatenate([b["label"][b["mask"]] for b in batches])
  assert sorted(pixels.tolist()) == [0, 10, 20, 30, 40] and labels.tolist() == [
      int(p) // 10 % 3 for p in pixels]
  c.per_class = 2
  assert np.bincount(fd.build(c, split="train").labels).tolist() == [2, 2, 2]
  # a 16-bit image keeps its top 8 bits (not the low ones: 255), as a 16-bit PNG in a folder;
  # a float one used to be cast to uint8 (0.1 * i -> 0), now it is an error naming it
  c.per_class, c.image_key = None, "image16"
  wide = fd.build(c, split="train")
  assert [int(wide.image(i)[0, 0, 0]) // 10 for i in range(7)] == values
  c.image_key = "depth"
  with pytest.raises(DataError, match=r"tfds image is neither 8- nor 16-bit \(tiny_array_record/"
                                      r"train record 0\): depth: float32 \(6, 8\)"):
    fd.build(c, split="train").image(0)


class TinyUnlabelledTest(tfds.core.GeneratorBasedBuilder):
  """Three labelled train PNGs and a test split of two whose labels are -1, as ImageNet's."""
  VERSION = tfds.core.Version("1.0.0")
  code_path = None

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        "image": tfds.features.Image(shape=(6, 8, 3), encoding_format="png"),
        "label": tfds.features.ClassLabel(names=["a", "b", "c"])}))

  def _split_generators(self, dl_manager):
    return {"train": self._generate_examples(3, labelled=True),
            "test": self._generate_examples(2, labelled=False)}

  def _generate_examples(self, n, labelled=True):
    for i in range(n):
      yield i, {"image": _png(10 * i), "label": i if labelled else -1}


def test_tfds_unlabelled_split_is_one_error_naming_a_record(tmp_path):
  # -1 used to train as an all-zero target (no loss) and evaluate as the last class.
  TinyUnlabelledTest(data_dir=str(tmp_path), file_format="array_record").download_and_prepare()
  c = _plain(source="tfds", name="tiny_unlabelled_test", data_dir=str(tmp_path))
  assert sorted(fd.build(c, split="train").labels.tolist()) == [0, 1, 2]
  test = fd.build(c, split="test")
  with pytest.raises(DataError) as e:
    test.labels
  assert str(e.value) == (
      "ftjax: error: label out of range (tiny_unlabelled_test/test record 0): label -1 of 3 "
      "classes, 2 of 2 examples; -1 marks an unlabelled split: train and evaluate on labelled ones")


# ---------------------------------------------------------------- folders

COLOURS = {"cat": (200, 10, 10), "dog": (10, 200, 10), "eel": (10, 10, 200)}


@pytest.fixture
def image_root(tmp_path):
  root = tmp_path / "pets"
  for c, colour in COLOURS.items():
    (root / c).mkdir(parents=True)
    for k in range(4):
      Image.fromarray(np.full((24, 32, 3), colour, np.uint8)).save(root / c / f"{k}.png")
      Image.fromarray(np.full((32, 24, 3), colour, np.uint8)).save(root / c / f"{k}.jpg",
                                                                  quality=95)
  good = (root / "dog" / "0.jpg").read_bytes()
  (root / "dog" / "broken.jpg").write_bytes(good[: len(good) // 2])
  (root / "cat" / "notes.txt").write_text("not an image")
  return root


def test_folder_labels_and_one_skipped_file(image_root):
  c = _plain(source="folder", root=str(image_root), val_fraction=0.0)
  with pytest.warns(UserWarning, match="broken.jpg"):
    ds = fd.build(c, split="train")
  assert ds.class_names == ("cat", "dog", "eel")
  assert ds.num_examples == 24
  assert [os.path.basename(p) for p in ds.skipped] == ["broken.jpg"]
  assert np.bincount(ds.labels).tolist() == [8, 8, 8]
  for i in range(ds.num_examples):  # every image's colour is its class's colour
    pixel = tuple(int(v) for v in ds.image(i)[5, 5])
    assert np.abs(np.subtract(pixel, COLOURS[ds.class_names[ds.label(i)]])).max() <= 3
  ev = fd.eval_iterator(ds, c, global_batch=24, image_size=16, mean=MEAN, std=STD)
  batch = _batches(ev, 1)[0]
  assert batch["image"].shape == (24, 16, 16, 3)
  assert batch["label"].tolist() == ds.labels.tolist()


def test_images_in_other_formats_are_named_in_one_warning(tmp_path):
  # A class's TIFFs used to be left out without a word. Images one folder down were too,
  # then named in this warning; now they are read (sub/c.png) and only other formats remain.
  for name in ("a.png", "b.tif", "sub/c.png", "sub/deep/d.gif", "notes.txt", ".hidden.gif"):
    (tmp_path / "p" / "x" / name).parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (4, 4)).save(tmp_path / "p" / "x" / name, format="PNG")
  with pytest.warns(UserWarning) as seen:
    ds = fd.build(_plain(source="folder", root=str(tmp_path / "p"), val_fraction=0.0), split="train")
  assert ds.num_examples == 2 and [str(w.message) for w in seen] == [
      f"ftjax: {tmp_path}/p: not read: 2 images in other formats inside class folders "
      "(e.g. x/b.tif); only {.jpg,.jpeg,.png,.webp,.bmp} files are read"]


def _image_tree(root, names):
  for k, name in enumerate(names):
    (root / name).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((6, 5, 3), k, np.uint8)).save(root / name)


def test_folder_reads_nested_images_in_torchvision_order(tmp_path):
  root, elsewhere = tmp_path / "pets", tmp_path / "elsewhere"
  _image_tree(root, ["cat/z.png", "cat/a/c.png", "cat/a-b/d.png", "cat/a/x/e.jpg", "cat/b.JPEG",
                     "cat/.ipynb_checkpoints/h.png", "cat/a/.hidden/i.png", "cat/.j.png",
                     ".cache/k.png", "dog/only/deeper/y.png", "dog/only/n.webp"])
  _image_tree(elsewhere, ["m.png", "sub/o.bmp"])
  (root / "dog" / "linked").symlink_to(elsewhere, target_is_directory=True)  # followed
  (root / "dog" / "cats").symlink_to(root / "cat", target_is_directory=True)  # not a cycle
  with warnings.catch_warnings():
    warnings.simplefilter("error")  # sub-folders are read: nothing to warn about
    ds = fd.build(_plain(source="folder", root=str(root), val_fraction=0.0), split="train")
  # Folders by path, each one's files by name; hidden files and folders skipped. dog has
  # images only in sub-folders, and is not empty.
  assert ds.class_names == ("cat", "dog")
  assert [os.path.relpath(p, root) for p in ds.source.paths] == [
      "cat/b.JPEG", "cat/z.png", "cat/a/c.png", "cat/a-b/d.png", "cat/a/x/e.jpg",
      "dog/cats/b.JPEG", "dog/cats/z.png", "dog/cats/a/c.png", "dog/cats/a-b/d.png",
      "dog/cats/a/x/e.jpg", "dog/linked/m.png", "dog/linked/sub/o.bmp", "dog/only/n.webp",
      "dog/only/deeper/y.png"]
  assert ds.labels.tolist() == [0] * 5 + [1] * 9
  assert int(ds.image(3)[0, 0, 0]) == 2  # cat/a-b/d.png, the third image written

  # torchvision reads the same paths with the same labels, once told to skip what is hidden
  # (it reads hidden files and folders, and makes a class of .cache).
  from torchvision.datasets import ImageFolder

  class Visible(ImageFolder):
    def find_classes(self, directory):
      classes = sorted(e.name for e in os.scandir(directory) if e.is_dir() and e.name[0] != ".")
      return classes, {c: i for i, c in enumerate(classes)}

  def visible_image(path):
    parts = os.path.relpath(path, root).split(os.sep)
    return not any(part.startswith(".") for part in parts) and path.lower().endswith(
        (".jpg", ".jpeg", ".png", ".webp", ".bmp"))

  reference = Visible(str(root), is_valid_file=visible_image)
  assert reference.classes == list(ds.class_names)
  assert reference.samples == list(zip(ds.source.paths, ds.labels.tolist()))
  # unfiltered: 7 hidden images more (cat's 3 twice, through dog/cats, and .cache's)
  assert len(ImageFolder(str(root)).samples) == 14 + 7


def test_flat_class_folders_read_as_before(image_root):
  # A flat folder gives the list the flat scan gave (each class's names sorted): the same
  # examples, splits and num_examples, so a run resumed on an unchanged folder goes on.
  from ftjax.data import folder
  classes, files = folder.scan(str(image_root))
  assert files == [[str(image_root / c / n) for n in sorted(os.listdir(image_root / c))
                    if folder.is_image_file(n)] for c in classes]


def test_symlink_cycle_in_a_class_folder_is_one_error(tmp_path):
  _image_tree(tmp_path / "p", ["x/a.png", "x/sub/b.png", "y/c.png"])
  (tmp_path / "p" / "x" / "sub" / "loop").symlink_to("..", target_is_directory=True)
  real = os.path.realpath(tmp_path / "p" / "x")
  with pytest.raises(DataError) as e:
    fd.build(_plain(source="folder", root=str(tmp_path / "p"), val_fraction=0.0), split="train")
  assert str(e.value) == (f"ftjax: error: symbolic-link cycle in an image folder "
                          f"({tmp_path}/p/x/sub/loop): the same folder as {real}; remove the link "
                          "that points back to a folder containing it")


@pytest.mark.parametrize("where", ["x/sub/self", "x/sub/self.png", "self"])
def test_a_symbolic_link_to_itself_is_one_error(tmp_path, where):
  # A link that resolves to itself (or round a ring of links) fails stat with ELOOP: one
  # line naming it, not an OSError traceback out of DirEntry.is_dir.
  _image_tree(tmp_path / "p", ["x/a.png", "x/sub/b.png", "y/c.png"])
  link = tmp_path / "p" / where
  link.symlink_to(link.name)
  with pytest.raises(DataError) as e:
    fd.build(_plain(source="folder", root=str(tmp_path / "p"), val_fraction=0.0), split="train")
  assert str(e.value).startswith(f"ftjax: error: symbolic-link cycle in an image folder ({link}): "
                                 "OSError: Too many levels of symbolic links; remove the link "
                                 "or point it at a file or folder")


def test_a_link_to_a_missing_image_is_left_out_with_a_warning(tmp_path):
  _image_tree(tmp_path / "p", ["x/a.png", "x/sub/b.png", "y/c.png"])
  (tmp_path / "p" / "x" / "sub" / "gone.png").symlink_to(tmp_path / "moved.png")
  (tmp_path / "p" / "y" / "gone.txt").symlink_to(tmp_path / "moved.txt")  # not an image: no word
  with pytest.warns(UserWarning) as caught:
    ds = fd.build(_plain(source="folder", root=str(tmp_path / "p"), val_fraction=0.0), split="train")
  assert [str(w.message) for w in caught] == [
      f"ftjax: {tmp_path}/p/x: not read: a symbolic link to a missing file "
      f"(sub/gone.png -> {tmp_path}/moved.png)"]
  assert [os.path.relpath(p, tmp_path / "p") for p in ds.source.paths] == ["x/a.png", "x/sub/b.png",
                                                                           "y/c.png"]


def test_a_root_one_level_too_high_is_one_error(tmp_path):
  # Its class folders are splits: read at any depth, it would train on 'train' against 'val'.
  _image_tree(tmp_path / "p", ["train/cat/a.png", "train/dog/b.png", "val/cat/c.png"])
  with pytest.raises(DataError) as e:
    fd.build(_plain(source="folder", root=str(tmp_path / "p"), val_fraction=0.0), split="train")
  assert str(e.value) == (f"ftjax: error: class folders are split names ({tmp_path}/p): train, val; "
                          "point root at the split's folder (root/train), or set train_root and "
                          "val_root")
  ds = fd.build(_plain(source="folder", root=str(tmp_path / "p" / "train"), val_fraction=0.0),
                split="train")
  assert ds.class_names == ("cat", "dog")


def test_unreadable_sub_folder_is_one_error(tmp_path, monkeypatch):
  # os.walk (and so torchvision) skips a folder it cannot list without a word.
  from ftjax.data import folder
  _image_tree(tmp_path / "p", ["x/a.png", "x/locked/b.png"])
  scandir = os.scandir

  def refuse_locked(path):
    if os.path.basename(path) == "locked":
      raise PermissionError(13, "Permission denied", path)
    return scandir(path)

  monkeypatch.setattr(folder.os, "scandir", refuse_locked)
  with pytest.raises(DataError) as e:
    folder.scan(str(tmp_path / "p"))
  assert str(e.value) == (f"ftjax: error: image folder does not read ({tmp_path}/p/x/locked): "
                          f"PermissionError: [Errno 13] Permission denied: '{tmp_path}/p/x/locked'; "
                          "check its permissions")


def test_16_bit_pngs_read_as_their_8_bit_copies(tmp_path):
  # Pillow's convert("RGB") casts 16-bit samples without scaling: everything above 255 was white.
  from ftjax.data import folder
  from ftjax.predict import run_preprocessing
  deep = np.random.default_rng(0).integers(0, 65536, (24, 32), dtype=np.uint16)
  (tmp_path / "p" / "x").mkdir(parents=True)
  Image.fromarray(deep).save(tmp_path / "p" / "x" / "a16.png")
  Image.fromarray((deep >> 8).astype(np.uint8)).save(tmp_path / "p" / "x" / "b8.png")
  assert Image.open(tmp_path / "p" / "x" / "a16.png").mode == "I;16"
  c = _plain(source="folder", root=str(tmp_path / "p"), val_fraction=0.0)
  ds = fd.build(c, split="train")
  np.testing.assert_array_equal(ds.image(0), ds.image(1))  # training reads
  assert ds.image(0).std() > 50  # the noise survives, not a white square
  batch = _batches(fd.eval_iterator(ds, c, global_batch=2, image_size=16, mean=MEAN, std=STD), 1)[0]
  np.testing.assert_array_equal(batch["image"][0], batch["image"][1])  # eval: decode_region
  pre, _, _ = run_preprocessing(tmp_path, {"image_size": [16, 16], "mean": MEAN, "std": STD})
  a, b = (pre.apply(folder.ImageFile(str(tmp_path / "p" / "x" / n))) for n in ("a16.png", "b8.png"))
  np.testing.assert_array_equal(a, b)  # predict's path
  # the other wide modes: big-endian 16-bit, 32-bit int (16-bit PNGs in older Pillow), float 0..1
  row = np.array([[0, 257, 32768, 65535]])
  for im in (Image.frombytes("I;16B", (4, 1), row.astype(">u2").tobytes()),
             Image.fromarray(row.astype(np.int32)), Image.fromarray((row / 65535).astype(np.float32))):
    assert np.asarray(folder.to_rgb8(im))[0, :, 1].tolist() == [0, 1, 128, 255], im.mode


def test_folder_corrupt_is_an_error_when_asked(image_root):
  c = _config(source="folder", root=str(image_root), val_fraction=0.0, on_corrupt="error")
  with pytest.raises(DataError, match=r"corrupt image \(.*broken\.jpg\)"):
    fd.build(c, split="train")


def test_folder_seeded_fraction_split(image_root):
  c = _config(source="folder", root=str(image_root), val_fraction=0.25, split_seed=1)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    train, val = fd.build(c, split="train"), fd.build(c, split="val")
    again = fd.build(c, split="val")
    c.split_seed = 2
    other = fd.build(c, split="val")
  t, v = set(train.source.paths), set(val.source.paths)
  assert not t & v
  assert len(t | v) == 24  # 25 image files, the broken one skipped in whichever split it fell
  assert val.source.paths == again.source.paths
  assert val.source.paths != other.source.paths
  assert np.bincount(fd.build(_config(source="folder", root=str(image_root), val_fraction=0.25,
                                      split_seed=1, verify_images=False), split="val").labels
                     ).tolist() == [2, 2, 2]  # round(0.25 * 8), round(0.25 * 9), round(0.25 * 8)


def test_folder_two_roots_and_bad_layouts(tmp_path, image_root):
  val = tmp_path / "val"
  for c in ("cat", "dog", "eel"):
    (val / c).mkdir(parents=True)
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(val / c / "a.bmp")  # grayscale -> RGB
  c = _config(source="folder", train_root=str(image_root), val_root=str(val))
  ds = fd.build(c, split="val")
  assert ds.labels.tolist() == [0, 1, 2] and ds.image(0).shape == (8, 8, 3)
  c.num_classes = 4
  with pytest.raises(DataError, match="data has 3, config.data.num_classes is 4"):
    fd.build(c, split="val")
  (val / "fox").mkdir()
  c.num_classes = None
  with pytest.raises(DataError, match=r"^ftjax: error: empty class folder \(.*fox\): 0 images"):
    fd.build(c, split="val")
  with pytest.raises(DataError, match="image folder not found"):
    fd.build(_config(source="folder", root=str(tmp_path / "nope")), split="train")
  only_bad = tmp_path / "bad" / "x"
  only_bad.mkdir(parents=True)
  (only_bad / "a.png").write_bytes(b"not a png")
  with pytest.warns(UserWarning), pytest.raises(DataError, match="zero examples"):
    fd.build(_config(source="folder", root=str(tmp_path / "bad"), val_fraction=0.0),
             split="train")


def test_config_errors_come_before_reading(tmp_path):
  with pytest.raises(ConfigError, match="unknown data source"):
    fd.build(_config(source="imagenet"), split="train")
  with pytest.raises(ConfigError, match="a folder source needs a root"):
    fd.build(_config(source="folder"), split="train")
  with pytest.raises(ConfigError) as e:  # the default eval_splits=["test"] with a folder
    fd.build(_config(source="folder", root="/data/pets"), split="test")
  assert str(e.value) == ("ftjax: error: unknown split for a folder source (split): 'test'; folder "
                          "splits are train, val: set config.data.train_split and "
                          "config.data.eval_splits (--config.data.eval_splits='[\"val\"]')")
  with pytest.raises(ConfigError, match="unknown split for mnist5k"):
    fd.build(_config(), split="validation")
  with pytest.raises(ConfigError, match=r"unknown data on_corrupt .*choose one of skip, error"):
    fd.build(_config(on_corrupt="ignore"), split="train")
  # set without source=folder, a root was ignored and the default mnist5k trained instead
  with pytest.raises(ConfigError) as e:
    fd.build(_config(root="/data/pets"), split="train")
  assert str(e.value) == ("ftjax: error: root is read by the folder source only (config.data.root): "
                          "'/data/pets'; the source is 'mnist5k': set --config.data.source=folder")
  with pytest.raises(ConfigError, match=r"path is read by the arrays source only"):
    fd.build(_config(source="digits", path="/data/x.npz"), split="train")
  # root is split by val_fraction: a val_root beside it used to be ignored without a word
  with pytest.raises(ConfigError) as e:
    fd.build(_config(source="folder", root="/data/train", val_root="/data/val"), split="val")
  assert str(e.value) == ("ftjax: error: val_root goes with train_root, not root (config.data.val_root): "
                          "'/data/val'; set train_root='/data/train' for two folders, or drop val_root "
                          "to split root by val_fraction")


@pytest.mark.parametrize("ratio", [(0.0, 1.0), (-1.0, 2.0), (2.0, 0.5), (1.0, float("inf"))])
def test_bad_augment_ratio_fails_the_check_before_the_workdir_is_written(tmp_path, ratio):
  # It used to pass the check and raise a math domain error inside the loader.
  import sys
  sys.path.insert(0, os.path.dirname(__file__))
  from conftest import tiny_config

  from ftjax import train
  with pytest.raises(ConfigError) as e:
    fd.build(_config(source="digits", augment__ratio=ratio), split="train")
  assert str(e.value) == (f"ftjax: error: augment.ratio must satisfy 0 < lo <= hi "
                          f"(config.data.augment.ratio): {ratio}; width / height of the random "
                          "crop, e.g. (0.75, 1.333)")
  cfg = tiny_config(str(tmp_path / "unused.npz"), **{"data.augment.ratio": ratio})
  with pytest.raises(ConfigError, match="augment.ratio") as e:
    train.prepare(cfg, str(tmp_path / "wd"))
  assert e.value.exit_code == 2 and not (tmp_path / "wd").exists()
  with pytest.raises(ConfigError, match=r"augment.ratio must be two numbers \(lo, hi\)"):
    fd.build(_config(augment__ratio=(0.5, 1.0, 2.0)), split="train")
  fd.build(_config(source="digits", augment__ratio=(1.0, 1.0)), split="train")  # square crops: fine


@pytest.mark.parametrize("key, value, message", [
    ("mixup_alpha", -1.0, "mixup_alpha must be a number >= 0 (config.data.mixup_alpha): -1.0; 0 turns it off"),
    ("cutmix_alpha", -0.5, "cutmix_alpha must be a number >= 0 (config.data.cutmix_alpha): -0.5; 0 turns it off"),
    ("mix_switch_prob", 2.0, "mix_switch_prob must be in [0, 1] (config.data.mix_switch_prob): 2.0"),
    ("split_seed", -1, "split_seed must be >= 0 (config.data.split_seed): -1"),
])
def test_bad_mixing_values_and_seeds_fail_the_check(tmp_path, key, value, message):
  # A negative alpha silently meant "off", a switch probability of 2 "always cutmix", and a
  # negative split_seed died in numpy with a traceback once per_class drew with it.
  import sys
  sys.path.insert(0, os.path.dirname(__file__))
  from conftest import tiny_config

  from ftjax import train
  with pytest.raises(ConfigError) as e:
    fd.build(_config(source="digits", per_class=2, **{key: value}), split="train")
  assert str(e.value) == f"ftjax: error: {message}"
  with pytest.raises(ConfigError):
    train.prepare(tiny_config(str(tmp_path / "unused.npz"), **{f"data.{key}": value}),
                  str(tmp_path / "wd"))
  assert not (tmp_path / "wd").exists()


@pytest.mark.parametrize("num_ops", [-1, True])
def test_randaugment_num_ops_must_be_a_non_negative_integer(num_ops):
  # -1 used to pass the check and crash in the loader: not counted as random (no generator
  # given), yet truthy, so RandAugment ran without one.
  c = _config(source="digits")
  c.augment.randaugment_num_ops = num_ops
  with pytest.raises(ConfigError) as e:
    fd.build(c, split="train")
  assert str(e.value) == (f"ftjax: error: randaugment_num_ops must be an integer >= 0 "
                          f"(config.data.augment.randaugment_num_ops): {num_ops!r}; "
                          "0 turns RandAugment off")
  assert e.value.exit_code == 2


# ---------------------------------------------------------------- built-in sets and arrays


def test_builtin_sizes_and_fixed_splits():
  train, test = fd.build(_config(), split="train"), fd.build(_config(), split="test")
  assert (train.num_examples, test.num_examples, train.num_classes) == (4000, 1000, 10)
  assert np.bincount(train.labels).tolist() == [400] * 10
  assert np.bincount(test.labels).tolist() == [100] * 10
  assert train.image(0).shape == (28, 28, 3) and train.image(0).dtype == np.uint8
  # The two splits are disjoint rows of the same file: no test digit is also a train digit.
  tr = {train.image(i).tobytes() for i in range(0, 4000, 7)}
  assert not tr & {test.image(i).tobytes() for i in range(1000)}
  dtrain, dtest = fd.build(_config(source="digits"), split="train"), \
      fd.build(_config(source="digits"), split="test")
  assert (dtrain.num_examples, dtest.num_examples) == (1437, 360)
  from sklearn.datasets import load_digits
  raw = load_digits().images  # 0..16
  np.testing.assert_array_equal(dtest.image(0)[..., 1], np.round(raw[1437] * 255 / 16))
  assert dtrain.image(0).shape == (8, 8, 3) and raw[1437].max() == 16


def test_per_class_sampling_is_exact_and_seeded():
  a = fd.build(_config(per_class=10, split_seed=5), split="train")
  b = fd.build(_config(per_class=10, split_seed=5), split="train")
  d = fd.build(_config(per_class=10, split_seed=6), split="train")
  assert np.bincount(a.labels).tolist() == [10] * 10
  assert a.index.tolist() == b.index.tolist()
  assert a.index.tolist() != d.index.tolist()
  assert fd.build(_config(per_class=10), split="test").num_examples == 1000  # eval untouched
  with pytest.raises(DataError, match="too few examples for per_class"):
    fd.build(_config(source="digits", per_class=500), split="train")


def test_arrays_source_and_from_arrays(tmp_path):
  images = np.arange(5 * 4 * 4, dtype=np.uint8).reshape(5, 4, 4, 1)
  np.savez(tmp_path / "a.npz", train_images=images, train_labels=np.array([0, 1, 0, 1, 1]),
           class_names=np.array(["no", "yes"]))
  ds = fd.build(_config(source="arrays", path=str(tmp_path / "a.npz")), split="train")
  assert ds.class_names == ("no", "yes") and ds.labels.tolist() == [0, 1, 0, 1, 1]
  np.testing.assert_array_equal(ds.image(2), np.repeat(images[2], 3, axis=-1))
  with pytest.raises(DataError, match="arrays file lacks the split"):
    fd.build(_config(source="arrays", path=str(tmp_path / "a.npz")), split="test")
  with pytest.raises(DataError, match="must be uint8"):
    fd.from_arrays(images.astype(np.float32), [0] * 5)


def test_arrays_source_numbers_classes_over_every_split(tmp_path):
  # A small test split that lacks the top class is still a 3-class set, as its train split.
  path = str(tmp_path / "a.npz")
  np.savez(path, train_images=np.zeros((4, 2, 2), np.uint8), train_labels=np.array([0, 1, 2, 2]),
           test_images=np.zeros((2, 2, 2), np.uint8), test_labels=np.array([1, 0]))
  c = _config(source="arrays", path=path)
  assert [fd.build(c, split=s).class_names for s in ("train", "test")] == [("0", "1", "2")] * 2
  # data.num_classes numbers them when the file names none (more classes than labels seen).
  c.num_classes = 5
  assert fd.build(c, split="test").num_classes == 5
  c.num_classes = 2
  with pytest.raises(DataError, match=r"a label has no class name .*: label 2 with 2 class names"):
    fd.build(c, split="train")


@pytest.mark.parametrize("arrays,expected", [
    # zero-size images reached the loader's resize: a ZeroDivisionError
    (dict(train_images=np.zeros((4, 0, 0), np.uint8)),
     "images have zero height or width ({path}/train): (4, 0, 0); images must be [N, H, W] or "
     "[N, H, W, C] with H, W >= 1"),
    # a scalar did not iterate: a TypeError traceback
    (dict(class_names=np.array("abc")),
     "class_names must be a 1-D array, one name per class ({path}:class_names): shape (); "
     "e.g. np.array(['cat', 'dog'])"),
])
def test_malformed_arrays_file_is_a_data_error(tmp_path, arrays, expected):
  path = str(tmp_path / "a.npz")
  np.savez(path, **{"train_images": np.zeros((4, 2, 2), np.uint8), "train_labels": np.array([0, 1, 0, 1]),
                    **arrays})
  with pytest.raises(DataError) as e:
    fd.build(_config(source="arrays", path=path), split="train")
  assert str(e.value) == "ftjax: error: " + expected.format(path=path)


@pytest.mark.parametrize("labels,names,expected", [
    ([0, 0, 0], None, "1 class, '0'"),
    ([0, 0, 0], np.array(["cat"]), "1 class, 'cat'"),
])
def test_one_class_is_not_a_classifiers_data(tmp_path, labels, names, expected):
  # Trained on, one class went to loss 0 and exited 0.
  path = str(tmp_path / "a.npz")
  np.savez(path, train_images=np.zeros((3, 2, 2), np.uint8), train_labels=np.array(labels),
           **({} if names is None else {"class_names": names}))
  ds = fd.build(_config(source="arrays", path=path), split="train")
  with pytest.raises(DataError) as e:
    fd.check_classifiable(ds)
  assert str(e.value) == (f"ftjax: error: a classifier needs at least 2 classes ({path}/train): {expected}; "
                          "give the data a second class (a class folder, a label)")
  fd.check_classifiable(fd.from_arrays(np.zeros((2, 2, 2), np.uint8), [0, 1]))  # two: fine


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_damaged_arrays_file_is_a_data_error(tmp_path, damage):
  path = tmp_path / "a.npz"
  np.savez(path, train_images=np.arange(4 * 8 * 8, dtype=np.uint8).reshape(4, 8, 8),
           train_labels=np.array([0, 1, 0, 1]))
  raw = bytearray(path.read_bytes())
  if damage == "truncate":
    raw = raw[:len(raw) // 2]
  else:  # one pixel of the stored images changed: the member's CRC-32 no longer matches
    raw[raw.index(bytes(range(100, 140)))] ^= 0xFF
  path.write_bytes(bytes(raw))
  with pytest.raises(DataError, match=r"arrays file does not read \(.*a\.npz\): BadZipFile"):
    fd.build(_config(source="arrays", path=str(path)), split="train")


# ---------------------------------------------------------------- training iterator


def _train(ds, c, **kw):
  kw.setdefault("seed", 0)
  return fd.train_iterator(ds, c, global_batch=kw.pop("global_batch", 16), image_size=24,
                           mean=MEAN, std=STD, **kw)


AUG = dict(augment__randaugment_num_ops=2, augment__scale=(0.3, 1.0))


def test_same_seed_same_batches_and_resume_continues_exactly():
  c = _config(per_class=4, **AUG)  # 40 examples, batch 16: steps cross epoch boundaries
  ds = fd.build(c, split="train")
  first = _batches(_train(ds, c), 6)
  second = _batches(_train(ds, c), 6)
  for x, y in zip(first, second):
    np.testing.assert_array_equal(x["image"], y["image"])
    np.testing.assert_array_equal(x["label"], y["label"])
  other = _batches(_train(ds, c, seed=1), 1)[0]
  assert not np.array_equal(other["image"], first[0]["image"])

  it = _train(ds, c)
  _batches(it, 4)
  state = json.loads(json.dumps(it.get_state()))
  assert state["step"] == 4
  restored = _train(ds, c)
  restored.set_state(state)
  np.testing.assert_array_equal(next(restored)["image"], first[4]["image"])
  by_step = _train(ds, c, start_step=5)
  nxt = _batches(by_step, 1)[0]
  np.testing.assert_array_equal(nxt["image"], first[5]["image"])
  np.testing.assert_array_equal(nxt["label"], first[5]["label"])
  with pytest.raises(DataError, match="loader state is for another data stream"):
    _train(ds, c, seed=9).set_state(state)


def test_epochs_are_permutations_and_hosts_split_the_global_batch():
  c = _plain(source="digits", per_class=3)  # 30 examples
  ds = fd.build(c, split="train")
  batches = _train(ds, c, global_batch=10).batches
  examples = np.concatenate([batches.examples(s)[1] for s in range(6)])
  for e in range(2):
    assert sorted(examples[30 * e: 30 * (e + 1)].tolist()) == list(range(30))
  assert examples[:30].tolist() != examples[30:].tolist()  # reshuffled every epoch
  whole = _batches(_train(ds, c, global_batch=10, start_step=2), 1)[0]
  halves = [_batches(_train(ds, c, global_batch=10, start_step=2, process_index=k,
                            process_count=2), 1)[0] for k in range(2)]
  np.testing.assert_array_equal(np.concatenate([h["image"] for h in halves]), whole["image"])
  np.testing.assert_array_equal(np.concatenate([h["label"] for h in halves]), whole["label"])
  with pytest.raises(ConfigError, match="multiple of the process count"):
    _train(ds, c, global_batch=10, process_count=3)


def test_each_epoch_augments_an_example_afresh():
  # Batch = the whole dataset: step e is epoch e. The augmentation seed holds the epoch, so
  # example i gets another crop and flip in epoch 1 than in epoch 0.
  n = 8
  images = np.random.default_rng(0).integers(0, 256, (n, 16, 16, 3), dtype=np.uint8)
  c = _config(augment__flip=True)  # random_resized_crop is on by default
  batches = fd.train_iterator(fd.from_arrays(images, np.arange(n)), c, global_batch=n,
                              image_size=8, mean=MEAN, std=STD, seed=0).batches
  epoch = [batches(e) for e in range(2)]
  order = [batches.examples(e) for e in range(2)]
  assert [o[0].tolist() for o in order] == [[0] * n, [1] * n]
  pixels = [{int(i): b["image"][k] for k, i in enumerate(o[1])} for b, o in zip(epoch, order)]
  assert all(not np.array_equal(pixels[0][i], pixels[1][i]) for i in range(n))


def test_device_prefetch_gives_the_same_batches():
  c = _config(source="digits", per_class=3)
  ds = fd.build(c, split="train")
  host = _batches(_train(ds, c), 3)
  c.prefetch = 2
  dev = _train(ds, c)
  got = [next(dev) for _ in range(3)]
  assert isinstance(got[0]["image"], jax.Array) and dev.get_state()["step"] == 3
  for h, d in zip(host, got):
    np.testing.assert_array_equal(h["image"], np.asarray(d["image"]))


def test_worker_processes_give_the_same_batches():
  c = _config(source="digits", per_class=3, **AUG)
  ds = fd.build(c, split="train")
  inline = _batches(_train(ds, c), 4)
  c.num_workers = 1  # a worker process builds whole batches: the same ones
  it = _train(ds, c)
  workers = _batches(it, 4)
  for a, b in zip(inline, workers):
    np.testing.assert_array_equal(a["image"], b["image"])
  it.set_state({"step": 1})  # restarts the workers at step 1
  np.testing.assert_array_equal(np.asarray(next(it)["image"]), inline[1]["image"])
  it.close()


# ---------------------------------------------------------------- evaluation


def test_eval_sees_each_of_1001_examples_once():
  ids = np.arange(1001)
  ds = fd.from_arrays(np.zeros((1001, 2, 2), np.uint8), ids)  # label = example id
  c = _plain()
  it = fd.eval_iterator(ds, c, global_batch=64, image_size=2, mean=MEAN, std=STD)
  assert len(it) == 16
  batches = _batches(it, 16)
  with pytest.raises(StopIteration):
    next(it)
  assert all(b["image"].shape == (64, 2, 2, 3) for b in batches)
  seen = np.concatenate([b["label"][b["mask"]] for b in batches])
  assert seen.tolist() == ids.tolist()
  assert batches[-1]["mask"].sum() == 1001 - 15 * 64
  per_host = [np.concatenate([b["label"][b["mask"]] for b in fd.eval_iterator(
      ds, c, global_batch=64, image_size=2, mean=MEAN, std=STD, process_index=k,
      process_count=2)]) for k in range(2)]
  assert sorted(np.concatenate(per_host).tolist()) == ids.tolist()


# ---------------------------------------------------------------- transforms


def test_transforms():
  im = Image.fromarray(np.arange(40 * 60 * 3, dtype=np.uint32).astype(np.uint8).reshape(40, 60, 3))
  centre = transforms.Preprocess(image_size=20, crop_fraction=1.0).apply(im)
  np.testing.assert_array_equal(centre, np.asarray(im.resize((20, 20), Image.BILINEAR,
                                                             box=(10, 0, 50, 40))))
  p = transforms.Preprocess(image_size=16, random_resized_crop=True, flip=True,
                            randaugment_num_ops=2)
  a = p.apply(im, np.random.default_rng([1, 2]))
  b = p.apply(im, np.random.default_rng([1, 2]))
  assert a.shape == (16, 16, 3) and a.dtype == np.uint8
  np.testing.assert_array_equal(a, b)
  for seed in range(20):
    left, top, right, bottom = transforms.inception_box(np.random.default_rng(seed), 60, 40,
                                                         (0.08, 1.0), (3 / 4, 4 / 3))
    assert 0 <= left < right <= 60 and 0 <= top < bottom <= 40
    area = (right - left) * (bottom - top) / (60 * 40)
    assert 0.07 <= area <= 1.0
  flip = transforms.Preprocess(image_size=40, crop_fraction=1.0, resize="squash", flip=True)
  outs = {flip.apply(im.resize((40, 40)), np.random.default_rng(s)).tobytes() for s in range(8)}
  assert outs == {np.asarray(im.resize((40, 40))).tobytes(),
                  np.asarray(im.resize((40, 40)))[:, ::-1].tobytes()}


def test_flip_probability_is_one_half():
  # The flip is the only draw here: seeds 0..999 flip 500 +- 70 images (4.4 sigma).
  im = Image.fromarray(np.arange(4 * 4 * 3, dtype=np.uint8).reshape(4, 4, 3))
  flip = transforms.Preprocess(image_size=4, crop_fraction=1.0, flip=True)
  flipped = sum(not np.array_equal(flip.apply(im, np.random.default_rng(s)), np.asarray(im))
                for s in range(1000))
  assert 430 <= flipped <= 570, flipped


def test_inception_aspect_ratio_is_log_uniform():
  # Log-uniform in (3/4, 4/3): the median of log(w / h) is 0 (uniform ratios: log(25/24) = 0.041).
  rng = np.random.default_rng(0)
  boxes = [transforms.inception_box(rng, 1000, 1000, (0.25, 0.25), (3 / 4, 4 / 3)) for _ in range(4000)]
  logs = [np.log((r - l) / (b - t)) for l, t, r, b in boxes]
  assert abs(np.median(logs)) < 0.015 and max(map(abs, logs)) <= np.log(4 / 3) + 0.01


@pytest.mark.parametrize("width, height, box", [(10, 100, (0.0, 43.0, 10.0, 56.0)),
                                                (100, 10, (43.0, 0.0, 56.0, 10.0))])
def test_inception_box_falls_back_to_the_centred_crop_torchvision_takes(width, height, box):
  # No crop of the whole area fits a 1:10 image: torchvision's RandomResizedCrop then takes
  # the full short side and round(short / 0.75 or * 4/3) = 13 of the long one, centred.
  assert transforms.inception_box(np.random.default_rng(0), width, height, (1, 1),
                                  (3 / 4, 4 / 3)) == box


def test_randaugment_ops_scale_with_magnitude():
  from ftjax.data import randaugment
  im = Image.fromarray(np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8))
  pixels = np.asarray(im)
  for op in randaugment.OPS:
    out = np.asarray(randaugment.apply_op(im, op, 0.0, 1.0))
    if op not in ("autocontrast", "equalize"):  # these have no magnitude
      np.testing.assert_array_equal(out, pixels, err_msg=op)
  shifted = np.asarray(randaugment.apply_op(im, "translate_x", 1.0, 1.0))  # 0.45 * 16 px left
  np.testing.assert_array_equal(shifted[:, -7:], 128)
  np.testing.assert_array_equal(np.asarray(randaugment.apply_op(im, "solarize", 0.5, 1.0)),
                                np.where(pixels >= 128, 255 - pixels, pixels))
  a = randaugment.apply(im, np.random.default_rng(3), num_ops=3, magnitude=9)
  b = randaugment.apply(im, np.random.default_rng(3), num_ops=3, magnitude=9)
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# ---------------------------------------------------------------- mixup / cutmix


def test_mixup_cutmix_keep_label_sums_and_identity_when_off():
  x = jax.random.normal(jax.random.key(0), (6, 8, 8, 3))
  y = jax.nn.one_hot(jnp.arange(6), 6)
  xi, yi = fd.mixup_cutmix(jax.random.key(1), x, y, mixup_alpha=0.0, cutmix_alpha=0.0)
  assert xi is x and yi is y

  # One compiled variant (Beta sampling is slow to compile): both on, so each key takes
  # mixup or cutmix; the checks below tell which happened and both must.
  step = jax.jit(fd.mixup_cutmix, static_argnames=("mixup_alpha", "cutmix_alpha"))
  kinds = set()
  x, y = np.asarray(x), np.asarray(y)
  for k in range(8):
    xm, ym = jax.tree.map(np.asarray, step(jax.random.key(k), x, y, mixup_alpha=0.4,
                                           cutmix_alpha=1.0))
    np.testing.assert_allclose(ym.sum(-1), 1.0, rtol=1e-6)
    lam = float(ym[0, 0])  # example 0 is mixed with example 5 (the batch mirrored)
    np.testing.assert_allclose(ym[0, 5], 1 - lam, rtol=1e-5, atol=1e-6)
    own = (xm[0] == x[0]).all(-1)
    partner = (xm[0] == x[5]).all(-1)
    if (own | partner).all() and 0 < lam < 1:  # cutmix: a pasted box, labels = pixel shares
      kinds.add("cutmix")
      np.testing.assert_allclose(own.mean(), lam, atol=1e-6)
    else:
      kinds.add("mixup")
      np.testing.assert_allclose(xm[0], lam * x[0] + (1 - lam) * x[5], rtol=1e-5, atol=1e-5)
  assert kinds == {"mixup", "cutmix"}


def test_unverified_corrupt_file_is_replaced_at_read_time(image_root):
  c = _plain(source="folder", root=str(image_root), val_fraction=0.0, verify_images=False)
  ds = fd.build(c, split="train")
  assert ds.num_examples == 25 and ds.skipped == ()
  broken = [os.path.basename(p) for p in ds.source.paths].index("broken.jpg")
  with pytest.warns(UserWarning, match="unreadable image .*broken.jpg"):
    batch = _batches(fd.eval_iterator(ds, c, global_batch=25, image_size=8, mean=MEAN, std=STD), 1)[0]
  assert np.flatnonzero(~batch["mask"]).tolist() == [broken]
  it = fd.train_iterator(ds, c, global_batch=25, image_size=8, mean=MEAN, std=STD, seed=0)
  with pytest.warns(UserWarning, match="broken.jpg"):
    train = _batches(it, 1)[0]
  _, examples = it.batches.examples(0)
  slot = examples.tolist().index(broken)
  assert train["label"][slot] == ds.label((broken + 1) % 25)  # the label of the image read
  np.testing.assert_array_equal(train["image"][slot], batch["image"][(broken + 1) % 25])
  c.on_corrupt = "error"
  with pytest.raises(DataError, match=r"image does not decode \(.*broken.jpg\)"):
    _batches(fd.eval_iterator(ds, c, global_batch=25, image_size=8, mean=MEAN, std=STD), 1)


def test_data_gone_mid_run_is_one_error_not_a_search_of_every_file(image_root, monkeypatch):
  # An unmounted disk used to make each example try (and warn about) every file of the set.
  from ftjax.data import loader
  c = _plain(source="folder", root=str(image_root), val_fraction=0.0)
  with pytest.warns(UserWarning, match="broken.jpg"):
    ds = fd.build(c, split="train")
  for path in ds.source.paths:
    os.remove(path)
  monkeypatch.setattr(loader, "_MAX_UNREADABLE", 5)
  with warnings.catch_warnings(record=True) as seen, pytest.raises(DataError) as e:
    warnings.simplefilter("always")
    _batches(fd.eval_iterator(ds, c, global_batch=4, image_size=8, mean=MEAN, std=STD), 1)
  assert len(seen) == 5 and str(e.value) == (
      f"ftjax: error: no example reads ({image_root}[train]): 5 in a row from {ds.describe(0)}; "
      "is the data still where it was at the start?")


def test_eval_decodes_large_jpegs_at_reduced_scale(tmp_path):
  from ftjax.data import folder
  from sklearn.datasets import load_sample_images
  photo = load_sample_images().images[0]  # 640x427 china.jpg
  (tmp_path / "p" / "a").mkdir(parents=True)
  path = tmp_path / "p" / "a" / "china.jpg"
  Image.fromarray(photo).save(path, quality=95)
  im, box = folder.ImageFile(str(path)).decode_region((0, 0, 640, 427), 64)
  # 1/4 scale (>= 64 a side); libjpeg rounds the size up, the box stays exact.
  assert im.size == (160, 107) and box == (0, 0, 160, 106.75)
  im, box = folder.ImageFile(str(path)).decode_region((100, 100, 300, 300), 64)
  assert im.size == (320, 214) and box == (50, 50, 150, 150)  # 1/2 scale keeps the crop >= 64
  im, box = folder.ImageFile(str(path)).decode_region((100, 100, 200, 200), 64)
  assert im.size == (640, 427) and box == (100, 100, 200, 200)  # 100 px crop: full scale
  assert folder.decode(str(path)).size == (640, 427)
  c = _plain(source="folder", root=str(tmp_path / "p"), val_fraction=0.0)
  ds = fd.build(c, split="train")
  fast = _batches(fd.eval_iterator(ds, c, global_batch=1, image_size=64, mean=(0, 0, 0),
                                   std=(1, 1, 1)), 1)[0]["image"][0] * 255
  full = transforms.Preprocess(image_size=64, crop_fraction=1.0).apply(folder.decode(str(path)))
  assert np.abs(fast - full).mean() < 4  # the same picture up to resampling (mirrored: 85)
