"""The generic checks of a TrainConfig: allowed values and numeric ranges, one line each.

`config.validate(cfg)` (run by every `--set` override and by `methods.check`) raises a
ConfigError naming the first bad key and what was expected:

    bad value for data.eval_fraction: 1.5 (expected 0 <= x < 1: the held-out share of records)
    bad value for data.truncation: 'cut' (expected one of auto, split, error, ...)

Options whose values a registry or a method owns (`method`, `model.family`, `peft.method`,
the method sections) are checked by `jaxtune.methods.check`, not here.
"""

from __future__ import annotations

from jaxtune import config_tree

# Options whose values no registry owns. `method`, `model.family`, `peft.method` and the
# method sections are checked by their registries / modules (jaxtune.methods.check).
_CHOICES = {
    "model.dtype": ("float32", "bfloat16", "float16"),
    "model.param_dtype": ("float32", "bfloat16", "float16"),
    "model.remat": ("none", "full", "dots", "dots_no_batch", "offload", "auto"),
    "model.attention": ("auto", "xla", "cudnn", "pallas", "splash"),
    "model.rope_scaling.kind": ("none", "llama3", "linear", "longrope"),
    "model.hidden_act": ("silu", "gelu_pytorch_tanh"),
    "model.moe_impl": ("auto", "ragged", "blocked", "mgpu"),
    "model.logits_dtype": ("float32", "compute"),
    "peft.quant_method": ("nf4", "int4"),
    "optim.schedule": ("cosine", "linear", "constant"),
    "data.format": ("auto", "text", "chat", "instruction", "prompt_completion", "preference",
                    "prompt"),
    "data.loss_policy": ("auto", "assistant", "last_assistant", "all", "completion"),
    "data.truncation": ("auto", "split", "error", "truncate_right", "truncate_left", "drop"),
    "data.chat_render": ("auto", "full", "turns"),
    "data.on_bad_record": ("error", "skip"),
    "eval.kl_to_base": ("auto", "on", "off"),
}


# Numeric ranges: key -> (predicate, what the message says is expected).
_RANGES = {
    "optim.lr": (lambda x: x >= 0, ">= 0"),
    "optim.warmup_steps": (lambda x: x >= 0, ">= 0"),
    "optim.end_lr_ratio": (lambda x: 0 <= x <= 1, "0 <= x <= 1"),
    "optim.weight_decay": (lambda x: x >= 0, ">= 0"),
    "optim.b1": (lambda x: 0 <= x < 1, "0 <= x < 1"),
    "optim.b2": (lambda x: 0 <= x < 1, "0 <= x < 1"),
    "optim.eps": (lambda x: x > 0, "> 0"),
    "optim.clip_norm": (lambda x: x >= 0, ">= 0 (0 disables clipping)"),
    "data.eval_fraction": (lambda x: 0 <= x < 1, "0 <= x < 1: the held-out share of records"),
    "data.stride": (lambda x: x >= 0, ">= 0"),
    "data.workers": (lambda x: x >= 0, ">= 0 (0 = tokenize in the training process)"),
    "train.epochs": (lambda x: x >= 0, ">= 0 (0 = train.max_steps decides the length)"),
    "data.seq_len": (lambda x: x >= 2, ">= 2"),
    "peft.dropout": (lambda x: 0 <= x < 1, "0 <= x < 1"),
    "peft.alpha": (lambda x: x > 0, "> 0"),
    "train.eval_every": (lambda x: x >= 0, ">= 0 (0 disables evaluation)"),
    "train.eval_batches": (lambda x: x >= 0, ">= 0 (0 = every eval batch)"),
    "train.early_stopping_patience": (lambda x: x >= 0, ">= 0 (0 disables it)"),
    "eval.retention_examples": (lambda x: x >= 0, ">= 0 (0 = every retention record)"),
    "eval.forgetting_tolerance": (lambda x: x >= 0, ">= 0 (a fraction of the step-0 value)"),
    "eval.overfit_evals": (lambda x: x >= 0, ">= 0 (0 disables the warning)"),
    "eval.generate_every": (lambda x: x >= 0, ">= 0 (0 = never)"),
    "eval.generate_examples": (lambda x: x >= 1, ">= 1"),
    "eval.max_new_tokens": (lambda x: x >= 1, ">= 1"),
    "eval.final_examples": (lambda x: x >= 0, ">= 0 (0 = every held-out record)"),
    "mesh.data": (lambda x: x == -1 or x >= 1, "-1 (all remaining devices) or >= 1"),
    "mesh.fsdp": (lambda x: x == -1 or x >= 1, "-1 (all remaining devices) or >= 1"),
    "mesh.tensor": (lambda x: x == -1 or x >= 1, "-1 (all remaining devices) or >= 1"),
    "mesh.expert": (lambda x: x == -1 or x >= 1, "-1 (all remaining devices) or >= 1"),
    "model.num_experts": (lambda x: x >= 0, ">= 0 (0 = dense MLP)"),
    "model.num_experts_per_tok": (lambda x: x >= 1, ">= 1"),
    "model.router_aux_loss_coef": (lambda x: x == -1 or x >= 0,
                                   "-1 (config.json's) or >= 0"),
}


def _error(key: str, value, expected: str) -> config_tree.ConfigError:
  return config_tree.ConfigError(f"bad value for {key}: {value!r} (expected {expected})")


def check_choice(key: str, value, choices) -> None:
  """Raises the one-line ConfigError naming `key` unless `value` is one of `choices`."""
  if value not in choices:
    raise _error(key, value, f"one of {', '.join(map(str, choices))}")


def validate(cfg) -> None:
  """Raises ConfigError naming the first key whose value is out of range.

  Generic settings only; `jaxtune.methods.check(cfg)` adds the method, family and PEFT
  checks owned by their modules."""
  for key, choices in _CHOICES.items():
    check_choice(key, config_tree.get_path(cfg, key), choices)
  positive = ["train.max_steps", "data.seq_len", "data.batch_size", "optim.grad_accum",
              "checkpoint.every_steps", "checkpoint.keep", "train.log_every", "peft.rank"]
  for key in positive:
    if config_tree.get_path(cfg, key) <= 0:
      raise _error(key, config_tree.get_path(cfg, key), "> 0")
  if cfg.data.batch_size % cfg.optim.grad_accum:
    raise config_tree.ConfigError(
        f"bad value for optim.grad_accum: {cfg.optim.grad_accum} does not divide "
        f"data.batch_size={cfg.data.batch_size}")
  for key, (ok, expected) in _RANGES.items():
    if not ok(config_tree.get_path(cfg, key)):
      raise _error(key, config_tree.get_path(cfg, key), expected)
  if cfg.data.stride > cfg.data.seq_len:
    raise _error("data.stride", cfg.data.stride, f"0 <= stride <= data.seq_len="
                 f"{cfg.data.seq_len}")
  _check_micro_batch(cfg)


def _check_micro_batch(cfg) -> None:
  """train.micro_batch ("", auto or N dividing data.batch_size) and the planner's limits."""
  mb, batch = cfg.train.micro_batch, cfg.data.batch_size
  if mb not in ("", "auto") and not (mb.isdigit() and int(mb) > 0 and batch % int(mb) == 0):
    raise _error("train.micro_batch", mb, f"'', auto or a number of rows dividing "
                 f"data.batch_size={batch}")
  if cfg.train.device_memory_gib < 0:
    raise _error("train.device_memory_gib", cfg.train.device_memory_gib,
                 ">= 0 (0 = the device's own limit)")
  if not 0 <= cfg.train.memory_margin < 1:
    raise _error("train.memory_margin", cfg.train.memory_margin, "0 <= x < 1")
