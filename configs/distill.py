"""Distillation of a tiny student into a teacher's next-token distributions on the bundled
chat sample; the teacher runs frozen inside the step (no gradient).

  # 1. any HF model with the student's tokenizer is a teacher, e.g. a quick SFT run:
  python launch/train.py --config=configs/tiny_test.py --workdir=runs/teacher \
      --set=model.hidden_size=64 --set=train.max_steps=200
  # 2. distil it (the argument is the teacher: an HF directory or hub id)
  python launch/train.py --config=configs/distill.py:runs/teacher/hf --workdir=runs/distill

Loss: forward KL(teacher || student) at T=1 over the assistant tokens (alpha=1: no hard
cross-entropy); change with --set=distill.kind=reverse_kl|jsd,
distill.temperature, distill.alpha (weight of the KL term vs CE),
distill.top_k, distill.teacher_quant=nf4 (4-bit teacher), peft.method=lora
(LoRA student). Without the teacher in memory: write its top-k log-probs once, then
  python launch/teacher_logits.py --config=configs/distill.py:runs/teacher/hf \
      --top_k=32 --out=runs/teacher_top32.safetensors
  python launch/train.py --config=configs/distill.py --workdir=runs/distill_file \
      --set=distill.teacher_logits_file=runs/teacher_top32.safetensors
(same data settings for both: examples are looked up by their tokens).

metrics.jsonl logs loss, kl_to_teacher, distill, ce; eval adds val_kl_to_teacher. The
student is random-init here; for a real run --set=model.hf_path=SMALL_MODEL with a teacher
of the same tokenizer.
"""

from jaxtune import config


def get_config(arg=None):
  return config.TrainConfig(
      method="distill",
      model=config.ModelConfig(hidden_size=32, intermediate_size=64, num_layers=2,
                               num_heads=4, num_kv_heads=2, head_dim=8),
      optim=config.OptimConfig(lr=3e-3, warmup_steps=2, schedule="cosine"),
      data=config.DataConfig(format="chat", seq_len=128, batch_size=8),
      train=config.LoopConfig(max_steps=20, eval_every=10, eval_batches=0, progress=False),
      checkpoint=config.CheckpointConfig(every_steps=10, keep=1),
      distill=config.DistillConfig(teacher_path=arg or "", kind="forward_kl", temperature=1.0,
                                   alpha=1.0),
  )
