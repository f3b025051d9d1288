"""Full fine-tuning of a Hugging Face Llama-family model on chat data (SFT).

  python launch/train.py --config=configs/sft_chat.py:meta-llama/Llama-3.2-1B-Instruct \
      --set=data.train_files=my_chats.jsonl --workdir=runs/sft

The argument is the model (local dir or hub id). Loss on every assistant turn, packed rows
of 2048 tokens, bf16 compute over float32 master weights, cuDNN attention on GPU, FSDP over
all devices. model.remat=auto: the memory planner compiles the step once at start-up and
takes the fastest remat policy that fits the device (dots_no_batch, else full, with
scanned layers; none first with model.scan_layers=false). Without
data.train_files it trains on the bundled chat sample. For long runs on one GPU,
--set=model.scan_layers=false --set=train.micro_batch=auto ran ~10% faster at this batch on
an H200 (Llama-3.2-1B shape), after a few minutes more of compiles at start-up
(docs/BENCHMARKS.md).
"""

from jaxtune import config


def get_config(arg=None):
  return config.TrainConfig(
      method="sft",
      model=config.ModelConfig(hf_path=arg or "meta-llama/Llama-3.2-1B-Instruct",
                               dtype="bfloat16", param_dtype="float32", remat="auto",
                               logits_chunk=2048, logits_dtype="compute"),
      optim=config.OptimConfig(lr=1e-5, warmup_steps=50, schedule="cosine", weight_decay=0.0,
                               clip_norm=1.0),
      data=config.DataConfig(format="chat", loss_policy="assistant", seq_len=2048, batch_size=32,
                             pack=True),
      mesh=config.MeshConfig(data=1, fsdp=-1, tensor=1),
      train=config.LoopConfig(max_steps=1000, eval_every=100, eval_batches=8),
      checkpoint=config.CheckpointConfig(every_steps=200, keep=2),
  )
