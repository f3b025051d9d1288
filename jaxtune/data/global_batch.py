"""From a process's rows to global jax.Arrays, and a digest to compare batches.

Each process holds only its rows of the global batch (loader.py). `to_global` stitches them
into global arrays with `jax.make_array_from_process_local_data`; the sharding (usually
NamedSharding(mesh, P(('data', 'fsdp')))) splits the leading batch axis, and its trailing
axes are replicated, so the same sharding serves [B, T] and [B, 2, T] arrays. Values that
are not arrays (the prompts' `answers` list) pass through unchanged.

`digest(batch)` is a sha256 over keys, dtypes, shapes and bytes: resume tests and logs
compare batches by it.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import numpy as np


def to_global(batch: dict[str, Any], sharding) -> dict[str, Any]:
  """This process's batch -> global jax.Arrays; `sharding` is one Sharding or a dict by key."""
  import jax  # pylint: disable=g-import-not-at-top

  out = {}
  for key, value in batch.items():
    if isinstance(value, np.ndarray):
      s = sharding[key] if isinstance(sharding, dict) else sharding
      out[key] = jax.make_array_from_process_local_data(s, value)
    else:
      out[key] = value
  return out


def digest(batch: dict[str, Any]) -> str:
  h = hashlib.sha256()
  for key in sorted(batch):
    value = batch[key]
    h.update(key.encode())
    if isinstance(value, np.ndarray):
      h.update(f"{value.dtype}{value.shape}".encode())
      h.update(np.ascontiguousarray(value).tobytes())
    else:
      h.update(json.dumps(value, sort_keys=True, default=str).encode())
  return h.hexdigest()
