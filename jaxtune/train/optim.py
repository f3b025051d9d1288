"""The optimizer: AdamW with warmup + cosine/linear decay and global-norm clipping.

Weight decay applies to matrices only: never to norms' scales, biases, or (by path) anything
ending in `scale` or `bias`. The mask is built from param paths, the public contract:

    decay_mask({"norm": {"scale": s}, "mlp": {"up_proj": {"kernel": k}}})
    -> {"norm": {"scale": False}, "mlp": {"up_proj": {"kernel": True}}}
"""

from __future__ import annotations

import optax

from jaxtune import config as config_lib
from jaxtune import tree


def schedule(cfg: config_lib.OptimConfig, total_steps: int) -> optax.Schedule:
  """Linear warmup from 0 to lr, then cosine / linear decay to lr * end_lr_ratio."""
  warmup = min(cfg.warmup_steps, max(total_steps - 1, 0))
  decay_steps = max(total_steps - warmup, 1)
  end = cfg.lr * cfg.end_lr_ratio
  if cfg.schedule == "constant":
    after = optax.constant_schedule(cfg.lr)
  elif cfg.schedule == "linear":
    after = optax.linear_schedule(cfg.lr, end, decay_steps)
  else:
    after = optax.cosine_decay_schedule(cfg.lr, decay_steps, alpha=cfg.end_lr_ratio)
  if warmup == 0:
    return after
  return optax.join_schedules([optax.linear_schedule(0.0, cfg.lr, warmup), after], [warmup])


def decay_mask(params) -> dict:
  return tree.map_with_path(
      lambda p, x: not p.endswith(("scale", "bias")) and getattr(x, "ndim", 2) >= 2, params)


def finite_updates(cfg: config_lib.OptimConfig) -> bool:
  """True when `make(cfg)`'s update is finite whenever the gradients are: AdamW divides by
  sqrt(nu) + eps, so only eps = 0 can give 0 / 0 (a parameter whose gradient has always
  been 0). The train step's non-finite guard then needs no update norm (`train/step.py`)."""
  return cfg.eps > 0


def make(cfg: config_lib.OptimConfig, total_steps: int) -> optax.GradientTransformation:
  parts = []
  if cfg.clip_norm > 0:
    parts.append(optax.clip_by_global_norm(cfg.clip_norm))
  parts.append(optax.adamw(schedule(cfg, total_steps), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                           weight_decay=cfg.weight_decay, mask=decay_mask))
  return optax.chain(*parts)
