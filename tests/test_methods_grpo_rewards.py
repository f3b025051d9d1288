"""GRPO reward plumbing: reward functions receive every column of the prompt records (as TRL
passes a dataset's extra columns), through the real data pipeline; reward-function file paths
become absolute at the start of a run."""

import json
import os

import numpy as np
import pytest

from jaxtune import config as config_lib
from jaxtune.data import pipeline
from jaxtune.data import tokenizer_lib
from jaxtune.methods import grpo_batch

# A TRL-signature reward function that checks the columns it is given against the prompt it
# scores (each prompt names its record: "Q<id>") and returns values derived from them.
REWARD_FILE = '''
SEEN = []

def by_columns(prompts, completions, completion_ids, answer, id, meta, tag, **rest):
  SEEN.append(dict(rest))
  out = []
  for p, c, a, i, m, t in zip(prompts, completions, answer, id, meta, tag):
    assert f"Q{i} " in p, (p, i)
    out.append(10.0 * i + float(m["level"]) + (0.5 if t is not None else 0.0)
               + (1.0 if a == c else 0.0))
  return out
'''


def test_reward_functions_receive_every_record_column(tmp_path):
  records = [{"prompt": f"Q{i} what is {i}+{i}?", "answer": 2 * i, "id": i,
              "meta": {"level": i % 3}, **({"tag": f"t{i}"} if i % 2 else {})}
             for i in range(6)]
  data = tmp_path / "prompts.jsonl"
  data.write_text("".join(json.dumps(r) + "\n" for r in records))
  fn_file = tmp_path / "my_rewards.py"
  fn_file.write_text(REWARD_FILE)
  tok = tokenizer_lib.load("")
  ds = pipeline.build(config_lib.DataConfig(train_files=str(data), eval_fraction=0.0,
                                            batch_size=4, seq_len=48), tok, kind="prompt")
  prompts = next(ds.train)
  assert len(prompts["fields"]) == 4
  g = config_lib.GrpoConfig(reward_fns=f"{fn_file}:by_columns")
  scorer = grpo_batch.Scorer(fns=grpo_batch.rewards_lib.build(g, 8), eos=(tok.eos_token_id,))
  n_gen = 2
  repeated = [p for p in grpo_batch.prompt_lists(prompts) for _ in range(n_gen)]
  texts = ["4", "x"] * 4  # completion text; "answer" matches "4" for record 2 only
  completions = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
  fields = grpo_batch.record_fields(prompts, n_gen)
  assert set(fields) == {"answer", "id", "meta", "tag"}
  total, each = scorer(tok, repeated, completions, fields)
  # Expected, from the records themselves (found by the id in each decoded prompt).
  want = []
  for p, c in zip(repeated, texts):
    text = tok.decode(p, skip_special_tokens=True)
    rec = next(r for r in records if f"Q{r['id']} " in text)
    want.append(10.0 * rec["id"] + rec["meta"]["level"] + (0.5 if "tag" in rec else 0.0)
                + (1.0 if str(rec["answer"]) == c else 0.0))
  np.testing.assert_array_equal(total, np.float32(want))
  np.testing.assert_array_equal(each["by_columns"], np.float32(want))


def test_record_fields_repeat_per_completion_and_skip_reserved_names():
  prompts = {"prompt_tokens": np.zeros((3, 4), np.int32), "answers": ["4", None, "6"],
             "fields": [{"id": 7, "completion_ids": 1}, None, {"id": 9, "tag": "x"}]}
  assert grpo_batch.record_fields(prompts, 2) == {
      "answer": ["4", "4", None, None, "6", "6"], "id": [7, 7, None, None, 9, 9],
      "tag": [None, None, None, None, "x", "x"]}
  assert grpo_batch.record_fields({"prompt_tokens": np.zeros((1, 2)), "answers": None}, 3) == {}


def test_reward_function_files_become_absolute_at_the_start_of_a_run(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  (tmp_path / "r.py").write_text("def f(prompts, completions, **kw):\n  return [0.0]\n")
  cfg = config_lib.override(config_lib.TrainConfig(), [
      "method=grpo", "grpo.reward_fns=builtin:exact_answer, r.py:f,json:dumps"])
  resolved = config_lib.resolve_paths(cfg)
  got = resolved.grpo.reward_fns
  assert got == f"builtin:exact_answer,{os.path.join(str(tmp_path), 'r.py')}:f,json:dumps"
  assert config_lib.resolve_paths(config_lib.resolve_paths(cfg)).grpo.reward_fns == got
  monkeypatch.chdir("/")  # the resolved spec still loads from another directory
  rewards = grpo_batch.rewards_lib.build(resolved.grpo, 8)
  assert rewards.names == ("exact_answer", "f", "dumps")
