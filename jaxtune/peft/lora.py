"""LoRA as tree operations: init an adapter tree, give it axes, apply, merge, export to PEFT.

Low-rank adaptation (Hu et al. 2021) freezes the base params and learns, for each targeted
kernel W [in, out], two factors A [in, r] and B [r, out] with y = x @ W + scale * x @ A @ B.
In jaxtune the factors are a separate tree (`Adapters`, see `adapters.py`) selected by regex
over base param paths, so the base stays a frozen argument and only adapter leaves are
differentiated, hold optimizer state and are checkpointed. For a forward pass,
`apply` wraps each targeted kernel in a `LoraKernel` leaf (`lora_kernel.py`) that the
decoder's `layers.linear` runs like a dense or 4-bit kernel:

    >>> adapters = lora.init(cfg, params, rank=8, alpha=16, key=key)
    >>> logits = decoder.forward(cfg, params, tokens, lora=adapters)
    >>> def loss_fn(ad_params, rng):                         # a training step, with dropout
    ...   wrapped = dataclasses.replace(adapters, params=ad_params).apply(params, rng)
    ...   return ce(decoder.forward(cfg, wrapped, tokens))
    >>> loss, grads = jax.value_and_grad(loss_fn)(adapters.params, rng)  # grads: adapter tree
    >>> shardings = sharding.tree_shardings(mesh, lora.axes(cfg, adapters), adapters)
    >>> merged = lora.merge(cfg, params, adapters)          # dense params, W + scale * A @ B
    >>> lora.save_peft(cfg, adapters, "out/")               # peft.PeftModel loads it
    >>> adapters = lora.load_peft(cfg, "out/")

Reference model / KL base with adapters off (DPO, GRPO): the same base params, not applied;
`reference_logits` says so in code, so no second copy of the weights exists. The base
kernels may be `quant.QArray` leaves (QLoRA, see `qlora.py`); shapes are read from the
quantized leaf. LoRA dropout (`PeftConfig.dropout`, static on `Adapters`) is applied to the
adapters' inputs when `apply` is given an rng (training steps only).

`METHOD` is this module's `base.PeftMethod` (registered as "lora" in `jaxtune.peft`).
"""

from __future__ import annotations

import dataclasses
import functools
import re
from typing import Any

import jax
import jax.numpy as jnp

from jaxtune import config as config_lib
from jaxtune import quant
from jaxtune import tree
from jaxtune.models import decoder
from jaxtune.peft import adapters as adapters_lib
from jaxtune.peft import lora_kernel
from jaxtune.peft import peft_io

Adapters = adapters_lib.Adapters
LoraKernel = lora_kernel.LoraKernel
save_peft = peft_io.save_peft
load_peft = peft_io.load_peft

DEFAULT_TARGETS = config_lib.PeftConfig.targets  # all 7 attention and MLP projections


def select(params: dict, targets: str) -> dict[str, tuple[int, ...]]:
  """{kernel path: kernel shape} of the LoRA-able kernels whose path fully matches `targets`.

  Only the attention and MLP projections under "layers/" can carry adapters; a regex such
  as ".*" selects all of them. Errors (config.ConfigError naming peft.targets): a malformed
  regex, and any top-level alternative that selects no LoRA-able kernel
  (".*q_proj/kernel|lm_head/kernel" would otherwise adapt q_proj alone, silently). An error
  rather than a warning: a dropped alternative changes what trains, and removing it from
  the regex is the one-line fix, found before any data or step.
  """
  flat = tree.flatten(params)
  try:
    rx = re.compile(targets)
  except re.error as e:
    raise config_lib.ConfigError(f"bad value for peft.targets: {targets!r} is not a valid "
                                 f"regex ({e})") from None
  present = [p for p in adapters_lib.SUPPORTED_KERNELS if p in flat]
  chosen = {p: tuple(flat[p].shape) for p in present if rx.fullmatch(p)}
  if not chosen:
    others = [p for p in flat if rx.fullmatch(p)]
    raise config_lib.ConfigError(
        f"bad value for peft.targets: LoRA targets {targets!r} select no projection kernel; "
        f"LoRA-able paths are {present}" + (f" (the regex matches only unsupported params "
                                           f"{others[:4]})" if others else ""))
  for alt in _alternatives(targets):
    alt_rx = re.compile(alt)
    if any(alt_rx.fullmatch(p) for p in present):
      continue
    others = [p for p in flat if alt_rx.fullmatch(p)]
    what = (f"it matches only {others[:4]}, which LoRA cannot adapt" if others
            else "it matches no param")
    raise config_lib.ConfigError(
        f"bad value for peft.targets: {targets!r}: the alternative {alt!r} selects no "
        f"LoRA-able kernel ({what}); LoRA-able paths are {present}")
  return chosen


_GLOBAL_FLAGS = re.compile(r"^\(\?[aiLmsux]+\)")


def _alternatives(pattern: str) -> list[str]:
  """The top-level alternatives of a regex, each compilable on its own (a leading global
  flag group is kept on each):

      "a/kernel|(b|c)/kernel|[|]x" -> ["a/kernel", "(b|c)/kernel", "[|]x"]
      "(?i)A|b"                     -> ["(?i)A", "(?i)b"]
  """
  flags = _GLOBAL_FLAGS.match(pattern)
  prefix = flags.group(0) if flags else ""
  body = pattern[len(prefix):]
  parts, depth, start, i, in_class = [], 0, 0, 0, False
  while i < len(body):
    c = body[i]
    if c == "\\":
      i += 2
      continue
    if in_class:
      in_class = c != "]"
    elif c == "[":
      in_class = True
      i += 1
      i += body.startswith("^", i)
      i += body.startswith("]", i)  # "[]...]" and "[^]...]": that "]" is literal
      continue
    elif c == "(":
      depth += 1
    elif c == ")":
      depth -= 1
    elif c == "|" and depth == 0:
      parts.append(body[start:i])
      start = i + 1
    i += 1
  parts.append(body[start:])
  return [prefix + p for p in parts]


def init(cfg: config_lib.ModelConfig, params: dict, *, rank: int = 8, alpha: float = 16.0,
         targets: str = DEFAULT_TARGETS, rslora: bool = False, key: jax.Array,
         a_init: str = "kaiming", dtype: Any = jnp.float32) -> Adapters:
  """Fresh adapters for the kernels of `params` selected by `targets`: A random, B = 0.

  Args:
    cfg: the model config; kernel shapes are checked against it.
    params: the base params (dense, QArray or `jax.ShapeDtypeStruct` kernels).
    rank, alpha, rslora: scale = alpha / rank, or alpha / sqrt(rank) with rslora.
    targets: regex fully matching base kernel paths, e.g. "layers/self_attn/(q|v)_proj/kernel".
    key: PRNG key for A.
    a_init: 'kaiming' (PEFT's default: kaiming_uniform(a=sqrt(5)), i.e. U(+-1/sqrt(in)))
      or 'gaussian' (PEFT's init_lora_weights='gaussian': normal(0, 1/rank)).
    dtype: adapter storage dtype (float32 by default; cast to the compute dtype in linear).

  Since B = 0, the model's output at init equals the base's exactly.
  """
  if a_init not in ("kaiming", "gaussian"):
    raise ValueError(f"a_init must be 'kaiming' or 'gaussian', got {a_init!r}")
  chosen = select(params, targets)
  expected = decoder.shapes(cfg)
  flat = {}
  for i, (path, shape) in enumerate(sorted(chosen.items())):
    if shape != tuple(expected[path]):
      raise ValueError(f"{path}: kernel shape {shape} does not match the config's "
                       f"{tuple(expected[path])}")
    *lead, n_in, n_out = shape
    k = jax.random.fold_in(key, i)
    if a_init == "kaiming":
      bound = 1.0 / n_in ** 0.5
      a = jax.random.uniform(k, (*lead, n_in, rank), jnp.float32, -bound, bound)  # [L, in, r]
    else:
      a = jax.random.normal(k, (*lead, n_in, rank), jnp.float32) / rank  # [L, in, r]
    module = path.rsplit("/", 1)[0]
    flat[module + "/a"] = a.astype(dtype)
    flat[module + "/b"] = jnp.zeros((*lead, rank, n_out), dtype)  # [L, r, out]
  return Adapters(params=tree.unflatten(flat), scale=adapters_lib.scale(rank, alpha, rslora),
                  rank=rank, alpha=float(alpha), rslora=rslora, targets=targets)


def init_from_config(cfg: config_lib.ModelConfig, params: dict, peft_cfg: config_lib.PeftConfig,
                     *, key: jax.Array, dtype: Any = jnp.float32) -> Adapters:
  """`init` with rank, alpha, rslora and targets from a `PeftConfig` (method lora|qlora)."""
  adapters = init(cfg, params, rank=peft_cfg.rank, alpha=peft_cfg.alpha,
                  targets=peft_cfg.targets, rslora=peft_cfg.rslora, key=key, dtype=dtype)
  if not 0.0 <= peft_cfg.dropout < 1.0:
    raise ValueError(f"peft.dropout={peft_cfg.dropout}: expected 0 <= dropout < 1")
  return dataclasses.replace(adapters, dropout=float(peft_cfg.dropout))


def axes(cfg_or_axes, adapters: Adapters) -> Adapters:
  """Logical axes of the adapter leaves, derived from the base kernels' axes.

  kernel (layers, in_axis, out_axis) -> a (layers, in_axis, "rank"), b (layers, "rank",
  out_axis), so A shards its input rows like W and B its output columns like W:

      q_proj kernel ('layers', 'embed', 'q_heads')
        -> {"a": ('layers', 'embed', 'rank'), "b": ('layers', 'rank', 'q_heads')}

  `cfg_or_axes` is a ModelConfig (uses `decoder.axes`) or a base axes tree. Returns an
  `Adapters` with the same metadata whose params leaves are axis tuples, so that
  `sharding.tree_shardings(mesh, axes(cfg, ad), ad)` and `jax.device_put` line up.
  """
  base = (decoder.axes(cfg_or_axes) if isinstance(cfg_or_axes, config_lib.ModelConfig)
          else cfg_or_axes)
  flat_base = tree.flatten(base)
  flat = {}
  for module, ab in adapters_lib.modules(adapters.params).items():
    ax = flat_base.get(module + "/kernel")
    if ax is None:
      raise ValueError(f"lora.axes: base axes have no {module}/kernel")
    ax = tuple(ax)
    if len(ax) != len(ab["a"].shape):
      raise ValueError(f"lora.axes: {module}/kernel axes {ax} do not fit a of shape "
                       f"{tuple(ab['a'].shape)}")
    flat[module + "/a"] = (*ax[:-2], ax[-2], "rank")
    flat[module + "/b"] = (*ax[:-2], "rank", ax[-1])
  return dataclasses.replace(adapters, params=tree.unflatten(flat))


def merge(cfg: config_lib.ModelConfig, params: dict, adapters: Adapters) -> dict:
  """Base params with W + scale * A @ B in place of each adapted kernel, in W's dtype.

  QArray kernels are dequantized first and come back dense (QLoRA -> full model). Other
  leaves are shared with `params`, not copied.
  """
  flat = tree.flatten(params)
  expected = decoder.shapes(cfg)
  for module, ab in sorted(adapters_lib.modules(adapters.params).items()):
    path = module + "/kernel"
    if path not in flat:
      raise ValueError(f"lora.merge: params have no {path} for the adapter {module}")
    w = flat[path]
    ab_shape = (*ab["a"].shape[:-1], ab["b"].shape[-1])
    if tuple(w.shape) != ab_shape or tuple(w.shape) != tuple(expected[path]):
      raise ValueError(f"lora.merge: {path} has shape {tuple(w.shape)}, A @ B has "
                       f"{ab_shape}, the config expects {tuple(expected[path])}")
    flat[path] = _merged_kernel(w, ab["a"], ab["b"], scale=adapters.scale)
  return tree.unflatten(flat)


@functools.partial(jax.jit, static_argnames=("scale",))
def _merged_kernel(w, a, b, *, scale):
  """W (dense or QArray) [L, in, out] + scale * a [L, in, r] @ b [L, r, out], in W's dtype."""
  if isinstance(w, quant.QArray):
    w = quant.dequantize(w)  # fused into the add under jit
  d = jnp.einsum("...ir,...ro->...io", a.astype(jnp.float32), b.astype(jnp.float32),
                 precision=jax.lax.Precision.HIGHEST)
  return (w.astype(jnp.float32) + scale * d).astype(w.dtype)


def apply(params: dict, adapters: Adapters, rng: jax.Array | None = None) -> dict:
  """`adapters.apply(params, rng)`: targeted kernels -> `LoraKernel` leaves (see adapters.py).

      {"layers": {"mlp": {"up_proj": {"kernel": [L, D, F]}}, ...}}
   -> {"layers": {"mlp": {"up_proj": {"kernel": LoraKernel(w=[L, D, F], a=[L, D, r],
                                                         b=[L, r, F], key=None)}}, ...}}
  """
  return adapters.apply(params, rng)


def reference_logits(cfg: config_lib.ModelConfig, params: dict, tokens: jax.Array,
                     **forward_kwargs) -> jax.Array:
  """Logits of the base with adapters off: the DPO reference / GRPO KL base under LoRA.

  The very same (possibly quantized) base params, not applied; no second copy. Wrap it in
  `jax.lax.stop_gradient` where it feeds a loss. tokens [B, T] -> float32 [B, T, V].
  """
  return decoder.forward(cfg, params, tokens, lora=None, **forward_kwargs)


def num_params(adapters: Adapters) -> int:
  """Number of trainable adapter parameters."""
  return tree.count(adapters.params)


@dataclasses.dataclass(frozen=True)
class LoraMethod:
  """LoRA as a `base.PeftMethod`: the module functions above behind the protocol.

  The same class serves QLoRA (`qlora.METHOD`, quantized_base=True): the adapters and their
  files are the same; only the loading of the base differs, and that stays in `qlora.py`.
  """
  name: str = "lora"
  quantized_base: bool = False
  peft_type: str = "LORA"
  adapters_type: type = Adapters

  def init(self, model_cfg, params, peft_cfg, key) -> Adapters:
    return init_from_config(model_cfg, params, peft_cfg, key=key)

  def axes(self, model_cfg, adapters: Adapters) -> Adapters:
    return axes(model_cfg, adapters)

  def apply(self, params: dict, adapters: Adapters, rng: jax.Array | None = None) -> dict:
    return apply(params, adapters, rng)

  def merge(self, model_cfg, params: dict, adapters: Adapters) -> dict:
    return merge(model_cfg, params, adapters)

  def save(self, model_cfg, adapters: Adapters, out_dir: str, *,
           base_model_name_or_path: str = "") -> str:
    return save_peft(model_cfg, adapters, out_dir,
                     base_model_name_or_path=base_model_name_or_path)

  def load(self, model_cfg, adapter_dir: str) -> Adapters:
    return load_peft(model_cfg, adapter_dir)


METHOD = LoraMethod()
