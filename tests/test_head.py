"""The one output head (models/head.py): every path to logits, log-probs and the SFT loss
agrees, with and without chunking, with and without a final logit soft-cap, tied or not."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxtune import config as config_lib
from jaxtune.models import decoder
from jaxtune.models import head

CFG = config_lib.ModelConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_layers=2,
                             num_heads=4, num_kv_heads=2, head_dim=8)


def _np_logprobs(logits, targets):
  z = logits - logits.max(-1, keepdims=True)
  lp = z - np.log(np.exp(z).sum(-1, keepdims=True))
  return np.take_along_axis(lp, targets[..., None], -1)[..., 0]


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("cap", [0.0, 3.0])
def test_head_paths_agree_with_numpy(tied, cap):
  cfg = dataclasses.replace(CFG, tie_word_embeddings=tied, final_logit_softcap=cap)
  params = decoder.init(cfg, jax.random.PRNGKey(0))
  rng = np.random.default_rng(0)
  tokens = jnp.asarray(rng.integers(0, cfg.vocab_size, (2, 11)), jnp.int32)
  targets = jnp.asarray(rng.integers(0, cfg.vocab_size, (2, 11)), jnp.int32)
  mask = jnp.asarray(rng.integers(0, 2, (2, 11)), jnp.float32)
  h = decoder.hidden_states(cfg, params, tokens) * 8.0  # large logits: the cap matters
  w, transposed = head.kernel(cfg, params)
  z = np.asarray(h, np.float64) @ (np.asarray(w, np.float64).T if transposed
                                   else np.asarray(w, np.float64))
  if cap:
    z = cap * np.tanh(z / cap)
  np.testing.assert_allclose(np.asarray(head.logits(cfg, params, h)), z, rtol=1e-4, atol=1e-4)
  want_lp = _np_logprobs(z, np.asarray(targets))
  for chunk in (0, 4):
    c = dataclasses.replace(cfg, logits_chunk=chunk)
    np.testing.assert_allclose(np.asarray(head.token_logprobs(c, params, h, targets)), want_lp,
                               rtol=1e-4, atol=1e-4)
    total, _ = head.nll_sum(c, params, h, targets, mask)
    np.testing.assert_allclose(float(total), float(-(want_lp * np.asarray(mask)).sum()),
                               rtol=1e-4)
  if cap:
    assert np.abs(np.asarray(head.logits(cfg, params, h))).max() <= cap


def test_forward_uses_the_head():
  cfg = dataclasses.replace(CFG, final_logit_softcap=2.0)
  params = decoder.init(cfg, jax.random.PRNGKey(1))
  tokens = jnp.arange(10, dtype=jnp.int32)[None]
  logits = decoder.forward(cfg, params, tokens)
  h = decoder.hidden_states(cfg, params, tokens)
  np.testing.assert_array_equal(np.asarray(logits), np.asarray(head.logits(cfg, params, h)))
  assert float(jnp.abs(logits).max()) <= 2.0
