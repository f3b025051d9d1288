"""Regenerates the bundled sample data and tokenizer under jaxtune/assets/.

The default recipes must run offline, so jaxtune ships its own small data and a tokenizer
trained on it. Everything is generated from a fixed seed by this script and the produced
files are committed; rerun it after changing the generators:

    python -m jaxtune.data.make_assets [--out=jaxtune/assets]

Writes:
  sample/chat.jsonl        multi-turn chats (arithmetic, words, capitals, colours), half of
                           them with a system prompt ("system" key or a system message)
  sample/text.jsonl        raw text paragraphs about the same facts (continued pre-training)
  sample/preference.jsonl  prompt / chosen (correct) / rejected (wrong) answers
  sample/prompts.jsonl     prompt / answer pairs (GRPO)
  tokenizer/               byte-level BPE, 512 ids, ChatML chat template, loadable with
                           transformers.AutoTokenizer.from_pretrained(dir)
"""

from __future__ import annotations

import argparse
import json
import pathlib
import random

VOCAB_SIZE = 512  # a multiple of 64; 3 special tokens + 256 bytes + 253 merges
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")  # ids 0, 1, 2
BOS, EOS, PAD = "<|im_start|>", "<|im_end|>", "<|endoftext|>"

# ChatML, as Qwen renders it, without a default system prompt.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}")

CAPITALS = {
    "France": "Paris", "Japan": "Tokyo", "Italy": "Rome", "Spain": "Madrid",
    "Germany": "Berlin", "Egypt": "Cairo", "Peru": "Lima", "Kenya": "Nairobi",
    "Canada": "Ottawa", "Norway": "Oslo", "Greece": "Athens", "Cuba": "Havana",
    "Chile": "Santiago", "India": "New Delhi", "China": "Beijing", "Ireland": "Dublin",
}
COLOURS = {
    "a banana": "yellow", "the sky": "blue", "grass": "green", "snow": "white",
    "coal": "black", "a tomato": "red", "an orange": "orange", "a plum": "purple",
}
WORDS = ("cat", "dog", "house", "river", "apple", "green", "table", "music", "light",
         "stone", "water", "paper", "cloud", "bread", "chair", "lemon", "tiger", "plant")
SYSTEMS = ("You are a helpful assistant.", "You are a concise tutor. Answer briefly.",
           "You answer questions about numbers, words and places.")


def _arith(rng: random.Random) -> tuple[str, str, int]:
  a, b = rng.randint(0, 50), rng.randint(0, 50)
  if rng.random() < 0.5:
    return f"What is {a} + {b}?", f"{a} + {b} = {a + b}.", a + b
  a, b = max(a, b), min(a, b)
  return f"What is {a} - {b}?", f"{a} - {b} = {a - b}.", a - b


def _single(rng: random.Random) -> tuple[str, str]:
  """One (question, answer) pair from one of the fact families."""
  kind = rng.randrange(5)
  if kind == 0:
    q, a, _ = _arith(rng)
    return q, a
  w = rng.choice(WORDS)
  if kind == 1:
    return f"Reverse the word '{w}'.", f"'{w}' reversed is '{w[::-1]}'."
  if kind == 2:
    return f"How many letters are in '{w}'?", f"'{w}' has {len(w)} letters."
  if kind == 3:
    country = rng.choice(sorted(CAPITALS))
    return (f"What is the capital of {country}?",
            f"The capital of {country} is {CAPITALS[country]}.")
  thing = rng.choice(sorted(COLOURS))
  return f"What colour is {thing}?", f"{thing[0].upper() + thing[1:]} is {COLOURS[thing]}."


def chats(rng: random.Random, n: int) -> list[dict]:
  out = []
  for i in range(n):
    turns = []
    if rng.random() < 0.35:  # arithmetic follow-up chain
      q, a, total = _arith(rng)
      turns += [q, a]
      for _ in range(rng.randint(1, 2)):
        c = rng.randint(1, 9)
        turns += [f"And if you add {c} more?", f"{total} + {c} = {total + c}."]
        total += c
    else:
      for _ in range(rng.randint(1, 3)):
        turns += list(_single(rng))
    messages = [{"role": "user" if j % 2 == 0 else "assistant", "content": t}
                for j, t in enumerate(turns)]
    record = {"messages": messages}
    if i % 4 == 1:
      record = {"system": rng.choice(SYSTEMS), "messages": messages}
    elif i % 4 == 3:
      record = {"messages": [{"role": "system", "content": rng.choice(SYSTEMS)}] + messages}
    out.append(record)
  return out


def texts(rng: random.Random, n: int) -> list[dict]:
  out = []
  for _ in range(n):
    sentences = []
    for _ in range(rng.randint(3, 6)):
      q, a = _single(rng)
      sentences.append(a if rng.random() < 0.7 else f"Question: {q} Answer: {a}")
    out.append({"text": " ".join(sentences)})
  return out


def preferences(rng: random.Random, n: int) -> list[dict]:
  out = []
  for _ in range(n):
    if rng.random() < 0.7:
      q, a, value = _arith(rng)
      wrong = value + rng.choice((-3, -2, -1, 1, 2, 3, 10))
      out.append({"prompt": q, "chosen": a, "rejected": a.replace(f"= {value}.", f"= {wrong}.")})
    else:
      country = rng.choice(sorted(CAPITALS))
      other = rng.choice(sorted(set(CAPITALS.values()) - {CAPITALS[country]}))
      out.append({"prompt": f"What is the capital of {country}?",
                  "chosen": f"The capital of {country} is {CAPITALS[country]}.",
                  "rejected": f"The capital of {country} is {other}."})
  return out


def prompts(rng: random.Random, n: int) -> list[dict]:
  out = []
  for _ in range(n):
    q, _, value = _arith(rng)
    out.append({"prompt": q + " Reply with the number only.", "answer": str(value)})
  return out


def _write_jsonl(path: pathlib.Path, records: list[dict]) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  with path.open("w") as f:
    for r in records:
      f.write(json.dumps(r, ensure_ascii=False) + "\n")


def _plain(record: dict) -> str:
  """The text of a record as the model sees it (roles and contents, no JSON syntax)."""
  parts = [record.get("system", ""), record.get("text", ""), record.get("prompt", ""),
           record.get("chosen", ""), record.get("rejected", ""), record.get("answer", "")]
  for m in record.get("messages", ()):
    parts += [m["role"] + "\n", m["content"]]
  return "\n".join(p for p in parts if p)


def train_tokenizer(corpus: list[str], out_dir: pathlib.Path) -> None:
  """Trains the byte-level BPE on `corpus` and saves it as a transformers tokenizer."""
  import tokenizers  # pylint: disable=g-import-not-at-top
  from tokenizers import decoders  # pylint: disable=g-import-not-at-top
  from tokenizers import models  # pylint: disable=g-import-not-at-top
  from tokenizers import pre_tokenizers  # pylint: disable=g-import-not-at-top
  from tokenizers import trainers  # pylint: disable=g-import-not-at-top

  tok = tokenizers.Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, special_tokens=list(SPECIAL_TOKENS),
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                show_progress=False)
  tok.train_from_iterator(corpus, trainer=trainer)
  if tok.get_vocab_size() != VOCAB_SIZE:
    raise RuntimeError(f"trained vocab has {tok.get_vocab_size()} ids, expected {VOCAB_SIZE}: "
                       "the corpus is too small for that many merges")
  out_dir.mkdir(parents=True, exist_ok=True)
  tok.save(str(out_dir / "tokenizer.json"))
  # Written by hand rather than with save_pretrained so that the files are the same for
  # transformers 4.x and 5.x (5.x writes a class name 4.x does not know).
  specials = {"bos_token": BOS, "eos_token": EOS, "pad_token": PAD}
  added = {str(tok.token_to_id(t)): {"content": t, "lstrip": False, "normalized": False,
                                     "rstrip": False, "single_word": False, "special": True}
           for t in SPECIAL_TOKENS}
  config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 2048,
            "clean_up_tokenization_spaces": False, "added_tokens_decoder": added,
            "chat_template": CHAT_TEMPLATE, **specials}
  (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
  (out_dir / "special_tokens_map.json").write_text(json.dumps(specials, indent=2) + "\n")


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  default_out = pathlib.Path(__file__).resolve().parents[1] / "assets"
  parser.add_argument("--out", default=str(default_out))
  args = parser.parse_args(argv)
  out = pathlib.Path(args.out)
  rng = random.Random(1234)
  data = {
      "chat": chats(rng, 400),
      "text": texts(rng, 300),
      "preference": preferences(rng, 300),
      "prompts": prompts(rng, 300),
  }
  for name, records in data.items():
    _write_jsonl(out / "sample" / f"{name}.jsonl", records)
  corpus = [_plain(r) for records in data.values() for r in records]
  train_tokenizer(corpus, out / "tokenizer")
  for p in sorted(out.rglob("*")):
    if p.is_file():
      print(f"{p.relative_to(out)}: {p.stat().st_size} bytes")


if __name__ == "__main__":
  main()
