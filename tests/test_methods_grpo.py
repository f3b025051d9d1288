"""method=grpo: one step's loss by hand from a fixed rollout; rewards rise through the
launcher (full FT, LoRA with adapters-off reference and a bit-identical base, a learned
reward model); SIGKILL + restart replays the same rollouts; reward functions and configs."""

import dataclasses
import json
import math
import os
import signal
import subprocess
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxtune import config as config_lib
from jaxtune.methods import grpo
from jaxtune.methods import grpo_batch
from jaxtune.methods import rewards
from jaxtune.models import decoder
from tests import launch_utils as lu
from tests import test_methods_configs

GRPO = "--config=configs/grpo.py"
MODEL = config_lib.ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                               num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8)


def _np_logps(logits, targets):
  z = logits - logits.max(-1, keepdims=True)
  lp = z - np.log(np.exp(z).sum(-1, keepdims=True))
  return np.take_along_axis(lp, targets[..., None], -1)[..., 0]


@pytest.mark.parametrize("loss_agg", ["token_mean", "seq_mean", "dr_grpo"])
def test_one_step_loss_equals_a_hand_computation(loss_agg):
  """Fixed rollout, one update (old = current, so ratio 1): loss = -A + beta * k3(ref) per
  completion token, aggregated as loss_agg; the objective's sum / weight equals it."""
  params = decoder.init(MODEL, jax.random.PRNGKey(0))
  ref = jax.tree_util.tree_map(lambda x: x * 0.9, params)  # a reference away from the policy
  rng = np.random.default_rng(0)
  prompts = [rng.integers(1, 64, n).tolist() for n in (3, 5, 4, 2)]
  completions = [rng.integers(1, 64, n).tolist() for n in (4, 1, 6, 3)]
  batch = grpo_batch.assemble(prompts, completions, [[0.0] * len(c) for c in completions],
                              seq_len=12, pad_id=0)
  reward = np.array([1.0, 0.0, 0.5, 0.25], np.float32)
  adv, stats = grpo_batch.advantages(reward, 2, "group")
  grpo_batch.add_row_stats(batch, adv, {**stats, "reward": reward})
  g = config_lib.GrpoConfig(beta=0.1, loss_agg=loss_agg, max_new_tokens=8)
  obj = grpo.make_objective(MODEL, g, reference="frozen")
  loss_sum, (weight, metrics) = jax.jit(obj)(params, {"ref": ref},
                                             jax.tree_util.tree_map(jnp.asarray, batch), None)
  # numpy, float64, from plain forward logits
  lp = _np_logps(np.asarray(decoder.forward(MODEL, params, batch["tokens"]), np.float64),
                 batch["targets"])
  rp = _np_logps(np.asarray(decoder.forward(MODEL, ref, batch["tokens"]), np.float64),
                 batch["targets"])
  m = batch["loss_mask"].astype(np.float64)
  d = rp - lp
  per_tok = -adv[:, None] + 0.1 * (np.exp(d) - d - 1.0)
  if loss_agg == "token_mean":
    want = (per_tok * m).sum() / m.sum()
  elif loss_agg == "seq_mean":
    want = np.mean((per_tok * m).sum(-1) / m.sum(-1))
  else:
    want = (per_tok * m).sum() / (4 * 8)
  # Centred advantages cancel within a group at ratio 1, so the value is O(beta * KL) made of
  # O(1) float32 terms: an absolute tolerance at float32 resolution of those terms.
  np.testing.assert_allclose(float(loss_sum / weight), want, rtol=1e-5, atol=1e-6)
  # hand check of the advantages: groups (1, 0) and (0.5, 0.25), unbiased std
  s1, s2 = 0.5 * 2 ** 0.5, 0.125 * 2 ** 0.5  # unbiased stds of (1, 0) and (0.5, 0.25)
  np.testing.assert_allclose(adv, [0.5 / (s1 + 1e-4), -0.5 / (s1 + 1e-4),
                                   0.125 / (s2 + 1e-4), -0.125 / (s2 + 1e-4)], rtol=1e-5)
  assert float(metrics["ratio"][0] / metrics["ratio"][1]) == pytest.approx(1.0)
  assert float(metrics["reward"][0] / metrics["reward"][1]) == pytest.approx(reward.mean())


@pytest.mark.parametrize("mesh_axes", [None, dict(data=2, fsdp=4)])
def test_trainer_logps_equal_numpy_on_one_device_and_a_mesh(mesh_axes):
  """The old log-probs (num_iterations / mini_batches > 1) with the chunked head: numpy's
  log-softmax of the forward logits on the completion tokens, 0 elsewhere; on 8 simulated
  devices each scores its own rows and gives the same numbers."""
  import types
  from jaxtune import sharding
  cfg = dataclasses.replace(MODEL, logits_chunk=5, dtype="float32", param_dtype="float32")
  mesh = sharding.make_mesh(config_lib.MeshConfig(**(mesh_axes or {}), tensor=1),
                            devices=None if mesh_axes else jax.devices()[:1])
  params = decoder.init(cfg, jax.random.PRNGKey(0))
  params = jax.device_put(params, sharding.tree_shardings(mesh, decoder.axes(cfg), params))
  rng = np.random.default_rng(1)
  prompts = [rng.integers(1, 64, n).tolist() for n in (3, 5, 4, 2, 6, 1, 3, 2)]
  completions = [rng.integers(1, 64, n).tolist() for n in (4, 1, 6, 3, 2, 5, 1, 4)]
  batch = grpo_batch.assemble(prompts, completions, [[0.0] * len(c) for c in completions],
                              seq_len=12, pad_id=0)
  ctx = types.SimpleNamespace(model_cfg=cfg, mesh=mesh)
  got = grpo_batch.trainer_logps(ctx, params, batch)
  host = jax.device_get(params)
  want = _np_logps(np.asarray(decoder.forward(cfg, host, batch["tokens"],
                                              positions=batch["positions"],
                                              segment_ids=batch["segment_ids"]), np.float64),
                   batch["targets"]) * batch["loss_mask"]
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_assembled_rows_mask_exactly_the_completion():
  batch = grpo_batch.assemble([[5, 6, 7]], [[8, 9]], [[-1.0, -2.0]], seq_len=6, pad_id=0)
  np.testing.assert_array_equal(batch["tokens"][0], [5, 6, 7, 8, 0, 0])
  np.testing.assert_array_equal(batch["targets"][0], [6, 7, 8, 9, 0, 0])
  np.testing.assert_array_equal(batch["loss_mask"][0], [0, 0, 1, 1, 0, 0])
  np.testing.assert_array_equal(batch["sampler_logps"][0], [0, 0, -1, -2, 0, 0])
  np.testing.assert_array_equal(batch["segment_ids"][0], [1, 1, 1, 1, 0, 0])


def test_builtin_rewards_by_hand(tmp_path):
  assert rewards.exact_answer(["q"] * 3, [" 55.", "56", "x"], answer=["55", "55", None]) == [
      1.0, 0.0, None]
  assert rewards.math_answer(["q"] * 4, ["so \\boxed{3/4}", "it is 1,200", "none", "2"],
                             answer=["0.75", "1200", "3", None]) == [1.0, 1.0, 0.0, None]
  fmt = rewards.make_format(r"<a>.*</a>")
  assert fmt([""] * 2, ["<a>x\ny</a>", "x<a></a>"]) == [1.0, 0.0]
  over = rewards.make_overlong(10, 4)
  assert over([""] * 3, [""] * 3, completion_ids=[[0] * 6, [0] * 8, [0] * 11]) == [
      0.0, -0.5, -1.0]
  f = tmp_path / "r.py"
  f.write_text("def r(prompts, completions, **kw):\n  return [None, 2.0]\n")
  g = config_lib.GrpoConfig(reward_fns=f"builtin:exact_answer,{f}:r", reward_weights="1,0.5")
  rw = rewards.build(g, 16)
  total, each = rw(["p", "p"], ["1", "2"], answer=["1", "1"])
  np.testing.assert_allclose(total, [1.0, 1.0])  # None is left out of the sum
  assert np.isnan(each["r"][0]) and each["exact_answer"].tolist() == [1.0, 0.0]


@pytest.mark.parametrize("assignment,message", [
    ("grpo.loss_agg=nope", "bad value for grpo.loss_agg"),
    ("grpo.reward_fns=builtin:nope", "grpo.reward_fns builtin"),
    ("grpo.reward_fns=missing.py:f", "no such file missing.py"),
    ("grpo.mini_batches=3", "bad value for grpo.mini_batches"),
])
def test_bad_grpo_settings_fail_before_loading(assignment, message):
  from jaxtune import methods
  cfg = config_lib.override(config_lib.TrainConfig(), [
      "method=grpo", "grpo.reward_fns=builtin:exact_answer", assignment])
  with pytest.raises(config_lib.ConfigError, match=message):
    methods.check(cfg)


def _rewards(wd):
  rows = [r for r in lu.metrics(wd) if "reward" in r and "loss" in r]
  return [r["reward"] for r in rows]


@pytest.mark.slow
def test_grpo_raises_the_reward_through_the_launcher(tmp_path):
  wd = str(tmp_path / "grpo")
  lu.run("train.py", GRPO, f"--workdir={wd}")
  rows = [r for r in lu.metrics(wd) if "loss" in r]
  assert [r["step"] for r in rows] == list(range(1, 31))
  assert all({"step", "loss", "reward", "kl", "frac_reward_zero_std"} <= set(r) for r in rows)
  r = _rewards(wd)
  first, last = np.mean(r[:5]), np.mean(r[-5:])
  print(f"grpo full FT: reward {first:.3f} -> {last:.3f}")
  assert last > first + 0.1, (first, last)
  with open(os.path.join(wd, "samples.jsonl")) as f:
    samples = [json.loads(l) for l in f]
  assert samples and {"step", "prompt", "completion", "reward"} <= set(samples[0])
  assert any("val_reward" in m for m in lu.metrics(wd))


def test_grpo_lora_reference_is_the_base_and_updates_follow_the_advantages():
  """The loop's own pieces, in process: rollouts read run.state; the reference is the base
  with adapters off (no copy), so the first step's KL is exactly 0; one update raises the
  log-probs of the above-average completions; the base is bit-identical after 10 updates.

  (The reward itself does not rise with LoRA on this random-init model: its tied embeddings
  of std 0.02 bound the logits to about +-1 after the final norm, so only full fine-tuning,
  which trains the embeddings, can sharpen the output distribution; see the launcher test.)
  """
  from jaxtune.models import head
  from jaxtune.train import loop
  from jaxtune.train import setup
  job = setup.prepare(test_methods_configs.load_recipe("grpo", "lora"))
  run, ctx = job.run, job.ctx
  assert set(run.frozen) == {"base"}
  base0 = jax.tree_util.tree_map(lambda x: np.array(x, copy=True), run.frozen["base"])
  batches = job.method.batches(ctx, run)
  batch = loop.device_batch(next(batches), run.batch_sharding)
  obj = job.method.objective(ctx)

  def seq_logps(trainable):
    p = grpo.base.model_params(trainable, run.frozen, ctx.adapters)
    h = grpo.base.hidden(ctx.model_cfg, p, batch)
    lp = head.token_logprobs(ctx.model_cfg, p, h, batch["targets"])
    return jnp.sum(lp * batch["loss_mask"], axis=-1)

  loss_fn = lambda t: (lambda o: o[0] / o[1][0])(obj(t, run.frozen, batch, None))  # noqa
  _, (_, m) = obj(run.state.trainable, run.frozen, batch, None)
  assert float(m["kl"][0]) == 0.0  # B = 0: the policy IS the base
  grads = jax.grad(loss_fn)(run.state.trainable)
  moved = jax.tree_util.tree_map(lambda x, g: x - 1.0 * g, run.state.trainable, grads)
  delta = np.asarray(seq_logps(moved) - seq_logps(run.state.trainable))
  adv = np.asarray(batch["advantages"][:, 0])
  assert np.corrcoef(adv, delta)[0, 1] > 0.5
  state, kls = run.state, []
  for _ in range(10):
    state, m = run.train_step(state, run.frozen, loop.device_batch(next(batches),
                                                                   run.batch_sharding))
    run.state = state
    kls.append(float(m["kl"]))
  assert kls[0] == 0.0 and kls[-1] > 0.0
  for a, b in zip(jax.tree_util.tree_leaves(base0), jax.tree_util.tree_leaves(run.frozen["base"])):
    np.testing.assert_array_equal(np.asarray(b), a)


@pytest.mark.slow
def test_sigkill_then_restart_replays_rollouts(tmp_path):
  steps = ["--set=train.max_steps=20", "--set=checkpoint.every_steps=5",
           "--set=checkpoint.export_hf=false", "--set=train.eval_every=0"]
  ref = str(tmp_path / "ref")
  lu.run("train.py", GRPO, f"--workdir={ref}", *steps)
  wd = str(tmp_path / "killed")
  args = [GRPO, f"--workdir={wd}", *steps]
  proc = subprocess.Popen(lu.cmd("train.py", *args), env=lu.env(), cwd=lu.ROOT,
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  ckpt = os.path.join(wd, "checkpoints", "10")
  deadline = time.time() + 300
  while not os.path.isdir(ckpt) and time.time() < deadline and proc.poll() is None:
    time.sleep(0.02)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert os.path.isdir(ckpt)
  lu.run("train.py", *args)
  a = {m["step"]: m for m in lu.metrics(ref) if "loss" in m}
  b = {m["step"]: m for m in lu.metrics(wd) if "loss" in m}
  assert sorted(a) == sorted(b) == list(range(1, 21))
  for s in range(1, 21):
    assert a[s]["reward"] == pytest.approx(b[s]["reward"], abs=1e-6), s
    assert a[s]["loss"] == pytest.approx(b[s]["loss"], abs=1e-6), s


@pytest.mark.slow
def test_grpo_with_a_learned_reward_model(tmp_path):
  """RLHF: a reward model trained by method=reward scores prompt + completion in-engine,
  exactly as transformers' *ForSequenceClassification scores the export; a GRPO run logs it."""
  import types
  import transformers
  import torch
  rm = str(tmp_path / "rm")
  lu.run("train.py", "--config=configs/reward.py", f"--workdir={rm}")
  cfg = config_lib.override(test_methods_configs.load_recipe("grpo"),
                            ["grpo.reward_fns=", f"grpo.reward_model={rm}/hf"])
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]).reshape(1, 1, 1), ("data", "fsdp",
                                                                          "tensor"))
  ctx = types.SimpleNamespace(cfg=cfg, mesh=mesh, model_cfg=cfg.model)
  scorer = grpo_batch.Scorer.build(ctx)
  rng = np.random.default_rng(0)
  prompts = [rng.integers(3, 500, n).tolist() for n in (5, 9, 3)]
  completions = [rng.integers(3, 500, n).tolist() for n in (4, 1, 7)]
  total, each = scorer(None, prompts, completions, {})
  hf = transformers.AutoModelForSequenceClassification.from_pretrained(f"{rm}/hf").eval()
  with torch.no_grad():
    want = [float(hf(torch.tensor([p + c])).logits[0, 0]) for p, c in zip(prompts, completions)]
  np.testing.assert_allclose(each["reward_model"], want, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(total, want, rtol=1e-4, atol=1e-5)
  wd = str(tmp_path / "rlhf")
  lu.run("train.py", GRPO, f"--workdir={wd}", "--set=grpo.reward_fns=",
         f"--set=grpo.reward_model={rm}/hf", "--set=train.max_steps=4",
         "--set=train.eval_every=0", "--set=checkpoint.every_steps=2")
  rows = [r for r in lu.metrics(wd) if "loss" in r]
  assert len(rows) == 4 and all(r["reward"] == r["reward/reward_model"] for r in rows)
