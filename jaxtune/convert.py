"""HF directory <-> jaxtune checkpoint conversion (the library side of launch/convert.py).

A jaxtune checkpoint directory is what a training run writes (`DIR/checkpoints/<step>/`
with `state`, `data`, `meta` items). `hf_to_checkpoint` writes one at step 0 holding the
imported params, so every reader (`checkpoint.read`, `checkpoint_to_hf`, a run started with
`model.hf_path=DIR`) handles imported and trained checkpoints alike.
"""

from __future__ import annotations

import dataclasses
import json
import os
import types

import jax
import jax.numpy as jnp

from jaxtune import checkpoint as checkpoint_lib
from jaxtune import config as config_lib
from jaxtune import data as data_lib
from jaxtune.hf import io as hf_io
from jaxtune.train import state as state_lib


def is_checkpoint(path: str) -> bool:
  return os.path.isdir(os.path.join(path, "checkpoints"))


def hf_to_checkpoint(src: str, out: str) -> str:
  """Imports an HF model (dir or hub id) into a jaxtune checkpoint directory `out`."""
  model_dir = hf_io.resolve(src)
  with open(os.path.join(model_dir, "config.json")) as f:
    hf_cfg = json.load(f)
  src_dtype = hf_cfg.get("dtype") or hf_cfg.get("torch_dtype") or "float32"
  src_dtype = src_dtype if src_dtype in ("float32", "bfloat16", "float16") else "float32"
  # Host arrays in the source dtype: nothing is put on a device, whatever the model size.
  model_cfg, params = hf_io.load_hf(model_dir, jnp.dtype(src_dtype), place=lambda _, x: x)
  model_cfg = dataclasses.replace(model_cfg, param_dtype=src_dtype)
  model_cfg = dataclasses.replace(model_cfg, hf_path="")
  cfg = config_lib.TrainConfig(model=model_cfg)
  if any(f.startswith("tokenizer") for f in os.listdir(model_dir)):
    tok = data_lib.load_tokenizer(model_dir)
    tok.save_pretrained(os.path.join(out, "tokenizer"))
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(
        cfg.data, tokenizer=os.path.abspath(os.path.join(out, "tokenizer"))))
  state = state_lib.TrainState(step=jnp.zeros((), jnp.int32), trainable=params, opt_state={},
                               rng=jax.random.PRNGKey(0))
  meta = {"config": config_lib.to_dict(cfg), "model_config": config_lib.to_dict(model_cfg),
          "source": src}
  ckpt = checkpoint_lib.Checkpointer(out, keep=1, async_save=False)
  ckpt.save(0, state, {}, meta)
  ckpt.close()
  return os.path.abspath(out)


def load_params(path: str, step: int | None = None):
  """(model_cfg, params) of a jaxtune checkpoint's trainable tree (full fine-tuning)."""
  trainable, meta = checkpoint_lib.read(path, step)
  cfg = config_lib.from_dict(config_lib.TrainConfig, meta["config"])
  if cfg.peft.method != "none":
    raise ValueError(f"{path}: holds LoRA adapters, not a full model; export with "
                     "--merge_lora first")
  return config_lib.from_dict(config_lib.ModelConfig, meta["model_config"]), trainable


def checkpoint_to_hf(path: str, out: str, *, step: int | None = None, merge_lora: bool = False,
                     peft: bool = False, dtype: str | None = None) -> str:
  """Exports a jaxtune checkpoint as an HF model, a PEFT adapter, or both."""
  from jaxtune import sharding
  from jaxtune.peft import lora
  from jaxtune.train import methods
  trainable, meta = checkpoint_lib.read(path, step)
  cfg = config_lib.from_dict(config_lib.TrainConfig, meta["config"])
  model_cfg = config_lib.from_dict(config_lib.ModelConfig, meta["model_config"])
  tokenizer = data_lib.tokenizer_from_config(cfg)
  is_peft = cfg.peft.method != "none"
  if not is_peft and (merge_lora or peft):
    raise ValueError(f"{path}: a full fine-tuning checkpoint; --merge_lora/--peft apply to "
                     "LoRA/QLoRA runs only")
  if is_peft and not (merge_lora or peft):
    raise ValueError(f"{path}: a {cfg.peft.method} checkpoint; pass --peft (adapter) and/or "
                     "--merge_lora (full model)")
  methods._register_extra_methods()
  method = methods.METHODS[cfg.method]
  params = adapters = None
  if is_peft:
    mesh = sharding.make_mesh(config_lib.MeshConfig(), jax.devices()[:1])
    _, params = methods.load_weights(cfg, mesh, tokenizer)
    template = lora.init_from_config(model_cfg, params, cfg.peft, key=jax.random.PRNGKey(0))
    adapters = dataclasses.replace(template, params=trainable)
    if peft:
      lora.save_peft(model_cfg, adapters, out if not merge_lora else out.rstrip("/") + "_adapter",
                     base_model_name_or_path=cfg.model.hf_path)
      if not merge_lora:
        return os.path.abspath(out)
  ctx = methods.Context(cfg=cfg, model_cfg=model_cfg, mesh=None, params=params,
                        adapters=adapters, tokenizer=tokenizer, data=None)
  state = types.SimpleNamespace(trainable=trainable)
  if dtype:
    ctx.model_cfg = dataclasses.replace(model_cfg, param_dtype=dtype)
  if method.export is not None:
    return method.export(ctx, state, out, meta)
  return methods.export_model(ctx, state, out, meta, write_adapter=False)
