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
}


def make(family: str, seed: int = 0, **overrides):
  cls, extra = FAMILIES[family]
  cfg = cls(**{**COMMON, **extra, **overrides})
  torch.manual_seed(seed)
  model = transformers.AutoModelForCausalLM.from_config(cfg, torch_dtype=torch.float32)
  # Random norms and biases too, so a swapped or missing one cannot go unnoticed.
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith("norm.weight"):
        p.copy_(1.0 + 0.1 * torch.randn_like(p))
      elif name.endswith("bias"):
        p.copy_(0.1 * torch.randn_like(p))
  return model.eval()


def logits(model, tokens, attention_mask=None, position_ids=None):
  with torch.no_grad():
    out = model(input_ids=torch.as_tensor(tokens), attention_mask=attention_mask,
                position_ids=position_ids)
  return out.logits.float().numpy()
