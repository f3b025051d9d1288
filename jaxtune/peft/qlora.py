"""QLoRA: a 4-bit (NF4 / int4) frozen base, quantized on the host as it loads, plus LoRA.

QLoRA (Dettmers et al. 2023) keeps the frozen base projections in 4 bits and trains LoRA
adapters in higher precision on top. Its point is memory, so the full-precision model must
never sit on the accelerator: `load_quantized` hands `hf.io.load_hf` a `place` function
that quantizes each stacked projection kernel [L, in, out] with numpy on the host (one
param at a time) and only then puts the packed `quant.QArray` on the device:

    HF safetensors --(host, one stacked param)--> float [L, D, F]
                   --quant.quantize_array (numpy)--> QArray(packed uint8 [L, D/2, F],
                                                            scales bf16 [L, D/g, F])
                   --place--> device                 (0.53125 bytes/param at g=64)

Embeddings, norms, biases and lm_head stay in `dtype`. Then, as for LoRA:

    >>> cfg, qparams = qlora.load_quantized(hf_dir, method="nf4", group_size=64)
    >>> adapters = lora.init(cfg, qparams, rank=16, alpha=32, key=key)
    >>> logits = decoder.forward(cfg, qparams, tokens, lora=adapters)
    >>> ref = lora.reference_logits(cfg, qparams, tokens)   # adapters off: DPO/GRPO ref
    >>> merged = lora.merge(cfg, qparams, adapters)        # dense: dequantized + A @ B

The QArray leaves shard like their base kernels (`quant.tree_axes(qparams, decoder.axes(cfg))`);
`load_quantized(..., mesh=mesh)` places each one straight onto its shards.

`METHOD` is QLoRA's `base.PeftMethod` ("qlora" in `jaxtune.peft`): LoRA's init, apply,
merge and PEFT files over the 4-bit base, with `quantized_base=True` telling the weights
loader to come here (`load_from_config`) for the base.
"""

from __future__ import annotations

import re
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxtune import config as config_lib
from jaxtune import quant
from jaxtune import sharding
from jaxtune.hf import io
from jaxtune.models import decoder
from jaxtune.peft import lora

# The base kernels QLoRA quantizes: every attention and MLP projection and the MoE experts
# (fully matched); MoE routers (layers/mlp/gate/kernel) stay in full precision.
PROJECTIONS = r"layers/(self_attn|mlp|mlp/experts)/\w+_proj/kernel"

METHOD = lora.LoraMethod(name="qlora", quantized_base=True)


def _to_device(_: str, x: Any) -> Any:
  """Default placement: every array child (QArray children too) onto the default device."""
  return jax.tree.map(jnp.asarray, x)


def quantize_params(params: dict, *, method: str = "nf4", group_size: int = 64,
                    double_quant: bool = False, predicate: str = PROJECTIONS,
                    scale_dtype: Any = jnp.bfloat16) -> dict:
  """In-memory params -> the same tree with the projection kernels as QArrays.

  `predicate` fully matches the "a/b/c" paths to quantize; a selected kernel whose input
  dim is not divisible by group_size is an error naming its path and shape.
  """
  rx = re.compile(predicate)
  return quant.quantize(params, method=method, group_size=group_size,
                        double_quant=double_quant, scale_dtype=scale_dtype,
                        predicate=lambda path, _: rx.fullmatch(path) is not None)


def quantizing_place(*, method: str = "nf4", group_size: int = 64, double_quant: bool = False,
                     predicate: str = PROJECTIONS, scale_dtype: Any = jnp.bfloat16,
                     place: Callable[[str, Any], Any] | None = None):
  """A `place(path, host_array)` for `load_hf` that quantizes selected params on the host.

  `place` (default: to the default device) receives a QArray with numpy children for the
  selected kernels and the host array for the rest, e.g. to `jax.device_put` each with
  its NamedSharding (see `quant.axes_for`).
  """
  rx = re.compile(predicate)
  put = place or _to_device

  def place_fn(path: str, host: np.ndarray):
    if rx.fullmatch(path):
      if host.ndim < 2 or host.shape[-2] % group_size:
        raise ValueError(f"qlora: {path} has shape {tuple(host.shape)}; its input dim "
                         f"(axis -2) is not divisible by group_size={group_size}")
      host = quant.quantize_array(np.asarray(host), method, group_size,
                                  double_quant=double_quant, scale_dtype=scale_dtype)
    return put(path, host)

  return place_fn


def mesh_place(mesh: jax.sharding.Mesh, cfg: config_lib.ModelConfig):
  """A `place(path, leaf)` that puts each (possibly QArray) param on `mesh` per its logical
  axes (`decoder.axes`): `sharding.placer`."""
  return sharding.placer(mesh, decoder.axes(cfg))


def load_quantized(path_or_id: str, *, method: str = "nf4", group_size: int = 64,
                   double_quant: bool = False, dtype: Any = jnp.bfloat16,
                   place: Callable[[str, Any], Any] | None = None,
                   mesh: jax.sharding.Mesh | None = None, predicate: str = PROJECTIONS,
                   scale_dtype: Any = jnp.bfloat16,
                   base: config_lib.ModelConfig | None = None):
  """(ModelConfig, params) from an HF directory or hub id, projections quantized on load.

  dtype: dtype of the unquantized params and of what the QArrays dequantize to.
  place: final placement `place(path, leaf)`; see `quantizing_place`. Or `mesh`: each
  param goes straight to its shards on the mesh (`mesh_place`).
  """
  if mesh is not None:
    if place is not None:
      raise ValueError("load_quantized: pass place or mesh, not both")
    path_or_id = io.resolve(path_or_id)
    place = mesh_place(mesh, io.read_config(path_or_id, base))
  place_fn = quantizing_place(method=method, group_size=group_size,
                              double_quant=double_quant, predicate=predicate,
                              scale_dtype=scale_dtype, place=place)
  return io.load_hf(path_or_id, dtype, base=base, place=place_fn)


def load_from_config(path_or_id: str, peft_cfg: config_lib.PeftConfig, *,
                     dtype: Any = jnp.bfloat16, place: Callable[[str, Any], Any] | None = None,
                     mesh: jax.sharding.Mesh | None = None,
                     base: config_lib.ModelConfig | None = None):
  """`load_quantized` with method, group size and double quant from a `PeftConfig`."""
  return load_quantized(path_or_id, method=peft_cfg.quant_method,
                        group_size=peft_cfg.quant_group_size,
                        double_quant=peft_cfg.double_quant, dtype=dtype, place=place,
                        mesh=mesh, base=base)
