"""Readers for weight files: safetensors, numpy .npz, PyTorch pickles.

Nothing in a file is ever executed: safetensors headers are validated before a
single tensor byte is read (no allocation of a claimed size, no read out of
bounds), ``.npz`` files are opened with ``allow_pickle=False``, and PyTorch
files only with ``torch.load(..., weights_only=True)`` on a torch release
without known bypasses of it (2.10 or newer).  Every reader returns a flat
``{name: np.ndarray}`` dict and raises :class:`ftjax.errors.CheckpointError`
naming the file on any problem.
"""

from __future__ import annotations

import argparse
import json
import os
import struct
import zipfile
import zlib
from pathlib import Path

import ml_dtypes
import numpy as np

from ftjax.errors import CheckpointError

# A safetensors header larger than this is refused without reading it.
_MAX_HEADER_BYTES = 100 * 1024 * 1024

_ST_DTYPES = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U64": np.dtype(np.uint64),
    "U32": np.dtype(np.uint32), "U16": np.dtype(np.uint16), "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_), "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
}

# torch.load(weights_only=True) had known bypasses before 2.10 (pickle payloads
# reaching code through allow-listed globals); older releases are refused.
MIN_TORCH = (2, 10)


def _check_file(path: str | os.PathLike) -> Path:
  p = Path(path)
  if not p.exists():
    raise CheckpointError("weight file not found", where=str(p), hint="check the path")
  if not p.is_file():
    raise CheckpointError("not a file", where=str(p), hint="pass the weight file, not a folder")
  return p


def _read_header(p: Path) -> tuple[dict, int, int]:
  """(the header's JSON object, its length, the file size), validated before it is read."""
  size = p.stat().st_size
  with open(p, "rb") as f:
    head = f.read(8)
    if len(head) < 8:
      raise CheckpointError("truncated safetensors file (no header)", where=str(p),
                            value=f"{size} bytes")
    (n,) = struct.unpack("<Q", head)
    if n > _MAX_HEADER_BYTES or 8 + n > size:
      raise CheckpointError("invalid safetensors header length", where=str(p),
                            value=f"claims {n} bytes, file has {size}",
                            hint="the file is truncated or not safetensors")
    raw = f.read(n)
  try:
    header = json.loads(raw)
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    raise CheckpointError("invalid safetensors header", where=str(p), value=str(e)) from None
  if not isinstance(header, dict):
    raise CheckpointError("invalid safetensors header", where=str(p), value="not a JSON object")
  return header, n, size


def parse_safetensors_header(path: str | os.PathLike) -> tuple[dict, int]:
  """Reads and validates a safetensors header; returns (entries, data offset).

  Every entry's dtype, shape and byte range is checked against the file size,
  so a hostile header can neither make us allocate its claimed sizes nor read
  out of bounds.
  """
  p = _check_file(path)
  header, n, size = _read_header(p)
  data_len = size - 8 - n
  entries = {}
  for name, info in header.items():
    if name == "__metadata__":
      continue
    if isinstance(info, dict) and isinstance(info.get("dtype"), str) and info["dtype"] not in _ST_DTYPES:
      raise CheckpointError("unsupported safetensors dtype", where=f"{p}:{name}", value=info["dtype"],
                            hint=f"one of {', '.join(_ST_DTYPES)}")
    try:
      dtype = _ST_DTYPES[info["dtype"]]
      shape = tuple(int(d) for d in info["shape"])
      begin, end = (int(o) for o in info["data_offsets"])
    except (KeyError, TypeError, ValueError):
      raise CheckpointError("invalid safetensors entry", where=f"{p}:{name}",
                            value=repr(info)[:200]) from None
    if any(d < 0 for d in shape):
      raise CheckpointError("negative dimension in safetensors entry", where=f"{p}:{name}",
                            value=shape)
    nbytes = int(np.prod(shape, dtype=object)) * dtype.itemsize
    if not 0 <= begin <= end or end - begin != nbytes:
      raise CheckpointError("safetensors entry size disagrees with its shape",
                            where=f"{p}:{name}", value=f"offsets {begin}..{end} for {shape} {dtype}")
    if any(d >= 2**62 for d in shape) or int(np.prod([max(d, 1) for d in shape], dtype=object)) >= 2**62:
      # an empty tensor may claim any other dimensions: numpy cannot represent these
      raise CheckpointError("impossible shape in safetensors entry", where=f"{p}:{name}", value=shape)
    if end > data_len:
      raise CheckpointError("truncated safetensors file", where=f"{p}:{name}",
                            value=f"needs byte {end}, data has {data_len}")
    entries[name] = (dtype, shape, begin, end)
  return entries, 8 + n


def read_safetensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """All tensors of a safetensors file as numpy arrays (one read, zero-copy views)."""
  entries, offset = parse_safetensors_header(path)
  with open(path, "rb") as f:
    f.seek(offset)
    end = max((e for *_, e in entries.values()), default=0)
    buf = bytearray(end)
    got = f.readinto(buf)
  if got != end:
    raise CheckpointError("truncated safetensors file", where=str(path), value=f"{got} of {end} bytes")
  return {name: np.frombuffer(buf, dtype=dt, count=int(np.prod(shape, dtype=np.int64)),
                              offset=b).reshape(shape)
          for name, (dt, shape, b, _) in entries.items()}


def read_safetensors_metadata(path: str | os.PathLike) -> dict:
  """The header's ``__metadata__`` (string to string), ``{}`` when it has none."""
  p = _check_file(path)
  meta = _read_header(p)[0].get("__metadata__") or {}
  if not isinstance(meta, dict):
    raise CheckpointError("invalid safetensors metadata", where=str(p), value=type(meta).__name__)
  return meta


def read_npz(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """All arrays of an ``.npz`` file; object arrays (pickles) are refused."""
  p = _check_file(path)
  with open(p, "rb") as f:
    magic = f.read(4)
  if not magic:
    raise CheckpointError("empty weight file", where=str(p), hint="the download or copy did not finish")
  if magic != b"PK\x03\x04":  # numpy would take any non-zip file for a pickle
    raise CheckpointError("not an .npz file (no zip header)", where=str(p),
                          hint="pass a .npz written by numpy.savez")
  try:
    with np.load(p, allow_pickle=False) as z:
      out = {k: z[k] for k in z.files}
  except ValueError as e:
    if "allow_pickle" in str(e):
      raise CheckpointError("refused .npz holding pickled objects", where=str(p),
                            hint="only plain numeric arrays are read; objects could run code") from None
    raise CheckpointError("corrupted .npz file", where=str(p), value=str(e)) from None
  except (zipfile.BadZipFile, OSError, EOFError, zlib.error) as e:
    raise CheckpointError("corrupted .npz file", where=str(p), value=str(e)) from None
  for k, v in out.items():
    if not isinstance(v, np.ndarray):  # numpy hands back raw bytes for a member that is not .npy
      raise CheckpointError("corrupted .npz file: member is not an array", where=f"{p}:{k}")
    if v.dtype == np.dtype("V2"):  # numpy saves ml_dtypes' bfloat16 (jax's bf16 params) as raw voids
      out[k] = v.view(ml_dtypes.bfloat16)
    elif v.dtype.kind not in "fiub":
      raise CheckpointError("unsupported array dtype", where=f"{p}:{k}", value=v.dtype.str,
                            hint="weights must be float, int or bool arrays (bfloat16 is read)")
  return out


def torch_version_ok(version: str) -> bool:
  """True where ``torch.load(weights_only=True)`` has no known bypass.

  >>> torch_version_ok("2.13.0+cpu"), torch_version_ok("2.5.1")
  (True, False)
  """
  parts = []
  for piece in version.split("+")[0].split(".")[:2]:
    digits = "".join(c for c in piece if c.isdigit())
    parts.append(int(digits or 0))
  return tuple(parts) >= MIN_TORCH


class Tensors(dict):
  """A file's tensors by name, and what of the file was not read: ``left_out``, (entry, why)."""

  def __init__(self, *args, left_out: list[tuple[str, str]] | None = None, **kwargs):
    super().__init__(*args, **kwargs)
    self.left_out = list(left_out or [])


# Where training checkpoints keep their weights, most wanted first: timm's train.py saves the
# EMA weights beside the raw ones and its load_checkpoint reads them (use_ema=True).
_EMA_KEYS = ("state_dict_ema", "model_ema")
_WEIGHT_KEYS = ("state_dict", "model", "model_state_dict", "module")


def read_torch(path: str | os.PathLike) -> Tensors:
  """A PyTorch state dict (``.pth``/``.bin``/``.pt``), read with ``weights_only=True``.

  A training checkpoint that wraps the state dict (``{"state_dict": ...}``,
  ``{"model": ...}``) is unwrapped; where it also holds EMA weights
  (``state_dict_ema``, ``model_ema``: timm's train.py) those are read, as timm's
  ``load_checkpoint`` does.  Its other entries (epoch, optimizer, the argparse
  ``args`` timm stores, allowed through ``weights_only``) are listed in
  ``left_out``.  The ``module.`` prefix that ``DistributedDataParallel`` (and
  ``torch.compile``'s ``_orig_mod.``) put on every key is dropped.  bf16 and
  float8 tensors come back as float32; quantized and sparse tensors are refused.
  """
  p = _check_file(path)
  try:
    import torch
  except ImportError:
    raise CheckpointError("reading a PyTorch file needs torch", where=str(p),
                          hint="pip install 'ftjax[torch]', or convert it to safetensors") from None
  if not torch_version_ok(torch.__version__):
    raise CheckpointError("refused: this torch release has known weights_only bypasses",
                          where=str(p), value=torch.__version__, hint="install torch>=2.10")
  if p.stat().st_size == 0:
    raise CheckpointError("empty weight file", where=str(p), hint="the download or copy did not finish")
  try:
    # timm's training checkpoints store the run's argparse.Namespace: plain values, no code.
    with torch.serialization.safe_globals([argparse.Namespace]):
      obj = torch.load(p, map_location="cpu", weights_only=True)
  except Exception as e:  # torch raises UnpicklingError, RuntimeError, EOFError, zip errors...
    msg = " ".join(str(e).split())
    with open(p, "rb") as f:
      magic = f.read(2)
    # torch.save writes a zip archive (a pickle stream, protocol 2, before torch 1.6): anything
    # else (a web page saved under the file's name, a safetensors file) is no PyTorch file.
    if magic != b"PK" and magic[:1] != b"\x80":
      raise CheckpointError("not a PyTorch file (neither a zip archive nor a pickle)", where=str(p),
                            value=repr(magic), hint="check the download; .safetensors files need "
                            "that extension") from None
    if "Weights only load failed" in msg or "Unsupported global" in msg or "UnpicklingError" in type(e).__name__:
      raise CheckpointError("refused PyTorch file: it holds objects other than tensors", where=str(p),
                            value=msg[:160], hint="only plain state dicts are loaded; nothing was run") from None
    raise CheckpointError("unreadable PyTorch file", where=str(p), value=msg[:160]) from None
  left_out = []
  if isinstance(obj, dict):
    key = next((k for k in _EMA_KEYS + _WEIGHT_KEYS if isinstance(obj.get(k), dict)), None)
    if key is not None:
      for other in obj:
        if other != key:
          why = (f"raw weights: the EMA weights ({key}) were read, as timm's load_checkpoint does"
                 if other in _WEIGHT_KEYS and key in _EMA_KEYS else
                 "other EMA weights" if other in _EMA_KEYS else "training state, not model weights")
          left_out.append((other, why))
      obj = obj[key]
  if not isinstance(obj, dict):
    raise CheckpointError("PyTorch file is not a state dict", where=str(p), value=type(obj).__name__)
  out = {}
  for k, v in obj.items():
    if isinstance(v, torch.Tensor):
      v = v.detach().cpu()
      if v.is_quantized or v.layout != torch.strided:
        raise CheckpointError("quantized or sparse tensor", where=f"{p}:{k}",
                              value=f"{v.dtype}, {v.layout}", hint="only dense float weights are read: "
                              "take the float checkpoint of the model")
      if v.dtype == torch.bfloat16 or v.dtype.is_floating_point and v.dtype.itemsize == 1:
        v = v.float()  # numpy has no bfloat16 or float8: exact in float32
      out[k] = v.numpy()
  return Tensors(_unwrapped(out), left_out=left_out)


def _unwrapped(tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Without the ``module.`` / ``_orig_mod.`` prefix a DistributedDataParallel or compiled
  model puts on every key of its state dict (only when every key has it: a wrapper's, not a name)."""
  for prefix in ("module.", "_orig_mod."):
    if tensors and all(k.startswith(prefix) for k in tensors):
      tensors = {k[len(prefix):]: v for k, v in tensors.items()}
  return tensors


def read_tensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """Dispatches on the file's extension: .safetensors, .npz, else a torch pickle.

  PyTorch state dicts (safetensors or pickle) lose a DDP / ``torch.compile`` wrapper's key prefix.
  """
  name = str(path)
  if name.endswith(".safetensors"):
    return _unwrapped(read_safetensors(path))
  if name.endswith(".npz"):
    return read_npz(path)
  return read_torch(path)
