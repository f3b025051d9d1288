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

The per-layer tensor reading (`read_layer_tensors`), the config-field check
(`check_fields`) and the writer (`write_adapter`) are shared with the other PEFT types
(DoRA adds `lora_magnitude_vector`, IA3 reads `ia3_l`), so every type is as strict.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import safetensors.numpy

from jaxtune import config as config_lib
from jaxtune import tree
from jaxtune.hf import io
from jaxtune.hf import keys
from jaxtune.hf import multimodal
from jaxtune.models import decoder
from jaxtune.models import moe
from jaxtune.peft import adapters as adapters_lib
from jaxtune.peft import expert_io
from jaxtune.peft import fused_io
from jaxtune.peft import wrapper_names

PREFIX = "base_model.model."  # PeftModel -> LoraModel -> the transformers model
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"


# adapter_config.json fields read here, and fields that never change the forward.
_HANDLED = {"peft_type", "task_type", "r", "lora_alpha", "use_rslora", "target_modules",
            "lora_dropout", "bias", "target_parameters"}
_IGNORED = {"base_model_name_or_path", "revision", "inference_mode", "init_lora_weights",
            "auto_mapping", "peft_version", "loftq_config", "eva_config", "corda_config",
            "lora_ga_config", "megatron_core", "qalora_group_size", "layers_pattern",
            "exclude_modules", "ensure_weight_tying"}


def module_templates(cfg: config_lib.ModelConfig) -> dict[str, str]:
  """{"layers/self_attn/q_proj": "model.layers.{i}.self_attn.q_proj", ...} for this family.

  A part of a fused HF module (Phi-3's q_proj in qkv_proj) has no template of its own: looking
  it up is a ValueError naming the fused module (LoRA writes those through `fused_io`)."""
  out = fused_io.Templates(cfg.family, {p: n for n, (_, ps) in fused_io.groups(cfg).items()
                                        for p in ps})
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
  tensors, peft_config = lora_files(cfg, adapters, base_model_name_or_path=base_model_name_or_path,
                                    dtype=dtype)
  return write_adapter(out_dir, tensors, peft_config, family=cfg.family)


def host(x: Any, dtype: str | None = None) -> np.ndarray:
  """A (possibly sharded) adapter leaf as a host array, cast to `dtype` when given."""
  x = io.to_host(x)
  return x if dtype is None else x.astype(io.NP_DTYPES[dtype])


def lora_files(cfg: config_lib.ModelConfig, adapters: adapters_lib.Adapters, *,
               base_model_name_or_path: str = "", dtype: str | None = None
               ) -> tuple[dict[str, np.ndarray], dict]:
  """({tensor name: array}, adapter_config dict) of a PEFT LoRA directory for `adapters`."""
  templates = module_templates(cfg)
  shapes = decoder.shapes(cfg)
  tensors: dict[str, np.ndarray] = {}
  names = set()
  experts = {}  # MoE expert LoRA: PEFT's target_parameters (expert_io.py)
  fused = {}  # parts of fused HF projections
  for module, ab in sorted(adapters_lib.modules(adapters.params).items()):
    a, b = host(ab["a"], dtype), host(ab["b"], dtype)  # [L, in, r], [L, r, out]
    want = shapes[module + "/kernel"]
    r = adapters.rank
    if a.shape != (*want[:-1], r) or b.shape != (*want[:-2], r, want[-1]):
      raise ValueError(f"save_peft: {module} has a {a.shape}, b {b.shape}; expected "
                       f"{(*want[:-1], r)} and {(*want[:-2], r, want[-1])} (rank {r})")
    if expert_io.is_expert(module):
      experts[module] = (a, b)
      continue
    if fused_io.part_of(cfg, module):  # Phi-3's qkv_proj / gate_up_proj (fused_io.py)
      fused[module] = (a, b)
      continue
    stem = PREFIX + templates[module]
    for j, i in enumerate(moe.layer_ids(cfg, module + "/kernel")):
      tensors[stem.format(i=i) + ".lora_A.weight"] = np.ascontiguousarray(a[j].T)  # [r, in]
      tensors[stem.format(i=i) + ".lora_B.weight"] = np.ascontiguousarray(b[j].T)  # [out, r]
    names.add(module.rsplit("/", 1)[1])
  tensors.update(expert_io.write(cfg, experts, adapters.rank, PREFIX))
  fused_tensors, fused_names, rank_pattern, alpha_pattern = fused_io.write(
      cfg, fused, rank=adapters.rank, alpha=adapters.alpha, rslora=adapters.rslora,
      prefix=PREFIX)
  tensors.update(fused_tensors)
  names.update(fused_names)
  peft_config = {
      "peft_type": "LORA",
      "task_type": "CAUSAL_LM",
      "r": adapters.rank,
      "lora_alpha": _json_number(adapters.alpha),
      "use_rslora": bool(adapters.rslora),
      "target_modules": sorted(names),
      "target_parameters": expert_io.target_parameters(experts) or None,
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
      "rank_pattern": rank_pattern,
      "alpha_pattern": alpha_pattern,
      "revision": None,
      "base_model_name_or_path": base_model_name_or_path or None,
  }
  return tensors, peft_config


def write_adapter(out_dir: str, tensors: dict[str, np.ndarray], peft_config: dict, *,
                  family: str | None = None) -> str:
  """Writes adapter_model.safetensors + adapter_config.json on process 0; returns out_dir.

  Module names follow the base model (`base_model_name_or_path`): a multimodal wrapper's
  language model is named as `peft` names it in the wrapper (`wrapper_names.for_base`). The
  base's config.json is read only for a `family` some wrapper holds (None: never)."""
  if jax.process_index() != 0:
    return out_dir
  if family is not None and multimodal.wraps(family):
    tensors, peft_config = wrapper_names.for_base(tensors, peft_config)
  os.makedirs(out_dir, exist_ok=True)
  safetensors.numpy.save_file(tensors, os.path.join(out_dir, WEIGHTS_FILE),
                              metadata={"format": "pt"})
  with open(os.path.join(out_dir, CONFIG_FILE), "w") as f:
    json.dump(peft_config, f, indent=2)
  return out_dir


def _falsy(v: Any) -> bool:
  return v is None or v is False or v == {} or v == [] or v == ""


def check_fields(pc: dict, source: str, *, peft_type: str, handled: set[str],
                 ignored: set[str], what: str) -> None:
  """Errors naming the first adapter_config.json field that jaxtune cannot reproduce.

  Fields in `handled` are read by the caller; fields in `ignored` never change the forward;
  any other field must be falsy (None, False, {}, [], ""). `what` names what is supported.
  """
  if pc.get("peft_type") != peft_type:
    raise ValueError(f"{source}: peft_type {pc.get('peft_type')!r} is not supported "
                     f"(only {peft_type})")
  if pc.get("task_type") not in (None, "CAUSAL_LM"):
    raise ValueError(f"{source}: task_type {pc['task_type']!r} is not supported (CAUSAL_LM)")
  for k, v in sorted(pc.items()):
    if k not in handled and k not in ignored and not _falsy(v):
      raise ValueError(f"{source}: {k}={v!r} changes the adapter's computation in a way "
                       f"jaxtune does not support ({what})")


def check_config(pc: dict, source: str, *, dora: bool = False) -> None:
  """Errors naming the field of a LoRA adapter_config.json that jaxtune cannot reproduce.

  dora: the adapter must be DoRA (`use_dora: true`); otherwise `use_dora` is refused.
  """
  if dora and pc.get("use_dora") is not True:
    raise ValueError(f"{source}: use_dora={pc.get('use_dora')!r}; a DoRA adapter has "
                     "use_dora=true (load plain LoRA with peft.method=lora)")
  if pc.get("bias", "none") != "none":
    raise ValueError(f"{source}: bias={pc['bias']!r} trains base biases; only 'none' is "
                     "supported")
  check_fields(pc, source, peft_type="LORA", handled=_HANDLED | ({"use_dora"} if dora else set()),
               ignored=_IGNORED, what=("DoRA" if dora else "plain LoRA / rsLoRA") +
               " on attention and MLP projections of every layer")
  tm = pc.get("target_modules")
  if isinstance(tm, (list, tuple)):
    bad = [m for m in tm if m != "all-linear"
           and m.rsplit(".", 1)[-1] not in (*adapters_lib.SUPPORTED_NAMES,
                                            *fused_io.FUSED_NAMES)]
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


def weights_file(adapter_dir: str) -> str:
  """Path of the directory's adapter_model.safetensors; pickled weights are named, not read."""
  wpath = os.path.join(adapter_dir, WEIGHTS_FILE)
  if not os.path.exists(wpath):
    pickles = [f for f in os.listdir(adapter_dir) if f.endswith((".bin", ".pt", ".pth"))]
    raise ValueError(f"{adapter_dir}: no {WEIGHTS_FILE}" + (
        f" (found {pickles}: pickled weights are never loaded)" if pickles else ""))
  return wpath


def read_layer_tensors(cfg: config_lib.ModelConfig, wpath: str, suffixes: tuple[str, ...],
                       want, *, kind: str, detail: str = "", skip: frozenset = frozenset(),
                       handle=None) -> dict[str, dict[str, np.ndarray]]:
  """{module: {suffix: float32 [L, ...]}} of per-layer PEFT tensors, strictly checked.

  Tensor names are PREFIX + the module's HF template + "." + suffix, e.g.
  "base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight". `want(module,
  suffix, n_in, n_out)` is the expected per-layer shape (torch layout, as stored). Every
  tensor must be understood; a module with any tensor must have all suffixes in every layer.
  kind names the adapter type in errors ("LoRA"); detail is appended to shape errors.
  Names in `skip` are read by the caller (MoE expert LoRA, `expert_io`). `handle`: the file
  opened already (`wrapper_names.AdapterFile` of wpath), else opened here.
  """
  shapes = decoder.shapes(cfg)
  templates = module_templates(cfg)
  alt = "|".join(re.escape(x) for x in suffixes)
  patterns = {module: re.compile(re.escape(PREFIX + template).replace(re.escape("{i}"), r"(\d+)")
                                 + rf"\.({alt})")
              for module, template in templates.items()}
  # a wrapper's names read as the text model's
  handle = handle or wrapper_names.AdapterFile(wpath, cfg)
  found: dict[str, dict[tuple[int, str], str]] = {}
  unknown = {}
  for name in handle.keys():
    if name in skip:
      continue
    for module, rx in patterns.items():
      m = rx.fullmatch(name)
      if m and int(m.group(1)) < cfg.num_layers:
        found.setdefault(module, {})[(int(m.group(1)), m.group(2))] = name
        break
    else:
      unknown[name] = tuple(handle.get_slice(name).get_shape())
  if unknown:
    listed = ", ".join(f"{k} {list(s)}" for k, s in sorted(unknown.items())[:8])
    raise ValueError(f"{wpath}: {len(unknown)} tensor(s) not understood for a "
                     f"{cfg.num_layers}-layer {cfg.family} {kind} adapter: {listed}")
  if not found and not skip:
    raise ValueError(f"{wpath}: no {kind} tensors")
  out = {}
  for module, names in sorted(found.items()):
    *_, n_in, n_out = shapes[module + "/kernel"]
    stem = PREFIX + templates[module]
    shape = {sfx: tuple(want(module, sfx, n_in, n_out)) for sfx in suffixes}
    ids = moe.layer_ids(cfg, module + "/kernel")  # a mixed MoE model's dense MLPs: some
    missing = [f"{stem.format(i=i)}.{sfx} (expected {list(shape[sfx])})"
               for i in ids for sfx in suffixes if (i, sfx) not in names]
    if missing:
      raise ValueError(f"{wpath}: {len(missing)} missing tensor(s) (jaxtune adapts every "
                       f"layer of a module): {', '.join(missing[:8])}")
    out[module] = {}
    for sfx in suffixes:
      per_layer = []
      for i in ids:
        t = handle.get_tensor(names[(i, sfx)])
        if tuple(t.shape) != shape[sfx]:
          raise ValueError(f"{wpath}: tensor {names[(i, sfx)]} has shape {list(t.shape)}, "
                           f"expected {list(shape[sfx])} ({detail}in={n_in}, out={n_out})")
        per_layer.append(t.astype(np.float32))
      out[module][sfx] = np.stack(per_layer)
  return out


def read_lora(cfg: config_lib.ModelConfig, adapter_dir: str, *, dora: bool = False
              ) -> tuple[dict, dict[str, dict[str, np.ndarray]]]:
  """(adapter_config, {module: {"a": [L, in, r], "b": [L, r, out](, "m": [L, out])}}).

  dora: read a DoRA adapter (`use_dora`), whose modules also hold `lora_magnitude_vector`
  [out] per layer (PEFT writes it without a `.weight` suffix).
  """
  adapter_dir, pc = read_adapter_config(adapter_dir)
  wpath = weights_file(adapter_dir)
  check_config(pc, os.path.join(adapter_dir, CONFIG_FILE), dora=dora)
  rank = int(pc["r"])
  source = os.path.join(adapter_dir, CONFIG_FILE)
  experts = expert_io.modules_for(cfg, pc.get("target_parameters"), source)
  if experts and dora:
    raise ValueError(f"{source}: DoRA on MoE experts (target_parameters) is not supported")
  skip = frozenset(expert_io.names(cfg, experts, PREFIX))
  handle = wrapper_names.AdapterFile(wpath, cfg)  # opened once, for every reader below
  fused_names = fused_io.names(cfg, handle.keys(), PREFIX)
  if fused_names and dora:
    raise ValueError(f"{source}: DoRA on fused projections ({', '.join(fused_io.FUSED_NAMES)}) "
                     "is not supported")
  skip |= fused_names
  want = {"lora_A.weight": lambda n_in, n_out: (rank, n_in),
          "lora_B.weight": lambda n_in, n_out: (n_out, rank),
          "lora_magnitude_vector": lambda n_in, n_out: (n_out,)}
  suffixes = tuple(want)[:3 if dora else 2]
  raw = read_layer_tensors(cfg, wpath, suffixes, lambda _, sfx, i, o: want[sfx](i, o),
                           kind="DoRA" if dora else "LoRA", detail=f"r={rank}, ", skip=skip,
                           handle=handle)
  out = {}
  for module, t in raw.items():
    out[module] = {"a": t["lora_A.weight"].transpose(0, 2, 1),  # [L, in, r]
                   "b": t["lora_B.weight"].transpose(0, 2, 1)}  # [L, r, out]
    if dora:
      out[module]["m"] = t["lora_magnitude_vector"]  # [L, out]
  if fused_names:
    out.update(fused_io.read(cfg, handle.get_tensor, fused_names, rank, PREFIX, wpath))
  if experts:
    present = set(handle.keys())
    out.update(expert_io.read(cfg, lambda n: handle.get_tensor(n) if n in present else None,
                              experts, rank, PREFIX, wpath))
  return pc, out


def load_peft(cfg: config_lib.ModelConfig, adapter_dir: str, *,
              dtype: Any = jnp.float32) -> adapters_lib.Adapters:
  """Reads a PEFT LoRA adapter (directory or hub id) into `Adapters` for this base config.

  Unknown or missing tensors, wrong shapes and unsupported settings are errors that name
  them. dtype: storage dtype of the returned adapter leaves.
  """
  pc, modules = read_lora(cfg, adapter_dir)
  rank, alpha, rslora = int(pc["r"]), float(pc["lora_alpha"]), bool(pc.get("use_rslora"))
  flat = {f"{module}/{k}": jnp.asarray(v, dtype)
          for module, ab in modules.items() for k, v in ab.items()}
  return adapters_lib.Adapters(
      params=tree.unflatten(flat), scale=adapters_lib.scale(rank, alpha, rslora), rank=rank,
      alpha=alpha, rslora=rslora, targets=targets_regex(modules),
      dropout=float(pc.get("lora_dropout") or 0.0))


def targets_regex(modules) -> str:
  """The regex over kernel paths that selects exactly `modules` ("layers/mlp/up_proj")."""
  return "|".join(re.escape(m + "/kernel") for m in sorted(modules))
