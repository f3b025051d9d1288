"""Bad input stops the build with one message naming file, line, field and what was expected;
with on_bad_record=skip the same records are skipped, counted by reason and reported."""

import json

import pytest

from jaxtune import config
from jaxtune.data import errors
from jaxtune.data import pipeline
from jaxtune.data import stats
from jaxtune.data import tokenizer_lib

GOOD = {"messages": [{"role": "user", "content": "What is 1 + 1?"},
                     {"role": "assistant", "content": "1 + 1 = 2."}]}
LONG = {"messages": [{"role": "user", "content": "count " * 40},
                     {"role": "assistant", "content": "ok"}]}

# name: (bad line, expected field, expected fragment, skip reason)
CASES = {
    "malformed_json": ('{"messages": [{"role": "user", "content": "hi"}', "<line>",
                       "malformed JSON at column 48", "malformed_json"),
    "missing_field": (json.dumps({"mesages": GOOD["messages"]}), "messages",
                      "is missing; expected a list of messages", "missing_field"),
    "missing_content": (json.dumps({"messages": [{"role": "user", "content": "hi"},
                                                 {"role": "assistant"}]}),
                        "messages[1].content", "is missing; expected a non-empty string",
                        "missing_field"),
    "empty_content": (json.dumps({"messages": [{"role": "user", "content": "hi"},
                                               {"role": "assistant", "content": " "}]}),
                      "messages[1].content", "is empty; expected a non-empty string",
                      "empty_field"),
    "unknown_role": (json.dumps({"messages": [{"role": "user", "content": "hi"},
                                              {"role": "bot", "content": "hello"}]}),
                     "messages[1].role", "unknown role 'bot'; expected one of 'system', "
                     "'user', 'assistant'", "unknown_role"),
    "not_alternating": (json.dumps({"messages": [{"role": "user", "content": "hi"},
                                                 {"role": "user", "content": "again"},
                                                 {"role": "assistant", "content": "yes"}]}),
                        "messages[1].role", "turns do not alternate: got 'user'; expected "
                        "'assistant'", "not_alternating"),
    "ends_with_user": (json.dumps({"messages": GOOD["messages"] + [{"role": "user",
                                                                    "content": "and?"}]}),
                       "messages[2].role", "expected it to end with 'assistant'",
                       "not_alternating"),
    "system_twice": (json.dumps({"system": "Be brief.", "messages": [
        {"role": "system", "content": "Be kind."}] + GOOD["messages"]}),
                     "messages[0].role", "system prompt given twice", "not_alternating"),
    "too_long": (json.dumps(LONG), "messages", "longer than data.seq_len=32; expected at "
                 "most 32 tokens", "too_long"),
}


@pytest.fixture(scope="module")
def tok():
  return tokenizer_lib.load("")


def _write(tmp_path, lines, name="chat.jsonl"):
  path = tmp_path / name
  path.write_text("".join(line + "\n" for line in lines))
  return str(path)


def _cfg(path, **kw):
  return config.DataConfig(train_files=path, eval_fraction=0.0, seq_len=32,
                           truncation="error", **kw)


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_record_error_names_file_line_and_field(tmp_path, tok, case):
  line, field, fragment, reason = CASES[case]
  path = _write(tmp_path, [json.dumps(GOOD)] * 3 + [line] + [json.dumps(GOOD)])
  with pytest.raises(errors.DataError) as e:
    pipeline.build(_cfg(path), tok)
  msg = str(e.value)
  assert msg.startswith(f"{path}:4: field {field!r}: "), msg
  assert fragment in msg, msg
  assert e.value.reason == reason


def test_skip_counts_every_bad_record_by_reason_and_reports_it(tmp_path, tok):
  lines = [json.dumps(GOOD)]
  for case in sorted(CASES):
    lines += [CASES[case][0], json.dumps(GOOD)]
  path = _write(tmp_path, lines)
  ds = pipeline.build(_cfg(path, on_bad_record="skip"), tok)
  train = ds.stats["train"]
  expected = {}
  for case in CASES.values():
    expected[case[3]] = expected.get(case[3], 0) + 1
  assert train["skipped"] == expected
  assert train["records"] == len(lines) and train["examples"] == len(CASES) + 1
  assert train["records"] == (train["examples"] + sum(train["skipped"].values())
                              + sum(train["dropped"].values()))  # nothing silent
  assert len(train["skip_messages"]) == len(CASES)
  assert any(f"{path}:2: " in m for m in train["skip_messages"])
  assert "skipped" in stats.summary(ds.stats)


def test_other_file_types_name_their_line_or_record(tmp_path, tok):
  csv_path = tmp_path / "data.csv"
  csv_path.write_text('instruction,input,output\n"Add 1 and 1","","2"\n"Say hi","",""\n')
  with pytest.raises(errors.DataError,
                     match=rf"^{csv_path}:3: field 'output': is empty; expected a non-empty"):
    pipeline.build(_cfg(str(csv_path)), tok)
  json_path = tmp_path / "data.json"
  json_path.write_text(json.dumps([GOOD, {"messages": [{"role": "user", "content": 3}]}]))
  with pytest.raises(errors.DataError, match=rf"^{json_path} record 1: field 'messages\[0\]."
                     r"content': is a int; expected a non-empty string"):
    pipeline.build(_cfg(str(json_path)), tok)
  pq = pytest.importorskip("pyarrow.parquet")
  import pyarrow as pa  # pylint: disable=g-import-not-at-top
  pq_path = tmp_path / "data.parquet"
  pq.write_table(pa.Table.from_pylist([{"text": "fine"}, {"text": ""}]), str(pq_path))
  with pytest.raises(errors.DataError, match=rf"^{pq_path} record 1: field 'text': is empty"):
    pipeline.build(_cfg(str(pq_path)), tok)


def test_preference_and_prompt_fields_are_named(tmp_path, tok):
  path = _write(tmp_path, [json.dumps({"prompt": "2+2?", "chosen": "4", "rejected": "5"}),
                           json.dumps({"prompt": "2+3?", "chosen": "5"})], "pref.jsonl")
  with pytest.raises(errors.DataError, match=r"pref.jsonl:2: field 'rejected': is missing"):
    pipeline.build(_cfg(path), tok, kind="preference")
  path = _write(tmp_path, [json.dumps({"prompt": "2+2?", "chosen": "4", "rejected": [
      {"role": "user", "content": "2+2?"}, {"role": "user", "content": "5"}]})], "p2.jsonl")
  with pytest.raises(errors.DataError, match=r"p2.jsonl:1: field 'rejected\[0\].role': got "
                     "'user'; expected 'assistant'"):
    pipeline.build(_cfg(path), tok, kind="preference")
  path = _write(tmp_path, [json.dumps({"prompt": "", "answer": "4"})], "q.jsonl")
  with pytest.raises(errors.DataError, match=r"q.jsonl:1: field 'prompt': is empty"):
    pipeline.build(_cfg(path), tok, kind="prompt")


def test_undetectable_format_is_named(tmp_path, tok):
  path = _write(tmp_path, [json.dumps({"question": "2+2?", "reply": "4"})])
  with pytest.raises(errors.DataError, match=r"chat.jsonl:1: field '<record>': cannot detect "
                     r"the record format from its fields \['question', 'reply'\]"):
    pipeline.build(_cfg(path), tok)


def test_setup_errors_are_never_skipped(tmp_path, tok):
  good = _write(tmp_path, [json.dumps(GOOD)])
  with pytest.raises(errors.DataError, match="data.train_files: no such file or directory"):
    pipeline.build(_cfg(str(tmp_path / "nope.jsonl"), on_bad_record="skip"), tok)
  with pytest.raises(errors.DataError, match="data.weights has 2 values but data.train_files "
                     "has 1 sources"):
    pipeline.build(_cfg(good, weights="1,2", on_bad_record="skip"), tok)
  with pytest.raises(errors.DataError, match="records are 'chat' but kind='preference'"):
    pipeline.build(_cfg(good, on_bad_record="skip"), tok, kind="preference")
  (tmp_path / "notes.txt").write_text("hi")
  with pytest.raises(errors.DataError, match="unsupported extension"):
    pipeline.build(_cfg(str(tmp_path / "notes.txt")), tok)
  bad = _write(tmp_path, ["not json"] * 3, "bad.jsonl")
  with pytest.raises(errors.DataError, match="no usable examples in"):
    pipeline.build(_cfg(bad, on_bad_record="skip"), tok)
