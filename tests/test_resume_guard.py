"""The resume guard (jaxtune/train/resume.py): a workdir resumes only the run that wrote it.

Meaning-changing keys are refused in one line naming each key with old -> new, before data
or weights are touched; safe keys proceed; --allow_changed lets named keys through and is
recorded; changed data content and changed base weights are caught by content; restoring
onto another device count works."""

import dataclasses
import os
import shutil
import time

import jax
import numpy as np
import pytest
import safetensors.numpy

from jaxtune import checkpoint as checkpoint_lib
from jaxtune import config as config_lib
from jaxtune import sharding
from jaxtune.models import decoder
from jaxtune.train import loop
from jaxtune.train import resume
from tests import launch_utils as lu

TINY = "--config=configs/tiny_test.py"


# ----------------------------------------------------------------------------- unit level


def _cfg(**sections) -> dict:
  cfg = config_lib.TrainConfig()
  for name, fields in sections.items():
    cfg = dataclasses.replace(cfg, **{name: dataclasses.replace(getattr(cfg, name), **fields)})
  return config_lib.to_dict(cfg)


def _judge(old: dict, new_cfg: dict, allow=()):
  cfg = config_lib.from_dict(config_lib.TrainConfig, new_cfg)
  guard = resume.Guard("/runs/x/checkpoints", 8, {"config": old}, cfg, allow)
  guard.check_config({})
  return guard


def test_meaning_changes_are_refused_in_one_line_naming_each_key():
  old = _cfg(peft={"method": "lora"})
  new = _cfg(peft={"method": "lora", "alpha": 64.0, "rank": 4}, model={"num_layers": 2},
             train={"max_steps": 999, "log_every": 5}, checkpoint={"every_steps": 7})
  with pytest.raises(resume.ResumeError) as e:
    _judge(old, new)
  msg = str(e.value)
  assert "\n" not in msg
  for part in ("model.num_layers 4 -> 2", "peft.alpha 16.0 -> 64.0", "peft.rank 8 -> 4",
               "--allow_changed=model.num_layers,peft.alpha,peft.rank"):
    assert part in msg, msg
  assert "max_steps" not in msg and "every_steps" not in msg  # safe keys are not refused


@pytest.mark.parametrize("section,fields", [
    ("train", {"max_steps": 10, "eval_every": 3, "eval_batches": 1, "progress": False,
               "early_stopping_patience": 2, "max_skipped": 1}),
    ("checkpoint", {"every_steps": 3, "keep": 9, "keep_best": "val_loss", "export_hf": False}),
    ("mesh", {"fsdp": 2, "tensor": 4}),
    # compute options: the same model and update
    ("model", {"remat": "full", "attention": "xla", "logits_chunk": 64, "dtype": "bfloat16",
               "logits_dtype": "compute", "moe_impl": "ragged"}),
    ("dpo", {"beta": 0.5}),  # another method's section: unused by an sft run
])
def test_safe_changes_proceed(section, fields):
  guard = _judge(_cfg(), _cfg(**{section: fields}))
  assert guard.allowed == []


@pytest.mark.parametrize("section,fields,key", [
    ("optim", {"lr": 1.0}, "optim.lr"),
    ("data", {"seq_len": 64}, "data.seq_len"),
    ("data", {"pack": False}, "data.pack"),
    ("train", {"seed": 3}, "train.seed"),
    ("model", {"param_dtype": "bfloat16"}, "model.param_dtype"),
])
def test_other_keys_are_guarded(section, fields, key):
  with pytest.raises(resume.ResumeError, match=key.replace(".", r"\.")):
    _judge(_cfg(), _cfg(**{section: fields}))


def test_the_method_section_is_guarded_only_for_its_method():
  with pytest.raises(resume.ResumeError, match=r"dpo\.beta 0\.1 -> 0\.5"):
    _judge(_cfg() | {"method": "dpo"}, _cfg(dpo={"beta": 0.5}) | {"method": "dpo"})


def test_allow_changed_lets_named_keys_and_sections_through_and_records_them():
  old = _cfg(peft={"method": "lora"})
  new = _cfg(peft={"method": "lora", "alpha": 64.0, "rank": 4}, optim={"lr": 0.1})
  guard = _judge(old, new, allow=("peft", "optim.lr"))
  assert {(c["key"], c["old"], c["new"]) for c in guard.allowed} == {
      ("peft.alpha", "16.0", "64.0"), ("peft.rank", "8", "4"), ("optim.lr", "0.003", "0.1")}
  assert all(c["step"] == 8 for c in guard.allowed)
  with pytest.raises(resume.ResumeError, match="optim.lr"):
    _judge(old, new, allow=("peft",))
  with pytest.raises(config_lib.ConfigError, match="--allow_changed: unknown config key"):
    _judge(old, new, allow=("peft.alhpa",))


def _write_model(path, seed):
  os.makedirs(path, exist_ok=True)
  rng = np.random.RandomState(seed)
  safetensors.numpy.save_file({"w": rng.randn(4, 300_000).astype(np.float32)},
                              os.path.join(path, "model.safetensors"))
  with open(os.path.join(path, "config.json"), "w") as f:
    f.write('{"model_type": "llama"}')


def test_base_weights_are_identified_by_content(tmp_path):
  a, b, c = (str(tmp_path / n) for n in "abc")
  _write_model(a, 0)
  shutil.copytree(a, b)  # the same weights elsewhere
  _write_model(c, 1)  # the same shapes, other values
  ia, ib, ic = (resume.weights_identity(p) for p in (a, b, c))
  assert ia["digest"] == ib["digest"] != ic["digest"]
  old = _cfg(model={"hf_path": a})
  saved = {"config": old, "identity": {"base": ia}}
  resume.Guard("/r/checkpoints", 4, saved, config_lib.from_dict(
      config_lib.TrainConfig, _cfg(model={"hf_path": b})), ()).check_config({"base": ib})
  guard = resume.Guard("/r/checkpoints", 4, saved, config_lib.from_dict(
      config_lib.TrainConfig, _cfg(model={"hf_path": a})), ())
  with pytest.raises(resume.ResumeError, match=r"model\.hf_path .*content .* -> .*content"):
    guard.check_config({"base": ic})  # same path, rewritten weights


# ----------------------------------------------------------------------------- in the loop


def tiny_cfg(train_file: str, **peft) -> config_lib.TrainConfig:
  return config_lib.TrainConfig(
      model=config_lib.ModelConfig(hidden_size=32, intermediate_size=64, num_layers=2,
                                   num_heads=4, num_kv_heads=2, head_dim=8),
      peft=config_lib.PeftConfig(method="lora", **peft),
      optim=config_lib.OptimConfig(lr=3e-3, warmup_steps=2),
      data=config_lib.DataConfig(train_files=train_file, seq_len=64, batch_size=8,
                                 eval_fraction=0.2),
      train=config_lib.LoopConfig(max_steps=4, eval_every=0, progress=False),
      checkpoint=config_lib.CheckpointConfig(every_steps=2, async_save=False,
                                             export_hf=False))


def _text_file(path, n, seed):
  rng = np.random.RandomState(seed)
  words = ["alpha", "beta", "gamma", "delta", "eps"]
  with open(path, "w") as f:
    for _ in range(n):
      f.write('{"text": "' + " ".join(rng.choice(words, 12)) + '"}\n')
  return path


def test_loop_refuses_changed_data_content_and_records_allowed_changes(tmp_path):
  data = _text_file(str(tmp_path / "train.jsonl"), 64, 0)
  wd = str(tmp_path / "run")
  assert loop.train(tiny_cfg(data), wd)["status"] == "completed"
  t = time.perf_counter()
  with pytest.raises(resume.ResumeError, match=r"peft\.alpha 16\.0 -> 64\.0") as e:
    loop.train(dataclasses.replace(tiny_cfg(data, alpha=64.0)), wd)
  assert "\n" not in str(e.value)
  print(f"refused in {time.perf_counter() - t:.2f}s")
  _text_file(data, 64, 1)  # same file name, other content
  with pytest.raises(resume.ResumeError, match=r"data\.train_files \[train\.jsonl:\w{8}\] -> "):
    loop.train(tiny_cfg(data), wd)
  cfg = dataclasses.replace(tiny_cfg(data, alpha=64.0),
                            train=dataclasses.replace(tiny_cfg(data).train, max_steps=6))
  summary = loop.train(cfg, wd, allow_changed=("peft.alpha", "data.train_files"))
  assert summary["resumed_from"] == 4 and summary["step"] == 6
  meta = checkpoint_lib.Checkpointer(wd).meta(6)
  assert {c["key"] for c in meta["allowed_changes"]} == {"peft.alpha", "data.train_files"}
  assert meta["identity"] == {"base": {}}


def test_checkpoint_from_8_devices_restores_onto_2_and_1(tmp_path):
  cfg = config_lib.ModelConfig(hidden_size=32, intermediate_size=64, num_layers=2,
                               num_heads=4, num_kv_heads=2, head_dim=8)
  mesh8 = sharding.make_mesh(config_lib.MeshConfig(fsdp=4, tensor=2))
  params = decoder.init(cfg, jax.random.PRNGKey(0))
  saved = jax.device_put(params, sharding.tree_shardings(mesh8, decoder.axes(cfg), params))
  ckpt = checkpoint_lib.Checkpointer(str(tmp_path), async_save=False)
  ckpt.save(1, {"trainable": saved}, {}, {})
  ckpt.wait()
  for n in (2, 1):
    mesh = sharding.make_mesh(config_lib.MeshConfig(fsdp=n), jax.devices()[:n])
    shardings = sharding.tree_shardings(mesh, decoder.axes(cfg), params)
    target = jax.tree_util.tree_map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), params, shardings)
    got, _, _ = ckpt.restore(1, {"trainable": target})
    for a, b, s in zip(jax.tree_util.tree_leaves(params),
                       jax.tree_util.tree_leaves(got["trainable"]),
                       jax.tree_util.tree_leaves(shardings)):
      np.testing.assert_array_equal(np.asarray(b), np.asarray(a))
      assert b.sharding == s and len(b.sharding.device_set) == n
  ckpt.close()


@pytest.mark.slow
def test_launcher_resumes_an_8_device_run_on_2_devices(tmp_path):
  """Steps 1-4 on 8 devices, 5-6 on 2: step 5's loss is the uninterrupted run's (the
  restored state is exact; only the reduction order of 2 vs 8 devices differs)."""
  # A constant lr: the schedule does not depend on max_steps, which differs between legs.
  common = [TINY, "--set=checkpoint.export_hf=false", "--set=train.eval_every=0",
            "--set=optim.schedule=constant"]
  ref, wd = str(tmp_path / "ref"), str(tmp_path / "wd")
  lu.run("train.py", *common, f"--workdir={ref}", "--set=train.max_steps=6", devices=8)
  lu.run("train.py", *common, f"--workdir={wd}", "--set=train.max_steps=4", devices=8)
  p = lu.run("train.py", *common, f"--workdir={wd}", "--set=train.max_steps=6", devices=2)
  assert "'resumed_from': 4" in p.stdout and "'devices': 2" in p.stdout
  a, b = lu.losses(ref), lu.losses(wd)
  assert sorted(b) == list(range(1, 7))
  np.testing.assert_allclose(b[5], a[5], rtol=1e-5)
