"""launch/generate.py end to end, as users run it: on a training run's workdir (the tiny
recipe of the launcher tests, trained here), on its HF export, with a prompts file and
several samples, and as an interactive --chat driven through stdin.

The reference is transformers: greedy generate of the HF export, with prompts rendered by
the export's own tokenizer and chat template.
"""

import json
import os
import subprocess

import numpy as np
import pytest
import torch
import transformers

from tests import launch_utils as lu

N = 6


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  wd = str(tmp_path_factory.mktemp("gen_run"))
  lu.run("train.py", "--config=configs/tiny_test.py", f"--workdir={wd}")
  hf = os.path.join(wd, "hf")
  model = transformers.AutoModelForCausalLM.from_pretrained(hf).eval()
  tok = transformers.AutoTokenizer.from_pretrained(hf)
  return wd, hf, model, tok


def _greedy_text(run, ids, n=N):
  _, _, model, tok = run
  out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids),
                       dtype=torch.long), max_new_tokens=n, do_sample=False,
                       eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
  new = out[0, len(ids):].tolist()
  return new, tok.decode(new, skip_special_tokens=True)


def _chat_ids(tok, messages):
  return tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                 return_dict=False)


def test_prompt_on_the_run_workdir_equals_transformers(run, tmp_path):
  wd, _, _, tok = run
  out = tmp_path / "one.jsonl"
  lu.run("generate.py", f"--model={wd}", "--prompt=Hello there", f"--max_new_tokens={N}",
         "--temperature=0", f"--out={out}")
  rows = [json.loads(l) for l in out.read_text().splitlines()]
  assert len(rows) == 1
  ids = tok("Hello there")["input_ids"]
  want_tokens, want_text = _greedy_text(run, ids)
  assert rows[0]["tokens"] == want_tokens and rows[0]["completion"] == want_text
  assert rows[0]["finish_reason"] in ("stop", "length") and len(rows[0]["logprobs"]) == N


@pytest.mark.slow
def test_prompts_file_on_the_hf_export(run, tmp_path):
  """Plain, chat and system+chat records, 2 samples each at temperature 1: each sample's
  log-probs equal transformers' teacher-forced log-softmax over the prompt rendered by the
  export's tokenizer (plain text as it is; chats through the template, assistant turn open)
  followed by the sampled tokens, so both the rendering and the sampling are checked."""
  _, hf, model, tok = run
  prompts = tmp_path / "p.jsonl"
  chat = [{"role": "user", "content": "What is the capital of France?"}]
  prompts.write_text("\n".join(json.dumps(r) for r in [
      {"prompt": "Plain text, as it is"},
      {"messages": chat},
      {"system": "Be brief.", "prompt": chat},
  ]) + "\n")
  out = tmp_path / "o.jsonl"
  lu.run("generate.py", f"--model={hf}", f"--prompts={prompts}", f"--max_new_tokens={N}",
         "--temperature=1", "--num_samples=2", "--seed=3", f"--out={out}", "--batch_size=4")
  rows = [json.loads(l) for l in out.read_text().splitlines()]
  assert [(r["index"], r["sample"]) for r in rows] == [(i, s) for i in range(3) for s in (0, 1)]
  refs = [tok("Plain text, as it is")["input_ids"], _chat_ids(tok, chat),
          _chat_ids(tok, [{"role": "system", "content": "Be brief."}] + chat)]
  for r in rows:
    ids = list(refs[r["index"]]) + r["tokens"]
    with torch.no_grad():
      logits = model(torch.tensor([ids])).logits[0].double()
    lp = torch.log_softmax(logits, -1)
    want = [lp[len(ids) - len(r["tokens"]) - 1 + j, t].item() for j, t in enumerate(r["tokens"])]
    np.testing.assert_allclose(r["logprobs"], want, atol=1e-4, err_msg=str(r))
    assert r["completion"] == tok.decode(r["tokens"], skip_special_tokens=True)
  assert any(rows[2 * i]["tokens"] != rows[2 * i + 1]["tokens"] for i in range(3))


@pytest.mark.slow
def test_chat_through_stdin_keeps_history_and_resets(run):
  """The transcript on stdout is exactly '> ' + reply + newline per turn, each reply being
  transformers' greedy continuation of the conversation so far; /reset forgets it."""
  _, hf, _, tok = run
  p = subprocess.run(lu.cmd("generate.py", f"--model={hf}", "--chat", f"--max_new_tokens={N}",
                            "--temperature=0"), input="hi\nand then?\n/reset\nhi\n/exit\n",
                     env=lu.env(), cwd=lu.ROOT, capture_output=True, text=True, timeout=600)
  assert p.returncode == 0, p.stderr[-3000:]
  first = _greedy_text(run, _chat_ids(tok, [{"role": "user", "content": "hi"}]))[1]
  history = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": first},
             {"role": "user", "content": "and then?"}]
  second = _greedy_text(run, _chat_ids(tok, history))[1]
  assert p.stdout == f"> {first}\n> {second}\n> > {first}\n> "
  assert "(conversation reset)" in p.stderr


def test_bad_flags_are_one_line(run, tmp_path):
  wd = run[0]
  p = lu.run("generate.py", f"--model={wd}", "--prompt=x", "--top_p=0", check=False)
  assert p.returncode != 0 and "top_p must be in (0, 1]" in p.stderr
  bad = tmp_path / "bad.jsonl"
  bad.write_text(json.dumps({"messages": [{"role": "bot", "content": "x"}]}) + "\n")
  p = lu.run("generate.py", f"--model={wd}", f"--prompts={bad}", check=False)
  assert p.returncode == 2
  assert p.stderr.strip().splitlines()[-1] == (
      f"error: {bad}:1: field 'messages[0].role': unknown role 'bot'; expected one of "
      "'system', 'user', 'assistant'")
