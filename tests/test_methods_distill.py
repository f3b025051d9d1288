"""method=distill: a tiny student halves its held-out KL to a (different-size) teacher; the
teacher stays frozen, is sharded by its own axes, and may be 4-bit; LoRA students train; a
precomputed top-k file gives the in-step teacher's loss on packed rows."""

import dataclasses

import jax
import numpy as np
import pytest

from jaxtune import config as config_lib
from jaxtune import quant
from jaxtune import tree
from jaxtune.hf import io as hf_io
from jaxtune.models import decoder
from jaxtune.methods import distill
from jaxtune.methods import distill_onpolicy as onpolicy
from jaxtune.train import loop
from jaxtune.train import setup
from tests import launch_utils as lu
from tests import test_methods_dpo as dpo_tests

TEACHER = config_lib.ModelConfig(vocab_size=512, hidden_size=48, intermediate_size=96,
                                 num_layers=2, num_heads=4, num_kv_heads=2, head_dim=12,
                                 tie_word_embeddings=False, bos_token_id=1, eos_token_id=(2,),
                                 pad_token_id=0)


def make_teacher(out_dir: str, *, vocab: int = 512) -> str:
  """A random teacher (wider than the student) with peaked next-token distributions."""
  cfg = dataclasses.replace(TEACHER, vocab_size=vocab)
  params = decoder.init(cfg, jax.random.PRNGKey(7))
  params["lm_head"]["kernel"] = params["lm_head"]["kernel"] * 3.0  # logits std ~3
  hf_io.save_hf(cfg, params, out_dir)
  return out_dir


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
  return make_teacher(str(tmp_path_factory.mktemp("teacher") / "hf"))


def tiny_cfg(teacher, **kw):
  peft = kw.pop("peft", "none")
  return config_lib.TrainConfig(
      method="distill",
      model=config_lib.ModelConfig(hidden_size=32, intermediate_size=64, num_layers=2,
                                   num_heads=4, num_kv_heads=2, head_dim=8),
      peft=config_lib.PeftConfig(method=peft, rank=8, alpha=16.0, quant_group_size=16),
      optim=config_lib.OptimConfig(lr=1e-2, warmup_steps=2, schedule="constant"),
      data=config_lib.DataConfig(seq_len=64, batch_size=16),
      train=config_lib.LoopConfig(max_steps=40, progress=False),
      distill=config_lib.DistillConfig(teacher_path=teacher, **kw))


def test_student_halves_held_out_kl_and_teacher_stays_frozen(teacher_dir):
  job = setup.prepare(tiny_cfg(teacher_dir), mesh=dpo_tests.one_device_mesh())
  run = job.run
  teacher0 = dpo_tests.host(run.frozen["teacher"])
  assert teacher0["embed_tokens"]["embedding"].shape[1] == 48  # a different size
  before = loop.evaluate(run, run.state, job.data.eval, 0)
  # The objective's KL is forward KL(teacher || student) over the loss mask, from the two
  # models' own logits on the packed batch.
  batch = job.data.eval[0]
  s_logits = decoder.forward(run.model_cfg, run.state.trainable, batch["tokens"],
                             positions=batch["positions"], segment_ids=batch["segment_ids"])
  t_cfg = distill.teacher_config(job.cfg)
  t_logits = decoder.forward(t_cfg, run.frozen["teacher"], batch["tokens"],
                             positions=batch["positions"], segment_ids=batch["segment_ids"])
  p = np.asarray(jax.nn.log_softmax(t_logits), np.float64)
  q = np.asarray(jax.nn.log_softmax(s_logits), np.float64)
  kl = (np.exp(p) * (p - q)).sum(-1)
  m = batch["loss_mask"]
  out = dpo_tests.host(run.eval_step(run.state.trainable, run.frozen,
                                     loop.device_batch(batch, run.batch_sharding)))
  np.testing.assert_allclose(out["kl_to_teacher"][0] / out["kl_to_teacher"][1],
                             (kl * m).sum() / m.sum(), rtol=1e-5)
  assert out["loss"][1] == m.sum()

  state, rows = dpo_tests.run_steps(job, run.state, 40)
  after = loop.evaluate(run, state, job.data.eval, 0)
  ratio = after["val_kl_to_teacher"] / before["val_kl_to_teacher"]
  print("distill held-out KL", before["val_kl_to_teacher"], "->", after["val_kl_to_teacher"],
        f"(x{ratio:.3f})")
  assert ratio < 0.5
  assert rows[-1]["kl_to_teacher"] < rows[0]["kl_to_teacher"]
  for path, x in tree.flatten(dpo_tests.host(run.frozen["teacher"])).items():
    np.testing.assert_array_equal(x, tree.flatten(teacher0)[path], err_msg=path)


def test_lora_student_with_4bit_teacher_sharded_by_its_own_axes(teacher_dir):
  cfg = tiny_cfg(teacher_dir, peft="lora", teacher_quant="nf4", kind="jsd",
                 beta=0.5, alpha=0.5, temperature=2.0, top_k=32)
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:2]).reshape(1, 2, 1), ("data", "fsdp",
                                                                          "tensor"))
  job = setup.prepare(cfg, mesh=mesh)  # fsdp=2
  run = job.run
  t = tree.flatten(run.frozen["teacher"])
  assert isinstance(t["layers/mlp/up_proj/kernel"], quant.QArray)
  emb = t["embed_tokens/embedding"]  # [V, 48]: 'embed' -> fsdp
  assert emb.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp"), emb.sharding.spec
  assert emb.shape == (512, 48)
  state, rows = dpo_tests.run_steps(job, run.state, 12)
  assert {"kl_to_teacher", "distill", "ce"} <= set(rows[0])
  assert np.mean([r["loss"] for r in rows[-3:]]) < np.mean([r["loss"] for r in rows[:3]])
  assert np.mean([r["kl_to_teacher"] for r in rows[-3:]]) < rows[0]["kl_to_teacher"]
  # loss = alpha * jsd_T(top-k) + (1 - alpha) * ce, on the logged token means.
  r = rows[-1]
  np.testing.assert_allclose(r["loss"], 0.5 * r["distill"] + 0.5 * r["ce"], rtol=1e-5)
  assert not (r["distill"] == pytest.approx(r["kl_to_teacher"]))


def test_precomputed_top_k_file_matches_the_in_step_teacher(teacher_dir, tmp_path):
  k = 16
  path = str(tmp_path / "teacher_top16.safetensors")
  # The tool, as from the command line, with the data settings of the run below.
  lu.run("teacher_logits.py", f"--config=configs/distill.py:{teacher_dir}", f"--out={path}",
         f"--top_k={k}", "--set=data.seq_len=128")
  cfg = tiny_cfg("", teacher_logits_file=path, top_k=k)
  cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, seq_len=128))
  job = setup.prepare(cfg, mesh=dpo_tests.one_device_mesh())
  run = job.run
  assert set(run.frozen) == {distill.TABLE}  # no teacher weights on the devices
  assert run.frozen[distill.TABLE]["ids"].shape[1] == k
  # Same student, same packed eval batches: the file gives the in-step teacher's top-k loss.
  with_teacher = tiny_cfg(teacher_dir, top_k=k)
  t_cfg = distill.teacher_config(with_teacher)
  t_params = distill.load_teacher(with_teacher, run.mesh)
  in_step = jax.jit(distill.make_objective(run.model_cfg, t_cfg, with_teacher.distill,
                                           vocab=512))
  batches = job.data.eval + [next(job.data.train) for _ in range(2)]
  assert max(b["segment_ids"].max() for b in batches) > 1  # packed rows
  for batch in batches:
    b = loop.device_batch(batch, run.batch_sharding)
    got = dpo_tests.host(run.eval_step(run.state.trainable, run.frozen, b))
    want_sum, (n, _) = in_step(run.state.trainable, {"teacher": t_params}, b, None)
    assert got["teacher/missing"][0] == 0
    np.testing.assert_allclose(got["loss"][0], float(want_sum), rtol=1e-5)
    assert got["loss"][1] == float(n)
  state, rows = dpo_tests.run_steps(job, run.state, 10)
  assert all(r["teacher/missing"] == 0 for r in rows)
  assert all(r["distill"] == pytest.approx(r["kl_to_teacher"], rel=1e-5) for r in rows)
  assert np.mean([r["loss"] for r in rows[-3:]]) < np.mean([r["loss"] for r in rows[:3]])


def test_distill_config_errors(teacher_dir, tmp_path):
  with pytest.raises(config_lib.ConfigError, match="teacher_path"):
    distill.teacher_config(tiny_cfg(""))
  with pytest.raises(config_lib.ConfigError, match="teacher_logits_file"):
    distill.check(tiny_cfg(teacher_dir, teacher_logits_file="x.safetensors"))
  small = make_teacher(str(tmp_path / "small_vocab"), vocab=300)
  student = dataclasses.replace(TEACHER, hidden_size=32)
  with pytest.raises(config_lib.ConfigError, match="does not cover the tokenizer"):
    distill.common_vocab(student, distill.teacher_config(tiny_cfg(small)), [0] * 512)
  # A loss mixing weight outside [0, 1] is named.
  with pytest.raises(config_lib.ConfigError, match="distill.alpha"):
    distill.check(tiny_cfg(teacher_dir, alpha=1.5))


# -- on-policy distillation (GKD): the student's own samples, scored by the teacher ---------

def onpolicy_cfg(teacher, **kw):
  cfg = tiny_cfg(teacher, kind="reverse_kl", on_policy=1.0, max_new_tokens=16, **kw)
  return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, pack=False, batch_size=8))


def _np_logsoftmax(x):
  z = x - x.max(-1, keepdims=True)
  return z - np.log(np.exp(z).sum(-1, keepdims=True))


def test_on_policy_loss_is_reverse_kl_on_the_students_samples(teacher_dir, tmp_path):
  """Fixed samples: rows keep the data's prompts, the responses are the student's samples,
  and the step's loss equals KL(student || teacher) computed in numpy from transformers'
  logits of both models (the student exported to HF) over the sampled tokens."""
  import torch
  import transformers
  job = setup.prepare(onpolicy_cfg(teacher_dir), mesh=dpo_tests.one_device_mesh())
  run = job.run
  data = job.data.eval[0]
  prompts = onpolicy.split_prompts(data)
  batch = onpolicy.student_batch(run.model_cfg, run.state.trainable, data,
                                 jax.random.PRNGKey(3), max_new_tokens=16, temperature=1.0,
                                 seq_len=64, pad_id=0)
  assert set(batch) == set(data)
  changed = 0
  for b, row in enumerate(prompts):
    if row is None:
      assert batch["loss_mask"][b].sum() == 0
      continue
    p = row[0]
    n = int((batch["segment_ids"][b] > 0).sum())
    np.testing.assert_array_equal(batch["tokens"][b, :len(p)], p)  # the data's prompt
    want_mask = np.zeros(64)
    want_mask[len(p) - 1:n - 1] = 1  # every sampled token is a loss target
    np.testing.assert_array_equal(batch["loss_mask"][b], want_mask)
    changed += not np.array_equal(batch["tokens"][b, :n], data["tokens"][b, :n])
  assert changed > 0
  out = dpo_tests.host(run.eval_step(run.state.trainable, run.frozen,
                                     loop.device_batch(batch, run.batch_sharding)))
  got = out["loss"][0] / out["loss"][1]
  # Reference: transformers forward of the exported student and of the teacher, numpy KL.
  hf_io.save_hf(run.model_cfg, dpo_tests.host(run.state.trainable), str(tmp_path / "student"))
  models = [transformers.AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
            for d in (str(tmp_path / "student"), teacher_dir)]
  vocab = min(run.model_cfg.vocab_size, TEACHER.vocab_size)
  num = den = 0.0
  for b in range(batch["tokens"].shape[0]):
    n = int((batch["segment_ids"][b] > 0).sum())
    if not batch["loss_mask"][b].any():
      continue
    ids = torch.tensor(batch["tokens"][b:b + 1, :n].astype(np.int64))
    with torch.no_grad():
      q, p = (_np_logsoftmax(m(ids).logits[0].double().numpy()[:, :vocab]) for m in models)
    kl = (np.exp(q) * (q - p)).sum(-1)  # [n]
    m = batch["loss_mask"][b, :n]
    num, den = num + (kl * m).sum(), den + m.sum()
  np.testing.assert_allclose(got, num / den, rtol=1e-4)


def test_on_policy_run_lowers_the_divergence_on_student_samples(teacher_dir):
  """30 on-policy steps (through Method.batches, as the loop runs them) lower the reverse KL
  to the teacher measured on fresh student samples of held-out prompts (fixed key)."""
  job = setup.prepare(onpolicy_cfg(teacher_dir), mesh=dpo_tests.one_device_mesh())
  run = job.run

  def held_out_kl(state):
    total = count = 0.0
    for data in job.data.eval:
      batch = onpolicy.student_batch(run.model_cfg, state.trainable, data,
                                     jax.random.PRNGKey(11), max_new_tokens=16,
                                     temperature=1.0, seq_len=64, pad_id=0)
      out = dpo_tests.host(run.eval_step(state.trainable, run.frozen,
                                         loop.device_batch(batch, run.batch_sharding)))
      total, count = total + out["distill"][0], count + out["distill"][1]
    return total / count

  before = held_out_kl(run.state)
  batches = job.method.batches(job.ctx, run)
  rows = []
  for _ in range(30):
    run.state, m = run.train_step(run.state, run.frozen,
                                  loop.device_batch(next(batches), run.batch_sharding))
    rows.append({k: float(v) for k, v in m.items()})
  after = held_out_kl(run.state)
  print(f"on-policy reverse KL on student samples: {before:.3f} -> {after:.3f}")
  assert all(r["on_policy"] == 1.0 for r in rows)
  assert after < 0.6 * before, (before, after)


def test_on_policy_settings_are_checked(teacher_dir):
  with pytest.raises(config_lib.ConfigError, match="data.pack=false"):
    distill.check(tiny_cfg(teacher_dir, on_policy=0.5))
  with pytest.raises(config_lib.ConfigError, match="distill.alpha=1"):
    distill.check(onpolicy_cfg(teacher_dir, alpha=0.5))
  with pytest.raises(config_lib.ConfigError, match="distill.on_policy"):
    distill.check(tiny_cfg(teacher_dir, on_policy=1.5))
