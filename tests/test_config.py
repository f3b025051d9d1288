"""Config overrides: typed parsing, one-line errors naming the key, JSON round trip."""

import pytest

from jaxtune import config as config_lib


def test_overrides_are_typed():
  cfg = config_lib.override(config_lib.TrainConfig(), [
      "optim.lr=1e-5", "train.max_steps=7", "model.hf_path=/x/y", "data.pack=false",
      "model.eos_token_id=2,3", "model.rope_scaling.kind=llama3", "checkpoint.every_steps=5"])
  assert cfg.optim.lr == 1e-5 and cfg.train.max_steps == 7 and cfg.model.hf_path == "/x/y"
  assert cfg.data.pack is False and cfg.model.eos_token_id == (2, 3)
  assert cfg.model.rope_scaling.kind == "llama3" and cfg.checkpoint.every_steps == 5


@pytest.mark.parametrize("item,message", [
    ("optim.lrr=1", "unknown config key 'optim.lrr' (OptimConfig has: lr, schedule"),
    ("nope=1", "unknown config key 'nope'"),
    ("optim=1", "config key 'optim' is a section"),
    ("train.max_steps=1.5", "bad value for train.max_steps: '1.5' is not a int"),
    ("data.pack=maybe", "bad value for data.pack: 'maybe' is not a bool"),
    ("train.max_steps=0", "bad value for train.max_steps: 0 (expected > 0)"),
    ("model.dtype=fp8", "bad value for model.dtype: 'fp8' (expected one of"),
    ("optim.lr", "is not of the form key=value"),
])
def test_bad_overrides_name_the_key(item, message):
  with pytest.raises(config_lib.ConfigError) as e:
    config_lib.override(config_lib.TrainConfig(), [item])
  assert message in str(e.value)
  assert "\n" not in str(e.value)


def test_grad_accum_must_divide_batch():
  with pytest.raises(config_lib.ConfigError, match="optim.grad_accum: 3 does not divide"):
    config_lib.override(config_lib.TrainConfig(), ["data.batch_size=8", "optim.grad_accum=3"])


def test_dict_round_trip():
  cfg = config_lib.override(config_lib.TrainConfig(), ["model.eos_token_id=5", "peft.method=lora"])
  assert config_lib.from_dict(config_lib.TrainConfig, config_lib.to_dict(cfg)) == cfg


def _leaf_keys(cls, prefix=""):
  """Every settable key, walked with dataclasses directly (independent of config_tree)."""
  import dataclasses
  import typing
  out = []
  hints = typing.get_type_hints(cls)
  for f in dataclasses.fields(cls):
    if dataclasses.is_dataclass(hints[f.name]):
      out += _leaf_keys(hints[f.name], f"{prefix}{f.name}.")
    else:
      out.append(prefix + f.name)
  return out


def test_help_config_lists_every_key_with_type_default_and_doc():
  text = config_lib.help_text()
  rows = {line.split()[0]: line for line in text.splitlines() if line.startswith("  ")}
  keys = _leaf_keys(config_lib.TrainConfig)
  assert sorted(rows) == sorted(keys)
  line = rows["data.seq_len"]
  assert line.split()[1:3] == ["int", "512"] and "tokens per row" in line
  assert rows["data.eval_fraction"].split()[1:3] == ["float", "0.05"]
  assert rows["model.eos_token_id"].split()[1] == "tuple[int,"
  # Every key is documented (the comment after the field, or right above it).
  undocumented = [k for k, line in rows.items() if len(line.split()) < 4]
  assert not undocumented, f"add a comment to these config fields: {undocumented}"


@pytest.mark.parametrize("item,message", [
    ("data.eval_fraction=1.5", "bad value for data.eval_fraction: 1.5 (expected 0 <= x < 1"),
    ("data.eval_fraction=-0.5", "bad value for data.eval_fraction: -0.5 (expected 0 <= x < 1"),
    ("data.stride=600", "bad value for data.stride: 600 (expected 0 <= stride <= data.seq_len"),
    ("peft.dropout=1", "bad value for peft.dropout: 1.0 (expected 0 <= x < 1)"),
    ("optim.b2=1.5", "bad value for optim.b2: 1.5"),
    ("optim.warmup_steps=-1", "bad value for optim.warmup_steps: -1 (expected >= 0)"),
    ("train.eval_every=-5", "bad value for train.eval_every: -5"),
    ("mesh.fsdp=0", "bad value for mesh.fsdp: 0 (expected -1"),
    ("data.truncation=cut", "bad value for data.truncation: 'cut' (expected one of auto, split"),
    ("data.chat_render=x", "bad value for data.chat_render: 'x' (expected one of auto, full"),
])
def test_numeric_ranges_are_checked(item, message):
  with pytest.raises(config_lib.ConfigError) as e:
    config_lib.override(config_lib.TrainConfig(), [item])
  assert message in str(e.value) and "\n" not in str(e.value)


def test_resolve_paths_makes_local_paths_absolute_and_keeps_hub_ids(tmp_path, monkeypatch):
  import os
  (tmp_path / "runs" / "base" / "hf").mkdir(parents=True)
  (tmp_path / "data").mkdir()
  (tmp_path / "data" / "a.jsonl").write_text("{}\n")
  (tmp_path / "t.jinja").write_text("{{ messages }}")
  monkeypatch.chdir(tmp_path)
  cfg = config_lib.override(config_lib.TrainConfig(), [
      "model.hf_path=runs/base/hf", "data.tokenizer=Qwen/Qwen2.5-0.5B",
      "data.train_files=data/a.jsonl, hf:org/set:train", "data.chat_template=t.jinja",
      "distill.teacher_path=gpt2"])
  out = config_lib.resolve_paths(cfg)
  assert out.model.hf_path == str(tmp_path / "runs" / "base" / "hf")
  assert out.data.tokenizer == "Qwen/Qwen2.5-0.5B" and out.distill.teacher_path == "gpt2"
  assert out.data.train_files == f"{tmp_path / 'data' / 'a.jsonl'},hf:org/set:train"
  assert out.data.chat_template == str(tmp_path / "t.jinja")
  assert config_lib.resolve_paths(out) == out  # idempotent
  monkeypatch.chdir("/")
  assert config_lib.resolve_paths(out) == out  # and independent of the directory now
  inline = dataclasses_replace_data(out, chat_template="{% for m in messages %}{% endfor %}")
  assert config_lib.resolve_paths(inline).data.chat_template == inline.data.chat_template
  assert os.path.isabs(out.data.train_files.split(",")[0])


def dataclasses_replace_data(cfg, **kw):
  import dataclasses
  return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, **kw))


@pytest.mark.parametrize("key,value", [("model.hf_path", "runs/nope/hf"),
                                       ("model.hf_path", "./nope"),
                                       ("data.tokenizer", "/abs/missing/tok"),
                                       ("data.chat_template", "missing.jinja")])
def test_a_missing_local_path_says_no_such_directory(tmp_path, monkeypatch, key, value):
  monkeypatch.chdir(tmp_path)
  cfg = config_lib.override(config_lib.TrainConfig(), [f"{key}={value}"])
  with pytest.raises(config_lib.ConfigError) as e:
    config_lib.resolve_paths(cfg)
  msg = str(e.value)
  assert msg.startswith(f"{key}: no such directory") and "Repo id" not in msg
