"""Virtual tokens: the decoder's hooks for PEFT methods that add inputs, not weights.

Prompt tuning, prefix tuning and LLaMA-Adapter (`jaxtune.peft.prompt`, `.prefix`,
`.llama_adapter`) change what attention sees rather than a kernel, so they cannot be kernel
leaves. They reach the decoder as extra entries of the params tree, read here:

    params["prefix_embeddings"]                  [N, D]     embedding prefix (prompt tuning):
                                                            N tokens run in front of each row
    params["layers"]["self_attn"]["prefix_key"]  [L, P, K*Dh]  KV prefix (prefix tuning): per
    params["layers"]["self_attn"]["prefix_value"][L, P, K*Dh]  layer keys / values every query
                                                               sees (no rotary, as PEFT's cache)
    params["layers"]["self_attn"]["adaption_prompt"] [L, A, D]  LLaMA-Adapter: per layer,
    params["layers"]["self_attn"]["adaption_gate"]   [L]        a gated attention over A
                                                                prompts (`add_adaption`)

With the first two the real tokens follow the virtual ones: positions are offset by N (P), as
in PEFT, where they come after the virtual tokens in the sequence or the cache. Packed rows
(segment ids given) stay exact: every segment sees the virtual tokens as its own prefix (the
embedding prefix's tokens attend only among themselves, so their states are the same for
every segment; the KV prefix is a constant). Those rows use XLA attention with a mask built
here; rows without segment ids keep `attention.attention` and its flash kernels for prompt
tuning. The decoder drops the virtual tokens' outputs: logits stay [B, T, V]. The sampler's
KV cache takes the embedding prefix at prefill (`decoder.cached_hidden_states`); a KV
prefix it refuses (`refuse_kv_prefix_in_cache`); the adaption prompt needs no cache (each
query attends to the prompt alone), so it decodes as it trains.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxtune.models import attention as attention_lib

PREFIX_EMBEDDINGS = "prefix_embeddings"
PREFIX_KEY = "prefix_key"
PREFIX_VALUE = "prefix_value"
ADAPTION_PROMPT = "adaption_prompt"
ADAPTION_GATE = "adaption_gate"


def kv_prefix_len(params: dict) -> int:
  """P of the KV prefix in `params` (0 without one; params["layers"] may be a per-layer
  tuple, as the sampler splits it)."""
  layers_ = params.get("layers", {})
  first = layers_[0] if isinstance(layers_, (tuple, list)) and layers_ else layers_
  pk = first.get("self_attn", {}).get(PREFIX_KEY) if isinstance(first, dict) else None
  return 0 if pk is None else int(pk.shape[-2])


def prepend(params: dict, x: jax.Array, positions: jax.Array, segment_ids):
  """(x [B, N+T, D], positions [B, N+T], segment_ids, N) with the embedding prefix in front
  (virtual positions 0..N-1, segment id -1), or (x, positions + P, segment_ids, 0) with a
  KV prefix of P tokens; the inputs unchanged (N = 0) without either."""
  p = params.get(PREFIX_EMBEDDINGS)
  n_kv = kv_prefix_len(params)
  if p is not None and n_kv:
    raise ValueError("params hold both an embedding prefix and a KV prefix (one PEFT method "
                     "at a time)")
  if n_kv:
    return x, positions + n_kv, segment_ids, 0
  if p is None:
    return x, positions, segment_ids, 0
  (b, _, d), n = x.shape, p.shape[0]
  if p.shape != (n, d):
    raise ValueError(f"params[{PREFIX_EMBEDDINGS!r}] has shape {p.shape}; expected [N, {d}]")
  x = jnp.concatenate([jnp.broadcast_to(p.astype(x.dtype), (b, n, d)), x], axis=1)
  positions = jnp.concatenate([jnp.broadcast_to(jnp.arange(n, dtype=positions.dtype), (b, n)),
                               positions + n], axis=1)
  if segment_ids is not None:
    segment_ids = jnp.concatenate([jnp.full((b, n), -1, segment_ids.dtype), segment_ids], axis=1)
  return x, positions, segment_ids, n


def layer_prefix(attn_params: dict):
  """(key, value) [P, K*Dh] of one layer's KV prefix, or None."""
  pk = attn_params.get(PREFIX_KEY)
  return None if pk is None else (pk, attn_params[PREFIX_VALUE])


def attention(q, k, v, *, segment_ids, positions, impl: str, sliding_window: int,
              n_virtual: int = 0, prefix=None, mesh=None, scale: float | None = None,
              softcap: float = 0.0):
  """`attention.attention` with the virtual tokens. q [B, T, H, Dh], k/v [B, T, K, Dh],
  positions [B, T] (already offset) -> [B, T, H, Dh].

  n_virtual: the first n_virtual of the T tokens are an embedding prefix; in packed rows
  every segment sees them. prefix: (key, value) [P, K*Dh] at positions 0..P-1, seen by every
  query (the window, if any, applies over positions). mesh: for the custom kernels
  (`attention.attention`); the virtual-token masks below are XLA's. scale / softcap: the
  softmax scale and score soft-cap (Gemma).
  """
  if prefix is None and (not n_virtual or segment_ids is None):
    return attention_lib.attention(q, k, v, segment_ids=segment_ids, impl=impl,
                            sliding_window=sliding_window, mesh=mesh, scale=scale,
                            softcap=softcap)
  b, t, kh, dh = k.shape
  idx = jnp.arange(t)
  mask = jnp.broadcast_to((idx[None, :] <= idx[:, None])[None], (b, t, t))  # [B, T, T]
  if segment_ids is not None:
    same = segment_ids[:, :, None] == segment_ids[:, None, :]
    mask &= same | (idx < n_virtual)[None, None, :]
  k_pos = positions
  if prefix is not None:
    pk, pv = (jnp.broadcast_to(x.reshape(1, -1, kh, dh).astype(k.dtype), (b, x.shape[0], kh, dh))
              for x in prefix)  # [B, P, K, Dh]
    n = pk.shape[1]
    k, v = jnp.concatenate([pk, k], axis=1), jnp.concatenate([pv, v], axis=1)
    mask = jnp.concatenate([jnp.ones((b, t, n), bool), mask], axis=-1)  # [B, T, P + T]
    k_pos = jnp.concatenate([jnp.broadcast_to(jnp.arange(n, dtype=positions.dtype), (b, n)),
                             positions], axis=1)
  if sliding_window:
    mask &= (positions[:, :, None] - k_pos[:, None, :]) < sliding_window
  return attention_lib.masked_attention(q, k, v, mask[:, None], scale=scale, softcap=softcap)


def add_adaption(o: jax.Array, q: jax.Array, attn_params: dict, project) -> jax.Array:
  """LLaMA-Adapter's gated attention over a layer's adaption prompt, added to the attention
  output o [B, T, H, Dh] (before o_proj, which is linear; PEFT adds o_proj of it after).

  attn_params["adaption_prompt"] [A, D] goes through the layer's own k_proj / v_proj
  (`project(x, "k_proj")`), no rotary; every query q [B, T, H, Dh] (rotary applied) attends
  to all A of them with its own float32 softmax, scaled by the tanh-free gate
  attn_params["adaption_gate"] [] (zero at init): o + gate * softmax(q k^T / sqrt(Dh)) v.
  Query head h reads kv head h // (H / K), as PEFT's repeat_interleave. Without the entry,
  o unchanged.
  """
  prompt = attn_params.get(ADAPTION_PROMPT)
  if prompt is None:
    return o
  b, t, h, dh = q.shape
  ak = project(prompt.astype(q.dtype), "k_proj")  # [A, K*Dh]
  av = project(prompt.astype(q.dtype), "v_proj")
  kh = ak.shape[-1] // dh
  ak, av = ak.reshape(-1, kh, dh), av.reshape(-1, kh, dh)  # [A, K, Dh]
  qg = q.reshape(b, t, kh, h // kh, dh)  # [B, T, K, G, Dh]
  s = jnp.einsum("btkgd,akd->btkga", qg, ak.astype(q.dtype),
                 preferred_element_type=jnp.float32) / dh ** 0.5
  p = attn_params[ADAPTION_GATE].astype(q.dtype) * jax.nn.softmax(s, axis=-1).astype(q.dtype)
  out = jnp.einsum("btkga,akd->btkgd", p, av.astype(q.dtype))  # [B, T, K, G, Dh]
  return o + out.reshape(b, t, h, dh).astype(o.dtype)


def refuse_kv_prefix_in_cache(params: dict) -> None:
  """The KV-cache (sampling) path has no KV prefix yet (prompt tuning it has): say so."""
  if kv_prefix_len(params):
    raise NotImplementedError("sampling with prefix tuning adapters is not supported yet (the "
                              "KV cache holds no prefix); merge-free prompt tuning is")
