"""The KV cache of models with sliding and global layers (Gemma 2/3): the sliding layers keep
a ring of W slots (`cache.KVCache.local`), the global layers every column.

Tiny random transformers models (tests/hf_models.py, window 5) with more layers than the
shared fixtures, so the grouped scan runs over several periods (Gemma 2: 5 layers = 2 x
(s, f) + s; Gemma 3: 7 layers = 2 x (s, s, f) + s) and a layer's index in its cache group
is computed from a traced layer index. Prompts of 3, 11 and 7 tokens (16 columns) and 12 new
tokens: the ring wraps several times. References: transformers greedy `generate` of each
prompt alone, and jaxtune's own full cache (every layer every slot, the layout before the
ring): the same tokens.
"""

import dataclasses

import jax
import numpy as np
import peft
import pytest
import torch

import jaxtune
from jaxtune.models import cache
from jaxtune.sampling import api
from jaxtune.sampling import engine
from tests import hf_models

W = hf_models.WINDOW
EOS = 2
NEW = 12
PROMPTS = [np.random.RandomState(i).randint(3, 101, n).tolist()
           for i, n in enumerate((3, 11, 7))]
LAYERS = {"gemma2": 5, "gemma3": 7}


@pytest.fixture(scope="module", params=list(LAYERS))
def family(request, tmp_path_factory):
  name = request.param
  model = hf_models.make(name, num_hidden_layers=LAYERS[name])
  d = tmp_path_factory.mktemp(name)
  model.save_pretrained(d, safe_serialization=True)
  cfg, params = jaxtune.load_hf(str(d))
  return name, model, cfg, params, str(d)


def _hf_greedy(model, prompt):
  out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt),
                       dtype=torch.long), max_new_tokens=NEW, do_sample=False,
                       eos_token_id=EOS, pad_token_id=0)
  return out[0, len(prompt):].tolist()


def _generate(cfg, params, ring: bool):
  """(each row's tokens, their log-probs, the final cache, plan): greedy, stops at EOS."""
  rows = api.rows_for(PROMPTS, max_new_tokens=NEW, temperature=0.0)
  plan = engine.make_plan(cfg, rows)
  if not ring:  # every layer keeps every slot
    plan = dataclasses.replace(plan, local_slots=0)
  state = engine.start(cfg, params, plan, rows, (EOS,))
  state = engine.advance(cfg, params, plan, state, plan.new)
  out = engine.read(state)
  n = [min(int(c), NEW) for c in out["count"][:3]]
  return ([out["tokens"][i, :k].tolist() for i, k in enumerate(n)],
          np.concatenate([out["logprobs"][i, :k] for i, k in enumerate(n)]), state["kv"], plan)


def _bytes(kv) -> int:
  return sum(x.nbytes for x in jax.tree.leaves(kv))


@pytest.mark.parametrize("scan_layers", [True, False])
def test_ring_for_sliding_layers_equals_transformers_and_the_full_cache(family, scan_layers):
  name, model, cfg, params, _ = family
  cfg = dataclasses.replace(cfg, scan_layers=scan_layers)
  toks, lps, kv, plan = _generate(cfg, params, ring=True)
  full_toks, full_lps, full_kv, full_plan = _generate(cfg, params, ring=False)
  for p, ours in zip(PROMPTS, toks):
    assert ours == _hf_greedy(model, p), (name, scan_layers, p)
  assert toks == full_toks
  np.testing.assert_allclose(lps, full_lps, atol=1e-5, rtol=0)  # float32 sums over 5 or 32
  # The layout: sliding layers a W-slot ring, global layers every column (16 + 16).
  n_local = sum(w > 0 for w in cfg.layer_windows)
  n_global = cfg.num_layers - n_local
  assert (plan.slots, plan.local_slots, full_plan.local_slots) == (32, W, 0)

  def one(s):
    return (plan.batch, cfg.num_kv_heads, s, cfg.head_dim)

  if scan_layers:
    assert kv.k.shape == kv.v.shape == (n_global, *one(32))
    assert kv.local.k.shape == kv.local.v.shape == (n_local, *one(W))
    assert cache.axes(kv).local.k == ("layers", "batch", "act_kv_heads", "seq", "head_dim")
  else:
    assert [x.shape for x in kv.k] == [one(32)] * n_global
    assert [x.shape for x in kv.local.v] == [one(W)] * n_local
    assert cache.axes(kv).local.k == (("batch", "act_kv_heads", "seq", "head_dim"),) * n_local
  assert kv.pos.shape == (plan.batch, 32) and kv.local.pos.shape == (plan.batch, W)
  assert full_kv.local is None and full_kv.pos.shape == (plan.batch, 32)
  kv_bytes = 2 * plan.batch * cfg.num_kv_heads * cfg.head_dim * 4  # k + v per slot, f32
  assert _bytes(full_kv) - _bytes(kv) == n_local * (32 - W) * kv_bytes - plan.batch * 4 * W


def test_rank_of_a_traced_layer_index():
  """A layer's index in its group, from a traced index, = counting the layers before it."""
  flags = (True, True, False) * 3 + (True,)
  for flag in (True, False):
    want = [sum(f == flag for f in flags[:i]) for i in range(len(flags))]
    got = jax.jit(lambda i, flag=flag: cache._rank(flags, i, flag))
    assert [int(got(np.int32(i))) for i in range(len(flags))] == want
    assert [cache._rank(flags, i, flag) for i in range(len(flags))] == want


def test_one_group_for_uniform_windows_short_generations_and_prompt_tuning(family):
  """Uniform models keep one group (a window ring for Mistral-style windows, every column
  without one); a mixed model whose generation fits in its window, and prompt tuning (the
  padding between the virtual tokens and the prompt would push in-window virtual tokens out
  of a ring), keep every slot in every layer."""
  _, _, cfg, _, _ = family
  rows = api.rows_for(PROMPTS, max_new_tokens=NEW, temperature=0.0)
  for window, slots in ((W, W), (0, 32)):
    uniform = dataclasses.replace(cfg, layer_types=(), sliding_window=window)
    plan = engine.make_plan(uniform, rows)
    assert (plan.slots, plan.local_slots) == (slots, 0), window
    kv = cache.init(uniform, 4, plan.slots, np.float32, plan.local_slots)
    assert kv.local is None and kv.k.shape == (cfg.num_layers, 4, 1, slots, cfg.head_dim)
  assert cache.slots(cfg, W) == (W, 0) and cache.slots(cfg, W + 1) == (W + 1, W)
  assert cache.slots(cfg, W + 1, virtual=2) == (W + 1, 0)  # prompt tuning: no ring
  plan = engine.make_plan(cfg, rows, virtual=4)
  assert (plan.slots, plan.local_slots) == (36, 0)


def test_prompt_tuning_keeps_every_slot_and_equals_peft(tmp_path):
  """Prompt tuning on Gemma 2: every greedy token = the argmax of PEFT's teacher-forced
  logits (with a ring, the short row's first tokens lose in-window virtual tokens)."""
  model = hf_models.make("gemma2", num_hidden_layers=LAYERS["gemma2"])
  model.save_pretrained(tmp_path / "model", safe_serialization=True)
  cfg, params = jaxtune.load_hf(str(tmp_path / "model"))
  pm = peft.get_peft_model(model, peft.PromptTuningConfig(
      task_type="CAUSAL_LM", num_virtual_tokens=4)).eval()
  pm.save_pretrained(tmp_path / "prompt")
  adapters = jaxtune.peft.load_peft(cfg, str(tmp_path / "prompt"))
  gen = jaxtune.generate(cfg, params, PROMPTS, max_new_tokens=6, temperature=0.0,
                         eos_ids=(), lora=adapters)
  for p, toks in zip(PROMPTS, gen.tokens):
    with torch.no_grad():
      logits = pm(input_ids=torch.tensor([p + toks])).logits[0, 4:].double().numpy()
    assert toks == logits[len(p) - 1:-1].argmax(-1).tolist(), p
