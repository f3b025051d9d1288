"""The train step: 8-device sharding equals one device, traced once, exact grad accumulation,
and it can overfit a handful of examples."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxtune import config as config_lib
from jaxtune import sharding
from jaxtune import tree
from jaxtune.models import decoder
from jaxtune import weights
from jaxtune.methods import sft
from jaxtune.train import loop
from jaxtune.train import setup
from jaxtune.train import step as step_lib

# Big enough that several weights have >= 1M elements (embedding [4096, 256], mlp [2, 256, 2048]).
BIG = config_lib.ModelConfig(vocab_size=4096, hidden_size=256, intermediate_size=2048,
                             num_layers=2, num_heads=8, num_kv_heads=4, head_dim=32,
                             tie_word_embeddings=False)


def _batch(model_cfg, b=8, t=32, seed=0):
  rng = np.random.RandomState(seed)
  tokens = rng.randint(0, model_cfg.vocab_size, size=(b, t + 1)).astype(np.int32)
  seg = np.ones((b, t), np.int32)
  cut = t * 5 // 8
  seg[1, cut:] = 2  # a packed row
  seg[2, t - 4:] = 0  # a padded row
  pos = np.broadcast_to(np.arange(t, dtype=np.int32), (b, t)).copy()
  pos[1, cut:] = np.arange(t - cut)
  mask = (seg > 0).astype(np.float32)
  return {"tokens": tokens[:, :-1], "targets": tokens[:, 1:], "loss_mask": mask,
          "segment_ids": seg, "positions": pos}


def _loss_and_grads(model_cfg, params, batch, mesh):
  obj = sft.make_objective(model_cfg, constrain=sharding.constrainer(mesh))
  fn = jax.jit(jax.value_and_grad(lambda p, b: (lambda o: o[0] / o[1][0])(obj(p, {}, b, None))))
  return fn(params, batch)


def test_fsdp_tensor_sharding_matches_single_device():
  params = decoder.init(BIG, jax.random.PRNGKey(0))
  batch = _batch(BIG)
  one = jax.sharding.Mesh(np.array(jax.devices()[:1]).reshape(1, 1, 1), sharding.MESH_AXES)
  loss1, g1 = _loss_and_grads(BIG, jax.device_put(params, jax.devices()[0]), batch, one)

  mesh = sharding.make_mesh(config_lib.MeshConfig(data=1, fsdp=4, tensor=2))
  shardings = sharding.tree_shardings(mesh, decoder.axes(BIG), params)
  sp = jax.device_put(params, shardings)
  sb = jax.device_put(batch, sharding.batch_sharding(mesh))
  loss8, g8 = _loss_and_grads(BIG, sp, sb, mesh)

  np.testing.assert_allclose(float(loss8), float(loss1), atol=1e-5, rtol=0)
  for path, a in tree.flatten(g1).items():
    np.testing.assert_allclose(np.asarray(tree.flatten(g8)[path]), np.asarray(a), atol=1e-5,
                               rtol=1e-5, err_msg=path)
  big = {p: x for p, x in tree.flatten(sp).items() if x.size >= 1_000_000}
  assert len(big) >= 3, sorted(big)
  for path, x in big.items():
    shard = x.addressable_shards[0].data
    assert shard.size * 8 == x.size, (path, x.sharding.spec)  # split over all 8 devices


def _small_cfg(**train):
  model = config_lib.ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                                 num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8)
  cfg = config_lib.TrainConfig(model=model, mesh=config_lib.MeshConfig(fsdp=-1))
  return dataclasses.replace(cfg, **train)


def _run(cfg, devices=None):
  mesh = sharding.make_mesh(cfg.mesh, devices)
  w = weights.load("", mesh=mesh, base=cfg.model, seed=cfg.train.seed)
  return setup.build(cfg, mesh, w.params, w.model_cfg)


def test_step_is_traced_once_over_five_steps():
  cfg = _small_cfg()
  run = _run(cfg)
  traces = []
  inner = sft.make_objective(run.model_cfg)

  def counting(*args):
    traces.append(1)
    return inner(*args)

  run2 = setup.build(cfg, run.mesh, run.state.trainable, run.model_cfg, objective=counting)
  state = run2.state
  for i in range(5):
    batch = loop.device_batch(_batch(run.model_cfg, t=16, seed=i), run2.batch_sharding)
    state, metrics = jax.block_until_ready(run2.train_step(state, run2.frozen, batch))
  assert int(state.step) == 5
  assert len(traces) == 1
  assert run2.train_step._cache_size() == 1


def test_grad_accumulation_equals_full_batch():
  base = _small_cfg(optim=config_lib.OptimConfig(grad_accum=1, warmup_steps=0))
  acc = _small_cfg(optim=config_lib.OptimConfig(grad_accum=4, warmup_steps=0))
  batch = _batch(base.model, t=16)
  results = []
  for cfg in (base, acc):
    run = _run(cfg)
    state, metrics = run.train_step(run.state, run.frozen,
                                    loop.device_batch(batch, run.batch_sharding))
    results.append((metrics, state.opt_state))
  (m1, o1), (m4, o4) = results
  np.testing.assert_allclose(float(m4["loss"]), float(m1["loss"]), rtol=1e-6)
  np.testing.assert_allclose(float(m4["grad_norm"]), float(m1["grad_norm"]), rtol=1e-5)
  # Adam's moments after one step are (1-b1) g and (1-b2) g^2: the accumulated gradient.
  # (Params themselves are compared loosely by nature: Adam's first step is ~lr * sign(g).)
  leaves1, leaves4 = jax.tree_util.tree_leaves(o1), jax.tree_util.tree_leaves(o4)
  assert len(leaves1) == len(leaves4) > 0
  for a, b in zip(leaves1, leaves4):
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-4, atol=1e-9)


def test_overfits_eight_examples():
  cfg = _small_cfg(optim=config_lib.OptimConfig(lr=3e-3, warmup_steps=5, schedule="constant"),
                   train=config_lib.LoopConfig(max_steps=200))
  run = _run(cfg, jax.devices()[:1])
  batch = loop.device_batch(_batch(run.model_cfg, t=16, seed=7), run.batch_sharding)
  state = run.state
  for _ in range(200):
    state, metrics = jax.block_until_ready(run.train_step(state, run.frozen, batch))
  assert float(metrics["loss"]) < 0.1, float(metrics["loss"])


def test_schedule_warmup_and_decay():
  from jaxtune.train import optim
  sched = optim.schedule(config_lib.OptimConfig(lr=1.0, warmup_steps=10, end_lr_ratio=0.1), 110)
  assert float(sched(0)) == 0.0 and float(sched(5)) == pytest.approx(0.5)
  assert float(sched(10)) == pytest.approx(1.0)
  assert float(sched(110)) == pytest.approx(0.1, abs=1e-6)
  mask = optim.decay_mask({"norm": {"scale": jnp.ones(3)}, "q": {"kernel": jnp.ones((2, 2)),
                                                                "bias": jnp.ones(2)}})
  assert mask == {"norm": {"scale": False}, "q": {"kernel": True, "bias": False}}


def test_optimizer_state_is_sharded_like_params():
  cfg = config_lib.TrainConfig(model=BIG, mesh=config_lib.MeshConfig(fsdp=4, tensor=2))
  mesh = sharding.make_mesh(cfg.mesh)
  w = weights.load("", mesh=mesh, base=cfg.model, seed=cfg.train.seed)
  run = setup.build(cfg, mesh, w.params, w.model_cfg)
  big = [(jax.tree_util.keystr(p), x) for p, x in
         jax.tree_util.tree_leaves_with_path(run.state.opt_state) if x.size >= 1_000_000]
  assert len(big) >= 6  # Adam's mu and nu of each large weight
  for name, x in big:
    assert x.addressable_shards[0].data.size * 8 == x.size, (name, x.sharding.spec)
