"""Weight-file readers: values round-trip, and hostile or damaged files are refused without running anything."""

import json
import pickle
import struct
import zipfile

import ml_dtypes
import numpy as np
import pytest

from ftjax import weights
from ftjax.errors import CheckpointError

torch = pytest.importorskip("torch")
safetensors_numpy = pytest.importorskip("safetensors.numpy")


def _tensors():
  rng = np.random.default_rng(0)
  return {"a.weight": rng.standard_normal((3, 4)).astype(np.float32),
          "b.bias": rng.standard_normal(5).astype(np.float16),
          "c.idx": np.arange(6, dtype=np.int64).reshape(2, 3),
          "d.u16": np.arange(3, dtype=np.uint16)}


def test_safetensors_roundtrip_equals_reference(tmp_path):
  path = tmp_path / "m.safetensors"
  safetensors_numpy.save_file(_tensors(), str(path))
  ours = weights.read_safetensors(path)
  ref = safetensors_numpy.load_file(str(path))
  assert sorted(ours) == sorted(ref)
  for k in ref:
    assert ours[k].dtype == ref[k].dtype and ours[k].shape == ref[k].shape
    np.testing.assert_array_equal(ours[k], ref[k])


def test_safetensors_bf16_from_torch(tmp_path):
  path = tmp_path / "m.safetensors"
  t = torch.randn(4, 3).to(torch.bfloat16)
  from safetensors.torch import save_file
  save_file({"w": t}, str(path))
  got = weights.read_safetensors(path)["w"]
  np.testing.assert_array_equal(got.astype(np.float32), t.float().numpy())
  f8 = torch.tensor([0.5, -2.0, 448.0]).to(torch.float8_e4m3fn)
  save_file({"w": f8}, str(path))
  got = weights.read_safetensors(path)["w"]
  assert got.dtype == ml_dtypes.float8_e4m3fn
  np.testing.assert_array_equal(got.astype(np.float32), f8.float().numpy())


def _write_raw_safetensors(path, header: dict, data: bytes):
  raw = json.dumps(header).encode()
  path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)


@pytest.mark.parametrize("case", ["truncated", "huge_header", "absurd_shape", "absurd_empty_shape",
                                  "offset_out_of_range", "bad_json", "empty", "unknown_dtype"])
def test_safetensors_hostile_or_damaged_refused(tmp_path, case):
  path = tmp_path / "bad.safetensors"
  if case == "truncated":
    safetensors_numpy.save_file(_tensors(), str(path))
    path.write_bytes(path.read_bytes()[:-10])
  elif case == "huge_header":
    path.write_bytes(struct.pack("<Q", 2**62) + b"{}")
  elif case == "absurd_shape":  # claims ~2^80 bytes: must not try to allocate them
    _write_raw_safetensors(path, {"w": {"dtype": "F32", "shape": [2**40, 2**40],
                                        "data_offsets": [0, 16]}}, b"\0" * 16)
  elif case == "absurd_empty_shape":  # no bytes, but dimensions numpy cannot hold
    _write_raw_safetensors(path, {"w": {"dtype": "F32", "shape": [2**40, 2**40, 0],
                                        "data_offsets": [0, 0]}}, b"")
  elif case == "offset_out_of_range":
    _write_raw_safetensors(path, {"w": {"dtype": "F32", "shape": [4], "data_offsets": [100, 116]}},
                           b"\0" * 16)
  elif case == "bad_json":
    path.write_bytes(struct.pack("<Q", 5) + b"{nope")
  elif case == "empty":
    path.write_bytes(b"")
  elif case == "unknown_dtype":
    _write_raw_safetensors(path, {"w": {"dtype": "C64", "shape": [1], "data_offsets": [0, 8]}}, b"\0" * 8)
  with pytest.raises(CheckpointError) as e:
    weights.read_safetensors(path)
  assert str(e.value).startswith("ftjax: error: ") and "\n" not in str(e.value)
  assert str(path) in str(e.value)
  if case == "unknown_dtype":
    assert "unsupported safetensors dtype" in str(e.value) and ": C64;" in str(e.value)
  if case in ("absurd_shape", "absurd_empty_shape"):  # bytes that disagree first, then dimensions
    assert ("size disagrees with its shape" if case == "absurd_shape" else "impossible shape") in str(e.value)
  if case in ("huge_header", "bad_json", "empty"):  # the metadata reader validates the same header
    with pytest.raises(CheckpointError, match=str(path)):
      weights.read_safetensors_metadata(path)


def test_npz_roundtrip_and_object_payload_refused(tmp_path):
  good = tmp_path / "good.npz"
  np.savez(good, **{"x/kernel": np.ones((2, 2), np.float32)})
  np.testing.assert_array_equal(weights.read_npz(good)["x/kernel"], np.ones((2, 2)))
  # numpy writes bfloat16 (ml_dtypes) as raw 2-byte voids: read back as bfloat16, not bytes
  values = np.array([1.5, -2.0, 3.0e-3], ml_dtypes.bfloat16)
  np.savez(good, w=values, f8=np.zeros(2, ml_dtypes.float8_e4m3fn))  # 1-byte voids: not guessed
  with pytest.raises(CheckpointError, match=r"unsupported array dtype \(.*good.npz:f8\): \|V1"):
    weights.read_npz(good)
  np.savez(good, w=values)
  got = weights.read_npz(good)["w"]
  assert got.dtype == ml_dtypes.bfloat16 and np.array_equal(got, values)

  marker = tmp_path / "payload_ran"

  class Payload:
    def __reduce__(self):
      return (open, (str(marker), "w"))

  bad = tmp_path / "bad.npz"
  np.savez(bad, w=np.array([Payload()], dtype=object))
  with pytest.raises(CheckpointError, match="pickled objects"):
    weights.read_npz(bad)
  assert not marker.exists()


def test_corrupted_npz_refused(tmp_path):
  path = tmp_path / "c.npz"
  np.savez(path, w=np.arange(1000, dtype=np.float32))
  raw = bytearray(path.read_bytes())
  raw[len(raw) // 2] ^= 0xFF  # flip bits inside the stored array: the zip CRC catches it
  path.write_bytes(bytes(raw))
  with pytest.raises(CheckpointError, match="corrupted .npz"):
    weights.read_npz(path)
  path.write_bytes(b"PK\x03\x04 not really a zip")
  with pytest.raises(CheckpointError, match="corrupted .npz"):
    weights.read_npz(path)
  # A compressed member whose deflate stream is damaged (zlib, not the CRC, notices).
  np.savez_compressed(path, w=np.random.default_rng(0).random((8, 8, 3, 32)).astype(np.float32))
  raw = bytearray(path.read_bytes())
  raw[150:166] = bytes(b ^ 0xA5 for b in raw[150:166])
  path.write_bytes(bytes(raw))
  with pytest.raises(CheckpointError, match=r"corrupted .npz file \(.*c.npz\)"):
    weights.read_npz(path)


def test_torch_state_dict_roundtrip_and_unwrap(tmp_path):
  sd = {"w": torch.randn(3, 2), "b": torch.randn(2).to(torch.bfloat16), "n": torch.tensor(3),
        "f8": torch.tensor([0.5, -3.0]).to(torch.float8_e5m2)}
  path = tmp_path / "m.pth"
  torch.save({"state_dict": sd, "epoch": 3}, path)
  got = weights.read_torch(path)
  np.testing.assert_array_equal(got["w"], sd["w"].numpy())
  np.testing.assert_array_equal(got["b"], sd["b"].float().numpy())
  assert got["f8"].dtype == np.float32 and got["f8"].tolist() == [0.5, -3.0]
  assert got["n"] == 3
  # Saved from a DistributedDataParallel (or compiled) model: every key carries the wrapper's prefix.
  torch.save({"state_dict": {f"module._orig_mod.{k}": v for k, v in sd.items()}}, path)
  assert sorted(weights.read_torch(path)) == ["b", "f8", "n", "w"]
  torch.save({"module.w": sd["w"], "head.w": sd["w"]}, path)  # a prefix not on every key is a name
  assert sorted(weights.read_torch(path)) == ["head.w", "module.w"]
  from safetensors.torch import save_file  # the same state dict written as safetensors
  save_file({f"_orig_mod.{k}": v for k, v in sd.items()}, str(tmp_path / "m.safetensors"))
  assert sorted(weights.read_tensors(tmp_path / "m.safetensors")) == ["b", "f8", "n", "w"]


def test_a_timm_training_checkpoint_reads_its_ema_weights_and_lists_the_rest(tmp_path):
  import argparse
  raw, ema = {"w": torch.zeros(2)}, {"w": torch.ones(2)}
  path = tmp_path / "model_best.pth.tar"  # as timm's train.py saves it, argparse args included
  torch.save({"epoch": 9, "arch": "resnet18", "state_dict": raw, "optimizer": {"state": {}},
              "args": argparse.Namespace(lr=0.1, model="resnet18"), "state_dict_ema": ema}, path)
  got = weights.read_torch(path)
  assert got["w"].tolist() == [1.0, 1.0]  # timm's load_checkpoint: use_ema=True
  assert dict(got.left_out) == {
      "epoch": "training state, not model weights", "arch": "training state, not model weights",
      "state_dict": "raw weights: the EMA weights (state_dict_ema) were read, as timm's load_checkpoint does",
      "optimizer": "training state, not model weights", "args": "training state, not model weights"}
  torch.save({"model": raw, "epoch": 1}, path)
  assert weights.read_torch(path)["w"].tolist() == [0.0, 0.0]
  assert weights.read_torch(path).left_out == [("epoch", "training state, not model weights")]


@pytest.mark.parametrize("kind", ["quantized", "sparse"])
def test_quantized_and_sparse_tensors_are_refused_by_name(tmp_path, kind):
  w = (torch.quantize_per_tensor(torch.randn(4, 3), 0.1, 0, torch.qint8) if kind == "quantized"
       else torch.randn(4, 3).to_sparse())
  path = tmp_path / "q.pth"
  torch.save({"fc.weight": w, "fc.bias": torch.zeros(4)}, path)
  with pytest.raises(CheckpointError, match=r"quantized or sparse tensor \(.*q.pth:fc.weight\): .*"
                                            r"only dense float weights are read"):
    weights.read_torch(path)


def test_torch_pickle_payload_never_runs(tmp_path):
  marker = tmp_path / "payload_ran"

  class Payload:
    def __reduce__(self):
      return (open, (str(marker), "w"))

  path = tmp_path / "evil.pth"
  torch.save({"w": torch.ones(1), "evil": Payload()}, path)
  with pytest.raises(CheckpointError, match="refused PyTorch file"):
    weights.read_torch(path)
  assert not marker.exists()
  # A legacy (non-zip) pickle with the payload at top level too.
  path2 = tmp_path / "evil_legacy.bin"
  with open(path2, "wb") as f:
    pickle.dump(Payload(), f)
  assert not marker.exists()
  with pytest.raises(CheckpointError):
    weights.read_torch(path2)
  assert not marker.exists()


def test_missing_and_wrong_kind_of_file(tmp_path):
  with pytest.raises(CheckpointError, match="not found"):
    weights.read_tensors(tmp_path / "nope.safetensors")
  with pytest.raises(CheckpointError, match="not a file"):
    weights.read_tensors(tmp_path)
  junk = tmp_path / "junk.pth"
  junk.write_bytes(b"\x00\x01garbage")
  with pytest.raises(CheckpointError, match="not a PyTorch file"):  # not "holds objects": it holds none
    weights.read_torch(junk)


def test_old_torch_releases_refused():
  assert weights.torch_version_ok("2.10.0")
  assert weights.torch_version_ok("2.14.1+cu130")
  assert not weights.torch_version_ok("2.9.1")
  assert not weights.torch_version_ok("1.13.1")


@pytest.mark.slow  # 20 s or more on 2 slow cores; CI runs it (-m slow)
def test_offline_hub_error_is_one_line(monkeypatch, tmp_path):
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
  with pytest.raises(CheckpointError) as e:
    weights.hf_file("google/vit-base-patch16-224", ("config.json",), source="hf:google/vit-base-patch16-224")
  msg = str(e.value)
  assert "hf:google/vit-base-patch16-224" in msg and "local path" in msg and "\n" not in msg


def test_zip_named_npz_with_pickle_member_is_refused(tmp_path):
  # An .npz whose member is a pickle, not an .npy: numpy would unpickle it with allow_pickle=True.
  marker = tmp_path / "payload_ran"

  class Payload:
    def __reduce__(self):
      return (open, (str(marker), "w"))

  path = tmp_path / "p.npz"
  with zipfile.ZipFile(path, "w") as z:
    z.writestr("w.npy", pickle.dumps(Payload()))
  with pytest.raises(CheckpointError):
    weights.read_npz(path)
  assert not marker.exists()


def test_an_interrupted_download_leaves_nothing_in_the_cache(monkeypatch, tmp_path):
  """A connection that ends early must not leave a partial file to be taken for the whole one."""
  import io
  import urllib.request

  from ftjax.weights import hub

  class Response(io.BytesIO):
    headers = {"Content-Length": "1000"}  # the server promised 1000 bytes, sends 10

  monkeypatch.setattr(hub, "CACHE_DIR", tmp_path / "cache")
  monkeypatch.setattr(urllib.request, "urlopen", lambda url, timeout: Response(b"0123456789"))
  with pytest.raises(CheckpointError, match=r"cannot download .*IncompleteRead"):
    weights.url_file("https://example.com/w.npz", source="npz:B/16@https://example.com/w.npz")
  assert [p for p in (tmp_path / "cache").rglob("*") if p.is_file()] == []
  Response.headers = {"Content-Length": "10"}
  path = weights.url_file("https://example.com/w.npz", source="x")
  assert open(path, "rb").read() == b"0123456789"
