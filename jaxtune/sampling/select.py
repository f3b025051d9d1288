"""Choosing the next token from logits: greedy, temperature, top-k, top-p, min-p.

Pure array functions over one decode step's logits [B, V] (float32), so they are tested on
their own and run inside the sampler's jitted loop. The order of the filters is that of
`transformers`' logits warpers: temperature, then top-k, then top-p (nucleus) on the
renormalised top-k distribution, then min-p. Every row has its own temperature, top-p and
min-p (a batch of requests with different settings is one program); top-k is static (it
sets the shape of `lax.top_k`), as are the switches that skip the filters nobody asked for:

    >>> tok, lp = pick(logits, keys, temperature, top_p, min_p, mode=Mode(sample=True))

The returned log-probability is that of the chosen token under the model's distribution after
temperature and before truncation: log_softmax(logits / T)[token] (T = 1 for greedy rows,
whose temperature is 0).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class Mode:
  """The static part of sampling: which code the step contains.

  sample: some row has temperature > 0 (else the step is a plain argmax).
  top_k: keep the k largest logits (0 = off). top_p / min_p: the filters are in the program
  (each row's own value decides what it removes; p = 1 and min_p = 0 remove nothing).
  """
  sample: bool = False
  top_k: int = 0
  top_p: bool = False
  min_p: bool = False


def top_k_filter(z: jax.Array, k: int) -> jax.Array:
  """z [B, V] with everything below the k-th largest value set to -inf."""
  kth = jax.lax.top_k(z, k)[0][:, -1:]  # [B, 1]
  return jnp.where(z >= kth, z, -jnp.inf)


def top_p_filter(z: jax.Array, p: jax.Array) -> jax.Array:
  """z [B, V] keeping the smallest set of largest logits whose probability reaches p [B].

  A token is kept when the probability of the tokens ranked above it is below p (so the
  most likely token always is); p >= 1 keeps everything.
  """
  desc = -jnp.sort(-z, axis=-1)  # [B, V]
  probs = jax.nn.softmax(desc, axis=-1)
  before = jnp.cumsum(probs, axis=-1) - probs
  keep = (before < p[:, None]) | (jnp.arange(z.shape[-1]) == 0)
  threshold = jnp.min(jnp.where(keep, desc, jnp.inf), axis=-1, keepdims=True)  # [B, 1]
  return jnp.where((z >= threshold) | (p[:, None] >= 1.0), z, -jnp.inf)


def min_p_filter(z: jax.Array, min_p: jax.Array) -> jax.Array:
  """z [B, V] without tokens whose probability is below min_p [B] times the largest one."""
  probs = jax.nn.softmax(z, axis=-1)
  top = jnp.max(probs, axis=-1, keepdims=True)
  return jnp.where(probs >= min_p[:, None] * top, z, -jnp.inf)


def pick(logits: jax.Array, keys: jax.Array, temperature: jax.Array, top_p: jax.Array,
         min_p: jax.Array, *, mode: Mode) -> tuple[jax.Array, jax.Array]:
  """One token per row. logits [B, V]; keys [B, 2] uint32 (one PRNG key per row);
  temperature, top_p, min_p [B] float32 (temperature 0 = greedy) -> (tokens [B] int32,
  log-probs [B] float32, see the module docstring).

  Sampled rows draw by inverse CDF (`draw`: one uniform per row from its key); greedy rows
  take the argmax of the same filtered logits, which the filters never remove, so it is the
  greedy token.
  """
  logits = logits.astype(jnp.float32)
  if not mode.sample:
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    return greedy, _logprob(logits, greedy)
  sampled_row = temperature > 0
  t = jnp.where(sampled_row, temperature, 1.0)[:, None]
  z = logits / t
  f = z
  if mode.top_k:
    f = top_k_filter(f, min(mode.top_k, z.shape[-1]))
  if mode.top_p:
    f = top_p_filter(f, top_p)
  if mode.min_p:
    f = min_p_filter(f, min_p)
  u = jax.vmap(lambda k: jax.random.uniform(k, (), jnp.float32))(keys)
  greedy, sampled, lse = draw(f, u)
  tokens = jnp.where(sampled_row, sampled, greedy)
  if mode.top_k or mode.top_p or mode.min_p:  # the log-prob is before truncation
    return tokens, _logprob(z, tokens)
  picked = jnp.take_along_axis(z, tokens[:, None], axis=-1)[:, 0]
  return tokens, picked - lse


def _block_size(vocab: int) -> int:
  return next((b for b in (1024, 512, 256, 128) if vocab % b == 0), 1024)


def draw(f: jax.Array, u: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Sample from softmax(f) by inverse CDF: f [B, V] float32 (-inf = excluded), u [B] in
  [0, 1) -> (argmax [B], sampled [B] int32, logsumexp(f) [B]).

  The token is the first whose cumulative probability exceeds u, found in two levels so no
  [B, V] cumulative sum is formed: the vocabulary in blocks of 128-1024 entries, each
  block's mass (one pass over f after the one for its max), the block where the cumulative
  mass crosses u * total, then the entry inside that block. Two passes over the logits and
  one random number per row, where a Gumbel-max draw needs a random number per entry.
  Only entries with mass are ever returned: a crossing must have mass, and a rounding
  overshoot falls back to the last entry with mass.
  """
  b, v = f.shape
  bs = _block_size(v)
  nb = -(-v // bs)
  if nb * bs != v:
    f = jnp.pad(f, ((0, 0), (0, nb * bs - v)), constant_values=-jnp.inf)
  greedy = jnp.argmax(f, axis=-1).astype(jnp.int32)
  m = jnp.take_along_axis(f, greedy[:, None], axis=-1)  # [B, 1]: the max
  blocks = f.reshape(b, nb, bs)
  mass = jnp.sum(jnp.exp(blocks - m[:, :, None]), axis=-1)  # [B, nb]
  cum = jnp.cumsum(mass, axis=-1)
  total = cum[:, -1]
  target = u * total
  j = _first_crossing(cum, mass, target)
  rest = target - (_at(cum, j) - _at(mass, j))
  inside = jnp.exp(jnp.take_along_axis(blocks, j[:, None, None], axis=1)[:, 0] - m)  # [B, bs]
  i = _first_crossing(jnp.cumsum(inside, axis=-1), inside, rest)
  return greedy, (j * bs + i).astype(jnp.int32), m[:, 0] + jnp.log(total)


def _first_crossing(cum: jax.Array, mass: jax.Array, target: jax.Array) -> jax.Array:
  """Per row, the first entry with mass whose cumulative sum passes target [B]; the last
  entry with mass when rounding leaves none (target at or past the total). Requiring mass
  keeps a rounding undershoot (a slightly negative target inside the block) off an
  excluded entry."""
  hit = (cum > target[:, None]) & (mass > 0)
  return jnp.where(jnp.any(hit, axis=-1), jnp.argmax(hit, axis=-1), _last_positive(mass))


def _at(x: jax.Array, idx: jax.Array) -> jax.Array:
  return jnp.take_along_axis(x, idx[:, None], axis=-1)[:, 0]


def _last_positive(x: jax.Array) -> jax.Array:
  """Index of the last entry > 0 of each row of x [B, N]."""
  return x.shape[-1] - 1 - jnp.argmax(x[:, ::-1] > 0, axis=-1)


def _logprob(z: jax.Array, tokens: jax.Array) -> jax.Array:
  """log_softmax(z)[tokens] without materialising the [B, V] log-softmax."""
  picked = jnp.take_along_axis(z, tokens[:, None], axis=-1)[:, 0]
  return picked - jax.nn.logsumexp(z, axis=-1)
