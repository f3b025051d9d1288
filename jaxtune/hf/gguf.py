"""Reading GGUF files (llama.cpp's format) as jaxtune models: config, weights, names.

Most small models are shared as GGUF; this makes one a jaxtune model without torch. The
metadata becomes an HF-style config dict read by the family's own `from_hf` (so a GGUF and
a config.json of the same model give the same ModelConfig), every tensor is dequantized to
float32 on the host with the `gguf` package, llama.cpp's q/k row permutation is undone for
the `llama` architecture, and each param is handed to `place(path, host_array)` as it is
built, exactly as `hf.io.load_hf` does (QLoRA quantizes there: no dense copy on a device).

    arch (general.architecture)   family   q/k rows
    llama                         llama    permuted by llama.cpp (undone here)
    qwen2                         qwen2    as in HF (q/k/v biases)
    qwen3                         qwen3    as in HF (q/k norms)

    >>> cfg, params = load("SmolLM2-135M-Instruct.Q4_1.gguf")   # or the dir holding it
    >>> params["layers"]["self_attn"]["q_proj"]["kernel"].shape  # [L, D, H*Dh]
    (30, 576, 576)

Tensor types: whatever `gguf.dequantize` implements (F32, F16, BF16, Q4_0, Q4_1, Q5_0,
Q5_1, Q8_0, Q2_K..Q6_K, IQ*, TQ*, MXFP4); any other is refused by name. The GGUF tensor
names map to HF keys through `HF_TO_GGUF`, so the family's key table (`hf.keys`) checks
names and shapes and stacks layers exactly as for safetensors.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from typing import Any, Callable

import jax.numpy as jnp
import numpy as np

from jaxtune import config as config_lib
from jaxtune import tree
from jaxtune.hf import config as hf_config
from jaxtune.hf import keys

# general.architecture -> (HF model_type, q/k rows permuted by llama.cpp's converter).
ARCHS = {"llama": ("llama", True), "qwen2": ("qwen2", False), "qwen3": ("qwen3", False)}

# HF key (layer part after "model.layers.{i}.") <-> GGUF tensor name (after "blk.{i}.").
HF_TO_GGUF_GLOBAL = {"model.embed_tokens.weight": "token_embd.weight",
                     "model.norm.weight": "output_norm.weight",
                     "lm_head.weight": "output.weight"}
HF_TO_GGUF_LAYER = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.q_norm.weight": "attn_q_norm.weight",
    "self_attn.k_norm.weight": "attn_k_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}
_GGUF_TO_HF_LAYER = {v: k for k, v in HF_TO_GGUF_LAYER.items()}
_GGUF_TO_HF_GLOBAL = {v: k for k, v in HF_TO_GGUF_GLOBAL.items()}
ROPE_FREQS = "rope_freqs.weight"  # llama3 rope factors, written by llama.cpp's converter


def gguf_name(hf_key: str) -> str:
  """'model.layers.3.self_attn.q_proj.weight' -> 'blk.3.attn_q.weight'."""
  if hf_key in HF_TO_GGUF_GLOBAL:
    return HF_TO_GGUF_GLOBAL[hf_key]
  m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", hf_key)
  if not m or m.group(2) not in HF_TO_GGUF_LAYER:
    raise ValueError(f"no GGUF name for the HF tensor {hf_key}")
  return f"blk.{m.group(1)}.{HF_TO_GGUF_LAYER[m.group(2)]}"


def hf_key(name: str) -> str | None:
  """'blk.3.attn_q.weight' -> 'model.layers.3.self_attn.q_proj.weight' (None if unknown)."""
  if name in _GGUF_TO_HF_GLOBAL:
    return _GGUF_TO_HF_GLOBAL[name]
  m = re.fullmatch(r"blk\.(\d+)\.(.+)", name)
  if m and m.group(2) in _GGUF_TO_HF_LAYER:
    return f"model.layers.{m.group(1)}.{_GGUF_TO_HF_LAYER[m.group(2)]}"
  return None


def permute(w: np.ndarray, n_head: int) -> np.ndarray:
  """HF q/k rows [H*Dh, ...] -> llama.cpp's interleaved rope layout (per head: pairs)."""
  return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(
      w.shape)


def unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
  """The inverse of `permute`: llama.cpp's q/k rows back to HF's rotate-half layout."""
  return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(
      w.shape)


def find(path: str) -> str:
  """The .gguf file at `path`: the file itself, or the one .gguf file in a directory."""
  if os.path.isfile(path):
    if not path.endswith(".gguf"):
      raise ValueError(f"{path}: expected a .gguf file")
    return path
  found = sorted(f for f in os.listdir(path) if f.endswith(".gguf")) if os.path.isdir(path) else []
  if len(found) != 1:
    raise ValueError(f"{path}: expected one .gguf file, found {found or 'none'}")
  return os.path.join(path, found[0])


def is_gguf(path: str) -> bool:
  """True for a .gguf file, or a directory with a .gguf file and no config.json."""
  if os.path.isfile(path):
    return path.endswith(".gguf")
  return (os.path.isdir(path) and not os.path.exists(os.path.join(path, "config.json"))
          and any(f.endswith(".gguf") for f in os.listdir(path)))


def reader(path: str):
  """A `gguf.GGUFReader` (memory-mapped) for the .gguf file at `path`."""
  try:
    import gguf  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError("reading GGUF files needs the `gguf` package: pip install 'jaxtune[gguf]'"
                      " (or pip install gguf)") from e
  return gguf.GGUFReader(find(path))


def metadata(r, key: str, default: Any = None) -> Any:
  """One metadata value as a Python value (str, int, float, bool or list)."""
  field = r.fields.get(key)
  return default if field is None else field.contents()


def _f32(value) -> float:
  """A float32 metadata value as the shortest decimal that is that float32 (1e-05, not
  9.999999747378752e-06), as the config.json it came from spelled it."""
  return float(str(np.float32(value)))


def _one(value, key: str, source: str):
  """A per-layer array that must be uniform -> its single value."""
  if isinstance(value, list):
    if len(set(value)) != 1:
      raise ValueError(f"{source}: {key} differs between layers ({value[:8]}...); jaxtune "
                       "needs the same value in every layer")
    return value[0]
  return value


def llama3_factors(rs: config_lib.RopeScaling, theta: float, head_dim: int) -> np.ndarray:
  """llama.cpp's per-dimension llama3 rope factors [head_dim // 2] (frequencies divided)."""
  orig = rs.original_max_position_embeddings
  out = []
  for i in range(0, head_dim, 2):
    wavelen = 2 * math.pi * theta ** (i / head_dim)
    smooth = (orig / wavelen - rs.low_freq_factor) / (rs.high_freq_factor - rs.low_freq_factor)
    out.append(1.0 if wavelen < orig / rs.high_freq_factor else rs.factor
               if wavelen > orig / rs.low_freq_factor else 1.0 / ((1 - smooth) / rs.factor
                                                                   + smooth))
  return np.asarray(out, np.float32)


def _llama3_scaling(freqs: np.ndarray, theta: float, head_dim: int,
                    source: str) -> config_lib.RopeScaling:
  """A llama3 RopeScaling that reproduces llama.cpp's `rope_freqs` factors exactly.

  Only the two wavelength bounds (orig / high, orig / low) matter, so low_freq_factor is
  taken as 1: from the factors between the bounds when there are any (smooth = orig /
  wavelen - 1 over high - 1), else Llama 3's own (low 1, high 4, original context 8192).
  """
  factor = float(freqs.max())
  candidates = [config_lib.RopeScaling(kind="llama3", factor=factor)]
  wavelen = 2 * math.pi * theta ** (np.arange(0, head_dim, 2) / head_dim)
  between = np.nonzero((freqs > 1 + 1e-6) & (freqs < factor - 1e-6))[0]
  if factor > 1 and len(between):
    smooth = (1 / freqs[between] - 1 / factor) / (1 - 1 / factor)  # in (0, 1)
    if len(between) >= 2:  # smooth = a / wavelen - b: two points fix a and b
      a, minus_b = np.polyfit(1 / wavelen[between], smooth, 1)
      b = -minus_b
      high = 1 + 1 / b if b > 0 else 4.0
      orig = a * (high - 1)
    else:  # one point: keep high_freq_factor 4
      high, orig = 4.0, wavelen[between[0]] * (3 * smooth[0] + 1)
    candidates.insert(0, config_lib.RopeScaling(
        kind="llama3", factor=factor, high_freq_factor=float(round(high, 6)),
        original_max_position_embeddings=int(round(orig))))
  for rs in candidates:
    if freqs.shape == (head_dim // 2,) and np.allclose(
        freqs, llama3_factors(rs, theta, head_dim), rtol=1e-5):
      return rs
  raise ValueError(f"{source}: tensor {ROPE_FREQS} {list(freqs.shape)} is not a llama3 rope "
                   "scaling (per-dimension rope factors of another kind are not supported)")


def hf_config_dict(r, source: str) -> tuple[dict[str, Any], config_lib.RopeScaling | None]:
  """(HF config.json-style dict, llama3 RopeScaling or None) from the GGUF metadata."""
  arch = metadata(r, "general.architecture")
  if arch not in ARCHS:
    raise ValueError(f"{source}: GGUF architecture {arch!r} is not supported (expected one of "
                     f"{', '.join(ARCHS)})")
  get = lambda k, d=None: _one(metadata(r, f"{arch}.{k}", d), f"{arch}.{k}", source)
  if get("expert_count", 0):
    raise ValueError(f"{source}: {arch}.expert_count={get('expert_count')}: mixture-of-experts "
                     "models are not supported")
  names = {t.name for t in r.tensors}
  heads, hidden = int(get("attention.head_count")), int(get("embedding_length"))
  head_dim = int(get("attention.key_length", 0) or get("rope.dimension_count", 0)
                 or hidden // heads)
  for key in ("attention.value_length", "rope.dimension_count"):
    if get(key) is not None and int(get(key)) != head_dim:
      raise ValueError(f"{source}: {arch}.{key}={get(key)} differs from the head dim "
                       f"{head_dim}: partial rotary / unequal value heads are not supported")
  d = {"model_type": ARCHS[arch][0], "hidden_size": hidden, "num_attention_heads": heads,
       "intermediate_size": int(get("feed_forward_length")),
       "num_hidden_layers": int(get("block_count")),
       "num_key_value_heads": int(get("attention.head_count_kv", heads)), "head_dim": head_dim,
       "rope_theta": _f32(get("rope.freq_base", 10000.0)),
       "rms_norm_eps": _f32(get("attention.layer_norm_rms_epsilon", 1e-6)),
       "max_position_embeddings": int(get("context_length", 2048)),
       "tie_word_embeddings": "output.weight" not in names}
  embed = next((t for t in r.tensors if t.name == "token_embd.weight"), None)
  d["vocab_size"] = int(get("vocab_size", 0) or (embed.shape[1] if embed is not None else 0))
  scaling = metadata(r, f"{arch}.rope.scaling.type", "none")
  if scaling == "linear":
    d["rope_scaling"] = {"rope_type": "linear",
                         "factor": _f32(get("rope.scaling.factor", 1.0))}
  elif scaling not in ("none", None):
    raise ValueError(f"{source}: {arch}.rope.scaling.type={scaling!r} is not supported "
                     "(expected none or linear; llama3 comes as a rope_freqs tensor)")
  tok = lambda k: metadata(r, f"tokenizer.ggml.{k}")
  d["bos_token_id"], d["pad_token_id"] = tok("bos_token_id"), tok("padding_token_id")
  eos = [i for i in (tok("eos_token_id"), tok("eot_token_id"), tok("eom_token_id"))
         if i is not None]
  d["eos_token_id"] = list(dict.fromkeys(eos))
  llama3 = None
  if ROPE_FREQS in names:
    freqs = next(t for t in r.tensors if t.name == ROPE_FREQS)
    llama3 = _llama3_scaling(np.asarray(_dequantize(freqs, source)).reshape(-1),
                             d["rope_theta"], head_dim, source)
  return d, llama3


def read_config(path: str, base: config_lib.ModelConfig | None = None,
                r=None) -> config_lib.ModelConfig:
  """ModelConfig from a GGUF's metadata (compute options kept from `base`)."""
  r = r or reader(path)
  source = find(path)
  d, llama3 = hf_config_dict(r, source)
  cfg = hf_config.from_hf(d, base, source=source)
  if llama3 is not None:
    cfg = dataclasses.replace(cfg, rope_scaling=llama3)
  return cfg


def _dequantize(t, source: str) -> np.ndarray:
  """One tensor as float32 in numpy order [rows, cols] (GGUF's shape reversed)."""
  import gguf  # pylint: disable=g-import-not-at-top
  try:
    x = gguf.dequantize(t.data, t.tensor_type)
  except (NotImplementedError, KeyError) as e:
    raise ValueError(f"{source}: tensor {t.name} has type {t.tensor_type.name}, which the gguf "
                     f"package cannot dequantize ({e})") from e
  return np.asarray(x, np.float32).reshape(tuple(int(n) for n in reversed(t.shape)))


def source_dtype(path: str) -> str:
  """'bfloat16' / 'float16' when every matrix is stored so, else 'float32' (quantized)."""
  types = {t.tensor_type.name for t in reader(path).tensors if len(t.shape) > 1}
  return {frozenset({"BF16"}): "bfloat16", frozenset({"F16"}): "float16"}.get(
      frozenset(types), "float32")


def load(path: str, dtype=jnp.float32, *, base: config_lib.ModelConfig | None = None,
         place: Callable[[str, np.ndarray], Any] | None = None):
  """(ModelConfig, params) from a .gguf file or a directory holding one.

  dtype: storage dtype of the returned params. `place(path, host_array)` puts one param
  where it belongs (as in `hf.io.load_hf`); default: `jnp.asarray`.
  """
  r = reader(path)
  source = find(path)
  cfg = read_config(path, base, r)
  by_key, shapes = {}, {}
  for t in r.tensors:
    if t.name == ROPE_FREQS:
      continue
    key = hf_key(t.name)
    if key is None:
      raise ValueError(f"{source}: unknown tensor {t.name} {list(reversed(t.shape.tolist()))} "
                       f"for a {cfg.family} model")
    by_key[key] = t
    shapes[key] = tuple(int(n) for n in reversed(t.shape))
  keys.check_keys(cfg, shapes, source)
  permuted = ARCHS[metadata(r, "general.architecture")][1]

  def get(key: str) -> np.ndarray:
    x = _dequantize(by_key[key], source)
    if permuted and key.endswith(("q_proj.weight", "q_proj.bias")):
      x = unpermute(x, cfg.num_heads)
    elif permuted and key.endswith(("k_proj.weight", "k_proj.bias")):
      x = unpermute(x, cfg.num_kv_heads)
    return x

  np_dtype = np.dtype(jnp.dtype(dtype))
  place = place or (lambda _, x: jnp.asarray(x))
  flat = {p: place(p, host.astype(np_dtype)) for p, host in keys.to_params(cfg, get)}
  return cfg, tree.unflatten(flat)
