"""Tiny random `transformers` models of every supported family, built in-process (no hub)."""

import torch
import transformers

# Odd sizes on purpose: non-power-of-two widths, GQA, head_dim != hidden / heads for Qwen3.
COMMON = dict(vocab_size=101, hidden_size=48, intermediate_size=72, num_hidden_layers=2,
              num_attention_heads=3, num_key_value_heads=1, max_position_embeddings=256,
              rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2)

WINDOW = 5  # the sliding window of "mistral_window", in tokens

FAMILIES = {
    "llama2": (transformers.LlamaConfig, dict(tie_word_embeddings=False, rope_theta=10000.0)),
    "llama3.2": (transformers.LlamaConfig, dict(
        tie_word_embeddings=True, rope_theta=500000.0,
        rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 64})),
    "mistral": (transformers.MistralConfig, dict(tie_word_embeddings=False, sliding_window=None,
                                                 head_dim=16)),
    # A window shorter than the test sequences, so it changes the logits. Eager attention:
    # the implementation that has applied Mistral's window in every transformers version.
    "mistral_window": (transformers.MistralConfig, dict(
        tie_word_embeddings=False, sliding_window=WINDOW, attn_implementation="eager")),
    "qwen2": (transformers.Qwen2Config, dict(tie_word_embeddings=True)),
    "qwen3": (transformers.Qwen3Config, dict(tie_word_embeddings=False, head_dim=24)),
    # Gemma 2: 3 layers (sliding, full, sliding: a period of 2 plus one), window 5, weights
    # large enough (initializer_range) that both soft-caps bind, a query_pre_attn_scalar
    # other than head_dim. Eager attention: the implementation that applies the soft-cap.
    "gemma2": (transformers.Gemma2Config, dict(
        num_hidden_layers=3, head_dim=24, query_pre_attn_scalar=20, sliding_window=WINDOW,
        initializer_range=0.1,
        attn_logit_softcapping=2.0, final_logit_softcapping=3.0, tie_word_embeddings=True,
        attn_implementation="eager")),
    # Gemma 3 text: layers (s, s, f, s) from sliding_window_pattern=3, local/global rope
    # bases, linear rope scaling on the global layer, untied head.
    "gemma3": (transformers.Gemma3TextConfig, dict(
        num_hidden_layers=4, head_dim=24, query_pre_attn_scalar=24, sliding_window=WINDOW,
        sliding_window_pattern=3, tie_word_embeddings=False, attn_implementation="eager",
        rope_parameters={"full_attention": {"rope_type": "linear", "factor": 2.0,
                                            "rope_theta": 50000.0},
                         "sliding_attention": {"rope_type": "default", "rope_theta": 100.0}})),
    # Phi-3 / Phi-4-mini: fused qkv / gate_up, partial rotary (12 of 16 dims), LongRoPE
    # whose original context (16) the test sequences cross.
    "phi3": (transformers.Phi3Config, dict(
        tie_word_embeddings=False, pad_token_id=0, original_max_position_embeddings=16,
        rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0,
                         "partial_rotary_factor": 0.75,
                         "short_factor": [1.0, 1.3, 1.7, 2.2, 2.9, 3.5],
                         "long_factor": [1.1, 2.0, 3.1, 4.4, 6.0, 8.5]})),
}


def make(family: str, seed: int = 0, **overrides):
  cls, extra = FAMILIES[family]
  # Random biases too, so a swapped or missing one cannot go unnoticed.
  return _random(cls(**{**COMMON, **extra, **overrides}), seed, "bias", 0.1)


def make_moe(config, seed: int = 0):
  """A float32 transformers MoE model of `config`: norms near 1 and a router scaled up so
  that top-k routing is decisive (no near-ties that float noise could flip)."""
  return _random(config, seed, "mlp.gate.weight", 0.5)


def _random(config, seed: int, suffix: str, std: float):
  """A float32 model of `config` in eval mode: norm weights 1 + 0.1 N(0, 1) (so a swapped or
  missing norm shows), and the params ending in `suffix` std * N(0, 1)."""
  torch.manual_seed(seed)
  model = transformers.AutoModelForCausalLM.from_config(config, torch_dtype=torch.float32)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith("norm.weight"):
        p.copy_(1.0 + 0.1 * torch.randn_like(p))
      elif name.endswith(suffix):
        p.copy_(std * torch.randn_like(p))
  return model.eval()


def logits(model, tokens, attention_mask=None, position_ids=None):
  with torch.no_grad():
    out = model(input_ids=torch.as_tensor(tokens), attention_mask=attention_mask,
                position_ids=position_ids)
  return out.logits.float().numpy()


def tokens(seed: int, b: int = 2, t: int = 13, v: int = 101):
  """Uniform random token ids [b, t] int32 below v, reproducible from seed."""
  import numpy as np
  return np.random.RandomState(seed).randint(0, v, size=(b, t)).astype(np.int32)


def saved(family: str, tmp_path_factory) -> str:
  """`make(family)` saved as safetensors in a fresh temporary directory (its path)."""
  d = tmp_path_factory.mktemp(family)
  make(family).save_pretrained(d, safe_serialization=True)
  return str(d)


def load(d: str):
  """The float32 transformers model saved in d, in eval mode."""
  return transformers.AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
