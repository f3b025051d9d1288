"""From a TrainConfig to a ready job: checks, mesh, tokenizer, data, weights, method, steps.

    job = setup.prepare(cfg)        # what launch/train.py runs before the loop
    run = setup.build(cfg, mesh, params, model_cfg, objective=..., adapters=...)

`prepare` runs `methods.check(cfg)` first (seconds, before data or weights are touched),
then builds the data for the method's data kind, loads the weights (`jaxtune.weights`),
initialises the PEFT adapters, and asks the method for its frozen trees and objective.
PEFT (`peft.method`) decides what is trainable:

    none   trainable = params                       frozen = {}
    lora   trainable = adapters (A, B per module)   frozen = {"base": params}
    qlora  as lora, with the base projections as 4-bit QArrays (quantised on load)

`build` makes the device side: state, frozen tree and the jitted steps with explicit
shardings and donation. Tests and `launch/bench.py` call it directly, so they run exactly
what training runs.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax

from jaxtune import config as config_lib
from jaxtune import data as data_lib
from jaxtune import methods
from jaxtune import peft
from jaxtune import sharding
from jaxtune import weights
from jaxtune.methods import sft
from jaxtune.train import evaluate
from jaxtune.train import optim
from jaxtune.train import state as state_lib
from jaxtune.train import step as step_lib


@dataclasses.dataclass
class Run:
  """Everything a loop needs on the device side."""
  model_cfg: config_lib.ModelConfig
  mesh: jax.sharding.Mesh
  state: state_lib.TrainState  # the current state (the loop keeps it up to date)
  frozen: dict
  train_step: Any  # jitted (state, frozen, batch) -> (state, metrics)
  eval_step: Any  # jitted (trainable, frozen, batch) -> {name: (sum, count)}
  batch_sharding: Any


@dataclasses.dataclass
class Job:
  cfg: config_lib.TrainConfig
  method: methods.Method
  ctx: methods.Context
  run: Run

  @property
  def data(self):
    return self.ctx.data

  @property
  def tokenizer(self):
    return self.ctx.tokenizer

  def export(self, state, out_dir: str, meta: dict) -> str:
    return self.method.export(self.ctx, state, out_dir, meta)


def load_weights(cfg: config_lib.TrainConfig, mesh, tokenizer):
  """(model_cfg, params) a run starts from: `model.hf_path` (HF dir, hub id or a full
  fine-tuning run), else a random init sized to the tokenizer; 4-bit for QLoRA."""
  if cfg.model.hf_path:
    w = weights.load(cfg.model.hf_path, mesh=mesh, base=cfg.model, quant=weights.quant_for(cfg))
    if w.adapters is not None:
      raise config_lib.ConfigError(
          f"model.hf_path={cfg.model.hf_path} is a {w.run_cfg.peft.method} run (adapters, not "
          "a full model); export it with launch/convert.py --merge_lora and start from that")
    return w.model_cfg, w.params
  ids = dict(bos_token_id=_id(tokenizer.bos_token_id), pad_token_id=_id(tokenizer.pad_token_id),
             eos_token_id=() if tokenizer.eos_token_id is None else (tokenizer.eos_token_id,))
  base = dataclasses.replace(cfg.model, **ids)
  w = weights.load("", mesh=mesh, base=base, quant=weights.quant_for(cfg), seed=cfg.train.seed,
                   vocab_size=max(cfg.model.vocab_size, len(tokenizer)))
  return w.model_cfg, w.params


def _id(x) -> int:
  return -1 if x is None else int(x)


def with_epochs(cfg: config_lib.TrainConfig, method, data) -> config_lib.TrainConfig:
  """cfg with train.max_steps derived from train.epochs (> 0) and the data's plan: the
  steps whose global batches cover that many passes (Loader.steps_for_epochs). Every
  sample counts once per optimizer step whatever optim.grad_accum (accumulation splits a
  step's batch, it does not add batches)."""
  if cfg.train.epochs <= 0:
    return cfg
  if type(method).batches is not methods.Method.batches:
    raise config_lib.ConfigError(
        f"train.epochs is not supported for method={cfg.method}: its steps are not batches "
        "of the train data (e.g. GRPO rollouts); set train.max_steps instead")
  steps = data.train.steps_for_epochs(cfg.train.epochs)
  return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, max_steps=steps))


def add_extra_trainable(ctx, trees: dict, axes: dict, adapter_axes):
  """A method's own trainable leaves (the reward head) joined to the params (full training)
  or to the adapters: (ctx, params, adapters, adapter_axes)."""
  params, adapters = ctx.params, ctx.adapters
  if adapters is None:
    params = {**params, **trees}
  else:
    adapters = dataclasses.replace(adapters, params={**adapters.params, **trees})
    adapter_axes = {**adapter_axes, **axes}
  return dataclasses.replace(ctx, params=params, adapters=adapters), params, adapters, adapter_axes


def prepare(cfg: config_lib.TrainConfig, *, mesh=None) -> Job:
  """Checks `cfg`, then builds data, weights, adapters, the method's pieces and the steps."""
  method = methods.check(cfg)
  evaluate.check(cfg)  # eval.* and checkpoint.keep_best, also before data or weights
  cfg = config_lib.resolve_paths(cfg)  # absolute local paths (meta, exports), hub ids kept
  mesh = mesh or sharding.make_mesh(cfg.mesh)
  tokenizer = data_lib.tokenizer_from_config(cfg)
  data = data_lib.build(cfg.data, tokenizer, kind=method.data_kind,
                        process_index=jax.process_index(), process_count=jax.process_count())
  cfg = with_epochs(cfg, method, data)
  model_cfg, params = load_weights(cfg, mesh, tokenizer)
  adapters = adapter_axes = None
  if cfg.peft.method != "none":
    pm = peft.get(cfg.peft.method)
    adapters = pm.init(model_cfg, params, cfg.peft, jax.random.PRNGKey(cfg.train.seed + 2))
    adapter_axes = pm.axes(model_cfg, adapters).params
  ctx = methods.Context(cfg=cfg, model_cfg=model_cfg, mesh=mesh, params=params,
                        adapters=adapters, tokenizer=tokenizer, data=data)
  extra = method.extra_trainable(ctx)
  if extra is not None:  # method-owned leaves (the reward head) trained next to the rest
    ctx, params, adapters, adapter_axes = add_extra_trainable(ctx, *extra, adapter_axes)
  run = build(cfg, mesh, params, model_cfg, objective=method.objective(ctx), adapters=adapters,
              adapter_axes=adapter_axes, extra_frozen=method.frozen(ctx))
  return Job(cfg=cfg, method=method, ctx=ctx, run=run)


def build(cfg: config_lib.TrainConfig, mesh, params, model_cfg: config_lib.ModelConfig, *,
          objective=None, adapters=None, adapter_axes=None, extra_frozen: dict | None = None,
          num_sources: int = 0) -> Run:
  """State, frozen tree and jitted steps for `params` (+ PEFT `adapters`) on `mesh`.

  Default objective: SFT. With adapters, `adapter_axes` (the adapter params' logical axes)
  places them; the base params become frozen["base"].
  """
  if adapters is None:
    trainable, frozen = params, {}
  else:
    trainable, frozen = adapters.params, {"base": params}
  frozen = {**frozen, **(extra_frozen or {})}
  if objective is None:
    objective = sft.make_objective(model_cfg, adapters=adapters,
                                   constrain=sharding.constrainer(mesh), num_sources=num_sources)
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
  state_sh = state_shardings(optimizer, trainable, trainable_sh, mesh)
  # Donated: the state takes over the trainable buffers instead of holding a second copy
  # (full fine-tuning would otherwise keep the initial params alive next to the trained ones).
  state = jax.jit(init_state, in_shardings=(trainable_sh, repl), out_shardings=state_sh,
                  donate_argnums=(0,))(trainable, rng)
  frozen_sh = jax.tree_util.tree_map(lambda x: x.sharding, frozen)
  batch_sh = sharding.batch_sharding(mesh)
  train_step = jit_train_step(objective, optimizer, schedule, state_sh, frozen_sh, mesh,
                              grad_accum=cfg.optim.grad_accum,
                              finite_updates=optim.finite_updates(cfg.optim))
  eval_step = jax.jit(step_lib.make_eval_step(objective),
                      in_shardings=(trainable_sh, frozen_sh, batch_sh), out_shardings=repl)
  return Run(model_cfg=model_cfg, mesh=mesh, state=state, frozen=frozen, train_step=train_step,
             eval_step=eval_step, batch_sharding=batch_sh)


def state_shardings(optimizer, trainable, trainable_sh, mesh) -> state_lib.TrainState:
  """The TrainState's shardings: optimizer moments shard exactly like the params they
  track; the step, counts and rng are replicated. `trainable` may be abstract."""
  repl = sharding.replicated(mesh)
  opt_sh = optax.tree_map_params(optimizer, lambda _, sh: sh,
                                 jax.eval_shape(optimizer.init, trainable), trainable_sh,
                                 transform_non_params=lambda _: repl)
  return state_lib.TrainState(step=repl, trainable=trainable_sh, opt_state=opt_sh, rng=repl)


def jit_train_step(objective, optimizer, schedule, state_sh, frozen_sh, mesh, *,
                   grad_accum: int, finite_updates: bool):
  """The jitted train step, state donated (what training runs and the planner compiles).
  finite_updates: `optim.finite_updates(cfg.optim)` (the step's non-finite guard)."""
  step = step_lib.make_train_step(objective, optimizer, schedule, grad_accum=grad_accum,
                                  finite_updates=finite_updates)
  return jax.jit(step, in_shardings=(state_sh, frozen_sh, sharding.batch_sharding(mesh)),
                 out_shardings=(state_sh, sharding.replicated(mesh)), donate_argnums=(0,))
