"""The launchers as a newcomer meets them: --help, --help_config, --print_config, --dry_run,
one-line errors (traceback behind --verbose), paths that still work from another directory,
and runs started from another run, a checkpoint dir or a converted dir.
"""

import dataclasses
import importlib.util
import json
import os
import subprocess

import numpy as np
import pytest
import torch
import transformers

import jaxtune
from jaxtune import checkpoint
from jaxtune import config
from jaxtune import data as data_lib
from jaxtune import weights
from tests import hf_models
from tests import launch_utils as lu

TINY = "--config=configs/tiny_test.py"


def run_in(cwd, script, *args, check=True):
  """A launcher run from `cwd` (not the repository root), as a user elsewhere runs it."""
  p = subprocess.run(lu.cmd(script, *args), env=lu.env(), cwd=str(cwd), capture_output=True,
                     text=True, timeout=600)
  if check and p.returncode != 0:
    raise AssertionError(f"{script} {args} exited {p.returncode}:\n{p.stderr[-3000:]}")
  return p


def last_line(p) -> str:
  return p.stderr.strip().splitlines()[-1]


def test_help_exits_zero_and_points_to_every_set_key():
  p = lu.run("train.py", "--help")
  assert p.returncode == 0 and "--help_config" in p.stdout and "--dry_run" in p.stdout
  p = lu.run("train.py", "--help_config")
  keys = {line.split()[0] for line in p.stdout.splitlines() if line.startswith("  ")}
  assert {"data.seq_len", "data.stride", "peft.rank", "optim.lr", "train.max_steps"} <= keys
  assert keys == {line.split()[0] for line in config.help_text().splitlines()
                  if line.startswith("  ")}


def test_print_config_shows_the_resolved_config(tmp_path):
  (tmp_path / "base").mkdir()
  p = run_in(tmp_path, "train.py", f"--config={lu.ROOT}/configs/tiny_test.py",
             "--set=model.hf_path=base", "--set=optim.lr=0.5", "--print_config")
  cfg = json.loads(p.stdout)
  assert cfg["model"]["hf_path"] == str(tmp_path / "base") and cfg["optim"]["lr"] == 0.5
  assert cfg["data"]["seq_len"] == 64  # the recipe's value


def test_dry_run_checks_data_and_plans_without_training(tmp_path):
  wd = tmp_path / "wd"
  p = lu.run("train.py", TINY, f"--workdir={wd}", "--dry_run")
  spec = importlib.util.spec_from_file_location("tiny", os.path.join(lu.ROOT, "configs",
                                                                     "tiny_test.py"))
  recipe = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(recipe)
  model = dataclasses.replace(recipe.get_config().model,
                              vocab_size=len(data_lib.load_tokenizer("")))
  assert f"{model.num_params():,} params (random init)" in p.stdout
  assert "8 rows x 64 tokens = 512 tokens" in p.stdout and "12 (train.max_steps)" in p.stdout
  assert not wd.exists()  # nothing was trained or written
  bad = tmp_path / "bad.jsonl"
  bad.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n')
  p = lu.run("train.py", TINY, "--dry_run", f"--set=data.train_files={bad}", check=False)
  assert p.returncode == 2 and last_line(p).startswith(f"error: {bad}:1: field 'messages[0]")


@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory):
  """A tiny HF Llama with the bundled tokenizer (vocab 512), as a user's model dir."""
  d = tmp_path_factory.mktemp("home") / "models" / "base"
  model = hf_models.make("llama2", vocab_size=512, hidden_size=32, intermediate_size=64,
                         num_attention_heads=4, num_key_value_heads=2)
  model.save_pretrained(d)
  data_lib.load_tokenizer("").save_pretrained(d)
  return d


@pytest.mark.parametrize("case", ["pickle_only", "model_type", "recipe_arg", "missing_model",
                                  "convert_missing", "convert_hf_missing"])
def test_user_errors_are_one_line(tmp_path, tiny_hf, case):
  if case == "pickle_only":
    d = tmp_path / "pickled"
    d.mkdir()
    for f in os.listdir(tiny_hf):
      if not f.endswith(".safetensors"):
        (d / f).write_bytes((tiny_hf / f).read_bytes())
    (d / "pytorch_model.bin").write_bytes(b"not read")
    p = lu.run("train.py", TINY, f"--set=model.hf_path={d}", check=False)
    assert "pickled weights are never loaded" in last_line(p)
    assert f"python -c \"import transformers as t; d, o = '{d}'" in last_line(p)
  elif case == "model_type":
    d = tmp_path / "gpt2"
    d.mkdir()
    cfg = json.loads((tiny_hf / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, "model_type": "gpt2"}))
    data_lib.load_tokenizer("").save_pretrained(d)
    p = lu.run("train.py", TINY, f"--set=model.hf_path={d}", check=False)
    assert "model_type 'gpt2' is not supported" in last_line(p)
  elif case == "recipe_arg":
    p = lu.run("train.py", "--config=configs/dpo.py:nope", check=False)
    assert "get_config('nope') failed: configs/dpo.py: unknown option(s) ['nope']" in \
        last_line(p)
  elif case == "missing_model":
    p = run_in(tmp_path, "train.py", TINY.replace("configs", f"{lu.ROOT}/configs"),
               "--set=model.hf_path=runs/default/hf", check=False)
    assert last_line(p).startswith("error: model.hf_path: no such directory")
  elif case == "convert_missing":
    p = lu.run("convert.py", f"--from_checkpoint={tmp_path}/nope", f"--to_hf={tmp_path}/o",
               check=False)
    assert last_line(p).startswith("error: --from_checkpoint: no such directory")
    assert not (tmp_path / "nope").exists()
  else:
    p = lu.run("convert.py", "--from_hf=runs/x/hf", f"--out={tmp_path}/o", check=False)
    assert last_line(p).startswith("error: --from_hf: no such directory")
  assert p.returncode != 0 and "Traceback" not in p.stderr, p.stderr[-3000:]
  assert last_line(p).startswith("error: ")


def test_verbose_shows_the_traceback(tmp_path, tiny_hf):
  (tmp_path / "config.json").write_bytes((tiny_hf / "config.json").read_bytes())
  (tmp_path / "pytorch_model.bin").write_bytes(b"not read")
  args = [f"--from_hf={tmp_path}", f"--out={tmp_path}/o"]
  p = lu.run("convert.py", *args, check=False)
  assert p.returncode == 1 and "Traceback" not in p.stderr
  assert "pickled weights are never loaded" in last_line(p)
  assert last_line(p).endswith("(--verbose shows the traceback)")
  p = lu.run("convert.py", *args, "--verbose", check=False)
  assert p.returncode != 0 and "Traceback" in p.stderr


@pytest.mark.slow
def test_relative_paths_travel_to_convert_and_peft(tmp_path, tiny_hf):
  """A LoRA run started with relative paths converts from another directory, and its
  adapter loads with AutoPeftModelForCausalLM (the base found by its absolute path)."""
  import peft as hf_peft
  home = tiny_hf.parent.parent  # model at home/models/base
  run_in(home, "train.py", f"--config={lu.ROOT}/configs/tiny_test.py", "--workdir=runs/lora",
         "--set=model.hf_path=models/base", "--set=peft.method=lora", "--set=peft.rank=4",
         "--set=train.max_steps=2", "--set=train.eval_every=0")
  run = home / "runs" / "lora"
  meta = checkpoint.read_meta(str(run))
  assert meta["config"]["model"]["hf_path"] == str(tiny_hf)
  adapter_cfg = json.loads((run / "hf_adapter" / "adapter_config.json").read_text())
  assert adapter_cfg["base_model_name_or_path"] == str(tiny_hf)
  elsewhere = tmp_path / "elsewhere"
  elsewhere.mkdir()
  p = run_in(elsewhere, "convert.py", f"--from_checkpoint={run}", "--to_hf=out", check=False)
  assert p.returncode != 0 and "pass --peft (adapter) and/or --merge_lora" in last_line(p)
  assert "Traceback" not in p.stderr
  run_in(elsewhere, "convert.py", f"--from_checkpoint={run}", "--to_hf=adapter", "--peft")
  os.chdir(elsewhere)  # where a user loads it: base_model_name_or_path must be absolute
  try:
    model = hf_peft.AutoPeftModelForCausalLM.from_pretrained(str(elsewhere / "adapter"))
  finally:
    os.chdir(lu.ROOT)
  w = weights.load(str(run))
  tokens = np.random.RandomState(0).randint(0, 512, (2, 11)).astype(np.int32)
  with torch.no_grad():
    got = model(input_ids=torch.as_tensor(tokens)).logits.numpy()
  want = np.asarray(jaxtune.forward(w.model_cfg, w.params, tokens, lora=w.adapters))
  np.testing.assert_allclose(got, want, atol=1e-4)


@pytest.mark.slow
def test_runs_start_from_converted_run_and_checkpoint_dirs_with_their_tokenizer(tmp_path,
                                                                                tiny_hf):
  run_in(tmp_path, "convert.py", f"--from_hf={tiny_hf}", "--out=conv")
  # The converted dir, its checkpoints dir and one step dir each stand for the model and
  # the tokenizer it came with (no data.tokenizer needed).
  for source in ("conv", "conv/checkpoints", "conv/checkpoints/0"):
    cfg = config.resolve_paths(config.override(config.TrainConfig(), [
        f"model.hf_path={tmp_path / source}"]))
    tok = data_lib.tokenizer_from_config(cfg)
    assert tok("hello world")["input_ids"] == data_lib.load_tokenizer("")("hello world")[
        "input_ids"] and tok.chat_template
    w = weights.load(cfg.model.hf_path)
    assert w.model_cfg.vocab_size == 512 and w.model_cfg.hidden_size == 32
  run_in(tmp_path, "train.py", f"--config={lu.ROOT}/configs/tiny_test.py", "--workdir=ft",
         "--set=model.hf_path=conv", "--set=train.max_steps=1", "--set=train.eval_every=0")
  hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "ft" / "hf"))
  assert hf.config.hidden_size == 32
  # ... and that run's workdir is a model to start from in turn, tokenizer included.
  cfg = config.resolve_paths(config.override(config.TrainConfig(), [
      f"model.hf_path={tmp_path / 'ft'}"]))
  assert data_lib.tokenizer_from_config(cfg).chat_template
  assert weights.load(cfg.model.hf_path).model_cfg.hidden_size == 32
