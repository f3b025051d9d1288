"""Amazon Bedrock's `bedrock-conversation-2024` records (Nova fine-tuning data): system and
message content as lists of {"text": ...} blocks; image / document / video blocks refused
with the record and the field named.

The records follow the schema in AWS's "Preparing data for fine-tuning Nova understanding
models" page (schemaVersion, system: [{"text"}], messages: [{"role", "content": [{"text"}]}]).
"""

import json

import pytest

from jaxtune import config
from jaxtune.data import errors
from jaxtune.data import pipeline
from jaxtune.data import tokenizer_lib

NOVA = {
    "schemaVersion": "bedrock-conversation-2024",
    "system": [{"text": "You are a digital assistant with a friendly personality"}],
    "messages": [
        {"role": "user", "content": [{"text": "What is the capital of Mongolia?"}]},
        {"role": "assistant", "content": [{"text": "The capital of Mongolia is Ulaanbaatar."}]},
    ],
}


@pytest.fixture(scope="module")
def tok():
  return tokenizer_lib.load("")


def _write(tmp_path, records):
  path = tmp_path / "nova.jsonl"
  path.write_text("".join(json.dumps(r) + "\n" for r in records))
  return path


def test_nova_records_train_on_the_assistant_text(tmp_path, tok):
  path = _write(tmp_path, [NOVA] * 3)
  cfg = config.DataConfig(train_files=str(path), eval_fraction=0, seq_len=128, batch_size=1,
                          pack=False)
  ds = pipeline.build(cfg, tok)
  assert ds.stats["train"]["examples"] == 3 and ds.stats["train"]["sources"][0]["format"] == \
      "chat"
  batch = next(ds.train)
  n = int((batch["segment_ids"][0] > 0).sum())
  expected = tok.apply_chat_template(
      [{"role": "system", "content": NOVA["system"][0]["text"]},
       {"role": "user", "content": "What is the capital of Mongolia?"},
       {"role": "assistant", "content": "The capital of Mongolia is Ulaanbaatar."}],
      tokenize=True, return_dict=False)
  assert batch["tokens"][0][:n].tolist() == expected
  trained = tok.decode(batch["targets"][0][batch["loss_mask"][0] > 0])
  assert trained == "The capital of Mongolia is Ulaanbaatar.<|im_end|>"


@pytest.mark.parametrize("block,kind", [
    ({"image": {"format": "png", "source": {"s3Location": {"uri": "s3://b/x.png"}}}}, "image"),
    ({"document": {"format": "pdf", "name": "d", "source": {"bytes": "AAA"}}}, "document"),
    ({"video": {"format": "mp4", "source": {"s3Location": {"uri": "s3://b/v.mp4"}}}}, "video"),
])
def test_media_blocks_are_refused_naming_record_and_field(tmp_path, tok, block, kind):
  bad = json.loads(json.dumps(NOVA))
  bad["messages"][0]["content"].append(block)
  path = _write(tmp_path, [NOVA, bad])
  cfg = config.DataConfig(train_files=str(path), eval_fraction=0)
  with pytest.raises(errors.DataError) as e:
    pipeline.build(cfg, tok)
  assert str(e.value).startswith(f"{path}:2: field 'messages[0].content[1]': is '{kind}' "
                                 "content; jaxtune trains on text only")
  ds = pipeline.build(config.DataConfig(train_files=str(path), eval_fraction=0,
                                        on_bad_record="skip"), tok)
  assert ds.stats["train"]["skipped"] == {"unsupported_content": 1}
  assert ds.stats["train"]["examples"] == 1


def test_system_blocks_and_several_text_blocks(tmp_path, tok):
  rec = json.loads(json.dumps(NOVA))
  rec["system"] = [{"text": "Be brief."}, {"text": "Be kind."}]
  rec["messages"][1]["content"] = [{"text": "Ulaanbaatar."}, {"text": "It is cold."}]
  path = _write(tmp_path, [rec])
  ds = pipeline.build(config.DataConfig(train_files=str(path), eval_fraction=0, seq_len=128,
                                        batch_size=1), tok)
  batch = next(ds.train)
  text = tok.decode(batch["tokens"][0][batch["segment_ids"][0] > 0])
  assert "system\nBe brief.\nBe kind.<|im_end|>" in text
  trained = tok.decode(batch["targets"][0][batch["loss_mask"][0] > 0])
  assert trained == "Ulaanbaatar.\nIt is cold.<|im_end|>"
  rec["system"] = [{"text": 3}]
  path = _write(tmp_path, [rec])
  with pytest.raises(errors.DataError, match=r"nova.jsonl:1: field 'system\[0\].text': is a "
                     "int; expected a non-empty string"):
    pipeline.build(config.DataConfig(train_files=str(path), eval_fraction=0), tok)
