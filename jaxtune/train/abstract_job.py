"""The abstract job: a run's train-step inputs as `jax.ShapeDtypeStruct`s with the run's
shardings, built without weights or data, and the jitted step that takes them.

    job = abstract_job.build(cfg)         # state, frozen trees, batch, objective, optimizer
    abstract_job.device_bytes(job.state)  # one device's bytes of a tree

Params come from `decoder.init`'s shapes (4-bit leaves from quantising those shapes),
adapters from the PEFT method's `init` traced with `jax.eval_shape`, the method's frozen
trees from tracing `Method.frozen`, the batch from the loader's own assembly of padding rows.
`train/memory.py` compiles the step on these to plan memory.
"""

from __future__ import annotations

import dataclasses
import functools
import types
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxtune import config as config_lib
from jaxtune import data as data_lib
from jaxtune import methods
from jaxtune import peft
from jaxtune import quant
from jaxtune import sharding
from jaxtune import weights
from jaxtune.data import packing
from jaxtune.models import decoder
from jaxtune.peft import qlora
from jaxtune.train import optim
from jaxtune.train import plan as plan_lib
from jaxtune.train import setup
from jaxtune.train import state as state_lib

PLANNED_METHODS = ("sft", "dpo", "reward")

@dataclasses.dataclass
class Abstract:
  """A run's train-step inputs as ShapeDtypeStructs with shardings, and what jits it."""
  cfg: config_lib.TrainConfig
  model_cfg: config_lib.ModelConfig
  mesh: Any
  state: state_lib.TrainState
  frozen: dict
  batch: dict
  objective: Any
  optimizer: Any
  schedule: Any
  state_sh: Any
  frozen_sh: Any
  tokenizer: Any  # the one build loaded (another build of the same run can reuse it)


def _sds(x, sh):
  return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh)


def _abstract_of(tree):
  """Concrete arrays -> ShapeDtypeStructs with their shardings (abstract leaves kept)."""
  return jax.tree_util.tree_map(lambda x: _sds(x, x.sharding), tree)


def _placed(fn, *args):
  """fn(*args) as ShapeDtypeStructs with the shardings XLA gives its outputs (a traced
  copy of sharded params keeps their shardings), computing nothing."""
  shapes = jax.eval_shape(fn, *args)
  if not jax.tree_util.tree_leaves(shapes):
    return shapes
  out_sh = jax.jit(fn).lower(*args).compile().output_shardings
  return jax.tree_util.tree_map(_sds, shapes, out_sh)


def abstract_params(cfg: config_lib.TrainConfig, model_cfg, mesh):
  """The base params a run loads, abstract and sharded (4-bit QArrays for QLoRA)."""
  shapes = jax.eval_shape(functools.partial(decoder.init, model_cfg), jax.random.PRNGKey(0))
  q = weights.quant_for(cfg)
  if q is not None:
    shapes = jax.eval_shape(functools.partial(
        qlora.quantize_params, method=q.method, group_size=q.group_size,
        double_quant=q.double_quant), shapes)
  axes = quant.tree_axes(shapes, decoder.axes(model_cfg))
  return jax.tree_util.tree_map(_sds, shapes, sharding.tree_shardings(mesh, axes, shapes))


def abstract_batch(cfg: config_lib.TrainConfig, kind: str, mesh, pad_id: int = 0) -> dict:
  """The global batch's keys, shapes and dtypes, from the loader's assembly of padding rows."""
  b, t = cfg.data.batch_size, cfg.data.seq_len
  if kind == "sft":
    host = packing.assemble([[] for _ in range(b)], t, pad_id)
  else:
    host = packing.assemble_pairs([None] * b, t, pad_id)
  sh = sharding.batch_sharding(mesh)
  return {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=sh) for k, v in host.items()}


def _check_method(cfg: config_lib.TrainConfig):
  method = methods.check(cfg)
  if cfg.method not in PLANNED_METHODS:
    raise config_lib.ConfigError(
        f"the memory planner (--plan, train.micro_batch=auto, model.remat=auto) does not "
        f"plan method={cfg.method} yet (a teacher to load or rollouts to sample); planned: "
        f"{', '.join(PLANNED_METHODS)}; set train.micro_batch to a number and model.remat "
        "to a policy instead")
  if cfg.method == "dpo" and cfg.dpo.reference == "precomputed":
    raise config_lib.ConfigError(
        "the memory planner cannot plan dpo.reference=precomputed (the table is computed "
        "from the data); plan with dpo.reference=frozen or adapters_off")
  return method


def _data_standin(cfg: config_lib.TrainConfig, tokenizer):
  """What the method hooks read from ctx.data, without reading any record."""
  n = len([s for s in cfg.data.train_files.split(",") if s.strip()]) or 1
  pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
  return types.SimpleNamespace(source_names=tuple(f"source{i}" for i in range(n)),
                               train=types.SimpleNamespace(pad_id=int(pad)), eval=[])


def build(cfg: config_lib.TrainConfig, *, mesh=None, tokenizer=None) -> Abstract:
  """The abstract job of `cfg` (checks first, like setup.prepare; no weights, no data)."""
  method = _check_method(cfg)
  cfg = config_lib.resolve_paths(cfg)
  mesh = mesh or sharding.make_mesh(cfg.mesh)
  tokenizer = tokenizer or data_lib.tokenizer_from_config(cfg)
  model_cfg, _ = plan_lib.architecture(cfg, tokenizer)
  params = abstract_params(cfg, model_cfg, mesh)
  adapters = adapter_axes = None
  if cfg.peft.method != "none":
    pm = peft.get(cfg.peft.method)
    adapters = jax.eval_shape(lambda p: pm.init(model_cfg, p, cfg.peft, jax.random.PRNGKey(0)),
                              params)
    adapter_axes = pm.axes(model_cfg, adapters).params
  data = _data_standin(cfg, tokenizer)
  ctx = methods.Context(cfg=cfg, model_cfg=model_cfg, mesh=mesh, params=params,
                        adapters=adapters, tokenizer=tokenizer, data=data)
  extra = method.extra_trainable(ctx)
  if extra is not None:  # a reward head: small real arrays, made abstract
    trees, axes = extra
    ctx, params, adapters, adapter_axes = setup.add_extra_trainable(
        ctx, _abstract_of(trees), axes, adapter_axes)
  frozen_extra = _placed(lambda p: method.frozen(dataclasses.replace(ctx, params=p)), params)
  if adapters is None:
    trainable, frozen = params, {}
  else:
    sh = sharding.tree_shardings(mesh, adapter_axes, adapters.params)
    trainable, frozen = jax.tree_util.tree_map(_sds, adapters.params, sh), {"base": params}
  frozen = {**frozen, **frozen_extra}
  optimizer = optim.make(cfg.optim, cfg.train.max_steps)
  trainable_sh = jax.tree_util.tree_map(lambda x: x.sharding, trainable)
  state_sh = setup.state_shardings(optimizer, trainable, trainable_sh, mesh)
  opt = jax.tree_util.tree_map(_sds, jax.eval_shape(optimizer.init, trainable),
                               state_sh.opt_state)
  rng = jax.eval_shape(lambda: jax.random.PRNGKey(0))
  state = state_lib.TrainState(step=_sds(jax.ShapeDtypeStruct((), jnp.int32), state_sh.step),
                               trainable=trainable, opt_state=opt, rng=_sds(rng, state_sh.rng))
  return Abstract(cfg=cfg, model_cfg=model_cfg, mesh=mesh, state=state, frozen=frozen,
                  batch=abstract_batch(cfg, method.data_kind, mesh, data.train.pad_id),
                  objective=method.objective(ctx), optimizer=optimizer,
                  schedule=optim.schedule(cfg.optim, cfg.train.max_steps), state_sh=state_sh,
                  frozen_sh=jax.tree_util.tree_map(lambda x: x.sharding, frozen),
                  tokenizer=tokenizer)


def device_bytes(tree) -> int:
  """Bytes of one device's shards of an abstract (or concrete) tree (the largest shard)."""
  total = 0
  for x in jax.tree_util.tree_leaves(tree):
    shape = x.sharding.shard_shape(x.shape) if getattr(x, "sharding", None) else x.shape
    total += int(np.prod(shape, dtype=np.int64)) * np.dtype(x.dtype).itemsize
  return total
