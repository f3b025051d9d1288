"""The one logical-axis rules table, the device mesh, and shardings for trees and batches.

Params and activations name their axes logically ('embed', 'mlp', 'batch', ...); RULES maps
each name to a mesh axis of the ('data', 'fsdp', 'tensor', 'expert') mesh, a tuple of them
(a dim keeps the longest prefix that divides it), or None (replicated). A dimension that a
mesh axis does not divide stays replicated rather than failing, and a mesh axis the mesh
lacks (a hand-built 3-axis mesh) is skipped. The 'expert' axis splits MoE experts (expert
parallelism, on top of FSDP over 'embed') and, like 'data' and 'fsdp', the batch rows.

    >>> mesh = make_mesh(MeshConfig(fsdp=4, tensor=2))       # 8 devices
    >>> spec(("layers", "embed", "mlp"), (2, 64, 128), mesh)
    PartitionSpec(None, 'fsdp', 'tensor')
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxtune import config as config_lib
from jaxtune import quant
from jaxtune import tree

MESH_AXES = ("data", "fsdp", "tensor")
EXPERT_AXIS = "expert"  # make_mesh's fourth axis (size 1 unless mesh.expert > 1)

# logical name -> mesh axis (or tuple of axes, or None). The whole table.
RULES: dict[str, Any] = {
    "batch": ("data", "fsdp", "expert"),
    "seq": None,
    "layers": None,
    "embed": "fsdp",
    "vocab": "tensor",
    # A kernel's heads / MLP width: 'tensor', then 'fsdp' when the kernel's earlier 'embed'
    # dim did not take it (o_proj [L, Q, D], down_proj [L, F, D]). FSDP thus always splits a
    # kernel's leading (row) dim, so its all-gather joins whole rows: split on the last dim
    # (D), XLA first copied the whole stacked weight into a gather-friendly layout, a
    # loop-invariant 2.25 GiB per GPU for Llama-3-8B's o_proj + down_proj at fsdp=2.
    "q_heads": ("tensor", "fsdp"),
    "kv_heads": ("tensor", "fsdp"),
    "mlp": ("tensor", "fsdp"),
    "head_dim": None,
    "expert": "expert",  # MoE experts [.., E, ..] (models/moe.py)
    "expert_mlp": ("tensor", "fsdp"),  # an expert's MLP width
    "norm": None,
    "rank": None,
    "act_embed": None,
    "act_heads": "tensor",
    "act_kv_heads": "tensor",  # a KV cache's / decode kernel's kv heads
    "act_mlp": "tensor",
    "act_vocab": "tensor",
}


def mesh_shape(mesh_cfg: config_lib.MeshConfig, num_devices: int) -> tuple[int, ...]:
  """(data, fsdp, tensor, expert): resolves the one -1 axis; errors name the axis and the
  device count."""
  dims = [mesh_cfg.data, mesh_cfg.fsdp, mesh_cfg.tensor, mesh_cfg.expert]
  if sum(d == -1 for d in dims) > 1:
    raise config_lib.ConfigError(f"mesh: at most one axis may be -1, got {dims}")
  known = int(np.prod([d for d in dims if d != -1]))
  if -1 in dims:
    if num_devices % known:
      raise config_lib.ConfigError(
          f"mesh: {num_devices} devices not divisible by data*fsdp*tensor*expert={known}")
    dims[dims.index(-1)] = num_devices // known
  if int(np.prod(dims)) != num_devices:
    raise config_lib.ConfigError(
        f"mesh: data*fsdp*tensor*expert={dims} = {int(np.prod(dims))} but {num_devices} "
        "devices")
  return tuple(dims)


def make_mesh(mesh_cfg: config_lib.MeshConfig, devices=None) -> Mesh:
  """A ('data', 'fsdp', 'tensor', 'expert') mesh over all (or the given) devices."""
  devices = jax.devices() if devices is None else devices
  shape = mesh_shape(mesh_cfg, len(devices))
  return Mesh(np.asarray(devices).reshape(shape), MESH_AXES + (EXPERT_AXIS,))


def axis_size(mesh: Mesh, axes) -> int:
  """Devices along mesh axis `axes` (a name) or axes (a tuple of names, as in a
  PartitionSpec entry)."""
  return int(np.prod([mesh.shape[a] for a in ((axes,) if isinstance(axes, str) else axes)]))


def spec(axes: tuple, shape: tuple[int, ...], mesh: Mesh) -> PartitionSpec:
  """PartitionSpec for logical `axes` of an array of `shape`. A mesh axis splits at most one
  dim (the first whose name takes it); a dim mapped to several axes keeps the longest prefix
  of them that divides it, and none if none does."""
  if len(axes) != len(shape):
    raise ValueError(f"logical axes {axes} do not match shape {shape}")
  used = set()
  out = []
  for name, dim in zip(axes, shape):
    target = RULES.get(name) if name is not None else None
    if name is not None and name not in RULES:
      raise ValueError(f"logical axis {name!r} is not in sharding.RULES")
    targets = (target,) if isinstance(target, str) else (target or ())
    kept = tuple(t for t in targets
                 if t not in used and mesh.shape.get(t, 1) > 1)
    while kept and dim % axis_size(mesh, kept):
      kept = kept[:-1]
    if not kept:
      out.append(None)
      continue
    used.update(kept)
    out.append(kept[0] if len(kept) == 1 else kept)
  return PartitionSpec(*out)


def tree_shardings(mesh: Mesh, axes_tree, shapes_tree):
  """NamedSharding for each leaf; `axes_tree` leaves are tuples of logical names."""
  return jax.tree_util.tree_map(
      lambda ax, x: NamedSharding(mesh, spec(ax, tuple(x.shape), mesh)),
      axes_tree, shapes_tree, is_leaf=lambda n: isinstance(n, tuple))


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
  """Batch arrays [B, ...]: the leading axis over RULES['batch'] (data x fsdp x expert, as
  the mesh has them), the rest replicated."""
  rows = tuple(a for a in RULES["batch"] if a in mesh.shape)
  return NamedSharding(mesh, PartitionSpec(rows, *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def constrainer(mesh: Mesh | None):
  """fn(x, logical_axes) -> x with a sharding constraint on `mesh` (identity if None)."""
  if mesh is None:
    return lambda x, axes: x

  def constrain(x, axes):
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec(axes, x.shape, mesh)))

  constrain.mesh = mesh  # the model hands it to its custom kernels (attention.shard_kernel)
  return constrain


def placer(mesh: Mesh, axes_tree):
  """place(path, host_leaf) -> the leaf as global arrays sharded per its logical axes.

  For `hf.io.load_hf(..., place=)`: each param goes straight to its shards (multi-host
  safe: every process builds only its addressable shards). A `quant.QArray` leaf places
  each child with the kernel's axes (`quant.axes_for`).
  """
  flat_axes = tree.flatten(axes_tree)

  def place(path: str, x):
    ax = flat_axes[path]
    if isinstance(x, quant.QArray):
      ax = quant.axes_for(x, ax)
    return jax.tree_util.tree_map(
        lambda a, sh: jax.make_array_from_callback(a.shape, sh, lambda idx: np.asarray(a)[idx]),
        x, tree_shardings(mesh, ax, x))

  return place
