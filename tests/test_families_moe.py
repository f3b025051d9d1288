"""Mixtral and Qwen3-MoE against `transformers` / `peft` on tiny random models (odd sizes).

Every reference here is computed by transformers 5 or peft on the same weights: logits,
the router's per-token expert choices, `load_balancing_loss_func`'s value, the training
loss with router_aux_loss_coef, greedy generation, and PEFT's expert LoRA
(`target_parameters`).
"""

import dataclasses
import json
import os
import re
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import safetensors.numpy
import torch
import transformers

import jaxtune
from jaxtune import config as config_lib
from jaxtune import quant
from jaxtune import weights
from jaxtune.hf import io as hf_io
from jaxtune.methods import sft
from jaxtune.models import decoder
from jaxtune.models import moe
from jaxtune.peft import lora
from tests import hf_models
from tests import launch_utils

COMMON = dict(vocab_size=101, hidden_size=48, num_attention_heads=3, num_key_value_heads=1,
              max_position_embeddings=256, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2,
              router_aux_loss_coef=0.02, tie_word_embeddings=False)
CONFIGS = {
    "mixtral": (transformers.MixtralConfig, dict(
        intermediate_size=40, num_hidden_layers=2, num_local_experts=5, num_experts_per_tok=2)),
    "qwen3_moe": (transformers.Qwen3MoeConfig, dict(
        intermediate_size=72, moe_intermediate_size=24, num_hidden_layers=2, head_dim=24,
        num_experts=5, num_experts_per_tok=3, norm_topk_prob=True)),
    # Dense layers from decoder_sparse_step=2 and mlp_only_layers=[3]: only layer 1 is MoE.
    "qwen3_moe_mixed": (transformers.Qwen3MoeConfig, dict(
        intermediate_size=72, moe_intermediate_size=24, num_hidden_layers=4, head_dim=24,
        num_experts=6, num_experts_per_tok=2, norm_topk_prob=False, decoder_sparse_step=2,
        mlp_only_layers=[3])),
}


forward = jax.jit(jaxtune.forward, static_argnums=0)  # one compile per config and adapter kind


def make(name, seed=0):
  cls, extra = CONFIGS[name]
  return hf_models.make_moe(cls(**COMMON, **extra), seed)


def tokens(b=2, t=13, seed=0):
  return np.random.RandomState(seed).randint(3, 101, (b, t)).astype(np.int32)


@pytest.fixture(scope="module", params=list(CONFIGS))
def pair(request, tmp_path_factory):
  """(name, HF model, its save_pretrained dir, jaxtune cfg, params)."""
  model = make(request.param)
  d = str(tmp_path_factory.mktemp(request.param))
  model.save_pretrained(d)
  cfg, params = jaxtune.load_hf(d)
  return request.param, model, d, cfg, params


def hf_logits(model, toks, **kw):
  with torch.no_grad():
    return model(input_ids=torch.as_tensor(toks, dtype=torch.long), **kw).logits.numpy()


def test_config_and_logits_match_transformers(pair):
  name, model, _, cfg, params = pair
  assert cfg.family == name.replace("_mixed", "")
  if name == "qwen3_moe_mixed":
    assert cfg.dense_layers == (0, 2, 3) and moe.moe_layers(cfg) == (1,)
  toks = tokens()
  got = np.asarray(forward(cfg, params, jnp.asarray(toks)))
  np.testing.assert_allclose(got, hf_logits(model, toks), atol=1e-4, rtol=0)


def test_moe_impl_is_a_compute_option_kept_from_base(pair):
  """A model's architecture comes from its source and the compute options from `base`:
  model.moe_impl among them, from an HF directory and from a jaxtune run (whose saved
  config used to override it, so --set=model.moe_impl=... did nothing when a run was
  resumed, evaluated or sampled from)."""
  _, _, d, cfg, _ = pair
  base = dataclasses.replace(config_lib.ModelConfig(), moe_impl="blocked", logits_chunk=8)
  got = weights.load(d, base=base).model_cfg
  assert (got.moe_impl, got.logits_chunk, got.num_experts) == ("blocked", 8, cfg.num_experts)
  saved = dataclasses.replace(cfg, moe_impl="ragged")  # what a run's checkpoint records
  got = weights.with_compute_options(saved, base)
  assert (got.moe_impl, got.logits_chunk, got.num_experts) == ("blocked", 8, cfg.num_experts)


def test_experts_are_a_grouped_matmul(pair):
  """Two ragged_dots per MoE layer over the N*k sorted rows; no [N, E, F] all-experts product."""
  _, _, _, cfg, params = pair
  text = str(jax.make_jaxpr(lambda p, t: jaxtune.forward(cfg, p, t))(params,
                                                                     jnp.asarray(tokens())))
  assert len(re.findall(r"= ragged_dot\w*\[", text)) == 2 * (1 if cfg.scan_layers and not moe.is_mixed(cfg)
                                          else len(moe.moe_layers(cfg)))
  n, e, f = 2 * 13, cfg.num_experts, moe.expert_width(cfg)
  assert f"f32[{n},{e},{2 * f}]" not in text and f"f32[{e},{n},{2 * f}]" not in text


def test_hf_round_trip_is_bit_identical_and_reloads(pair, tmp_path):
  """HF (per-expert tensors, as transformers 5 writes them) -> jaxtune -> HF: same tensors,
  same names, and transformers reloads the export with the same logits."""
  _, model, src, cfg, params = pair
  hf_io.save_hf(cfg, params, str(tmp_path))
  a = safetensors.numpy.load_file(os.path.join(src, "model.safetensors"))
  b = {}
  for f in os.listdir(tmp_path):
    if f.endswith(".safetensors"):
      b.update(safetensors.numpy.load_file(os.path.join(tmp_path, f)))
  assert set(a) == set(b)
  assert any(".experts.4." in k for k in a)  # one tensor per expert on disk
  for k in a:
    assert a[k].dtype == b[k].dtype and np.array_equal(a[k], b[k]), k
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path)).eval()
  toks = tokens(seed=1)
  np.testing.assert_array_equal(hf_logits(reloaded, toks), hf_logits(model, toks))
  assert json.load(open(tmp_path / "config.json"))["model_type"] == model.config.model_type


def _router_io(model, toks):
  """[(router input [N, D], HF (logits, top-k weights, top-k experts))] per MoE layer."""
  seen = []
  hooks = [m.register_forward_hook(lambda _m, i, o: seen.append((i[0], o)))
           for n, m in model.named_modules() if n.endswith("mlp.gate")]
  hf_logits(model, toks)
  for h in hooks:
    h.remove()
  return seen


def test_router_choices_equal_transformers(pair):
  _, model, _, cfg, params = pair
  toks = tokens(b=3, t=17, seed=2)
  seen = _router_io(model, toks)
  assert len(seen) == len(moe.moe_layers(cfg))
  for j, (x, (_, weights, experts)) in enumerate(seen):
    router = params["layers"]["mlp"]["gate"]["kernel"][j]
    _, w, idx = moe.route(cfg, jnp.asarray(x.numpy()), router)
    np.testing.assert_array_equal(np.asarray(idx), experts.numpy())
    np.testing.assert_allclose(np.asarray(w), weights.float().numpy(), atol=1e-6)


def _right_padded(b=3, t=15, seed=3):
  toks = tokens(b, t, seed)
  lengths = np.array([t, t - 4, t - 9])[:b]
  mask = (np.arange(t)[None] < lengths[:, None]).astype(np.int32)
  return toks * mask, mask


def test_aux_loss_and_objective_equal_transformers(pair):
  """moe_aux_loss = load_balancing_loss_func over non-padding tokens; the SFT objective is
  CE + router_aux_loss_coef * aux, as transformers' loss with output_router_logits."""
  _, model, _, cfg, params = pair
  toks, mask = _right_padded()
  labels = np.where(mask > 0, toks, -100)
  with torch.no_grad():
    out = model(input_ids=torch.as_tensor(toks, dtype=torch.long),
                attention_mask=torch.as_tensor(mask), labels=torch.as_tensor(labels, dtype=torch.long),
                output_router_logits=True)
  assert cfg.router_aux_loss_coef == pytest.approx(0.02)
  _, aux = decoder.hidden_states(cfg, params, jnp.asarray(toks),
                                 segment_ids=jnp.asarray(mask), return_aux=True)
  np.testing.assert_allclose(float(aux["moe_aux_loss"]), float(out.aux_loss), rtol=1e-5)
  batch = {"tokens": jnp.asarray(toks), "segment_ids": jnp.asarray(mask),
           "targets": jnp.asarray(np.roll(toks, -1, axis=1)),
           "loss_mask": jnp.asarray(np.concatenate([mask[:, 1:], 0 * mask[:, :1]], axis=1))}
  objective = jax.jit(sft.make_objective(cfg))
  total, (n, metrics) = objective(params, {}, batch, None)
  np.testing.assert_allclose(float(total / n), float(out.loss), rtol=1e-5)
  num, den = metrics["moe_aux_loss"]
  np.testing.assert_allclose(float(num / den), float(out.aux_loss), rtol=1e-5)


@pytest.mark.parametrize("pair", ["mixtral", "qwen3_moe_mixed"], indirect=True)
@pytest.mark.parametrize("method", ["dpo", "reward", "distill", "grpo"])
def test_every_objective_adds_the_aux_loss(pair, method):
  """DPO, reward, distillation and GRPO objectives, like SFT's: the logged moe_aux_loss is
  transformers' load_balancing_loss_func over the same rows (padding excluded), and the
  objective's sum grows by router_aux_loss_coef * aux * its weight (pairs, tokens)."""
  import dataclasses
  from jaxtune import config as config_lib
  from jaxtune.methods import distill, dpo, grpo, reward
  _, model, _, cfg, params = pair
  t = 15
  toks = tokens(4, t, seed=5)
  lengths = np.array([t, t - 3, t - 6, t - 2])
  mask = (np.arange(t)[None] < lengths[:, None]).astype(np.int32)
  toks = toks * mask
  loss_mask = np.concatenate([mask[:, 1:], 0 * mask[:, :1]], axis=1).astype(np.float32)
  rows = {"tokens": toks, "segment_ids": mask, "targets": np.roll(toks, -1, axis=1),
          "loss_mask": loss_mask}
  with torch.no_grad():
    want = float(model(input_ids=torch.as_tensor(toks, dtype=torch.long),
                       attention_mask=torch.as_tensor(mask), output_router_logits=True).aux_loss)

  def build(c):
    if method in ("dpo", "reward"):  # rows 2b / 2b+1 = chosen / rejected of pair b
      batch = {k: jnp.asarray(v.reshape(2, 2, t)) for k, v in rows.items()}
      if method == "dpo":
        return dpo.make_objective(c, config_lib.DpoConfig(), "none"), params, {}, batch
      trainable = dict(params, **{reward.HEAD: reward.init_head(c, jax.random.PRNGKey(0),
                                                                std=0.1)})
      return (reward.make_objective(c, config_lib.RewardConfig(), pad_id=0), trainable, {},
              batch)
    batch = {k: jnp.asarray(v) for k, v in rows.items()}
    if method == "distill":
      return (distill.make_objective(c, c, config_lib.DistillConfig(), vocab=c.vocab_size),
              params, {distill.TEACHER: params}, batch)
    batch = dict(batch, advantages=jnp.asarray([[1.0], [-0.5], [0.25], [-1.0]]),
                 sampler_logps=jnp.zeros((4, t), jnp.float32))
    return grpo.make_objective(c, config_lib.GrpoConfig()), params, {}, batch

  fn, trainable, frozen, batch = build(cfg)
  total, (weight, metrics) = jax.jit(fn)(trainable, frozen, batch, None)
  num, den = metrics["moe_aux_loss"]
  np.testing.assert_allclose(float(num / den), want, rtol=1e-5)
  fn0, trainable, frozen, batch = build(dataclasses.replace(cfg, router_aux_loss_coef=0.0))
  total0, (weight0, metrics0) = jax.jit(fn0)(trainable, frozen, batch, None)
  assert float(weight) == float(weight0) > 0
  np.testing.assert_allclose(float(total - total0), cfg.router_aux_loss_coef * want *
                             float(weight), rtol=1e-4)


@pytest.mark.parametrize("pair", ["qwen3_moe", "qwen3_moe_mixed"], indirect=True)
def test_greedy_generation_equals_transformers(pair):
  """MoE decode in the sampler: the KV-cache path routes one token at a time."""
  _, model, _, cfg, params = pair
  prompts = [[5, 17, 33, 9], [44, 8, 91, 23, 7, 61, 12]]
  gen = jaxtune.generate(cfg, params, prompts, max_new_tokens=6, temperature=0.0)
  for p, got in zip(prompts, gen.tokens):
    with torch.no_grad():
      ref = model.generate(torch.as_tensor([p]), max_new_tokens=6, do_sample=False,
                           eos_token_id=None, pad_token_id=0)
    assert list(got) == ref[0, len(p):].tolist()


def _random_b(adapters, seed=0):
  """Non-zero B factors (B = 0 at init would make every adapter comparison trivial)."""
  leaves, treedef = jax.tree_util.tree_flatten(adapters.params)
  keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
  return jax.tree_util.tree_unflatten(
      treedef, [x + 0.05 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])


ATTN_AND_EXPERTS = r"layers/self_attn/(q|v)_proj/kernel|layers/mlp/experts/\w+/kernel"


@pytest.mark.parametrize("pair", ["mixtral", "qwen3_moe_mixed"], indirect=True)
def test_expert_lora_round_trips_through_peft(pair, tmp_path):
  """LoRA on attention and experts -> PEFT dir (target_parameters) -> peft gives the same
  logits; jaxtune reads it back exactly; merged export reloads in transformers."""
  name, model, src, cfg, params = pair
  adapters = lora.init(cfg, params, rank=3, alpha=6.0, targets=ATTN_AND_EXPERTS,
                       key=jax.random.PRNGKey(1))
  adapters = adapters.__class__(**{**adapters.__dict__, "params": _random_b(adapters)})
  toks = tokens(seed=4)
  got = np.asarray(forward(cfg, params, jnp.asarray(toks), lora=adapters))
  assert np.abs(got - np.asarray(forward(cfg, params, jnp.asarray(toks)))).max() > 1e-3
  lora.save_peft(cfg, adapters, str(tmp_path / "ad"))
  pc = json.load(open(tmp_path / "ad" / "adapter_config.json"))
  assert pc["target_parameters"] == ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
  pm = peft.PeftModel.from_pretrained(make(name), str(tmp_path / "ad")).eval()
  np.testing.assert_allclose(hf_logits(pm, toks), got, atol=1e-4, rtol=0)
  back = lora.load_peft(cfg, str(tmp_path / "ad"))
  for x, y in zip(jax.tree_util.tree_leaves(adapters.params),
                  jax.tree_util.tree_leaves(back.params)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  hf_io.save_hf(cfg, lora.merge(cfg, params, adapters), str(tmp_path / "merged"))
  merged = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged")).eval()
  np.testing.assert_allclose(hf_logits(merged, toks), got, atol=1e-4, rtol=0)


@pytest.mark.parametrize("pair", ["qwen3_moe"], indirect=True)
def test_peft_made_expert_adapter_loads(pair, tmp_path):
  """An adapter peft itself creates (target_modules + target_parameters) loads in jaxtune
  with peft's logits."""
  name, model, _, cfg, params = pair
  pm = peft.get_peft_model(make(name), peft.LoraConfig(
      r=4, lora_alpha=8, target_modules=["k_proj", "o_proj"], init_lora_weights=False,
      target_parameters=["mlp.experts.down_proj", "mlp.experts.gate_up_proj"])).eval()
  pm.save_pretrained(str(tmp_path))
  adapters = lora.load_peft(cfg, str(tmp_path))
  toks = tokens(seed=5)
  got = np.asarray(forward(cfg, params, jnp.asarray(toks), lora=adapters))
  np.testing.assert_allclose(got, hf_logits(pm, toks), atol=1e-4, rtol=0)


@pytest.mark.parametrize("pair", ["mixtral"], indirect=True)
def test_qlora_experts_equal_their_dequantized_base(pair):
  """4-bit experts (QLoRA's base; routers stay full precision) run in the grouped matmul and
  give the logits of the dequantized dense model, with expert LoRA on top."""
  _, _, _, cfg, params = pair
  from jaxtune.peft import qlora
  q = qlora.quantize_params(params, group_size=8)
  gu = q["layers"]["mlp"]["experts"]["gate_up_proj"]["kernel"]
  assert isinstance(gu, quant.QArray)
  assert not isinstance(q["layers"]["mlp"]["gate"]["kernel"], quant.QArray)
  adapters = lora.init(cfg, q, rank=2, alpha=4.0, targets=ATTN_AND_EXPERTS,
                       key=jax.random.PRNGKey(2))
  adapters = adapters.__class__(**{**adapters.__dict__, "params": _random_b(adapters, 3)})
  toks = jnp.asarray(tokens(seed=6))
  got = forward(cfg, q, toks, lora=adapters)
  ref = forward(cfg, quant.dequantize_tree(q), toks, lora=adapters)
  np.testing.assert_allclose(np.asarray(got), np.asarray(ref), atol=1e-5, rtol=0)


_MESH_SCRIPT = textwrap.dedent("""
  import json, sys
  import jax, jax.numpy as jnp, numpy as np
  from jaxtune import config, sharding, tree
  from jaxtune.methods import sft
  from jaxtune.models import decoder
  cfg = config.ModelConfig(family="qwen3_moe", vocab_size=96, hidden_size=32,
      intermediate_size=48, moe_intermediate_size=16, num_layers=2, num_heads=2,
      num_kv_heads=2, head_dim=16, qk_norm=True, tie_word_embeddings=False, num_experts=8,
      num_experts_per_tok=2, norm_topk_prob=True, router_aux_loss_coef=0.1)
  params = decoder.init(cfg, jax.random.PRNGKey(0))
  rng = np.random.RandomState(0)
  toks = rng.randint(0, 96, (8, 16)).astype(np.int32)
  seg = np.ones_like(toks); seg[1, 11:] = 0; seg[5, 7:] = 0
  batch = {"tokens": toks, "targets": np.roll(toks, -1, 1), "segment_ids": seg,
           "loss_mask": seg.astype(np.float32)}
  def loss_fn(mesh):
    obj = sft.make_objective(cfg, constrain=sharding.constrainer(mesh))
    return lambda p, b: obj(p, {}, b, None)[0] / jnp.sum(b["loss_mask"])
  one = jax.jit(jax.value_and_grad(loss_fn(None)))(params, batch)
  mesh = sharding.make_mesh(config.MeshConfig(data=1, fsdp=2, tensor=1, expert=4))
  sh = sharding.tree_shardings(mesh, decoder.axes(cfg), params)
  p8 = jax.device_put(params, sh)
  b8 = jax.device_put(batch, sharding.batch_sharding(mesh))
  eight = jax.jit(jax.value_and_grad(loss_fn(mesh)))(p8, b8)
  g1, g8 = tree.flatten(one[1]), tree.flatten(eight[1])
  gu = p8["layers"]["mlp"]["experts"]["gate_up_proj"]["kernel"]
  print(json.dumps({"loss1": float(one[0]), "loss8": float(eight[0]),
                    "grad_err": max(float(jnp.max(jnp.abs(g1[k] - g8[k]))) for k in g1),
                    "grad_max": max(float(jnp.max(jnp.abs(g1[k]))) for k in g1),
                    "expert_spec": str(gu.sharding.spec),
                    "shard_shape": list(gu.addressable_shards[0].data.shape)}))
""")


def test_expert_mesh_gives_single_device_loss_and_grads(tmp_path):
  """8 simulated devices, mesh fsdp=2 x expert=4: same loss and grads (aux loss included) as
  one device, with the experts split 4 ways over the expert axis and 2 over fsdp."""
  script = tmp_path / "mesh.py"
  script.write_text(_MESH_SCRIPT)
  out = subprocess.run([sys.executable, str(script)], env=launch_utils.env(devices=8),
                       capture_output=True, text=True, timeout=600, cwd=os.getcwd())
  assert out.returncode == 0, out.stderr[-3000:]
  r = json.loads(out.stdout.strip().splitlines()[-1])
  assert r["loss1"] == pytest.approx(r["loss8"], rel=1e-5)
  assert r["grad_err"] <= 1e-5 * r["grad_max"]
  assert "expert" in r["expert_spec"] and r["shard_shape"] == [2, 2, 16, 32]


def test_moe_flops_count_the_active_experts():
  """4N / 6N FLOPs with N = attention + router + k experts per MoE layer, by hand for
  Qwen3-30B-A3B's shape: ~3.3B active params (its name's 'A3B')."""
  from jaxtune.train import flops
  from launch import bench_families
  cfg = bench_families.model_cfg(dict(workload="qwen3moe_30b_lora", smoke=False, layers=0,
                                      model={}))
  d, layers = 2048, 48
  attn = d * 32 * 128 * 2 + d * 4 * 128 * 2
  experts = 8 * 3 * d * 768 + d * 128
  want = layers * (attn + experts) + d * 151936
  assert flops.matmul_params(cfg) == want
  assert 3.0e9 < want < 3.6e9


@pytest.mark.slow
def test_bench_families_smoke_moe(tmp_path):
  """launch/bench_families.py --smoke for the MoE workload: both sides run the same tiny
  Qwen3-MoE config.json and the table and JSON say so. Random init predicts ~uniformly, so
  both first losses sit near ln(vocab) = ln(512)."""
  launch_utils.run("bench_families.py", "--smoke", "--workloads=qwen3moe_30b_lora",
                   f"--out_dir={tmp_path}", timeout=900)
  rows = json.load(open(tmp_path / "bench_families.json"))["results"]
  assert [(r["framework"], r["status"]) for r in rows] == [("torch", "ok")] + [("jaxtune", "ok")] * 2
  assert [r["model"]["moe_impl"] for r in rows[1:]] == ["ragged", "blocked"]
  for r in rows:
    assert r["tokens_per_s"] > 0 and abs(r["losses"][0] - np.log(512)) < 1.0
  assert rows[1]["losses"] == pytest.approx(rows[2]["losses"], rel=1e-2)  # same model, bf16
  assert "moe_aux_loss" in rows[1]
  text = (tmp_path / "bench_families.txt").read_text()
  assert "qwen3moe_30b_lora" in text and "experts=" in text and "x" in text.splitlines()[-1]


def test_blocked_grouped_matmul_equals_a_loop_over_experts():
  """moe.grouped_blocks (and ragged_dot) against numpy, expert by expert: groups of 0, 1,
  block-straddling and multi-block sizes, values and gradients."""
  rng = np.random.RandomState(0)
  sizes = np.array([5, 0, 1, 9, 0, 3], np.int32)
  x = rng.randn(sizes.sum(), 7).astype(np.float32)
  w = rng.randn(len(sizes), 7, 6).astype(np.float32)
  ref = np.concatenate([x[s:s + n] @ w[e] for e, (s, n) in
                        enumerate(zip(np.cumsum(sizes) - sizes, sizes)) if n])
  gs = jnp.asarray(sizes)
  blocked = moe.grouped_blocks(jnp.asarray(x), jnp.asarray(w), gs, block=4)
  np.testing.assert_allclose(np.asarray(blocked), ref, atol=1e-5)
  np.testing.assert_allclose(np.asarray(jax.lax.ragged_dot(x, w, gs)), ref, atol=1e-5)
  ct = rng.randn(*ref.shape).astype(np.float32)  # d<ct, x W_e>/dW_e = x_e^T ct_e
  gw = jax.grad(lambda w: jnp.sum(moe.grouped_blocks(jnp.asarray(x), w, gs, block=4) * ct))(
      jnp.asarray(w))
  want = np.stack([x[s:s + n].T @ ct[s:s + n] for s, n in zip(np.cumsum(sizes) - sizes, sizes)])
  np.testing.assert_allclose(np.asarray(gw), want, atol=1e-4)


@pytest.mark.parametrize("pair", ["qwen3_moe_mixed"], indirect=True)
def test_blocked_experts_match_transformers(pair):
  """model.moe_impl=blocked gives transformers' logits too, with expert LoRA applied."""
  import dataclasses
  _, model, _, cfg, params = pair
  bcfg = dataclasses.replace(cfg, moe_impl="blocked")
  toks = tokens(seed=7)
  np.testing.assert_allclose(np.asarray(forward(bcfg, params, jnp.asarray(toks))),
                             hf_logits(model, toks), atol=1e-4, rtol=0)
  adapters = lora.init(cfg, params, rank=2, alpha=4.0, targets=ATTN_AND_EXPERTS,
                       key=jax.random.PRNGKey(3))
  adapters = adapters.__class__(**{**adapters.__dict__, "params": _random_b(adapters, 4)})
  np.testing.assert_allclose(np.asarray(forward(bcfg, params, jnp.asarray(toks), lora=adapters)),
                             np.asarray(forward(cfg, params, jnp.asarray(toks), lora=adapters)),
                             atol=1e-5, rtol=0)
