"""From a TrainConfig to a ready job: mesh, tokenizer, data, weights (+ LoRA/QLoRA), steps.

`prepare(cfg)` is what `launch/train.py` runs before the loop. The training method
(`cfg.method`) picks the data kind, the objective and the extra frozen trees; PEFT
(`cfg.peft.method`) picks what is trainable:

    none   trainable = params                         frozen = {}
    lora   trainable = adapters (A, B per projection)  frozen = {"base": params}
    qlora  as lora, with the base projections as 4-bit QArrays (quantised on load)

Objectives other than SFT register in METHODS (see `Method`).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxtune import config as config_lib
from jaxtune import convert
from jaxtune import data as data_lib
from jaxtune import sharding
from jaxtune.hf import io as hf_io
from jaxtune.models import decoder
from jaxtune.peft import lora
from jaxtune.peft import qlora
from jaxtune.train import objectives
from jaxtune.train import setup


@dataclasses.dataclass
class Job:
  cfg: config_lib.TrainConfig
  run: setup.Run
  data: Any  # data_lib.Datasets
  tokenizer: Any
  export: Callable  # export(state, out_dir, meta) -> out_dir


@dataclasses.dataclass(frozen=True)
class Method:
  """How a training method plugs in.

  data_kind: what the data pipeline yields ('sft' | 'preference' | 'prompt').
  objective(ctx) -> objective fn (see objectives.py); ctx is a `Context`.
  frozen(ctx) -> dict of extra frozen trees (reference model, teacher) or {}.
  export(ctx, state, out_dir, meta) -> out_dir, or None for the default model export.
  extra_trainable(ctx) -> ({name: tree}, {name: logical-axes tree}): method-owned leaves
    trained next to the params (full FT) or the adapter tree (LoRA), e.g. the reward
    head {"score": {"kernel": [D, 1]}}, already placed on ctx.mesh; or None.
  """
  data_kind: str
  objective: Callable
  frozen: Callable = lambda ctx: {}
  export: Callable | None = None
  extra_trainable: Callable | None = None


@dataclasses.dataclass
class Context:
  cfg: config_lib.TrainConfig
  model_cfg: config_lib.ModelConfig
  mesh: Any
  params: Any
  adapters: Any  # lora.Adapters or None
  tokenizer: Any
  data: Any


def _sft_objective(ctx: Context):
  return objectives.sft(ctx.model_cfg, lora_scale=None if ctx.adapters is None
                        else ctx.adapters.scale, constrain=sharding.constrainer(ctx.mesh),
                        num_sources=len(ctx.data.source_names),
                        lora_dropout=0.0 if ctx.adapters is None else ctx.adapters.dropout)


METHODS: dict[str, Method] = {"sft": Method(data_kind="sft", objective=_sft_objective)}


def _register_extra_methods() -> None:
  """Preference and distillation methods live in their own modules; import them if present."""
  try:
    from jaxtune.train import preference  # noqa: F401  (registers dpo / reward / distill)
  except ImportError:
    pass


def load_weights(cfg: config_lib.TrainConfig, mesh, tokenizer):
  """(model_cfg, params) for the run: HF weights (4-bit for QLoRA) or a random init."""
  if cfg.peft.method == "qlora" and cfg.model.hf_path:
    dtype = jnp.dtype(cfg.model.param_dtype)
    return qlora.load_from_config(cfg.model.hf_path, cfg.peft, dtype=dtype, mesh=mesh,
                                  base=cfg.model)
  if cfg.model.hf_path and convert.is_checkpoint(cfg.model.hf_path):
    model_cfg, params = convert.load_params(cfg.model.hf_path)
    model_cfg = _compute_opts(model_cfg, cfg.model)
    dtype = decoder.DTYPES[model_cfg.param_dtype]
    params = jax.tree_util.tree_map(lambda x: np.asarray(x).astype(dtype), params)
    params = jax.device_put(params, sharding.tree_shardings(mesh, decoder.axes(model_cfg), params))
    if cfg.peft.method == "qlora":
      params = qlora.quantize_params(params, method=cfg.peft.quant_method,
                                     group_size=cfg.peft.quant_group_size,
                                     double_quant=cfg.peft.double_quant)
    return model_cfg, params
  vocab = None if cfg.model.hf_path else max(cfg.model.vocab_size, len(tokenizer))
  if not cfg.model.hf_path:
    ids = dict(bos_token_id=_id(tokenizer.bos_token_id), pad_token_id=_id(tokenizer.pad_token_id),
               eos_token_id=() if tokenizer.eos_token_id is None else (tokenizer.eos_token_id,))
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, **ids))
  model_cfg, params = setup.load_model(cfg, mesh, vocab_size=vocab)
  if cfg.peft.method == "qlora":
    params = qlora.quantize_params(params, method=cfg.peft.quant_method,
                                   group_size=cfg.peft.quant_group_size,
                                   double_quant=cfg.peft.double_quant)
  return model_cfg, params


def _compute_opts(model_cfg, base):
  """model_cfg's architecture with the compute options (dtype, remat, ...) of `base`."""
  keep = ("hf_path", "dtype", "param_dtype", "remat", "attention", "scan_layers", "logits_chunk")
  return dataclasses.replace(model_cfg, **{k: getattr(base, k) for k in keep})


def _id(x) -> int:
  return -1 if x is None else int(x)


def prepare(cfg: config_lib.TrainConfig, *, mesh=None) -> Job:
  _register_extra_methods()
  if cfg.method not in METHODS:
    raise config_lib.ConfigError(f"bad value for method: {cfg.method!r} (available: "
                                 f"{', '.join(sorted(METHODS))})")
  method = METHODS[cfg.method]
  if cfg.peft.dropout and (cfg.method != "sft" or cfg.peft.method == "none"):
    raise config_lib.ConfigError(f"bad value for peft.dropout: {cfg.peft.dropout} (LoRA dropout "
                                 "applies to method=sft with peft.method=lora|qlora only)")
  mesh = mesh or sharding.make_mesh(cfg.mesh)
  tokenizer = data_lib.tokenizer_from_config(cfg)
  data = data_lib.build(cfg.data, tokenizer, kind=method.data_kind,
                        process_index=jax.process_index(), process_count=jax.process_count())
  model_cfg, params = load_weights(cfg, mesh, tokenizer)
  adapters = adapter_axes = None
  if cfg.peft.method != "none":
    adapters = lora.init_from_config(model_cfg, params, cfg.peft,
                                     key=jax.random.PRNGKey(cfg.train.seed + 2))
    adapter_axes = lora.axes(model_cfg, adapters).params
  ctx = Context(cfg=cfg, model_cfg=model_cfg, mesh=mesh, params=params, adapters=adapters,
                tokenizer=tokenizer, data=data)
  if method.extra_trainable is not None:
    extra, extra_axes = method.extra_trainable(ctx)
    if adapters is None:
      params = {**params, **extra}
    else:
      adapters = dataclasses.replace(adapters, params={**adapters.params, **extra})
      adapter_axes = {**adapter_axes, **extra_axes}
    ctx = dataclasses.replace(ctx, params=params, adapters=adapters)
  run = setup.build(cfg, mesh, params, model_cfg, objective=method.objective(ctx),
                    adapters=adapters, adapter_axes=adapter_axes, extra_frozen=method.frozen(ctx))

  def export(state, out_dir, meta):
    if method.export is not None:
      return method.export(ctx, state, out_dir, meta)
    return export_model(ctx, state, out_dir, meta)

  return Job(cfg=cfg, run=run, data=data, tokenizer=tokenizer, export=export)


def export_model(ctx: Context, state, out_dir: str, meta: dict, *,
                 write_adapter: bool = True) -> str:
  """HF export: the full model (LoRA merged into it) to out_dir; adapters to out_dir_adapter."""
  metadata = {"data_fingerprint": meta.get("data_fingerprint", ""),
              "jaxtune_method": ctx.cfg.method, "jaxtune_peft": ctx.cfg.peft.method}
  params = state.trainable
  if ctx.adapters is not None:
    adapters = dataclasses.replace(ctx.adapters, params=state.trainable)
    if write_adapter:
        lora.save_peft(ctx.model_cfg, adapters, out_dir.rstrip("/") + "_adapter",
                     base_model_name_or_path=ctx.cfg.model.hf_path)
    params = lora.merge(ctx.model_cfg, ctx.params, adapters)
  hf_io.save_hf(ctx.model_cfg, params, out_dir, tokenizer=ctx.tokenizer, metadata=metadata,
                dtype=ctx.model_cfg.param_dtype)
  return os.path.abspath(out_dir)
