"""Model FLOPs per token and MFU, shared by the train loop's metrics and launch/bench.py.

Training FLOPs per token (Kaplan et al. 2020; PaLM appendix B), N = non-embedding matmul
params plus the output projection, T = sequence length:
  full fine-tuning: 6N + attention          (forward 2N, backward 4N: input + weight grads)
  LoRA / QLoRA:     4N + attention          (no weight-gradient matmuls for frozen weights;
                                             the adapters' own FLOPs are negligible, r << D)
  attention (causal, per token): forward 2 * 2 * L * T * H * Dh / 2 (QK^T and PV, half the
  pairs under the causal mask), times 3 with the backward -> 6 * L * T * H * Dh.
Remat recomputation is not counted (model FLOPs, not hardware FLOPs).
"""

from __future__ import annotations

import jax

from jaxtune import config as config_lib
from jaxtune.models import moe

# Dense bf16 peak FLOP/s per device, by jax device_kind substring.
PEAK_FLOPS = {
    "H200": 989e12, "H100": 989e12, "A100": 312e12, "L4": 121e12, "A10": 125e12,
    "TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5p": 459e12,
    "TPU v5": 459e12, "TPU v6": 918e12, "TPU7x": 2307e12,
}


def matmul_params(cfg: config_lib.ModelConfig) -> int:
  """Params that take part in matmuls per token: all layer kernels + the output projection
  (MoE: the router and the k experts a token is sent to, `moe.mlp_matmul_params`)."""
  d = cfg.hidden_size
  per_layer = d * cfg.q_size * 2 + d * cfg.kv_size * 2
  return cfg.num_layers * per_layer + moe.mlp_matmul_params(cfg) + d * cfg.vocab_size


def attention_flops_per_token(cfg: config_lib.ModelConfig, seq_len: int) -> float:
  """Causal attention score + value FLOPs per token, forward and backward."""
  return 6.0 * cfg.num_layers * seq_len * cfg.num_heads * cfg.head_dim


def train_flops_per_token(cfg: config_lib.ModelConfig, seq_len: int, *, peft: bool) -> float:
  n = matmul_params(cfg)
  return (4.0 if peft else 6.0) * n + attention_flops_per_token(cfg, seq_len)


def peak_flops(device=None) -> float | None:
  """The device's dense bf16 peak, or None when unknown (CPU)."""
  kind = (device or jax.devices()[0]).device_kind
  for key, val in PEAK_FLOPS.items():
    if key.lower() in kind.lower():
      return val
  return None
