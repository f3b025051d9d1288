"""Chat templates that cannot be checked by prefix, rendered turn by turn (data.chat_render).

Fixtures are the published templates, written here (no downloads): Mistral-7B-Instruct-v0.3
(the system prompt goes into the LAST user turn only, so a conversation ending with an
assistant turn renders without it) and DeepSeek-R1-Distill-Qwen (the generation prompt
ends with '<think>\\n'; past assistant turns are rendered with their thinking removed).
Tokenizers are the bundled byte-level BPE plus each model's special tokens.

What each trained example must be is derived from the templates' text, not from the
implementation: the inference prompt `apply_chat_template(messages[:k],
add_generation_prompt=True)` followed by what the model generates for turn k (Mistral:
' ' + content + '</s>'; R1: the content after '<think>\\n' + '<｜end▁of▁sentence｜>').
"""

import json
import logging

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

# mistralai/Mistral-7B-Instruct-v0.3 tokenizer_config.json "chat_template" (tool branches
# kept: they are part of what renders).
MISTRAL_V3 = (
    "{%- if messages[0][\"role\"] == \"system\" %}"
    "{%- set system_message = messages[0][\"content\"] %}"
    "{%- set loop_messages = messages[1:] %}"
    "{%- else %}{%- set loop_messages = messages %}{%- endif %}"
    "{%- if not tools is defined %}{%- set tools = none %}{%- endif %}"
    "{%- set user_messages = loop_messages | selectattr(\"role\", \"equalto\", \"user\") | list %}"
    "{{- bos_token }}"
    "{%- for message in loop_messages %}"
    "{%- if message[\"role\"] == \"user\" %}"
    "{%- if tools is not none and (message == user_messages[-1]) %}"
    "{{- \"[AVAILABLE_TOOLS] [\" }}{%- for tool in tools %}{%- set tool = tool.function %}"
    "{{- '{\"type\": \"function\", \"function\": {' }}"
    "{%- for key, val in tool.items() if key != \"return\" %}"
    "{%- if val is string %}{{- '\"' + key + '\": \"' + val + '\"' }}"
    "{%- else %}{{- '\"' + key + '\": ' + val|tojson }}{%- endif %}"
    "{%- if not loop.last %}{{- \", \" }}{%- endif %}{%- endfor %}{{- \"}}\" }}"
    "{%- if not loop.last %}{{- \", \" }}{%- else %}{{- \"]\" }}{%- endif %}{%- endfor %}"
    "{{- \"[/AVAILABLE_TOOLS]\" }}{%- endif %}"
    "{%- if loop.last and system_message is defined %}"
    "{{- \"[INST] \" + system_message + \"\\n\\n\" + message[\"content\"] + \"[/INST]\" }}"
    "{%- else %}{{- \"[INST] \" + message[\"content\"] + \"[/INST]\" }}{%- endif %}"
    "{%- elif message.tool_calls is defined and message.tool_calls is not none %}"
    "{{- \"[TOOL_CALLS] [\" }}{%- for tool_call in message.tool_calls %}"
    "{%- set out = tool_call.function|tojson %}{{- out[:-1] }}"
    "{%- if not tool_call.id is defined or tool_call.id|length != 9 %}"
    "{{- raise_exception(\"Tool call IDs should be alphanumeric strings with length 9!\") }}"
    "{%- endif %}{{- ', \"id\": \"' + tool_call.id + '\"}' }}"
    "{%- if not loop.last %}{{- \", \" }}{%- else %}{{- \"]\" + eos_token }}{%- endif %}"
    "{%- endfor %}"
    "{%- elif message[\"role\"] == \"assistant\" %}"
    "{{- \" \" + message[\"content\"]|trim + eos_token}}"
    "{%- elif message[\"role\"] == \"tool_results\" or message[\"role\"] == \"tool\" %}"
    "{%- if message.content is defined and message.content.content is defined %}"
    "{%- set content = message.content.content %}{%- else %}"
    "{%- set content = message.content %}{%- endif %}"
    "{{- '[TOOL_RESULTS] {\"content\": ' + content|string + \", \" }}"
    "{%- if not message.tool_call_id is defined or message.tool_call_id|length != 9 %}"
    "{{- raise_exception(\"Tool call IDs should be alphanumeric strings with length 9!\") }}"
    "{%- endif %}{{- '\"call_id\": \"' + message.tool_call_id + '\"}[/TOOL_RESULTS]' }}"
    "{%- else %}{{- raise_exception(\"Only user and assistant roles are supported, with the "
    "exception of an initial optional system message!\") }}{%- endif %}"
    "{%- endfor %}")

# deepseek-ai/DeepSeek-R1-Distill-Qwen-* tokenizer_config.json "chat_template".
R1_DISTILL = (
    "{% if not add_generation_prompt is defined %}{% set add_generation_prompt = false %}"
    "{% endif %}{% set ns = namespace(is_first=false, is_tool=false, is_output_first=true, "
    "system_prompt='') %}{%- for message in messages %}{%- if message['role'] == 'system' %}"
    "{% set ns.system_prompt = message['content'] %}{%- endif %}{%- endfor %}{{bos_token}}"
    "{{ns.system_prompt}}{%- for message in messages %}{%- if message['role'] == 'user' %}"
    "{%- set ns.is_tool = false -%}{{'<｜User｜>' + message['content']}}{%- endif %}"
    "{%- if message['role'] == 'assistant' and message['content'] is none %}"
    "{%- set ns.is_tool = false -%}{%- for tool in message['tool_calls']%}"
    "{%- if not ns.is_first %}{{'<｜Assistant｜><｜tool▁calls▁begin｜><｜tool▁call▁begin｜>' + "
    "tool['type'] + '<｜tool▁sep｜>' + tool['function']['name'] + '\\n' + '```json' + '\\n' + "
    "tool['function']['arguments'] + '\\n' + '```' + '<｜tool▁call▁end｜>'}}"
    "{%- set ns.is_first = true -%}{%- else %}{{'\\n' + '<｜tool▁call▁begin｜>' + tool['type'] + "
    "'<｜tool▁sep｜>' + tool['function']['name'] + '\\n' + '```json' + '\\n' + "
    "tool['function']['arguments'] + '\\n' + '```' + '<｜tool▁call▁end｜>'}}"
    "{{'<｜tool▁calls▁end｜><｜end▁of▁sentence｜>'}}{%- endif %}{%- endfor %}{%- endif %}"
    "{%- if message['role'] == 'assistant' and message['content'] is not none %}"
    "{%- if ns.is_tool %}{{'<｜tool▁outputs▁end｜>' + message['content'] + "
    "'<｜end▁of▁sentence｜>'}}{%- set ns.is_tool = false -%}{%- else %}"
    "{% set content = message['content'] %}{% if '</think>' in content %}"
    "{% set content = content.split('</think>')[-1] %}{% endif %}"
    "{{'<｜Assistant｜>' + content + '<｜end▁of▁sentence｜>'}}{%- endif %}{%- endif %}"
    "{%- if message['role'] == 'tool' %}{%- set ns.is_tool = true -%}"
    "{%- if ns.is_output_first %}{{'<｜tool▁outputs▁begin｜><｜tool▁output▁begin｜>' + "
    "message['content'] + '<｜tool▁output▁end｜>'}}{%- set ns.is_output_first = false %}"
    "{%- else %}{{'\\n<｜tool▁output▁begin｜>' + message['content'] + "
    "'<｜tool▁output▁end｜>'}}{%- endif %}{%- endif %}{%- endfor -%}"
    "{% if ns.is_tool %}{{'<｜tool▁outputs▁end｜>'}}{% endif %}"
    "{% if add_generation_prompt and not ns.is_tool %}{{'<｜Assistant｜><think>\\n'}}{% endif %}")

# A template whose end of turn is plain text: nothing special ends an assistant turn.
PLAIN_END = ("{%- for m in messages -%}{{- '### ' + m['role'] + ':\\n' + m['content'] + "
             "'\\n\\n' -}}{%- endfor -%}{%- if add_generation_prompt -%}"
             "{{- '### assistant:\\n' -}}{%- endif -%}")

R1_SPECIAL = ["<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>"]


def make_tokenizer(template, bos, eos, special, plain=()):
  tk = tokenizers.Tokenizer.from_file(tokenizer_lib.bundled_dir() + "/tokenizer.json")
  tk.add_special_tokens([tokenizers.AddedToken(t, special=True, normalized=False)
                         for t in special])
  tk.add_tokens([tokenizers.AddedToken(t, special=False, normalized=False) for t in plain])
  return transformers.PreTrainedTokenizerFast(tokenizer_object=tk, chat_template=template,
                                              bos_token=bos, eos_token=eos,
                                              pad_token="<|endoftext|>")


@pytest.fixture(scope="module")
def mistral():
  return make_tokenizer(MISTRAL_V3, "<s>", "</s>", ["<s>", "</s>", "[INST]", "[/INST]"])


@pytest.fixture(scope="module")
def r1():
  return make_tokenizer(R1_DISTILL, R1_SPECIAL[0], R1_SPECIAL[1], R1_SPECIAL,
                        plain=["<think>", "</think>"])


SYSTEM = {"role": "system", "content": "Answer in French."}
CHAT = [{"role": "user", "content": "Hello?"}, {"role": "assistant", "content": "Bonjour."},
        {"role": "user", "content": "Thanks!"}, {"role": "assistant", "content": "De rien."}]


def render(tok, messages, generation):
  return tok.apply_chat_template(messages, add_generation_prompt=generation, tokenize=False)


def trained_text(tok, seq) -> str:
  row = packing.assemble([[(seq, 0)]], len(seq))
  return tok.decode(row["targets"][0][row["loss_mask"][0] > 0])


def encode_all(tok, record, **kw):
  ex = formats.normalize(record, formats.detect(record, "t.jsonl:1"), "t.jsonl:1")
  return encode.Encoder(tok, **kw).encode_all(ex)


def test_mistral_v3_system_prompt_is_trained_as_inference_sees_it(mistral):
  messages = [SYSTEM] + CHAT
  # The published template drops the system prompt from a conversation that ends with an
  # assistant turn: no whole rendering can train what inference sees.
  assert "French" not in render(mistral, messages, False)
  results = encode_all(mistral, {"messages": messages})
  assert len(results) == 2 and all(r.by_turns for r in results)
  for r, k in zip(results, (2, 4)):
    (seq,) = r.seqs
    answer = " " + messages[k]["content"] + "</s>"
    prompt = render(mistral, messages[:k], True)
    assert "[INST] Answer in French.\n\n" in prompt  # the last user turn holds it
    assert mistral.decode(seq.ids) == prompt + answer
    ids = mistral.apply_chat_template(messages[:k], add_generation_prompt=True,
                                      tokenize=True, return_dict=False)
    assert seq.ids.tolist()[:len(ids)] == ids  # the inference prompt, token for token
    assert trained_text(mistral, seq) == answer
    assert r.turns_without_eos == 0


def test_mistral_v3_full_rendering_error_has_a_true_hint(mistral):
  with pytest.raises(errors.DataError) as e:
    encode_all(mistral, {"messages": [SYSTEM] + CHAT}, chat_render="full")
  assert "generation prompt is not a prefix" in str(e.value)
  assert "chat_render" in str(e.value) and "check_template=false" not in str(e.value)
  # Without a system prompt the template is prefix-consistent: one whole rendering.
  (result,) = encode_all(mistral, {"messages": CHAT})
  assert not result.by_turns
  assert mistral.decode(result.seqs[0].ids) == render(mistral, CHAT, False)


def test_deepseek_r1_distill_trains_the_reasoning_after_the_think_prompt(r1):
  first = "<think>\nSay hi back.\n</think>\n\nHi!"
  second = "<think>\nPolite.\n</think>\n\nYou are welcome."
  messages = [SYSTEM, CHAT[0], {"role": "assistant", "content": first}, CHAT[2],
              {"role": "assistant", "content": second}]
  results = encode_all(r1, {"messages": messages})
  assert len(results) == 2
  for r, k in zip(results, (2, 4)):
    (seq,) = r.seqs
    prompt = render(r1, messages[:k], True)
    assert prompt.endswith("<｜Assistant｜><think>\n")
    generated = messages[k]["content"][len("<think>\n"):] + "<｜end▁of▁sentence｜>"
    assert r1.decode(seq.ids) == prompt + generated
    assert trained_text(r1, seq) == generated
  # Turn 2's prompt holds turn 1 as inference does: its thinking removed by the template.
  assert "Say hi back" not in r1.decode(results[1].seqs[0].ids)


def test_deepseek_r1_distill_without_thinking_says_what_content_is_expected(r1):
  with pytest.raises(errors.DataError) as e:
    encode_all(r1, {"messages": CHAT[:2]})
  msg = str(e.value)
  assert "t.jsonl:1" in msg and "'messages[1]'" in msg
  assert "starts with '<think>\\n'" in msg
  # The hint is true: content that starts so trains.
  fixed = [CHAT[0], {"role": "assistant", "content": "<think>\nok\n</think>\n\nBonjour."}]
  (result,) = encode_all(r1, {"messages": fixed})
  assert trained_text(r1, result.seqs[0]) == "ok\n</think>\n\nBonjour.<｜end▁of▁sentence｜>"


def test_preference_pairs_render_by_turns_with_mistral_v3(mistral):
  record = {"prompt": [SYSTEM] + CHAT[:3], "chosen": "Avec plaisir.", "rejected": "No."}
  (result,) = encode_all(mistral, record)
  prompt = render(mistral, [SYSTEM] + CHAT[:3], True)
  for seq, text in zip(result.seqs, ("Avec plaisir.", "No.")):
    assert mistral.decode(seq.ids) == prompt + " " + text + "</s>"
    assert trained_text(mistral, seq) == " " + text + "</s>"


def test_turns_without_end_of_turn_token_are_counted_and_warned(tmp_path, caplog):
  tok = make_tokenizer(PLAIN_END, None, "<|im_end|>", [])
  path = tmp_path / "chat.jsonl"
  path.write_text("".join(json.dumps({"messages": m}) + "\n" for m in (CHAT, CHAT[:2])))
  cfg = config.DataConfig(train_files=str(path), eval_fraction=0, seq_len=256, batch_size=2)
  with caplog.at_level(logging.WARNING, logger="jaxtune.data"):
    ds = pipeline.build(cfg, tok)
  assert ds.stats["train"]["turns_without_eos"] == 3  # 2 + 1 trained assistant turns
  warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
  assert any("3 trained assistant turns end without an end-of-turn special token" in w
             for w in warnings), warnings
  # ChatML ends turns with <|im_end|>: no warning, no count.
  ds = pipeline.build(cfg, tokenizer_lib.load(""))
  assert ds.stats["train"]["turns_without_eos"] == 0 and not ds.stats["warnings"]


def test_pipeline_counts_records_rendered_by_turns(tmp_path, mistral):
  path = tmp_path / "chat.jsonl"
  rows = [{"messages": [SYSTEM] + CHAT}, {"messages": CHAT}, {"system": "Be brief.",
                                                               "messages": CHAT[:2]}]
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  cfg = config.DataConfig(train_files=str(path), eval_fraction=0, seq_len=256, batch_size=2)
  train = pipeline.build(cfg, mistral).stats["train"]
  assert train["records"] == 3 and train["by_turns"] == 2
  assert train["examples"] == 2 + 1 + 1  # two turns by turns, one whole, one by turns
