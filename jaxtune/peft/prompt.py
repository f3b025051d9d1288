"""Prompt tuning (Lester et al. 2021): N trainable virtual-token embeddings before every input.

Every weight of the model stays frozen; the only trainable tensor is `prompt_embeddings`
[N, D], which the decoder runs in front of each row as N extra tokens. One base can serve
many tasks, each a few thousand numbers. `apply` adds the embeddings to the params tree
under the decoder's embedding-prefix hook ("prefix_embeddings", see
`models/virtual_tokens.py`), which also handles positions (the real tokens follow the
virtual ones, as in PEFT), packed rows (every packed segment sees the virtual tokens as
its own prefix) and drops the virtual tokens' outputs, so logits stay [B, T, V] for the
real tokens (PEFT's model returns [B, N + T, V]; its rows N: are ours):

    adapters.params  {"prompt_embeddings": [N, D]}
    apply(params)    {**params, "prefix_embeddings": [N, D]}

Init as PEFT's `prompt_tuning_init`: "random" (N(0, 1), torch's Embedding init, PEFT's
default), "sample_vocab" (rows of the token embedding at random ids) or "text" (the
embeddings of `prompt_init_text`'s tokens, repeated or cut to N; the tokenizer is
`peft.prompt_tokenizer`, loaded without remote code, as PEFT's tokenizer_name_or_path).
Files: PEFT's PROMPT_TUNING directory (`prompt_embeddings` [N, D] in
adapter_model.safetensors). Not mergeable: there is no weight to fold the prompt into.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import safetensors

from jaxtune import config as config_lib
from jaxtune.models import virtual_tokens
from jaxtune.peft import peft_io

KEY = "prompt_embeddings"
INITS = ("random", "sample_vocab", "text")


def _static(default=dataclasses.MISSING):
  return dataclasses.field(default=default, metadata=dict(static=True))


@dataclasses.dataclass(frozen=True)
class PromptAdapters:
  """params: {"prompt_embeddings": [N, D]}; init / init_text / tokenizer: provenance only."""
  params: Any
  init: str = _static("random")
  init_text: str = _static("")
  tokenizer: str = _static("")

  @property
  def num_virtual_tokens(self) -> int:
    return int(self.params[KEY].shape[0])

  def apply(self, params: dict, rng: jax.Array | None = None) -> dict:
    """`params` plus the decoder's "prefix_embeddings" entry (rng unused)."""
    del rng
    return apply(self, params)


jax.tree_util.register_dataclass(PromptAdapters)


def apply(adapters: PromptAdapters, params: dict) -> dict:
  """{**params, "prefix_embeddings": prompt_embeddings}; the base leaves are shared."""
  if set(adapters.params) != {KEY}:
    raise ValueError(f"prompt adapters: params must hold exactly {KEY!r}, got "
                     f"{sorted(adapters.params)}")
  if virtual_tokens.PREFIX_EMBEDDINGS in params:
    raise ValueError(f"prompt.apply: params already hold {virtual_tokens.PREFIX_EMBEDDINGS!r} "
                     "(applied twice?)")
  return {**params, virtual_tokens.PREFIX_EMBEDDINGS: adapters.params[KEY]}


def text_token_ids(text: str, n: int, tokenizer: str) -> list[int]:
  """PEFT's TEXT init ids: the tokenizer's ids of `text` (special tokens as it adds them),
  cut to n or repeated until n. tokenizer: a local dir or hub id, no remote code."""
  if not text or not tokenizer:
    raise config_lib.ConfigError("peft.prompt_init=text needs peft.prompt_init_text and "
                                 "peft.prompt_tokenizer (a tokenizer directory)")
  import transformers  # only for this init
  tok = transformers.AutoTokenizer.from_pretrained(tokenizer, trust_remote_code=False)
  ids = list(tok(text)["input_ids"])
  if not ids:
    raise config_lib.ConfigError(f"peft.prompt_init_text={text!r} has no tokens")
  return (ids * math.ceil(n / len(ids)))[:n]


def init(cfg: config_lib.ModelConfig, params: dict, peft_cfg: config_lib.PeftConfig, *,
         key: jax.Array, token_ids: Any = None) -> PromptAdapters:
  """[N, D] float32 virtual-token embeddings per peft.prompt_init (see the module docstring).

  token_ids: explicit init ids [N] (overrides prompt_init; e.g. a tokenized text).
  """
  n = peft_cfg.num_virtual_tokens
  if n <= 0:
    raise config_lib.ConfigError(f"bad value for peft.num_virtual_tokens: {n} (expected > 0)")
  config_lib.check_choice("peft.prompt_init", peft_cfg.prompt_init, INITS)
  table = params["embed_tokens"]["embedding"]  # [V, D]
  if token_ids is None and peft_cfg.prompt_init == "text":
    token_ids = text_token_ids(peft_cfg.prompt_init_text, n, peft_cfg.prompt_tokenizer)
  if token_ids is None and peft_cfg.prompt_init == "sample_vocab":
    token_ids = jax.random.randint(key, (n,), 0, cfg.vocab_size)
  if token_ids is None:
    emb = jax.random.normal(key, (n, cfg.hidden_size), jnp.float32)
  else:
    token_ids = jnp.asarray(token_ids, jnp.int32)
    if token_ids.shape != (n,):
      raise ValueError(f"prompt.init: token_ids has shape {token_ids.shape}, expected ({n},)")
    emb = jnp.take(table, token_ids, axis=0).astype(jnp.float32)
  return PromptAdapters(params={KEY: emb}, init=peft_cfg.prompt_init,
                        init_text=peft_cfg.prompt_init_text, tokenizer=peft_cfg.prompt_tokenizer)


def axes(cfg: config_lib.ModelConfig, adapters: PromptAdapters) -> PromptAdapters:
  """[N, D]: (None, 'embed'), sharded like the hidden size of the token embedding."""
  del cfg
  return dataclasses.replace(adapters, params={KEY: (None, "embed")})


def save_peft(cfg: config_lib.ModelConfig, adapters: PromptAdapters, out_dir: str, *,
              base_model_name_or_path: str = "", dtype: str | None = None) -> str:
  """PEFT's PROMPT_TUNING directory: `prompt_embeddings` [N, D] and its config."""
  emb = peft_io.host(adapters.params[KEY], dtype)
  if emb.shape != (emb.shape[0], cfg.hidden_size):
    raise ValueError(f"prompt.save_peft: prompt_embeddings {emb.shape}, expected "
                     f"[N, {cfg.hidden_size}]")
  pc = {"peft_type": "PROMPT_TUNING", "task_type": "CAUSAL_LM",
        "num_virtual_tokens": int(emb.shape[0]), "token_dim": cfg.hidden_size,
        "num_transformer_submodules": 1, "num_attention_heads": cfg.num_heads,
        "num_layers": cfg.num_layers, "prompt_tuning_init": adapters.init.upper(),
        "prompt_tuning_init_text": adapters.init_text or None,
        "tokenizer_name_or_path": adapters.tokenizer or None, "tokenizer_kwargs": None,
        "inference_mode": True, "modules_to_save": None, "revision": None,
        "base_model_name_or_path": base_model_name_or_path or None}
  return peft_io.write_adapter(out_dir, {KEY: np.ascontiguousarray(emb)}, pc, family=cfg.family)


def load_peft(cfg: config_lib.ModelConfig, adapter_dir: str, *,
              dtype: Any = jnp.float32) -> PromptAdapters:
  """Reads a PEFT PROMPT_TUNING directory; other fields or tensors are errors naming them."""
  adapter_dir, pc = peft_io.read_adapter_config(adapter_dir)
  source = os.path.join(adapter_dir, peft_io.CONFIG_FILE)
  peft_io.check_fields(
      pc, source, peft_type="PROMPT_TUNING",
      handled={"peft_type", "task_type", "num_virtual_tokens", "token_dim",
               "num_transformer_submodules", "num_attention_heads", "num_layers"},
      ignored={"base_model_name_or_path", "revision", "inference_mode", "prompt_tuning_init",
               "prompt_tuning_init_text", "tokenizer_name_or_path", "tokenizer_kwargs",
               "auto_mapping", "peft_version"},
      what="prompt tuning of a decoder-only model")
  if pc.get("num_transformer_submodules", 1) != 1:
    raise ValueError(f"{source}: num_transformer_submodules={pc['num_transformer_submodules']}"
                     " (a decoder-only model has 1)")
  n, d = int(pc["num_virtual_tokens"]), cfg.hidden_size
  if pc.get("token_dim", d) != d:
    raise ValueError(f"{source}: token_dim={pc['token_dim']} but the model's hidden size is {d}")
  wpath = peft_io.weights_file(adapter_dir)
  with safetensors.safe_open(wpath, framework="np") as f:
    names = sorted(f.keys())
    if names != [KEY]:
      raise ValueError(f"{wpath}: expected exactly the tensor {KEY!r}, got {names[:8]}")
    emb = f.get_tensor(KEY)
  if emb.shape != (n, d):
    raise ValueError(f"{wpath}: {KEY} has shape {list(emb.shape)}, expected [{n}, {d}] "
                     "(num_virtual_tokens, hidden size)")
  init_name = str(pc.get("prompt_tuning_init") or "RANDOM").lower()
  return PromptAdapters(params={KEY: jnp.asarray(emb.astype(np.float32), dtype)},
                        init=init_name if init_name in INITS else "random",
                        init_text=pc.get("prompt_tuning_init_text") or "",
                        tokenizer=pc.get("tokenizer_name_or_path") or "")


@dataclasses.dataclass(frozen=True)
class PromptMethod:
  """Prompt tuning as a `base.PeftMethod`; `mergeable` False: `merge` is an error."""
  name: str = "prompt_tuning"
  quantized_base: bool = False
  peft_type: str = "PROMPT_TUNING"
  adapters_type: type = PromptAdapters
  mergeable: bool = False

  def init(self, model_cfg, params, peft_cfg, key) -> PromptAdapters:
    if peft_cfg.dropout:
      raise config_lib.ConfigError(f"bad value for peft.dropout: {peft_cfg.dropout} (prompt "
                                   "tuning has no dropout; it applies to lora, qlora, dora, qdora)")
    return init(model_cfg, params, peft_cfg, key=key)

  def axes(self, model_cfg, adapters: PromptAdapters) -> PromptAdapters:
    return axes(model_cfg, adapters)

  def apply(self, params: dict, adapters: PromptAdapters, rng: jax.Array | None = None) -> dict:
    del rng
    return apply(adapters, params)

  def merge(self, model_cfg, params: dict, adapters: PromptAdapters) -> dict:
    raise ValueError("peft.method=prompt_tuning is not mergeable (virtual tokens are inputs, "
                     "not weights); export the adapter (launch/convert.py --peft) instead")

  def save(self, model_cfg, adapters: PromptAdapters, out_dir: str, *,
           base_model_name_or_path: str = "") -> str:
    return save_peft(model_cfg, adapters, out_dir, base_model_name_or_path=base_model_name_or_path)

  def load(self, model_cfg, adapter_dir: str) -> PromptAdapters:
    return load_peft(model_cfg, adapter_dir)


METHOD = PromptMethod()
