"""Loss masks under ChatML (Qwen), Llama-3 and Mistral chat templates, and the template check.

The templates are written here as fixtures (close to the published ones) and the tokenizers
are built offline from the bundled byte-level BPE plus each family's special tokens. The
expected trained text is derived independently of the implementation: every run of trained
targets must decode to exactly one assistant turn as the template writes it, ending with its
end-of-turn token (ChatML: content + <|im_end|>, Llama-3: content + <|eot_id|>, Mistral:
' ' + content + </s>), and nothing else may carry loss.
"""

import json

import numpy as np
import pytest
import tokenizers
import transformers

from jaxtune import config
from jaxtune.data import encode
from jaxtune.data import errors
from jaxtune.data import formats
from jaxtune.data import packing
from jaxtune.data import pipeline
from jaxtune.data import tokenizer_lib

QWEN = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful "
    "assistant.<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if (message.role == 'user') or (message.role == 'system' and not loop.first) or "
    "(message.role == 'assistant') %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}")

LLAMA3 = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
    "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | "
    "trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}"
    "{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}{{ "
    "'<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}")

MISTRAL = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{%- set system_message = messages[0]['content'] %}"
    "{%- set loop_messages = messages[1:] %}"
    "{%- else %}{%- set loop_messages = messages %}{%- endif %}"
    "{{- bos_token }}"
    "{%- for message in loop_messages %}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{- raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{%- endif %}"
    "{%- if message['role'] == 'user' %}"
    "{%- if loop.first and system_message is defined %}"
    "{{- ' [INST] ' + system_message + '\\n\\n' + message['content'] + ' [/INST]' }}"
    "{%- else %}{{- ' [INST] ' + message['content'] + ' [/INST]' }}{%- endif %}"
    "{%- elif message['role'] == 'assistant' %}{{- ' ' + message['content'] + eos_token }}"
    "{%- else %}{{- raise_exception('Only user and assistant roles are supported!') }}"
    "{%- endif %}"
    "{%- endfor %}")

# Like Qwen3: earlier assistant turns lose their <think> part once later turns follow.
THINK_STRIP = (
    "{%- for message in messages -%}"
    "{%- set content = message['content'] -%}"
    "{%- if message['role'] == 'assistant' and not loop.last -%}"
    "{%- set content = content.split('</think>')[-1].lstrip('\\n') -%}{%- endif -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + content + '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}")

# The generation prompt ends with '\n' but assistant turns are written after a space.
BAD_GEN_PROMPT = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'assistant' -%}"
    "{{- '<|im_start|>assistant ' + message['content'] + '<|im_end|>\\n' -}}"
    "{%- else -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' -}}"
    "{%- endif -%}{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}")

FAMILIES = {
    # name: (template, bos, eos, extra special tokens, tokenizer adds BOS, turn format)
    "qwen": (QWEN, None, "<|im_end|>", [], False, "{content}<|im_end|>"),
    "llama3": (LLAMA3, "<|begin_of_text|>", "<|eot_id|>",
               ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                "<|eot_id|>"], True, "{content}<|eot_id|>"),
    "mistral": (MISTRAL, "<s>", "</s>", ["<s>", "</s>", "[INST]", "[/INST]"], False,
                " {content}</s>"),
}


def make_tokenizer(template, bos=None, eos="<|im_end|>", extra=(), add_bos=False):
  """A fast tokenizer: bundled BPE + `extra` special tokens, optional BOS post-processor."""
  tk = tokenizers.Tokenizer.from_file(tokenizer_lib.bundled_dir() + "/tokenizer.json")
  tk.add_special_tokens([tokenizers.AddedToken(t, special=True, normalized=False)
                         for t in extra])
  if add_bos:
    tk.post_processor = tokenizers.processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
        special_tokens=[(bos, tk.token_to_id(bos))])
  kwargs = {"eos_token": eos, "pad_token": "<|endoftext|>"}
  if bos:
    kwargs["bos_token"] = bos
  return transformers.PreTrainedTokenizerFast(tokenizer_object=tk, chat_template=template,
                                              **kwargs)


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request):
  template, bos, eos, extra, add_bos, turn = FAMILIES[request.param]
  return request.param, make_tokenizer(template, bos, eos, extra, add_bos), turn


SINGLE = [{"role": "user", "content": "What is 2 + 3?"},
          {"role": "assistant", "content": "2 + 3 = 5."}]
MULTI = SINGLE + [{"role": "user", "content": "And if you add 4 more?"},
                  {"role": "assistant", "content": "5 + 4 = 9."},
                  {"role": "user", "content": "Reverse the word 'cat'."},
                  {"role": "assistant", "content": "'cat' reversed is 'tac'."}]
SYSTEM = [{"role": "system", "content": "You are a concise tutor."}]


def trained_runs(tok, seq):
  """Decoded runs of consecutive trained targets, after laying the example out in a row."""
  row = packing.assemble([[(seq, 0)]], len(seq) + 3)
  mask = row["loss_mask"][0] > 0
  runs, current = [], []
  for t, m in zip(row["targets"][0], mask):
    if m:
      current.append(int(t))
    elif current:
      runs.append(tok.decode(current))
      current = []
  if current:
    runs.append(tok.decode(current))
  return runs


def encode_chat(tok, messages, policy="auto", check=True):
  ex = formats.normalize({"messages": messages}, "chat", "test.jsonl:1")
  return encode.Encoder(tok, loss_policy=policy, check_template=check).encode(ex)


@pytest.mark.parametrize("system", [False, True])
@pytest.mark.parametrize("conversation", ["single", "multi"])
def test_assistant_tokens_and_end_of_turn_carry_the_loss(family, conversation, system):
  name, tok, turn = family
  messages = (SYSTEM if system else []) + (SINGLE if conversation == "single" else MULTI)
  seq = encode_chat(tok, messages).seqs[0]
  # The sequence is the template's own rendering, token for token.
  assert seq.ids.tolist() == tok.apply_chat_template(messages, tokenize=True,
                                                     return_dict=False)
  expected = [turn.format(content=m["content"]) for m in messages if m["role"] == "assistant"]
  assert trained_runs(tok, seq) == expected, name
  if system:
    assert "concise tutor" in tok.decode(seq.ids)


def test_last_assistant_policy_trains_only_the_final_turn(family):
  _, tok, turn = family
  seq = encode_chat(tok, SYSTEM + MULTI, policy="last_assistant").seqs[0]
  assert trained_runs(tok, seq) == [turn.format(content=MULTI[-1]["content"])]


def test_all_policy_trains_every_next_token(family):
  _, tok, _ = family
  seq = encode_chat(tok, MULTI, policy="all").seqs[0]
  row = packing.assemble([[(seq, 0)]], len(seq))
  assert row["loss_mask"][0].tolist() == [1.0] * (len(seq) - 1) + [0.0]


def test_no_doubled_bos_with_a_bos_adding_tokenizer():
  template, bos, eos, extra, _, _ = FAMILIES["llama3"]
  tok = make_tokenizer(template, bos, eos, extra, add_bos=True)
  bos_id = tok.convert_tokens_to_ids(bos)
  assert tok("hi")["input_ids"][0] == bos_id  # the tokenizer does add one itself
  chat = encode_chat(tok, MULTI).seqs[0]
  assert chat.ids[0] == bos_id and (chat.ids == bos_id).sum() == 1
  for ex in (formats.Example("text", "t:1", text="Some raw text."),
             formats.Example("text", "t:2", text=bos + "Already starts with BOS."),
             formats.Example("prompt_completion", "t:3", prompt="2 + 2 =", completion=" 4")):
    ids = encode.Encoder(tok).encode(ex).seqs[0].ids
    assert ids[0] == bos_id and ids[1] != bos_id, ex
    assert ids[-1] == tok.eos_token_id


def test_preference_trains_only_the_response(family):
  _, tok, turn = family
  ex = formats.normalize({"prompt": MULTI[:3], "chosen": "4 + 5 = 9.", "rejected": "Nine."},
                         "preference", "p.jsonl:1")
  chosen, rejected = encode.Encoder(tok).encode(ex).seqs
  assert trained_runs(tok, chosen) == [turn.format(content="4 + 5 = 9.")]
  assert trained_runs(tok, rejected) == [turn.format(content="Nine.")]
  # The prompt part is the same tokens in both.
  n = len(tok.apply_chat_template(MULTI[:3], add_generation_prompt=True, tokenize=True,
                                  return_dict=False))
  assert chosen.ids[:n].tolist() == rejected.ids[:n].tolist()


def test_prompt_records_end_with_the_generation_prompt(family):
  _, tok, _ = family
  ex = formats.normalize({"prompt": "What is 2 + 3?", "answer": 5}, "prompt", "q.jsonl:1")
  result = encode.Encoder(tok).encode(ex)
  assert result.answer == "5"
  assert result.seqs[0].ids.tolist() == tok.apply_chat_template(
      SINGLE[:1], add_generation_prompt=True, tokenize=True, return_dict=False)


def test_history_rewriting_template_is_reported_with_turn_and_difference():
  tok = make_tokenizer(THINK_STRIP)
  messages = [{"role": "user", "content": "2 + 3?"},
              {"role": "assistant", "content": "<think>add</think>\n5"},
              {"role": "user", "content": "and + 1?"},
              {"role": "assistant", "content": "<think>add one</think>\n6"}]
  with pytest.raises(errors.DataError) as e:
    encode_chat(tok, messages)
  msg = str(e.value)
  assert "test.jsonl:1" in msg and "'messages[1]'" in msg
  assert "training rendering differs from the inference rendering" in msg
  assert "<think>" in msg and e.value.reason == "template_mismatch"
  # check_template=false: the inconsistent turn is left untrained (and counted).
  result = encode_chat(tok, messages, check=False)
  assert result.untrained_turns == 1
  assert trained_runs(tok, result.seqs[0]) == ["<think>add one</think>\n6<|im_end|>"]


def test_generation_prompt_mismatch_is_always_an_error():
  tok = make_tokenizer(BAD_GEN_PROMPT)
  for check in (True, False):
    with pytest.raises(errors.DataError, match=r"test.jsonl:1: field 'messages\[1\]'.*"
                       "generation prompt is not a prefix"):
      encode_chat(tok, SINGLE, check=check)


def test_template_exception_names_the_record(tmp_path):
  """Mistral v0.1's template has no system turn: its raise_exception names the record."""
  _, bos, eos, extra, _, _ = FAMILIES["mistral"]
  v01 = MISTRAL.replace("messages[0]['role'] == 'system'", "false")
  tok = make_tokenizer(v01, bos, eos, extra)
  path = tmp_path / "chat.jsonl"
  path.write_text(json.dumps({"messages": SINGLE}) + "\n" +
                  json.dumps({"messages": SYSTEM + SINGLE}) + "\n")
  with pytest.raises(errors.DataError, match=r"chat.jsonl:2: field 'messages': the chat "
                     "template rejected the conversation.*roles must alternate"):
    pipeline.build(config.DataConfig(train_files=str(path), eval_fraction=0), tok)


def test_tokenizer_without_template_needs_data_chat_template(tmp_path):
  tok = make_tokenizer(None)
  tok.chat_template = None
  path = tmp_path / "chat.jsonl"
  path.write_text(json.dumps({"messages": SINGLE}) + "\n")
  cfg = config.DataConfig(train_files=str(path), eval_fraction=0)
  with pytest.raises(errors.DataError, match="no chat template.*data.chat_template"):
    pipeline.build(cfg, tok)
  template_file = tmp_path / "llama3.jinja"
  template_file.write_text(LLAMA3.replace("<|start_header_id|>", "<|im_start|>")
                           .replace("<|end_header_id|>", "").replace("<|eot_id|>",
                                                                     "<|im_end|>"))
  tok2 = tokenizer_lib.load("", chat_template=str(template_file))
  ds = pipeline.build(cfg, tok2)
  batch = next(ds.train)
  mask = batch["loss_mask"][0] > 0
  assert tok2.decode(batch["targets"][0][mask]) == "2 + 3 = 5.<|im_end|>"


def test_end_to_end_batches_carry_exactly_the_assistant_turns(tmp_path):
  """Through files, build, packing and the loader, with the Llama-3 template."""
  template, bos, eos, extra, add_bos, turn = FAMILIES["llama3"]
  tok = make_tokenizer(template, bos, eos, extra, add_bos)
  records = [{"messages": MULTI}, {"system": "Be brief.", "messages": SINGLE},
             {"messages": SYSTEM + MULTI[:4]}] * 5
  path = tmp_path / "chat.jsonl"
  path.write_text("".join(json.dumps(r) + "\n" for r in records))
  ds = pipeline.build(config.DataConfig(train_files=str(path), eval_fraction=0, seq_len=256,
                                        batch_size=4), tok)
  expected = sorted(turn.format(content=m["content"]) for r in records
                    for m in r["messages"] if m["role"] == "assistant")
  rows = ds.stats["rows_per_epoch"]
  runs = []
  for i in range(-(-rows // 4)):
    batch = next(ds.train)
    for b in range(min(4, rows - 4 * i)):  # exactly the rows of epoch 0
      for seg in range(1, batch["segment_ids"][b].max() + 1):
        sel = batch["segment_ids"][b] == seg
        seq = encode.Encoded(batch["tokens"][b][sel],
                             np.r_[False, batch["loss_mask"][b][sel][:-1] > 0])
        runs += trained_runs(tok, seq)
  assert sorted(runs) == expected
