"""`LoraKernel`: the leaf that stands in for a LoRA-adapted kernel inside the base params.

The decoder never mentions LoRA. Like a 4-bit `quant.QArray`, an adapted projection is just
another kind of kernel leaf, and `layers.linear` dispatches on it (it calls the leaf's
`linear` method). `Adapters.apply` (see `adapters.py`) builds these leaves for one forward
pass, replacing each targeted kernel of the base params:

    base    {"layers": {"self_attn": {"q_proj": {"kernel": [L, D, H*Dh], "bias": ...}}}}
    applied {"layers": {"self_attn": {"q_proj": {"kernel": LoraKernel(w=[L, D, H*Dh],
                                                                      a=[L, D, r],
                                                                      b=[L, r, H*Dh],
                                                                      key=[L, 2] | None),
                                                  "bias": ...}}}}

Every child keeps the kernel's leading layer axis, so `lax.scan` over `params["layers"]`
hands each layer its slice (w [D, H*Dh], a [D, r], b [r, H*Dh], key [2]) with no special
code, and jit / grad / remat see a plain pytree: gradients reach `a` and `b` through the
leaf. `scale` and `dropout` are static (aux) data.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from jaxtune.models import layers
from jaxtune.models import moe


def _static(default=dataclasses.MISSING):
  return dataclasses.field(default=default, metadata=dict(static=True))


@dataclasses.dataclass(frozen=True)
class LoraKernel:
  """A kernel W [..., in, out] plus LoRA factors: y = x @ W + scale * dropout(x) @ a @ b.

  w: the base kernel, a dense array or a `quant.QArray` [..., in, out].
  a: [..., in, r]; b: [..., r, out] (any storage dtype; cast to x's dtype in `linear`).
  key: PRNG key(s) for the dropout on the adapter's input ([..., 2] raw or [...] typed,
    one per layer), or None: no dropout (evaluation, or rate 0).
  scale: alpha / r (or alpha / sqrt(r) with rsLoRA). dropout: the rate, in [0, 1).
  """
  w: Any
  a: Any
  b: Any
  key: Any = None
  scale: float = _static(1.0)
  dropout: float = _static(0.0)

  @property
  def shape(self) -> tuple[int, ...]:
    """Shape of the base kernel [..., in, out] (what the leaf stands in for)."""
    return tuple(self.w.shape)

  @property
  def ndim(self) -> int:
    return len(self.shape)

  def linear(self, x: jax.Array, *, bias: jax.Array | None = None) -> jax.Array:
    """x [..., in] -> [..., out]: (x @ w + bias) + scale * (dropout(x) @ a) @ b.

    The base matmul (and bias) is `layers.linear` on `w`, so a QArray base stays 4-bit.
    With a key and rate > 0, only the adapter's input goes through inverted dropout, as in
    PEFT: kept inputs are scaled by 1 / (1 - rate), so the expectation is unchanged.
    """
    a = self.a.astype(x.dtype)  # [in, r]
    b = self.b.astype(x.dtype)  # [r, out]
    xl = x
    if self.dropout > 0 and self.key is not None:
      keep = 1.0 - self.dropout
      xl = jnp.where(jax.random.bernoulli(self.key, keep, x.shape), x / keep,
                     jnp.zeros((), x.dtype))
    join = _joins(self.w, x)
    if join is not None:  # the whole projection in one custom VJP (dense 2-D base)
      y = lora_matmul(x, xl, a, self.w.astype(x.dtype), b,
                      Join(self.scale, *join, tied=xl is x))
      return y if bias is None else y + bias.astype(y.dtype)
    xa = jnp.einsum("...d,dr->...r", xl, a)  # [..., r]
    y = layers.linear(x, self.w, bias=bias)
    return y + (self.scale * jnp.einsum("...r,rf->...f", xa, b))

  @classmethod
  def concat_out(cls, kernels: list) -> "LoraKernel | None":
    """LoRA kernels side by side (`models.fused.concat_out`, the sampler's fused q|k|v and
    gate|up): the bases concatenated, the `a` factors concatenated [..., in, sum r] and the
    `b` factors, each times its own scale, on a block diagonal [..., sum r, sum out], so
    x @ a @ b gives each part's own update. None with dropout keys (training) or a base
    that cannot be joined (4-bit)."""
    from jaxtune.models import fused  # models never import peft; the reverse is fine
    if any(k.key is not None for k in kernels):
      return None
    w = fused.concat_out([k.w for k in kernels])
    if w is None:
      return None
    a = jnp.concatenate([k.a for k in kernels], axis=-1)
    dtype = kernels[0].b.dtype
    ranks = [k.b.shape[-2] for k in kernels]
    rows = []
    for i, k in enumerate(kernels):
      b = (k.b * k.scale).astype(dtype) if k.scale != 1.0 else k.b.astype(dtype)
      row = [b if j == i else jnp.zeros((*b.shape[:-2], ranks[i], o.b.shape[-1]), dtype)
             for j, o in enumerate(kernels)]
      rows.append(jnp.concatenate(row, axis=-1))
    return cls(w=w, a=a, b=jnp.concatenate(rows, axis=-2), key=None, scale=1.0)

  def ragged_linear(self, x: jax.Array, group_sizes: jax.Array,
                    impl: str = "ragged") -> jax.Array:
    """MoE experts: rows x [M, in] sorted by expert, w [E, in, out], a [E, in, r],
    b [E, r, out] -> [M, out]; each row gets its own expert's W + scale * a @ b (grouped
    matmuls, `models.moe.ragged_linear`). No dropout (as PEFT's expert LoRA)."""
    y = moe.ragged_linear(x, self.w, group_sizes, impl)
    xa = moe.ragged_linear(x, self.a.astype(x.dtype), group_sizes, impl)  # [M, r]
    return y + self.scale * moe.ragged_linear(xa, self.b.astype(x.dtype), group_sizes, impl)


jax.tree_util.register_dataclass(LoraKernel)


def _joins(w, x) -> tuple[bool, bool] | None:
  """(join the forward, join the backward's dx) for `lora_matmul`, or None: two products
  and an add both ways (the plain path). Only a dense 2-D base (a 4-bit QArray keeps its
  own matmul), and only the wide side of a non-square projection: the forward when the
  output is wider than the input (gate and up of a Llama MLP), dx when the input is wider
  (down, and k and v with grouped-query heads). A join saves an add over [rows, wide]
  (3 passes) and costs copies of the narrow side [rows, narrow] and of w (read + write
  each), so it needs enough rows: decode steps keep two products, where the copy of w
  would dominate. On an H200 (docs/BENCHMARKS.md) a joined 2048 -> 8192 forward over 16k
  rows ran faster than two products and an add, a joined square one slower."""
  if not (isinstance(w, jax.Array) and w.ndim == 2) or w.shape[0] == w.shape[1]:
    return None
  rows = math.prod(x.shape[:-1])
  narrow, wide = sorted(w.shape)
  if 3 * rows * wide <= 2 * rows * narrow + 2 * narrow * wide:
    return None
  return w.shape[1] > w.shape[0], w.shape[0] > w.shape[1]


class Join(NamedTuple):
  """`lora_matmul`'s static settings: the adapter scale, which side is one GEMM, and
  `tied`: the adapter reads x itself (no dropout), so dx may take the adapter's term."""
  scale: float
  forward: bool
  backward: bool
  tied: bool


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def lora_matmul(x: jax.Array, xl: jax.Array, a: jax.Array, w: jax.Array, b: jax.Array,
                how: Join) -> jax.Array:
  """x [..., in] @ w [in, out] + scale * (xl [..., in] @ a [in, r]) @ b [r, out], a LoRA
  projection (xl: the adapter's input, x itself or x after dropout).

  Left to autodiff as two products and an add, XLA writes the adapter's [..., out] product
  to memory and adds it in a separate pass (it does not accumulate it into the base GEMM),
  and the backward does the same for dx over [..., in]. Here the wide side is one GEMM,
  joined along the contraction:
  - forward (out > in): [x, u] @ [w; b], u = scale * xl @ a: a copy of x and of w instead
    of the add, and the adapter's [..., out] product is never kept for the backward;
  - dx (in > out, tied): [dy, g] @ [w, a]^T, g = scale * dy @ b^T.
  da, db (and dw only when w is differentiated: a frozen LoRA base is not) are their own
  products. (dy @ [w; b]^T, joining the forward's dx and du instead, measured no better.)
  """
  return _forward(x, xl, a, w, b, how)[0]


def _forward(x, xl, a, w, b, how):
  u = how.scale * jnp.einsum("...d,dr->...r", xl, a)
  if how.forward:
    return jnp.einsum("...k,kn->...n", jnp.concatenate([x, u], axis=-1),
                      jnp.concatenate([w, b], axis=0)), u
  return jnp.einsum("...d,df->...f", x, w) + jnp.einsum("...r,rf->...f", u, b), u


def _lora_fwd(x, xl, a, w, b, how):
  need_w = w.perturbed
  x, xl, a, w, b = x.value, xl.value, a.value, w.value, b.value
  y, u = _forward(x, xl, a, w, b, how)
  return y, (x, None if how.tied else xl, u, a, w, b, jnp.zeros(()) if need_w else None)


def _lora_bwd(how, res, dy):
  x, xl, u, a, w, b, marker = res
  if isinstance(dy, jax.custom_derivatives.SymbolicZero):
    return None, None, None, None, None
  lead = "abcdefgh"[:x.ndim - 1]
  outer = lambda p, q: jnp.einsum(f"{lead}k,{lead}n->kn", p, q,
                                  preferred_element_type=jnp.float32)  # p^T @ q
  g = how.scale * jnp.einsum("...n,rn->...r", dy, b)  # d(xl @ a)
  db = outer(u, dy).astype(b.dtype)
  da = outer(x if how.tied else xl, g).astype(a.dtype)
  dw = outer(x, dy).astype(w.dtype) if marker is not None else None
  if how.tied and how.backward:
    dx = jnp.einsum("...n,kn->...k", jnp.concatenate([dy, g], axis=-1),
                    jnp.concatenate([w, a], axis=-1))
    return dx, None, da, dw, db
  dx = jnp.einsum("...n,kn->...k", dy, w)
  dxl = jnp.einsum("...r,kr->...k", g, a)
  return (dx + dxl, None, da, dw, db) if how.tied else (dx, dxl, da, dw, db)


lora_matmul.defvjp(_lora_fwd, _lora_bwd, symbolic_zeros=True)


def is_lora_kernel(x: Any) -> bool:
  """`is_leaf` helper: True for LoraKernel nodes, so tree maps can stop at them."""
  return isinstance(x, LoraKernel)
