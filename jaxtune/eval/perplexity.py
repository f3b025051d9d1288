"""Token log-likelihoods of sequences under a model: perplexity, label scores, KL to a base.

Everything that scores given tokens goes through here (the evaluator's perplexity and its
label scoring, the lm-eval model's loglikelihood, and the training loop's retention set),
through the decoder and THE output head (`models/head.py`), so soft-caps and tied weights
are handled once. Two layers:

  pure and jittable (for a training loop to jit with its own shardings):
    row_stats(cfg, params, batch, adapters=None, constrain=None)
        -> {"nll": [B], "tokens": [B], "greedy": [B] bool}   sums over each row's loss mask
    kl_sums(cfg, params, base_params, batch, adapters=None, base_adapters=None)
        -> (sum over masked tokens of KL(p_model || p_base) [], masked tokens [])
  host drivers (the evaluator; a training loop's retention set):
    score(cfg, params, seqs, adapters=None, mesh=None, batch_size=8) -> Scores
        seqs: `data.encode.Encoded` (ids [n], train [n]); one row per sequence, rows padded
        to a power-of-two length (few compiles), batches sharded over (data, fsdp) like
        training, params as `weights.load` placed them.
    kl_to_base(cfg, params, base_params, seqs, adapters=None, base_adapters=None, ...)
        -> (KL sum, token count) over the same batches (KL per token = sum / count).

`batch` is the data pipeline's SFT layout (`data.packing.assemble`): tokens, targets,
loss_mask, segment_ids, positions, all [B, T]; token i of a sequence is scored as the
target of position i-1 where its train flag is set. Perplexity = exp(sum nll / sum tokens).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxtune import config as config_lib
from jaxtune import sharding
from jaxtune.data import encode
from jaxtune.data import packing
from jaxtune.models import decoder
from jaxtune.models import head

MIN_LEN = 16  # shortest padded row length


@dataclasses.dataclass
class Scores:
  """Per sequence: nll [n] float64 (summed over its scored tokens), tokens [n] int64 (how
  many were scored), greedy [n] bool (every scored token is the model's argmax)."""
  nll: np.ndarray
  tokens: np.ndarray
  greedy: np.ndarray


def perplexity(nll, tokens) -> float:
  """exp(token-weighted mean NLL): exp(sum(nll) / sum(tokens))."""
  n = float(np.sum(tokens))
  if n <= 0:
    raise ValueError("perplexity over zero scored tokens")
  return math.exp(float(np.sum(nll)) / n)


def _chunks(cfg, t: int) -> int:
  """Positions scored at once: model.logits_chunk (if set and shorter than T), else T."""
  return cfg.logits_chunk if 0 < cfg.logits_chunk < t else t


def _over_chunks(cfg, t: int, fn, *arrays):
  """fn(*[B, C, ...] chunks) -> [B, C] outputs, mapped over the T axis in chunks of C."""
  c = _chunks(cfg, t)
  pad = (-t) % c

  def split(x):  # [B, T, ...] -> [K, B, C, ...]
    x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
    return jnp.swapaxes(x.reshape(x.shape[0], -1, c, *x.shape[2:]), 0, 1)

  outs = jax.lax.map(lambda xs: fn(*xs), tuple(split(a) for a in arrays))

  def join(y):  # [K, B, C] -> [B, T]
    return jnp.swapaxes(y, 0, 1).reshape(y.shape[1], -1)[:, :t]

  return jax.tree_util.tree_map(join, outs)


def _hidden(cfg, params, batch, adapters, constrain):
  if adapters is not None:
    params = adapters.apply(params)  # no rng: no dropout
  h = decoder.hidden_states(cfg, params, batch["tokens"], positions=batch.get("positions"),
                            segment_ids=batch.get("segment_ids"), constrain=constrain)
  return params, h  # h [B, T, D]


def row_stats(cfg, params, batch: dict, adapters=None, constrain=None) -> dict:
  """Per-row sums over the loss mask: nll [B], tokens [B], greedy [B] (see module doc)."""
  params, h = _hidden(cfg, params, batch, adapters, constrain)

  def one(hh, yy):  # [B, C, D], [B, C]
    z = head.logits(cfg, params, hh)  # [B, C, V] float32
    picked = jnp.take_along_axis(z, yy[..., None], axis=-1)[..., 0]  # [B, C]
    return picked - jax.nn.logsumexp(z, axis=-1), picked >= jnp.max(z, axis=-1)

  lp, top = _over_chunks(cfg, h.shape[1], one, h, batch["targets"])  # [B, T] each
  mask = batch["loss_mask"].astype(jnp.float32)
  return {"nll": -jnp.sum(lp * mask, axis=1), "tokens": jnp.sum(mask, axis=1),
          "greedy": jnp.all(top | (mask == 0), axis=1)}


def kl_sums(cfg, params, base_params, batch: dict, adapters=None, base_adapters=None,
            constrain=None) -> tuple[jax.Array, jax.Array]:
  """(sum over loss-masked positions of KL(p_model || p_base) over the vocab, their count).

  For LoRA the base is the same params with the adapters off (base_adapters=None): no copy.
  """
  params, h = _hidden(cfg, params, batch, adapters, constrain)
  base_params, hb = _hidden(cfg, base_params, batch, base_adapters, constrain)

  def one(hh, hbb):  # [B, C, D] each
    lp = jax.nn.log_softmax(head.logits(cfg, params, hh), axis=-1)  # [B, C, V]
    lq = jax.nn.log_softmax(head.logits(cfg, base_params, hbb), axis=-1)
    return jnp.sum(jnp.exp(lp) * (lp - lq), axis=-1)  # [B, C]

  kl = _over_chunks(cfg, h.shape[1], one, h, hb)  # [B, T]
  mask = batch["loss_mask"].astype(jnp.float32)
  return jnp.sum(kl * mask), jnp.sum(mask)


@functools.lru_cache(maxsize=16)
def _compiled_kl(cfg, mesh):
  fn = functools.partial(kl_sums, cfg, constrain=sharding.constrainer(mesh))
  return jax.jit(lambda p, bp, b, a, ba: fn(p, bp, b, adapters=a, base_adapters=ba),
                 out_shardings=sharding.replicated(mesh))


@functools.lru_cache(maxsize=16)
def _compiled(cfg, mesh):
  """row_stats jitted for (cfg, mesh): activations constrained like training, outputs
  replicated (small, and readable on every process)."""
  fn = functools.partial(row_stats, cfg, constrain=sharding.constrainer(mesh))
  return jax.jit(lambda p, b, a: fn(p, b, adapters=a), out_shardings=sharding.replicated(mesh))


def bucket(n: int) -> int:
  """Padded row length for n tokens: the next power of two, at least MIN_LEN."""
  return max(MIN_LEN, 1 << max(0, n - 1).bit_length())


def _place(batch: dict, mesh) -> dict:
  """Host [B, T] arrays (identical on every process) -> global arrays over (data, fsdp)."""
  sh = sharding.batch_sharding(mesh)
  return {k: jax.make_array_from_callback(v.shape, sh, lambda i, v=v: v[i])
          for k, v in batch.items()}


def _batches(seqs: Sequence[encode.Encoded], mesh, batch_size: int, pad_id: int):
  """(indices of the sequences, global batch) in batches of similar lengths."""
  rows_per_device = int(np.prod([dict(mesh.shape).get(a, 1)  # the batch's mesh axes
                                 for a in sharding.RULES["batch"]]))
  size = -(-max(1, batch_size) // rows_per_device) * rows_per_device
  order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))  # similar lengths together
  for start in range(0, len(seqs), size):
    chosen = order[start:start + size]
    t = bucket(max(len(seqs[i]) for i in chosen))
    rows = [[(seqs[i], 0)] for i in chosen] + [[]] * (size - len(chosen))
    batch = packing.assemble(rows, t, pad_id)
    batch = {k: batch[k] for k in ("tokens", "targets", "loss_mask", "segment_ids",
                                   "positions")}
    yield chosen, _place(batch, mesh)


def _mesh(mesh):
  return mesh or sharding.make_mesh(config_lib.MeshConfig(), jax.devices()[:1])


def score(cfg, params, seqs: Sequence[encode.Encoded], *, adapters=None, mesh=None,
          batch_size: int = 8, pad_id: int = 0) -> Scores:
  """Scores every sequence (its train-flagged tokens); see the module docstring."""
  mesh = _mesh(mesh)
  fn = _compiled(cfg, mesh)
  n = len(seqs)
  out = Scores(np.zeros(n), np.zeros(n, np.int64), np.zeros(n, bool))
  for chosen, batch in _batches(seqs, mesh, batch_size, pad_id):
    got = jax.device_get(fn(params, batch, adapters))
    for j, i in enumerate(chosen):
      out.nll[i] = float(got["nll"][j])
      out.tokens[i] = int(round(float(got["tokens"][j])))
      out.greedy[i] = bool(got["greedy"][j])
  return out


def kl_to_base(cfg, params, base_params, seqs: Sequence[encode.Encoded], *, adapters=None,
               base_adapters=None, mesh=None, batch_size: int = 8,
               pad_id: int = 0) -> tuple[float, int]:
  """(sum of token KL(p_model || p_base) over the train-flagged tokens, their count).

  For (Q)LoRA pass the same `params` as `base_params` with base_adapters=None (adapters
  off: no second copy of the weights); for full fine-tuning the initial params.
  """
  mesh = _mesh(mesh)
  fn = _compiled_kl(cfg, mesh)
  total, count = 0.0, 0
  for _, batch in _batches(seqs, mesh, batch_size, pad_id):
    kl, n = jax.device_get(fn(params, base_params, batch, adapters, base_adapters))
    total += float(kl)
    count += int(round(float(n)))
  return total, count
