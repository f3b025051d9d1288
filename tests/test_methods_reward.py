"""method=reward: Bradley-Terry training raises held-out accuracy, and the HF export
(AutoModelForSequenceClassification, num_labels=1) scores right-padded pairs like jaxtune."""

import dataclasses
import os

import jax
import numpy as np
import pytest
import torch
import transformers

import jaxtune
from jaxtune import data as data_lib
from jaxtune import tree
from jaxtune.hf import reward as hf_reward
from jaxtune.peft import lora
from jaxtune.train import loop
from jaxtune import methods
from jaxtune.methods import reward
from jaxtune.train import setup
from tests import hf_models
from tests import test_methods_dpo as dpo_tests


@pytest.fixture(scope="module")
def data_files(tmp_path_factory):
  d = tmp_path_factory.mktemp("pref")
  return (dpo_tests.write_pairs(os.path.join(d, "train.jsonl"), 256, 0),
          dpo_tests.write_pairs(os.path.join(d, "eval.jsonl"), 64, 1))


def tiny_cfg(data_files, peft="none"):
  cfg = dpo_tests.tiny_cfg(data_files, peft=peft)
  return dataclasses.replace(cfg, method="reward",
                             optim=dataclasses.replace(cfg.optim, lr=3e-3))


def hf_scores(hf_dir, tokens, segment_ids):
  """Scores [N] from transformers, right-padded rows; HF pools the last non-pad token."""
  model = transformers.AutoModelForSequenceClassification.from_pretrained(hf_dir).eval()
  assert model.config.num_labels == 1 and model.config.pad_token_id is not None
  with torch.no_grad():
    out = model(input_ids=torch.as_tensor(tokens, dtype=torch.long),
                attention_mask=torch.as_tensor(segment_ids > 0, dtype=torch.long))
  return out.logits[:, 0].float().numpy()


def rows_of(batch):
  """Non-empty rows of a [B, 2, T] batch as [N, T] tokens and segment ids."""
  t = batch["tokens"].shape[-1]
  tokens, seg = batch["tokens"].reshape(-1, t), batch["segment_ids"].reshape(-1, t)
  keep = seg.sum(-1) > 0
  return tokens[keep], seg[keep]


def check_export(job_like, state, out_dir, batch):
  reward.export(job_like, state, out_dir, {})
  tokens, seg = rows_of(batch)
  pad = job_like.tokenizer.pad_token_id
  assert not np.any((tokens == pad) & (seg > 0))  # the pad id is not inside any sequence
  params, head = reward.split_trainable(job_like, state.trainable)
  ours = np.asarray(reward.score(job_like.model_cfg, params, head, tokens, seg,
                                 pad_id=reward.export_pad_id(job_like)))
  theirs = hf_scores(out_dir, tokens, seg)
  np.testing.assert_allclose(theirs, ours, atol=1e-4, rtol=0)
  cfg, p2, h2 = hf_reward.load(out_dir)
  np.testing.assert_allclose(np.asarray(reward.score(cfg, p2, h2, tokens, seg)), ours,
                             atol=1e-5, rtol=0)
  return float(np.max(np.abs(theirs - ours)))


def test_reward_model_learns_held_out_preferences_and_exports_to_hf(data_files, tmp_path):
  job = setup.prepare(tiny_cfg(data_files), mesh=dpo_tests.one_device_mesh())
  run = job.run
  assert reward.HEAD in run.state.trainable
  head0 = np.asarray(run.state.trainable[reward.HEAD]["kernel"])
  assert head0.shape == (run.model_cfg.hidden_size, 1) and not head0.any()  # zero init
  state, rows = dpo_tests.run_steps(job, run.state, 30)
  after = loop.evaluate(run, state, job.data.eval, 0)
  print("reward held-out", after)
  assert rows[0]["loss"] == pytest.approx(np.log(2), abs=1e-6)  # all scores start at 0
  assert after["val_rewards/accuracy"] > 0.9 and after["val_rewards/margin"] > 0
  assert np.mean([r["loss"] for r in rows[-5:]]) < np.mean([r["loss"] for r in rows[:5]])
  assert not np.array_equal(np.asarray(state.trainable[reward.HEAD]["kernel"]), head0)
  ctx = _ctx(job)
  diff = check_export(ctx, state, str(tmp_path / "rm"), job.data.eval[0])
  print("reward export max |hf - jaxtune|", diff)
  # The scores rank the held-out pairs as the eval metric says.
  batch = job.data.eval[1]
  params, head = reward.split_trainable(ctx, state.trainable)
  s = np.asarray(reward.score(run.model_cfg, params, head,
                              batch["tokens"].reshape(-1, batch["tokens"].shape[-1]),
                              batch["segment_ids"].reshape(-1, batch["tokens"].shape[-1])))
  valid = np.all(batch["loss_mask"].sum(-1) > 0, -1)
  assert np.mean((s[0::2] > s[1::2])[valid]) > 0.9


def _ctx(job):
  """The methods.Context the job was prepared with (export needs model_cfg, params, ...)."""
  return methods.Context(cfg=job.cfg, model_cfg=job.run.model_cfg, mesh=job.run.mesh,
                         params=None, adapters=None, tokenizer=job.tokenizer, data=job.data)


def test_lora_reward_trains_adapters_and_head_and_exports(data_files, tmp_path):
  cfg = tiny_cfg(data_files, peft="lora")
  # What setup.prepare does with the hook: the head joins the adapter tree.
  mesh = dpo_tests.one_device_mesh()
  tok = data_lib.tokenizer_from_config(cfg)
  ds = data_lib.build(cfg.data, tok, kind="preference")
  model_cfg, params = setup.load_weights(cfg, mesh, tok)
  adapters = lora.init_from_config(model_cfg, params, cfg.peft, key=jax.random.PRNGKey(2))
  ctx = methods.Context(cfg=cfg, model_cfg=model_cfg, mesh=mesh, params=params,
                        adapters=adapters, tokenizer=tok, data=ds)
  extra, extra_axes = reward.extra_trainable(ctx)
  adapters = dataclasses.replace(adapters, params={**adapters.params, **extra})
  axes = {**lora.axes(model_cfg, dataclasses.replace(adapters, params={
      "layers": adapters.params["layers"]})).params, **extra_axes}
  ctx = dataclasses.replace(ctx, adapters=adapters)
  obj = reward.make_objective(model_cfg, cfg.reward, pad_id=reward.export_pad_id(ctx),
                              adapters=adapters)
  run = setup.build(cfg, mesh, params, model_cfg, objective=obj, adapters=adapters,
                    adapter_axes=axes)
  base = jax.tree_util.tree_map(np.asarray, params)
  init = tree.flatten(jax.tree_util.tree_map(np.asarray, run.state.trainable))
  state = run.state
  for _ in range(20):
    state, m = run.train_step(state, run.frozen, loop.device_batch(next(ds.train),
                                                                   run.batch_sharding))
  trained = tree.flatten(jax.tree_util.tree_map(np.asarray, state.trainable))
  assert not np.array_equal(trained["score/kernel"], init["score/kernel"])
  assert any(not np.array_equal(trained[p], init[p]) for p in init if p.endswith("/b"))
  for p, x in tree.flatten(jax.tree_util.tree_map(np.asarray, run.frozen["base"])).items():
    np.testing.assert_array_equal(x, tree.flatten(base)[p], err_msg=p)
  check_export(ctx, state, str(tmp_path / "rm_lora"), ds.eval[0])


@pytest.mark.parametrize("family", ["llama2", "qwen2", "qwen3"])
def test_export_parity_across_families(family, tmp_path):
  hf = hf_models.make(family, pad_token_id=0)
  hf.save_pretrained(tmp_path / "lm", safe_serialization=True)
  cfg, params = jaxtune.load_hf(str(tmp_path / "lm"))
  head = reward.init_head(cfg, jax.random.PRNGKey(0), std=0.5)
  hf_reward.save(cfg, params, head, str(tmp_path / "rm"))
  rng = np.random.RandomState(0)
  tokens = rng.randint(3, cfg.vocab_size, (4, 12)).astype(np.int32)
  seg = np.ones_like(tokens)
  for i, n in enumerate([12, 9, 5, 1]):  # right padding with the pad id 0
    tokens[i, n:], seg[i, n:] = 0, 0
  ours = np.asarray(reward.score(cfg, params, head, tokens, seg))
  np.testing.assert_allclose(hf_scores(str(tmp_path / "rm"), tokens, seg), ours, atol=1e-4)
  with pytest.raises(ValueError, match="ForSequenceClassification"):
    hf_reward.load(str(tmp_path / "lm"))


LLAMA3_STYLE = ("{%- for message in messages -%}{{- '<|im_start|>' + message['role'] + '\\n' + "
                "message['content'] + '<|im_end|>' -}}{%- endfor -%}{%- if add_generation_prompt "
                "-%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}")


def _tokenizer_dir(tmp_path, pad):
  """The bundled tokenizer made Llama-3-like: every turn ends with eos (<|im_end|>, no
  newline after it); pad='none' removes the pad token (data pads with eos), pad='eos'
  sets pad = eos as users do for Llama 3 / Mistral."""
  tok = data_lib.load_tokenizer("")
  tok.chat_template = LLAMA3_STYLE
  tok.pad_token = tok.eos_token if pad == "eos" else None
  out = str(tmp_path / f"tok_{pad}")
  tok.save_pretrained(out)
  back = data_lib.load_tokenizer(out)
  assert back.pad_token_id == (back.eos_token_id if pad == "eos" else None)
  return out


@pytest.mark.parametrize("pad", ["none", "eos"])
def test_export_pools_where_training_pools_when_pad_is_eos(pad, data_files, tmp_path):
  """Sequences end with eos = the exported pad id: HF pools the token before it, and so
  must training, `score` and a model imported back from HF (1e-5)."""
  cfg = tiny_cfg(data_files)
  cfg = dataclasses.replace(cfg, data=dataclasses.replace(
      cfg.data, tokenizer=_tokenizer_dir(tmp_path, pad), chat_template=""))
  job = setup.prepare(cfg, mesh=dpo_tests.one_device_mesh())
  ctx = _ctx(job)
  eos = job.tokenizer.eos_token_id
  assert reward.export_pad_id(ctx) == eos
  head = reward.init_head(job.run.model_cfg, jax.random.PRNGKey(1), std=0.5)
  state = dataclasses.replace(job.run.state, trainable={**job.run.state.trainable,
                                                        reward.HEAD: head})
  batch = job.data.eval[0]
  tokens, seg = rows_of(batch)
  last = (seg > 0).sum(-1) - 1
  assert np.all(tokens[np.arange(len(tokens)), last] == eos)  # every sequence ends with eos
  out = str(tmp_path / f"rm_{pad}")
  reward.export(ctx, state, out, {})
  params, head = reward.split_trainable(ctx, state.trainable)
  ours = np.asarray(reward.score(job.run.model_cfg, params, head, tokens, seg, pad_id=eos))
  theirs = hf_scores(out, tokens, seg)
  np.testing.assert_allclose(theirs, ours, atol=1e-5, rtol=0)
  # The last token (eos) would score differently: the test would catch the old pooling.
  at_eos = np.asarray(reward.score(job.run.model_cfg, params, head, tokens, seg, pad_id=-1))
  assert np.max(np.abs(at_eos - theirs)) > 1e-2
  # Training pools the same token: the objective's chosen rewards are these scores.
  valid = np.all(batch["loss_mask"].sum(-1) > 0, -1)
  got = dpo_tests.eval_batch(job, state, batch)
  full = np.asarray(reward.score(job.run.model_cfg, params, head,
                                 batch["tokens"].reshape(-1, seg.shape[-1]),
                                 batch["segment_ids"].reshape(-1, seg.shape[-1]), pad_id=eos))
  np.testing.assert_allclose(got["rewards/chosen"], full[0::2][valid].mean(), atol=1e-5)
  np.testing.assert_allclose(got["rewards/rejected"], full[1::2][valid].mean(), atol=1e-5)
  # Importing the HF reward model back: its config carries the pad id, score agrees.
  cfg2, p2, h2 = hf_reward.load(out)
  assert cfg2.pad_token_id == eos
  np.testing.assert_allclose(np.asarray(reward.score(cfg2, p2, h2, tokens, seg)), theirs,
                             atol=1e-5, rtol=0)
