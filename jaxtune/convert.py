"""HF directory <-> jaxtune checkpoint conversion (the library side of launch/convert.py).

A jaxtune checkpoint directory is what a training run writes (`DIR/checkpoints/<step>/`
with `state`, `data`, `meta` items). `hf_to_checkpoint` writes one at step 0 holding the
imported params, so every reader (`jaxtune.weights.load`, `checkpoint_to_hf`, a run started
with `model.hf_path=DIR`) handles imported and trained checkpoints alike. The export goes
through the run's own method (`Method.export`), so a reward model exports as
`*ForSequenceClassification` and a PEFT run as a PEFT adapter and/or a merged model.
GGUF files import like HF dirs; `checkpoint_to_gguf` writes one (adapters merged).
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
import types

import jax
import jax.numpy as jnp

from jaxtune import checkpoint as checkpoint_lib
from jaxtune import config as config_lib
from jaxtune import data as data_lib
from jaxtune import methods
from jaxtune import paths
from jaxtune import peft
from jaxtune import storage
from jaxtune import weights
from jaxtune.hf import gguf as hf_gguf
from jaxtune.hf import gguf_export
from jaxtune.hf import io as hf_io


def hf_to_checkpoint(src: str, out: str) -> str:
  """Imports an HF model (dir, hub id, bucket URL or .gguf) into a jaxtune checkpoint
  directory `out` (local, or a bucket URL: staged, then committed and uploaded)."""
  url, out = (out, checkpoint_lib.local_workdir(out)) if storage.is_remote(out) else ("", out)
  model_dir = hf_io.resolve(src)
  if hf_gguf.is_gguf(model_dir):  # quantized GGUF tensors are dequantized to float32
    src_dtype = hf_gguf.source_dtype(model_dir)
  else:
    with open(os.path.join(model_dir, "config.json")) as f:
      hf_cfg = json.load(f)
    src_dtype = hf_cfg.get("dtype") or hf_cfg.get("torch_dtype") or "float32"
    src_dtype = src_dtype if src_dtype in ("float32", "bfloat16", "float16") else "float32"
  # Host arrays in the source dtype: nothing is put on a device, whatever the model size.
  model_cfg, params = hf_io.load_hf(model_dir, jnp.dtype(src_dtype), place=lambda _, x: x)
  model_cfg = dataclasses.replace(model_cfg, param_dtype=src_dtype, hf_path="")
  cfg = config_lib.TrainConfig(model=model_cfg)
  if hf_gguf.is_gguf(model_dir) or any(f.startswith("tokenizer") for f in os.listdir(model_dir)):
    tok = data_lib.load_tokenizer(model_dir)
    hf_io.save_tokenizer(tok, os.path.join(out, "tokenizer"))
    tok_dir = storage.join(url, "tokenizer") if url else os.path.abspath(
        os.path.join(out, "tokenizer"))
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, tokenizer=tok_dir))
  state = {"step": jnp.zeros((), jnp.int32), "trainable": params, "opt_state": {},
           "rng": jax.random.PRNGKey(0)}
  # An absolute source: an export finds a multimodal wrapper's vision tensors through it.
  meta = {"config": config_lib.to_dict(cfg), "model_config": config_lib.to_dict(model_cfg),
          "source": paths.model_source(src, "source")}
  ckpt = checkpoint_lib.Checkpointer(out, keep=1, async_save=False)
  ckpt.save(0, state, {}, meta)
  ckpt.close()
  return checkpoint_lib.publish(out, out) if url else os.path.abspath(out)


def checkpoint_to_hf(path: str, out: str, *, step: int | None = None, merge_lora: bool = False,
                     peft_adapter: bool = False, dtype: str | None = None) -> str:
  """Exports a jaxtune checkpoint as an HF model, a PEFT adapter, or both (`path` and
  `out` local or bucket URLs; a bucket `out` is written locally, then uploaded)."""
  if storage.is_remote(out):
    with tempfile.TemporaryDirectory() as tmp:
      local = os.path.join(tmp, "out")
      checkpoint_to_hf(path, local, step=step, merge_lora=merge_lora,
                       peft_adapter=peft_adapter, dtype=dtype)
      for suffix in ("", "_adapter"):
        if os.path.isdir(local + suffix):
          storage.upload(local + suffix, out.rstrip("/") + suffix)
    return out
  trainable, meta = checkpoint_lib.read(path, step)
  cfg = config_lib.from_dict(config_lib.TrainConfig, meta["config"])
  is_peft = cfg.peft.method != "none"
  if not is_peft and (merge_lora or peft_adapter):
    raise ValueError(f"{path}: a full fine-tuning checkpoint; --merge_lora/--peft apply to "
                     "LoRA/QLoRA runs only")
  if is_peft and not (merge_lora or peft_adapter):
    raise ValueError(f"{path}: a {cfg.peft.method} checkpoint; pass --peft (adapter) and/or "
                     "--merge_lora (full model)")
  model_cfg = config_lib.from_dict(config_lib.ModelConfig, meta["model_config"])
  if not model_cfg.hf_path and meta.get("source"):  # an imported checkpoint: its HF source,
    model_cfg = dataclasses.replace(model_cfg, hf_path=meta["source"])  # for a wrapper export
  params = adapters = None
  if is_peft:  # the run's base, loaded as the run loaded it, and its trained adapters
    w = weights.load(path, step=step, base=model_cfg)
    params, adapters = w.params, w.adapters
    if peft_adapter:
      adapter_dir = out if not merge_lora else out.rstrip("/") + "_adapter"
      peft.get(cfg.peft.method).save(model_cfg, adapters, adapter_dir,
                                     base_model_name_or_path=cfg.model.hf_path)
      if not merge_lora:
        return os.path.abspath(out)
  if dtype:
    model_cfg = dataclasses.replace(model_cfg, param_dtype=dtype)
  ctx = methods.Context(cfg=cfg, model_cfg=model_cfg, mesh=None, params=params,
                        adapters=adapters, tokenizer=data_lib.tokenizer_from_config(cfg),
                        data=None)
  state = types.SimpleNamespace(trainable=trainable)
  return methods.get(cfg.method).export(ctx, state, out, meta, write_adapter=False)


def checkpoint_to_gguf(path: str, out_file: str, *, step: int | None = None,
                       gguf_type: str = "f16") -> str:
  """Exports a jaxtune checkpoint (adapters merged) as one GGUF file (`hf/gguf_export.py`)."""
  _, meta = checkpoint_lib.read(path, step)
  cfg = config_lib.from_dict(config_lib.TrainConfig, meta["config"])
  if cfg.method == "reward":
    raise ValueError(f"{path}: a reward model; GGUF export writes causal language models only")
  model_cfg = config_lib.from_dict(config_lib.ModelConfig, meta["model_config"])
  w = weights.load(path, step=step, base=model_cfg)
  params = w.params
  if w.adapters is not None:  # LoRA / QLoRA: merged into the (dequantized) base
    params = peft.get(cfg.peft.method).merge(w.model_cfg, params, w.adapters)
  gguf_export.write(w.model_cfg, params, out_file,
                    tokenizer=data_lib.tokenizer_from_config(cfg), gguf_type=gguf_type)
  return os.path.abspath(out_file)
