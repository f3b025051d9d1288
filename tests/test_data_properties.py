"""Property-based tests of the data pipeline (hypothesis): whatever the files hold, `build`
returns batches or raises a DataError naming the file (and, for a bad record, its line and
field); never another exception. With on_bad_record=skip it skips exactly the bad records.

Records are generated valid for one format (chat, text, instruction, prompt_completion,
Bedrock-style content blocks), with unicode, empty-ish and huge strings, then corrupted
with known invalidity (a missing or wrongly typed field, a nested object where text goes,
an unknown role, an image block, a lone surrogate, a line cut short or not UTF-8, a JSON
value that is not an object). The oracle is how the file was generated, not the pipeline.
"""

import collections
import functools
import json

import hypothesis
import numpy as np
import pytest
from hypothesis import strategies as st

from jaxtune import config
from jaxtune.data import errors
from jaxtune.data import pipeline
from jaxtune.data import tokenizer_lib

CASES = collections.Counter()  # property -> examples tried (reported by the last test)
SETTINGS = hypothesis.settings(max_examples=60, deadline=None, derandomize=True,
                               suppress_health_check=[hypothesis.HealthCheck.too_slow,
                                                      hypothesis.HealthCheck.data_too_large])

TEXT = st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=40).filter(
    lambda t: t.strip())
HUGE = st.integers(2_000, 20_000).map(lambda n: "word " * (n // 5))
CONTENT = st.one_of(TEXT, TEXT, HUGE)
JUNK = st.recursive(st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), TEXT),
                    lambda inner: st.one_of(st.lists(inner, max_size=3),
                                            st.dictionaries(TEXT, inner, max_size=3)),
                    max_leaves=6)


@functools.cache
def _tokenizer():
  return tokenizer_lib.load("")


@st.composite
def valid_record(draw, fmt: str) -> dict:
  if fmt == "text":
    return {"text": draw(CONTENT)}
  if fmt == "instruction":
    return {"instruction": draw(CONTENT), "output": draw(CONTENT)}
  if fmt == "prompt_completion":
    return {"prompt": draw(CONTENT), "completion": draw(CONTENT)}
  turns = draw(st.integers(1, 3))
  blocks = fmt == "bedrock"
  messages = []
  for _ in range(turns):
    for role in ("user", "assistant"):
      text = draw(CONTENT)
      messages.append({"role": role, "content": [{"text": text}] if blocks else text})
  rec = {"messages": messages}
  if draw(st.booleans()):
    rec["system"] = [{"text": draw(TEXT)}] if blocks else draw(TEXT)
  if blocks:
    rec["schemaVersion"] = "bedrock-conversation-2024"
  return rec


REQUIRED = {"text": ["text"], "instruction": ["instruction", "output"],
            "prompt_completion": ["prompt", "completion"], "chat": ["messages"],
            "bedrock": ["messages"]}


@st.composite
def corrupt_line(draw, fmt: str) -> str:
  """One JSONL line that is certainly a bad record for `fmt`."""
  rec = draw(valid_record(fmt))
  kind = draw(st.sampled_from(["missing", "wrong_type", "empty", "surrogate", "not_object",
                               "cut", "not_utf8"] + (["role", "image", "nested"]
                                                     if fmt in ("chat", "bedrock") else [])))
  key = draw(st.sampled_from(REQUIRED[fmt]))
  if kind == "missing":
    del rec[key]
  elif kind == "wrong_type":
    rec[key] = draw(st.one_of(st.integers(), st.floats(allow_nan=False), st.booleans(),
                              st.dictionaries(TEXT, TEXT, max_size=2)))
  elif kind == "empty":
    rec[key] = draw(st.sampled_from(["", "   ", []]))
  elif kind == "surrogate":
    target = rec["messages"][0] if key == "messages" else rec
    field = "content" if key == "messages" else key
    target[field] = "ok \ud800 no" if not isinstance(target[field], list) else [
        {"text": "ok \udc00"}]
  elif kind == "not_object":
    return json.dumps(draw(st.one_of(st.lists(JUNK, max_size=3), st.integers(), TEXT)))
  elif kind == "cut":
    line = json.dumps(rec)
    return line[:draw(st.integers(1, len(line) - 1))]
  elif kind == "not_utf8":
    return "\udcff" + json.dumps(rec)  # written as a raw 0xff byte below
  elif kind == "role":
    rec["messages"][0]["role"] = draw(st.sampled_from(["bot", "User", "", "tool"]))
  elif kind == "image":
    rec["messages"][-1]["content"] = [{"text": "see"}, {"image": {"format": "png"}}]
  elif kind == "nested":
    rec["messages"][0]["content"] = draw(st.one_of(
        st.dictionaries(TEXT, JUNK, min_size=1, max_size=2), st.lists(JUNK, min_size=1,
                                                                      max_size=2)))
    if isinstance(rec["messages"][0]["content"], list) and all(
        isinstance(b, dict) and set(b) == {"text"} and isinstance(b["text"], str)
        and b["text"].strip() for b in rec["messages"][0]["content"]):
      rec["messages"][0]["content"] = {"nested": True}  # a valid block list after all
  return json.dumps(rec)


def _write(path, lines: list[str]) -> None:
  with open(path, "wb") as f:
    for line in lines:
      f.write(line.encode("utf-8", "surrogateescape") + b"\n")


@st.composite
def dataset(draw):
  """(format, lines, number of bad lines) with at least one valid record."""
  fmt = draw(st.sampled_from(sorted(REQUIRED)))
  flags = draw(st.lists(st.booleans(), min_size=1, max_size=8))
  good = draw(valid_record(fmt))
  lines = [json.dumps(good)]
  for bad in flags:
    lines.append(draw(corrupt_line(fmt)) if bad else json.dumps(draw(valid_record(fmt))))
  order = draw(st.permutations(range(len(lines))))
  return fmt, [lines[i] for i in order], sum(flags)


def _build(path, **kw):
  cfg = config.DataConfig(train_files=str(path), eval_fraction=0.0, seq_len=64, batch_size=2,
                          **kw)
  return pipeline.build(cfg, _tokenizer())


def _check_batch(ds) -> None:
  batch = next(ds.train)
  assert batch["tokens"].shape == (2, 64) and batch["loss_mask"].shape == (2, 64)
  assert np.isin(batch["loss_mask"], [0.0, 1.0]).all()


@SETTINGS
@hypothesis.given(data=dataset(), skip=st.booleans())
def test_any_file_gives_batches_or_a_data_error_naming_it(tmp_path_factory, data, skip):
  CASES["batches_or_data_error"] += 1
  _, lines, _ = data
  path = tmp_path_factory.mktemp("prop") / "records.jsonl"
  _write(path, lines)
  try:
    ds = _build(path, on_bad_record="skip" if skip else "error")
  except errors.DataError as e:
    assert str(path) in str(e)
    if e.where:  # a record-level error names the line and the field
      assert e.where.startswith(f"{path}:") and e.field
    return
  _check_batch(ds)


_FORMAT = {"chat": "chat", "bedrock": "chat", "text": "text", "instruction": "instruction",
           "prompt_completion": "prompt_completion"}


@SETTINGS
@hypothesis.given(data=dataset())
def test_skip_mode_skips_exactly_the_bad_records(tmp_path_factory, data):
  CASES["skip_counts"] += 1
  fmt, lines, bad = data
  path = tmp_path_factory.mktemp("prop") / "records.jsonl"
  _write(path, lines)
  ds = _build(path, on_bad_record="skip", format=_FORMAT[fmt], truncation="truncate_left")
  train = ds.stats["train"]
  assert sum(train["skipped"].values()) == bad
  assert train["records"] == len(lines)
  assert train["examples"] + sum(train["dropped"].values()) == len(lines) - bad
  _check_batch(ds)


@SETTINGS
@hypothesis.given(rows=st.lists(st.tuples(CONTENT, st.one_of(CONTENT, st.just(""))),
                                min_size=1, max_size=6),
                  extra=st.sampled_from(["", "\x00", ",extra,cells", "\"unclosed"]))
def test_csv_files_give_batches_or_a_data_error(tmp_path_factory, rows, extra):
  CASES["csv"] += 1
  import csv
  import io
  out = io.StringIO()
  writer = csv.writer(out)
  writer.writerow(["prompt", "completion"])
  writer.writerows(rows)
  path = tmp_path_factory.mktemp("prop") / "records.csv"
  path.write_text(out.getvalue() + extra, encoding="utf-8")
  try:
    ds = _build(path, on_bad_record="skip")
  except errors.DataError as e:
    assert str(path) in str(e)
    return
  _check_batch(ds)


def test_hypothesis_tried_the_cases(capsys):
  """Reports how many generated cases each property ran (and that it ran them)."""
  if not CASES:
    pytest.skip("the property tests did not run in this process")
  with capsys.disabled():
    print(f"\nhypothesis cases tried: {dict(CASES)}")
  assert all(n >= SETTINGS.max_examples for n in CASES.values()), dict(CASES)
