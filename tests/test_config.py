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
