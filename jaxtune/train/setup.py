"""Building a run's device-side pieces: model weights on the mesh, state, frozen tree, steps.

Kept apart from the host loop (`loop.py`) so tests and other drivers (bench, eval) build
exactly what training runs: the same shardings, the same jitted step.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxtune import config as config_lib
from jaxtune import sharding
from jaxtune.hf import io as hf_io
from jaxtune.models import decoder
from jaxtune.train import objectives
from jaxtune.train import optim
from jaxtune.train import state as state_lib
from jaxtune.train import step as step_lib


@dataclasses.dataclass
class Run:
  """Everything a loop needs on the device side."""
  cfg: config_lib.TrainConfig
  model_cfg: config_lib.ModelConfig
  mesh: jax.sharding.Mesh
  state: state_lib.TrainState
  frozen: dict
  lora_scale: float | None
  train_step: Any  # jitted (state, frozen, batch) -> (state, metrics)
  eval_step: Any  # jitted (trainable, frozen, batch) -> {name: (sum, count)}
  schedule: Any
  batch_sharding: Any
  adapters_meta: Any = None  # the lora.Adapters template (static fields) when PEFT is on


def load_model(cfg: config_lib.TrainConfig, mesh, *, vocab_size: int | None = None):
  """(model_cfg, params): from model.hf_path if set, else a random init of cfg.model."""
  dtype = decoder.DTYPES[cfg.model.param_dtype]
  if cfg.model.hf_path:
    model_dir = hf_io.resolve(cfg.model.hf_path)
    model_cfg = hf_io.read_config(model_dir, cfg.model)
    _, params = hf_io.load_hf(model_dir, dtype, base=cfg.model,
                              place=sharding.placer(mesh, decoder.axes(model_cfg)))
    return model_cfg, params
  model_cfg = cfg.model
  if vocab_size is not None and vocab_size != model_cfg.vocab_size:
    model_cfg = dataclasses.replace(model_cfg, vocab_size=vocab_size)
  init = functools.partial(decoder.init, model_cfg)
  key = jax.random.PRNGKey(cfg.train.seed)
  shardings = sharding.tree_shardings(mesh, decoder.axes(model_cfg), jax.eval_shape(init, key))
  return model_cfg, jax.jit(init, out_shardings=shardings)(key)


def build(cfg: config_lib.TrainConfig, mesh, params, model_cfg: config_lib.ModelConfig, *,
          objective=None, adapters=None, adapter_axes=None, extra_frozen: dict | None = None,
          num_sources: int = 0) -> Run:
  """State, frozen tree and jitted steps for `params` (+ LoRA `adapters`) on `mesh`."""
  lora_scale = None if adapters is None else adapters.scale
  trainable, frozen = objectives.split(params, None if adapters is None else adapters.params)
  frozen = {**frozen, **(extra_frozen or {})}
  constrain = sharding.constrainer(mesh)
  if objective is None:
    objective = objectives.sft(model_cfg, lora_scale=lora_scale, constrain=constrain,
                               num_sources=num_sources)
  schedule = optim.schedule(cfg.optim, cfg.train.max_steps)
  optimizer = optim.make(cfg.optim, cfg.train.max_steps)

  if adapters is None:
    trainable_sh = jax.tree_util.tree_map(lambda x: x.sharding, trainable)
  else:
    trainable_sh = sharding.tree_shardings(mesh, adapter_axes, trainable)
    trainable = jax.device_put(trainable, trainable_sh)

  def init_state(trainable, rng):
    return state_lib.TrainState(step=jnp.zeros((), jnp.int32), trainable=trainable,
                                opt_state=optimizer.init(trainable), rng=rng)

  repl = sharding.replicated(mesh)
  rng = jax.device_put(jax.random.PRNGKey(cfg.train.seed + 1), repl)
  # Optimizer moments shard exactly like the params they track; counts etc. are replicated.
  opt_sh = optax.tree_map_params(optimizer, lambda _, sh: sh,
                                 jax.eval_shape(optimizer.init, trainable), trainable_sh,
                                 transform_non_params=lambda _: repl)
  state_sh = state_lib.TrainState(step=repl, trainable=trainable_sh, opt_state=opt_sh, rng=repl)
  # Donated: the state takes over the trainable buffers instead of holding a second copy
  # (full fine-tuning would otherwise keep the initial params alive next to the trained ones).
  state = jax.jit(init_state, in_shardings=(trainable_sh, repl), out_shardings=state_sh,
                  donate_argnums=(0,))(trainable, rng)
  frozen_sh = jax.tree_util.tree_map(lambda x: x.sharding, frozen)
  batch_sh = sharding.batch_sharding(mesh)
  train_step = step_lib.make_train_step(objective, optimizer, schedule,
                                        grad_accum=cfg.optim.grad_accum)
  train_step = jax.jit(train_step, in_shardings=(state_sh, frozen_sh, batch_sh),
                       out_shardings=(state_sh, repl), donate_argnums=(0,))
  eval_step = jax.jit(step_lib.make_eval_step(objective),
                      in_shardings=(trainable_sh, frozen_sh, batch_sh), out_shardings=repl)
  return Run(cfg=cfg, model_cfg=model_cfg, mesh=mesh, state=state, frozen=frozen,
             lora_scale=lora_scale, train_step=train_step, eval_step=eval_step,
             schedule=schedule, batch_sharding=batch_sh, adapters_meta=adapters)


def global_batch(batch: dict, batch_sharding) -> dict:
  """Process-local numpy rows -> global jax arrays sharded over the batch axis."""
  out = {}
  for k, v in batch.items():
    if not isinstance(v, np.ndarray):
      continue
    sh = jax.sharding.NamedSharding(batch_sharding.mesh, jax.sharding.PartitionSpec(
        *batch_sharding.spec[:1], *([None] * (v.ndim - 1))))
    out[k] = jax.make_array_from_process_local_data(sh, v)
  return out
