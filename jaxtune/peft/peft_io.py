"""Hugging Face PEFT adapter directories <-> `Adapters`: the format vLLM and peft load.

A PEFT LoRA directory holds `adapter_config.json` and `adapter_model.safetensors` with one
pair of torch Linear-layout tensors per targeted module and layer (names checked against
peft 0.21's `save_pretrained`; the module part comes from the base model's HF key table in
`hf/keys.py`, so it cannot drift from the base conversion):

    base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight   [r, in]   = a[i].T
    base_model.model.model.layers.{i}.self_attn.q_proj.lora_B.weight   [out, r]  = b[i].T
    base_model.model.model.layers.{i}.mlp.down_proj.lora_A.weight      [r, F]    ...

with a [L, in, r] and b [L, r, out] the stacked jaxtune factors. PEFT computes
y = W x + scaling * B(A(x)), scaling = lora_alpha / r (or / sqrt(r) with use_rslora), the
same function as jaxtune's x @ W + scale * (x @ a) @ b.

Import is strict: every tensor name must be understood, every layer of every adapted module
present with the expected shapes, and any config setting that changes the computation
(DoRA, biases, per-module rank or alpha patterns, modules_to_save, partial layers, ...) is
refused with the field named, rather than silently giving other logits than peft.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import safetensors
import safetensors.numpy

from jaxtune import config as config_lib
from jaxtune import tree
from jaxtune.hf import io
from jaxtune.hf import keys
from jaxtune.models import decoder
from jaxtune.peft import adapters as adapters_lib

PREFIX = "base_model.model."  # PeftModel -> LoraModel -> the transformers model
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"


# adapter_config.json fields read here, and fields that never change the forward.
_HANDLED = {"peft_type", "task_type", "r", "lora_alpha", "use_rslora", "target_modules",
            "lora_dropout", "bias"}
_IGNORED = {"base_model_name_or_path", "revision", "inference_mode", "init_lora_weights",
            "auto_mapping", "peft_version", "loftq_config", "eva_config", "corda_config",
            "lora_ga_config", "megatron_core", "qalora_group_size", "layers_pattern",
            "exclude_modules", "ensure_weight_tying"}


def module_templates(cfg: config_lib.ModelConfig) -> dict[str, str]:
  """{"layers/self_attn/q_proj": "model.layers.{i}.self_attn.q_proj", ...} for this family."""
  out = {}
  for template, path, transpose in keys.rows(cfg):
    if path in adapters_lib.SUPPORTED_KERNELS:
      if not (template.endswith(".weight") and transpose):
        raise AssertionError(f"HF key table row {template} -> {path} is not a Linear weight")
      out[path.rsplit("/", 1)[0]] = template[:-len(".weight")]
  return out


def _json_number(x: float):
  return int(x) if float(x).is_integer() else float(x)


def save_peft(cfg: config_lib.ModelConfig, adapters: adapters_lib.Adapters, out_dir: str, *,
              base_model_name_or_path: str = "", dtype: str | None = None) -> str:
  """Writes `adapter_config.json` + `adapter_model.safetensors` that `peft` loads.

  dtype: 'float32' | 'bfloat16' | 'float16' of the saved tensors (default: the adapters').
  All processes must call it (gathering sharded adapters is collective); process 0 writes.
  """
  templates = module_templates(cfg)
  shapes = decoder.shapes(cfg)
  tensors: dict[str, np.ndarray] = {}
  names = set()
  for module, ab in sorted(adapters_lib.modules(adapters.params).items()):
    a = io.to_host(ab["a"])  # [L, in, r]
    b = io.to_host(ab["b"])  # [L, r, out]
    if dtype is not None:
      a, b = a.astype(io.NP_DTYPES[dtype]), b.astype(io.NP_DTYPES[dtype])
    want = shapes[module + "/kernel"]
    r = adapters.rank
    if a.shape != (*want[:-1], r) or b.shape != (*want[:-2], r, want[-1]):
      raise ValueError(f"save_peft: {module} has a {a.shape}, b {b.shape}; expected "
                       f"{(*want[:-1], r)} and {(*want[:-2], r, want[-1])} (rank {r})")
    stem = PREFIX + templates[module]
    for i in range(cfg.num_layers):
      tensors[stem.format(i=i) + ".lora_A.weight"] = np.ascontiguousarray(a[i].T)  # [r, in]
      tensors[stem.format(i=i) + ".lora_B.weight"] = np.ascontiguousarray(b[i].T)  # [out, r]
    names.add(module.rsplit("/", 1)[1])
  peft_config = {
      "peft_type": "LORA",
      "task_type": "CAUSAL_LM",
      "r": adapters.rank,
      "lora_alpha": _json_number(adapters.alpha),
      "use_rslora": bool(adapters.rslora),
      "target_modules": sorted(names),
      "lora_dropout": float(adapters.dropout),
      "bias": "none",
      "fan_in_fan_out": False,
      "use_dora": False,
      "lora_bias": False,
      "init_lora_weights": True,
      "inference_mode": True,
      "modules_to_save": None,
      "layers_to_transform": None,
      "layers_pattern": None,
      "rank_pattern": {},
      "alpha_pattern": {},
      "revision": None,
      "base_model_name_or_path": base_model_name_or_path or None,
  }
  if jax.process_index() != 0:
    return out_dir
  os.makedirs(out_dir, exist_ok=True)
  safetensors.numpy.save_file(tensors, os.path.join(out_dir, WEIGHTS_FILE),
                              metadata={"format": "pt"})
  with open(os.path.join(out_dir, CONFIG_FILE), "w") as f:
    json.dump(peft_config, f, indent=2)
  return out_dir


def _falsy(v: Any) -> bool:
  return v is None or v is False or v == {} or v == [] or v == ""


def check_config(pc: dict, source: str) -> None:
  """Errors naming the field of an adapter_config.json that jaxtune cannot reproduce."""
  if pc.get("peft_type") != "LORA":
    raise ValueError(f"{source}: peft_type {pc.get('peft_type')!r} is not supported (only LORA)")
  if pc.get("task_type") not in (None, "CAUSAL_LM"):
    raise ValueError(f"{source}: task_type {pc['task_type']!r} is not supported (CAUSAL_LM)")
  if pc.get("bias", "none") != "none":
    raise ValueError(f"{source}: bias={pc['bias']!r} trains base biases; only 'none' is "
                     "supported")
  for k, v in sorted(pc.items()):
    if k not in _HANDLED and k not in _IGNORED and not _falsy(v):
      raise ValueError(f"{source}: {k}={v!r} changes the adapter's computation in a way "
                       "jaxtune does not support (plain LoRA / rsLoRA on attention and MLP "
                       "projections of every layer)")
  tm = pc.get("target_modules")
  if isinstance(tm, (list, tuple)):
    bad = [m for m in tm if m != "all-linear"
           and m.rsplit(".", 1)[-1] not in adapters_lib.SUPPORTED_NAMES]
    if bad:
      raise ValueError(f"{source}: target module(s) {bad} are not supported; jaxtune adapts "
                       f"{list(adapters_lib.SUPPORTED_NAMES)}")


def read_adapter_config(adapter_dir: str) -> tuple[str, dict]:
  """(local directory, parsed adapter_config.json) for a PEFT directory or hub id."""
  adapter_dir = io.resolve(adapter_dir)
  cpath = os.path.join(adapter_dir, CONFIG_FILE)
  if not os.path.exists(cpath):
    raise ValueError(f"{adapter_dir}: no {CONFIG_FILE}")
  with open(cpath) as f:
    return adapter_dir, json.load(f)


def load_peft(cfg: config_lib.ModelConfig, adapter_dir: str, *,
              dtype: Any = jnp.float32) -> adapters_lib.Adapters:
  """Reads a PEFT LoRA adapter (directory or hub id) into `Adapters` for this base config.

  Unknown or missing tensors, wrong shapes and unsupported settings are errors that name
  them. dtype: storage dtype of the returned adapter leaves.
  """
  adapter_dir, pc = read_adapter_config(adapter_dir)
  cpath = os.path.join(adapter_dir, CONFIG_FILE)
  wpath = os.path.join(adapter_dir, WEIGHTS_FILE)
  if not os.path.exists(wpath):
    pickles = [f for f in os.listdir(adapter_dir) if f.endswith((".bin", ".pt", ".pth"))]
    raise ValueError(f"{adapter_dir}: no {WEIGHTS_FILE}" + (
        f" (found {pickles}: pickled weights are never loaded)" if pickles else ""))
  check_config(pc, cpath)
  rank, alpha, rslora = int(pc["r"]), float(pc["lora_alpha"]), bool(pc.get("use_rslora"))

  shapes = decoder.shapes(cfg)
  templates = module_templates(cfg)
  patterns = {}
  for module, template in templates.items():
    rx = re.escape(PREFIX + template).replace(re.escape("{i}"), r"(\d+)")
    patterns[module] = re.compile(rx + r"\.lora_([AB])\.weight")
  handle = safetensors.safe_open(wpath, framework="np")
  found: dict[str, dict[tuple[int, str], str]] = {}
  unknown = {}
  for name in handle.keys():
    shape = tuple(handle.get_slice(name).get_shape())
    for module, rx in patterns.items():
      m = rx.fullmatch(name)
      if m and int(m.group(1)) < cfg.num_layers:
        found.setdefault(module, {})[(int(m.group(1)), m.group(2))] = name
        break
    else:
      unknown[name] = shape
  if unknown:
    listed = ", ".join(f"{k} {list(s)}" for k, s in sorted(unknown.items())[:8])
    raise ValueError(f"{wpath}: {len(unknown)} tensor(s) not understood for a "
                     f"{cfg.num_layers}-layer {cfg.family} LoRA adapter: {listed}")
  if not found:
    raise ValueError(f"{wpath}: no LoRA tensors")

  flat = {}
  for module, names in sorted(found.items()):
    *_, n_in, n_out = shapes[module + "/kernel"]
    stem = PREFIX + templates[module]
    want = {"A": (rank, n_in), "B": (n_out, rank)}
    missing = [f"{stem.format(i=i)}.lora_{ab}.weight (expected {list(want[ab])})"
               for i in range(cfg.num_layers) for ab in "AB" if (i, ab) not in names]
    if missing:
      raise ValueError(f"{wpath}: {len(missing)} missing tensor(s) (jaxtune adapts every "
                       f"layer of a module): {', '.join(missing[:8])}")
    stacked = {}
    for ab in "AB":
      per_layer = []
      for i in range(cfg.num_layers):
        name = names[(i, ab)]
        t = handle.get_tensor(name)
        if tuple(t.shape) != want[ab]:
          raise ValueError(f"{wpath}: tensor {name} has shape {list(t.shape)}, expected "
                           f"{list(want[ab])} (r={rank}, in={n_in}, out={n_out})")
        per_layer.append(t.astype(np.float32).T)
      stacked[ab] = np.stack(per_layer)
    flat[module + "/a"] = jnp.asarray(stacked["A"], dtype)  # [L, in, r]
    flat[module + "/b"] = jnp.asarray(stacked["B"], dtype)  # [L, r, out]

  targets = "|".join(re.escape(m + "/kernel") for m in sorted(found))
  return adapters_lib.Adapters(
      params=tree.unflatten(flat), scale=adapters_lib.scale(rank, alpha, rslora), rank=rank,
      alpha=alpha, rslora=rslora, targets=targets, dropout=float(pc.get("lora_dropout") or 0.0))
