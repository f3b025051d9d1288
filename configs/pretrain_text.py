"""Continued pre-training on raw text: loss on every token, packed rows, no chat template.

  python launch/train.py --config=configs/pretrain_text.py:meta-llama/Llama-3.2-1B \
      --set=data.train_files=corpus/ --set=data.text_field=text --workdir=runs/cpt

Without data.train_files it uses the bundled text sample. model.remat=auto: the fastest
remat policy that fits the device (the memory planner compiles the step at start-up).
"""

from jaxtune import config
from jaxtune.data import tokenizer_lib


def get_config(arg=None):
  return config.TrainConfig(
      method="sft",
      model=config.ModelConfig(hf_path=arg or "meta-llama/Llama-3.2-1B", dtype="bfloat16",
                               param_dtype="float32", remat="auto", logits_chunk=2048,
                               logits_dtype="compute"),
      optim=config.OptimConfig(lr=2e-5, warmup_steps=100, schedule="cosine", weight_decay=0.1),
      data=config.DataConfig(train_files=tokenizer_lib.sample_path("text"), format="text",
                             loss_policy="all", seq_len=2048, batch_size=32, pack=True),
      train=config.LoopConfig(max_steps=2000, eval_every=200),
      checkpoint=config.CheckpointConfig(every_steps=500, keep=2),
  )
