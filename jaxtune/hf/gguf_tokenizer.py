"""A GGUF's tokenizer, both ways: GGUF metadata <-> a `transformers` fast tokenizer.

A GGUF carries its tokenizer as metadata (`tokenizer.ggml.*`: tokens, token types, merges,
pre-tokenizer name, special ids, chat template), not as tokenizer.json. Training must
tokenize exactly as llama.cpp will at inference, so the tokenizer is rebuilt here with
`tokenizers` (no torch: transformers' own GGUF tokenizer path needs torch) following
llama.cpp's semantics for each pre-tokenizer name, and written back the same way:

    tokenizer.ggml.model   tokenizer.ggml.pre                 pre-tokenizer
    gpt2 (byte-level BPE)  gpt-2 / default / (absent)         GPT-2 regex
                           smollm                             single digits + GPT-2 regex
                           llama-bpe / llama3 / llama-v3      Llama 3 regex, ignore_merges
                           qwen2 / deepseek-r1-qwen           Qwen2 regex

    >>> tok = from_gguf("SmolLM2-135M-Instruct.Q4_1.gguf")
    >>> tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)[:24]
    '<|im_start|>system\\nYou a'

SentencePiece vocabularies (`tokenizer.ggml.model` = llama, Llama 2 / Mistral v0.1) are
refused by name: give a tokenizer directory (data.tokenizer) for those.
"""

from __future__ import annotations

import json
from typing import Any

from jaxtune.hf import gguf as hf_gguf

GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
               r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
# tokenizer.ggml.pre names -> the split this module builds (the first name is written).
PRE = {"gpt-2": "gpt2", "default": "gpt2", "": "gpt2", "smollm": "smollm",
       "llama-bpe": "llama3", "llama3": "llama3", "llama-v3": "llama3", "qwen2": "qwen2",
       "deepseek-r1-qwen": "qwen2"}
WRITE_PRE = {"gpt2": "gpt-2", "smollm": "smollm", "llama3": "llama-bpe", "qwen2": "qwen2"}
NORMAL, CONTROL, USER_DEFINED, UNUSED = 1, 3, 4, 5  # llama.cpp token types


def _pre_tokenizer(kind: str):
  from tokenizers import Regex, pre_tokenizers  # pylint: disable=g-import-not-at-top
  byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=kind in ("gpt2",
                                                                                   "smollm"))
  if kind == "gpt2":
    return byte_level
  if kind == "smollm":
    return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
  split = {"llama3": LLAMA3_SPLIT, "qwen2": QWEN2_SPLIT}[kind]
  return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(split), behavior="isolated",
                                                       invert=False), byte_level])


def from_gguf(path: str):
  """A `transformers.PreTrainedTokenizerFast` built from a GGUF's tokenizer metadata."""
  import tokenizers  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  from tokenizers import decoders, models, processors  # pylint: disable=g-import-not-at-top

  r = hf_gguf.reader(path)
  source = hf_gguf.find(path)
  meta = lambda k, d=None: hf_gguf.metadata(r, f"tokenizer.{k}", d)
  model = meta("ggml.model")
  if model != "gpt2":
    raise ValueError(f"{source}: tokenizer.ggml.model={model!r} is not supported (expected "
                     "gpt2, a byte-level BPE); set data.tokenizer to a tokenizer directory")
  pre = meta("ggml.pre", "")
  if pre not in PRE:
    raise ValueError(f"{source}: tokenizer.ggml.pre={pre!r} is not supported (expected one of "
                     f"{', '.join(p for p in PRE if p)})")
  kind = PRE[pre]
  tokens = meta("ggml.tokens")
  types = meta("ggml.token_type") or [NORMAL] * len(tokens)
  merges = [tuple(m.split(" ", 1)) for m in meta("ggml.merges") or []]
  bpe = models.BPE({t: i for i, t in enumerate(tokens)}, merges, ignore_merges=kind == "llama3")
  tok = tokenizers.Tokenizer(bpe)
  tok.pre_tokenizer = _pre_tokenizer(kind)
  tok.decoder = decoders.ByteLevel()
  tok.add_tokens([tokenizers.AddedToken(t, special=False, normalized=False)
                  for t, ty in zip(tokens, types) if ty == USER_DEFINED])
  tok.add_special_tokens([tokenizers.AddedToken(t, special=True, normalized=False)
                          for t, ty in zip(tokens, types) if ty == CONTROL])
  name = lambda k: None if meta(f"ggml.{k}") is None else tokens[meta(f"ggml.{k}")]
  bos = name("bos_token_id")
  add_bos = meta("ggml.add_bos_token", kind == "llama3")
  if add_bos and bos is not None:
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tokens.index(bos))])
  else:
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
  return transformers.PreTrainedTokenizerFast(
      tokenizer_object=tok, bos_token=bos, eos_token=name("eos_token_id"),
      unk_token=name("unknown_token_id"), pad_token=name("padding_token_id"),
      chat_template=meta("chat_template"), clean_up_tokenization_spaces=False,
      model_max_length=int(hf_gguf.metadata(
          r, f"{hf_gguf.metadata(r, 'general.architecture')}.context_length", 2048)))


def _split_kind(pre_tokenizer: dict | None) -> str | None:
  """Which of this module's splits a tokenizer.json pre_tokenizer is (None: none of them)."""
  if not pre_tokenizer:
    return None
  if pre_tokenizer.get("type") == "ByteLevel":
    return "gpt2" if pre_tokenizer.get("use_regex", True) else None
  parts = pre_tokenizer.get("pretokenizers") or []
  if pre_tokenizer.get("type") != "Sequence" or len(parts) != 2:
    return None
  first, second = parts
  if second.get("type") != "ByteLevel":
    return None
  if first.get("type") == "Digits" and first.get("individual_digits") and second.get(
      "use_regex", True):
    return "smollm"
  regex = (first.get("pattern") or {}).get("Regex") if first.get("type") == "Split" else None
  return {LLAMA3_SPLIT: "llama3", QWEN2_SPLIT: "qwen2"}.get(regex) if not second.get(
      "use_regex", True) else None


def to_metadata(tok, vocab_size: int) -> dict[str, Any]:
  """What `gguf_export` writes for a byte-level BPE `transformers` fast tokenizer.

  Returns {"pre", "tokens", "types", "merges", "bos", "eos", "unk", "pad", "add_bos",
  "chat_template"}; ids beyond the tokenizer (a padded embedding) become "[PAD<i>]" UNUSED.
  """
  backend = json.loads(tok.backend_tokenizer.to_str())
  model = backend["model"]
  kind = _split_kind(backend.get("pre_tokenizer"))
  if model.get("type") != "BPE" or kind is None or model.get("byte_fallback"):
    raise ValueError(f"tokenizer {tok.name_or_path!r}: GGUF export supports byte-level BPE "
                     "tokenizers with the GPT-2, SmolLM, Llama 3 or Qwen2 pre-tokenizer; got "
                     f"{model.get('type')} with pre_tokenizer "
                     f"{json.dumps(backend.get('pre_tokenizer'))[:120]}")
  vocab = tok.backend_tokenizer.get_vocab(with_added_tokens=True)
  if max(vocab.values()) >= vocab_size:
    raise ValueError(f"tokenizer {tok.name_or_path!r} has id {max(vocab.values())} but the "
                     f"model's vocab_size is {vocab_size}")
  by_id = {i: t for t, i in vocab.items()}
  added = {a["content"]: a for a in backend.get("added_tokens", [])}
  tokens, types = [], []
  for i in range(vocab_size):
    t = by_id.get(i)
    tokens.append(t if t is not None else f"[PAD{i}]")
    types.append(UNUSED if t is None else NORMAL if t not in added else
                 CONTROL if added[t].get("special") else USER_DEFINED)
  merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
  probe = tok("a", add_special_tokens=True)["input_ids"]
  ids = lambda x: x if x is None or x < vocab_size else None
  return {"pre": WRITE_PRE[kind], "tokens": tokens, "types": types, "merges": merges,
          "bos": ids(tok.bos_token_id), "eos": ids(tok.eos_token_id),
          "unk": ids(tok.unk_token_id), "pad": ids(tok.pad_token_id),
          "add_bos": bool(tok.bos_token_id is not None and probe[:1] == [tok.bos_token_id]),
          "chat_template": tok.chat_template if isinstance(tok.chat_template, str) else None}
