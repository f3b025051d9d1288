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

The comment after a field (or right above it) is its doc: `--help_config` prints every key
with type, default and doc (`help_text()`). The generic machinery lives in config_tree.py,
the value and range checks in config_checks.py, path resolution in paths.py
(`resolve_paths(cfg)`: local paths absolute, hub ids kept, a missing path one line).
"""

from __future__ import annotations

import dataclasses
import json

from jaxtune import config_checks
from jaxtune.config_methods import DistillConfig, DpoConfig, GrpoConfig, RewardConfig  # noqa: F401
from jaxtune import config_tree
from jaxtune import paths

ConfigError = config_tree.ConfigError  # a bad key or value; the message names the key


@dataclasses.dataclass(frozen=True)
class RopeScaling:
  """Rope frequency scaling. kind: 'none', 'llama3' (Llama 3.1/3.2), 'linear'."""
  kind: str = "none"  # none | llama3 (Llama 3.1/3.2) | linear | longrope (Phi-3)
  factor: float = 1.0  # context extension factor (llama3, linear)
  low_freq_factor: float = 1.0  # llama3: wavelengths above original/low are scaled
  high_freq_factor: float = 4.0  # llama3: wavelengths below original/high are kept
  original_max_position_embeddings: int = 8192  # llama3, longrope: the pre-extension context
  short_factor: tuple[float, ...] = ()  # longrope: per-frequency divisors up to the original
  long_factor: tuple[float, ...] = ()  # longrope: per-frequency divisors beyond it
  attention_factor: float = 1.0  # longrope: cos and sin are scaled by this


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Architecture of a Llama-family decoder plus its compute options.

  `hf_path` (local dir or hub id), when set, replaces the architecture fields with those
  read from its config.json and the weights with its safetensors; the compute options
  (dtype, param_dtype, remat, attention) stay as configured here.
  """
  family: str = "llama"  # llama | mistral | qwen2 | qwen3
  vocab_size: int = 512  # random init: at least the tokenizer's size (hf_path: read)
  hidden_size: int = 128  # model width D
  intermediate_size: int = 384  # MLP width F (SwiGLU)
  num_layers: int = 4  # decoder blocks L
  num_heads: int = 4  # query heads H
  num_kv_heads: int = 2  # key/value heads (grouped-query attention; = H for MHA)
  head_dim: int = 32  # per-head width Dh
  rope_theta: float = 10000.0  # rotary embedding base
  rope_scaling: RopeScaling = RopeScaling()
  rms_norm_eps: float = 1e-6  # RMSNorm epsilon
  tie_word_embeddings: bool = True  # the output head reuses the embedding matrix
  attention_bias: bool = False  # q/k/v biases (Qwen2)
  qk_norm: bool = False  # RMSNorm on q and k per head (Qwen3)
  max_position_embeddings: int = 2048  # longest position the model was trained for
  sliding_window: int = 0  # 0 = full attention
  final_logit_softcap: float = 0.0  # >0: logits = cap * tanh(logits / cap) (models/head.py)
  # Mixture of experts (Mixtral, Qwen3-MoE; models/moe.py). 0 experts = dense MLP blocks.
  num_experts: int = 0  # experts per MoE layer E
  num_experts_per_tok: int = 2  # top-k experts per token
  moe_intermediate_size: int = 0  # expert MLP width (0 = intermediate_size, as Mixtral)
  norm_topk_prob: bool = True  # renormalise the top-k router weights (Mixtral: always)
  # Load-balancing loss weight added to the objective; -1 = config.json's (0 if random).
  router_aux_loss_coef: float = -1.0
  dense_layers: tuple[int, ...] = ()  # layers with a dense MLP in a MoE model (Qwen3-MoE)
  # Gemma / Phi-3 block options (set by the family from config.json).
  hidden_act: str = "silu"  # gated MLP: silu (SwiGLU) | gelu_pytorch_tanh (GeGLU, Gemma)
  norm_one_plus: bool = False  # every RMSNorm scales by (1 + w) (Gemma); params hold w
  sandwich_norms: bool = False  # norms after attention and around the MLP (Gemma 2/3)
  embed_scale: bool = False  # embeddings * sqrt(hidden_size) in the compute dtype (Gemma)
  query_pre_attn_scalar: float = 0.0  # >0: attention scale this ** -0.5, else head_dim's
  attn_logit_softcap: float = 0.0  # >0: scores = cap * tanh(scores / cap) (Gemma 2)
  # Per layer 'sliding_attention' | 'full_attention' (Gemma 2/3); () = every layer alike
  # (windowed iff sliding_window > 0).
  layer_types: tuple[str, ...] = ()
  rope_local_theta: float = 0.0  # >0: rope base of sliding layers, unscaled (Gemma 3)
  partial_rotary_factor: float = 1.0  # rotary on the first head_dim * this dims (Phi-3)
  bos_token_id: int = -1  # -1 = none (random init: the tokenizer's)
  eos_token_id: tuple[int, ...] = ()
  pad_token_id: int = -1  # -1 = none (random init: the tokenizer's)
  # Compute options, not architecture.
  hf_path: str = ""  # HF dir, hub id, .gguf, run or checkpoint dir; "" = random init
  dtype: str = "float32"  # activation / matmul dtype: float32 | bfloat16
  param_dtype: str = "float32"  # storage dtype of params (and master weights)
  remat: str = "none"  # none | full | dots | dots_no_batch | offload | auto (train/memory.py)
  attention: str = "auto"  # auto | xla | cudnn | pallas | splash (models/attention.py)
  scan_layers: bool = True  # lax.scan over the stacked layers (fast compiles)
  # >0: the output head scores this many tokens at a time. Training: tokens of the global
  # batch, each device its share of its rows; eval/perplexity: positions of each row.
  logits_chunk: int = 0
  # The dtype the output projection writes its logits in before the float32 loss math:
  # float32 | compute (the activation dtype: a bf16 model's logits rounded to bf16, as
  # transformers' bf16 lm_head does; the head's passes over [tokens, V] move half the bytes).
  logits_dtype: str = "float32"
  moe_impl: str = "auto"  # MoE grouped matmul: auto | ragged | blocked | mgpu (Hopper)

  @property
  def q_size(self) -> int:
    return self.num_heads * self.head_dim

  @property
  def kv_size(self) -> int:
    return self.num_kv_heads * self.head_dim

  @property
  def layer_windows(self) -> tuple[int, ...]:
    """The attention window of each layer (0 = full): `layer_types` or uniform."""
    if not self.layer_types:
      return (self.sliding_window,) * self.num_layers
    return tuple(self.sliding_window if t == "sliding_attention" else 0
                 for t in self.layer_types)

  def num_params(self, *, include_embed: bool = True) -> int:
    d, f, l = self.hidden_size, self.intermediate_size, self.num_layers
    attn = d * self.q_size * 2 + d * self.kv_size * 2
    if self.attention_bias:
      attn += self.q_size + 2 * self.kv_size
    if self.qk_norm:
      attn += 2 * self.head_dim
    per_layer = attn + 3 * d * f + (4 if self.sandwich_norms else 2) * d
    n = l * per_layer + d
    if include_embed:
      n += self.vocab_size * d * (1 if self.tie_word_embeddings else 2)
    return n


@dataclasses.dataclass(frozen=True)
class PeftConfig:
  """Parameter-efficient fine-tuning: none (full FT) or one of `jaxtune.peft.METHODS`.

  lora / qlora / dora / qdora use rank, alpha, rslora, dropout, targets; ia3 its own
  regexes; prompt_tuning and prefix_tuning the virtual-token options, llama_adapter its
  adapter_* options; q* methods the 4-bit base options.
  """
  # none | lora | qlora | dora | qdora | ia3 | prompt_tuning | prefix_tuning | llama_adapter
  method: str = "none"
  rank: int = 8  # LoRA / DoRA rank r
  alpha: float = 16.0  # adapter scale alpha / r (alpha / sqrt(r) with rslora)
  rslora: bool = False  # rank-stabilised scaling alpha / sqrt(r)
  dropout: float = 0.0  # LoRA dropout on the adapter input, in [0, 1) (method=sft)
  # Regex over param paths ("layers/self_attn/q_proj/kernel"); default: all projections.
  targets: str = r".*(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)/kernel"
  quant_method: str = "nf4"  # nf4 | int4 (qlora, qdora)
  quant_group_size: int = 64  # weights per 4-bit quantisation block (qlora, qdora)
  double_quant: bool = False  # quantise the block scales too (QLoRA's double quantisation)
  # ia3: kernels that get a learned scaling vector (PEFT's Llama defaults: k, v, down_proj),
  # and those of them whose INPUT is scaled (PEFT's feedforward_modules); the rest scale
  # their output.
  ia3_targets: str = r"layers/(self_attn/(k_proj|v_proj)|mlp/down_proj)/kernel"
  ia3_feedforward: str = r"layers/mlp/down_proj/kernel"  # ia3: targets scaled on the input
  # prompt_tuning: trainable embeddings prepended to every sequence (and packed segment).
  num_virtual_tokens: int = 20
  prompt_init: str = "random"  # random (PEFT's default, N(0, 1)) | sample_vocab | text
  prompt_init_text: str = ""  # prompt_init=text: embeddings of this text's tokens, repeated
  prompt_tokenizer: str = ""  # prompt_init=text: tokenizer dir (PEFT tokenizer_name_or_path)
  # prefix_tuning (num_virtual_tokens per layer): train the key/value prefixes through PEFT's
  # reparameterisation MLP (its output is what is saved), of this hidden size (0 = K*Dh).
  prefix_projection: bool = False
  prefix_hidden: int = 0  # prefix_tuning: hidden size of the projection MLP (0 = K*Dh)
  # llama_adapter: adapter_len prompt vectors in each of the top adapter_layers layers (0 = all)
  adapter_len: int = 10
  adapter_layers: int = 0  # llama_adapter: top layers with adapter prompts (0 = all)


@dataclasses.dataclass(frozen=True)
class OptimConfig:
  """AdamW with warmup and decay; no weight decay on norms and biases (see train/optim.py)."""
  lr: float = 3e-3  # peak learning rate
  schedule: str = "cosine"  # cosine | linear | constant
  warmup_steps: int = 20  # linear warmup from 0 to lr
  end_lr_ratio: float = 0.1  # final lr as a fraction of lr (cosine, linear)
  weight_decay: float = 0.0  # AdamW decoupled weight decay (not on norms and biases)
  b1: float = 0.9  # AdamW beta1
  b2: float = 0.95  # AdamW beta2
  eps: float = 1e-8  # AdamW epsilon
  clip_norm: float = 1.0  # 0 disables
  grad_accum: int = 1  # micro-batches per optimizer step


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  """Device mesh axes; -1 on one axis means 'all remaining devices'."""
  data: int = 1  # data-parallel replicas
  fsdp: int = -1  # fully sharded data parallel (params sharded); -1 = the rest
  tensor: int = 1  # tensor parallel (heads / MLP split)
  expert: int = 1  # expert parallel (MoE experts split; batch rows split too)


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """Where examples come from and how they become [B, T] batches (see jaxtune/data/)."""
  train_files: str = ""  # comma-separated paths / dirs / 'hf:NAME[:split]'; "" = bundled sample
  eval_files: str = ""  # like train_files; "" = hold out eval_fraction of each train source
  eval_fraction: float = 0.05  # held-out share of records when eval_files is empty, in [0, 1)
  format: str = "auto"  # auto | text | chat | instruction | prompt_completion | preference | prompt
  text_field: str = "text"  # the record field holding raw text (format=text)
  weights: str = ""  # comma-separated sampling weights, one per train file (mixture)
  tokenizer: str = ""  # dir, run dir or hub id; "" = model.hf_path's own, else the bundled one
  chat_template: str = ""  # jinja template file (or text) replacing the tokenizer's template
  loss_policy: str = "auto"  # auto | assistant | last_assistant | all | completion
  seq_len: int = 512  # tokens per row; longer examples follow data.truncation
  batch_size: int = 4  # global batch (examples or packed rows) per optimizer step
  pack: bool = True  # pack several examples per row (segment ids keep them apart)
  # auto: text documents are split into seq_len windows, everything else is cut at the
  # right (prompts at the left) | split | error | truncate_right | truncate_left | drop
  truncation: str = "auto"
  stride: int = 0  # split: tokens between window starts; 0 = seq_len - 1 (each token once)
  # auto: a chat whose generation prompt is not a prefix of its rendering (Mistral v3 with a
  # system prompt) is rendered turn by turn | full (always one rendering) | turns
  chat_render: str = "auto"
  on_bad_record: str = "error"  # error | skip (count and report bad records instead)
  check_template: bool = True  # a turn that renders differently later is an error (else untrained)
  seed: int = 0  # shuffling and mixture draws
  streaming: bool = False  # encode lazily into the tokenized cache, read batches from disk
  cache_dir: str = ""  # tokenized cache (implies streaming); "" = ~/.cache/jaxtune/tokenized
  workers: int = 0  # streaming: grain worker processes that tokenize; 0 = this process


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
  every_steps: int = 100  # steps between checkpoints
  keep: int = 3  # checkpoints kept (the latest ones)
  async_save: bool = True  # save in the background while training continues
  export_hf: bool = True  # write WORKDIR/hf at the end of training
  # A metric (val_loss, retention_ppl, kl_to_base, val_rougeL, val_bleu, ...): keep the
  # checkpoint with its best value outside the keep-N rotation and export it at the end;
  # "" = off (train.early_stopping_patience > 0 implies val_loss). See train/evaluate.py.
  keep_best: str = ""


@dataclasses.dataclass(frozen=True)
class LoopConfig:
  max_steps: int = 200  # optimizer steps of the whole run (unless train.epochs > 0)
  epochs: float = 0.0  # > 0: passes over the train data (fractions too) decide max_steps
  log_every: int = 1  # steps between metrics.jsonl / TensorBoard rows
  eval_every: int = 50  # steps between validation losses; 0 = never
  eval_batches: int = 4  # eval batches per evaluation; 0 = all
  early_stopping_patience: int = 0  # evals without improvement before stopping; 0 = off
  max_skipped: int = 10  # consecutive steps with a non-finite loss/grad norm before stopping
  seed: int = 0  # init, adapter and dropout randomness
  progress: bool = True  # show the progress bar
  # Rows per micro-batch: "" = data.batch_size / optim.grad_accum; N = N rows (sets
  # optim.grad_accum = data.batch_size / N); auto = the largest that fits the device memory
  # with train.memory_margin to spare, from the compiled step (train/memory.py)
  micro_batch: str = ""
  device_memory_gib: float = 0.0  # planner: per-device memory; 0 = the device's (none on CPU)
  memory_margin: float = 0.1  # micro_batch=auto: share of device memory kept free, in [0, 1)


@dataclasses.dataclass(frozen=True)
class EvalConfig:
  """Evaluation during and after training, beyond val_loss (see jaxtune/train/evaluate.py)."""
  # General text the model should not forget (files like data.train_files, text records):
  # retention_ppl and kl_to_base logged at step 0 and at every eval.
  retention_files: str = ""
  retention_examples: int = 64  # retention records used (the first N; 0 = all)
  # auto: PEFT runs log kl_to_base (the base is the adapters-off model, no copy), full
  # fine-tuning does not | on: full fine-tuning too (loads a second copy of the initial
  # weights) | off
  kl_to_base: str = "auto"
  # Warn when retention_ppl exceeds its step-0 value by more than this fraction (0.1 = 10%).
  forgetting_tolerance: float = 0.1
  # Warn when val_loss rose at this many evals in a row while the training loss fell; 0 = off
  overfit_evals: int = 3
  # Steps between generation metrics (val_bleu, val_rougeL, ...) on held-out prompts; 0 = never
  generate_every: int = 0
  generate_examples: int = 16  # held-out records used for generation metrics
  max_new_tokens: int = 64  # generation length limit (greedy decoding)
  # At the end: the exported model on the held-out records (perplexity, generation metrics
  # with 95% intervals) in report.md, final_eval.json and the model card, and a one-line
  # summary (on in the built-in default job). report.md, plots/loss.png and the card are
  # written either way.
  final: bool = False
  final_examples: int = 64  # held-out records of the final evaluation (0 = all)


# One section per training method: jaxtune/config_methods.py.


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
  eval: EvalConfig = EvalConfig()
  dpo: DpoConfig = DpoConfig()
  reward: RewardConfig = RewardConfig()
  distill: DistillConfig = DistillConfig()
  grpo: GrpoConfig = GrpoConfig()


def default_job() -> TrainConfig:
  """The built-in default job (launch/train.py without --config): the defaults, with the
  end-of-run evaluation on, so the run ends with its one-line evaluation summary."""
  return TrainConfig(eval=EvalConfig(final=True))


def override(cfg, assignments: list[str] | tuple[str, ...]):
  """Returns `cfg` with each 'a.b.c=value' assignment applied (typed, validated)."""
  for item in assignments:
    if "=" not in item:
      raise ConfigError(f"override {item!r} is not of the form key=value")
    key, text = item.split("=", 1)
    cfg = config_tree.set_path(cfg, key.strip(), text)
  validate(cfg)
  return cfg


def resolve_paths(cfg: TrainConfig) -> TrainConfig:
  """`cfg` with local paths absolute and hub ids kept; a missing local path is a
  ConfigError saying "no such directory" (see jaxtune/paths.py)."""
  return paths.resolve(cfg)


def help_text() -> str:
  """Every --set key with its type, default and doc (the field comments below)."""
  return config_tree.help_text(TrainConfig)


check_choice = config_checks.check_choice  # ConfigError naming the key unless value in choices
validate = config_checks.validate  # ConfigError naming the first key out of range


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
  """A TrainConfig dict with a legacy `method_cfg` bag split into the method sections and
  a boolean checkpoint.keep_best (before metrics could be named) as "val_loss" / ""."""
  d = dict(d)
  ckpt = d.get("checkpoint")
  if isinstance(ckpt, dict) and isinstance(ckpt.get("keep_best"), bool):  # was a bool
    d["checkpoint"] = {**ckpt, "keep_best": "val_loss" if ckpt["keep_best"] else ""}
  for key, value in (d.pop("method_cfg", None) or {}).items():
    section, name = _LEGACY_METHOD_CFG[key]
    d[section] = {**d.get(section, {}), name: value}
  return d


def from_dict(cls, d: dict):
  """Inverse of to_dict for nested frozen dataclasses (unknown keys are errors)."""
  return config_tree.from_dict(cls, _migrate(d) if cls is TrainConfig else d)


def to_json(cfg) -> str:
  return json.dumps(to_dict(cfg), indent=2, sort_keys=True)

