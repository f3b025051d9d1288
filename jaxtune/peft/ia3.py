"""IA3: learned rescaling vectors on a few projections (Liu et al. 2022, "(IA)^3").

IA3 trains one vector per targeted kernel and layer, ~0.01% of a model's parameters. PEFT's
defaults for Llama-family models, used here too: k_proj and v_proj get their OUTPUT scaled
(bias included, as PEFT's forward scales the base layer's result), and down_proj, a
"feed-forward" module, gets its INPUT scaled:

    y = (x @ W + bias) * l          l [out]   (k_proj, v_proj)
    y = (x * l) @ W + bias          l [in]    (down_proj, PeftConfig.ia3_feedforward)

The vectors start at 1, so the model starts as the base. Like LoRA, `apply` wraps each
targeted kernel in a leaf (`Ia3Kernel`) that `layers.linear` runs:

    params {"layers": {"self_attn": {"k_proj": {"l": [L, K*Dh]}, "v_proj": {"l": [L, K*Dh]}},
                       "mlp": {"down_proj": {"l": [L, F]}}}}
    apply  k_proj kernel -> Ia3Kernel(w=[L, D, K*Dh], l=[L, K*Dh], feedforward=False)

Files: PEFT's IA3 format, one `...k_proj.ia3_l` per layer and module, [out, 1] for output
scaling and [1, in] for feed-forward modules, with `feedforward_modules` in the config.
Mergeable: W * l on the output columns (and the bias), or on the input rows.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxtune import config as config_lib
from jaxtune import quant
from jaxtune import tree
from jaxtune.models import decoder
from jaxtune.models import layers
from jaxtune.peft import adapters as adapters_lib
from jaxtune.peft import peft_io


def _static(default=dataclasses.MISSING):
  return dataclasses.field(default=default, metadata=dict(static=True))


@dataclasses.dataclass(frozen=True)
class Ia3Kernel:
  """A kernel W [..., in, out] with an IA3 vector l: [..., out], or [..., in] if feedforward."""
  w: Any
  l: Any
  feedforward: bool = _static(False)

  @property
  def shape(self) -> tuple[int, ...]:
    return tuple(self.w.shape)

  @property
  def ndim(self) -> int:
    return len(self.shape)

  def linear(self, x: jax.Array, *, bias: jax.Array | None = None) -> jax.Array:
    """x [..., in] -> [..., out]; the product with l in float32, as PEFT's (l is float32)."""
    l = self.l.astype(jnp.float32)
    if self.feedforward:
      return layers.linear((x.astype(jnp.float32) * l).astype(x.dtype), self.w, bias=bias)
    y = layers.linear(x, self.w, bias=bias)
    return (y.astype(jnp.float32) * l).astype(y.dtype)


jax.tree_util.register_dataclass(Ia3Kernel)


@dataclasses.dataclass(frozen=True)
class Ia3Adapters:
  """IA3 vectors. params: {"layers": {parent: {proj: {"l": [L, in or out]}}}}.

  targets / feedforward: regexes over kernel paths; feedforward kernels scale their input.
  """
  params: Any
  targets: str = _static("")
  feedforward: str = _static("")

  def apply(self, params: dict, rng: jax.Array | None = None) -> dict:
    """The base params with each targeted kernel replaced by an `Ia3Kernel` (rng unused)."""
    del rng
    return apply(self, params)


jax.tree_util.register_dataclass(Ia3Adapters)


def _is_ff(adapters: Ia3Adapters, module: str) -> bool:
  return bool(adapters.feedforward) and re.fullmatch(adapters.feedforward,
                                                     module + "/kernel") is not None


def modules(params: dict) -> dict[str, jax.Array]:
  """{"layers/self_attn/k_proj": l} for every module of an IA3 tree; errors name the path."""
  out = {}
  for path, x in tree.flatten(params).items():
    module, leaf = path.rsplit("/", 1)
    if leaf != "l" or module + "/kernel" not in adapters_lib.SUPPORTED_KERNELS:
      raise ValueError(f"IA3 adapter tree: unexpected leaf {path!r} (expected "
                       "layers/PARENT/PROJ/l for a projection)")
    out[module] = x
  return out


def select(params: dict, targets: str, feedforward: str) -> dict[str, bool]:
  """{module: is_feedforward} of the projection kernels `targets` fully matches."""
  flat = tree.flatten(params)
  present = [p for p in adapters_lib.SUPPORTED_KERNELS if p in flat]
  chosen = [p for p in present if re.fullmatch(targets, p)]
  if not chosen:
    raise ValueError(f"peft.ia3_targets={targets!r} selects no projection kernel (IA3-able: "
                     f"{present})")
  ff = [p for p in present if feedforward and re.fullmatch(feedforward, p)]
  if not set(ff) <= set(chosen):
    raise ValueError(f"peft.ia3_feedforward={feedforward!r} selects {sorted(set(ff) - set(chosen))}"
                     " outside peft.ia3_targets (feed-forward modules must be targets, as in PEFT)")
  return {p.rsplit("/", 1)[0]: p in ff for p in chosen}


def init(cfg: config_lib.ModelConfig, params: dict, peft_cfg: config_lib.PeftConfig, *,
         dtype: Any = jnp.float32) -> Ia3Adapters:
  """Vectors of ones (PEFT's init_ia3_weights=True) for the kernels peft.ia3_targets selects."""
  shapes = decoder.shapes(cfg)
  flat = {}
  for module, ff in select(params, peft_cfg.ia3_targets, peft_cfg.ia3_feedforward).items():
    *lead, n_in, n_out = shapes[module + "/kernel"]
    flat[module + "/l"] = jnp.ones((*lead, n_in if ff else n_out), dtype)
  return Ia3Adapters(params=tree.unflatten(flat), targets=peft_cfg.ia3_targets,
                     feedforward=peft_cfg.ia3_feedforward)


def axes(cfg: config_lib.ModelConfig, adapters: Ia3Adapters) -> Ia3Adapters:
  """l shards like its kernel's input (feed-forward) or output dim: ('layers', 'mlp')."""
  base = tree.flatten(decoder.axes(cfg))
  flat = {}
  for module in modules(adapters.params):
    ax = tuple(base[module + "/kernel"])
    flat[module + "/l"] = (*ax[:-2], ax[-2] if _is_ff(adapters, module) else ax[-1])
  return dataclasses.replace(adapters, params=tree.unflatten(flat))


def apply(adapters: Ia3Adapters, params: dict) -> dict:
  """`params` with `Ia3Kernel(w, l)` in place of every targeted kernel (shapes checked)."""
  flat = tree.flatten(params)
  for module, l in modules(adapters.params).items():
    path = module + "/kernel"
    w = flat.get(path)
    if w is None:
      raise ValueError(f"ia3.apply: params have no {path} for the adapter {module}")
    if isinstance(w, Ia3Kernel):
      raise ValueError(f"ia3.apply: {path} is already adapter-wrapped (applied twice?)")
    ff = _is_ff(adapters, module)
    want = (*w.shape[:-2], w.shape[-2] if ff else w.shape[-1])
    if tuple(l.shape) != want:
      raise ValueError(f"ia3.apply: {module}/l has shape {tuple(l.shape)}, expected {want} "
                       f"({'input' if ff else 'output'} scaling of {path} {tuple(w.shape)})")
    flat[path] = Ia3Kernel(w=w, l=l, feedforward=ff)
  return tree.unflatten(flat)


@functools.partial(jax.jit, static_argnames=("feedforward",))
def _scaled(w, l, *, feedforward):
  """W [L, in, out] * l on its input rows ([L, in]) or output columns ([L, out])."""
  wd = quant.dequantize(w) if isinstance(w, quant.QArray) else w
  l = l.astype(jnp.float32)
  s = l[..., :, None] if feedforward else l[..., None, :]
  return (wd.astype(jnp.float32) * s).astype(wd.dtype)


def merge(cfg: config_lib.ModelConfig, params: dict, adapters: Ia3Adapters) -> dict:
  """Dense params computing what `apply` computes (output-scaled biases scaled too, as PEFT)."""
  flat = tree.flatten(params)
  expected = decoder.shapes(cfg)
  for module, l in sorted(modules(adapters.params).items()):
    path, ff = module + "/kernel", _is_ff(adapters, module)
    if path not in flat or tuple(flat[path].shape) != tuple(expected[path]):
      raise ValueError(f"ia3.merge: params have no {path} of shape {tuple(expected[path])}")
    flat[path] = _scaled(flat[path], l, feedforward=ff)
    if not ff and module + "/bias" in flat:
      bias = flat[module + "/bias"]
      flat[module + "/bias"] = (bias.astype(jnp.float32) * l).astype(bias.dtype)
  return tree.unflatten(flat)


def save_peft(cfg: config_lib.ModelConfig, adapters: Ia3Adapters, out_dir: str, *,
              base_model_name_or_path: str = "", dtype: str | None = None) -> str:
  """PEFT IA3 files: `...k_proj.ia3_l` [out, 1], `...down_proj.ia3_l` [1, in] per layer."""
  templates = peft_io.module_templates(cfg)
  tensors, names, ff_names = {}, set(), set()
  for module, l in sorted(modules(adapters.params).items()):
    l = peft_io.host(l, dtype)  # [L, n]
    ff = _is_ff(adapters, module)
    stem = peft_io.PREFIX + templates[module]
    for i in range(cfg.num_layers):
      tensors[stem.format(i=i) + ".ia3_l"] = np.ascontiguousarray(
          l[i][None, :] if ff else l[i][:, None])
    name = module.rsplit("/", 1)[1]
    names.add(name)
    if ff:
      ff_names.add(name)
  pc = {"peft_type": "IA3", "task_type": "CAUSAL_LM", "target_modules": sorted(names),
        "feedforward_modules": sorted(ff_names), "fan_in_fan_out": False,
        "init_ia3_weights": True, "inference_mode": True, "modules_to_save": None,
        "revision": None, "base_model_name_or_path": base_model_name_or_path or None}
  return peft_io.write_adapter(out_dir, tensors, pc, family=cfg.family)


def _matches(spec, key: str) -> bool:
  """PEFT's module matching: a regex string fully matches the key; a list matches a suffix."""
  if not spec:
    return False
  if isinstance(spec, str):
    return re.fullmatch(spec, key) is not None
  return any(key == t or key.endswith("." + t) for t in spec)


def load_peft(cfg: config_lib.ModelConfig, adapter_dir: str, *,
              dtype: Any = jnp.float32) -> Ia3Adapters:
  """Reads a PEFT IA3 adapter; unknown fields, tensors and shapes are errors naming them."""
  adapter_dir, pc = peft_io.read_adapter_config(adapter_dir)
  source = os.path.join(adapter_dir, peft_io.CONFIG_FILE)
  peft_io.check_fields(pc, source, peft_type="IA3",
                       handled={"peft_type", "task_type", "target_modules", "feedforward_modules"},
                       ignored={"base_model_name_or_path", "revision", "inference_mode",
                                "init_ia3_weights", "auto_mapping", "peft_version",
                                "exclude_modules"},
                       what="IA3 on attention and MLP projections of every layer")
  templates = peft_io.module_templates(cfg)
  ff = {}
  for module, template in templates.items():
    per_layer = {_matches(pc.get("feedforward_modules"), template.format(i=i))
                 for i in range(cfg.num_layers)}
    if len(per_layer) > 1:
      raise ValueError(f"{source}: feedforward_modules={pc['feedforward_modules']!r} marks only "
                       f"some layers of {template} (jaxtune treats every layer alike)")
    ff[module] = per_layer.pop()
  raw = peft_io.read_layer_tensors(
      cfg, peft_io.weights_file(adapter_dir), ("ia3_l",),
      lambda module, _, n_in, n_out: (1, n_in) if ff[module] else (n_out, 1), kind="IA3")
  flat = {module + "/l": jnp.asarray(t["ia3_l"].reshape(cfg.num_layers, -1), dtype)
          for module, t in raw.items()}
  ff_modules = [m for m in raw if ff[m]]
  return Ia3Adapters(params=tree.unflatten(flat), targets=peft_io.targets_regex(raw),
                     feedforward=peft_io.targets_regex(ff_modules) if ff_modules else "")


@dataclasses.dataclass(frozen=True)
class Ia3Method:
  """IA3 as a `base.PeftMethod`."""
  name: str = "ia3"
  quantized_base: bool = False
  peft_type: str = "IA3"
  adapters_type: type = Ia3Adapters

  def init(self, model_cfg, params, peft_cfg, key) -> Ia3Adapters:
    del key  # deterministic: ones
    if peft_cfg.dropout:
      raise config_lib.ConfigError(f"bad value for peft.dropout: {peft_cfg.dropout} (IA3 has no "
                                   "dropout; it applies to lora, qlora, dora, qdora)")
    return init(model_cfg, params, peft_cfg)

  def axes(self, model_cfg, adapters: Ia3Adapters) -> Ia3Adapters:
    return axes(model_cfg, adapters)

  def apply(self, params: dict, adapters: Ia3Adapters, rng: jax.Array | None = None) -> dict:
    del rng
    return apply(adapters, params)

  def merge(self, model_cfg, params: dict, adapters: Ia3Adapters) -> dict:
    return merge(model_cfg, params, adapters)

  def save(self, model_cfg, adapters: Ia3Adapters, out_dir: str, *,
           base_model_name_or_path: str = "") -> str:
    return save_peft(model_cfg, adapters, out_dir, base_model_name_or_path=base_model_name_or_path)

  def load(self, model_cfg, adapter_dir: str) -> Ia3Adapters:
    return load_peft(model_cfg, adapter_dir)


METHOD = Ia3Method()
