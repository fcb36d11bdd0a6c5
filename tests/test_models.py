"""from_pretrained's common contract: bad inputs fail with one clear line; dont_load and the report."""

import sys
import re

import numpy as np
import pytest

from ftjax import models
from ftjax.errors import CheckpointError, ConfigError, FtjaxError

torch = pytest.importorskip("torch")


def _vit_flat(npz):
  with np.load(npz) as z:
    return {k: z[k] for k in z.files}


@pytest.fixture
def resnet_pth(tmp_path):
  torchvision = pytest.importorskip("torchvision")
  path = tmp_path / "resnet18.pth"
  torch.save(torchvision.models.resnet18(num_classes=7).state_dict(), path)
  return str(path)


def _case(name, tmp_path, npz, resnet_pth):
  """Returns (source, kwargs, expected substring, what must appear in the message)."""
  if name == "missing file":
    return f"npz:test@{tmp_path / 'nope.npz'}", {}, "weight file not found"
  if name == "truncated safetensors":
    from safetensors.numpy import save_file
    p = tmp_path / "m.safetensors"
    save_file({"cls_token": np.zeros((1, 1, 8), np.float32), "x": np.zeros(1000, np.float32)}, str(p))
    p.write_bytes(p.read_bytes()[:-100])
    return f"timm:vit_tiny_patch16_224@{p}", {}, "truncated safetensors"
  if name == "another architecture":
    return f"timm:vit_tiny_patch16_224@{resnet_pth}", {}, "conv1.weight"
  if name == "unknown variant":
    return f"npz:Q99@{npz}", {}, "unknown ViT variant (npz:Q99)"
  if name == "unexplained shape mismatch":
    flat = _vit_flat(npz)
    flat["Transformer/encoderblock_0/MlpBlock_3/Dense_0/kernel"] = np.zeros((32, 65), np.float32)
    p = tmp_path / "bad_shape.npz"
    np.savez(p, **flat)
    return f"npz:test@{p}", {}, "Dense_0"
  if name == "corrupted npz":
    p = tmp_path / "corrupt.npz"
    raw = bytearray(open(npz, "rb").read())
    raw[len(raw) // 3:len(raw) // 3 + 64] = b"\xff" * 64
    p.write_bytes(bytes(raw))
    return f"npz:test@{p}", {}, "corrupted .npz"
  if name == "torch payload":
    marker = tmp_path / "payload_ran"

    class Payload:
      def __reduce__(self):
        return (open, (str(marker), "w"))

    p = tmp_path / "evil.pth"
    torch.save({"conv1.weight": torch.zeros(1), "evil": Payload()}, p)
    return f"torchvision:resnet18@{p}", {}, "refused PyTorch file"
  if name == "hf config.json not an object":
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text("[]")
    (tmp_path / "hf" / "model.safetensors").write_bytes(b"")
    return f"hf:{tmp_path / 'hf'}", {}, "config.json is not a JSON object"
  if name == "empty torch file":
    (tmp_path / "empty.pth").write_bytes(b"")
    return f"torchvision:resnet18@{tmp_path / 'empty.pth'}", {}, "empty weight file"
  if name == "web page saved as .pth":
    (tmp_path / "page.pth").write_bytes(b"<!DOCTYPE html><html><body>Sign in</body></html>")
    return f"torchvision:resnet18@{tmp_path / 'page.pth'}", {}, "not a PyTorch file"
  if name == "hub id offline":
    return "hf:google/vit-base-patch16-224", {}, "cannot fetch from the Hugging Face hub"
  if name == "num_classes <= 0":
    return f"npz:test@{npz}", {"num_classes": 0}, "num_classes must be a positive integer"
  if name == "image size not divisible by patch":
    return f"npz:test@{npz}", {"image_size": 30}, "patch"
  if name == "unknown source form":
    return f"zzz:{npz}", {}, "unknown checkpoint source"
  if name == "bare file without form":
    return npz, {}, "needs a source form"
  raise AssertionError(name)


CASES = ["missing file", "truncated safetensors", "another architecture", "unknown variant",
         "unexplained shape mismatch", "corrupted npz", "torch payload", "hf config.json not an object",
         "empty torch file", "web page saved as .pth", "hub id offline",
         "num_classes <= 0", "image size not divisible by patch", "unknown source form",
         "bare file without form"]


@pytest.mark.parametrize("name", CASES)
def test_bad_inputs_raise_one_clear_line(name, tmp_path, tiny_vit_npz, resnet_pth, monkeypatch):
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
  source, kwargs, needle = _case(name, tmp_path, tiny_vit_npz, resnet_pth)
  with pytest.raises(FtjaxError) as e:
    models.from_pretrained(source, **kwargs)
  msg = str(e.value)
  assert msg.startswith("ftjax: error: ") and "\n" not in msg
  assert needle in msg, msg
  assert isinstance(e.value, (CheckpointError, ConfigError))
  assert not (tmp_path / "payload_ran").exists()


def test_a_class_count_that_is_not_a_positive_integer_is_refused(tiny_vit_npz):
  # True was a 1-class head (bool is an int), 2.5 a 2-class one (int() rounded it down).
  for bad in (True, 2.5, "3", 0):
    with pytest.raises(ConfigError, match=rf"num_classes must be a positive integer \(num_classes\): "
                                          rf"{re.escape(repr(bad))}$"):
      models.from_pretrained(f"npz:test@{tiny_vit_npz}", num_classes=bad)
    with pytest.raises(ConfigError, match="num_classes must be a positive integer"):
      models.create("vit", {"variant": "test"}, num_classes=bad, image_size=32)
  assert models.create("vit", {"variant": "test"}, num_classes=np.int64(3), image_size=32)[1][
      "params/head/kernel"].shape[-1] == 3


def test_dont_load_reinitialises_only_what_it_names(tiny_vit_npz):
  _, variables, report = models.from_pretrained(f"npz:test@{tiny_vit_npz}",
                                                dont_load=["params/Transformer/encoderblock_1/.*"])
  flat = _vit_flat(tiny_vit_npz)
  from ftjax.tree import flatten
  got = {k.removeprefix("params/"): v for k, v in flatten(variables).items()}
  changed = [k for k in flat if not np.array_equal(flat[k], got[k])]
  assert changed and all(k.startswith("Transformer/encoderblock_1/") for k in changed)
  assert {p for p, _ in report.reinitialized} == {f"params/{k}" for k in flat
                                                  if k.startswith("Transformer/encoderblock_1/")}
  assert "re-initialised" in str(report)


def test_dont_load_takes_one_regex_as_a_string(tiny_vit_npz):
  # It was iterated character by character: "dont_load rule matches no parameter ... 'p'".
  _, _, report = models.from_pretrained(f"npz:test@{tiny_vit_npz}", dont_load="params/head/.*")
  assert sorted(p for p, _ in report.reinitialized) == ["params/head/bias", "params/head/kernel"]


def test_dont_load_rule_matching_nothing_is_an_error(tiny_vit_npz):
  # Full matches on params/... paths: the prefix-free form optim's rules use would keep the head.
  with pytest.raises(ConfigError, match=r"dont_load rule matches no parameter \(model.dont_load #0\): "
                                        r"'head/\.\*'; full match on paths such as 'params/"):
    models.from_pretrained(f"npz:test@{tiny_vit_npz}", dont_load=["head/.*"])
  with pytest.raises(ConfigError, match=r"invalid regex \(model.dont_load\): 'params/head/\('"):
    models.from_pretrained(f"npz:test@{tiny_vit_npz}", dont_load=["params/head/("])


def test_a_position_embedding_without_a_class_row_is_read_as_such(tmp_path):
  # timm's no_embed_class: the position embedding has no class-token row, which the name
  # does not say; its square row count does (a class row makes it one more than a square).
  timm = pytest.importorskip("timm")
  import safetensors.torch
  import torch
  torch.manual_seed(0)
  ref = timm.create_model("vit_tiny_patch16_224", no_embed_class=True, num_classes=3, img_size=64).eval()
  with torch.no_grad():
    ref.cls_token.normal_()
    ref.head.weight.normal_()
  safetensors.torch.save_file(ref.state_dict(), str(tmp_path / "t.safetensors"))
  model, variables, report = models.from_pretrained(f"timm:vit_tiny_patch16_224@{tmp_path / 't.safetensors'}")
  assert report.arch == {"variant": "Ti/16", "posemb_class_token": False} and report.image_size == (64, 64)
  x = np.random.default_rng(0).standard_normal((2, 3, 64, 64)).astype(np.float32)
  with torch.no_grad():
    want = ref(torch.from_numpy(x)).numpy()
  got = np.asarray(model.apply(variables, x.transpose(0, 2, 3, 1)))
  np.testing.assert_allclose(got, want, rtol=0, atol=1e-4 * max(1.0, np.abs(want).max()))
  # A row count that is neither a square nor one more: no resampling guess, a one-line error.
  flat = {k: v for k, v in safetensors.torch.load_file(str(tmp_path / "t.safetensors")).items()}
  flat["pos_embed"] = flat["pos_embed"][:, :15]
  safetensors.torch.save_file(flat, str(tmp_path / "u.safetensors"))
  with pytest.raises(CheckpointError, match=r"position embedding does not fit the model \(params/Transformer/"
                                            r"posembed_input/pos_embedding\): checkpoint \(1, 15, 192\) vs "
                                            r"model \(1, 17, 192\)"):
    models.from_pretrained(f"timm:vit_tiny_patch16_224@{tmp_path / 'u.safetensors'}", image_size=64)


def _timm_logits(ref, h, w):
  x = np.random.default_rng(0).standard_normal((2, 3, h, w)).astype(np.float32)
  with torch.no_grad():
    return x.transpose(0, 2, 3, 1), ref(torch.from_numpy(x)).numpy()


def test_a_grid_of_the_same_count_in_another_shape_is_resampled(tmp_path):
  # A 4 x 4 table read at 2 x 8 has the same 1 + 16 rows: resampled all the same, as timm's
  # loader does once it knows the old grid (before, it was read as the new grid unchanged).
  timm = pytest.importorskip("timm")
  import safetensors.torch
  from timm.layers import resample_abs_pos_embed
  torch.manual_seed(0)
  ref64 = timm.create_model("vit_tiny_patch16_224", num_classes=3, img_size=64).eval()
  with torch.no_grad():
    ref64.pos_embed.normal_()
    ref64.head.weight.normal_()
  safetensors.torch.save_file(ref64.state_dict(), str(tmp_path / "t.safetensors"))
  ref = timm.create_model("vit_tiny_patch16_224", num_classes=3, img_size=(32, 128)).eval()
  state = dict(ref64.state_dict())
  state["pos_embed"] = resample_abs_pos_embed(state["pos_embed"], new_size=(2, 8), old_size=(4, 4),
                                              num_prefix_tokens=1)
  ref.load_state_dict(state)
  model, variables, report = models.from_pretrained(f"timm:vit_tiny_patch16_224@{tmp_path / 't.safetensors'}",
                                                    image_size=(32, 128))
  assert report.resized == [("params/Transformer/posembed_input/pos_embedding", (1, 17, 192), (1, 17, 192))]
  x, want = _timm_logits(ref, 32, 128)
  np.testing.assert_allclose(np.asarray(model.apply(variables, x)), want, rtol=0,
                             atol=1e-4 * max(1.0, np.abs(want).max()))
  # at the checkpoint's own grid the table loads as it is
  _, _, same = models.from_pretrained(f"timm:vit_tiny_patch16_224@{tmp_path / 't.safetensors'}", image_size=64)
  assert same.resized == [] and "params/Transformer/posembed_input/pos_embedding" in same.matched


def test_a_non_square_timm_table_is_read_at_the_size_asked_for(tmp_path):
  # img_size=(32, 64): 1 + 2 x 4 = 9 rows, a square, which alone reads as a 3 x 3 table without
  # a class row (no_embed_class). Built at (32, 64), the class-row reading fits and is taken.
  timm = pytest.importorskip("timm")
  import safetensors.torch
  torch.manual_seed(0)
  ref = timm.create_model("vit_tiny_patch16_224", num_classes=3, img_size=(32, 64)).eval()
  with torch.no_grad():
    ref.pos_embed.normal_()
    ref.head.weight.normal_()
  safetensors.torch.save_file(ref.state_dict(), str(tmp_path / "t.safetensors"))
  source = f"timm:vit_tiny_patch16_224@{tmp_path / 't.safetensors'}"
  model, variables, report = models.from_pretrained(source, image_size=(32, 64))
  assert (report.arch, report.image_size, report.resized) == ({"variant": "Ti/16"}, (32, 64), [])
  x, want = _timm_logits(ref, 32, 64)
  np.testing.assert_allclose(np.asarray(model.apply(variables, x)), want, rtol=0,
                             atol=1e-4 * max(1.0, np.abs(want).max()))
  # Without a size the file alone cannot tell: the square reading stands (documented).
  assert models.from_pretrained(source)[2].arch == {"variant": "Ti/16", "posemb_class_token": False}

def test_a_hub_repo_brings_its_image_processors_statistics(tmp_path, monkeypatch):
  # hf:<repo id> fetches preprocessor_config.json beside config.json and the weights (served
  # here from a local folder, as the hub's cache lays them out), so its mean and std apply.
  import json
  from transformers import ViTConfig, ViTForImageClassification
  ViTForImageClassification(ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                      intermediate_size=48, image_size=32, patch_size=8,
                                      num_labels=3)).save_pretrained(tmp_path / "snapshot")
  (tmp_path / "snapshot" / "preprocessor_config.json").write_text(json.dumps(
      {"image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225]}))
  fetched = []

  class EntryNotFoundError(Exception):
    pass

  def download(repo_id, filename, local_files_only=False):
    fetched.append(filename)
    if not (tmp_path / "snapshot" / filename).exists():
      raise EntryNotFoundError(filename)
    return str(tmp_path / "snapshot" / filename)

  import huggingface_hub
  monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
  _, _, report = models.from_pretrained("hf:someone/tiny-vit")
  assert (report.mean, report.std) == ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
  assert fetched == ["config.json", "model.safetensors", "preprocessor_config.json"]


def test_offline_hub_stops_at_the_first_file(monkeypatch):
  # Offline and not cached: trying the next file name would only wait through the retries again.
  calls = []

  class LocalEntryNotFoundError(Exception):
    pass

  def download(repo_id, filename, local_files_only=False):
    calls.append(filename)
    raise LocalEntryNotFoundError("offline")

  import huggingface_hub
  from ftjax import weights
  monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
  with pytest.raises(CheckpointError, match="cannot fetch from the Hugging Face hub"):
    weights.hf_file("timm/x", ("model.safetensors", "pytorch_model.bin"), source="timm:x")
  assert calls == ["model.safetensors"]


def test_a_hub_that_does_not_resolve_is_read_from_the_cache_only(monkeypatch):
  # No network: huggingface_hub's five retries a request (23 s of log lines) are skipped,
  # the local cache is still read.
  import socket

  import huggingface_hub
  from ftjax import weights
  asked = []

  def download(repo_id, filename, local_files_only=False):
    asked.append(local_files_only)
    return f"/cache/{repo_id}/{filename}"

  def no_dns(host, *args, **kwargs):
    assert host == "huggingface.co"
    raise socket.gaierror(-2, "Name or service not known")

  monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
  monkeypatch.setattr(socket, "getaddrinfo", lambda *a, **k: [])
  assert weights.hf_file("timm/x", ("model.safetensors",), source="timm:x") == (
      "/cache/timm/x/model.safetensors", "model.safetensors")
  monkeypatch.setattr(socket, "getaddrinfo", no_dns)
  assert weights.hf_file("timm/x", ("model.safetensors",), source="timm:x")[1] == "model.safetensors"
  assert asked == [False, True]


def test_a_timm_name_is_fetched_from_its_tagged_hub_repo(monkeypatch):
  # The hub holds timm/<arch>.<tag> only; an untagged name takes timm's default tag.
  repos = []

  def download(repo_id, filename, local_files_only=False):
    repos.append(repo_id)
    raise OSError("offline")

  import huggingface_hub
  monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
  for name in ("resnet18", "resnet18.tv_in1k"):
    with pytest.raises(CheckpointError):
      models.from_pretrained(f"timm:{name}")
  assert repos[0] == "timm/resnet18.a1_in1k" and repos[-1] == "timm/resnet18.tv_in1k"
  monkeypatch.setitem(sys.modules, "timm.models", None)  # timm not installed
  with pytest.raises(ConfigError, match=r"needs its pretrained tag.*timm:resnet18\.<tag>"):
    models.from_pretrained("timm:resnet18")


def test_head_replacement_is_reported_and_zero(tiny_vit_npz):
  _, variables, report = models.from_pretrained(f"npz:test@{tiny_vit_npz}", num_classes=3)
  assert variables["params"]["head"]["kernel"].shape == (32, 3)
  assert not np.any(variables["params"]["head"]["kernel"]) and not np.any(variables["params"]["head"]["bias"])
  assert {p for p, _ in report.reinitialized} == {"params/head/kernel", "params/head/bias"}
  assert report.num_classes == 3 and report.class_names is None


@pytest.mark.slow  # 15 s or more on 2 slow cores (the default run neared 15 min); CI runs it (-m slow)
def test_ftjax_workdir_is_a_source(tiny_vit_npz, tmp_path):
  """A trained run's workdir loads back as a model with the run's head and preprocessing."""
  import sys
  from pathlib import Path
  sys.path.insert(0, str(Path(__file__).parent))
  from conftest import tiny_config
  from ftjax import train
  wd = tmp_path / "wd"
  train.train_and_evaluate(tiny_config(tiny_vit_npz, **{"train.total_steps": 2}), str(wd))
  model, variables, report = models.from_pretrained(str(wd))
  from ftjax import checkpoint
  from ftjax.tree import flatten
  tree, extra = checkpoint.read_checkpoint(wd)
  for k, v in flatten(tree["params"]).items():
    np.testing.assert_array_equal(flatten(variables["params"])[k], v)
  assert report.family == "vit" and report.num_classes == 10
  # digits' class names, as the run's checkpoint recorded them
  assert report.class_names == [str(i) for i in range(10)] == extra["model"]["class_names"]
  x = np.zeros((2, 32, 32, 3), np.float32)
  assert model.apply(variables, x, train=False).shape == (2, 10)


def test_integer_tensors_are_not_cast_into_float_parameters():
  """A quantized (uint8) weight cast to float32 would load silently wrong."""
  import jax
  from ftjax.models.common import LoadReport, merge
  target = {"params/w": jax.ShapeDtypeStruct((2,), np.float32)}
  report = LoadReport("x", "f", {}, 3, (1, 1), (0,) * 3, (1,) * 3)
  with pytest.raises(CheckpointError, match=r"non-float tensor .*\(params/w\): checkpoint uint8 vs model float32"):
    merge(target, {"params/w": np.ones(2, np.uint8)}, report, replace_head=False)
  import ml_dtypes
  for half in (np.float16, ml_dtypes.bfloat16):  # 16-bit checkpoints are widened, not refused
    out = merge(target, {"params/w": np.ones(2, half)}, report, replace_head=False)
    assert out["params/w"].dtype == np.float32 and out["params/w"].tolist() == [1.0, 1.0]
