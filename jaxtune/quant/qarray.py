"""`QArray`: the 4-bit weight leaf that stands in for a linear kernel in a params tree.

QLoRA keeps the frozen base weights in 4 bits. In jaxtune a quantized kernel is still one
leaf of the plain params dict, so everything that walks trees (jit, `lax.scan` over the
stacked layer axis, shardings, orbax) keeps working. `QArray` is a frozen dataclass
registered as a JAX pytree whose children all keep the kernel's leading axes:

    kernel  [L, D, F] float          (x @ kernel, D = input rows)
    packed  [L, D/2, F] uint8        two 4-bit codes per byte: input rows 2i (low nibble)
                                     and 2i+1 (high nibble)
    scales  [L, D/g, F]              absmax of each group of g consecutive input rows:
                                     bfloat16/float32, or uint8 under double quantization
    scales2 [L, D/g, ceil(F/256)]    double quantization only: float32 step of each block
                                     of 256 consecutive first-level scales along F;
                                     None otherwise

Static (aux) data: method ('nf4' | 'int4'), group_size, dtype (of the dequantized
weight) and double_quant. Scanning over the leading axis slices every child
[L, ...] -> [...] alike, and the tree path of a child names it:

    >>> q = quant.quantize_array(np.zeros((2, 128, 32), np.float32))
    >>> q
    QArray(nf4, shape=(2, 128, 32), group_size=64, dtype=float32, double_quant=False)
    >>> [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(q)]
    ['.packed', '.scales']

Sharding: packing pairs *adjacent* input rows and groups are consecutive input rows, so a
shard of the kernel's input axis is exactly a shard of `packed` and `scales` along the
same axis. Every child therefore takes the base kernel's logical-axis tuple (`axes_for`,
`tree_axes`); only the tiny `scales2` leaves its last (block) axis unsharded. The rules
that turn logical names into mesh axes must still check divisibility: `scales` has D/g
rows (e.g. 64 for D=4096, g=64), fewer than the kernel.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence

import jax
import numpy as np

METHODS = ("nf4", "int4")


@dataclasses.dataclass(frozen=True)
class QArray:
  """A 4-bit quantized kernel [..., in, out]; see the module docstring for the layout.

  Children may also be tracers, `jax.ShapeDtypeStruct`s, shardings or axis tuples (pytree
  maps build such QArray-shaped nodes), so the constructor does not validate them;
  `quantize_array` is the way to build a real one.
  """
  packed: Any  # uint8 [..., in/2, out]
  scales: Any  # bf16/f32 [..., in/g, out], or uint8 [..., in/g, out] with double_quant
  scales2: Any = None  # f32 [..., in/g, ceil(out/256)] with double_quant, else None
  method: str = dataclasses.field(default="nf4", metadata=dict(static=True))
  group_size: int = dataclasses.field(default=64, metadata=dict(static=True))
  dtype: np.dtype = dataclasses.field(
      default=np.dtype(np.float32), metadata=dict(static=True))
  double_quant: bool = dataclasses.field(default=False, metadata=dict(static=True))

  @property
  def shape(self) -> tuple[int, ...]:
    """Shape of the dequantized kernel: packed [..., in/2, out] -> [..., in, out]."""
    *lead, half_in, out = self.packed.shape
    return (*lead, 2 * half_in, out)

  @property
  def ndim(self) -> int:
    return len(self.packed.shape)

  @property
  def size(self) -> int:
    """Number of parameters the QArray stands for."""
    return math.prod(self.shape)

  @property
  def nbytes(self) -> int:
    """Bytes held by the children (packed codes + all scales)."""
    total = 0
    for child in (self.packed, self.scales, self.scales2):
      if child is not None:
        total += math.prod(child.shape) * np.dtype(child.dtype).itemsize
    return total

  def __repr__(self) -> str:
    try:
      shape = self.shape
    except (AttributeError, TypeError, ValueError):
      # A QArray-shaped node holding axes or shardings rather than arrays.
      return (f"QArray(packed={self.packed!r}, scales={self.scales!r}, "
              f"scales2={self.scales2!r}, method={self.method!r})")
    return (f"QArray({self.method}, shape={shape}, group_size={self.group_size}, "
            f"dtype={np.dtype(self.dtype).name}, double_quant={self.double_quant})")


jax.tree_util.register_dataclass(QArray)


def is_qarray(x: Any) -> bool:
  """`is_leaf` helper: True for QArray nodes, so tree maps can stop at them."""
  return isinstance(x, QArray)


def stack(qarrays: Sequence[QArray]) -> QArray:
  """Stacks per-layer QArrays [in, out] into one with a leading layer axis [L, in, out].

  Children stay numpy when they are numpy (host-side loading), jax otherwise. All inputs
  must share method, group_size, dtype, double_quant and shape.
  """
  qarrays = list(qarrays)
  if not qarrays:
    raise ValueError("stack() needs at least one QArray")
  first = qarrays[0]
  for i, q in enumerate(qarrays):
    if not isinstance(q, QArray):
      raise TypeError(f"stack(): item {i} is a {type(q).__name__}, not a QArray")
    got = (q.method, q.group_size, np.dtype(q.dtype), q.double_quant, q.shape)
    want = (first.method, first.group_size, np.dtype(first.dtype), first.double_quant,
            first.shape)
    if got != want:
      raise ValueError(
          f"stack(): item {i} has (method, group_size, dtype, double_quant, shape)="
          f"{got}, item 0 has {want}")

  def _stack(*xs):
    if all(isinstance(x, np.ndarray) for x in xs):
      return np.stack(xs)
    return jax.numpy.stack(xs)

  return jax.tree.map(_stack, *qarrays)


def axes_for(q: QArray, axes: tuple[Any, ...]) -> QArray:
  """A QArray-shaped node holding the logical-axis tuple of each child.

  `axes` is the base kernel's tuple, e.g. ('layers', 'embed', 'q_heads'). `packed` and
  `scales` have the kernel's rank, so they take it unchanged; `scales2` keeps all but its
  last (block) axis, which stays unsharded (None).

      axes_for(q, ('layers', 'embed', 'mlp'))
      -> QArray(packed=('layers', 'embed', 'mlp'), scales=('layers', 'embed', 'mlp'),
                scales2=('layers', 'embed', None) or None, <q's static fields>)
  """
  axes = tuple(axes)
  if len(axes) != q.ndim:
    raise ValueError(
        f"axes {axes} have {len(axes)} names but the quantized kernel has shape "
        f"{q.shape} (rank {q.ndim})")
  scales2 = axes[:-1] + (None,) if q.scales2 is not None else None
  return dataclasses.replace(q, packed=axes, scales=axes, scales2=scales2)


def tree_axes(params: Any, axes: Any) -> Any:
  """Maps an axes tree of the unquantized params onto the structure of `params`.

  `params` may hold QArray leaves; `axes` has the unquantized structure with tuples of
  logical names as leaves. QArray positions get `axes_for(q, tuple)`; others keep their
  tuple. Shardings then follow by one tree map stopping at tuples:

      >>> qaxes = quant.tree_axes(qparams, decoder.axes(cfg))
      >>> shardings = jax.tree.map(lambda a: NamedSharding(mesh, spec_of(a)), qaxes,
      ...                          is_leaf=lambda a: isinstance(a, tuple))
  """
  def one(leaf, ax):
    return axes_for(leaf, ax) if isinstance(leaf, QArray) else ax

  return jax.tree.map(one, params, axes, is_leaf=is_qarray)
