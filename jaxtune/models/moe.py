"""Mixture-of-experts MLP blocks (Mixtral, Qwen3-MoE): router, grouped expert matmuls, aux loss.

A MoE layer replaces the dense SwiGLU MLP with E expert MLPs and a linear router. Each token
picks its top-k experts from a float32 softmax over the router logits; the k weights are
renormalised to sum to one (always for Mixtral, with `norm_topk_prob` for Qwen3-MoE). The
experts run as two grouped matmuls (`jax.lax.ragged_dot`) over the N*k (token, expert)
pairs sorted by expert, so every expert multiplies exactly its own rows: no Python loop over
experts and no dense all-experts product.

Params of a MoE layer (Lm MoE layers, E experts, D hidden, F expert width), named after the
`transformers` 5 modules so that PEFT's `target_parameters` names line up:

    "mlp": {"gate": {"kernel": [Lm, D, E]},                              # router
            "experts": {"gate_up_proj": {"kernel": [Lm, E, D, 2F]},      # [gate | up]
                        "down_proj": {"kernel": [Lm, E, F, D]}}}

Qwen3-MoE may mix in dense layers (`mlp_only_layers`, `decoder_sparse_step`; here
`ModelConfig.dense_layers`): their MLP keeps the dense names with its own leading axis,
"mlp": {"gate_proj": {"kernel": [Ld, D, F']}, ...}, and such a model runs its layers
unrolled (`layer_slice` hands each layer its own slice).

The load-balancing loss is `transformers`' `load_balancing_loss_func`: over every MoE layer
and every non-padding token, E * sum_e f_e * P_e, where f_e is the fraction of top-k
assignments to expert e and P_e the mean router probability of e (both pooled over layers).
Each layer returns the three sums it needs (`stats`), and `aux_loss` combines them.
"""

from __future__ import annotations

import functools
import logging

import jax
import jax.numpy as jnp

from jaxtune import config as config_lib
from jaxtune import quant
from jaxtune.models import grouped_gemm, layers

# The param names of a MoE layer's MLP, and of a dense one in a mixed model.
MOE_NAMES = ("gate", "experts")
DENSE_NAMES = ("gate_proj", "up_proj", "down_proj")
STATS = ("moe_counts", "moe_probs", "moe_rows")


def is_moe(cfg: config_lib.ModelConfig) -> bool:
  return cfg.num_experts > 0


def expert_width(cfg: config_lib.ModelConfig) -> int:
  """F of one expert: moe_intermediate_size, or intermediate_size (Mixtral)."""
  return cfg.moe_intermediate_size or cfg.intermediate_size


def moe_layers(cfg: config_lib.ModelConfig) -> tuple[int, ...]:
  """The layer indices whose MLP is a MoE block (all layers of a dense model: none)."""
  if not is_moe(cfg):
    return ()
  dense = set(cfg.dense_layers)
  return tuple(i for i in range(cfg.num_layers) if i not in dense)


def dense_layers(cfg: config_lib.ModelConfig) -> tuple[int, ...]:
  """The layer indices with a dense MLP."""
  moe = set(moe_layers(cfg))
  return tuple(i for i in range(cfg.num_layers) if i not in moe)


def is_mixed(cfg: config_lib.ModelConfig) -> bool:
  """True when MoE and dense layers alternate: the layers then run unrolled."""
  return is_moe(cfg) and bool(dense_layers(cfg))


def mlp_matmul_params(cfg: config_lib.ModelConfig) -> int:
  """MLP params one token multiplies, over all layers: k experts + the router in MoE layers
  (the active params, for FLOPs), 3 * D * F in dense ones."""
  d = cfg.hidden_size
  dense = len(dense_layers(cfg)) * 3 * d * cfg.intermediate_size
  per_moe = cfg.num_experts_per_tok * 3 * d * expert_width(cfg) + d * cfg.num_experts
  return dense + len(moe_layers(cfg)) * per_moe


def layer_ids(cfg: config_lib.ModelConfig, path: str) -> tuple[int, ...]:
  """The HF layer indices stacked on the leading axis of the layer param at `path`."""
  if is_moe(cfg) and path.startswith("layers/mlp/"):
    name = path.split("/")[2]
    return moe_layers(cfg) if name in MOE_NAMES else dense_layers(cfg)
  return tuple(range(cfg.num_layers))


def check(cfg: config_lib.ModelConfig) -> None:
  """ConfigError naming the model.* field for an impossible MoE config."""
  if not is_moe(cfg):
    return
  if cfg.moe_impl not in IMPLS:
    raise config_lib.ConfigError(f"bad value for model.moe_impl: {cfg.moe_impl!r} "
                                 f"(expected one of {', '.join(IMPLS)})")
  if not 0 < cfg.num_experts_per_tok <= cfg.num_experts:
    raise config_lib.ConfigError(
        f"bad value for model.num_experts_per_tok: {cfg.num_experts_per_tok} "
        f"(expected 1..num_experts={cfg.num_experts})")
  bad = [i for i in cfg.dense_layers if not 0 <= i < cfg.num_layers]
  if bad:
    raise config_lib.ConfigError(f"bad value for model.dense_layers: {bad} are not layers "
                                 f"of a {cfg.num_layers}-layer model")


def shapes(cfg: config_lib.ModelConfig) -> dict:
  """(shape, logical axes, init) of the MLP params of a MoE model, by param path."""
  check(cfg)
  D, E, F = cfg.hidden_size, cfg.num_experts, expert_width(cfg)
  lm, ld = len(moe_layers(cfg)), len(dense_layers(cfg))
  s = {
      "layers/mlp/gate/kernel": ((lm, D, E), ("layers", "embed", None), D),
      "layers/mlp/experts/gate_up_proj/kernel": (
          (lm, E, D, 2 * F), ("layers", "expert", "embed", "expert_mlp"), D),
      "layers/mlp/experts/down_proj/kernel": (
          (lm, E, F, D), ("layers", "expert", "expert_mlp", "embed"), F),
  }
  if ld:
    Fd = cfg.intermediate_size
    s["layers/mlp/gate_proj/kernel"] = ((ld, D, Fd), ("layers", "embed", "mlp"), D)
    s["layers/mlp/up_proj/kernel"] = ((ld, D, Fd), ("layers", "embed", "mlp"), D)
    s["layers/mlp/down_proj/kernel"] = ((ld, Fd, D), ("layers", "mlp", "embed"), Fd)
  return s


def layer_slice(cfg: config_lib.ModelConfig, stacked: dict, i: int) -> dict:
  """Layer i's params from the stacked layer tree (any leaf type).

  In a mixed model the MLP subtree of layer i comes from the MoE stack (its position among
  the MoE layers) or from the dense stack; every other subtree is indexed by i.
  """
  take = lambda tree, j: jax.tree_util.tree_map(lambda a: a[j], tree)
  if not is_mixed(cfg):
    return take(stacked, i)
  out = take({k: v for k, v in stacked.items() if k != "mlp"}, i)
  mlp = stacked["mlp"]
  moe = moe_layers(cfg)
  if i in moe:
    out["mlp"] = take({k: mlp[k] for k in MOE_NAMES}, moe.index(i))
  else:
    out["mlp"] = take({k: mlp[k] for k in DENSE_NAMES}, dense_layers(cfg).index(i))
  return out


IMPLS = ("auto", "ragged", "blocked", "mgpu")
BLOCK = 128  # rows per block of the 'blocked' grouped matmul


def ragged_linear(x: jax.Array, w, group_sizes: jax.Array, impl: str = "ragged") -> jax.Array:
  """Rows x [M, in] sorted by expert @ w [E, in, out] -> [M, out]; expert e takes the next
  group_sizes[e] rows. w: dense, a 4-bit `quant.QArray` (dequantised for the layer), or an
  adapter leaf with a `ragged_linear(x, group_sizes, impl)` method (expert LoRA).

  impl: 'ragged' = `jax.lax.ragged_dot` (XLA's grouped matmul; where the backend has no
  grouped kernel XLA expands it densely), 'blocked' = `grouped_blocks`, 'mgpu' = JAX's Mosaic
  GPU grouped kernels (`grouped_gemm`, Hopper) where the shapes fit their tiles (a LoRA
  factor's rank does not), else 'blocked'.
  """
  if isinstance(w, quant.QArray):
    w = quant.dequantize(w)
  elif callable(getattr(w, "ragged_linear", None)):
    return w.ragged_linear(x, group_sizes, impl)
  elif not hasattr(w, "dtype"):
    raise TypeError(f"MoE experts: {type(w).__name__} kernels cannot run as grouped matmuls "
                    "(supported: dense, 4-bit QArray, LoRA)")
  if impl == "mgpu" and grouped_gemm.fits(x, w.astype(x.dtype)):
    return grouped_gemm.ragged_dot(x, w.astype(x.dtype), group_sizes)
  if impl in ("blocked", "mgpu"):
    return grouped_blocks(x, w.astype(x.dtype), group_sizes)
  return jax.lax.ragged_dot(x, w.astype(x.dtype), group_sizes)


def grouped_blocks(x: jax.Array, w: jax.Array, group_sizes: jax.Array,
                   block: int = BLOCK) -> jax.Array:
  """The grouped matmul as batched matmuls over blocks of `block` rows of one expert each.

  Each expert's rows are padded to a multiple of `block` (at most ceil(M / block) + E
  blocks, a static bound), every block multiplies its expert's weight, and the rows are read
  back: M * k real rows plus at most E * (block - 1) padding rows of FLOPs, whatever the
  backend's ragged-dot support. x [M, in] sorted by expert, w [E, in, out] -> [M, out];
  equal to `jax.lax.ragged_dot` up to float summation order. The per-block weights
  ([blocks, in, out], about twice the experts' own size) exist only inside one product
  (`_block_matmul`'s custom VJP gathers them again in the backward pass rather than keeping
  them for it: at the Qwen3-30B-A3B shape that was ~2.4 GB of saved activations per layer).
  """
  m, e = x.shape[0], w.shape[0]
  nb = -(-m // block) + e
  padded = (group_sizes + block - 1) // block * block  # [E]
  pad_start = jnp.cumsum(padded) - padded
  start = jnp.cumsum(group_sizes) - group_sizes
  expert = jnp.repeat(jnp.arange(e), group_sizes, total_repeat_length=m)  # [M]
  dest = pad_start[expert] + jnp.arange(m) - start[expert]  # row -> padded row
  src = jnp.full((nb * block,), -1, dest.dtype).at[dest].set(jnp.arange(m, dtype=dest.dtype))
  xp = permute_rows(x, src, dest)  # [nb * block, in], padding rows 0
  ends = jnp.cumsum(padded)
  block_expert = jnp.minimum(jnp.searchsorted(ends, jnp.arange(nb) * block, side="right"),
                             e - 1)  # [nb], ascending
  yp = _block_matmul(xp.reshape(nb, block, -1), w, block_expert)
  return permute_rows(yp.reshape(nb * block, -1), dest, src)


@jax.custom_vjp
def permute_rows(x: jax.Array, idx: jax.Array, back: jax.Array) -> jax.Array:
  """x[idx] along rows, 0 where idx < 0, for a one-to-one map: every row i of x is read by
  exactly one output row j (idx[j] = i, back[i] = j; back[i] < 0 for a row nothing reads).
  Its transpose is then the gather by `back`, not a scatter-add: XLA's scatter-adds of
  [rows, width] gradients were the MoE step's largest non-matmul cost on an H200."""
  return _take_fill(x, idx)


def _take_fill(x, idx):
  rows = x.shape[0]
  return jnp.take(x, jnp.where(idx >= 0, idx, rows), axis=0, mode="fill", fill_value=0)


def _permute_rows_fwd(x, idx, back):
  return _take_fill(x, idx), (idx, back)


def _permute_rows_bwd(res, dy):
  idx, back = res
  return _take_fill(dy, back), None, None


permute_rows.defvjp(_permute_rows_fwd, _permute_rows_bwd)


@jax.custom_vjp
def _block_matmul(xb: jax.Array, w: jax.Array, block_expert: jax.Array) -> jax.Array:
  """xb [nb, block, in] @ w[block_expert] ([nb, in, out]) -> [nb, block, out]."""
  return jnp.einsum("bti,bio->bto", xb, jnp.take(w, block_expert, 0))


def _block_matmul_fwd(xb, w, block_expert):
  need_w = w.perturbed
  xb, w, block_expert = xb.value, w.value, block_expert.value
  y = _block_matmul(xb, w, block_expert)
  return y, (xb if need_w else None, w, block_expert)  # w: the param itself, no copy


def _block_matmul_bwd(res, dy):
  xb, w, block_expert = res
  if isinstance(dy, jax.custom_derivatives.SymbolicZero):
    return None, None, None
  dx = jnp.einsum("bto,bio->bti", dy, jnp.take(w, block_expert, 0))
  dw = None
  if xb is not None:  # blocks are sorted by expert: a sorted segment sum per expert
    per_block = jnp.einsum("bti,bto->bio", xb, dy, preferred_element_type=jnp.float32)
    dw = jax.ops.segment_sum(per_block, block_expert, num_segments=w.shape[0],
                             indices_are_sorted=True).astype(w.dtype)
  return dx, dw, None


_block_matmul.defvjp(_block_matmul_fwd, _block_matmul_bwd, symbolic_zeros=True)


def route(cfg: config_lib.ModelConfig, x: jax.Array, router) -> tuple:
  """x [N, D] -> (probs [N, E] f32, top-k weights [N, k] in x.dtype, top-k experts [N, k])."""
  logits = layers.linear(x, router)  # [N, E], x's dtype as transformers' F.linear
  probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
  top_w, top_i = jax.lax.top_k(probs, cfg.num_experts_per_tok)
  if cfg.norm_topk_prob:
    top_w = top_w / jnp.sum(top_w, axis=-1, keepdims=True)
  return probs, top_w.astype(x.dtype), top_i


def mlp(cfg: config_lib.ModelConfig, h: jax.Array, p: dict, *,
        mask: jax.Array | None = None) -> tuple[jax.Array, dict]:
  """The MoE MLP: h [B, T, D] -> (y [B, T, D], router stats for `aux_loss`).

  mask [B, T] (1 = a real token, 0 = padding) only weighs the stats, as transformers'
  attention_mask does; every token is routed.
  """
  b, t, d = h.shape
  k, e = cfg.num_experts_per_tok, cfg.num_experts
  x = h.reshape(b * t, d)  # [N, D]
  probs, top_w, top_i = route(cfg, x, p["gate"]["kernel"])
  flat_e = top_i.reshape(-1)  # [N*k] expert of each (token, slot) pair
  order = jnp.argsort(flat_e, stable=True)  # pairs sorted by expert
  inverse = jnp.zeros_like(order).at[order].set(jnp.arange(order.shape[0], dtype=order.dtype))
  xs = permute_rows(jnp.repeat(x, k, axis=0), order, inverse)  # [N*k, D]
  group_sizes = jnp.bincount(flat_e, length=e).astype(jnp.int32)  # [E]
  experts = p["experts"]
  impl = resolve_impl(cfg.moe_impl)
  gu = ragged_linear(xs, experts["gate_up_proj"]["kernel"], group_sizes, impl)  # [N*k, 2F]
  gate, up = jnp.split(gu, 2, axis=-1)
  ys = ragged_linear(layers.swiglu(gate, up), experts["down_proj"]["kernel"], group_sizes,
                     impl)
  ys = permute_rows(ys, inverse, order).reshape(b * t, k, d)  # (token, slot) order: [N, k, D]
  y = jnp.einsum("nkd,nk->nd", ys, top_w.astype(ys.dtype))
  m = jnp.ones((b * t,), jnp.float32) if mask is None else mask.reshape(-1).astype(jnp.float32)
  counts = jnp.einsum("nke,n->e", jax.nn.one_hot(top_i, e, dtype=jnp.float32), m)
  stats = {"moe_counts": jax.lax.stop_gradient(counts),  # [E] top-k assignments
           "moe_probs": jnp.einsum("ne,n->e", probs, m),  # [E] router probability sums
           "moe_rows": jnp.sum(m)}  # [] tokens counted
  return y.reshape(b, t, d).astype(h.dtype), stats


def resolve_impl(impl: str) -> str:
  """model.moe_impl=auto: 'mgpu' where `grouped_gemm.available()` (one Hopper GPU),
  'blocked' on other GPUs, where XLA's ragged_dot ran 10x slower on an H200 (Qwen3-30B-A3B
  shape, LoRA: 1.4k against 13.8k tokens/s, docs/BENCHMARKS.md), else 'ragged' (a native
  grouped matmul on TPU; on CPU both are exact). A forced 'mgpu' where the kernels are not
  available (a config saved on a Hopper GPU, reused elsewhere) runs what 'auto' picks
  there, the same function, with a warning."""
  portable = "blocked" if jax.default_backend() == "gpu" else "ragged"
  if impl == "mgpu" and not grouped_gemm.available():
    _warn_once("model.moe_impl='mgpu' needs a process that sees one Hopper (sm_90) GPU and "
               f"jax's Mosaic GPU ragged-dot kernels; running moe_impl='{portable}' instead")
    return portable
  if impl != "auto":
    return impl
  return "mgpu" if grouped_gemm.available() else portable


@functools.lru_cache(maxsize=None)
def _warn_once(message: str) -> None:
  logging.getLogger("jaxtune").warning(message)


def aux_loss(cfg: config_lib.ModelConfig, stats: dict) -> jax.Array:
  """transformers' load_balancing_loss_func from per-layer stats ([L, E], [L, E], [L]).

  E * sum_e (counts_e / rows) * (probs_e / rows), each pooled over the MoE layers; 0 for a
  dense model or when no token was counted.
  """
  if not is_moe(cfg) or not stats:
    return jnp.zeros((), jnp.float32)
  rows = jnp.sum(stats["moe_rows"])
  safe = jnp.maximum(rows, 1.0)
  counts = jnp.sum(stats["moe_counts"].reshape(-1, cfg.num_experts), axis=0) / safe
  probs = jnp.sum(stats["moe_probs"].reshape(-1, cfg.num_experts), axis=0) / safe
  return jnp.where(rows > 0, cfg.num_experts * jnp.sum(counts * probs), 0.0)
