"""Frozen configuration dataclasses and the `key=value` override parser.

Every knob of a run lives in one `TrainConfig` tree of frozen dataclasses. Recipes in
`configs/NAME.py` build one with `get_config(arg)`; the launcher applies `--set=a.b=v`
overrides with `override(cfg, ["optim.lr=1e-5", ...])`. Values are parsed with the type
of the field they replace, so a typo or a bad value is a one-line error naming the key:

    >>> cfg = override(TrainConfig(), ["optim.lr=3e-4", "train.max_steps=10"])
    >>> cfg.optim.lr, cfg.train.max_steps
    (0.0003, 10)
    >>> override(cfg, ["optim.lrr=1"])
    Traceback (most recent call last):
    ConfigError: unknown config key 'optim.lrr' (OptimConfig has: b1, b2, ...)
"""

from __future__ import annotations

import dataclasses
import json
import typing
from typing import Any


class ConfigError(ValueError):
  """A bad config key or value; the message names the key and what was expected."""


@dataclasses.dataclass(frozen=True)
class RopeScaling:
  """Rope frequency scaling. kind: 'none', 'llama3' (Llama 3.1/3.2), 'linear'."""
  kind: str = "none"
  factor: float = 1.0
  low_freq_factor: float = 1.0
  high_freq_factor: float = 4.0
  original_max_position_embeddings: int = 8192


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Architecture of a Llama-family decoder plus its compute options.

  `hf_path` (local dir or hub id), when set, replaces the architecture fields with those
  read from its config.json and the weights with its safetensors; the compute options
  (dtype, param_dtype, remat, attention) stay as configured here.
  """
  family: str = "llama"  # llama | mistral | qwen2 | qwen3
  vocab_size: int = 512
  hidden_size: int = 128
  intermediate_size: int = 384
  num_layers: int = 4
  num_heads: int = 4
  num_kv_heads: int = 2
  head_dim: int = 32
  rope_theta: float = 10000.0
  rope_scaling: RopeScaling = RopeScaling()
  rms_norm_eps: float = 1e-6
  tie_word_embeddings: bool = True
  attention_bias: bool = False  # q/k/v biases (Qwen2)
  qk_norm: bool = False  # RMSNorm on q and k per head (Qwen3)
  max_position_embeddings: int = 2048
  sliding_window: int = 0  # 0 = full attention
  final_logit_softcap: float = 0.0  # >0: logits = cap * tanh(logits / cap) (models/head.py)
  bos_token_id: int = -1
  eos_token_id: tuple[int, ...] = ()
  pad_token_id: int = -1
  # Compute options, not architecture.
  hf_path: str = ""
  dtype: str = "float32"  # activation / matmul dtype: float32 | bfloat16
  param_dtype: str = "float32"  # storage dtype of params (and master weights)
  remat: str = "none"  # none | full | dots | dots_no_batch | offload
  attention: str = "auto"  # auto | xla | cudnn | pallas (GPU flash kernel, packed segments)
  scan_layers: bool = True
  logits_chunk: int = 0  # >0: cross-entropy over chunks of this many tokens

  @property
  def q_size(self) -> int:
    return self.num_heads * self.head_dim

  @property
  def kv_size(self) -> int:
    return self.num_kv_heads * self.head_dim

  def num_params(self, *, include_embed: bool = True) -> int:
    d, f, l = self.hidden_size, self.intermediate_size, self.num_layers
    attn = d * self.q_size * 2 + d * self.kv_size * 2
    if self.attention_bias:
      attn += self.q_size + 2 * self.kv_size
    if self.qk_norm:
      attn += 2 * self.head_dim
    per_layer = attn + 3 * d * f + 2 * d
    n = l * per_layer + d
    if include_embed:
      n += self.vocab_size * d * (1 if self.tie_word_embeddings else 2)
    return n


@dataclasses.dataclass(frozen=True)
class PeftConfig:
  """Parameter-efficient fine-tuning: none (full FT), lora, or qlora (4-bit base)."""
  method: str = "none"  # none | lora | qlora
  rank: int = 8
  alpha: float = 16.0
  rslora: bool = False
  dropout: float = 0.0
  # Regex over param paths ("layers/self_attn/q_proj/kernel"); default: all projections.
  targets: str = r".*(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)/kernel"
  quant_method: str = "nf4"  # nf4 | int4 (qlora only)
  quant_group_size: int = 64
  double_quant: bool = False


@dataclasses.dataclass(frozen=True)
class OptimConfig:
  """AdamW with warmup and decay; no weight decay on norms and biases (see train/optim.py)."""
  lr: float = 3e-3
  schedule: str = "cosine"  # cosine | linear | constant
  warmup_steps: int = 20
  end_lr_ratio: float = 0.1
  weight_decay: float = 0.0
  b1: float = 0.9
  b2: float = 0.95
  eps: float = 1e-8
  clip_norm: float = 1.0  # 0 disables
  grad_accum: int = 1  # micro-batches per optimizer step


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  """Device mesh axes; -1 on one axis means 'all remaining devices'."""
  data: int = 1
  fsdp: int = -1
  tensor: int = 1


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """Where examples come from and how they become [B, T] batches."""
  train_files: str = ""  # comma-separated paths / dirs / 'hf:NAME[:split]'; "" = bundled sample
  eval_files: str = ""
  eval_fraction: float = 0.05  # held-out share when eval_files is empty
  format: str = "auto"  # auto | text | chat | instruction | prompt_completion | preference | prompt
  text_field: str = "text"
  weights: str = ""  # comma-separated sampling weights, one per train file (mixture)
  tokenizer: str = ""  # dir or hub id; "" = model.hf_path, else the bundled tokenizer
  chat_template: str = ""  # path to a jinja template used when the tokenizer has none
  loss_policy: str = "auto"  # auto | assistant | last_assistant | all | completion
  seq_len: int = 128
  batch_size: int = 16  # global batch (examples or packed rows) per optimizer step
  pack: bool = True
  truncation: str = "truncate_right"  # error | truncate_right | truncate_left | drop
  on_bad_record: str = "error"  # error | skip
  check_template: bool = True
  seed: int = 0


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
  every_steps: int = 100
  keep: int = 3
  async_save: bool = True
  export_hf: bool = True  # write WORKDIR/hf at the end of training


@dataclasses.dataclass(frozen=True)
class LoopConfig:
  max_steps: int = 200
  log_every: int = 1
  eval_every: int = 50
  eval_batches: int = 4
  early_stopping_patience: int = 0  # evals without improvement before stopping; 0 = off
  seed: int = 0
  progress: bool = True


# One section per training method (`--set=dpo.beta=0.2`). The allowed values of each
# option are owned by the method's module (`jaxtune/methods/NAME.py`), which checks them in
# `Method.check` before any data or weights are touched.


@dataclasses.dataclass(frozen=True)
class DpoConfig:
  """method=dpo: DPO-family preference losses (see jaxtune/methods/dpo.py)."""
  loss_type: str = "sigmoid"  # sigmoid | ipo | hinge | robust | simpo | orpo
  beta: float = 0.1
  label_smoothing: float = 0.0
  simpo_gamma: float = 0.5
  reference: str = "frozen"  # frozen | adapters_off | precomputed


@dataclasses.dataclass(frozen=True)
class RewardConfig:
  """method=reward: a Bradley-Terry scalar reward model (see jaxtune/methods/reward.py)."""
  margin: bool = False  # subtract a per-pair margin from the score difference


@dataclasses.dataclass(frozen=True)
class DistillConfig:
  """method=distill: a student matching a frozen teacher (see jaxtune/methods/distill.py)."""
  kind: str = "forward_kl"  # forward_kl | reverse_kl | jsd
  temperature: float = 1.0
  beta: float = 0.5  # JSD mixing weight
  alpha: float = 1.0  # weight of the distillation term vs. cross-entropy
  top_k: int = 0
  teacher_path: str = ""
  teacher_logits_file: str = ""
  teacher_quant: str = "none"  # none | nf4 | int4


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  method: str = "sft"  # a name in jaxtune.methods.METHODS: sft | dpo | reward | distill
  model: ModelConfig = ModelConfig()
  peft: PeftConfig = PeftConfig()
  optim: OptimConfig = OptimConfig()
  mesh: MeshConfig = MeshConfig()
  data: DataConfig = DataConfig()
  train: LoopConfig = LoopConfig()
  checkpoint: CheckpointConfig = CheckpointConfig()
  dpo: DpoConfig = DpoConfig()
  reward: RewardConfig = RewardConfig()
  distill: DistillConfig = DistillConfig()


def _parse_value(key: str, text: str, typ: Any) -> Any:
  """Parses `text` as a value of type `typ` (from the dataclass annotation)."""
  origin = typing.get_origin(typ)
  try:
    if typ is bool:
      low = text.strip().lower()
      if low in ("1", "true", "yes", "on"):
        return True
      if low in ("0", "false", "no", "off"):
        return False
      raise ValueError("expected true/false")
    if typ is int:
      return int(text)
    if typ is float:
      return float(text)
    if typ is str:
      return text
    if origin is tuple:
      (elem,) = {a for a in typing.get_args(typ) if a is not Ellipsis}
      parts = [p for p in text.replace("[", "").replace("]", "").split(",") if p.strip()]
      return tuple(_parse_value(key, p.strip(), elem) for p in parts)
  except ValueError as e:
    raise ConfigError(f"bad value for {key}: {text!r} is not a {getattr(typ, '__name__', typ)}"
                      f" ({e})") from None
  raise ConfigError(f"config key {key} has unsupported type {typ}")


def _field_types(cls) -> dict[str, Any]:
  return typing.get_type_hints(cls)


def override(cfg, assignments: list[str] | tuple[str, ...]):
  """Returns `cfg` with each 'a.b.c=value' assignment applied (typed, validated)."""
  for item in assignments:
    if "=" not in item:
      raise ConfigError(f"override {item!r} is not of the form key=value")
    key, text = item.split("=", 1)
    cfg = _set(cfg, key.strip(), key.strip().split("."), text)
  validate(cfg)
  return cfg


def _set(obj, full_key: str, parts: list[str], text: str):
  if not dataclasses.is_dataclass(obj):
    raise ConfigError(f"unknown config key {full_key!r}")
  names = [f.name for f in dataclasses.fields(obj)]
  head = parts[0]
  if head not in names:
    raise ConfigError(f"unknown config key {full_key!r} ({type(obj).__name__} has: "
                      f"{', '.join(names)})")
  cur = getattr(obj, head)
  if len(parts) > 1:
    return dataclasses.replace(obj, **{head: _set(cur, full_key, parts[1:], text)})
  if dataclasses.is_dataclass(cur):
    raise ConfigError(f"config key {full_key!r} is a section; set one of its fields "
                      f"({', '.join(f.name for f in dataclasses.fields(cur))})")
  typ = _field_types(type(obj))[head]
  return dataclasses.replace(obj, **{head: _parse_value(full_key, text, typ)})


# Options whose values no registry owns. `method`, `model.family`, `peft.method` and the
# method sections are checked by their registries / modules (jaxtune.methods.check).
_CHOICES = {
    "model.dtype": ("float32", "bfloat16", "float16"),
    "model.param_dtype": ("float32", "bfloat16", "float16"),
    "model.remat": ("none", "full", "dots", "dots_no_batch", "offload"),
    "model.attention": ("auto", "xla", "cudnn", "pallas"),
    "model.rope_scaling.kind": ("none", "llama3", "linear"),
    "peft.quant_method": ("nf4", "int4"),
    "optim.schedule": ("cosine", "linear", "constant"),
    "data.format": ("auto", "text", "chat", "instruction", "prompt_completion", "preference",
                    "prompt"),
    "data.loss_policy": ("auto", "assistant", "last_assistant", "all", "completion"),
    "data.truncation": ("error", "truncate_right", "truncate_left", "drop"),
    "data.on_bad_record": ("error", "skip"),
}


def _get(cfg, key: str):
  for p in key.split("."):
    cfg = getattr(cfg, p)
  return cfg


def check_choice(key: str, value, choices) -> None:
  """Raises the one-line ConfigError naming `key` unless `value` is one of `choices`."""
  if value not in choices:
    raise ConfigError(f"bad value for {key}: {value!r} (expected one of "
                      f"{', '.join(map(str, choices))})")


def validate(cfg: TrainConfig) -> None:
  """Raises ConfigError naming the first key whose value is out of range.

  Generic settings only; `jaxtune.methods.check(cfg)` adds the method, family and PEFT
  checks owned by their modules."""
  for key, choices in _CHOICES.items():
    check_choice(key, _get(cfg, key), choices)
  positive = ["train.max_steps", "data.seq_len", "data.batch_size", "optim.grad_accum",
              "checkpoint.every_steps", "checkpoint.keep", "train.log_every", "peft.rank"]
  for key in positive:
    if _get(cfg, key) <= 0:
      raise ConfigError(f"bad value for {key}: {_get(cfg, key)} (expected > 0)")
  if cfg.data.batch_size % cfg.optim.grad_accum:
    raise ConfigError(f"bad value for optim.grad_accum: {cfg.optim.grad_accum} does not divide "
                      f"data.batch_size={cfg.data.batch_size}")
  if cfg.optim.lr < 0:
    raise ConfigError(f"bad value for optim.lr: {cfg.optim.lr} (expected >= 0)")


def to_dict(cfg) -> dict:
  return dataclasses.asdict(cfg)


# Checkpoints written before the method sections existed hold one flat `method_cfg` bag.
_LEGACY_METHOD_CFG = {
    "beta": ("dpo", "beta"), "loss_type": ("dpo", "loss_type"),
    "label_smoothing": ("dpo", "label_smoothing"), "simpo_gamma": ("dpo", "simpo_gamma"),
    "reference": ("dpo", "reference"), "reward_margin": ("reward", "margin"),
    "distill_kind": ("distill", "kind"), "distill_temperature": ("distill", "temperature"),
    "distill_beta": ("distill", "beta"), "distill_alpha": ("distill", "alpha"),
    "distill_top_k": ("distill", "top_k"), "teacher_path": ("distill", "teacher_path"),
    "teacher_logits_file": ("distill", "teacher_logits_file"),
    "teacher_quant": ("distill", "teacher_quant"),
}


def _migrate(d: dict) -> dict:
  """A TrainConfig dict with a legacy `method_cfg` bag split into the method sections."""
  d = dict(d)
  for key, value in (d.pop("method_cfg", None) or {}).items():
    section, name = _LEGACY_METHOD_CFG[key]
    d[section] = {**d.get(section, {}), name: value}
  return d


def from_dict(cls, d: dict):
  """Inverse of to_dict for nested frozen dataclasses (unknown keys are errors)."""
  hints = _field_types(cls)
  if cls is TrainConfig:
    d = _migrate(d)
  kwargs = {}
  for k, v in d.items():
    if k not in hints:
      raise ConfigError(f"unknown config key {k!r} for {cls.__name__}")
    typ = hints[k]
    if dataclasses.is_dataclass(typ):
      v = from_dict(typ, v)
    elif typing.get_origin(typ) is tuple:
      v = tuple(v)
    kwargs[k] = v
  return cls(**kwargs)


def to_json(cfg) -> str:
  return json.dumps(to_dict(cfg), indent=2, sort_keys=True)

