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

Sampling runs the same blocks over a KV cache (`models/cache.py`): `cached_hidden_states`
once over the prompts (prefill), then once per new token (`jaxtune.sampling`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxtune import config as config_lib
from jaxtune import tree
from jaxtune.models import cache as cache_lib
from jaxtune.models import fused
from jaxtune.models import head
from jaxtune.models import layer_pattern
from jaxtune.models import layers
from jaxtune.models import moe
from jaxtune.models import virtual_tokens

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def _shapes(cfg: config_lib.ModelConfig) -> dict:
  """(shape, logical axes, init) for every param path; the single source of the layout."""
  L, D, F, V = cfg.num_layers, cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
  Q, KV, Dh = cfg.q_size, cfg.kv_size, cfg.head_dim
  one = "zeros" if cfg.norm_one_plus else "ones"  # (1 + w) norms store w
  s = {
      "embed_tokens/embedding": ((V, D), ("vocab", "embed"), "embed"),
      "layers/input_layernorm/scale": ((L, D), ("layers", "norm"), one),
      "layers/self_attn/q_proj/kernel": ((L, D, Q), ("layers", "embed", "q_heads"), D),
      "layers/self_attn/k_proj/kernel": ((L, D, KV), ("layers", "embed", "kv_heads"), D),
      "layers/self_attn/v_proj/kernel": ((L, D, KV), ("layers", "embed", "kv_heads"), D),
      "layers/self_attn/o_proj/kernel": ((L, Q, D), ("layers", "q_heads", "embed"), Q),
      "layers/post_attention_layernorm/scale": ((L, D), ("layers", "norm"), one),
      "layers/mlp/gate_proj/kernel": ((L, D, F), ("layers", "embed", "mlp"), D),
      "layers/mlp/up_proj/kernel": ((L, D, F), ("layers", "embed", "mlp"), D),
      "layers/mlp/down_proj/kernel": ((L, F, D), ("layers", "mlp", "embed"), F),
      "norm/scale": ((D,), ("norm",), one),
  }
  if cfg.sandwich_norms:  # Gemma 2/3: post_attention_layernorm then normalises attn output
    s["layers/pre_feedforward_layernorm/scale"] = ((L, D), ("layers", "norm"), one)
    s["layers/post_feedforward_layernorm/scale"] = ((L, D), ("layers", "norm"), one)
  if cfg.attention_bias:
    s["layers/self_attn/q_proj/bias"] = ((L, Q), ("layers", "q_heads"), "zeros")
    s["layers/self_attn/k_proj/bias"] = ((L, KV), ("layers", "kv_heads"), "zeros")
    s["layers/self_attn/v_proj/bias"] = ((L, KV), ("layers", "kv_heads"), "zeros")
  if cfg.qk_norm:
    s["layers/self_attn/q_norm/scale"] = ((L, Dh), ("layers", "head_dim"), one)
    s["layers/self_attn/k_norm/scale"] = ((L, Dh), ("layers", "head_dim"), one)
  if not cfg.tie_word_embeddings:
    s["lm_head/kernel"] = ((D, V), ("embed", "vocab"), D)
  if moe.is_moe(cfg):  # Mixtral / Qwen3-MoE: router + experts (+ dense MLPs of mixed models)
    s = {p: v for p, v in s.items() if not p.startswith("layers/mlp/")}
    s.update(moe.shapes(cfg))
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
  if policy in ("none", "auto"):  # auto: the trainer's planner resolves it (train/memory.py);
    return fn                     # a forward pass (eval, sampling) keeps its activations anyway
  policies = {
      "full": None,
      "dots": jax.checkpoint_policies.checkpoint_dots,
      "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
      "offload": jax.checkpoint_policies.offload_dot_with_no_batch_dims("device", "pinned_host"),
  }
  return jax.checkpoint(fn, policy=policies[policy], prevent_cse=not scanned)


# The virtual-token hooks (prompt / prefix tuning) live in `virtual_tokens`.
PREFIX_EMBEDDINGS = virtual_tokens.PREFIX_EMBEDDINGS
_prepend_virtual = virtual_tokens.prepend


def _attention(cfg, q, k, v, *, segment_ids, positions, n_virtual, prefix=None, window=0,
               mesh=None):
  """`attention.attention` with virtual tokens (`virtual_tokens.attention`): an embedding
  prefix of n_virtual tokens, or a layer's KV prefix (key, value) [P, K*Dh]."""
  return virtual_tokens.attention(q, k, v, segment_ids=segment_ids, positions=positions,
                                  impl=cfg.attention, sliding_window=window,
                                  n_virtual=n_virtual, prefix=prefix,
                                  scale=layer_pattern.attention_scale(cfg),
                                  softcap=cfg.attn_logit_softcap, mesh=mesh)


def _block(cfg, x, layer, *, positions, segment_ids, inv_freq, constrain, kv=None,
           n_virtual=0, kind=None, rope_factor=1.0):
  """One decoder layer. x [B, T, D] -> (x [B, T, D], kv).

  Without a cache (kv=None) the second output is the layer's MoE router stats instead
  (`moe.mlp`; None for a dense MLP), which `hidden_states` turns into the aux loss.

  kv: None (training, scoring), or this layer's `cache.Layer` (sampling): attention then
  stores this call's keys and values in the cache and reads the cached ones; the updated
  view is returned. n_virtual: leading virtual tokens (prompt tuning, `virtual_tokens`).
  kind: the layer's static `layer_pattern.Kind` (its window); None = cfg.sliding_window.
  inv_freq / rope_factor: this layer's rotary frequencies and cos/sin factor.
  """

  def lin(inp, p):
    return layers.linear(inp, p["kernel"], bias=p.get("bias"))

  dt = x.dtype
  window = cfg.sliding_window if kind is None else kind.window
  attn_p = layer["self_attn"]
  b, t, _ = x.shape
  h = layers.norm(cfg, x, layer["input_layernorm"]["scale"])
  q, k, v = fused.products(lin, h, attn_p, fused.QKV, (cfg.q_size, cfg.kv_size, cfg.kv_size))
  q = q.reshape(b, t, cfg.num_heads, cfg.head_dim)
  k = k.reshape(b, t, cfg.num_kv_heads, cfg.head_dim)
  v = v.reshape(b, t, cfg.num_kv_heads, cfg.head_dim)
  if cfg.qk_norm:
    q = layers.norm(cfg, q, attn_p["q_norm"]["scale"])
    k = layers.norm(cfg, k, attn_p["k_norm"]["scale"])
  q = layers.apply_rope(q, positions, inv_freq, rope_factor)
  k = layers.apply_rope(k, positions, inv_freq, rope_factor)
  q = constrain(q, ("batch", "seq", "act_heads", None))
  mesh = getattr(constrain, "mesh", None)  # custom kernels run per device (shard_map)

  def self_attention():  # within this call's tokens (training, scoring, a prefill)
    return _attention(cfg, q, k, v, segment_ids=segment_ids, positions=positions,
                      n_virtual=n_virtual, prefix=virtual_tokens.layer_prefix(attn_p),
                      window=window, mesh=mesh)

  if kv is None:
    o = self_attention()
  else:
    o, kv = kv.attend(q, k, v, positions=positions, impl=cfg.attention,
                      sliding_window=window, prefill_attention=self_attention,
                      scale=layer_pattern.attention_scale(cfg), softcap=cfg.attn_logit_softcap,
                      mesh=mesh)
  o = virtual_tokens.add_adaption(o, q, attn_p, lambda inp, name: lin(inp, attn_p[name]))
  o = lin(o.reshape(b, t, cfg.q_size).astype(dt), attn_p["o_proj"])
  if cfg.sandwich_norms:  # Gemma: normalise the attention output before the residual
    o = layers.norm(cfg, o, layer["post_attention_layernorm"]["scale"])
  x = x + o
  x = constrain(x, ("batch", "seq", "act_embed"))

  mlp_p = layer["mlp"]
  pre = "pre_feedforward_layernorm" if cfg.sandwich_norms else "post_attention_layernorm"
  h = layers.norm(cfg, x, layer[pre]["scale"])
  if "experts" in mlp_p:  # Mixtral / Qwen3-MoE (models/moe.py)
    m, stats = moe.mlp(cfg, h, mlp_p, mask=None if segment_ids is None else segment_ids > 0)
    kv = stats if kv is None else kv
  else:
    gate, up = fused.products(lin, h, mlp_p, fused.GATE_UP)
    g = layers.gated(cfg, gate, up)
    g = constrain(g, ("batch", "seq", "act_mlp"))
    m = lin(g, mlp_p["down_proj"])
  if cfg.sandwich_norms:
    m = layers.norm(cfg, m, layer["post_feedforward_layernorm"]["scale"])
  x = x + m
  return constrain(x, ("batch", "seq", "act_embed")), kv


def hidden_states(cfg: config_lib.ModelConfig, params: dict, tokens: jax.Array, *,
                  positions: jax.Array | None = None, segment_ids: jax.Array | None = None,
                  constrain=None, return_aux: bool = False):
  """Final-normed hidden states [B, T, D] (compute dtype) for tokens [B, T] int32.

  return_aux: return (h, {"moe_aux_loss": []}), the MoE load-balancing loss over the
  non-padding tokens (`moe.aux_loss`; 0 for a dense model).

  positions [B, T] default to 0..T-1; segment_ids [B, T] (0 = padding) make attention
  block-diagonal for packed rows. `constrain(x, logical_axes)` adds sharding constraints.
  `params` may hold adapter-wrapped kernel leaves (`adapters.apply(params, rng)`), which
  scan over layers like any other leaf and carry their own dropout keys, and virtual tokens
  (prompt / prefix tuning, `virtual_tokens`): an embedding prefix [N, D] runs in front of
  every row (and packed segment) and its states are dropped, so the result is still
  [B, T, D]; a per-layer KV prefix is seen by every query.
  """
  constrain = constrain or (lambda x, _: x)
  b, t = tokens.shape
  if positions is None:
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
  x = _embed(cfg, params, tokens)
  x, positions, segment_ids, n_virtual = _prepend_virtual(params, x, positions, segment_ids)
  x = constrain(x, ("batch", "seq", "act_embed"))
  if not layer_pattern.uniform(cfg):
    x = _patterned_layers(cfg, params, x, positions=positions, segment_ids=segment_ids,
                          constrain=constrain, n_virtual=n_virtual)
    h = head.final_norm(cfg, params, x[:, n_virtual:])
    return (h, {"moe_aux_loss": moe.aux_loss(cfg, None)}) if return_aux else h
  inv_freq, factor = layer_pattern.rope(cfg, positions, segment_ids)[False]
  kind = layer_pattern.kinds(cfg)[0]

  def body(carry, layer):
    y, stats = _block(cfg, carry, layer, positions=positions, segment_ids=segment_ids,
                  inv_freq=inv_freq, constrain=constrain, n_virtual=n_virtual,
                  kind=kind, rope_factor=factor)
    return y, stats  # stats: the MoE router stats, or None

  scan = cfg.scan_layers and not moe.is_mixed(cfg)  # mixed MoE / dense layers: unrolled
  body = _remat(body, cfg.remat, scanned=scan)
  if scan:
    x, stats = jax.lax.scan(body, x, params["layers"])
  else:
    per_layer = []
    for i in range(cfg.num_layers):
      x, st = body(x, moe.layer_slice(cfg, params["layers"], i))
      per_layer += [st] if st is not None else []
    stats = jax.tree_util.tree_map(lambda *a: jnp.stack(a), *per_layer) if per_layer else None
  h = head.final_norm(cfg, params, x[:, n_virtual:])  # the real tokens' states only
  return (h, {"moe_aux_loss": moe.aux_loss(cfg, stats)}) if return_aux else h


def _embed(cfg: config_lib.ModelConfig, params: dict, tokens: jax.Array) -> jax.Array:
  """Token embeddings [B, T, D] in the compute dtype; * sqrt(D) (rounded to that dtype, as
  transformers does) when cfg.embed_scale (Gemma)."""
  dt = DTYPES[cfg.dtype]
  x = jnp.take(params["embed_tokens"]["embedding"], tokens, axis=0).astype(dt)
  if cfg.embed_scale:
    x = x * jnp.asarray(cfg.hidden_size ** 0.5, dt)
  return x


def _patterned_layers(cfg, params, x, *, positions, segment_ids, constrain, n_virtual):
  """The layers of a model whose layers differ in kind (`layer_pattern`), each with its
  own window and rope table: scanned in groups of one period, or unrolled."""
  if moe.is_moe(cfg):  # the router stats (aux loss) are not threaded through this path
    raise ValueError("model.layer_types with mixture-of-experts layers is not supported")
  ks = layer_pattern.kinds(cfg)
  ropes = layer_pattern.rope(cfg, positions, segment_ids)

  def layer_fn(kind, scanned):
    inv_freq, factor = ropes[kind.local]

    def fn(carry, layer):
      return _block(cfg, carry, layer, positions=positions, segment_ids=segment_ids,
                    inv_freq=inv_freq, constrain=constrain, n_virtual=n_virtual, kind=kind,
                    rope_factor=factor)[0]
    return _remat(fn, cfg.remat, scanned=scanned)

  if cfg.scan_layers:
    return layer_pattern.scan(
        lambda c, layer, kind, i: layer_fn(kind, isinstance(i, jax.Array))(c, layer),
        x, params["layers"], ks)
  for i, kind in enumerate(ks):
    x = layer_fn(kind, False)(x, jax.tree_util.tree_map(lambda a, i=i: a[i], params["layers"]))
  return x


def split_layers(cfg: config_lib.ModelConfig, stacked: dict) -> tuple:
  """The stacked layer params [L, ...] as a tuple of L per-layer trees (any leaf type).

  The sampler slices them once, outside its decode loop, so that unrolled layers
  (`scan_layers=False`) do not re-slice every weight at every token."""
  return tuple(moe.layer_slice(cfg, stacked, i) for i in range(cfg.num_layers))


def cached_hidden_states(cfg: config_lib.ModelConfig, params: dict, tokens: jax.Array,
                         kv: cache_lib.KVCache, *, positions: jax.Array,
                         segment_ids: jax.Array | None = None, column=0, prefill: bool,
                         constrain=None) -> tuple[jax.Array, cache_lib.KVCache]:
  """`hidden_states` over a KV cache: final-normed h [B, T, D] and the updated cache.

  prefill=True: tokens [B, P] are the (left-padded, segment 0) prompts, written to the
  cache after the prompt-tuning prefix if params carry one (N virtual tokens first, so the
  cache holds N + P columns and h is [B, P, D]). prefill=False: tokens [B, 1], one new
  token per row at positions [B, 1], cache column `column` ([] int32; each group of the
  cache writes it at slot column mod its slots). `kv.pos` must already hold the positions
  of this call's tokens (`cache.set_prefill_positions`, `cache.write_positions`). With
  unrolled layers, params["layers"] may already be `split_layers`' tuple. No remat:
  nothing is differentiated.
  """
  if isinstance(params["layers"], dict):  # split_layers' tuple: checked at the prefill
    virtual_tokens.refuse_kv_prefix_in_cache(params)
  constrain = constrain or (lambda x, _: x)
  x = _embed(cfg, params, tokens)
  x = constrain(x, ("batch", "seq", "act_embed"))
  n_virtual = 0
  if prefill:  # prompt tuning: the virtual tokens go into the cache with the prompt
    x, positions, segment_ids, n_virtual = _prepend_virtual(params, x, positions, segment_ids)
  gapless = PREFIX_EMBEDDINGS not in params  # else padding sits between prefix and prompt
  ropes = layer_pattern.rope(cfg, positions, segment_ids)
  ks = layer_pattern.kinds(cfg)

  def run(carry, layer, i, kind=ks[0]):  # layer i over its view of the cache
    x, kv = carry
    inv_freq, factor = ropes[kind.local]
    view = cache_lib.layer(kv, cfg, i, kind.window, column=column, prefill=prefill,
                           gapless=gapless)
    x, new = _block(cfg, x, layer, positions=positions, segment_ids=segment_ids,
                    inv_freq=inv_freq, constrain=constrain, kv=view, n_virtual=n_virtual,
                    kind=kind, rope_factor=factor)
    return x, cache_lib.store(kv, cfg, i, kind.window, new)

  if cfg.scan_layers and not layer_pattern.uniform(cfg):
    x, kv = layer_pattern.scan(lambda c, layer, kind, i: run(c, layer, i, kind), (x, kv),
                               params["layers"], ks)
  elif cfg.scan_layers and not moe.is_mixed(cfg):
    idx = jnp.arange(cfg.num_layers, dtype=jnp.int32)
    (x, kv), _ = jax.lax.scan(lambda c, xs: (run(c, *xs), None), (x, kv),
                              (params["layers"], idx))
  else:
    kv = cache_lib.unstacked(kv)
    per_layer = params["layers"]
    if not isinstance(per_layer, tuple):
      per_layer = split_layers(cfg, per_layer)
    for i in range(cfg.num_layers):
      x, kv = run((x, kv), per_layer[i], i, ks[i])
  return head.final_norm(cfg, params, x[:, n_virtual:]), kv


def forward(cfg: config_lib.ModelConfig, params: dict, tokens: jax.Array, *,
            positions: jax.Array | None = None, segment_ids: jax.Array | None = None,
            lora=None, constrain=None) -> jax.Array:
  """tokens [B, T] int32 -> float32 logits [B, T, V].

  `lora` is None or any adapters object with `.apply(params) -> params` (e.g.
  `jaxtune.peft.lora.Adapters`; no dropout here: that needs `apply(params, rng)`). With
  prompt tuning the logits are the real tokens' only (PEFT's model returns N + T rows: the
  N virtual tokens' first).
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
