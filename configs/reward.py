"""A reward model (decoder + scalar head, Bradley-Terry) on the bundled preference sample
with a tiny random-init model, exported as an HF *ForSequenceClassification (num_labels=1).

  python launch/train.py --config=configs/reward.py --workdir=runs/rm
  python -c "import transformers; m = transformers.AutoModelForSequenceClassification\
.from_pretrained('runs/rm/hf')"

The head starts at zero (the first loss is log 2). From a random init on this small sample
the held-out accuracy stays near chance: the recipe shows the mechanics, not a good model.
The score is the head on the last real token of each right-padded sequence (HF pools the
last token that is not pad_token_id, which the export sets). Option `lora` trains LoRA
adapters plus the head (it needs methods.Method.extra_trainable; see
jaxtune/train/preference.py). metrics.jsonl logs loss and rewards/{chosen,rejected,
accuracy,margin}; eval adds val_rewards/accuracy on the 5% held out.

For a real reward model start from an SFT model:
  --set=model.hf_path=DIR_OR_ID --set=optim.lr=1e-5 --set=data.train_files=prefs.jsonl
"""

from jaxtune import config


def get_config(arg=None):
  opts = [o.strip() for o in (arg or "").split(",") if o.strip()]
  bad = [o for o in opts if o not in ("lora", "qlora")]
  if bad:
    raise ValueError(f"configs/reward.py: unknown option(s) {bad}; expected lora or qlora")
  peft = opts[0] if opts else "none"
  return config.TrainConfig(
      method="reward",
      model=config.ModelConfig(hidden_size=64, intermediate_size=128, num_layers=2,
                               num_heads=4, num_kv_heads=2, head_dim=16),
      peft=config.PeftConfig(method=peft, rank=8, alpha=16.0),
      optim=config.OptimConfig(lr=3e-4, warmup_steps=2, schedule="cosine"),
      data=config.DataConfig(format="preference", seq_len=96, batch_size=8),
      train=config.LoopConfig(max_steps=20, eval_every=10, eval_batches=0, progress=False),
      checkpoint=config.CheckpointConfig(every_steps=10, keep=1),
  )
