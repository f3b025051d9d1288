"""Prefix tuning (Li & Liang 2021): trainable keys and values that every layer attends to.

Every weight stays frozen; each layer gets P learned key and value vectors in front of the
sequence's own, as if P tokens had been cached before it (PEFT passes them as
`past_key_values`, so they carry no rotary embedding and the real tokens sit at positions
P.. after them). PEFT's layout, used for the files and as the trainable tensor, is one
matrix with, for GQA models, K*Dh (kv heads x head dim) per layer, key and value:

    prompt_embeddings [P, L * 2 * K * Dh]    row p: layer 0 key, layer 0 value, layer 1 key ...
    apply(params)     params["layers"]["self_attn"]["prefix_key" | "prefix_value"] [L, P, K*Dh]

which the decoder's KV-prefix hook (`models/virtual_tokens.py`) runs: every query, in every
packed segment, sees the prefix; logits stay [B, T, V]. With `peft.prefix_projection`
the trainable tensors are PEFT's reparameterisation instead: an embedding [P, K*Dh] through
Linear(K*Dh, E) -> tanh -> Linear(E, L*2*K*Dh); `save` writes its output, as PEFT does, so
a loaded adapter is always the plain matrix. Init as PEFT's: N(0, 1) for the matrix and the
embedding, torch's Linear init (U(+-1/sqrt(fan_in))) for the MLP. Not mergeable.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import safetensors

from jaxtune import config as config_lib
from jaxtune.models import virtual_tokens
from jaxtune.peft import peft_io

KEY = "prompt_embeddings"
MLP_KEYS = ("embedding", "w1", "b1", "w2", "b2")


@dataclasses.dataclass(frozen=True)
class PrefixAdapters:
  """params: {"prompt_embeddings": [P, L*2*K*Dh]}, or PEFT's reparameterisation
  {"embedding": [P, K*Dh], "w1": [K*Dh, E], "b1": [E], "w2": [E, L*2*K*Dh], "b2": [...]}."""
  params: Any

  def apply(self, params: dict, rng: jax.Array | None = None) -> dict:
    """`params` with each layer's KV prefix (rng unused)."""
    del rng
    return apply(self, params)


jax.tree_util.register_dataclass(PrefixAdapters)


def prefix_matrix(adapters: PrefixAdapters) -> jax.Array:
  """[P, L*2*K*Dh] float32: the trainable matrix, or the MLP's output for it."""
  p = adapters.params
  if set(p) == {KEY}:
    return p[KEY].astype(jnp.float32)
  if set(p) != set(MLP_KEYS):
    raise ValueError(f"prefix adapters: params must hold {KEY!r} or {list(MLP_KEYS)}, got "
                     f"{sorted(p)}")
  hi = jax.lax.Precision.HIGHEST
  f32 = {k: v.astype(jnp.float32) for k, v in p.items()}
  h = jnp.tanh(jnp.dot(f32["embedding"], f32["w1"], precision=hi) + f32["b1"])  # [P, E]
  return jnp.dot(h, f32["w2"], precision=hi) + f32["b2"]  # [P, L*2*KD]


def apply(adapters: PrefixAdapters, params: dict) -> dict:
  """params with "prefix_key" / "prefix_value" [L, P, K*Dh] under layers/self_attn."""
  attn = params["layers"]["self_attn"]
  if virtual_tokens.PREFIX_KEY in attn:
    raise ValueError("prefix.apply: params already hold a KV prefix (applied twice?)")
  k = attn["k_proj"]["kernel"]
  n_layers, kd = k.shape[0], k.shape[-1]
  kv = prefix_matrix(adapters)
  if kv.ndim != 2 or kv.shape[1] != n_layers * 2 * kd:
    raise ValueError(f"prefix.apply: prefix of shape {tuple(kv.shape)}, expected [P, "
                     f"{n_layers * 2 * kd}] (L={n_layers} layers x key, value x K*Dh={kd})")
  kv = kv.reshape(kv.shape[0], n_layers, 2, kd).transpose(1, 2, 0, 3)  # [L, 2, P, KD]
  attn = {**attn, virtual_tokens.PREFIX_KEY: kv[:, 0], virtual_tokens.PREFIX_VALUE: kv[:, 1]}
  return {**params, "layers": {**params["layers"], "self_attn": attn}}


def _uniform(key, shape, fan_in):
  bound = 1.0 / fan_in ** 0.5
  return jax.random.uniform(key, shape, jnp.float32, -bound, bound)


def init(cfg: config_lib.ModelConfig, peft_cfg: config_lib.PeftConfig, *,
         key: jax.Array) -> PrefixAdapters:
  """PEFT's init: N(0, 1) [P, L*2*K*Dh], or the reparameterisation (see the docstring)."""
  n = peft_cfg.num_virtual_tokens
  if n <= 0:
    raise config_lib.ConfigError(f"bad value for peft.num_virtual_tokens: {n} (expected > 0)")
  kd, width = cfg.kv_size, cfg.num_layers * 2 * cfg.kv_size
  if not peft_cfg.prefix_projection:
    return PrefixAdapters(params={KEY: jax.random.normal(key, (n, width), jnp.float32)})
  e = peft_cfg.prefix_hidden or kd
  k = jax.random.split(key, 5)
  return PrefixAdapters(params={
      "embedding": jax.random.normal(k[0], (n, kd), jnp.float32),
      "w1": _uniform(k[1], (kd, e), kd), "b1": _uniform(k[2], (e,), kd),
      "w2": _uniform(k[3], (e, width), e), "b2": _uniform(k[4], (width,), e)})


def axes(cfg: config_lib.ModelConfig, adapters: PrefixAdapters) -> PrefixAdapters:
  """Replicated: small (P * L * 2 * K * Dh), and its columns cut across layers and heads."""
  del cfg
  return dataclasses.replace(adapters, params=jax.tree.map(
      lambda x: (None,) * x.ndim, adapters.params))


def save_peft(cfg: config_lib.ModelConfig, adapters: PrefixAdapters, out_dir: str, *,
              base_model_name_or_path: str = "", dtype: str | None = None) -> str:
  """PEFT's PREFIX_TUNING directory: `prompt_embeddings` [P, L*2*K*Dh] (the MLP's output
  when reparameterised) and its config (token_dim K*Dh, num_attention_heads K, as PEFT sets
  them for GQA models)."""
  kv = peft_io.host(prefix_matrix(adapters), dtype)
  projected = set(adapters.params) == set(MLP_KEYS)
  pc = {"peft_type": "PREFIX_TUNING", "task_type": "CAUSAL_LM",
        "num_virtual_tokens": int(kv.shape[0]), "token_dim": cfg.kv_size,
        "num_attention_heads": cfg.num_kv_heads, "num_layers": cfg.num_layers,
        "num_transformer_submodules": 1, "prefix_projection": projected,
        "encoder_hidden_size": (int(adapters.params["w1"].shape[1]) if projected
                                else cfg.kv_size),
        "init_weights": None, "inference_mode": True, "modules_to_save": None,
        "revision": None, "base_model_name_or_path": base_model_name_or_path or None}
  return peft_io.write_adapter(out_dir, {KEY: np.ascontiguousarray(kv)}, pc, family=cfg.family)


def load_peft(cfg: config_lib.ModelConfig, adapter_dir: str, *,
              dtype: Any = jnp.float32) -> PrefixAdapters:
  """Reads a PEFT PREFIX_TUNING directory (the plain matrix, whatever trained it)."""
  adapter_dir, pc = peft_io.read_adapter_config(adapter_dir)
  source = os.path.join(adapter_dir, peft_io.CONFIG_FILE)
  peft_io.check_fields(
      pc, source, peft_type="PREFIX_TUNING",
      handled={"peft_type", "task_type", "num_virtual_tokens", "token_dim",
               "num_attention_heads", "num_layers", "num_transformer_submodules",
               "prefix_projection", "encoder_hidden_size"},
      ignored={"base_model_name_or_path", "revision", "inference_mode", "init_weights",
               "auto_mapping", "peft_version"},
      what="prefix tuning of a decoder-only model")
  want = {"num_transformer_submodules": 1, "num_layers": cfg.num_layers,
          "token_dim": cfg.kv_size, "num_attention_heads": cfg.num_kv_heads}
  for field, value in want.items():
    if pc.get(field, value) != value:
      raise ValueError(f"{source}: {field}={pc[field]} but this model needs {value} "
                       "(PEFT: token_dim = kv heads x head dim, num_attention_heads = kv heads)")
  n, width = int(pc["num_virtual_tokens"]), cfg.num_layers * 2 * cfg.kv_size
  wpath = peft_io.weights_file(adapter_dir)
  with safetensors.safe_open(wpath, framework="np") as f:
    names = sorted(f.keys())
    if names != [KEY]:
      raise ValueError(f"{wpath}: expected exactly the tensor {KEY!r}, got {names[:8]}")
    kv = f.get_tensor(KEY)
  if kv.shape != (n, width):
    raise ValueError(f"{wpath}: {KEY} has shape {list(kv.shape)}, expected [{n}, {width}] "
                     "(num_virtual_tokens, layers x 2 x kv heads x head dim)")
  return PrefixAdapters(params={KEY: jnp.asarray(kv.astype(np.float32), dtype)})


@dataclasses.dataclass(frozen=True)
class PrefixMethod:
  """Prefix tuning as a `base.PeftMethod`; not mergeable."""
  name: str = "prefix_tuning"
  quantized_base: bool = False
  peft_type: str = "PREFIX_TUNING"
  adapters_type: type = PrefixAdapters
  mergeable: bool = False

  def init(self, model_cfg, params, peft_cfg, key) -> PrefixAdapters:
    del params
    if peft_cfg.dropout:
      raise config_lib.ConfigError(f"bad value for peft.dropout: {peft_cfg.dropout} (prefix "
                                   "tuning has no dropout; it applies to lora, qlora, dora, qdora)")
    return init(model_cfg, peft_cfg, key=key)

  def axes(self, model_cfg, adapters: PrefixAdapters) -> PrefixAdapters:
    return axes(model_cfg, adapters)

  def apply(self, params: dict, adapters: PrefixAdapters, rng: jax.Array | None = None) -> dict:
    del rng
    return apply(adapters, params)

  def merge(self, model_cfg, params: dict, adapters: PrefixAdapters) -> dict:
    raise ValueError("peft.method=prefix_tuning is not mergeable (the prefix is attention "
                     "input, not a weight); export the adapter (launch/convert.py --peft)")

  def save(self, model_cfg, adapters: PrefixAdapters, out_dir: str, *,
           base_model_name_or_path: str = "") -> str:
    return save_peft(model_cfg, adapters, out_dir, base_model_name_or_path=base_model_name_or_path)

  def load(self, model_cfg, adapter_dir: str) -> PrefixAdapters:
    return load_peft(model_cfg, adapter_dir)


METHOD = PrefixMethod()
