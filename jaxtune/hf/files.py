"""safetensors files of a Hugging Face model directory: lazy reading and sharded writing.

`Tensors` opens every *.safetensors file of a directory (through the index when there is
one) and reads a tensor only when asked; `save_safetensors` writes model.safetensors, or
shards plus an index when large. A value given to `save_safetensors` may be a `Lazy`
tensor (one tensor of another checkpoint, read when its shard is written), so copying a
large part of a source checkpoint through an export holds one shard in memory at a time.
Pickled weights are never read. `jaxtune.hf.io` re-exports these names.
"""

from __future__ import annotations

import json
import os

import numpy as np
import safetensors
import safetensors.numpy

# Bytes per element of the safetensors dtypes (shard sizing only).
_ITEM_BYTES = {"F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2,
               "BF16": 2, "I16": 2, "U16": 2}


def convert_command(model_dir: str) -> str:
  """A shell command that rewrites a pickled HF model dir as safetensors (run it only in an
  environment that trusts the pickles: loading them runs code)."""
  out = model_dir.rstrip("/") + "-safetensors"
  return (f"python -c \"import transformers as t; d, o = {model_dir!r}, {out!r}; "
          "t.AutoModelForCausalLM.from_pretrained(d).save_pretrained(o, safe_serialization=True)"
          "; t.AutoTokenizer.from_pretrained(d).save_pretrained(o)\"")


class Tensors:
  """Lazy access to the tensors of one or many safetensors files in a directory."""

  def __init__(self, model_dir: str):
    index = os.path.join(model_dir, "model.safetensors.index.json")
    if os.path.exists(index):
      with open(index) as f:
        weight_map = json.load(f)["weight_map"]
      files = sorted(set(weight_map.values()))
    else:
      files = sorted(f for f in os.listdir(model_dir) if f.endswith(".safetensors"))
      if not files:
        others = [f for f in os.listdir(model_dir) if f.endswith((".bin", ".pt", ".pth"))]
        raise ValueError(f"{model_dir}: no *.safetensors weights"
                         + (f" (found {', '.join(sorted(others))}: pickled weights are never "
                            "loaded, since unpickling runs code; in an environment you trust, "
                            f"convert them with: {convert_command(model_dir)})"
                            if others else ""))
    self.model_dir = model_dir
    self._handles = {}
    self.shapes: dict[str, tuple[int, ...]] = {}
    self._where: dict[str, str] = {}
    self._dtypes: dict[str, str] = {}
    for name in files:
      h = safetensors.safe_open(os.path.join(model_dir, name), framework="np")
      self._handles[name] = h
      for k in h.keys():
        s = h.get_slice(k)
        self._where[k] = name
        self.shapes[k] = tuple(s.get_shape())
        self._dtypes[k] = s.get_dtype()

  def get(self, key: str) -> np.ndarray:
    return self._handles[self._where[key]].get_tensor(key)

  def file_of(self, key: str) -> str:
    """The path of the file holding `key` (for error messages)."""
    return os.path.join(self.model_dir, self._where[key])

  def nbytes(self, key: str) -> int:
    return int(np.prod(self.shapes[key], dtype=np.int64)) * _ITEM_BYTES.get(self._dtypes[key], 1)


class Lazy:
  """One tensor of a `Tensors`, read only when `save_safetensors` writes its shard."""

  def __init__(self, tensors: Tensors, key: str):
    self.tensors, self.key = tensors, key
    self.nbytes = tensors.nbytes(key)

  def load(self) -> np.ndarray:
    return self.tensors.get(self.key)


def save_safetensors(tensors: dict, out_dir: str, *, max_shard_bytes: int = 5 * 2**30,
                     metadata: dict | None = None) -> list[str]:
  """Writes model.safetensors, or model-0000k-of-0000n.safetensors + index when large.

  Values are host arrays or `Lazy` tensors (read one shard at a time, written unchanged).
  """
  os.makedirs(out_dir, exist_ok=True)
  shards: list[dict] = [{}]
  size = 0
  for k in sorted(tensors):
    n = tensors[k].nbytes
    if shards[-1] and size + n > max_shard_bytes:
      shards.append({})
      size = 0
    shards[-1][k] = tensors[k]
    size += n
  meta = {"format": "pt", **{k: str(v) for k, v in (metadata or {}).items()}}

  def write(shard: dict, name: str) -> None:
    arrays = {k: v.load() if isinstance(v, Lazy) else v for k, v in shard.items()}
    safetensors.numpy.save_file(arrays, os.path.join(out_dir, name), meta)

  if len(shards) == 1:
    write(shards[0], "model.safetensors")
    return ["model.safetensors"]
  names, weight_map = [], {}
  for j, shard in enumerate(shards):
    name = f"model-{j + 1:05d}-of-{len(shards):05d}.safetensors"
    write(shard, name)
    names.append(name)
    weight_map.update({k: name for k in shard})
  index = {"metadata": {"total_size": int(sum(t.nbytes for t in tensors.values()))},
           "weight_map": weight_map}
  with open(os.path.join(out_dir, "model.safetensors.index.json"), "w") as f:
    json.dump(index, f, indent=2)
  return names
