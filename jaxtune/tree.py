"""Path utilities over nested-dict param trees: params paths are a public contract.

A param is named by its '/'-joined dict keys, and every tree operation (LoRA targeting,
quantisation, weight decay masks, HF key tables) selects params by regex over those paths:

    >>> tree = {"layers": {"mlp": {"up_proj": {"kernel": x}}}, "norm": {"scale": s}}
    >>> flatten(tree)
    {"layers/mlp/up_proj/kernel": x, "norm/scale": s}
    >>> unflatten({"norm/scale": s})
    {"norm": {"scale": s}}
    >>> select(tree, r".*kernel")
    {"layers/mlp/up_proj/kernel": x}
"""

from __future__ import annotations

import re
from typing import Any, Callable

import jax


def path_str(keypath) -> str:
  """'a/b/c' for a jax key path of dict keys (and attribute names for dataclass nodes)."""
  parts = []
  for k in keypath:
    for attr in ("key", "name", "idx"):
      if hasattr(k, attr):
        parts.append(str(getattr(k, attr)))
        break
  return "/".join(parts)


def flatten(tree: dict) -> dict[str, Any]:
  """{'a/b': leaf} for every non-dict node of a nested dict (QArray leaves stay whole)."""
  out = {}

  def rec(node, prefix):
    if isinstance(node, dict):
      for k, v in node.items():
        rec(v, f"{prefix}/{k}" if prefix else str(k))
    else:
      out[prefix] = node

  rec(tree, "")
  return out


def unflatten(flat: dict[str, Any]) -> dict:
  """Inverse of flatten."""
  out: dict = {}
  for path, leaf in flat.items():
    node = out
    *heads, last = path.split("/")
    for h in heads:
      node = node.setdefault(h, {})
    node[last] = leaf
  return out


def select(tree: dict, pattern: str) -> dict[str, Any]:
  """The flat {path: leaf} entries whose path fully matches `pattern`."""
  rx = re.compile(pattern)
  return {p: v for p, v in flatten(tree).items() if rx.fullmatch(p)}


def map_with_path(fn: Callable[[str, Any], Any], tree: dict) -> dict:
  """Applies fn(path, leaf) to every leaf of a nested dict (QArray leaves stay whole)."""
  return unflatten({p: fn(p, v) for p, v in flatten(tree).items()})


def count(tree) -> int:
  """Number of array elements in a tree."""
  return sum(int(x.size) for x in jax.tree_util.tree_leaves(tree) if hasattr(x, "size"))
