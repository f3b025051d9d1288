"""LoRA (rank 16, all seven projections) on a Hugging Face model, exported PEFT-compatible.

  python launch/train.py --config=configs/lora.py:Qwen/Qwen2.5-1.5B-Instruct --workdir=runs/lora
  python launch/convert.py --from_checkpoint=runs/lora --to_hf=out/adapter --peft

Only the adapters are trained, hold optimizer state and are checkpointed; the base stays a
frozen argument of the step. model.remat=auto: the fastest remat policy that fits the
device, which the memory planner finds by compiling the step at start-up. The run's own export writes WORKDIR/hf (merged model) and
WORKDIR/hf_adapter (the PEFT adapter).
"""

from jaxtune import config


def get_config(arg=None):
  return config.TrainConfig(
      method="sft",
      model=config.ModelConfig(hf_path=arg or "Qwen/Qwen2.5-1.5B-Instruct", dtype="bfloat16",
                               param_dtype="bfloat16", remat="auto",
                               logits_chunk=2048, logits_dtype="compute"),
      peft=config.PeftConfig(method="lora", rank=16, alpha=32.0),
      optim=config.OptimConfig(lr=2e-4, warmup_steps=30, schedule="cosine"),
      data=config.DataConfig(format="chat", loss_policy="assistant", seq_len=2048, batch_size=16),
      train=config.LoopConfig(max_steps=1000, eval_every=100),
      checkpoint=config.CheckpointConfig(every_steps=200, keep=2),
  )
