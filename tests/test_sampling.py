"""jaxtune.generate against transformers / peft: greedy parity for every family (ragged batch,
sliding-window ring cache), LoRA adapters unmerged, log-probs, sampling distribution, the
top-k / top-p / min-p sets, stopping, bucketing and compile counts, and bad input.

References are `transformers` generate / forward on tiny random models built in-process
(tests/hf_models.py), `peft`'s PeftModel, scipy's chi-square test and numpy.
"""

import os

import numpy as np
import peft
import pytest
import scipy.stats
import torch

import jaxtune
from jaxtune import sampling
from jaxtune.sampling import engine
from tests import hf_models

EOS = 2


def _prompts(seed, lengths, v=101):
  rng = np.random.RandomState(seed)
  return [rng.randint(3, v, n).tolist() for n in lengths]  # no eos (2) inside a prompt


def _hf_greedy(model, prompt, n, eos=EOS):
  out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt),
                       dtype=torch.long), max_new_tokens=n, do_sample=False, eos_token_id=eos,
                       pad_token_id=0)
  return out[0, len(prompt):].tolist()


def _hf_logits(model, ids):
  return hf_models.logits(model, np.asarray([ids]))[0].astype(np.float64)  # [T, V]


def _log_softmax(z):
  z = z - z.max(-1, keepdims=True)
  return z - np.log(np.exp(z).sum(-1, keepdims=True))


@pytest.fixture(scope="module", params=list(hf_models.FAMILIES))
def family(request, tmp_path_factory):
  model = hf_models.make(request.param)
  d = tmp_path_factory.mktemp(request.param)
  model.save_pretrained(d, safe_serialization=True)
  cfg, params = jaxtune.load_hf(str(d))
  return request.param, model, cfg, params


def test_greedy_ragged_batch_equals_transformers_per_prompt(family):
  """Prompts of 3, 11 and 7 tokens in one batch, each = HF greedy generate of it alone.

  mistral_window has a 5-token window, shorter than the 16 prompt columns: its cache is a
  5-slot ring (cache.slots), and the parity covers the ring's prefill and decode writes.
  """
  name, model, cfg, params = family
  prompts = _prompts(0, (3, 11, 7))
  gen = jaxtune.generate(cfg, params, prompts, max_new_tokens=12, temperature=0.0,
                         eos_ids=(EOS,))
  for p, ours in zip(prompts, gen.tokens):
    assert ours == _hf_greedy(model, p, 12), (name, p)
  if name == "mistral_window":
    assert engine.make_plan(cfg, sampling.api.rows_for(prompts, max_new_tokens=12)).slots == 5


def test_logprobs_equal_teacher_forced_log_softmax(family):
  """Sampled at temperature 1 and 0.7 (with top-k on, which must not change the log-probs):
  each returned log-prob = log_softmax(HF logits / T) of the prompt + tokens so far."""
  name, model, cfg, params = family
  prompts = _prompts(1, (5, 9))
  for temp, top_k in ((1.0, 0), (0.7, 7)):
    gen = jaxtune.generate(cfg, params, prompts, max_new_tokens=6, temperature=temp,
                           top_k=top_k, key=jax_key(3), eos_ids=())
    for p, toks, lps in zip(prompts, gen.tokens, gen.logprobs):
      assert len(toks) == len(lps) == 6
      ref = _log_softmax(_hf_logits(model, p + toks) / temp)
      want = [ref[len(p) - 1 + j, t] for j, t in enumerate(toks)]
      np.testing.assert_allclose(lps, want, atol=1e-4, rtol=0, err_msg=f"{name} T={temp}")


def jax_key(seed):
  import jax
  return jax.random.PRNGKey(seed)


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
  model = hf_models.make("llama2")
  d = tmp_path_factory.mktemp("llama2s")
  model.save_pretrained(d, safe_serialization=True)
  cfg, params = jaxtune.load_hf(str(d))
  return model, cfg, params, str(d)


def _peft_lora(cfg, tmp_path, *, seed: int):
  """A peft LoRA adapter on all 7 projections of the tiny llama2, with non-zero random B,
  saved and loaded: (PeftModel in eval mode, jaxtune adapters)."""
  pm = peft.get_peft_model(hf_models.make("llama2"), peft.LoraConfig(
      r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                         "up_proj", "down_proj"], task_type="CAUSAL_LM"))
  torch.manual_seed(seed)
  with torch.no_grad():
    for n, p in pm.named_parameters():
      if "lora_" in n:
        p.normal_(0.0, 0.2)
  pm.save_pretrained(tmp_path / "adapter")
  pm.eval()
  return pm, jaxtune.peft.load_peft(cfg, str(tmp_path / "adapter"))


def test_peft_lora_adapter_equals_peft_model_generate(llama, tmp_path):
  """A peft LoRA adapter (all 7 projections, non-zero B) applied unmerged = PeftModel greedy."""
  model, cfg, params, d = llama
  pm, adapters = _peft_lora(cfg, tmp_path, seed=1)
  prompts = _prompts(2, (4, 10, 6))
  gen = jaxtune.generate(cfg, params, prompts, max_new_tokens=10, temperature=0.0,
                         eos_ids=(EOS,), lora=adapters)
  plain = jaxtune.generate(cfg, params, prompts, max_new_tokens=10, temperature=0.0,
                           eos_ids=(EOS,))
  assert gen.tokens != plain.tokens  # the adapter changes the continuation
  for p, ours in zip(prompts, gen.tokens):
    assert ours == _hf_greedy(pm, p, 10), p


@pytest.mark.parametrize("scan_layers", [True, False])
def test_fused_projections_decode_like_separate_ones(llama, tmp_path, monkeypatch, caplog,
                                                     scan_layers):
  """The decode program's fused q|k|v and gate|up (models/fused.py), with and without a LoRA
  adapter on all 7 projections: the same greedy tokens and log-probs (1e-5) as the separate
  products, scanned and unrolled layers; and the memory gate turns fusion off."""
  import dataclasses
  import logging

  import jax
  model, cfg, params, _ = llama
  cfg = dataclasses.replace(cfg, scan_layers=scan_layers)
  _, adapters = _peft_lora(cfg, tmp_path, seed=3)
  prompts = _prompts(4, (5, 9, 3))

  def run(fits, lora):
    monkeypatch.setattr(engine, "_free_bytes", lambda: None if fits else 0)
    jax.clear_caches()  # so the decode program is traced (and logs) here
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="jaxtune.sampling"):
      gen = jaxtune.generate(cfg, params, prompts, max_new_tokens=9, temperature=0.0,
                             eos_ids=(), lora=lora)
    compiled = [r.getMessage() for r in caplog.records if "compiling decode" in r.getMessage()]
    return gen, compiled

  for lora in (None, adapters):
    fused, log_fused = run(True, lora)
    apart, log_apart = run(False, lora)
    assert log_fused and all("fused projections" in m for m in log_fused)
    assert log_apart and not any("fused projections" in m for m in log_apart)
    assert fused.tokens == apart.tokens
    np.testing.assert_allclose(np.concatenate(fused.logprobs), np.concatenate(apart.logprobs),
                               atol=1e-5)
  # The memory check's size: q|k|v and gate|up of every layer, float32; a 4-bit base: none.
  layers = cfg.num_layers * cfg.hidden_size * (cfg.q_size + 2 * cfg.kv_size +
                                                2 * cfg.intermediate_size)
  assert engine.fused_bytes(cfg, params) == 4 * layers
  assert engine.fused_bytes(cfg, jaxtune.quant.quantize(params, group_size=16)) == 0


def _nucleus(probs, p):
  order = np.argsort(-probs)
  before = np.cumsum(probs[order]) - probs[order]
  return set(order[before < p].tolist())


def test_first_token_frequencies_match_the_softmax(llama):
  """4096 rows of one prompt, one sampled token each: a chi-square test against
  softmax(HF logits / T) accepts; against T * 1.3 (a test that can tell) it rejects. The tiny
  random model's logits are nearly flat (std 0.12), so T = 0.1 makes a peaked target."""
  model, cfg, params, _ = llama
  prompt = _prompts(4, (6,))[0]
  n = 4096
  gen = jaxtune.generate(cfg, params, [prompt] * n, max_new_tokens=1, temperature=0.1,
                         key=jax_key(7), eos_ids=())
  counts = np.bincount([t[0] for t in gen.tokens], minlength=cfg.vocab_size)
  logits = _hf_logits(model, prompt)[-1]

  def pvalue(temp):
    probs = np.exp(_log_softmax(logits / temp))
    expected = probs * n
    big = expected >= 5  # pool the rare tokens into one bin
    obs, exp = counts[big], expected[big]
    if (~big).any():
      obs, exp = np.append(obs, counts[~big].sum()), np.append(exp, expected[~big].sum())
    return scipy.stats.chisquare(obs, exp).pvalue

  assert pvalue(0.1) > 1e-3
  assert pvalue(0.13) < 1e-6


@pytest.mark.parametrize("kw", [dict(top_k=4), dict(top_p=0.5), dict(min_p=0.3),
                                dict(top_k=10, top_p=0.6)])
def test_truncated_sampling_never_leaves_its_set(llama, kw):
  """128 rows x 6 tokens at temperature 0.15 (the tiny model's logits are nearly flat; this
  makes top-p 0.5 keep ~15-25 of 101 tokens): every token is inside the set its filter
  keeps, computed in numpy from HF's logits at that position (top-k, top-p, then min-p)."""
  model, cfg, params, _ = llama
  temp = 0.15
  prompts = _prompts(5, [4 + i % 5 for i in range(128)])
  gen = jaxtune.generate(cfg, params, prompts, max_new_tokens=6, temperature=temp,
                         key=jax_key(11), eos_ids=(), **kw)
  distinct = set()
  for p, toks in zip(prompts, gen.tokens):
    logits = _hf_logits(model, p + toks) / temp
    for j, t in enumerate(toks):
      z = logits[len(p) - 1 + j]
      keep = set(range(len(z)))
      if kw.get("top_k"):
        keep = set(np.argsort(-z)[:kw["top_k"]].tolist())
      masked = np.where(np.isin(np.arange(len(z)), list(keep)), z, -np.inf)
      probs = np.exp(_log_softmax(masked))
      if kw.get("top_p"):
        keep &= _nucleus(probs, kw["top_p"])
      if kw.get("min_p"):
        keep &= set(np.nonzero(probs >= kw["min_p"] * probs.max())[0].tolist())
      assert t in keep, (p, j, t, sorted(keep))
      distinct.add((len(p), j, t))
  assert len({t for _, j, t in distinct if j == 0}) >= 2  # it samples, it is not greedy


def test_stops_at_any_eos_per_row(llama):
  """Per-row stop: each row ends at its first id from eos_ids (inclusive); eos_ids=() never
  stops; None means the config's eos ids."""
  model, cfg, params, _ = llama
  prompts = _prompts(6, (3, 8, 5, 12))
  full = jaxtune.generate(cfg, params, prompts, max_new_tokens=16, temperature=0.0,
                          eos_ids=())
  assert all(len(t) == 16 for t in full.tokens)
  stops = {full.tokens[0][3], full.tokens[2][5]}
  gen = jaxtune.generate(cfg, params, prompts, max_new_tokens=16, temperature=0.0,
                         eos_ids=tuple(stops))
  for f, g, fin in zip(full.tokens, gen.tokens, gen.finished):
    cut = next((j + 1 for j, t in enumerate(f) if t in stops), len(f))
    assert g == f[:cut] and fin == (cut < len(f) or f[-1] in stops)
  assert cfg.eos_token_id == (EOS,)
  default = jaxtune.generate(cfg, params, prompts, max_new_tokens=16, temperature=0.0)
  for p, g in zip(prompts, default.tokens):
    assert g == _hf_greedy(model, p, 16)


def test_decode_compiles_once_per_bucket(llama, caplog):
  """Three calls with different ragged prompts in one bucket (3-4 rows, <= 8 columns, 5-8
  new tokens, the same sampling switches) trace prefill and decode once, and say so in the
  log; a longer prompt (the next bucket) compiles again."""
  model, cfg, params, _ = llama
  caplog.set_level("INFO", logger="jaxtune.sampling")
  before = dict(engine.TRACES)
  kw = dict(temperature=0.5, top_k=3, eos_ids=(EOS,))  # switches no other test uses
  for seed, lengths, n in ((20, (3, 8, 2), 7), (21, (5, 1, 4, 6), 8), (22, (1, 2, 6, 7), 5)):
    jaxtune.generate(cfg, params, _prompts(seed, lengths), max_new_tokens=n, key=jax_key(seed),
                     **kw)
  assert engine.TRACES["prefill"] - before.get("prefill", 0) == 1
  assert engine.TRACES["decode"] - before.get("decode", 0) == 1
  assert sum("sampling: compiling decode" in r.message for r in caplog.records) == 1
  jaxtune.generate(cfg, params, _prompts(23, (9, 2, 3)), max_new_tokens=8, **kw)
  assert engine.TRACES["decode"] - before.get("decode", 0) == 2
  assert engine.bucket(5) == 8 and engine.bucket(8) == 8 and engine.bucket(9) == 16


def test_stream_yields_growing_rows_ending_in_generate(llama):
  model, cfg, params, _ = llama
  prompts = _prompts(8, (4, 7))
  parts = list(sampling.stream(cfg, params, prompts, max_new_tokens=20, temperature=0.0,
                               eos_ids=(), chunk=4))
  final = jaxtune.generate(cfg, params, prompts, max_new_tokens=20, temperature=0.0,
                           eos_ids=())
  assert len(parts) >= 5 and parts[-1].tokens == final.tokens
  for a, b in zip(parts, parts[1:]):
    for x, y in zip(a.tokens, b.tokens):
      assert y[:len(x)] == x and len(y) >= len(x)


@pytest.mark.parametrize("call,message", [
    (dict(prompts=[]), "prompts: expected a non-empty list"),
    (dict(prompts=[[1, 2], []]), "prompts[1]: expected a non-empty list"),
    (dict(prompts=[[1, 500]]), "prompts[0][1]: token id 500 is outside the vocabulary [0, 101)"),
    (dict(prompts=[[1, "a"]]), "prompts[0][1]: 'a' is not an int token id"),
    (dict(max_new_tokens=0), "max_new_tokens must be an int >= 1"),
    (dict(top_p=0.0), "top_p must be in (0, 1]"),
    (dict(temperature=-1.0), "temperature must be >= 0"),
    (dict(lora="x"), "generate: lora must be None or adapters"),
])
def test_bad_input_is_one_line_naming_it(llama, call, message):
  _, cfg, params, _ = llama
  kw = dict(prompts=[[1, 2, 3]], max_new_tokens=4)
  kw.update(call)
  with pytest.raises((ValueError, TypeError)) as e:
    jaxtune.generate(cfg, params, kw.pop("prompts"), **kw)
  assert str(e.value).startswith(message) and "\n" not in str(e.value)


def test_generate_is_exported():
  assert jaxtune.generate is sampling.generate
  assert os.path.basename(jaxtune.sampling.__file__) == "__init__.py"


def test_pallas_decode_kernel_equals_the_xla_path(llama):
  """model.attention='pallas' runs the Pallas decode kernel (interpreted on CPU; on GPU it
  is what 'auto' picks in bf16): the same tokens and log-probs as the XLA cache attention."""
  import dataclasses
  _, cfg, params, _ = llama
  prompts = _prompts(9, (3, 11, 7))
  ref = jaxtune.generate(cfg, params, prompts, max_new_tokens=9, temperature=1.0,
                         key=jax_key(2), eos_ids=())
  got = jaxtune.generate(dataclasses.replace(cfg, attention="pallas"), params, prompts,
                         max_new_tokens=9, temperature=1.0, key=jax_key(2), eos_ids=())
  assert got.tokens == ref.tokens
  np.testing.assert_allclose(np.concatenate(got.logprobs), np.concatenate(ref.logprobs),
                             atol=1e-5)


def test_peft_prompt_tuning_is_peft_models_greedy_continuation(llama, tmp_path):
  """Prompt tuning's virtual tokens (`prefix_embeddings`) go into the cache in front of each
  left-padded prompt. Reference: PEFT's PeftModel forward (teacher-forced, virtual tokens
  prepended by PEFT): every greedy token is the argmax of PEFT's logits after the prompt and
  the tokens before it, and every log-prob is PEFT's log-softmax. (PeftModel.generate is not
  the reference: with transformers 5's cache it disagrees with PeftModel's own forward,
  which warns that it ignores position ids.)"""
  model, cfg, params, _ = llama
  pm = peft.get_peft_model(hf_models.make("llama2"), peft.PromptTuningConfig(
      task_type="CAUSAL_LM", num_virtual_tokens=4)).eval()
  pm.save_pretrained(tmp_path / "prompt")
  adapters = jaxtune.peft.load_peft(cfg, str(tmp_path / "prompt"))
  prompts = _prompts(10, (3, 9, 6))
  gen = jaxtune.generate(cfg, params, prompts, max_new_tokens=8, temperature=0.0,
                         eos_ids=(), lora=adapters)
  for p, toks, lps in zip(prompts, gen.tokens, gen.logprobs):
    with torch.no_grad():
      logits = pm(input_ids=torch.tensor([p + toks])).logits[0, 4:].double().numpy()
    ref = _log_softmax(logits)[len(p) - 1:-1]  # [8, V]: the distributions of the new tokens
    assert toks == ref.argmax(-1).tolist(), p
    np.testing.assert_allclose(lps, ref[np.arange(8), toks], atol=1e-4)
  plain = jaxtune.generate(cfg, params, prompts, max_new_tokens=8, temperature=0.0,
                           eos_ids=())
  assert plain.tokens != gen.tokens
