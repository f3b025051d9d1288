"""Non-finite guard: a step whose loss or gradient is not finite leaves params and optimizer
state untouched (inside the jitted step), is counted, and train.max_skipped consecutive
skips stop the run (status "diverged") without a checkpoint holding non-finite values."""

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxtune import checkpoint as checkpoint_lib
from jaxtune import config as config_lib
from jaxtune import sharding
from jaxtune import weights
from jaxtune.data import loader as loader_lib
from jaxtune.methods import sft
from jaxtune.train import loop
from jaxtune.train import setup
from tests import test_train_step as ts


def host(t):
  return jax.tree_util.tree_map(np.asarray, t)


def assert_trees_equal(a, b):
  la, lb = jax.tree_util.tree_leaves(host(a)), jax.tree_util.tree_leaves(host(b))
  assert len(la) == len(lb) > 0
  for x, y in zip(la, lb):
    np.testing.assert_array_equal(x, y)


def _poisoned(batch):
  bad = dict(batch)
  bad["loss_mask"] = batch["loss_mask"].copy()
  bad["loss_mask"][0, 3] = np.nan  # one corrupt weight makes the loss and every grad NaN
  return bad


def test_nan_loss_step_is_skipped_and_the_next_step_is_exact():
  cfg = ts._small_cfg(optim=config_lib.OptimConfig(warmup_steps=0))
  good = [ts._batch(cfg.model, t=16, seed=i) for i in range(2)]
  run = ts._run(cfg, jax.devices()[:1])
  dev = lambda b: loop.device_batch(b, run.batch_sharding)  # noqa: E731
  before = host(run.state)
  s1, m1 = run.train_step(run.state, run.frozen, dev(_poisoned(good[0])))
  assert float(m1["skipped"]) == 1.0 and not np.isfinite(float(m1["loss"]))
  assert_trees_equal(s1.trainable, before.trainable)
  assert_trees_equal(s1.opt_state, before.opt_state)  # moments and count untouched
  assert int(s1.step) == 0  # state.step counts applied updates (the schedule position)
  assert not np.array_equal(np.asarray(s1.rng), before.rng)
  s2, m2 = run.train_step(s1, run.frozen, dev(good[0]))
  assert float(m2["skipped"]) == 0.0 and int(s2.step) == 1
  # The reference never saw the poisoned batch: same params after its one good step.
  ref = ts._run(cfg, jax.devices()[:1])
  r1, mr = ref.train_step(ref.state, ref.frozen, loop.device_batch(good[0], ref.batch_sharding))
  np.testing.assert_array_equal(float(m2["loss"]), float(mr["loss"]))
  assert_trees_equal(s2.trainable, r1.trainable)
  assert_trees_equal(s2.opt_state, r1.opt_state)


def test_finite_loss_with_nan_gradient_is_skipped():
  """sqrt(|w| * 0) has value 0 but gradient inf * 0 = NaN: the loss alone would pass."""
  cfg = ts._small_cfg()
  inner = sft.make_objective(cfg.model)

  def objective(trainable, frozen, batch, rng):
    loss, aux = inner(trainable, frozen, batch, rng)
    w = trainable["norm"]["scale"]
    return loss + jnp.sum(jnp.sqrt(jnp.abs(w) * batch["poison"][0, 0])), aux

  mesh = sharding.make_mesh(cfg.mesh, jax.devices()[:1])
  w = weights.load("", mesh=mesh, base=cfg.model, seed=0)
  run = setup.build(cfg, mesh, w.params, w.model_cfg, objective=objective)
  batch = ts._batch(cfg.model, t=16)
  before = host(run.state.trainable)
  for poison, skipped in ((0.0, 1.0), (1.0, 0.0)):
    b = dict(batch, poison=np.full(batch["tokens"].shape, poison, np.float32))
    state, m = run.train_step(run.state, run.frozen, loop.device_batch(b, run.batch_sharding))
    assert np.isfinite(float(m["loss"])) and float(m["skipped"]) == skipped
    if skipped:
      assert not np.isfinite(float(m["grad_norm"]))
      assert_trees_equal(state.trainable, before)
    run.state = state


def test_update_norm_is_checked_only_when_adamw_can_divide_zero_by_zero():
  """AdamW with eps = 0 turns a gradient that has always been 0 (the embedding rows of
  tokens not in the batch) into 0 / 0: loss and gradient norm are finite, the update is
  not, and the step is skipped. With eps > 0 the update norm is not computed (the guard's
  select then fuses into the optimizer's pass), and that step is applied."""
  model = dataclasses.replace(ts._small_cfg().model, tie_word_embeddings=False)
  batch = ts._batch(model, t=16)
  assert len(np.unique(batch["tokens"][:, :-1])) < model.vocab_size  # rows no input uses
  for eps, skipped in ((0.0, 1.0), (1e-8, 0.0)):
    cfg = ts._small_cfg(model=model, optim=config_lib.OptimConfig(warmup_steps=0, eps=eps))
    run = ts._run(cfg, jax.devices()[:1])
    before = host(run.state.trainable)
    state, m = run.train_step(run.state, run.frozen,
                              loop.device_batch(batch, run.batch_sharding))
    assert np.isfinite(float(m["loss"])) and np.isfinite(float(m["grad_norm"]))
    assert float(m["skipped"]) == skipped, eps
    changed = [not np.array_equal(a, b) for a, b in zip(
        jax.tree_util.tree_leaves(host(state.trainable)), jax.tree_util.tree_leaves(before))]
    assert all(changed) if not skipped else not any(changed)


def tiny_cfg(**train) -> config_lib.TrainConfig:
  """configs/tiny_test.py's job (bundled chat sample) with a checkpoint every step."""
  cfg = config_lib.TrainConfig(
      model=config_lib.ModelConfig(hidden_size=32, intermediate_size=64, num_layers=2,
                                   num_heads=4, num_kv_heads=2, head_dim=8),
      optim=config_lib.OptimConfig(lr=3e-3, warmup_steps=2),
      data=config_lib.DataConfig(seq_len=64, batch_size=8),
      train=config_lib.LoopConfig(max_steps=12, eval_every=6, eval_batches=2, progress=False))
  return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, **train),
                             checkpoint=dataclasses.replace(cfg.checkpoint, every_steps=1,
                                                            keep=100, async_save=False,
                                                            export_hf=False))


def test_consecutive_skips_stop_the_run_and_no_checkpoint_is_non_finite(tmp_path, monkeypatch):
  """Batches from the 4th on are corrupt: steps 4, 5, 6 are skipped; with max_skipped=3
  the run stops naming step 6; every checkpoint is finite and step 3's params survive."""
  real_next = loader_lib.Loader.__next__
  count = {"n": 0}

  def corrupt_from_4(self):
    batch = real_next(self)
    count["n"] += 1
    return _poisoned(batch) if count["n"] >= 4 else batch

  monkeypatch.setattr(loader_lib.Loader, "__next__", corrupt_from_4)
  wd = str(tmp_path / "run")
  summary = loop.train(tiny_cfg(max_steps=12, max_skipped=3, eval_every=0), wd)
  assert summary["status"] == "diverged" and summary["skipped_steps"] == 3, summary
  assert summary["export"] is None
  steps = checkpoint_lib.Checkpointer(wd).all_steps()
  assert max(steps) < 7 and 3 in steps, steps  # nothing saved once the run was known bad
  for s in steps:
    trainable, _ = checkpoint_lib.read(wd, s)
    assert all(np.all(np.isfinite(x)) for x in jax.tree_util.tree_leaves(host(trainable)))
  if 4 in steps:  # a skipped step's checkpoint holds the last good params
    a, b = checkpoint_lib.read(wd, 3)[0], checkpoint_lib.read(wd, max(steps))[0]
    assert_trees_equal(a, b)
  with open(os.path.join(wd, "metrics.jsonl")) as f:
    rows = [json.loads(l) for l in f]
  assert [r["skipped_steps"] for r in rows if "loss" in r][:6] == [0, 0, 0, 1, 2, 3]


def test_max_skipped_must_be_positive(tmp_path):
  with pytest.raises(config_lib.ConfigError, match="train.max_skipped: 0"):
    loop.train(tiny_cfg(max_skipped=0), str(tmp_path / "x"))
