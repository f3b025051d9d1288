"""Loading the model's tokenizer (or the bundled one) and its chat template.

Training must tokenize exactly as inference will, so the tokenizer is always the model's own
(`AutoTokenizer.from_pretrained` on the model dir or hub id). The bundled tokenizer in
jaxtune/assets/tokenizer (byte-level BPE, 512 ids, ChatML template; see make_assets.py)
serves the default recipes and tests, offline.

    tok = tokenizer_lib.load("")                       # bundled
    tok = tokenizer_lib.load("Qwen/Qwen2.5-0.5B")      # hub id (or the local HF cache)
    tok = tokenizer_lib.load(model_dir, chat_template="my_template.jinja")
    tok = tokenizer_lib.from_config(train_cfg)         # data.tokenizer, else model.hf_path,
                                                       # else bundled; data.chat_template
    tokenizer_lib.save(tok, out_dir)                   # loadable by transformers 4.56+

A jaxtune run's workdir or checkpoint dir (also a `convert.py --from_hf` output) stands for
the tokenizer that run trained with, so a run can start from another run.

`chat_template` (data.chat_template) is a path to a jinja file, or the template text itself
when it contains '{%' or '{{'; it replaces the tokenizer's template, which a tokenizer without
one (most base models) needs for chat data.
"""

from __future__ import annotations

import os
import pathlib

from jaxtune import storage
from jaxtune.data import errors
from jaxtune.hf import gguf as hf_gguf
from jaxtune.hf import gguf_tokenizer
from jaxtune.hf import io as hf_io


def bundled_dir() -> str:
  """Directory of the bundled tokenizer (tokenizer.json, tokenizer_config.json, ...)."""
  return str(pathlib.Path(__file__).resolve().parents[1] / "assets" / "tokenizer")


def sample_path(name: str) -> str:
  """Path of a bundled sample file: 'chat', 'text', 'preference' or 'prompts'."""
  path = pathlib.Path(__file__).resolve().parents[1] / "assets" / "sample" / f"{name}.jsonl"
  if not path.is_file():
    raise errors.DataError(f"no bundled sample {name!r} (looked for {path}); expected one of "
                           "chat, text, preference, prompts")
  return str(path)


def read_template(chat_template: str) -> str:
  """Template text from a path, or `chat_template` itself if it is template text."""
  if "{%" in chat_template or "{{" in chat_template:
    return chat_template
  if storage.is_remote(chat_template):  # a bucket URL
    return storage.read_text(chat_template)
  if not os.path.isfile(chat_template):
    raise errors.DataError(f"data.chat_template: no such file {chat_template!r}; expected a "
                           "path to a jinja chat template")
  with open(chat_template, encoding="utf-8") as f:
    return f.read()


def load(path_or_id: str = "", *, chat_template: str = "", setting: str = "data.tokenizer"):
  """The tokenizer of a model dir or hub id ("" = bundled), optionally with a new template.

  Returns a `transformers` tokenizer (PreTrainedTokenizerFast when a tokenizer.json exists).
  Errors are one line naming `setting` (the config key the source came from).
  """
  import transformers  # pylint: disable=g-import-not-at-top

  from jaxtune import paths  # pylint: disable=g-import-not-at-top

  target = path_or_id or bundled_dir()
  if storage.is_remote(target):  # a bucket URL: its tokenizer files, copied locally
    target = storage.model_dir(target)
  if not os.path.exists(target) and not paths.is_hub_id(target):
    raise errors.DataError(f"{setting}: no such directory {target!r} (looked for "
                           f"{os.path.abspath(target)}); expected a model directory, a run's "
                           "workdir or a hub id")
  try:
    if hf_gguf.is_gguf(target):  # a .gguf file (or a dir with one): its tokenizer metadata
      tok = gguf_tokenizer.from_gguf(target)
    else:
      tok = transformers.AutoTokenizer.from_pretrained(target)
  except Exception as e:  # pylint: disable=broad-except
    where = ("a local directory without tokenizer files (tokenizer.json, "
             "tokenizer_config.json); set data.tokenizer to the model's tokenizer"
             if os.path.isdir(target) else "a hub id (offline: in the local HF cache)")
    raise errors.DataError(f"{setting}: cannot load a tokenizer from {target!r} "
                           f"({type(e).__name__}: {_first_line(e)}); it is {where}") from e
  if chat_template:
    tok.chat_template = read_template(chat_template)
  return tok


def _first_line(e: Exception) -> str:
  lines = [l.strip() for l in str(e).splitlines() if l.strip()]
  return lines[0] if lines else ""


def source(spec: str, chat_template: str = "") -> tuple[str, str]:
  """(tokenizer dir or hub id, chat template) that `spec` stands for: a jaxtune run's
  workdir or checkpoint dir (a `convert.py --from_hf` output too) means the tokenizer and
  template that run trained with; anything else is itself."""
  from jaxtune import checkpoint  # pylint: disable=g-import-not-at-top

  for _ in range(8):  # a run started from a run started from ...
    if (not spec or not (os.path.isdir(spec) or storage.is_remote(spec))
        or checkpoint.locate(spec) is None):
      break
    run = checkpoint.read_meta(spec).get("config", {})
    data, model = run.get("data", {}), run.get("model", {})
    chat_template = chat_template or data.get("chat_template", "")
    spec = data.get("tokenizer") or model.get("hf_path") or ""
  return spec, chat_template


def from_config(cfg):
  """Tokenizer for a TrainConfig: data.tokenizer, else model.hf_path's own (a run's: the one
  it trained with), else the bundled one; data.chat_template replaces its template."""
  setting = "data.tokenizer" if cfg.data.tokenizer else "model.hf_path"
  spec, template = source(cfg.data.tokenizer or cfg.model.hf_path, cfg.data.chat_template)
  return load(spec, chat_template=template, setting=setting)


def save(tok, out_dir: str) -> None:
  """Writes `tok` to out_dir so that every transformers version jaxtune allows loads it."""
  hf_io.save_tokenizer(tok, out_dir)


def special_ids(tok) -> frozenset[int]:
  """Ids of special tokens: the named ones plus added tokens marked special (<|eot_id|>)."""
  ids = set(tok.all_special_ids)
  for i, added in getattr(tok, "added_tokens_decoder", {}).items():
    if getattr(added, "special", False):
      ids.add(int(i))
  return frozenset(ids)


def describe(tok) -> dict:
  """Vocab size and special token ids, for logs and the model config."""
  return {
      "name_or_path": tok.name_or_path,
      "vocab_size": len(tok),
      "bos_token_id": tok.bos_token_id,
      "eos_token_id": tok.eos_token_id,
      "pad_token_id": tok.pad_token_id,
      "has_chat_template": bool(tok.chat_template),
  }
