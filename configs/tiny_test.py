"""A very small SFT job on the bundled chat sample: what the launcher tests run.

  python launch/train.py --config=configs/tiny_test.py --workdir=/tmp/tiny
"""

from jaxtune import config


def get_config(arg=None):
  del arg
  return config.TrainConfig(
      model=config.ModelConfig(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                               num_kv_heads=2, head_dim=8),
      optim=config.OptimConfig(lr=3e-3, warmup_steps=2),
      data=config.DataConfig(seq_len=64, batch_size=8),
      train=config.LoopConfig(max_steps=12, eval_every=6, eval_batches=2, progress=False),
      checkpoint=config.CheckpointConfig(every_steps=4, keep=2),
  )
