"""The ONE output head: final norm, output projection, logit soft-cap, chunked scoring.

Everything that turns the decoder's last hidden states into logits, log-probs or a loss goes
through here (the forward, the SFT loss, the DPO/reward/distillation objectives), so a model
family's output options (a final logit soft-cap, tied or separate output weights) are
implemented once and every method and loss gets them:

    x [B, T, D] --final_norm--> h [B, T, D]          (decoder.hidden_states ends with it)
    h --logits--> float32 [B, T, V]                  cap * tanh(h @ W / cap) when capped
    h --token_logprobs(targets)--> float32 [B, T]    chunked when cfg.logits_chunk > 0
    h --nll_sum(targets, mask)--> float32 []         fused chunked cross-entropy (custom VJP)

With `model.logits_chunk > 0` no [B*T, V] float32 logits are materialised: tokens are
scored `logits_chunk` at a time (`losses.chunked`: the log-probs recompute each chunk in
the backward pass; the SFT loss fuses the gradient into the forward scan). Given the mesh,
each device scores only its own rows (`row_axes`), instead of the compiler gathering all
rows onto every device around the chunk loop.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxtune import config as config_lib
from jaxtune import losses
from jaxtune import sharding
from jaxtune.models import layers


def final_norm(cfg: config_lib.ModelConfig, params: dict, x: jax.Array) -> jax.Array:
  """The last RMSNorm before the output projection. x [B, T, D] -> [B, T, D]."""
  return layers.norm(cfg, x, params["norm"]["scale"])


def kernel(cfg: config_lib.ModelConfig, params: dict):
  """(weight, transposed): the [V, D] tied embedding (transposed=True) or the [D, V] lm_head."""
  if cfg.tie_word_embeddings:
    return params["embed_tokens"]["embedding"], True
  return params["lm_head"]["kernel"], False


def softcap(cfg: config_lib.ModelConfig, logits: jax.Array) -> jax.Array:
  """cap * tanh(logits / cap) with cap = cfg.final_logit_softcap (0 = no cap)."""
  cap = cfg.final_logit_softcap
  if not cap:
    return logits
  return cap * jnp.tanh(logits / cap)


def logits(cfg: config_lib.ModelConfig, params: dict, h: jax.Array,
           product_dtype=jnp.float32) -> jax.Array:
  """Final-normed hidden states [B, T, D] -> float32 logits [B, T, V] (soft-capped).

  product_dtype: the dtype the projection writes before the cast to float32. float32 (the
  default: every loss and score) accumulates and keeps the products in float32; the sampler
  passes the activation dtype, so a bf16 model rounds its logits to bf16 as `transformers`
  does (its lm_head runs in bf16), and the decode step's largest GEMM writes half the bytes.
  """
  w, transposed = kernel(cfg, params)
  if transposed or isinstance(w, jax.Array):  # tied embedding [V, D] or dense lm_head [D, V]
    spec = "btd,vd->btv" if transposed else "btd,dv->btv"
    out = jnp.einsum(spec, h, w.astype(h.dtype), preferred_element_type=product_dtype)
  else:  # an lm_head leaf with its own matmul (4-bit, adapter): written in h's dtype
    out = layers.linear(h, w)
  return softcap(cfg, out.astype(jnp.float32))


def logits_dtype(cfg: config_lib.ModelConfig, h: jax.Array):
  """The dtype the projection writes the scored logits in: float32, or with
  `model.logits_dtype=compute` the activation dtype of h (a bf16 model's logits rounded to
  bf16, as transformers' bf16 lm_head; the loss math stays float32)."""
  return h.dtype if cfg.logits_dtype == "compute" else jnp.float32


def row_axes(mesh, h: jax.Array):
  """The mesh axes the rows of h [N, T, D] split over, for the chunked head to run per
  device (`losses.chunked`); None runs it as one program: no mesh, rows whole, or a
  vocabulary split over a 'tensor' axis (left to the compiler)."""
  if mesh is None or mesh.size == 1 or mesh.shape.get("tensor", 1) > 1:
    return None
  return sharding.spec(("batch", "seq", "act_embed"), h.shape, mesh)[0]


def token_logprobs(cfg: config_lib.ModelConfig, params: dict, h: jax.Array,
                   targets: jax.Array, *, constrain=None) -> jax.Array:
  """log p(targets) [N, T] float32 from final-normed hidden states h [N, T, D].

  With cfg.logits_chunk > 0 the [N, T, V] logits are never materialised: tokens are scored
  `logits_chunk` at a time (`losses.chunked_token_logprobs`; the backward recomputes each
  chunk), each device its own rows on the mesh of `constrain` (`sharding.constrainer`, as
  the decoder receives it).
  """
  if cfg.logits_chunk <= 0:
    return losses.token_logprobs(logits(cfg, params, h, logits_dtype(cfg, h)), targets)
  mesh = getattr(constrain, "mesh", None)
  w, transposed = kernel(cfg, params)
  return losses.chunked_token_logprobs(
      h, w.astype(h.dtype), targets, chunk_size=cfg.logits_chunk, transpose=transposed,
      softcap=cfg.final_logit_softcap, mesh=mesh, row_axes=row_axes(mesh, h),
      logits_dtype=logits_dtype(cfg, h))


def nll_sum(cfg: config_lib.ModelConfig, params: dict, h: jax.Array, targets: jax.Array,
            mask: jax.Array, *, constrain=None) -> tuple[jax.Array, jax.Array | None]:
  """(sum of masked token NLLs [], per-token NLL [B, T] or None when chunked).

  The per-token NLLs (for per-source metrics) exist only on the unchunked path; the chunked
  one is `losses.chunked_cross_entropy` (gradients fused into the forward, dW skipped when
  the output weights are frozen; on the mesh of `constrain` each device scores its own
  rows).
  """
  mask = mask.astype(jnp.float32)
  if cfg.logits_chunk > 0:
    mesh = getattr(constrain, "mesh", None)
    w, transposed = kernel(cfg, params)
    mean, _ = losses.chunked_cross_entropy(h, w.astype(h.dtype), targets, mask,
                                           chunk_size=cfg.logits_chunk, transpose=transposed,
                                           softcap=cfg.final_logit_softcap, mesh=mesh,
                                           row_axes=row_axes(mesh, h),
                                           logits_dtype=logits_dtype(cfg, h))
    return mean * jnp.maximum(jnp.sum(mask), 1.0), None
  nll = -token_logprobs(cfg, params, h, targets) * mask  # [B, T]
  return jnp.sum(nll), nll
