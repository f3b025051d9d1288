"""DPO on the bundled preference sample with a tiny random-init model: a few steps of the
whole method (one forward for chosen + rejected, frozen reference, reward metrics).

  python launch/train.py --config=configs/dpo.py --workdir=runs/dpo
  python launch/train.py --config=configs/dpo.py:lora --workdir=runs/dpo_lora
  python launch/train.py --config=configs/dpo.py:simpo --workdir=runs/simpo
  python launch/train.py --config=configs/dpo.py:lora,ipo,precomputed --workdir=runs/x

The argument is a comma-separated list of options:
  sigmoid (default) | ipo | hinge | robust | simpo | orpo     dpo.loss_type
  lora | qlora                                                peft.method (rank 8)
  frozen | adapters_off | precomputed                         dpo.reference
(default reference: a frozen copy for full fine-tuning, the base with adapters off for
LoRA). SimPO uses the paper's beta=2.0, gamma=0.5; the others beta=0.1.

Data: jaxtune/assets/sample/preference.jsonl ({"prompt", "chosen", "rejected"}), 5% held
out; metrics.jsonl logs loss, rewards/{chosen,rejected,accuracy,margin}, logps/*, and
val_* at every eval. For a real run start from an SFT model and lower the learning rate:
  --set=model.hf_path=DIR_OR_ID --set=optim.lr=5e-7 --set=data.train_files=prefs.jsonl
  --set=data.seq_len=1024 --set=train.max_steps=1000
"""

from jaxtune import config

LOSS_TYPES = ("sigmoid", "ipo", "hinge", "robust", "simpo", "orpo")
REFERENCES = ("frozen", "adapters_off", "precomputed")


def get_config(arg=None):
  opts = [o.strip() for o in (arg or "").split(",") if o.strip()]
  known = LOSS_TYPES + REFERENCES + ("lora", "qlora")
  bad = [o for o in opts if o not in known]
  if bad:
    raise ValueError(f"configs/dpo.py: unknown option(s) {bad}; expected any of {known}")
  loss_type = next((o for o in opts if o in LOSS_TYPES), "sigmoid")
  peft = next((o for o in opts if o in ("lora", "qlora")), "none")
  reference = next((o for o in opts if o in REFERENCES),
                   "frozen" if peft == "none" else "adapters_off")
  simpo = loss_type == "simpo"
  return config.TrainConfig(
      method="dpo",
      model=config.ModelConfig(hidden_size=64, intermediate_size=128, num_layers=2,
                               num_heads=4, num_kv_heads=2, head_dim=16),
      peft=config.PeftConfig(method=peft, rank=8, alpha=16.0, quant_group_size=64),
      optim=config.OptimConfig(lr=1e-3 if peft == "none" else 5e-3, warmup_steps=2,
                               schedule="cosine"),
      data=config.DataConfig(format="preference", seq_len=96, batch_size=8),
      train=config.LoopConfig(max_steps=20, eval_every=10, eval_batches=0, progress=False),
      checkpoint=config.CheckpointConfig(every_steps=10, keep=1),
      dpo=config.DpoConfig(loss_type=loss_type, beta=2.0 if simpo else 0.1, simpo_gamma=0.5,
                           reference=reference),
  )
