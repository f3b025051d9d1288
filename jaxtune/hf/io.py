"""Reading and writing Hugging Face model directories: safetensors only, never pickles.

`load_hf` takes a local directory or a hub id (downloading only json, safetensors and
tokenizer files, never `*.bin` and never remote code), checks every tensor name and shape
against the family's key table, and places each param on the mesh as it is read, so a
model is never held twice. `save_hf` writes config.json, generation_config.json,
(sharded) safetensors with an index, and the tokenizer with its chat template
(`save_tokenizer`: loadable by every transformers version pyproject allows). A directory
with pickled weights only is refused with the command that converts it safely; a missing
local path says "no such directory" instead of trying the hub.

`tensor_view` shows a checkpoint's tensors under the names of the family's key table: the
language model of a multimodal wrapper (`Gemma3ForConditionalGeneration`, `multimodal`)
and MoE experts stored fused per layer (`fused_experts`) read like their plain layouts. A
model whose source was such a wrapper exports as the wrapper (`multimodal_export`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import tempfile
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from jaxtune import config as config_lib
from jaxtune import paths
from jaxtune import storage
from jaxtune import tree
from jaxtune.hf import config as hf_config
from jaxtune.hf import files
from jaxtune.hf import fused_experts
from jaxtune.hf import gguf as hf_gguf
from jaxtune.hf import keys
from jaxtune.hf import multimodal
from jaxtune.hf import multimodal_export

_log = logging.getLogger("jaxtune")

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
  return _read_config(model_dir, base)[0]


def _read_config(model_dir: str, base: config_lib.ModelConfig | None):
  """(ModelConfig, the multimodal wrapper or None) of an HF directory: one config.json read."""
  path = os.path.join(model_dir, "config.json")
  if not os.path.exists(path):
    raise ValueError(f"{model_dir}: no config.json")
  with open(path) as f:
    d = json.load(f)
  return hf_config.from_hf(d, base, source=path), multimodal.get(d.get("model_type"))


# The safetensors file layer lives in `files`; these names stay importable from here.
Tensors = files.Tensors
save_safetensors = files.save_safetensors
convert_command = files.convert_command


def tensor_view(cfg: config_lib.ModelConfig, model_dir: str, tensors: files.Tensors,
                w: multimodal.Wrapper | None):
  """(shapes, get) of a checkpoint's tensors as the family's key table names them: the
  language model of a multimodal wrapper `w` (`multimodal`), MoE experts stored fused
  (`fused_experts`) shown per expert; the tensors themselves otherwise."""
  shapes, get = tensors.shapes, tensors.get
  if w is not None:
    shapes, get = multimodal.text_view(w, shapes, get, model_dir, tensors.file_of)
  return fused_experts.view(cfg, shapes, get, source=model_dir, file_of=tensors.file_of)


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
  cfg, w = _read_config(model_dir, base)
  shapes, get = tensor_view(cfg, model_dir, Tensors(model_dir), w)
  keys.check_keys(cfg, shapes, model_dir)
  np_dtype = np.dtype(jnp.dtype(dtype))
  place = place or (lambda _, x: jnp.asarray(x))
  flat = {}
  for path, host in keys.to_params(cfg, get):
    flat[path] = place(path, host.astype(np_dtype))
  if not cfg.hf_path and w is not None:  # save_hf finds the wrapper here
    cfg = dataclasses.replace(cfg, hf_path=paths.model_source(path_or_id, "hf_path"))
  return cfg, tree.unflatten(flat)


def to_host(x) -> np.ndarray:
  """A full host copy of a (possibly multi-host sharded) array."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(x)


def _config_json(spec: str) -> dict:
  """config.json of an HF directory, bucket URL or hub id ({} if it has none); a hub id
  reads that file alone, from the local hub cache when it is there."""
  if storage.is_remote(spec):  # that one object, not the model's weights
    with tempfile.TemporaryDirectory() as tmp:
      if "config.json" not in storage.listing(spec):
        return {}
      storage.download(spec, tmp, ["config.json"])
      with open(os.path.join(tmp, "config.json")) as f:
        return json.load(f)
  if os.path.isdir(spec):
    path = os.path.join(spec, "config.json")
  elif os.path.exists(spec) or not paths.is_hub_id(spec):
    return {}  # a file, or a local path that is gone: no hub lookup under its name
  else:
    import huggingface_hub  # pylint: disable=g-import-not-at-top  (hub ids only)
    path = huggingface_hub.try_to_load_from_cache(spec, "config.json")
    if not isinstance(path, str):
      path = huggingface_hub.hf_hub_download(spec, "config.json")
  if not os.path.exists(path):
    return {}
  with open(path) as f:
    return json.load(f)


def source_config(spec: str) -> tuple[str, dict] | None:
  """(HF source, its config.json dict) of the checkpoint a model came from: `spec` itself
  for an HF directory, hub id or bucket URL; a jaxtune run or checkpoint is followed to the
  source it was imported (`convert`) or trained from. None: random init or GGUF."""
  from jaxtune import checkpoint  # pylint: disable=g-import-not-at-top  (runs only)
  for _ in range(8):  # a run of a run of an imported checkpoint ...: a few hops at most
    if not spec or hf_gguf.is_gguf(spec):
      return None
    if checkpoint.locate(spec) is None:
      return spec, _config_json(spec)
    meta = checkpoint.read_meta(spec)
    spec = (meta.get("source") or (meta.get("model_config") or {}).get("hf_path")
            or ((meta.get("config") or {}).get("model") or {}).get("hf_path") or "")
  return None


def wrapper_source(spec: str, family: str | None = None
                   ) -> tuple[multimodal.Wrapper, str] | None:
  """(wrapper, HF source) when the checkpoint `spec` came from (`source_config`) is a
  multimodal wrapper (of a `family` language model, if given); else None."""
  if family is not None and not multimodal.wraps(family):
    return None
  found = source_config(spec)
  if found is None:
    return None
  w = multimodal.get(found[1].get("model_type"))
  if w is None or (family is not None and w.family != family):
    return None
  return w, found[0]


def _write_wrapper(cfg: config_lib.ModelConfig, flat: dict, out_dir: str, source: str | None,
                   **kw) -> bool:
  """Writes `cfg`'s source wrapper (`multimodal_export`) when it came from one; False when it
  did not or the source cannot be read or used (then the text model alone is written)."""
  if not multimodal.wraps(cfg.family):
    return False
  spec = cfg.hf_path if source is None else source
  text_arch = hf_config.ARCHITECTURES[cfg.family]
  before = set(os.listdir(out_dir))
  try:
    found = wrapper_source(spec, cfg.family)
    model_dir = resolve(found[1]) if found is not None else ""
    return bool(model_dir) and multimodal_export.write(cfg, flat, out_dir, model_dir, **kw)
  except (OSError, ValueError, KeyError) as e:
    for name in set(os.listdir(out_dir)) - before:  # a half-written wrapper: gone
      os.remove(os.path.join(out_dir, name))
    _log.warning("%s: cannot read or use the model's source %r as a multimodal wrapper "
                 "(%s: %s); exporting the text model alone (%s)", out_dir, spec,
                 type(e).__name__, e, text_arch)
    return False


def save_hf(cfg: config_lib.ModelConfig, params: dict, out_dir: str, tokenizer=None, *,
            dtype: str | None = None, max_shard_bytes: int = 5 * 2**30,
            metadata: dict | None = None, source: str | None = None) -> str:
  """Writes an HF model directory that `transformers.AutoModelForCausalLM` loads.

  dtype: 'float32' | 'bfloat16' | 'float16' (default: cfg.param_dtype). Quantised leaves
  must be dequantised (or merged) before export. Only process 0 writes; all processes
  must call it (gathering sharded params is collective). `out_dir` may be a bucket URL
  (written locally, then uploaded). A model whose source (`source`, default cfg.hf_path,
  followed through jaxtune runs) is a multimodal wrapper (Gemma3ForConditionalGeneration)
  is written as that wrapper, its vision tensors copied from the source
  (`multimodal_export`); if the source cannot be used, as the text model, with a warning.
  """
  if storage.is_remote(out_dir):
    with tempfile.TemporaryDirectory() as tmp:
      save_hf(cfg, params, tmp, tokenizer, dtype=dtype, max_shard_bytes=max_shard_bytes,
              metadata=metadata, source=source)
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
  if not _write_wrapper(cfg, flat, out_dir, source, dtype=dtype, metadata=metadata,
                        max_shard_bytes=max_shard_bytes):
    _write_text_model(cfg, flat, out_dir, dtype=dtype, metadata=metadata,
                      max_shard_bytes=max_shard_bytes)
  if tokenizer is not None:
    save_tokenizer(tokenizer, out_dir)
  return out_dir


def _write_text_model(cfg: config_lib.ModelConfig, flat: dict, out_dir: str, *, dtype: str,
                      metadata: dict | None, max_shard_bytes: int) -> None:
  """The family's *ForCausalLM: safetensors, config.json, generation_config.json."""
  save_safetensors(keys.to_hf(cfg, flat), out_dir, max_shard_bytes=max_shard_bytes,
                   metadata=metadata)
  hf = hf_config.to_hf(cfg, dtype=dtype)
  if metadata:
    hf["jaxtune"] = metadata
  with open(os.path.join(out_dir, "config.json"), "w") as f:
    json.dump(hf, f, indent=2)
  with open(os.path.join(out_dir, "generation_config.json"), "w") as f:
    json.dump(hf_config.generation_config(hf), f, indent=2)


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
