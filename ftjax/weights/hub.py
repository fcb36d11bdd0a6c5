"""Fetching checkpoints: Hugging Face hub repos and plain URLs, with clear offline errors."""

from __future__ import annotations

import hashlib
import http.client
import os
import shutil
import socket
import tempfile
import urllib.parse
import urllib.request
from pathlib import Path

from ftjax.errors import CheckpointError

CACHE_DIR = Path(os.environ.get("FTJAX_CACHE", Path.home() / ".cache" / "ftjax"))


def hf_file(repo_id: str, filenames: tuple[str, ...], *, source: str) -> tuple[str, str]:
  """Downloads the first of ``filenames`` that ``repo_id`` has; returns (local path, filename)."""
  try:
    from huggingface_hub import hf_hub_download
  except ImportError:  # pragma: no cover - huggingface_hub is a dependency
    raise CheckpointError("huggingface_hub is not installed", where=source) from None
  # Where the hub's host does not even resolve (no network), read the local cache only:
  # huggingface_hub would otherwise retry each request five times (about 23 s, two log
  # lines a try) before falling back to the cache or failing.
  offline = not _resolves(_hub_host())
  last = None
  for name in filenames:
    try:
      return hf_hub_download(repo_id, name, local_files_only=offline), name
    except Exception as e:  # the repo lacks the file -> try the next name; offline -> stop
      last = e
      # LocalEntryNotFoundError is "offline, and not in the cache": no other name can come.
      if type(e).__name__ != "LocalEntryNotFoundError" and ("EntryNotFound" in type(e).__name__
                                                             or "404" in str(e)):
        continue
      break
  raise CheckpointError("cannot fetch from the Hugging Face hub", where=source,
                        value=f"{type(last).__name__}: {' '.join(str(last).split())[:120]}",
                        hint="offline? download the files elsewhere and pass a local path, "
                             "e.g. hf:/path/to/dir or timm:<name>@/path/to/model.safetensors")


def _hub_host() -> str:
  try:
    from huggingface_hub import constants
    endpoint = constants.ENDPOINT
  except (ImportError, AttributeError):  # pragma: no cover - an older huggingface_hub
    endpoint = "https://huggingface.co"
  return urllib.parse.urlparse(endpoint).hostname or "huggingface.co"


def _resolves(host: str) -> bool:
  """Whether ``host`` has an address (False at once where there is no network)."""
  try:
    socket.getaddrinfo(host, 443)
  except (OSError, UnicodeError):
    return False
  return True


def url_file(url: str, *, source: str) -> str:
  """Downloads ``url`` (http(s) or gs://) into the cache once; returns the local path."""
  if url.startswith("gs://"):
    url = "https://storage.googleapis.com/" + url[len("gs://"):]
  digest = hashlib.sha256(url.encode()).hexdigest()[:16]
  dest = CACHE_DIR / digest / url.rsplit("/", 1)[-1]
  if dest.exists():
    return str(dest)
  tmp = None
  try:
    dest.parent.mkdir(parents=True, exist_ok=True)
    # Download to a temporary name first: an interrupted download never
    # leaves a half-written file under the final name (where it would be taken
    # for the whole file by every later run).
    with urllib.request.urlopen(url, timeout=30) as r, tempfile.NamedTemporaryFile(
        dir=dest.parent, delete=False) as f:
      tmp = f.name
      shutil.copyfileobj(r, f)
      expected, got = r.headers.get("Content-Length"), f.tell()
    if expected is not None and expected.isdigit() and int(expected) != got:
      raise http.client.IncompleteRead(b"", int(expected) - got)
    os.replace(tmp, dest)
  except (OSError, http.client.HTTPException) as e:
    if tmp is not None and os.path.exists(tmp):
      os.unlink(tmp)
    raise CheckpointError("cannot download", where=source, value=f"{url}: {type(e).__name__}: {e}",
                          hint="offline? download the file elsewhere and pass its local path") from None
  return str(dest)


def is_url(s: str) -> bool:
  return s.startswith(("http://", "https://", "gs://"))
