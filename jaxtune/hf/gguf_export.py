"""Writing a jaxtune model as a GGUF file, for llama.cpp, Ollama, LM Studio and transformers.

GGUF is how most small models are deployed. This writes one with `gguf.GGUFWriter`
following the conventions of llama.cpp's `convert_hf_to_gguf.py`: HF tensor names mapped
to GGUF's (`hf.gguf.HF_TO_GGUF_*`), q/k rows permuted to llama.cpp's rope layout for the
`llama` architecture, 1-D tensors and norms kept F32, matrices stored as `gguf_type`
(falling back to F16 for a matrix whose rows do not fill whole quantization blocks, as
llama.cpp does), llama3 rope scaling as a `rope_freqs` tensor, and the tokenizer (byte-level
BPE) with its chat template as `tokenizer.ggml.*` metadata.

    family    general.architecture   q/k rows
    llama     llama                  permuted
    mistral   llama                  permuted (full attention only: no sliding window)
    qwen2     qwen2                  as in HF
    qwen3     qwen3                  as in HF

    >>> write(cfg, params, "model.gguf", tokenizer=tok, gguf_type="q8_0")

gguf_type: f32 | f16 | bf16 | q8_0 | q4_0. Quantized leaves (QLoRA bases) and adapters must
be merged to dense params first (`jaxtune.convert.checkpoint_to_gguf` does it).
"""

from __future__ import annotations

import os

import jax
import numpy as np

from jaxtune import config as config_lib
from jaxtune import tree
from jaxtune.hf import gguf as hf_gguf
from jaxtune.hf import gguf_tokenizer
from jaxtune.hf import io as hf_io
from jaxtune.hf import keys

TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0")
ARCH_OF_FAMILY = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}


def _types(gguf_type: str):
  import gguf  # pylint: disable=g-import-not-at-top
  q, f = gguf.GGMLQuantizationType, gguf.LlamaFileType
  table = {"f32": (q.F32, f.ALL_F32), "f16": (q.F16, f.MOSTLY_F16),
           "bf16": (q.BF16, f.MOSTLY_BF16), "q8_0": (q.Q8_0, f.MOSTLY_Q8_0),
           "q4_0": (q.Q4_0, f.MOSTLY_Q4_0)}
  if gguf_type not in table:
    raise ValueError(f"bad gguf_type {gguf_type!r} (expected one of {', '.join(TYPES)})")
  return table[gguf_type]


def _check(cfg: config_lib.ModelConfig) -> str:
  arch = ARCH_OF_FAMILY.get(cfg.family)
  if arch is None:
    raise ValueError(f"GGUF export: family {cfg.family!r} is not supported (expected one of "
                     f"{', '.join(ARCH_OF_FAMILY)})")
  if cfg.sliding_window:
    raise ValueError(f"GGUF export: sliding_window={cfg.sliding_window} cannot be written "
                     f"for GGUF architecture {arch!r} (llama.cpp would attend over all tokens)")
  if cfg.final_logit_softcap:
    raise ValueError("GGUF export: final_logit_softcap is not supported for "
                     f"GGUF architecture {arch!r}")
  if cfg.rope_scaling.kind not in ("none", "linear", "llama3"):
    raise ValueError(f"GGUF export: rope scaling {cfg.rope_scaling.kind!r} is not supported")
  return arch


def _hparams(w, cfg: config_lib.ModelConfig, file_type, name: str) -> None:
  import gguf  # pylint: disable=g-import-not-at-top
  w.add_name(name)
  w.add_file_type(file_type)
  w.add_quantization_version(gguf.GGML_QUANT_VERSION)
  w.add_vocab_size(cfg.vocab_size)
  w.add_context_length(cfg.max_position_embeddings)
  w.add_embedding_length(cfg.hidden_size)
  w.add_block_count(cfg.num_layers)
  w.add_feed_forward_length(cfg.intermediate_size)
  w.add_head_count(cfg.num_heads)
  w.add_head_count_kv(cfg.num_kv_heads)
  w.add_key_length(cfg.head_dim)
  w.add_value_length(cfg.head_dim)
  w.add_rope_dimension_count(cfg.head_dim)
  w.add_rope_freq_base(cfg.rope_theta)
  w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
  if cfg.rope_scaling.kind == "linear":
    w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
    w.add_rope_scaling_factor(cfg.rope_scaling.factor)


def _vocab(w, cfg: config_lib.ModelConfig, tokenizer) -> None:
  meta = gguf_tokenizer.to_metadata(tokenizer, cfg.vocab_size)
  w.add_tokenizer_model("gpt2")
  w.add_tokenizer_pre(meta["pre"])
  w.add_token_list(meta["tokens"])
  w.add_token_types(meta["types"])
  w.add_token_merges(meta["merges"])
  eos = meta["eos"] if meta["eos"] is not None else next(iter(cfg.eos_token_id), None)
  for add, value in ((w.add_bos_token_id, meta["bos"]), (w.add_eos_token_id, eos),
                     (w.add_unk_token_id, meta["unk"]), (w.add_pad_token_id, meta["pad"])):
    if value is not None:
      add(int(value))
  w.add_add_bos_token(meta["add_bos"])
  w.add_add_eos_token(False)
  if meta["chat_template"]:
    w.add_chat_template(meta["chat_template"])


def _tensors(cfg: config_lib.ModelConfig, params, arch: str):
  """Yields (GGUF name, float32 array [out, in] or [n]) in the file's order."""
  flat = tree.flatten(params)
  for path, x in flat.items():
    if not isinstance(x, (jax.Array, np.ndarray)):
      raise ValueError(f"GGUF export: param {path} is a {type(x).__name__}; merge adapters / "
                       "dequantize it to a dense array first")
  for template, path, transpose in keys.rows(cfg):
    x = np.asarray(hf_io.to_host(flat[path]), np.float32)
    layers = range(cfg.num_layers) if "{i}" in template else [None]
    for i in layers:
      t = x if i is None else x[i]
      t = np.ascontiguousarray(t.T if transpose else t)
      key = template.format(i=i) if i is not None else template
      if arch == "llama" and (".q_proj." in key or ".k_proj." in key):
        t = hf_gguf.permute(t, cfg.num_heads if ".q_proj." in key else cfg.num_kv_heads)
      yield hf_gguf.gguf_name(key), t
  if cfg.rope_scaling.kind == "llama3":
    yield hf_gguf.ROPE_FREQS, hf_gguf.llama3_factors(cfg.rope_scaling, cfg.rope_theta,
                                                     cfg.head_dim)


def write(cfg: config_lib.ModelConfig, params, out_file: str, *, tokenizer,
          gguf_type: str = "f16", name: str = "") -> dict[str, int]:
  """Writes `params` of `cfg` with `tokenizer` to `out_file`; returns {tensor type: count}.

  Only process 0 writes; every process must call it (gathering sharded params).
  """
  import gguf  # pylint: disable=g-import-not-at-top
  arch = _check(cfg)
  qtype, file_type = _types(gguf_type)
  if tokenizer is None:
    raise ValueError(f"{out_file}: GGUF export needs the model's tokenizer (none was found)")
  tensors = list(_tensors(cfg, params, arch))  # collective gathers happen on every process
  if jax.process_index() != 0:
    return {}
  os.makedirs(os.path.dirname(os.path.abspath(out_file)), exist_ok=True)
  w = gguf.GGUFWriter(out_file, arch)
  _hparams(w, cfg, file_type, name or os.path.splitext(os.path.basename(out_file))[0])
  _vocab(w, cfg, tokenizer)
  counts: dict[str, int] = {}
  for gname, t in tensors:
    want = gguf.GGMLQuantizationType.F32 if t.ndim == 1 or gname.endswith("_norm.weight") \
        else qtype
    try:
      data = gguf.quants.quantize(t, want)
    except gguf.QuantError:  # rows that do not fill whole blocks: F16, as llama.cpp does
      want = gguf.GGMLQuantizationType.F16
      data = gguf.quants.quantize(t, want)
    w.add_tensor(gname, data, raw_dtype=want)
    counts[want.name] = counts.get(want.name, 0) + 1
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  return counts
