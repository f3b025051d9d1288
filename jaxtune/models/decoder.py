"""A Llama-family decoder as pure functions over a plain params tree.

One set of functions covers Llama 2/3/3.1/3.2, Mistral, Qwen2/2.5 (q/k/v biases) and Qwen3
(per-head q/k RMSNorm, free head_dim): the differences are config flags. Layers are stacked
on a leading axis and run with `lax.scan`, so compile time does not grow with depth.

The params tree (L layers, D hidden, H*Dh query width, K*Dh kv width, F mlp, V vocab):

    {"embed_tokens": {"embedding": [V, D]},
     "layers": {"input_layernorm": {"scale": [L, D]},
                "self_attn": {"q_proj": {"kernel": [L, D, H*Dh], "bias": [L, H*Dh]},  # bias: Qwen2
                              "k_proj": {"kernel": [L, D, K*Dh], "bias": [L, K*Dh]},
                              "v_proj": {"kernel": [L, D, K*Dh], "bias": [L, K*Dh]},
                              "o_proj": {"kernel": [L, H*Dh, D]},
                              "q_norm": {"scale": [L, Dh]}, "k_norm": {"scale": [L, Dh]}},  # Qwen3
                "post_attention_layernorm": {"scale": [L, D]},
                "mlp": {"gate_proj": {"kernel": [L, D, F]}, "up_proj": {"kernel": [L, D, F]},
                        "down_proj": {"kernel": [L, F, D]}}},
     "norm": {"scale": [D]},
     "lm_head": {"kernel": [D, V]}}                                   # absent when tied

Kernels are `x @ kernel` ([in, out]) through `layers.linear`, so a kernel leaf may also be a
4-bit `quant.QArray` or an adapter-wrapped leaf: PEFT methods (`jaxtune.peft`) turn the base
params into such a tree with `adapters.apply(params)`, and the decoder runs it unchanged.
`forward(..., lora=adapters)` is a shorthand for that; this module never imports peft.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxtune import config as config_lib
from jaxtune import tree
from jaxtune.models import head
from jaxtune.models import layers

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def _shapes(cfg: config_lib.ModelConfig) -> dict:
  """(shape, logical axes, init) for every param path; the single source of the layout."""
  L, D, F, V = cfg.num_layers, cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
  Q, KV, Dh = cfg.q_size, cfg.kv_size, cfg.head_dim
  s = {
      "embed_tokens/embedding": ((V, D), ("vocab", "embed"), "embed"),
      "layers/input_layernorm/scale": ((L, D), ("layers", "norm"), "ones"),
      "layers/self_attn/q_proj/kernel": ((L, D, Q), ("layers", "embed", "q_heads"), D),
      "layers/self_attn/k_proj/kernel": ((L, D, KV), ("layers", "embed", "kv_heads"), D),
      "layers/self_attn/v_proj/kernel": ((L, D, KV), ("layers", "embed", "kv_heads"), D),
      "layers/self_attn/o_proj/kernel": ((L, Q, D), ("layers", "q_heads", "embed"), Q),
      "layers/post_attention_layernorm/scale": ((L, D), ("layers", "norm"), "ones"),
      "layers/mlp/gate_proj/kernel": ((L, D, F), ("layers", "embed", "mlp"), D),
      "layers/mlp/up_proj/kernel": ((L, D, F), ("layers", "embed", "mlp"), D),
      "layers/mlp/down_proj/kernel": ((L, F, D), ("layers", "mlp", "embed"), F),
      "norm/scale": ((D,), ("norm",), "ones"),
  }
  if cfg.attention_bias:
    s["layers/self_attn/q_proj/bias"] = ((L, Q), ("layers", "q_heads"), "zeros")
    s["layers/self_attn/k_proj/bias"] = ((L, KV), ("layers", "kv_heads"), "zeros")
    s["layers/self_attn/v_proj/bias"] = ((L, KV), ("layers", "kv_heads"), "zeros")
  if cfg.qk_norm:
    s["layers/self_attn/q_norm/scale"] = ((L, Dh), ("layers", "head_dim"), "ones")
    s["layers/self_attn/k_norm/scale"] = ((L, Dh), ("layers", "head_dim"), "ones")
  if not cfg.tie_word_embeddings:
    s["lm_head/kernel"] = ((D, V), ("embed", "vocab"), D)
  return s


def init(cfg: config_lib.ModelConfig, key: jax.Array) -> dict:
  """Random params (normal(0, 1/sqrt(fan_in)) kernels, N(0, 0.02) embeddings, unit norms)."""
  dtype = DTYPES[cfg.param_dtype]
  shapes = _shapes(cfg)
  keys = jax.random.split(key, len(shapes))
  flat = {}
  for k, (path, (shape, _, how)) in zip(keys, sorted(shapes.items())):
    if how == "ones":
      flat[path] = jnp.ones(shape, dtype)
    elif how == "zeros":
      flat[path] = jnp.zeros(shape, dtype)
    elif how == "embed":
      flat[path] = (0.02 * jax.random.normal(k, shape, jnp.float32)).astype(dtype)
    else:
      flat[path] = (jax.random.normal(k, shape, jnp.float32) / (how ** 0.5)).astype(dtype)
  return tree.unflatten(flat)


def axes(cfg: config_lib.ModelConfig) -> dict:
  """The logical-axes tree, same structure as `init`'s params (leaves: tuples of names)."""
  return tree.unflatten({p: ax for p, (_, ax, _) in _shapes(cfg).items()})


def shapes(cfg: config_lib.ModelConfig) -> dict:
  """{path: shape} of every param; used by HF conversion to check tensors by name."""
  return {p: shape for p, (shape, _, _) in _shapes(cfg).items()}


def _remat(fn, policy: str, *, scanned: bool = True):
  """Wraps one layer in jax.checkpoint with a named policy ('none' leaves it alone).

  Inside `lax.scan` XLA cannot CSE the backward's recomputation with the forward, so
  prevent_cse is off there (it would only block fusion). Unrolled layers need it on: without
  it XLA merges the recomputation into the forward and keeps every activation alive, i.e.
  silently no remat (seen on an H200: 8B LoRA at seq 4096 took 101 GiB instead of 24).
  """
  if policy == "none":
    return fn
  policies = {
      "full": None,
      "dots": jax.checkpoint_policies.checkpoint_dots,
      "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
      "offload": jax.checkpoint_policies.offload_dot_with_no_batch_dims("device", "pinned_host"),
  }
  return jax.checkpoint(fn, policy=policies[policy], prevent_cse=not scanned)


def _block(cfg, x, layer, *, positions, segment_ids, inv_freq, constrain):
  """One decoder layer. x [B, T, D] -> [B, T, D]."""

  def lin(inp, p):
    return layers.linear(inp, p["kernel"], bias=p.get("bias"))

  dt = x.dtype
  attn_p = layer["self_attn"]
  b, t, _ = x.shape
  h = layers.rms_norm(x, layer["input_layernorm"]["scale"], cfg.rms_norm_eps)
  q = lin(h, attn_p["q_proj"]).reshape(b, t, cfg.num_heads, cfg.head_dim)
  k = lin(h, attn_p["k_proj"]).reshape(b, t, cfg.num_kv_heads, cfg.head_dim)
  v = lin(h, attn_p["v_proj"]).reshape(b, t, cfg.num_kv_heads, cfg.head_dim)
  if cfg.qk_norm:
    q = layers.rms_norm(q, attn_p["q_norm"]["scale"], cfg.rms_norm_eps)
    k = layers.rms_norm(k, attn_p["k_norm"]["scale"], cfg.rms_norm_eps)
  q = layers.apply_rope(q, positions, inv_freq)
  k = layers.apply_rope(k, positions, inv_freq)
  q = constrain(q, ("batch", "seq", "act_heads", None))
  o = layers.attention(q, k, v, segment_ids=segment_ids, impl=cfg.attention,
                       sliding_window=cfg.sliding_window)
  o = lin(o.reshape(b, t, cfg.q_size).astype(dt), attn_p["o_proj"])
  x = x + o
  x = constrain(x, ("batch", "seq", "act_embed"))

  mlp_p = layer["mlp"]
  h = layers.rms_norm(x, layer["post_attention_layernorm"]["scale"], cfg.rms_norm_eps)
  g = layers.swiglu(lin(h, mlp_p["gate_proj"]), lin(h, mlp_p["up_proj"]))
  g = constrain(g, ("batch", "seq", "act_mlp"))
  x = x + lin(g, mlp_p["down_proj"])
  return constrain(x, ("batch", "seq", "act_embed"))


def hidden_states(cfg: config_lib.ModelConfig, params: dict, tokens: jax.Array, *,
                  positions: jax.Array | None = None, segment_ids: jax.Array | None = None,
                  constrain=None) -> jax.Array:
  """Final-normed hidden states [B, T, D] (compute dtype) for tokens [B, T] int32.

  positions [B, T] default to 0..T-1; segment_ids [B, T] (0 = padding) make attention
  block-diagonal for packed rows. `constrain(x, logical_axes)` adds sharding constraints.
  `params` may hold adapter-wrapped kernel leaves (`adapters.apply(params, rng)`), which
  scan over layers like any other leaf and carry their own dropout keys.
  """
  constrain = constrain or (lambda x, _: x)
  dt = DTYPES[cfg.dtype]
  b, t = tokens.shape
  if positions is None:
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
  x = jnp.take(params["embed_tokens"]["embedding"], tokens, axis=0).astype(dt)
  x = constrain(x, ("batch", "seq", "act_embed"))
  inv_freq = layers.rope_inv_freq(cfg)

  def body(carry, layer):
    y = _block(cfg, carry, layer, positions=positions, segment_ids=segment_ids,
               inv_freq=inv_freq, constrain=constrain)
    return y, None

  body = _remat(body, cfg.remat, scanned=cfg.scan_layers)
  if cfg.scan_layers:
    x, _ = jax.lax.scan(body, x, params["layers"])
  else:
    for i in range(cfg.num_layers):
      layer = jax.tree_util.tree_map(lambda a, i=i: a[i], params["layers"])
      x, _ = body(x, layer)
  return head.final_norm(cfg, params, x)


def forward(cfg: config_lib.ModelConfig, params: dict, tokens: jax.Array, *,
            positions: jax.Array | None = None, segment_ids: jax.Array | None = None,
            lora=None, constrain=None) -> jax.Array:
  """tokens [B, T] int32 -> float32 logits [B, T, V].

  `lora` is None or any adapters object with `.apply(params) -> params` (e.g.
  `jaxtune.peft.lora.Adapters`; no dropout here: that needs `apply(params, rng)`).
  """
  if lora is not None:
    if not callable(getattr(lora, "apply", None)):
      raise TypeError(
          f"forward: lora must be None or adapters with .apply(params), got "
          f"{type(lora).__name__}; for a bare adapter tree pass "
          "dataclasses.replace(adapters, params=tree)")
    params = lora.apply(params)
  h = hidden_states(cfg, params, tokens, positions=positions, segment_ids=segment_ids,
                    constrain=constrain)
  return head.logits(cfg, params, h)
