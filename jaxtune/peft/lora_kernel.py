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
import math
from typing import Any

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
    xa = jnp.einsum("...d,dr->...r", xl, a)  # [..., r]
    if _joins(self.w, x):
      y = joined_matmul(x, self.scale * xa, self.w.astype(x.dtype), b)
      return y if bias is None else y + bias.astype(y.dtype)
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


def _joins(w, x) -> bool:
  """Whether the projection takes `joined_matmul`: a dense 2-D base (a 4-bit QArray keeps
  its own matmul) whose output is wider than its input (gate and up of a Llama MLP), with
  enough rows that the add it saves (3 passes over [rows, out]) outweighs the copies it
  makes (x once, [rows, in], and w + b once, [in, out]), both counted read + write. Decode
  steps (a few rows) keep two products: there the copy of w would dominate. On an H200
  (docs/BENCHMARKS.md) a joined 2048 -> 8192 projection over 16k rows ran faster than two
  products and an add, a joined square one slower."""
  if not (isinstance(w, jax.Array) and w.ndim == 2 and w.shape[1] > w.shape[0]):
    return False
  rows = math.prod(x.shape[:-1])
  k, n = w.shape
  return 3 * rows * n > 2 * rows * k + 2 * k * n


@jax.custom_vjp
def joined_matmul(x: jax.Array, u: jax.Array, w: jax.Array, b: jax.Array) -> jax.Array:
  """x [..., in] @ w [in, out] + u [..., r] @ b [r, out], the forward as ONE matmul:
  [x, u] @ [w; b].

  A LoRA projection with u = scale * x @ a. Left as two products and an add, XLA writes the
  adapter product [..., out] to memory and adds it in a separate pass (it does not
  accumulate it into the base GEMM); joined along the contraction, the adapter costs a copy
  of x and of w instead (in << out for gate/up), and the adapter product is not kept for
  the backward. The backward stays three products (dx = dy @ w^T, du = dy @ b^T,
  db = u^T @ dy; joined as dy @ [w; b]^T it measured no better end to end). dw is formed
  only when w is differentiated (a frozen LoRA base is not).
  """
  return jnp.einsum("...k,kn->...n", jnp.concatenate([x, u], axis=-1),
                    jnp.concatenate([w, b], axis=0))


def _joined_fwd(x, u, w, b):
  need_w = w.perturbed
  x, u, w, b = x.value, u.value, w.value, b.value
  return joined_matmul(x, u, w, b), (x, u, w, b, jnp.zeros(()) if need_w else None)


def _joined_bwd(res, dy):
  x, u, w, b, marker = res
  if isinstance(dy, jax.custom_derivatives.SymbolicZero):
    return None, None, None, None
  lead = "abcdefgh"[:x.ndim - 1]
  outer = lambda p, q: jnp.einsum(f"{lead}k,{lead}n->kn", p, q,
                                  preferred_element_type=jnp.float32)  # p^T @ q
  dx = jnp.einsum("...n,kn->...k", dy, w)
  du = jnp.einsum("...n,rn->...r", dy, b)
  dw = outer(x, dy).astype(w.dtype) if marker is not None else None
  return dx, du, dw, outer(u, dy).astype(b.dtype)


joined_matmul.defvjp(_joined_fwd, _joined_bwd, symbolic_zeros=True)


def is_lora_kernel(x: Any) -> bool:
  """`is_leaf` helper: True for LoraKernel nodes, so tree maps can stop at them."""
  return isinstance(x, LoraKernel)
