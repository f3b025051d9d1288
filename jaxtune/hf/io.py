"""Reading and writing Hugging Face model directories: safetensors only, never pickles.

`load_hf` takes a local directory or a hub id (downloading only json, safetensors and
tokenizer files, never `*.bin` and never remote code), checks every tensor name and shape
against the family's key table, and places each param on the mesh as it is read, so a
model is never held twice. `save_hf` writes config.json, generation_config.json,
(sharded) safetensors with an index, and the tokenizer with its chat template
(`save_tokenizer`: loadable by every transformers version pyproject allows). A directory
with pickled weights only is refused with the command that converts it safely; a missing
local path says "no such directory" instead of trying the hub.
"""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import safetensors
import safetensors.numpy

from jaxtune import config as config_lib
from jaxtune import storage
from jaxtune import tree
from jaxtune.hf import config as hf_config
from jaxtune.hf import gguf as hf_gguf
from jaxtune.hf import keys

_HUB_PATTERNS = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.jinja", "*.txt"]

NP_DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}


def resolve(path_or_id: str) -> str:
  """A local directory (or .gguf file) for `path_or_id`: itself if local, a local copy of
  a bucket URL (s3://, gs://: `storage.model_dir`), else a hub snapshot."""
  if storage.is_remote(path_or_id):
    return storage.model_dir(path_or_id)
  if os.path.isdir(path_or_id) or hf_gguf.is_gguf(path_or_id):
    return path_or_id
  if os.path.exists(path_or_id):
    raise ValueError(f"{path_or_id}: expected a model directory, got a file")
  from jaxtune import paths  # pylint: disable=g-import-not-at-top
  if not paths.is_hub_id(path_or_id):
    raise ValueError(f"{path_or_id}: no such directory (looked for "
                     f"{os.path.abspath(path_or_id)}); expected a model directory or a hub id")
  import huggingface_hub  # only needed for hub ids
  try:
    return huggingface_hub.snapshot_download(path_or_id, allow_patterns=_HUB_PATTERNS)
  except Exception as e:  # offline, unknown id, gated: say which and why
    first = next((l.strip() for l in str(e).splitlines() if l.strip()), "")
    raise ValueError(f"{path_or_id}: no such directory (looked for "
                     f"{os.path.abspath(path_or_id)}) and not downloadable from the hub "
                     f"({type(e).__name__}: {first})") from e


def read_config(model_dir: str, base: config_lib.ModelConfig | None = None):
  if hf_gguf.is_gguf(model_dir):
    return hf_gguf.read_config(model_dir, base)
  path = os.path.join(model_dir, "config.json")
  if not os.path.exists(path):
    raise ValueError(f"{model_dir}: no config.json")
  with open(path) as f:
    return hf_config.from_hf(json.load(f), base, source=path)


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
    self._handles = {}
    self.shapes: dict[str, tuple[int, ...]] = {}
    self._where: dict[str, str] = {}
    for name in files:
      h = safetensors.safe_open(os.path.join(model_dir, name), framework="np")
      self._handles[name] = h
      for k in h.keys():
        self._where[k] = name
        self.shapes[k] = tuple(h.get_slice(k).get_shape())

  def get(self, key: str) -> np.ndarray:
    return self._handles[self._where[key]].get_tensor(key)


def load_hf(path_or_id: str, dtype=jnp.float32, *,
            base: config_lib.ModelConfig | None = None,
            place: Callable[[str, np.ndarray], Any] | None = None):
  """(ModelConfig, params) from an HF directory or hub id.

  dtype: storage dtype of the returned params. `place(path, host_array)` puts one param
  where it belongs (e.g. `jax.device_put` with its NamedSharding, or quantise-then-put);
  the default is `jnp.asarray` on the default device.
  """
  model_dir = resolve(path_or_id)
  if hf_gguf.is_gguf(model_dir):  # a .gguf file or a dir holding one: dequantized on the host
    return hf_gguf.load(model_dir, dtype, base=base, place=place)
  cfg = read_config(model_dir, base)
  tensors = Tensors(model_dir)
  keys.check_keys(cfg, tensors.shapes, model_dir)
  np_dtype = np.dtype(jnp.dtype(dtype))
  place = place or (lambda _, x: jnp.asarray(x))
  flat = {}
  for path, host in keys.to_params(cfg, tensors.get):
    flat[path] = place(path, host.astype(np_dtype))
  return cfg, tree.unflatten(flat)


def to_host(x) -> np.ndarray:
  """A full host copy of a (possibly multi-host sharded) array."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(x)


def save_safetensors(tensors: dict[str, np.ndarray], out_dir: str, *,
                     max_shard_bytes: int = 5 * 2**30, metadata: dict | None = None) -> list[str]:
  """Writes model.safetensors, or model-0000k-of-0000n.safetensors + index when large."""
  os.makedirs(out_dir, exist_ok=True)
  shards: list[dict[str, np.ndarray]] = [{}]
  size = 0
  for k in sorted(tensors):
    n = tensors[k].nbytes
    if shards[-1] and size + n > max_shard_bytes:
      shards.append({})
      size = 0
    shards[-1][k] = tensors[k]
    size += n
  meta = {"format": "pt", **{k: str(v) for k, v in (metadata or {}).items()}}
  if len(shards) == 1:
    safetensors.numpy.save_file(shards[0], os.path.join(out_dir, "model.safetensors"), meta)
    return ["model.safetensors"]
  names, weight_map = [], {}
  for j, shard in enumerate(shards):
    name = f"model-{j + 1:05d}-of-{len(shards):05d}.safetensors"
    safetensors.numpy.save_file(shard, os.path.join(out_dir, name), meta)
    names.append(name)
    weight_map.update({k: name for k in shard})
  index = {"metadata": {"total_size": int(sum(t.nbytes for t in tensors.values()))},
           "weight_map": weight_map}
  with open(os.path.join(out_dir, "model.safetensors.index.json"), "w") as f:
    json.dump(index, f, indent=2)
  return names


def save_hf(cfg: config_lib.ModelConfig, params: dict, out_dir: str, tokenizer=None, *,
            dtype: str | None = None, max_shard_bytes: int = 5 * 2**30,
            metadata: dict | None = None) -> str:
  """Writes an HF model directory that `transformers.AutoModelForCausalLM` loads.

  dtype: 'float32' | 'bfloat16' | 'float16' (default: cfg.param_dtype). Quantised leaves
  must be dequantised (or merged) before export. Only process 0 writes; all processes
  must call it (gathering sharded params is collective). `out_dir` may be a bucket URL
  (written locally, then uploaded).
  """
  if storage.is_remote(out_dir):
    with tempfile.TemporaryDirectory() as tmp:
      save_hf(cfg, params, tmp, tokenizer, dtype=dtype, max_shard_bytes=max_shard_bytes,
              metadata=metadata)
      if jax.process_index() == 0:
        storage.upload(tmp, out_dir)
    return out_dir
  dtype = dtype or cfg.param_dtype
  flat = {}
  for path, x in tree.flatten(params).items():
    if not isinstance(x, (jax.Array, np.ndarray)):
      raise ValueError(f"save_hf: param {path} is a {type(x).__name__}; dequantise or merge "
                       "it to a dense array first")
    flat[path] = to_host(x).astype(NP_DTYPES[dtype])
  if jax.process_index() != 0:
    return out_dir
  os.makedirs(out_dir, exist_ok=True)
  save_safetensors(keys.to_hf(cfg, flat), out_dir, max_shard_bytes=max_shard_bytes,
                   metadata=metadata)
  hf = hf_config.to_hf(cfg, dtype=dtype)
  if metadata:
    hf["jaxtune"] = metadata
  with open(os.path.join(out_dir, "config.json"), "w") as f:
    json.dump(hf, f, indent=2)
  gen = {k: hf[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if hf[k] is not None}
  with open(os.path.join(out_dir, "generation_config.json"), "w") as f:
    json.dump(gen, f, indent=2)
  if tokenizer is not None:
    save_tokenizer(tokenizer, out_dir)
  return out_dir


def convert_command(model_dir: str) -> str:
  """A shell command that rewrites a pickled HF model dir as safetensors (run it only in an
  environment that trusts the pickles: loading them runs code)."""
  out = model_dir.rstrip("/") + "-safetensors"
  return (f"python -c \"import transformers as t; d, o = {model_dir!r}, {out!r}; "
          "t.AutoModelForCausalLM.from_pretrained(d).save_pretrained(o, safe_serialization=True)"
          "; t.AutoTokenizer.from_pretrained(d).save_pretrained(o)\"")


# transformers 5 writes its own backend class names, which 4.x does not have; these load as
# the same tokenizer under the name both know.
_TOKENIZER_CLASSES = {"TokenizersBackend": "PreTrainedTokenizerFast"}
_LOAD_STATE_KEYS = ("is_local", "local_files_only")  # how it was loaded, not what it is


def save_tokenizer(tok, out_dir: str) -> None:
  """tok.save_pretrained(out_dir), with a tokenizer_config.json that every transformers
  version jaxtune allows (4.56 ... 5.x) loads: a class name both know and no load-time
  state (the chat template stays in chat_template.jinja, which both read)."""
  tok.save_pretrained(out_dir)
  path = os.path.join(out_dir, "tokenizer_config.json")
  if not os.path.exists(path):
    return
  with open(path, encoding="utf-8") as f:
    cfg = json.load(f)
  cls = cfg.get("tokenizer_class")
  cfg["tokenizer_class"] = _TOKENIZER_CLASSES.get(cls, cls)
  for key in _LOAD_STATE_KEYS:
    cfg.pop(key, None)
  with open(path, "w", encoding="utf-8") as f:
    json.dump(cfg, f, indent=2, ensure_ascii=False)
