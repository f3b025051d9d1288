"""MoE checkpoints whose experts are stored fused per layer (transformers 5's in-memory layout:
`mlp.experts.gate_up_proj` [E, 2F, D], `mlp.experts.down_proj` [E, D, F]) load like the
Hub's one-tensor-per-expert files: bit-identical params, transformers' logits, and an
export in the Hub layout."""

import os

import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
import torch
import transformers

import jaxtune
from jaxtune import tree
from jaxtune.hf import io as hf_io
from tests import hf_models

COMMON = dict(vocab_size=101, hidden_size=48, num_attention_heads=3, num_key_value_heads=1,
              max_position_embeddings=256, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2,
              tie_word_embeddings=False)
CONFIGS = {
    "mixtral": (transformers.MixtralConfig, dict(
        intermediate_size=40, num_hidden_layers=2, num_local_experts=5, num_experts_per_tok=2)),
    # Layers 0 and 2 dense (decoder_sparse_step=2): the fused layout only where experts are.
    # 2F != D, so a transposed gate_up_proj cannot pass for the right one.
    "qwen3_moe": (transformers.Qwen3MoeConfig, dict(
        intermediate_size=72, moe_intermediate_size=20, num_hidden_layers=3, head_dim=24,
        num_experts=5, num_experts_per_tok=3, norm_topk_prob=True, decoder_sparse_step=2)),
}


def _make(name):
  cls, extra = CONFIGS[name]
  return hf_models.make_moe(cls(**COMMON, **extra))


def _write_fused(model, d, edit=None):
  """The model's in-memory state dict (fused experts) as model.safetensors + config.json."""
  os.makedirs(d, exist_ok=True)
  sd = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
  if edit:
    edit(sd)
  safetensors.numpy.save_file(sd, os.path.join(d, "model.safetensors"), {"format": "pt"})
  model.config.save_pretrained(d)
  return d


@pytest.fixture(scope="module", params=list(CONFIGS))
def pair(request, tmp_path_factory):
  """(name, model, fused dir, per-expert dir (save_pretrained))."""
  model = _make(request.param)
  root = tmp_path_factory.mktemp(request.param)
  fused = _write_fused(model, str(root / "fused"))
  model.save_pretrained(str(root / "per_expert"))
  # the premise of every test here: the two directories really store the experts apart
  a = safetensors.numpy.load_file(os.path.join(fused, "model.safetensors"))
  b = safetensors.numpy.load_file(str(root / "per_expert" / "model.safetensors"))
  assert any(k.endswith("mlp.experts.gate_up_proj") for k in a)
  assert not any(".experts.0." in k for k in a) and any(".experts.0." in k for k in b)
  return request.param, model, fused, str(root / "per_expert")


def _tokens(seed=0):
  return np.random.RandomState(seed).randint(3, 101, (2, 13)).astype(np.int32)


def test_fused_loads_bit_identical_with_transformers_logits(pair):
  name, model, fused, per_expert = pair
  cfg, params = jaxtune.load_hf(fused)
  ref_cfg, ref = jaxtune.load_hf(per_expert)
  assert cfg == ref_cfg and cfg.family == name
  a, b = tree.flatten(params), tree.flatten(ref)
  assert set(a) == set(b)
  for k in a:
    assert np.array_equal(np.asarray(a[k]), np.asarray(b[k])), k
  toks = _tokens()
  got = np.asarray(jaxtune.forward(cfg, params, jnp.asarray(toks)))
  with torch.no_grad():
    want = model(input_ids=torch.as_tensor(toks, dtype=torch.long)).logits.numpy()
  np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
  # transformers reads the same files as the same model.
  theirs = transformers.AutoModelForCausalLM.from_pretrained(fused, dtype=torch.float32).eval()
  with torch.no_grad():
    np.testing.assert_array_equal(
        theirs(input_ids=torch.as_tensor(toks, dtype=torch.long)).logits.numpy(), want)


def test_export_writes_the_hub_layout(pair, tmp_path):
  _, _, fused, per_expert = pair
  cfg, params = jaxtune.load_hf(fused)
  hf_io.save_hf(cfg, params, str(tmp_path))
  a = safetensors.numpy.load_file(os.path.join(per_expert, "model.safetensors"))
  b = safetensors.numpy.load_file(os.path.join(tmp_path, "model.safetensors"))
  assert set(a) == set(b)
  for k in a:
    assert np.array_equal(a[k], b[k]), k


def _moe_key(name, what):
  return f"model.layers.{1 if name == 'qwen3_moe' else 0}.mlp.experts.{what}"


def test_transposed_fused_experts_are_refused(pair, tmp_path):
  """[E, D, 2F] (another on-disk orientation) is an error naming file, key, expected shape."""
  name, model, _, _ = pair
  key = _moe_key(name, "gate_up_proj")

  def transpose(sd):
    sd[key] = np.ascontiguousarray(sd[key].transpose(0, 2, 1))

  d = _write_fused(model, str(tmp_path / "bad"), transpose)
  e, f = 5, (40 if name == "mixtral" else 20)
  with pytest.raises(ValueError) as err:
    jaxtune.load_hf(d)
  msg = str(err.value)
  assert os.path.join(d, "model.safetensors") in msg and key in msg
  assert f"expected {[e, 2 * f, 48]}" in msg


def test_missing_or_mixed_layouts_are_named(pair, tmp_path):
  name, model, _, _ = pair
  down = _moe_key(name, "down_proj")
  d = _write_fused(model, str(tmp_path / "missing"), lambda sd: sd.pop(down))
  with pytest.raises(ValueError, match=f"missing tensor {down}"):
    jaxtune.load_hf(d)
  prefix = down.rsplit(".experts.", 1)[0]
  per = {"mixtral": "block_sparse_moe.experts.0.w2.weight",
         "qwen3_moe": "mlp.experts.0.down_proj.weight"}[name]
  extra = prefix.rsplit(".mlp", 1)[0] + "." + per

  def add(sd):
    sd[extra] = np.zeros((48, 40 if name == "mixtral" else 20), np.float32)

  d = _write_fused(model, str(tmp_path / "mixed"), add)
  with pytest.raises(ValueError, match=r"experts\.0\.\w+\.weight is stored per expert while"):
    jaxtune.load_hf(d)
