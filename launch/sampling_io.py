"""What launch/generate.py and launch/serve.py share: the model flags, loading a model with its
tokenizer through `jaxtune.weights.load`, rendering prompts, and streaming text.

    flags: --model=HF_DIR|HUB_ID|CHECKPOINT_DIR|RUN_DIR  --adapter=PEFT_DIR
           --dtype=float32|bfloat16  --mesh=DATA,FSDP,TENSOR
    m = load_model()           # Model(cfg, params (adapters applied), tok, eos_ids, source)
    ids = chat_ids(m.tok, messages)      # the chat template, add_generation_prompt=True

A run's tokenizer is the one it trained with (`data.tokenizer_from_config(run_cfg)`); an HF
directory or hub id brings its own. Stop ids are the model config's eos ids plus the
tokenizer's eos token (a chat model's end-of-turn token, e.g. <|im_end|> or <|eot_id|>).
"""

import dataclasses
import os
from typing import Any

from absl import flags

FLAGS = flags.FLAGS


def define_model_flags() -> None:
  flags.DEFINE_string("model", None, "What to sample from: an HF model directory or hub id "
                      "(safetensors only), a training run's workdir (its latest checkpoint, "
                      "adapters included) or its checkpoints directory, or a "
                      "`convert.py --from_hf` output.")
  flags.DEFINE_string("adapter", "", "A Hugging Face PEFT adapter directory to apply (unmerged) "
                      "on top of --model.")
  flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Compute and storage dtype "
                    "(bfloat16 on GPU/TPU).")
  flags.DEFINE_string("mesh", "1,-1,1", "Device mesh DATA,FSDP,TENSOR (-1: all remaining "
                      "devices): rows over data x fsdp, weights over fsdp and tensor.")
  flags.DEFINE_integer("max_new_tokens", 256, "Most new tokens per completion.")
  flags.DEFINE_float("temperature", 0.7, "Sampling temperature; 0 = greedy.")
  flags.DEFINE_integer("top_k", 0, "Keep the k most likely tokens (0 = off).")
  flags.DEFINE_float("top_p", 1.0, "Nucleus sampling: keep the most likely tokens up to this "
                     "probability mass (1 = off).")
  flags.DEFINE_float("min_p", 0.0, "Drop tokens less likely than min_p x the top token (0 = off).")
  flags.DEFINE_integer("seed", 0, "Sampling seed.")


@dataclasses.dataclass
class Model:
  cfg: Any  # ModelConfig
  params: Any  # ready to run: adapters already applied (unmerged)
  tok: Any  # transformers tokenizer
  eos_ids: tuple[int, ...]
  source: str


def _mesh():
  import jax
  from jaxtune import config as config_lib
  from jaxtune import sharding
  try:
    data, fsdp, tensor = (int(x) for x in FLAGS.mesh.split(","))
  except ValueError:
    raise config_lib.ConfigError(f"--mesh: expected DATA,FSDP,TENSOR integers, got "
                                 f"{FLAGS.mesh!r}") from None
  return sharding.make_mesh(config_lib.MeshConfig(data, fsdp, tensor), jax.devices())


def load_model() -> Model:
  """--model (+ --adapter) on the --mesh, with its tokenizer and stop ids."""
  from jaxtune import checkpoint
  from jaxtune import config as config_lib
  from jaxtune import data
  from jaxtune import weights
  source = FLAGS.model
  if not source:
    raise config_lib.ConfigError("--model is required: an HF directory or hub id, or a run's "
                                 "workdir")
  parent = os.path.dirname(os.path.abspath(source))
  if os.path.basename(os.path.abspath(source)) == "checkpoints" and checkpoint.is_run(parent):
    source = parent  # a run's checkpoints directory: the run
  base = config_lib.ModelConfig(dtype=FLAGS.dtype, param_dtype=FLAGS.dtype)
  is_run = checkpoint.is_run(source)
  w = weights.load(source, mesh=_mesh(), base=base if not is_run or FLAGS.dtype != "float32"
                   else None, adapter=FLAGS.adapter)
  if w.run_cfg is not None:
    tok = data.tokenizer_from_config(w.run_cfg)
  else:
    tok = data.load_tokenizer(source)
  eos = list(w.model_cfg.eos_token_id)
  if tok.eos_token_id is not None and tok.eos_token_id not in eos:
    eos.append(int(tok.eos_token_id))
  params = w.params if w.adapters is None else w.adapters.apply(w.params)
  return Model(w.model_cfg, params, tok, tuple(eos), source)


def chat_ids(tok, messages: list[dict]) -> list[int]:
  """The model's chat template over `messages`, with the assistant turn opened."""
  from jaxtune import data
  if not tok.chat_template:
    raise data.DataError(f"tokenizer {tok.name_or_path!r} has no chat template; chat needs "
                         "one (plain prompts do not)")
  ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                return_dict=False)
  return [int(i) for i in ids]


def text_ids(tok, text: str) -> list[int]:
  """A plain prompt as it is (the tokenizer's own special tokens, e.g. BOS, included)."""
  return [int(i) for i in tok(text)["input_ids"]]


class TextStream:
  """Turns a growing list of token ids into text deltas (holding back a split character)."""

  def __init__(self, tok):
    self.tok = tok
    self.text = ""

  def update(self, ids: list[int]) -> str:
    text = self.tok.decode(ids, skip_special_tokens=True)
    if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for the next token
      return ""
    delta = text[len(self.text):] if text.startswith(self.text) else ""
    self.text = text if text.startswith(self.text) else self.text
    return delta
