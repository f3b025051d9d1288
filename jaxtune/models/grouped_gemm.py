"""Grouped (ragged) matmuls on Hopper GPUs through the Mosaic GPU kernels JAX ships.

`jax.experimental.pallas.ops.gpu.ragged_dot_mgpu.ragged_dot` multiplies rows sorted by group
with their group's weight: a persistent kernel over the SMs whose tiles each belong to one
group, feeding wgmma from a TMA pipeline, reading every weight tile straight from the
[G, in, out] array. `transposed_ragged_dot_mgpu.transposed_ragged_dot` is the per-group
x^T dy of the weight gradient. Neither copies a weight per block of rows, which is what the
portable `moe.grouped_blocks` does (and what XLA's `ragged_dot` on GPU expands into), so the
MoE layer's expert matmuls run at GEMM speed (docs/BENCHMARKS.md).

`ragged_dot(x, w, group_sizes)` has a custom VJP: dx is the same kernel against the weight
read transposed, dw the transposed kernel, computed only when w is differentiated (a frozen
base under LoRA or QLoRA never pays for it). The kernels need a Hopper GPU (sm_90, wgmma),
equal bf16/fp16 dtypes and tile-divisible widths (`fits`); `moe.ragged_linear` sends
everything else to the blocked matmul. They are example kernels of jaxlib, outside JAX's
stable API: `available()` is the guard, and a run under a multi-device mesh keeps the blocked
matmul (these kernels are not partitioned by XLA).
"""

from __future__ import annotations

import functools
import inspect

import jax
import jax.numpy as jnp

# Tile and pipeline settings: the fastest of 16 on one H200 at Qwen3-30B-A3B's expert shapes
# for all three kernels (`launch/bench_moe_gemm.py`; docs/BENCHMARKS.md). block_k divides the
# contracted width, block_n (fwd, dx) and block_m / block_n (dw) the others (`fits`).
FWD = dict(block_m=64, block_n=256, block_k=64, max_concurrent_steps=4, grid_block_n=2)
DW = dict(block_m=64, block_n=256, block_k=64, max_concurrent_steps=4, grid_block_n=2)


@functools.lru_cache(maxsize=None)
def available() -> bool:
  """True when the process sees one device, a Hopper (sm_90) GPU, and its jax ships the
  kernels with the arguments used here."""
  if jax.default_backend() != "gpu" or jax.device_count() != 1:
    return False
  try:
    major = int(str(getattr(jax.devices()[0], "compute_capability", "0")).split(".")[0])
    from jax.experimental.pallas.ops.gpu import ragged_dot_mgpu
    from jax.experimental.pallas.ops.gpu import transposed_ragged_dot_mgpu
    need = set(FWD) | {"group_sizes", "transpose_rhs"}
    if not (need <= set(inspect.signature(ragged_dot_mgpu.ragged_dot).parameters) and
            set(DW) | {"group_sizes"} <= set(inspect.signature(
                transposed_ragged_dot_mgpu.transposed_ragged_dot).parameters)):
      return False
  except (ImportError, ValueError, AttributeError, TypeError):
    return False
  return major == 9


def fits(x: jax.Array, w: jax.Array) -> bool:
  """Whether x [M, in] @ w [G, in, out] and its gradients fit the kernels' tiling."""
  if x.dtype != w.dtype or x.dtype not in (jnp.bfloat16, jnp.float16) or w.ndim != 3:
    return False
  n_in, n_out = w.shape[1:]
  return (n_in % FWD["block_k"] == 0 and n_out % FWD["block_n"] == 0  # forward
          and n_out % FWD["block_k"] == 0 and n_in % FWD["block_n"] == 0  # dx
          and n_in % DW["block_m"] == 0 and n_out % DW["block_n"] == 0)  # dw


def _fwd_kernel(x, w, group_sizes, transpose_rhs=False, cfg=None):
  from jax.experimental.pallas.ops.gpu import ragged_dot_mgpu
  return ragged_dot_mgpu.ragged_dot(x, w, group_sizes=group_sizes, transpose_rhs=transpose_rhs,
                                    **(cfg or FWD))


def _dw_kernel(x, dy, group_sizes, cfg=None):
  from jax.experimental.pallas.ops.gpu import transposed_ragged_dot_mgpu
  return transposed_ragged_dot_mgpu.transposed_ragged_dot(x, dy, group_sizes=group_sizes,
                                                          **(cfg or DW))


@jax.custom_vjp
def ragged_dot(x: jax.Array, w: jax.Array, group_sizes: jax.Array) -> jax.Array:
  """x [M, in] sorted by group @ w [G, in, out] -> [M, out]; group g takes the next
  group_sizes[g] rows (sum(group_sizes) == M). As `jax.lax.ragged_dot`, float32 accumulation."""
  return _fwd_kernel(x, w, group_sizes.astype(jnp.int32))


def _ragged_dot_fwd(x, w, group_sizes):
  need_w = w.perturbed
  x, w, group_sizes = x.value, w.value, group_sizes.value.astype(jnp.int32)
  y = _fwd_kernel(x, w, group_sizes)
  return y, (x if need_w else None, w, group_sizes)  # w: the param itself, no copy


def _ragged_dot_bwd(res, dy):
  x, w, group_sizes = res
  if isinstance(dy, jax.custom_derivatives.SymbolicZero):
    return None, None, None
  dy = dy.astype(w.dtype)
  dx = _fwd_kernel(dy, w, group_sizes, transpose_rhs=True)  # dy [M, out] @ w[g]^T
  dw = None if x is None else _dw_kernel(x, dy, group_sizes).astype(w.dtype)
  return dx, dw, None


ragged_dot.defvjp(_ragged_dot_fwd, _ragged_dot_bwd, symbolic_zeros=True)
