"""configs/dpo.py, configs/reward.py and configs/distill.py run a few steps through the
launcher's loop (`loop.train(get_config(arg), workdir)`, what launch/train.py calls) and
log sane, decreasing losses and their method's metrics, then export for HF."""

import importlib.util
import json
import math
import os

import numpy as np
import pytest

from jaxtune import config as config_lib
from jaxtune.train import loop
from tests import launch_utils as lu
from tests import test_methods_distill as distill_tests


def load_recipe(name: str, arg=None) -> config_lib.TrainConfig:
  """configs/NAME.py:ARG exactly as launch/common.load_config reads it."""
  path = os.path.join(lu.ROOT, "configs", f"{name}.py")
  spec = importlib.util.spec_from_file_location(f"recipe_{name}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  cfg = module.get_config(arg)
  config_lib.validate(cfg)
  return cfg


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  root = tmp_path_factory.mktemp("recipes")
  teacher = distill_tests.make_teacher(str(root / "teacher"))
  out = {}
  for name, arg in (("dpo", None), ("reward", None), ("distill", teacher)):
    out[name] = str(root / name)
    summary = loop.train(load_recipe(name, arg), out[name])
    assert summary["step"] == 20 and summary["export"], summary
  return out


def test_recipe_options_are_checked():
  cfg = load_recipe("dpo", "lora,simpo")
  assert (cfg.peft.method, cfg.dpo.loss_type, cfg.dpo.reference) == (
      "lora", "simpo", "adapters_off")
  assert cfg.dpo.beta == 2.0
  with pytest.raises(ValueError, match="unknown option"):
    load_recipe("dpo", "kto")
  assert load_recipe("distill", "/some/teacher").distill.teacher_path == "/some/teacher"


def _rows(wd):
  rows = lu.metrics(wd)
  train = [r for r in rows if "loss" in r]
  evals = [r for r in rows if "val_loss" in r]
  assert [r["step"] for r in train] == list(range(1, 21))
  assert [r["step"] for r in evals] == [10, 20]
  assert all(math.isfinite(v) for r in rows for v in r.values())
  return train, evals


def _first_last(train, key="loss", k=5):
  return np.mean([r[key] for r in train[:k]]), np.mean([r[key] for r in train[-k:]])


def test_dpo_recipe(runs):
  train, evals = _rows(runs["dpo"])
  keys = {"rewards/chosen", "rewards/rejected", "rewards/accuracy", "rewards/margin",
          "logps/chosen", "logps/rejected"}
  assert all(keys <= set(r) for r in train)
  assert all({"val_" + k for k in keys} <= set(r) for r in evals)
  # Step 1 is logged before any update: policy == reference, so loss = log 2 exactly.
  assert train[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)
  assert train[0]["rewards/margin"] == pytest.approx(0.0, abs=1e-5)
  first, last = _first_last(train)
  assert last < first and last < math.log(2)
  assert all(0.0 <= r["rewards/accuracy"] <= 1.0 for r in train)
  with open(os.path.join(runs["dpo"], "hf", "config.json")) as f:
    assert json.load(f)["architectures"] == ["LlamaForCausalLM"]


def test_reward_recipe(runs):
  train, evals = _rows(runs["reward"])
  keys = {"rewards/chosen", "rewards/rejected", "rewards/accuracy", "rewards/margin"}
  assert all(keys <= set(r) for r in train) and all(
      {"val_" + k for k in keys} <= set(r) for r in evals)
  # The head starts at zero: every score 0, loss log 2. From a random init on 160 pairs
  # seen once there is no signal to learn: the losses stay sane around log 2.
  assert train[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
  assert train[0]["rewards/margin"] == 0.0
  assert all(0.2 < r["loss"] < 1.5 for r in train)
  with open(os.path.join(runs["reward"], "hf", "config.json")) as f:
    hf = json.load(f)
  assert hf["architectures"] == ["LlamaForSequenceClassification"]
  assert hf["num_labels"] == 1 and hf["pad_token_id"] == 0


def test_distill_recipe(runs):
  train, evals = _rows(runs["distill"])
  assert all({"kl_to_teacher", "distill", "ce"} <= set(r) for r in train)
  assert all("val_kl_to_teacher" in r for r in evals)
  first, last = _first_last(train, "kl_to_teacher")
  assert last < 0.85 * first
  # alpha = 1, forward KL at T = 1: the loss is the KL itself.
  for r in train:
    assert r["loss"] == pytest.approx(r["kl_to_teacher"], rel=1e-5)
  assert evals[1]["val_kl_to_teacher"] < evals[0]["val_kl_to_teacher"]
