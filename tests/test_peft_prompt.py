"""Prompt tuning: PEFT parity both ways (logits of the real tokens), its inits, packed rows
equal the same examples alone, training moves only the prompt, sharding.

References: `peft`'s PromptTuning model on the `transformers` base (its logits after the N
virtual rows), peft's own TEXT / SAMPLE_VOCAB init, each example run on its own.
"""

import dataclasses
import json
import os
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import safetensors.numpy
import transformers

import jaxtune
from jaxtune import config as config_lib
from jaxtune import sharding
from jaxtune.models import decoder
from jaxtune.peft import prompt
from tests import hf_models
from tests import peft_utils

N = 4
PC = config_lib.PeftConfig(method="prompt_tuning", num_virtual_tokens=N)
TOKENIZER = str(pathlib.Path(jaxtune.__file__).parent / "assets" / "tokenizer")


_tokens = hf_models.tokens


@pytest.fixture(scope="module", params=["llama2", "qwen3", "mistral_window"])
def hf_dir(request, tmp_path_factory):
  return request.param, hf_models.saved(request.param, tmp_path_factory)


_hf_model = hf_models.load


def test_peft_made_prompt_loads_with_same_logits(hf_dir, tmp_path):
  family, d = hf_dir
  model = peft.get_peft_model(_hf_model(d), peft.PromptTuningConfig(
      task_type="CAUSAL_LM", num_virtual_tokens=N)).eval()  # RANDOM init: N(0, 1)
  model.save_pretrained(tmp_path / "p")
  cfg, params = jaxtune.load_hf(d)
  ad = jaxtune.peft.load_peft(cfg, str(tmp_path / "p"))
  assert isinstance(ad, prompt.PromptAdapters) and ad.num_virtual_tokens == N
  tokens = _tokens(1)
  ref = hf_models.logits(model, tokens)  # [B, N + T, V]
  assert ref.shape == (2, N + 13, 101)
  ours = np.asarray(decoder.forward(cfg, params, tokens, lora=ad))  # [B, T, V]
  diff = np.abs(ours - ref[:, N:]).max()
  print(f"{family} peft-made prompt tuning: max abs diff {diff:.2e}")
  assert diff < 1e-4 and np.abs(ours - np.asarray(decoder.forward(cfg, params, tokens))).max() > .1
  prompt.save_peft(cfg, ad, str(tmp_path / "j"))
  theirs = safetensors.numpy.load_file(tmp_path / "p" / "adapter_model.safetensors")
  again = safetensors.numpy.load_file(tmp_path / "j" / "adapter_model.safetensors")
  assert sorted(theirs) == sorted(again) == ["prompt_embeddings"]
  np.testing.assert_array_equal(theirs["prompt_embeddings"], again["prompt_embeddings"])


def test_jaxtune_prompt_loads_in_peft(hf_dir, tmp_path):
  family, d = hf_dir
  cfg, params = jaxtune.load_hf(d)
  ad = prompt.init(cfg, params, dataclasses.replace(PC, prompt_init="sample_vocab"),
                   key=jax.random.key(0))
  ad = dataclasses.replace(ad, params={"prompt_embeddings": ad.params["prompt_embeddings"]
                                       + 0.05 * jax.random.normal(jax.random.key(1), (N, 48))})
  out = jaxtune.peft.save_peft(cfg, ad, str(tmp_path / "a"), base_model_name_or_path=d)
  with open(os.path.join(out, "adapter_config.json")) as f:
    pc = json.load(f)
  assert (pc["peft_type"], pc["num_virtual_tokens"], pc["token_dim"]) == ("PROMPT_TUNING", N, 48)
  model = peft.PeftModel.from_pretrained(_hf_model(d), out).eval()
  tokens = _tokens(2)
  diff = np.abs(np.asarray(decoder.forward(cfg, params, tokens, lora=ad))
                - hf_models.logits(model, tokens)[:, N:]).max()
  print(f"{family} jaxtune prompt tuning in peft: max abs diff {diff:.2e}")
  assert diff < 1e-4


def test_inits_match_peft(tmp_path):
  d = tmp_path / "m"
  hf_models.make("llama2", vocab_size=512).save_pretrained(d, safe_serialization=True)
  cfg, params = jaxtune.load_hf(str(d))
  text = "Classify the sentiment:"
  ids = transformers.AutoTokenizer.from_pretrained(TOKENIZER)(text)["input_ids"]
  assert 9 < len(ids) < 20  # so the ids are cut (n=9) and repeated (n=20), as PEFT does
  for n in (9, 20):
    model = peft.get_peft_model(_hf_model(str(d)), peft.PromptTuningConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=n, prompt_tuning_init="TEXT",
        prompt_tuning_init_text=text, tokenizer_name_or_path=TOKENIZER))
    theirs = model.prompt_encoder["default"].embedding.weight.detach().numpy()
    pc = dataclasses.replace(PC, num_virtual_tokens=n, prompt_init="text",
                             prompt_init_text=text, prompt_tokenizer=TOKENIZER)
    ours = prompt.METHOD.init(cfg, params, pc, jax.random.key(0))
    np.testing.assert_array_equal(np.asarray(ours.params["prompt_embeddings"]), theirs)
  sv = prompt.init(cfg, params, dataclasses.replace(PC, prompt_init="sample_vocab"),
                   key=jax.random.key(3)).params["prompt_embeddings"]
  table = np.asarray(params["embed_tokens"]["embedding"])
  assert all(np.any(np.all(table == np.asarray(row), axis=1)) for row in sv)
  rnd = np.asarray(prompt.init(cfg, params, dataclasses.replace(PC, num_virtual_tokens=256),
                               key=jax.random.key(4)).params["prompt_embeddings"])
  assert rnd.shape == (256, 48) and abs(rnd.std() - 1.0) < 0.02  # torch Embedding: N(0, 1)
  with pytest.raises(config_lib.ConfigError, match=r"bad value for peft.prompt_init: 'vocab'"):
    prompt.init(cfg, params, dataclasses.replace(PC, prompt_init="vocab"), key=jax.random.key(0))
  with pytest.raises(config_lib.ConfigError, match=r"needs peft.prompt_init_text and "
                                                   r"peft.prompt_tokenizer"):
    prompt.init(cfg, params, dataclasses.replace(PC, prompt_init="text"), key=jax.random.key(0))
  with pytest.raises(ValueError, match=r"prompt_tuning is not mergeable"):
    prompt.METHOD.merge(cfg, params, ours)
  with pytest.raises(ValueError, match=r"already hold 'prefix_embeddings'"):
    ours.apply(ours.apply(params))
  assert prompt.METHOD.axes(cfg, ours).params == {"prompt_embeddings": (None, "embed")}


@pytest.mark.parametrize("family", ["llama2", "mistral_window"])
def test_packed_rows_equal_each_example_alone(family, tmp_path):
  """Two examples packed in one row (positions restart, segment ids 1 and 2, padding 0)
  give each example's own logits: every segment sees the virtual tokens as its prefix."""
  d = tmp_path / family
  hf_models.make(family).save_pretrained(d, safe_serialization=True)
  cfg, params = jaxtune.load_hf(str(d))
  ad = prompt.init(cfg, params, dataclasses.replace(PC, prompt_init="sample_vocab"),
                   key=jax.random.key(5))
  e1, e2 = _tokens(6, b=1, t=7)[0], _tokens(7, b=1, t=9)[0]
  row = np.concatenate([e1, e2, [0, 0]])[None]  # [1, 18]
  seg = np.array([[1] * 7 + [2] * 9 + [0, 0]], np.int32)
  pos = np.array([list(range(7)) + list(range(9)) + [0, 1]], np.int32)
  packed = np.asarray(decoder.forward(cfg, params, row, positions=pos, segment_ids=seg, lora=ad))
  alone1 = np.asarray(decoder.forward(cfg, params, e1[None], lora=ad))
  alone2 = np.asarray(decoder.forward(cfg, params, e2[None], lora=ad))
  diff = max(np.abs(packed[0, :7] - alone1[0]).max(), np.abs(packed[0, 7:16] - alone2[0]).max())
  print(f"{family} packed vs alone: {diff:.2e}")
  assert diff < 1e-5
  # ... and the second segment does see the prompt (without it its logits differ).
  bare2 = np.asarray(decoder.forward(cfg, params, e2[None]))
  assert np.abs(packed[0, 7:16] - bare2[0]).max() > 0.1
  seg1 = np.asarray(decoder.forward(cfg, params, e1[None], segment_ids=np.ones((1, 7), np.int32),
                                    lora=ad))  # an unpacked row with segment ids: same path
  assert np.abs(seg1 - alone1).max() < 1e-5
  # The packed loss (masked, per token) equals the unpacked one.
  def nll(logits, toks):
    lp = jax.nn.log_softmax(logits[:, :-1])
    return -np.asarray(jnp.take_along_axis(lp, toks[:, 1:, None], -1))[..., 0]
  packed_nll = np.concatenate([nll(packed[:, :7], e1[None]), nll(packed[:, 7:16], e2[None])], 1)
  alone_nll = np.concatenate([nll(alone1, e1[None]), nll(alone2, e2[None])], 1)
  assert abs(packed_nll.mean() - alone_nll.mean()) < 1e-5


def test_training_moves_only_the_prompt_and_sharded_matches(tmp_path):
  cfg = config_lib.ModelConfig(vocab_size=512, hidden_size=64, intermediate_size=176,
                               num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16)
  base = decoder.init(cfg, jax.random.key(0))
  ad = prompt.init(cfg, base, dataclasses.replace(PC, prompt_init="sample_vocab"),
                   key=jax.random.key(1))
  tokens = jnp.asarray(_tokens(3, b=8, t=16, v=512))
  seg = jnp.asarray(np.repeat([[1] * 6 + [2] * 8 + [0] * 2], 8, 0).astype(np.int32))
  pos = jnp.asarray(np.repeat([list(range(6)) + list(range(8)) + [0, 1]], 8, 0).astype(np.int32))
  frozen = jax.tree.map(lambda x: np.array(x, copy=True), base)

  def loss_fn(p, base, constrain=None):
    logits = decoder.forward(cfg, base, tokens, positions=pos, segment_ids=seg,
                             lora=dataclasses.replace(ad, params=p), constrain=constrain)
    lp = jax.nn.log_softmax(logits[:, :-1])
    nll = -jnp.take_along_axis(lp, tokens[:, 1:, None], axis=-1)[..., 0]
    m = (seg[:, 1:] == seg[:, :-1]) & (seg[:, 1:] > 0)
    return (nll * m).sum() / m.sum()

  p, losses = peft_utils.adam_steps(loss_fn, ad.params, base, lr=5e-2, steps=5)
  print(f"prompt tuning losses {losses[0]:.4f} -> {losses[-1]:.4f}")
  assert losses[-1] < losses[0] - 0.02
  jax.tree.map(np.testing.assert_array_equal, frozen, jax.tree.map(np.asarray, base))
  assert not np.array_equal(np.asarray(p["prompt_embeddings"]),
                            np.asarray(ad.params["prompt_embeddings"]))
  loss1, g1 = jax.jit(jax.value_and_grad(loss_fn))(p, base)
  mesh = sharding.make_mesh(config_lib.MeshConfig(fsdp=4, tensor=2))
  base_sh = sharding.tree_shardings(mesh, decoder.axes(cfg), base)
  ad_sh = sharding.tree_shardings(mesh, prompt.axes(cfg, ad), ad)
  constrain = sharding.constrainer(mesh)
  fn = jax.jit(jax.value_and_grad(lambda p, b: loss_fn(p, b, constrain)),
               in_shardings=(ad_sh.params, base_sh),
               out_shardings=(sharding.replicated(mesh), ad_sh.params))
  loss8, g8 = fn(jax.device_put(p, ad_sh.params), jax.device_put(base, base_sh))
  gdiff = float(np.abs(np.asarray(g1["prompt_embeddings"])
                       - np.asarray(g8["prompt_embeddings"])).max())
  print(f"prompt 8-device vs 1: loss {abs(float(loss8) - float(loss1)):.2e}, grad {gdiff:.2e}")
  assert abs(float(loss8) - float(loss1)) < 1e-5 and gdiff < 1e-5
  assert ad_sh.params["prompt_embeddings"].spec == jax.sharding.PartitionSpec(None, "fsdp")


def test_load_names_what_it_refuses(tmp_path):
  cfg = config_lib.ModelConfig(vocab_size=512, hidden_size=64, intermediate_size=176,
                               num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16)
  ad = prompt.init(cfg, decoder.init(cfg, jax.random.key(0)), PC, key=jax.random.key(1))
  good = prompt.save_peft(cfg, ad, str(tmp_path / "good"))
  with open(os.path.join(good, "adapter_config.json")) as f:
    pc = json.load(f)
  emb = safetensors.numpy.load_file(os.path.join(good, "adapter_model.safetensors"))

  def write(name, t=emb, c=pc):
    d = tmp_path / name
    d.mkdir()
    safetensors.numpy.save_file(t, str(d / "adapter_model.safetensors"))
    (d / "adapter_config.json").write_text(json.dumps(c))
    return str(d)

  with pytest.raises(ValueError, match=r"token_dim=48 but the model's hidden size is 64"):
    prompt.load_peft(cfg, write("dim", c=dict(pc, token_dim=48)))
  with pytest.raises(ValueError, match=r"prompt_embeddings has shape \[4, 64\], expected "
                                       r"\[5, 64\]"):
    prompt.load_peft(cfg, write("n", c=dict(pc, num_virtual_tokens=5)))
  with pytest.raises(ValueError, match=r"expected exactly the tensor 'prompt_embeddings', got "
                                       r"\['extra', 'prompt_embeddings'\]"):
    prompt.load_peft(cfg, write("extra", t=dict(emb, extra=np.zeros(3, np.float32))))
  with pytest.raises(ValueError, match=r"task_type 'SEQ_2_SEQ_LM' is not supported"):
    prompt.load_peft(cfg, write("s2s", c=dict(pc, task_type="SEQ_2_SEQ_LM")))
