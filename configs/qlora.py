"""QLoRA: an NF4 4-bit base (quantised on load, 0.53 bytes/param) plus LoRA adapters.

  python launch/train.py --config=configs/qlora.py:meta-llama/Llama-3.1-8B-Instruct \
      --set=data.train_files=my_chats.jsonl --workdir=runs/qlora

The base projections never sit on the device in full precision: each stacked kernel is
quantised on the host as it is read. Export merges into the dequantised base (--merge_lora)
or writes the adapter alone (--peft).
"""

from jaxtune import config


def get_config(arg=None):
  return config.TrainConfig(
      method="sft",
      model=config.ModelConfig(hf_path=arg or "meta-llama/Llama-3.1-8B-Instruct",
                               dtype="bfloat16", param_dtype="bfloat16", remat="full",
                               logits_chunk=2048, logits_dtype="compute"),
      peft=config.PeftConfig(method="qlora", rank=16, alpha=32.0, quant_method="nf4",
                             quant_group_size=64),
      optim=config.OptimConfig(lr=2e-4, warmup_steps=30),
      data=config.DataConfig(format="chat", loss_policy="assistant", seq_len=4096, batch_size=8),
      train=config.LoopConfig(max_steps=1000, eval_every=100),
      checkpoint=config.CheckpointConfig(every_steps=200, keep=2),
  )
