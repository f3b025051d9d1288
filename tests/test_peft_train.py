"""Every new PEFT method through the trainer (`--set=peft.method=NAME`): packed rows, a
checkpoint, the export (PEFT adapter, and the merged HF model where the method merges), and
the run's adapters read back by `weights.load` give the exported model's logits."""

import dataclasses
import json
import os

import jax
import numpy as np
import pytest

import jaxtune
from jaxtune import config as config_lib
from jaxtune import sharding
from jaxtune import weights
from jaxtune.models import decoder
from jaxtune.train import loop


def _text_file(path, n=48, seed=0, words=("alpha", "beta", "gamma", "delta", "eps")):
  rng = np.random.RandomState(seed)
  with open(path, "w") as f:
    for _ in range(n):
      f.write(json.dumps({"text": " ".join(rng.choice(words, int(rng.randint(3, 9))))}) + "\n")
  return path


def _cfg(train_file: str, method: str) -> config_lib.TrainConfig:
  return config_lib.TrainConfig(
      model=config_lib.ModelConfig(hidden_size=32, intermediate_size=64, num_layers=2,
                                   num_heads=4, num_kv_heads=2, head_dim=8),
      peft=config_lib.PeftConfig(method=method, rank=4, quant_group_size=16,
                                 num_virtual_tokens=3, prompt_init="sample_vocab", adapter_len=4),
      optim=config_lib.OptimConfig(lr=2e-2, warmup_steps=1, schedule="constant"),
      data=config_lib.DataConfig(train_files=train_file, seq_len=64, batch_size=8, pack=True,
                                 eval_fraction=0.1),
      train=config_lib.LoopConfig(max_steps=6, eval_every=0, progress=False),
      checkpoint=config_lib.CheckpointConfig(every_steps=6, async_save=False, export_hf=True))


@pytest.mark.slow
@pytest.mark.parametrize("method", ["qdora", "prompt_tuning", "llama_adapter"])
def test_trains_packed_exports_and_reloads(method, tmp_path):
  wd = str(tmp_path / "run")
  summary = loop.train(_cfg(_text_file(str(tmp_path / "t.jsonl")), method), wd)
  with open(os.path.join(wd, "metrics.jsonl")) as f:
    losses = [json.loads(l)["loss"] for l in f if "loss" in l]
  print(f"{method}: losses {losses[0]:.3f} -> {losses[-1]:.3f}, export {summary['export']}")
  assert summary["status"] == "completed" and losses[-1] < losses[0]
  # The run's base, loaded as the run loaded it, and its adapters; on the run's mesh (the
  # adapters come back with the checkpoint's 8-device placement).
  w = weights.load(wd, mesh=sharding.make_mesh(config_lib.MeshConfig()))
  assert type(w.adapters) is jaxtune.peft.get(method).adapters_type
  adapter_dir = os.path.join(wd, "hf_adapter")
  again = jaxtune.peft.load_peft(w.model_cfg, adapter_dir)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=0),
               again.params, w.adapters.params)
  tokens = np.random.RandomState(0).randint(3, w.model_cfg.vocab_size, (2, 11)).astype(np.int32)
  ours = np.asarray(decoder.forward(w.model_cfg, w.params, tokens, lora=w.adapters))
  assert np.abs(ours - np.asarray(decoder.forward(w.model_cfg, w.params, tokens))).max() > 1e-3
  if not getattr(jaxtune.peft.get(method), "mergeable", True):
    assert summary["export"] == os.path.abspath(adapter_dir)  # not mergeable: the adapter
    assert not os.path.exists(os.path.join(wd, "hf"))
    return
  cfg, merged = jaxtune.load_hf(os.path.join(wd, "hf"))
  got = np.asarray(decoder.forward(cfg, merged, tokens))
  # qdora merges the dequantized 4-bit base: the same function, float32 rounding apart.
  assert np.abs(got - ours).max() < 1e-4, np.abs(got - ours).max()


def test_bad_options_are_named(tmp_path):
  f = _text_file(str(tmp_path / "t.jsonl"), n=8)
  cfg = _cfg(f, "ia3")
  with pytest.raises(config_lib.ConfigError, match=r"peft.dropout: 0.1 \(IA3 has no dropout"):
    loop.train(dataclasses.replace(cfg, peft=dataclasses.replace(cfg.peft, dropout=0.1)),
               str(tmp_path / "a"))
  with pytest.raises(config_lib.ConfigError, match=r"peft.num_virtual_tokens: 0"):
    loop.train(dataclasses.replace(cfg, peft=dataclasses.replace(
        cfg.peft, method="prompt_tuning", num_virtual_tokens=0)), str(tmp_path / "b"))
