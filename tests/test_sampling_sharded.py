"""The sampler on an 8-device mesh (data x fsdp x tensor) and over a 4-bit base: the same greedy
tokens as unsharded float32, and the cache really sharded.

tests/conftest.py simulates 8 CPU devices. The 4-bit model's reference is its dequantized
float32 model (the function the 4-bit model computes), checked against transformers
generate through an HF export of it.
"""

import dataclasses
import logging

import jax
import numpy as np
import pytest
import torch
import transformers

import jaxtune
from jaxtune import config as config_lib
from jaxtune import quant
from jaxtune import sharding
from jaxtune import weights
from jaxtune.peft import qlora
from jaxtune.sampling import api
from jaxtune.sampling import engine
from tests import hf_models

PROMPTS = [np.random.RandomState(i).randint(3, 101, n).tolist()
           for i, n in enumerate((3, 9, 5, 12, 7, 4))]


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
  d = tmp_path_factory.mktemp("llama_mesh")
  model = hf_models.make("llama2", hidden_size=64, intermediate_size=128,
                         num_attention_heads=4, num_key_value_heads=2)
  model.save_pretrained(d, safe_serialization=True)
  return str(d)


@pytest.fixture(scope="module")
def mesh():
  return sharding.make_mesh(config_lib.MeshConfig(data=2, fsdp=2, tensor=2))


def _greedy(cfg, params):
  return jaxtune.generate(cfg, params, PROMPTS, max_new_tokens=10, temperature=0.0,
                          eos_ids=())


def test_mesh_gives_the_unsharded_greedy_tokens(hf_dir, mesh):
  cfg, params = jaxtune.load_hf(hf_dir)
  ref = _greedy(cfg, params)
  w = weights.load(hf_dir, mesh=mesh)
  q_spec = w.params["layers"]["self_attn"]["q_proj"]["kernel"].sharding.spec
  assert tuple(q_spec) == (None, "fsdp", "tensor")  # [L, D, H*Dh] really sharded
  assert api.mesh_of(w.params) is mesh
  got = _greedy(w.model_cfg, w.params)
  assert got.tokens == ref.tokens
  np.testing.assert_allclose(np.concatenate(got.logprobs), np.concatenate(ref.logprobs),
                             atol=1e-5)
  # The sampler's state lives on the mesh: cache rows over data x fsdp, kv heads over tensor.
  rows = api.rows_for(PROMPTS, max_new_tokens=10, temperature=0.0)
  plan = engine.make_plan(w.model_cfg, rows)
  state = engine.start(w.model_cfg, w.params, plan, rows, (), mesh=mesh)
  k = state["kv"].k
  assert k.shape == (cfg.num_layers, 8, 2, plan.slots, cfg.head_dim)
  spec = tuple(k.sharding.spec) + (None,) * (k.ndim - len(k.sharding.spec))
  assert spec == (None, ("data", "fsdp"), "tensor", None, None)


def test_unrolled_layers_give_the_scanned_tokens(hf_dir):
  """scan_layers=False keeps one cache buffer per layer; the tokens do not change."""
  cfg, params = jaxtune.load_hf(hf_dir)
  ref = _greedy(cfg, params)
  unrolled = config_lib.ModelConfig(scan_layers=False)
  w = weights.load(hf_dir, base=unrolled)
  assert not w.model_cfg.scan_layers
  assert _greedy(w.model_cfg, w.params).tokens == ref.tokens


def test_4bit_base_equals_its_dequantized_model_and_transformers(hf_dir, mesh, tmp_path):
  cfg, params = jaxtune.load_hf(hf_dir)
  qparams = qlora.quantize_params(params, method="nf4", group_size=64,
                                  scale_dtype=np.float32)
  assert isinstance(qparams["layers"]["mlp"]["up_proj"]["kernel"], quant.QArray)
  dense = quant.dequantize_tree(qparams)
  ref = _greedy(cfg, dense)
  assert ref.tokens != _greedy(cfg, params).tokens  # 4 bits changed the model
  assert _greedy(cfg, qparams).tokens == ref.tokens
  # ... and the dequantized model is what transformers generates from its export.
  jaxtune.save_hf(cfg, dense, str(tmp_path / "dq"))
  model = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "dq")).eval()
  for p, ours in zip(PROMPTS, ref.tokens):
    out = model.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                         max_new_tokens=10, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert out[0, len(p):].tolist() == ours
  # 4-bit on the mesh, quantized on load: the same tokens again.
  w = weights.load(hf_dir, mesh=mesh, quant=weights.Quant("nf4", 64))
  assert isinstance(w.params["layers"]["mlp"]["up_proj"]["kernel"], quant.QArray)
  host = jax.tree_util.tree_map(np.asarray, w.params)  # unsharded copy of the 4-bit leaves
  assert _greedy(w.model_cfg, w.params).tokens == _greedy(
      cfg, quant.dequantize_tree(host)).tokens


def test_projections_fuse_only_when_no_part_splits_its_outputs(hf_dir, mesh, caplog):
  """Decode joins q|k|v and gate|up side by side only where each part's output dim is whole:
  not over a tensor axis (the parts' shards would not line up), yes over data x fsdp
  (FSDP splits a kernel's leading dim); the tokens are the unsharded ones either way."""
  def greedy(cfg, params):  # 30 new tokens: a plan no other test here compiles
    return jaxtune.generate(cfg, params, PROMPTS, max_new_tokens=30, temperature=0.0,
                            eos_ids=()).tokens

  cfg, params = jaxtune.load_hf(hf_dir)
  ref = greedy(cfg, params)
  fsdp = sharding.make_mesh(config_lib.MeshConfig(data=2, fsdp=4, tensor=1))
  for m, fused in ((mesh, False), (fsdp, True)):
    w = weights.load(hf_dir, mesh=m)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="jaxtune.sampling"):
      assert greedy(w.model_cfg, w.params) == ref
    decode = [r.getMessage() for r in caplog.records if "compiling decode" in r.getMessage()]
    assert decode and all(("fused projections" in d) == fused for d in decode), (m, decode)
  # where fsdp cannot split D (36 rows over 8) it takes the outputs, and fusion is refused
  wide = sharding.make_mesh(config_lib.MeshConfig(data=1, fsdp=8, tensor=1))
  odd = dataclasses.replace(cfg, hidden_size=36, num_heads=4, head_dim=16)
  assert engine._outputs_whole(cfg, wide) and not engine._outputs_whole(odd, wide)
