"""Sources (file types, directories, datasets), record formats, eval split and provenance."""

import dataclasses
import json

import numpy as np
import pytest

from jaxtune import config
from jaxtune.data import errors
from jaxtune.data import formats
from jaxtune.data import pipeline
from jaxtune.data import sources
from jaxtune.data import tokenizer_lib

CHAT = [{"messages": [{"role": "user", "content": f"What is {i} + 1?"},
                      {"role": "assistant", "content": f"{i} + 1 = {i + 1}."}]}
        for i in range(12)]


@pytest.fixture(scope="module")
def tok():
  return tokenizer_lib.load("")


def _jsonl(path, records):
  path.write_text("".join(json.dumps(r) + "\n" for r in records))
  return str(path)


def _cfg(files, **kw):
  kw.setdefault("eval_fraction", 0.0)
  return config.DataConfig(train_files=files, **kw)


def _all_examples(ds):
  """Decoded examples of one epoch of an SFT loader (order-free)."""
  tok = tokenizer_lib.load("")
  out = []
  rows = ds.stats["rows_per_epoch"]
  for i in range(-(-rows // ds.train.batch_size)):
    batch = next(ds.train)
    for b in range(min(ds.train.batch_size, rows - i * ds.train.batch_size)):
      seg = batch["segment_ids"][b]
      out += [tok.decode(batch["tokens"][b][seg == s]) for s in range(1, seg.max() + 1)]
  return sorted(out)


def test_jsonl_json_parquet_csv_and_directories_give_the_same_examples(tmp_path, tok):
  import pyarrow as pa  # pylint: disable=g-import-not-at-top
  import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
  (tmp_path / "d" / "sub").mkdir(parents=True)
  paths = {
      "jsonl": _jsonl(tmp_path / "a.jsonl", CHAT),
      "json": str(tmp_path / "a.json"),
      "parquet": str(tmp_path / "a.parquet"),
      "csv": str(tmp_path / "a.csv"),
  }
  (tmp_path / "a.json").write_text(json.dumps(CHAT))
  pq.write_table(pa.Table.from_pylist(CHAT), paths["parquet"])
  with open(paths["csv"], "w") as f:  # messages as JSON text in a CSV cell
    f.write("messages\n" + "".join('"' + json.dumps(r["messages"]).replace('"', '""') + '"\n'
                                   for r in CHAT))
  _jsonl(tmp_path / "d" / "x.jsonl", CHAT[:5])
  _jsonl(tmp_path / "d" / "sub" / "y.jsonl", CHAT[5:])
  (tmp_path / "d" / "README.md").write_text("ignored")
  paths["dir"] = str(tmp_path / "d")
  reference = None
  for kind, path in paths.items():
    ds = pipeline.build(_cfg(path, batch_size=4), tok)
    assert ds.stats["train"]["examples"] == 12, kind
    got = _all_examples(ds)
    reference = reference or got
    assert got == reference, kind
  assert sources.parse(paths["dir"])[0].files == (str(tmp_path / "d" / "sub" / "y.jsonl"),
                                                  str(tmp_path / "d" / "x.jsonl"))


def test_hf_datasets_source_reads_through_load_dataset(tmp_path, tok, monkeypatch):
  datasets = pytest.importorskip("datasets")
  monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "cache"))
  (tmp_path / "ds").mkdir()
  _jsonl(tmp_path / "ds" / "train.jsonl", CHAT)
  ds = pipeline.build(_cfg(f"hf:{tmp_path / 'ds'}:train", batch_size=4), tok)
  assert ds.source_names == (f"hf:{tmp_path / 'ds'}:train",)
  assert ds.stats["train"]["examples"] == 12
  assert _all_examples(ds) == _all_examples(pipeline.build(
      _cfg(str(tmp_path / "ds" / "train.jsonl"), batch_size=4), tok))
  with pytest.raises(errors.DataError, match="hf:no/such-dataset-xyz.*load_dataset"):
    pipeline.build(_cfg("hf:no/such-dataset-xyz", batch_size=4), tok)
  assert sources.parse("hf:org/name@main:test")[0] == sources.Source(
      name="hf:org/name@main:test", hf_name="org/name", hf_config="main", hf_split="test")


def test_held_out_eval_is_fixed_and_disjoint_from_train(tmp_path, tok):
  path = _jsonl(tmp_path / "c.jsonl", CHAT * 5)  # 60 records
  cfg = _cfg(path, eval_fraction=0.2, batch_size=4)
  a, b = pipeline.build(cfg, tok), pipeline.build(dataclasses.replace(cfg, seed=9), tok)
  assert a.stats["eval"]["examples"] == 12 and a.stats["train"]["examples"] == 48
  assert [x["tokens"].tobytes() for x in a.eval] == [x["tokens"].tobytes() for x in b.eval]
  eval_path = _jsonl(tmp_path / "e.jsonl", CHAT[:3])
  c = pipeline.build(dataclasses.replace(cfg, eval_files=eval_path), tok)
  assert c.stats["eval"]["examples"] == 3 and c.stats["train"]["examples"] == 60
  assert c.eval_source_names == (eval_path,)


def test_held_out_split_uses_records_not_seen_in_training(tmp_path, tok):
  recs = [{"text": f"document number {i}"} for i in range(40)]
  cfg = _cfg(_jsonl(tmp_path / "t.jsonl", recs), eval_fraction=0.25, batch_size=2,
             pack=False)
  ds = pipeline.build(cfg, tok)
  train = set(_all_examples(ds))
  held = {tok.decode(x["tokens"][b][x["segment_ids"][b] > 0]) for x in ds.eval
          for b in range(2) if x["segment_ids"][b].any()}
  assert len(held) == 10 and len(train) == 30 and not train & held


def test_fingerprint_tracks_data_tokenizer_and_template(tmp_path, tok):
  path = _jsonl(tmp_path / "c.jsonl", CHAT)
  base = pipeline.build(_cfg(path), tok).fingerprint
  assert base == pipeline.build(_cfg(path, seed=4), tok).fingerprint  # settings are not data
  assert len(base) == 64
  _jsonl(tmp_path / "c.jsonl", CHAT[:-1])
  assert pipeline.build(_cfg(path), tok).fingerprint != base
  _jsonl(tmp_path / "c.jsonl", CHAT)
  assert pipeline.build(_cfg(path), tok).fingerprint == base
  other = tokenizer_lib.load("", chat_template=tok.chat_template.replace("\\n", "\\n\\n"))
  assert pipeline.build(_cfg(path), other).fingerprint != base
  ds = pipeline.build(_cfg(path), tok)
  assert set(ds.provenance) == {"train", "eval", "tokenizer", "chat_template"}
  assert list(ds.provenance["train"]) == [path]
  (tmp_path / "elsewhere").mkdir()
  moved = _jsonl(tmp_path / "elsewhere" / "copy.jsonl", CHAT)
  assert pipeline.build(_cfg(moved), tok).fingerprint == base  # content, not paths


def test_instruction_records_become_a_chat_turn(tmp_path, tok):
  recs = [{"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"},
          {"instruction": "Say hello.", "output": "Hello!"}]
  ds = pipeline.build(_cfg(_jsonl(tmp_path / "i.jsonl", recs), batch_size=2, pack=False), tok)
  assert ds.stats["train"]["sources"][0]["format"] == "instruction"
  texts = _all_examples(ds)
  assert ("<|im_start|>user\nAdd the numbers.\n\n2 and 3<|im_end|>\n<|im_start|>assistant\n5"
          "<|im_end|>\n") in texts


def test_prompt_completion_is_raw_text_with_loss_on_the_completion(tmp_path, tok):
  recs = [{"prompt": "The capital of France is", "completion": " Paris."}]
  ds = pipeline.build(_cfg(_jsonl(tmp_path / "pc.jsonl", recs), batch_size=1), tok)
  batch = next(ds.train)
  mask = batch["loss_mask"][0] > 0
  assert tok.decode(batch["tokens"][0][batch["segment_ids"][0] > 0]) == (
      "The capital of France is Paris.<|im_end|>")
  assert tok.decode(batch["targets"][0][mask]) == " Paris.<|im_end|>"
  all_ds = pipeline.build(_cfg(_jsonl(tmp_path / "pc.jsonl", recs), batch_size=1,
                               loss_policy="all"), tok)
  batch = next(all_ds.train)
  assert batch["loss_mask"][0].sum() == (batch["segment_ids"][0] > 0).sum() - 1


def test_text_field_is_configurable_and_trained_everywhere(tmp_path, tok):
  recs = [{"body": "Some raw text."}]
  ds = pipeline.build(_cfg(_jsonl(tmp_path / "t.jsonl", recs), text_field="body",
                           batch_size=1), tok)
  batch = next(ds.train)
  n = int((batch["segment_ids"][0] > 0).sum())
  assert tok.decode(batch["tokens"][0][:n]) == "Some raw text.<|im_end|>"
  assert batch["loss_mask"][0][:n - 1].all() and batch["loss_mask"][0][n - 1] == 0


def test_preference_formats_are_normalized():
  msgs = [{"role": "user", "content": "2+2?"}]
  plain = formats.normalize({"prompt": "2+2?", "chosen": "4", "rejected": "5"}, "preference",
                            "x:1")
  ultra = formats.normalize({"prompt": "2+2?",
                             "chosen": msgs + [{"role": "assistant", "content": "4"}],
                             "rejected": msgs + [{"role": "assistant", "content": "5"}]},
                            "preference", "x:2")
  conv = formats.normalize({"messages": msgs, "system": "Be brief.",
                            "chosen": [{"role": "assistant", "content": "4"}],
                            "rejected": [{"role": "assistant", "content": "5"}]},
                           "preference", "x:3")
  assert plain.messages == ultra.messages == msgs and plain.chosen == ultra.chosen
  assert conv.messages[0] == {"role": "system", "content": "Be brief."}
  assert conv.rejected == [{"role": "assistant", "content": "5"}]
  bracket = formats.normalize({"prompt": "[1, 2] sum?", "chosen": "[3]", "rejected": "[4]"},
                              "preference", "x:4")
  assert bracket.messages[0]["content"] == "[1, 2] sum?" and bracket.chosen[0]["content"] == "[3]"
  assert formats.detect({"prompt": "a", "chosen": "b", "rejected": "c"}, "x") == "preference"
  assert formats.detect({"prompt": "a", "answer": "b"}, "x") == "prompt"
  assert formats.detect({"prompt": "a", "completion": "b"}, "x") == "prompt_completion"
  assert formats.detect({"instruction": "a", "output": "b"}, "x") == "instruction"
  assert formats.detect({"text": "a"}, "x") == "text"


def test_chat_records_serve_as_prompts(tmp_path, tok):
  recs = [{"system": "Be brief.", "messages": [{"role": "user", "content": "2+2?"}],
           "answer": 4}]
  ds = pipeline.build(_cfg(_jsonl(tmp_path / "p.jsonl", recs), batch_size=1, seq_len=64),
                      tok, kind="prompt")
  batch = next(ds.train)
  n = int(batch["prompt_mask"][0].sum())
  assert tok.decode(batch["prompt_tokens"][0][-n:]) == (
      "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n2+2?<|im_end|>\n"
      "<|im_start|>assistant\n")
  assert batch["answers"] == ["4"]


def test_bundled_assets_and_tokenizer():
  tok = tokenizer_lib.load("")
  assert len(tok) == 512
  assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<|im_start|>", "<|im_end|>",
                                                           "<|endoftext|>")
  assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (1, 2, 0)
  every_byte = bytes(range(1, 256)).decode("latin-1") + "漢字 ✓"
  assert tok.decode(tok(every_byte)["input_ids"]) == every_byte
  for name, minimum in [("chat", 300), ("text", 200), ("preference", 200), ("prompts", 200)]:
    lines = open(tokenizer_lib.sample_path(name)).read().splitlines()
    assert len(lines) >= minimum
    assert all(isinstance(json.loads(x), dict) for x in lines)
  chats = [json.loads(x) for x in open(tokenizer_lib.sample_path("chat"))]
  assert any("system" in c for c in chats)
  assert any(c["messages"][0]["role"] == "system" for c in chats)
  assert np.mean([len(c["messages"]) > 2 for c in chats]) > 0.3  # multi-turn
