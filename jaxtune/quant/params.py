"""Quantize and dequantize whole params trees: which leaves become QArrays, and back.

QLoRA quantizes the big linear kernels of the frozen base and nothing else. Selection is by
"a/b/c" path string, like every other tree operation in jaxtune. By default a leaf is
quantized when its path ends in "kernel", no path component is "lm_head", it is a float
array of rank >= 2 and its input dim (axis -2) is divisible by group_size; embeddings,
norms and biases are not named "kernel" and stay as they are:

    params = {"embed": {"embedding": [V, D]},
              "layers": {"self_attn": {"q_proj": {"kernel": [L, D, Hq*Dh]}, ...},
                         "input_norm": {"scale": [L, D]}},
              "lm_head": {"kernel": [D, V]}}
    quantize(params) ->
             {"embed": {"embedding": [V, D]},
              "layers": {"self_attn": {"q_proj": {"kernel": QArray [L, D, Hq*Dh]}, ...},
                         "input_norm": {"scale": [L, D]}},
              "lm_head": {"kernel": [D, V]}}

A regex `predicate` (re.search over the path) or a callable `(path, leaf) -> bool` picks
leaves instead; a leaf it picks that cannot be quantized is an error naming path and shape.
"""

from __future__ import annotations

import re
from typing import Any, Callable

import jax
import jax.numpy as jnp

from jaxtune import tree
from jaxtune.quant import nf4
from jaxtune.quant import qarray

Predicate = str | Callable[[str, Any], bool] | None


def _is_float_array(x: Any) -> bool:
  return (hasattr(x, "shape") and hasattr(x, "dtype")
          and jnp.issubdtype(x.dtype, jnp.floating))


def default_predicate(path: str, x: Any, group_size: int = 64) -> bool:
  """True for "…/kernel" float leaves of rank >= 2, not under lm_head, in % group == 0."""
  parts = path.split("/")
  return (parts[-1] == "kernel" and "lm_head" not in parts and _is_float_array(x)
          and len(x.shape) >= 2 and x.shape[-2] % group_size == 0)


def quantize(params: Any, *, method: str = "nf4", group_size: int = 64,
             double_quant: bool = False, predicate: Predicate = None,
             scale_dtype: Any = jnp.bfloat16, dtype: Any = None) -> Any:
  """Returns a new tree with the selected kernel leaves replaced by QArrays.

  Args:
    params: nested dicts (or any pytree) of arrays; existing QArrays pass through.
    method, group_size, double_quant, scale_dtype, dtype: see `nf4.quantize_array`.
    predicate: None for `default_predicate`, a regex searched in the "a/b/c" path, or a
      callable (path, leaf) -> bool.
  """
  def one(path, x):
    if isinstance(x, qarray.QArray):
      return x
    p = tree.path_str(path)
    if predicate is None:
      chosen = default_predicate(p, x, group_size)
    elif isinstance(predicate, str):
      chosen = re.search(predicate, p) is not None
    else:
      chosen = bool(predicate(p, x))
    if not chosen:
      return x
    shape = getattr(x, "shape", None)
    if not _is_float_array(x) or len(shape) < 2 or shape[-2] % group_size:
      raise ValueError(
          f"quantize: predicate selected {p!r} (shape {shape}, dtype "
          f"{getattr(x, 'dtype', type(x).__name__)}), which is not a float kernel "
          f"[..., in, out] with in divisible by group_size={group_size}")
    return nf4.quantize_array(x, method, group_size, double_quant=double_quant,
                              scale_dtype=scale_dtype, dtype=dtype)

  return jax.tree_util.tree_map_with_path(one, params, is_leaf=qarray.is_qarray)


def dequantize_tree(tree: Any) -> Any:
  """Replaces every QArray in `tree` with its dequantized array; other leaves unchanged."""
  return jax.tree.map(
      lambda x: nf4.dequantize(x) if isinstance(x, qarray.QArray) else x,
      tree, is_leaf=qarray.is_qarray)


def num_bytes(tree: Any) -> tuple[int, int]:
  """(bytes, parameters) summed over the QArray leaves of `tree`."""
  qs = [x for x in jax.tree.leaves(tree, is_leaf=qarray.is_qarray)
        if isinstance(x, qarray.QArray)]
  return sum(q.nbytes for q in qs), sum(q.size for q in qs)
