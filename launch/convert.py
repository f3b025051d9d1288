"""Convert between Hugging Face model directories and jaxtune checkpoints.

  python launch/convert.py --from_hf=DIR_OR_HUB_ID --out=CKPT_DIR
      HF safetensors -> a jaxtune (orbax) checkpoint of the params, usable with
      --from_checkpoint and as the start of a run.
  python launch/convert.py --from_checkpoint=WORKDIR_OR_CKPT_DIR --to_hf=OUT_DIR
      [--merge_lora] [--peft] [--step=N] [--dtype=bfloat16]
      full fine-tuning: the model; LoRA/QLoRA: --peft writes the adapter in PEFT's format
      (adapter_config.json + adapter_model.safetensors), --merge_lora the full model with
      the adapters merged (into the dequantised base for QLoRA). Reward models export as
      *ForSequenceClassification.
  python launch/convert.py --from_checkpoint=WORKDIR_OR_CKPT_DIR --to_gguf=FILE.gguf
      [--gguf_type=f16|bf16|q8_0|q4_0|f32] [--step=N]
      one GGUF file (LoRA/QLoRA adapters merged) with the tokenizer and chat template, for
      llama.cpp / Ollama / transformers (docs/GGUF.md). --from_hf also takes a .gguf file.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app  # noqa: E402
from absl import flags  # noqa: E402

from launch import common  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("from_hf", None, "HF model directory, hub id or .gguf file to import.")
flags.DEFINE_string("out", None, "With --from_hf: the jaxtune checkpoint directory to write.")
flags.DEFINE_string("from_checkpoint", None, "A run's workdir (latest checkpoint) or a "
                    "checkpoint directory written by this tool.")
flags.DEFINE_string("to_hf", None, "With --from_checkpoint: the HF directory to write.")
flags.DEFINE_string("to_gguf", None, "With --from_checkpoint: the .gguf file to write "
                    "(adapters merged).")
flags.DEFINE_enum("gguf_type", "f16", ["f32", "f16", "bf16", "q8_0", "q4_0"], "With --to_gguf: "
                  "storage type of the matrices (norms stay f32).")
flags.DEFINE_integer("step", None, "Checkpoint step to export (default: the latest).")
flags.DEFINE_bool("merge_lora", False, "LoRA/QLoRA: write the full model with adapters merged.")
flags.DEFINE_bool("peft", False, "LoRA/QLoRA: write the adapter in PEFT's format.")
flags.DEFINE_enum("dtype", None, ["float32", "bfloat16", "float16"], "Dtype of exported weights "
                  "(default: the params' dtype).")
common.define_runtime_flags()
flags.adopt_module_key_flags(common)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if bool(FLAGS.from_hf) == bool(FLAGS.from_checkpoint):
    raise app.UsageError("give exactly one of --from_hf or --from_checkpoint")
  _check_sources()
  common.setup_runtime()
  from jaxtune import convert
  if FLAGS.from_hf:
    if not FLAGS.out:
      raise app.UsageError("--from_hf needs --out")
    out = convert.hf_to_checkpoint(FLAGS.from_hf, FLAGS.out)
  elif FLAGS.to_gguf:
    if FLAGS.to_hf:
      raise app.UsageError("give one of --to_hf or --to_gguf")
    out = convert.checkpoint_to_gguf(FLAGS.from_checkpoint, FLAGS.to_gguf, step=FLAGS.step,
                                     gguf_type=FLAGS.gguf_type)
  else:
    if not FLAGS.to_hf:
      raise app.UsageError("--from_checkpoint needs --to_hf or --to_gguf")
    out = convert.checkpoint_to_hf(FLAGS.from_checkpoint, FLAGS.to_hf, step=FLAGS.step,
                                   merge_lora=FLAGS.merge_lora, peft_adapter=FLAGS.peft,
                                   dtype=FLAGS.dtype)
  common.print_once(f"wrote {out}")


def _check_sources() -> None:
  """One-line errors for a missing source, before anything is loaded."""
  from jaxtune import checkpoint
  from jaxtune import paths
  from jaxtune import storage  # bucket URLs (s3://, gs://) as well as local paths
  if FLAGS.from_checkpoint:
    if not storage.exists(FLAGS.from_checkpoint):
      raise app.UsageError(f"--from_checkpoint: no such directory {FLAGS.from_checkpoint!r} "
                           f"(looked for {os.path.abspath(FLAGS.from_checkpoint)})")
    if checkpoint.locate(FLAGS.from_checkpoint) is None:
      raise app.UsageError(f"--from_checkpoint: {FLAGS.from_checkpoint} is not a run's workdir "
                           "or checkpoint directory (no checkpoints/ in it); for an HF model "
                           "directory use --from_hf")
  elif not storage.exists(FLAGS.from_hf) and not paths.is_hub_id(FLAGS.from_hf):
    raise app.UsageError(f"--from_hf: no such directory {FLAGS.from_hf!r} (looked for "
                         f"{os.path.abspath(FLAGS.from_hf)}); expected an HF model directory, "
                         "a .gguf file or a hub id")


if __name__ == "__main__":
  common.run(main)
