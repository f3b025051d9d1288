"""DoRA: weight-decomposed LoRA (Liu et al. 2024), and QDoRA over the 4-bit base.

DoRA splits each adapted kernel into a direction and a learned magnitude per output
column: with V = W + scale * A @ B ([in, out]) and m [out],

    y = x @ (V * (m / ||V||_col)) + bias         ||V||_col [out]: L2 norm over the input dim

m starts at ||W||_col (B = 0), so the model starts as the base. As in PEFT (and the paper's
section 4.3) the norm is treated as a constant: it carries no gradient, so A and B get
theirs through x @ A @ B only and m through m / ||V||. PEFT recomputes V (an [out, in]
temporary) every step; here the norm comes from small matrices instead, exactly:

    ||V_j||^2 = ||W_j||^2 + 2 s <A^T W>_j . B_j + s^2 B_j^T (A^T A) B_j

i.e. one read of W for A^T W [r, out] and ||W||^2 [out], no [in, out] temporary, and
O(r^2 (in + out)) more. `apply` computes it for all layers once per step, outside the layer
scan (so remat never recomputes it; `lax.map` keeps a dequantised 4-bit layer the only
temporary), and hands each `DoraKernel` leaf its [out] norms:

    params {"layers": {"self_attn": {"q_proj": {"a": [L, D, r], "b": [L, r, H*Dh],
                                                "m": [L, H*Dh]}, ...}, "mlp": {...}}}
    apply  q_proj kernel -> DoraKernel(w=[L, D, H*Dh], a, b, m, n=[L, H*Dh], key)

Files are PEFT's LoRA files with `use_dora: true` and one `...q_proj.lora_magnitude_vector`
[out] per layer and module (no `.weight` suffix, as PEFT writes it). Mergeable:
W' = (m / ||V||) * V. `qdora` is the same method over the 4-bit base (`quantized_base`),
as `qlora` is LoRA's.
"""

from __future__ import annotations

import dataclasses
import functools
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
from jaxtune.peft import lora
from jaxtune.peft import peft_io

HIGHEST = jax.lax.Precision.HIGHEST


def _static(default=dataclasses.MISSING):
  return dataclasses.field(default=default, metadata=dict(static=True))


@dataclasses.dataclass(frozen=True)
class DoraKernel:
  """A kernel W [..., in, out] with DoRA: y = (m / n) * (x @ W + scale * x @ a @ b) + bias.

  w: the base kernel, dense or `quant.QArray`; a [..., in, r], b [..., r, out]; m [..., out]
  the magnitudes; n [..., out] float32 the column norms of W + scale * a @ b (no gradient);
  key: dropout key(s) or None. With dropout, as PEFT: y = x @ W + bias + (m/n - 1) *
  (x' @ W) + (m/n) * scale * x' @ a @ b with x' = dropout(x).
  """
  w: Any
  a: Any
  b: Any
  m: Any
  n: Any
  key: Any = None
  scale: float = _static(1.0)
  dropout: float = _static(0.0)

  @property
  def shape(self) -> tuple[int, ...]:
    return tuple(self.w.shape)

  @property
  def ndim(self) -> int:
    return len(self.shape)

  def linear(self, x: jax.Array, *, bias: jax.Array | None = None) -> jax.Array:
    """x [..., in] -> [..., out]."""
    g = (self.m.astype(jnp.float32) / self.n).astype(x.dtype)  # [out]
    a, b = self.a.astype(x.dtype), self.b.astype(x.dtype)  # [in, r], [r, out]
    if self.dropout > 0 and self.key is not None:
      keep = 1.0 - self.dropout
      xd = jnp.where(jax.random.bernoulli(self.key, keep, x.shape), x / keep,
                     jnp.zeros((), x.dtype))
      lora_out = jnp.einsum("...r,rf->...f", jnp.einsum("...d,dr->...r", xd, a), b)
      return (layers.linear(x, self.w, bias=bias) + (g - 1) * layers.linear(xd, self.w)
              + g * (self.scale * lora_out))
    lora_out = jnp.einsum("...r,rf->...f", jnp.einsum("...d,dr->...r", x, a), b)
    y = g * (layers.linear(x, self.w) + self.scale * lora_out)
    return y if bias is None else y + bias.astype(y.dtype)


jax.tree_util.register_dataclass(DoraKernel)


def _a_times_w(a: jax.Array, w: jax.Array) -> jax.Array:
  """a^T w [r, out] float32, a [in, r] float32, w [in, out] in its own dtype, never upcast:
  float32 w in one HIGHEST-precision product; 16-bit w as two 16-bit products (a split
  into its 16-bit head and the rest) with float32 accumulation, ~float32 accurate while W
  is read once, in 16 bits, and no float32 copy of it is made."""
  if w.dtype == jnp.float32:
    return jnp.einsum("ir,io->ro", a, w, precision=HIGHEST)
  hi = a.astype(w.dtype)
  lo = (a - hi.astype(jnp.float32)).astype(w.dtype)
  return sum(jnp.einsum("ir,io->ro", x, w, preferred_element_type=jnp.float32)
             for x in (hi, lo))


def _layer_norms(w, a, b, scale: float) -> jax.Array:
  """||w + scale * a @ b|| per output column [out], float32; w [in, out] dense or QArray."""
  w = quant.dequantize(w) if isinstance(w, quant.QArray) else w
  a, b = a.astype(jnp.float32), b.astype(jnp.float32)  # [in, r], [r, out]
  w_sq = jnp.sum(jnp.square(w.astype(jnp.float32)), axis=0)  # [out] (fused: no f32 copy)
  aw = _a_times_w(a, w)  # [r, out]
  gram = jnp.einsum("ir,is->rs", a, a, precision=HIGHEST)  # [r, r]
  ab_sq = jnp.sum(b * jnp.einsum("rs,so->ro", gram, b, precision=HIGHEST), axis=0)  # [out]
  sq = w_sq + 2.0 * scale * jnp.sum(aw * b, axis=0) + scale * scale * ab_sq
  return jnp.sqrt(jnp.maximum(sq, 0.0))


def column_norms(w, a, b, scale: float) -> jax.Array:
  """||W + scale * a @ b||_col [..., out] float32 for stacked w [L, in, out] (or [in, out]).

  Carries no gradient (PEFT detaches it). Dense layers go together (`vmap`: one batched
  product per kernel); 4-bit ones one at a time (`lax.map`), so a single layer is ever
  dequantised.
  """
  w, a, b = jax.lax.stop_gradient((w, a, b))
  fn = functools.partial(_layer_norms, scale=scale)
  if len(w.shape) == 2:
    return fn(w, a, b)
  if len(w.shape) != 3:
    raise ValueError(f"dora: kernel of shape {tuple(w.shape)}; expected [L, in, out]")
  if isinstance(w, quant.QArray):
    return jax.lax.map(lambda args: fn(*args), (w, a, b))
  return jax.vmap(fn)(w, a, b)


def _check_module(ad: Any, path: str) -> None:
  if not isinstance(ad, dict) or set(ad) != {"a", "b", "m"}:
    got = sorted(ad) if isinstance(ad, dict) else type(ad).__name__
    raise ValueError(f"DoRA adapter tree: {path} must hold exactly 'a', 'b' and 'm', got {got}")


def modules(params: dict) -> dict[str, dict]:
  """{"layers/self_attn/q_proj": {"a", "b", "m"}} for every module of a DoRA tree."""
  ab = {}
  for top, layers_ in params.items():
    if top != "layers" or not isinstance(layers_, dict):
      raise ValueError(f"DoRA adapter tree: unexpected top-level key {top!r} (expected 'layers')")
    for parent, projs in layers_.items():
      for name, ad in projs.items():
        _check_module(ad, f"layers/{parent}/{name}")
        ab.setdefault("layers", {}).setdefault(parent, {})[name] = {"a": ad["a"], "b": ad["b"]}
  lora_modules = adapters_lib.modules(ab)  # names unsupported projections, like LoRA
  return {path: {**lab, "m": tree.flatten(params)[path + "/m"]}
          for path, lab in lora_modules.items()}


@dataclasses.dataclass(frozen=True)
class DoraAdapters:
  """DoRA factors and magnitudes; the same static fields as LoRA's `Adapters`.

  params: {"layers": {parent: {proj: {"a": [L, in, r], "b": [L, r, out], "m": [L, out]}}}}.
  """
  params: Any
  scale: float = _static()
  rank: int = _static()
  alpha: float = _static()
  rslora: bool = _static(False)
  targets: str = _static("")
  dropout: float = _static(0.0)

  def apply(self, params: dict, rng: jax.Array | None = None) -> dict:
    """The base params with each adapted kernel replaced by a `DoraKernel` leaf."""
    return apply(self, params, rng)


jax.tree_util.register_dataclass(DoraAdapters)


def _as_lora(adapters: DoraAdapters) -> adapters_lib.Adapters:
  """The LoRA half (a, b) of DoRA adapters, with the same static fields."""
  flat = {p: x for p, x in tree.flatten(adapters.params).items() if not p.endswith("/m")}
  return adapters_lib.Adapters(params=tree.unflatten(flat), scale=adapters.scale,
                               rank=adapters.rank, alpha=adapters.alpha, rslora=adapters.rslora,
                               targets=adapters.targets, dropout=adapters.dropout)


def apply(adapters: DoraAdapters, params: dict, rng: jax.Array | None = None) -> dict:
  """`params` with `DoraKernel(w, a, b, m, n, key)` in place of every adapted kernel.

  The LoRA wrapping (path and shape checks, dropout key stream) is `adapters_lib.apply`;
  each `LoraKernel` it builds becomes a `DoraKernel` with the magnitudes and this step's
  column norms.
  """
  mods = modules(adapters.params)
  flat_in = tree.flatten(params)
  for path in mods:
    if isinstance(flat_in.get(path + "/kernel"), DoraKernel):
      raise ValueError(f"dora.apply: {path}/kernel is already adapter-wrapped (applied twice?)")
  wrapped = adapters_lib.apply(_as_lora(adapters), params, rng)
  flat = tree.flatten(wrapped)
  for path, ad in mods.items():
    k = flat[path + "/kernel"]
    if tuple(ad["m"].shape) != (*k.w.shape[:-2], k.w.shape[-1]):
      raise ValueError(f"dora.apply: {path}/m has shape {tuple(ad['m'].shape)}, expected "
                       f"{(*k.w.shape[:-2], k.w.shape[-1])}")
    flat[path + "/kernel"] = DoraKernel(w=k.w, a=k.a, b=k.b, m=ad["m"],
                                        n=column_norms(k.w, k.a, k.b, k.scale), key=k.key,
                                        scale=k.scale, dropout=k.dropout)
  return tree.unflatten(flat)


def init(cfg: config_lib.ModelConfig, params: dict, peft_cfg: config_lib.PeftConfig, *,
         key: jax.Array, dtype: Any = jnp.float32) -> DoraAdapters:
  """LoRA's init (A kaiming-uniform, B = 0) plus m = ||W||_col, PEFT's DoRA init.

  `params` kernels may be `jax.ShapeDtypeStruct`s (a template): m is then zeros.
  """
  ad = lora.init_from_config(cfg, params, peft_cfg, key=key, dtype=dtype)
  flat_params = tree.flatten(params)
  flat = tree.flatten(ad.params)
  for module, ab in adapters_lib.modules(ad.params).items():
    w = flat_params[module + "/kernel"]
    if isinstance(w, jax.ShapeDtypeStruct):
      m = jnp.zeros((*w.shape[:-2], w.shape[-1]), dtype)
    else:
      m = jax.jit(column_norms, static_argnames="scale")(w, ab["a"], ab["b"], scale=ad.scale)
    flat[module + "/m"] = m.astype(dtype)  # [L, out]
  return DoraAdapters(params=tree.unflatten(flat), scale=ad.scale, rank=ad.rank, alpha=ad.alpha,
                      rslora=ad.rslora, targets=ad.targets, dropout=ad.dropout)


def axes(cfg_or_axes, adapters: DoraAdapters) -> DoraAdapters:
  """LoRA's axes for a and b; m [L, out] shards like the kernel's output dim."""
  lax_ = lora.axes(cfg_or_axes, _as_lora(adapters))
  flat = tree.flatten(lax_.params)
  for module in modules(adapters.params):
    b_axes = flat[module + "/b"]
    flat[module + "/m"] = (*b_axes[:-2], b_axes[-1])
  return dataclasses.replace(adapters, params=tree.unflatten(flat))


@functools.partial(jax.jit, static_argnames=("scale",))
def _merged_kernel(w, a, b, m, *, scale):
  """(m / ||V||) * V with V = W + scale * a @ b, in W's dtype (a QArray comes back dense)."""
  n = column_norms(w, a, b, scale)  # [L, out]
  wd = quant.dequantize(w) if isinstance(w, quant.QArray) else w
  v = wd.astype(jnp.float32) + scale * jnp.einsum(
      "...ir,...ro->...io", a.astype(jnp.float32), b.astype(jnp.float32), precision=HIGHEST)
  return ((m.astype(jnp.float32) / n)[..., None, :] * v).astype(wd.dtype)


def merge(cfg: config_lib.ModelConfig, params: dict, adapters: DoraAdapters) -> dict:
  """Dense params computing what `apply` computes: W' = (m / ||V||_col) * V per kernel."""
  flat = tree.flatten(params)
  expected = decoder.shapes(cfg)
  for module, ad in sorted(modules(adapters.params).items()):
    path = module + "/kernel"
    if path not in flat:
      raise ValueError(f"dora.merge: params have no {path} for the adapter {module}")
    if tuple(flat[path].shape) != tuple(expected[path]):
      raise ValueError(f"dora.merge: {path} has shape {tuple(flat[path].shape)}, the config "
                       f"expects {tuple(expected[path])}")
    flat[path] = _merged_kernel(flat[path], ad["a"], ad["b"], ad["m"], scale=adapters.scale)
  return tree.unflatten(flat)


def save_peft(cfg: config_lib.ModelConfig, adapters: DoraAdapters, out_dir: str, *,
              base_model_name_or_path: str = "", dtype: str | None = None) -> str:
  """PEFT's LoRA files with `use_dora: true` and `...lora_magnitude_vector` [out] tensors."""
  tensors, pc = peft_io.lora_files(cfg, _as_lora(adapters),
                                   base_model_name_or_path=base_model_name_or_path, dtype=dtype)
  templates = peft_io.module_templates(cfg)
  for module, ad in sorted(modules(adapters.params).items()):
    m = peft_io.host(ad["m"], dtype)  # [L, out]
    stem = peft_io.PREFIX + templates[module]
    for i in range(cfg.num_layers):
      tensors[stem.format(i=i) + ".lora_magnitude_vector"] = np.ascontiguousarray(m[i])
  return peft_io.write_adapter(out_dir, tensors, dict(pc, use_dora=True), family=cfg.family)


def load_peft(cfg: config_lib.ModelConfig, adapter_dir: str, *,
              dtype: Any = jnp.float32) -> DoraAdapters:
  """Reads a PEFT DoRA adapter (LoRA files with use_dora: true); errors name what is wrong."""
  pc, mods = peft_io.read_lora(cfg, adapter_dir, dora=True)
  rank, alpha, rslora = int(pc["r"]), float(pc["lora_alpha"]), bool(pc.get("use_rslora"))
  flat = {f"{module}/{k}": jnp.asarray(v, dtype) for module, t in mods.items()
          for k, v in t.items()}
  return DoraAdapters(params=tree.unflatten(flat), scale=adapters_lib.scale(rank, alpha, rslora),
                      rank=rank, alpha=alpha, rslora=rslora,
                      targets=peft_io.targets_regex(mods),
                      dropout=float(pc.get("lora_dropout") or 0.0))


@dataclasses.dataclass(frozen=True)
class DoraMethod:
  """DoRA as a `base.PeftMethod`; `qdora` is the same over the 4-bit base."""
  name: str = "dora"
  quantized_base: bool = False
  peft_type: str = "LORA"
  adapters_type: type = DoraAdapters

  def accepts(self, peft_config: dict) -> bool:
    """Among the LORA-type methods, DoRA reads the files with `use_dora: true`."""
    return peft_config.get("use_dora") is True

  def init(self, model_cfg, params, peft_cfg, key) -> DoraAdapters:
    return init(model_cfg, params, peft_cfg, key=key)

  def axes(self, model_cfg, adapters: DoraAdapters) -> DoraAdapters:
    return axes(model_cfg, adapters)

  def apply(self, params: dict, adapters: DoraAdapters, rng: jax.Array | None = None) -> dict:
    return apply(adapters, params, rng)

  def merge(self, model_cfg, params: dict, adapters: DoraAdapters) -> dict:
    return merge(model_cfg, params, adapters)

  def save(self, model_cfg, adapters: DoraAdapters, out_dir: str, *,
           base_model_name_or_path: str = "") -> str:
    return save_peft(model_cfg, adapters, out_dir, base_model_name_or_path=base_model_name_or_path)

  def load(self, model_cfg, adapter_dir: str) -> DoraAdapters:
    return load_peft(model_cfg, adapter_dir)


METHOD = DoraMethod()
QDORA = DoraMethod(name="qdora", quantized_base=True)
