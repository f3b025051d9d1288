"""method=dpo end to end on a tiny model: the objective against an independent computation,
held-out preference accuracy, the frozen / adapters-off / precomputed references."""

import dataclasses
import functools
import json
import math
import os

import jax
import numpy as np
import pytest

from jaxtune import config as config_lib
from jaxtune import losses
from jaxtune import sharding
from jaxtune import tree
from jaxtune.models import decoder
from jaxtune.methods import dpo
from jaxtune.train import loop
from jaxtune import methods
from jaxtune.train import setup

GOOD = ["apple", "banana", "cherry", "grape", "lemon", "mango", "peach", "plum"]
BAD = ["dog", "cat", "horse", "sheep", "goat", "mouse", "tiger", "zebra"]
FILLER = ["tell", "me", "some", "words", "please", "now", "list", "a", "few", "things"]


def write_pairs(path: str, n: int, seed: int) -> str:
  """Synthetic preferences: the chosen answer lists fruit, the rejected one animals."""
  rng = np.random.RandomState(seed)
  with open(path, "w") as f:
    for _ in range(n):
      k = rng.randint(2, 5)
      prompt = " ".join(rng.choice(FILLER, rng.randint(2, 5)))
      rec = {"prompt": prompt, "chosen": " ".join(rng.choice(GOOD, k)),
             "rejected": " ".join(rng.choice(BAD, k))}
      f.write(json.dumps(rec) + "\n")
  return path


@pytest.fixture(scope="module")
def data_files(tmp_path_factory):
  d = tmp_path_factory.mktemp("pref")
  return (write_pairs(os.path.join(d, "train.jsonl"), 256, 0),
          write_pairs(os.path.join(d, "eval.jsonl"), 64, 1))


def tiny_cfg(data_files, **method) -> config_lib.TrainConfig:
  train, held_out = data_files
  peft = method.pop("peft", "none")
  return config_lib.TrainConfig(
      method="dpo",
      model=config_lib.ModelConfig(hidden_size=32, intermediate_size=64, num_layers=2,
                                   num_heads=4, num_kv_heads=2, head_dim=8),
      peft=config_lib.PeftConfig(method=peft, rank=4, alpha=8.0),
      optim=config_lib.OptimConfig(lr=3e-3 if peft == "none" else 1e-2, warmup_steps=2,
                                   schedule="constant"),
      data=config_lib.DataConfig(train_files=train, eval_files=held_out, seq_len=48,
                                 batch_size=16),
      train=config_lib.LoopConfig(max_steps=30, progress=False),
      dpo=config_lib.DpoConfig(**method))


def one_device_mesh():
  return jax.sharding.Mesh(np.array(jax.devices()[:1]).reshape(1, 1, 1), sharding.MESH_AXES)


def host(t):
  return jax.tree_util.tree_map(np.asarray, t)


def run_steps(job, state, n):
  run, rows = job.run, []
  for _ in range(n):
    batch = loop.device_batch(next(job.data.train), run.batch_sharding)
    state, m = run.train_step(state, run.frozen, batch)
    rows.append({k: float(v) for k, v in m.items()})
  return state, rows


def eval_batch(job, state, batch):
  """{name: mean over the batch's valid pairs} from the job's jitted eval step."""
  out = host(job.run.eval_step(state.trainable, job.run.frozen,
                               loop.device_batch(batch, job.run.batch_sharding)))
  n = float(out["loss"][1])
  assert n == np.all(batch["loss_mask"].sum(-1) > 0, -1).sum()
  return {k: float(s) / n for k, (s, _) in out.items()}


@functools.lru_cache(maxsize=None)
def _forward(model_cfg):
  return jax.jit(lambda p, t, lora: decoder.forward(model_cfg, p, t, lora=lora))


def numpy_seq_logps(model_cfg, params, batch, lora=None):
  """[B, 2] summed response log-probs, in float64 numpy from plain decoder.forward logits.

  No segment ids, no pairing, no masking in the model: rows are causal, so the logits of a
  sequence's own positions ignore the padding after it.
  """
  b, _, t = batch["tokens"].shape
  logits = np.asarray(_forward(model_cfg)(params, batch["tokens"].reshape(2 * b, t), lora),
                      np.float64)  # [2B, T, V]
  top = logits.max(-1, keepdims=True)
  logp = logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))
  picked = np.take_along_axis(logp, batch["targets"].reshape(2 * b, t)[..., None], -1)[..., 0]
  return (picked * batch["loss_mask"].reshape(2 * b, t)).sum(-1).reshape(b, 2)


@pytest.fixture(scope="module")
def full_job(data_files):
  return setup.prepare(tiny_cfg(data_files), mesh=one_device_mesh())


def test_objective_masks_the_prompt_and_matches_the_library_losses(full_job):
  job = full_job
  batch = job.data.eval[0]
  # The loss mask covers the answer (and the end-of-turn token), never the prompt.
  tok = job.tokenizer
  for b in range(3):
    m = batch["loss_mask"][b, 0] > 0
    text = tok.decode(batch["targets"][b, 0][m], skip_special_tokens=True).strip()
    assert text and all(w in GOOD for w in text.split()), text
    prompt = tok.decode(batch["tokens"][b, 0][~m & (batch["segment_ids"][b, 0] > 0)])
    assert not any(w in prompt for w in GOOD), prompt
  run, state = job.run, job.run.state
  valid = np.all(batch["loss_mask"].sum(-1) > 0, -1)
  lp = numpy_seq_logps(run.model_cfg, host(state.trainable), batch)[valid]  # [n, 2]
  avg = lp / batch["loss_mask"].sum(-1)[valid]
  got = eval_batch(job, state, batch)
  assert got["loss"] == pytest.approx(math.log(2), abs=1e-6)  # policy == reference
  np.testing.assert_allclose(got["logps/chosen"], lp[:, 0].mean(), rtol=1e-5)
  np.testing.assert_allclose(got["logps/rejected"], lp[:, 1].mean(), rtol=1e-5)
  # Every loss type, one jit: the objective against the library loss on numpy log-probs.
  types = ("ipo", "hinge", "robust", "simpo", "orpo")
  mcs = {lt: dataclasses.replace(job.cfg.dpo, loss_type=lt, orpo_nll="sequence",
                                 label_smoothing=0.1 if lt == "robust" else 0.0) for lt in types}
  objs = {lt: dpo.make_objective(run.model_cfg, mcs[lt], dpo.reference_mode(
      dataclasses.replace(job.cfg, dpo=mcs[lt]))) for lt in types}
  b = loop.device_batch(batch, run.batch_sharding)
  out = jax.jit(lambda p, f, b: {lt: o(p, f, b, None) for lt, o in objs.items()})(
      state.trainable, run.frozen, b)
  beta = job.cfg.dpo.beta
  want = {"ipo": (1 / (2 * beta)) ** 2, "hinge": 1.0, "robust": math.log(2),  # h = 0 at init
          "simpo": float(losses.simpo_loss(avg[:, 0], avg[:, 1], beta=beta,
                                           gamma=job.cfg.dpo.simpo_gamma)[0]),
          "orpo": float(losses.orpo_loss(avg[:, 0], avg[:, 1], -avg[:, 0], beta=beta)[0])}
  for lt in types:
    loss_sum, (n, _) = out[lt]
    np.testing.assert_allclose(float(loss_sum) / float(n), want[lt], rtol=1e-5, err_msg=lt)


def numpy_token_logps(model_cfg, params, batch):
  """[B, 2, T] float64 log-prob of each target token, from plain decoder.forward logits."""
  b, _, t = batch["tokens"].shape
  logits = np.asarray(_forward(model_cfg)(params, batch["tokens"].reshape(2 * b, t), None),
                      np.float64)  # [2B, T, V]
  top = logits.max(-1, keepdims=True)
  logp = logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))
  picked = np.take_along_axis(logp, batch["targets"].reshape(2 * b, t)[..., None], -1)[..., 0]
  return picked.reshape(b, 2, t)


def trl_orpo_loss(tok_lp, batch, beta):
  """TRL ORPOTrainer.get_batch_loss_metrics in numpy: NLL = CrossEntropyLoss (token mean)
  over the chosen input ids shifted by one with padding masked (prompt included); odds
  ratio on the responses' average log-probs; loss = nll - mean(beta * logsigmoid)."""
  valid = np.all(batch["loss_mask"].sum(-1) > 0, -1)
  lengths = (batch["segment_ids"][:, 0] > 0).sum(-1)  # tokens per chosen sequence
  nll_sum = sum(-tok_lp[i, 0, :lengths[i] - 1].sum() for i in np.flatnonzero(valid))
  nll = nll_sum / sum(lengths[i] - 1 for i in np.flatnonzero(valid))
  mask = batch["loss_mask"][valid]
  avg = (tok_lp[valid] * mask).sum(-1) / mask.sum(-1)  # [n, 2]
  c, r = avg[:, 0], avg[:, 1]
  log_odds = (c - r) - (np.log1p(-np.exp(c)) - np.log1p(-np.exp(r)))
  return nll - np.mean(beta * -np.logaddexp(0.0, -log_odds)), nll


def test_orpo_nll_is_trls_token_mean_by_default(full_job):
  job = full_job
  run, state, batch = job.run, job.run.state, job.data.eval[0]
  assert config_lib.DpoConfig().orpo_nll == "token"
  tok_lp = numpy_token_logps(run.model_cfg, host(state.trainable), batch)
  want, want_nll = trl_orpo_loss(tok_lp, batch, job.cfg.dpo.beta)
  got = {}
  for conv in ("token", "sequence"):
    mc = dataclasses.replace(job.cfg.dpo, loss_type="orpo", orpo_nll=conv)
    obj = dpo.make_objective(run.model_cfg, mc, "none")
    loss_sum, (n, metrics) = jax.jit(lambda p, f, b: obj(p, f, b, None))(
        state.trainable, run.frozen, loop.device_batch(batch, run.batch_sharding))
    got[conv] = float(loss_sum) / float(n)
    if conv == "token":
      s, c = metrics["nll"]
      np.testing.assert_allclose(float(s) / float(c), want_nll, rtol=1e-5)
  np.testing.assert_allclose(got["token"], want, rtol=1e-5)
  # Chosen lengths vary and TRL counts the prompt: the two conventions really differ here.
  assert abs(got["sequence"] - got["token"]) > 1e-2, got


def test_dpo_raises_held_out_accuracy_and_keeps_reference_bit_identical(full_job):
  job = full_job
  run = job.run
  init = host(run.state.trainable)
  ref_before = host(run.frozen["ref"])
  before = loop.evaluate(run, run.state, job.data.eval, 0)
  state, rows = run_steps(job, run.state, 30)
  after = loop.evaluate(run, state, job.data.eval, 0)
  print("dpo held-out", before, after)
  assert before["val_loss"] == pytest.approx(math.log(2), abs=1e-6)
  assert after["val_rewards/accuracy"] > 0.9
  assert after["val_rewards/margin"] > 0 and after["val_loss"] < 0.5 * math.log(2)
  assert np.mean([r["loss"] for r in rows[-5:]]) < np.mean([r["loss"] for r in rows[:5]])
  for path, x in tree.flatten(host(run.frozen["ref"])).items():
    np.testing.assert_array_equal(x, tree.flatten(ref_before)[path], err_msg=path)
    np.testing.assert_array_equal(x, tree.flatten(init)[path], err_msg=path)
  moved = tree.flatten(host(state.trainable))
  assert any(not np.array_equal(moved[p], x) for p, x in tree.flatten(init).items())
  # After training the rewards are far from 0: the objective still matches numpy.
  batch = job.data.eval[0]
  valid = np.all(batch["loss_mask"].sum(-1) > 0, -1)
  pol = numpy_seq_logps(run.model_cfg, host(state.trainable), batch)[valid]
  ref = numpy_seq_logps(run.model_cfg, ref_before, batch)[valid]
  got = eval_batch(job, state, batch)
  want, wm = losses.dpo_loss(pol[:, 0], pol[:, 1], ref[:, 0], ref[:, 1], beta=0.1)
  np.testing.assert_allclose(got["loss"], float(want), rtol=1e-4, atol=1e-6)
  for k in ("rewards/chosen", "rewards/rejected", "rewards/margin", "rewards/accuracy"):
    np.testing.assert_allclose(got[k], float(wm[k]), rtol=1e-4, atol=1e-5, err_msg=k)


def test_lora_adapters_off_reference_starts_at_log2_and_trains(data_files):
  job = setup.prepare(tiny_cfg(data_files, peft="lora"), mesh=one_device_mesh())
  run = job.run
  assert set(run.frozen) == {"base"}  # no second copy of the weights
  assert dpo.reference_mode(job.cfg) == "adapters_off"
  base = host(run.frozen["base"])
  batch = job.data.eval[0]
  got = eval_batch(job, run.state, batch)
  assert got["loss"] == pytest.approx(math.log(2), abs=1e-6)
  # At init (B = 0) the policy's log-probs are the base's.
  valid = np.all(batch["loss_mask"].sum(-1) > 0, -1)
  np.testing.assert_allclose(got["logps/chosen"],
                             numpy_seq_logps(run.model_cfg, base, batch)[valid, 0].mean(),
                             rtol=1e-5)
  state, rows = run_steps(job, run.state, 30)
  after = loop.evaluate(run, state, job.data.eval, 0)
  print("lora dpo held-out", after)
  assert after["val_rewards/accuracy"] > 0.9
  assert np.mean([r["loss"] for r in rows[-5:]]) < math.log(2) - 0.1
  for path, x in tree.flatten(host(run.frozen["base"])).items():
    np.testing.assert_array_equal(x, tree.flatten(base)[path], err_msg=path)


def test_precomputed_reference_equals_frozen_reference(data_files):
  cfg = tiny_cfg(data_files, reference="precomputed")
  job = setup.prepare(cfg, mesh=one_device_mesh())
  run = job.run
  table = host(run.frozen["ref_table"])
  assert set(run.frozen) == {"ref_table"}  # no copy of the weights
  assert table["keys"].shape == (256 + 64, 2) and table["logps"].shape == (320, 2, 2)
  init = jax.tree_util.tree_map(lambda x: x.copy(), run.state.trainable)
  state, rows = run_steps(job, run.state, 4)
  assert rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)
  assert all(r["ref/missing"] == 0 for r in rows)
  frozen_obj = jax.jit(dpo.make_objective(run.model_cfg, cfg.dpo, "frozen"))
  for batch in job.data.eval:
    got = eval_batch(job, state, batch)
    want_sum, (n, want_m) = frozen_obj(state.trainable, {"ref": init},
                                       loop.device_batch(batch, run.batch_sharding), None)
    assert got["ref/missing"] == 0
    np.testing.assert_allclose(got["loss"], float(want_sum / n), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got["rewards/margin"], float(want_m["rewards/margin"][0] / n),
                               rtol=1e-4, atol=1e-5)


def test_chunked_logits_give_the_same_loss_and_grads(full_job):
  """model.logits_chunk > 0 never builds [2B, T, V] logits; values and grads are the same."""
  run = full_job.run
  ref = run.frozen["ref"]  # never donated: safe whatever ran before
  batch = loop.device_batch(full_job.data.eval[0], run.batch_sharding)
  mc = dataclasses.replace(full_job.cfg.dpo, loss_type="ipo")  # needs avg log-probs too

  def loss_and_grads(model_cfg):
    obj = dpo.make_objective(model_cfg, mc, "frozen")
    return jax.jit(jax.value_and_grad(lambda p: obj(p, {"ref": ref}, batch, None)[0]))(ref)

  full, g_full = loss_and_grads(run.model_cfg)
  chunked, g_chunked = loss_and_grads(dataclasses.replace(run.model_cfg, logits_chunk=40))
  np.testing.assert_allclose(float(chunked), float(full), rtol=1e-6)
  for path, g in tree.flatten(host(g_full)).items():  # |g| up to ~20: float32 sum order
    np.testing.assert_allclose(tree.flatten(host(g_chunked))[path], g, rtol=1e-4,
                               atol=1e-6 * np.abs(g).max(), err_msg=path)


def test_objective_sums_add_over_micro_batches_and_ignore_padding_rows(full_job):
  """Sums, not means: two halves add up to the whole (what exact grad accumulation needs),
  and all-padding rows (the tail of the last eval batch) contribute nothing."""
  run = full_job.run
  ref = run.frozen["ref"]
  obj = jax.jit(dpo.make_objective(run.model_cfg, full_job.cfg.dpo, "frozen"))
  # A policy away from the reference, so every term is non-trivial.
  policy = jax.tree_util.tree_map(lambda x: x * 1.01, ref)
  host_batch = full_job.data.eval[0]
  whole = obj(policy, {"ref": ref}, host_batch, None)
  halves = [obj(policy, {"ref": ref}, {k: v[i::2] for k, v in host_batch.items()}, None)
            for i in range(2)]
  summed = jax.tree_util.tree_map(lambda a, b: a + b, *halves)
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5),
                         summed, whole)
  padded = {k: np.concatenate([v[:8], np.zeros_like(v[:8])]) for k, v in host_batch.items()}
  half = {k: v[:8] for k, v in host_batch.items()}
  a, b = obj(policy, {"ref": ref}, padded, None), obj(policy, {"ref": ref}, half, None)
  jax.tree_util.tree_map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-5),
                         a, b)
  assert float(a[1][0]) == 8


def test_bad_settings_are_config_errors(data_files):
  with pytest.raises(config_lib.ConfigError, match="adapters_off needs peft"):
    dpo.reference_mode(tiny_cfg(data_files, reference="adapters_off"))
  with pytest.raises(config_lib.ConfigError, match="dpo.loss_type"):
    dpo.reference_mode(tiny_cfg(data_files, loss_type="kto"))
