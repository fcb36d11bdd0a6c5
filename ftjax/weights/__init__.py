"""Reading weight files (safetensors, npz, torch pickles) and fetching them from hubs."""

from ftjax.weights.formats import (parse_safetensors_header, read_npz, read_safetensors,
                                   read_safetensors_metadata, read_tensors, read_torch,
                                   torch_version_ok)
from ftjax.weights.hub import hf_file, is_url, url_file

__all__ = ["parse_safetensors_header", "read_npz", "read_safetensors", "read_safetensors_metadata",
           "read_tensors", "read_torch", "torch_version_ok", "hf_file", "is_url", "url_file"]
