"""LLaMA-Adapter (Zhang et al. 2023): PEFT's "adaption prompts" with zero-init gates.

In each of the top `adapter_layers` layers, A learned prompt vectors [A, D] go through the
layer's own (frozen) k_proj / v_proj, and every query attends to them with a softmax of its
own, scaled by a learned gate that starts at 0, so training starts from the base model:

    attn_out += gate_l * softmax(q k_l^T / sqrt(Dh)) v_l       (before o_proj; see
                                                                `virtual_tokens.add_adaption`)

The trainable tree holds the top layers only; `apply` pads it with zeros (prompt and gate)
for the layers below, so the stacked layer scan runs one block kind, those layers add
exactly 0, and no gradient reaches the padding:

    params {"prompt": [A_layers, A, D], "gate": [A_layers]}
    apply  params["layers"]["self_attn"]["adaption_prompt"] [L, A, D], ["adaption_gate"] [L]

Files: PEFT's ADAPTION_PROMPT directory (`...layers.{i}.self_attn.adaption_prompt` [1, A, D]
and `.adaption_gate` [1] for the top layers), for the families PEFT supports it on (llama,
mistral). Init as PEFT's: prompts N(0, 1), gates 0. Not mergeable (the prompt attention
depends on each query). Needs no KV cache: sampling runs it as training does.
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
from jaxtune.hf import keys
from jaxtune.models import virtual_tokens
from jaxtune.peft import peft_io

FAMILIES = ("llama", "mistral")  # PEFT's adaption_prompt model types


@dataclasses.dataclass(frozen=True)
class LlamaAdapterAdapters:
  """params: {"prompt": [A_layers, A, D], "gate": [A_layers]} for the top A_layers layers."""
  params: Any

  def apply(self, params: dict, rng: jax.Array | None = None) -> dict:
    """`params` with every layer's adaption prompt and gate (rng unused)."""
    del rng
    return apply(self, params)


jax.tree_util.register_dataclass(LlamaAdapterAdapters)


def apply(adapters: LlamaAdapterAdapters, params: dict) -> dict:
  """params + layers/self_attn/adaption_prompt [L, A, D] and adaption_gate [L] (zeros below
  the adapted top layers)."""
  p = adapters.params
  if set(p) != {"prompt", "gate"}:
    raise ValueError(f"llama_adapter: params must hold 'prompt' and 'gate', got {sorted(p)}")
  attn = params["layers"]["self_attn"]
  if virtual_tokens.ADAPTION_PROMPT in attn:
    raise ValueError("llama_adapter.apply: params already hold adaption prompts (applied "
                     "twice?)")
  n_layers, d = attn["k_proj"]["kernel"].shape[0], attn["k_proj"]["kernel"].shape[-2]
  top, a_len = p["prompt"].shape[0], p["prompt"].shape[1]
  if p["prompt"].shape != (top, a_len, d) or p["gate"].shape != (top,) or top > n_layers:
    raise ValueError(f"llama_adapter.apply: prompt {tuple(p['prompt'].shape)}, gate "
                     f"{tuple(p['gate'].shape)}; expected [A_layers <= {n_layers}, A, {d}] "
                     "and [A_layers]")
  below = n_layers - top
  prompt = jnp.concatenate([jnp.zeros((below, a_len, d), p["prompt"].dtype), p["prompt"]])
  gate = jnp.concatenate([jnp.zeros((below,), p["gate"].dtype), p["gate"]])
  attn = {**attn, virtual_tokens.ADAPTION_PROMPT: prompt, virtual_tokens.ADAPTION_GATE: gate}
  return {**params, "layers": {**params["layers"], "self_attn": attn}}


def init(cfg: config_lib.ModelConfig, peft_cfg: config_lib.PeftConfig, *,
         key: jax.Array) -> LlamaAdapterAdapters:
  """PEFT's init: prompts N(0, 1) [A_layers, A, D], gates 0 (the model starts as the base)."""
  top = peft_cfg.adapter_layers or cfg.num_layers
  if not 0 < top <= cfg.num_layers:
    raise config_lib.ConfigError(f"bad value for peft.adapter_layers: {peft_cfg.adapter_layers} "
                                 f"(expected 1..{cfg.num_layers}, or 0 for all layers)")
  if peft_cfg.adapter_len <= 0:
    raise config_lib.ConfigError(f"bad value for peft.adapter_len: {peft_cfg.adapter_len} "
                                 "(expected > 0)")
  prompt = jax.random.normal(key, (top, peft_cfg.adapter_len, cfg.hidden_size), jnp.float32)
  return LlamaAdapterAdapters(params={"prompt": prompt, "gate": jnp.zeros((top,), jnp.float32)})


def axes(cfg: config_lib.ModelConfig, adapters: LlamaAdapterAdapters) -> LlamaAdapterAdapters:
  """prompt [A_layers, A, D]: (None, None, 'embed'); gate replicated."""
  del cfg
  return dataclasses.replace(adapters, params={"prompt": (None, None, "embed"), "gate": (None,)})


def _stem(cfg: config_lib.ModelConfig) -> str:
  """'base_model.model.model.layers.{i}.self_attn' from the family's HF key table."""
  for template, path, _ in keys.rows(cfg):
    if path == "layers/self_attn/k_proj/kernel":
      return peft_io.PREFIX + template[:-len(".k_proj.weight")]
  raise AssertionError(f"{cfg.family}: no k_proj row in the HF key table")


def save_peft(cfg: config_lib.ModelConfig, adapters: LlamaAdapterAdapters, out_dir: str, *,
              base_model_name_or_path: str = "", dtype: str | None = None) -> str:
  """PEFT's ADAPTION_PROMPT directory: [1, A, D] prompt and [1] gate per adapted layer."""
  if cfg.family not in FAMILIES:
    raise ValueError(f"llama_adapter.save_peft: PEFT's adaption_prompt supports {FAMILIES}, "
                     f"not {cfg.family!r}")
  prompt, gate = peft_io.host(adapters.params["prompt"], dtype), peft_io.host(
      adapters.params["gate"], dtype)
  top, stem = prompt.shape[0], _stem(cfg)
  tensors = {}
  for j in range(top):
    i = cfg.num_layers - top + j
    tensors[stem.format(i=i) + ".adaption_prompt"] = np.ascontiguousarray(prompt[j][None])
    tensors[stem.format(i=i) + ".adaption_gate"] = np.ascontiguousarray(gate[j:j + 1])
  pc = {"peft_type": "ADAPTION_PROMPT", "task_type": "CAUSAL_LM", "target_modules": "self_attn",
        "adapter_len": int(prompt.shape[1]), "adapter_layers": int(top), "inference_mode": True,
        "revision": None, "base_model_name_or_path": base_model_name_or_path or None}
  return peft_io.write_adapter(out_dir, tensors, pc, family=cfg.family)


def load_peft(cfg: config_lib.ModelConfig, adapter_dir: str, *,
              dtype: Any = jnp.float32) -> LlamaAdapterAdapters:
  """Reads a PEFT ADAPTION_PROMPT directory; every tensor, layer and shape is checked."""
  adapter_dir, pc = peft_io.read_adapter_config(adapter_dir)
  source = os.path.join(adapter_dir, peft_io.CONFIG_FILE)
  peft_io.check_fields(pc, source, peft_type="ADAPTION_PROMPT",
                       handled={"peft_type", "task_type", "adapter_len", "adapter_layers",
                                "target_modules"},
                       ignored={"base_model_name_or_path", "revision", "inference_mode",
                                "auto_mapping", "peft_version"},
                       what="adaption prompts on self_attn of the top layers")
  if pc.get("target_modules", "self_attn") != "self_attn":
    raise ValueError(f"{source}: target_modules={pc['target_modules']!r} (expected 'self_attn')")
  top, a_len, d = int(pc["adapter_layers"]), int(pc["adapter_len"]), cfg.hidden_size
  if not 0 < top <= cfg.num_layers:
    raise ValueError(f"{source}: adapter_layers={top} but the model has {cfg.num_layers} layers")
  wpath = peft_io.weights_file(adapter_dir)
  stem = _stem(cfg)
  want = {}
  for j in range(top):
    i = cfg.num_layers - top + j
    want[stem.format(i=i) + ".adaption_prompt"] = (j, "prompt", (1, a_len, d))
    want[stem.format(i=i) + ".adaption_gate"] = (j, "gate", (1,))
  out = {"prompt": np.zeros((top, a_len, d), np.float32), "gate": np.zeros((top,), np.float32)}
  with safetensors.safe_open(wpath, framework="np") as f:
    names = set(f.keys())
    unknown, missing = sorted(names - set(want)), sorted(set(want) - names)
    if unknown or missing:
      raise ValueError(f"{wpath}: for adapter_layers={top} of a {cfg.num_layers}-layer model "
                       f"unexpected tensors {unknown[:4]}, missing {missing[:4]}")
    for name, (j, kind, shape) in want.items():
      t = f.get_tensor(name)
      if t.shape != shape:
        raise ValueError(f"{wpath}: {name} has shape {list(t.shape)}, expected {list(shape)}")
      out[kind][j] = t.reshape(shape[1:]) if kind == "prompt" else t[0]
  return LlamaAdapterAdapters(params={k: jnp.asarray(v, dtype) for k, v in out.items()})


@dataclasses.dataclass(frozen=True)
class LlamaAdapterMethod:
  """LLaMA-Adapter as a `base.PeftMethod`; not mergeable."""
  name: str = "llama_adapter"
  quantized_base: bool = False
  peft_type: str = "ADAPTION_PROMPT"
  adapters_type: type = LlamaAdapterAdapters
  mergeable: bool = False

  def init(self, model_cfg, params, peft_cfg, key) -> LlamaAdapterAdapters:
    del params
    if peft_cfg.dropout:
      raise config_lib.ConfigError(f"bad value for peft.dropout: {peft_cfg.dropout} (LLaMA-"
                                   "Adapter has no dropout; it applies to lora, qlora, dora, "
                                   "qdora)")
    return init(model_cfg, peft_cfg, key=key)

  def axes(self, model_cfg, adapters: LlamaAdapterAdapters) -> LlamaAdapterAdapters:
    return axes(model_cfg, adapters)

  def apply(self, params: dict, adapters: LlamaAdapterAdapters,
            rng: jax.Array | None = None) -> dict:
    del rng
    return apply(adapters, params)

  def merge(self, model_cfg, params: dict, adapters: LlamaAdapterAdapters) -> dict:
    raise ValueError("peft.method=llama_adapter is not mergeable (its prompt attention "
                     "depends on each query); export the adapter (launch/convert.py --peft)")

  def save(self, model_cfg, adapters: LlamaAdapterAdapters, out_dir: str, *,
           base_model_name_or_path: str = "") -> str:
    return save_peft(model_cfg, adapters, out_dir, base_model_name_or_path=base_model_name_or_path)

  def load(self, model_cfg, adapter_dir: str) -> LlamaAdapterAdapters:
    return load_peft(model_cfg, adapter_dir)


METHOD = LlamaAdapterMethod()
