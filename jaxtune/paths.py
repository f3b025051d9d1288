"""Where a run's inputs are: local paths made absolute when a run starts, hub ids kept.

A run writes its config into checkpoint meta, its HF export and the PEFT adapter's
`base_model_name_or_path`; a relative path there means nothing from another directory
(`convert.py` run elsewhere, `AutoPeftModelForCausalLM` on the adapter). So every path
setting is resolved once, at the start of a run (`config.resolve_paths(cfg)`, called by
`train.setup.prepare` and the launchers):

    model.hf_path=runs/base/hf          -> /home/me/runs/base/hf       (exists)
    model.hf_path=Qwen/Qwen2.5-0.5B     -> Qwen/Qwen2.5-0.5B           (a hub id, kept)
    model.hf_path=runs/typo/hf          -> ConfigError: no such directory (not a hub id:
                                           hub ids are NAME or NAMESPACE/NAME)
    data.train_files=a.jsonl,hf:x/y     -> /home/me/a.jsonl,hf:x/y
    data.chat_template=t.jinja          -> /home/me/t.jinja            (template text kept)
    model.hf_path=s3://bucket/base      -> s3://bucket/base            (a bucket URL, kept:
                                           s3://, gs://, any fsspec URL; see storage.py)

Resolving twice changes nothing. Keys a config does not have (a method section that is
not there) are skipped.
"""

from __future__ import annotations

import os
import re

from jaxtune import config_tree
from jaxtune import storage

# A local directory or file, or a hub id.
MODEL_KEYS = ("model.hf_path", "data.tokenizer", "distill.teacher_path", "grpo.reward_model",
              "peft.prompt_tokenizer")
# Local files that may not exist yet (written by a tool before training) or are checked
# with a better message later.
FILE_KEYS = ("distill.teacher_logits_file",)
# Comma-separated function specs: each "path/to/file.py:func" entry made absolute;
# "builtin:NAME" and "package.module:func" kept.
FUNCTION_KEYS = ("grpo.reward_fns",)
DATA_KEYS = ("data.train_files", "data.eval_files")  # comma-separated, hf:NAME entries kept
TEMPLATE_KEYS = ("data.chat_template",)  # a file, or the template text itself

_HUB_PART = r"[A-Za-z0-9](?:[A-Za-z0-9_.-]*[A-Za-z0-9_])?"
_HUB_ID = re.compile(rf"^{_HUB_PART}(?:/{_HUB_PART})?$")


def is_hub_id(text: str) -> bool:
  """True for NAME or NAMESPACE/NAME as the hub spells them ('..' and '--' not allowed)."""
  return bool(_HUB_ID.match(text)) and ".." not in text and "--" not in text


def model_source(value: str, key: str) -> str:
  """An existing local path as an absolute path, a hub id as itself, else ConfigError."""
  if not value or storage.is_remote(value):  # a bucket URL: checked where it is read
    return value
  local = os.path.expanduser(value)
  if os.path.exists(local):
    return os.path.abspath(local)
  if is_hub_id(value) and not value.startswith(("./", "../", "~")):
    return value
  raise _no_such(key, value, "a local model directory, a run's workdir or checkpoint dir, "
                 "or a hub id (NAME or NAMESPACE/NAME)")


def _no_such(key: str, value: str, expected: str) -> config_tree.ConfigError:
  return config_tree.ConfigError(
      f"{key}: no such directory or file {value!r} (looked for {os.path.abspath(value)}); "
      f"expected {expected}")


def data_spec(value: str) -> str:
  """Each local entry of a comma-separated data spec made absolute (hf:NAME kept)."""
  entries = [e.strip() for e in value.split(",")]
  return ",".join(e if (not e or e.startswith("hf:") or storage.is_remote(e)) else
                  os.path.abspath(os.path.expanduser(e)) for e in entries if e)


def function_specs(value: str) -> str:
  """Each "FILE.py:func" entry of a comma-separated list with FILE made absolute."""
  out = []
  for e in (e.strip() for e in value.split(",")):
    target, sep, name = e.rpartition(":")
    if sep and target.endswith(".py"):
      e = os.path.abspath(os.path.expanduser(target)) + ":" + name
    out.append(e)
  return ",".join(e for e in out if e)


def template(value: str, key: str) -> str:
  if not value or "{%" in value or "{{" in value or storage.is_remote(value):
    return value
  local = os.path.expanduser(value)
  if not os.path.isfile(local):
    raise _no_such(key, value, "a jinja chat template file (or the template text)")
  return os.path.abspath(local)


def resolve(cfg):
  """`cfg` (a TrainConfig) with its path settings resolved (see the module docstring)."""
  for key in MODEL_KEYS:
    if config_tree.has_path(cfg, key):
      cfg = config_tree.replace_path(cfg, key, model_source(config_tree.get_path(cfg, key), key))
  for key in FILE_KEYS:
    if config_tree.has_path(cfg, key) and config_tree.get_path(cfg, key):
      value = config_tree.get_path(cfg, key)
      value = value if storage.is_remote(value) else os.path.abspath(os.path.expanduser(value))
      cfg = config_tree.replace_path(cfg, key, value)
  for key in FUNCTION_KEYS:
    if config_tree.has_path(cfg, key):
      cfg = config_tree.replace_path(cfg, key, function_specs(config_tree.get_path(cfg, key)))
  for key in DATA_KEYS:
    if config_tree.has_path(cfg, key):
      cfg = config_tree.replace_path(cfg, key, data_spec(config_tree.get_path(cfg, key)))
  for key in TEMPLATE_KEYS:
    if config_tree.has_path(cfg, key):
      cfg = config_tree.replace_path(cfg, key, template(config_tree.get_path(cfg, key), key))
  return cfg
