"""The TRL side of launch/bench_grpo.py: GRPOTrainer on the same shape, prompts and reward.

Its default generation backend (transformers `generate`; TRL's vLLM modes need vllm, which the
GPU machine does not have), sdpa attention, bf16, gradient checkpointing outside --smoke.
Rollout and generation time are measured by wrapping the trainer's own
`_generate_and_score_completions` and `_generate` (CUDA synchronised around each), the step
time by a TrainerCallback; update = step - rollout.
"""

import os
import tempfile
import time

from launch import bench_grpo


def run(spec: dict) -> dict:
  """TRL GRPOTrainer steps of `spec` (bench_grpo.py's docstring); raw timings per step."""
  os.environ.setdefault("JAX_PLATFORMS", "cpu")  # jaxtune.hf.config imports jax: keep it off
  import datasets
  import peft
  import torch
  import transformers
  import trl
  from jaxtune.hf import config as hf_config
  dev = "cuda" if torch.cuda.is_available() and not spec["smoke"] else "cpu"
  model_cfg = bench_grpo.shape_config(spec)
  hf = transformers.LlamaConfig(**{k: v for k, v in hf_config.to_hf(model_cfg).items()
                                   if k not in ("torch_dtype", "dtype", "architectures")})
  hf.eos_token_id, hf.pad_token_id, hf.bos_token_id = bench_grpo.EOS, bench_grpo.PAD, None
  torch.manual_seed(0)
  with torch.device(dev):
    model = transformers.LlamaForCausalLM._from_config(hf, attn_implementation="sdpa",  # noqa: SLF001
                                                       dtype=torch.bfloat16)
  tok = bench_grpo.word_tokenizer(model_cfg.vocab_size)
  n = spec["prompts"] * (spec["warmup"] + spec["steps"])
  ids = [row for s in range(spec["warmup"] + spec["steps"])
         for row in bench_grpo.prompt_ids(spec, model_cfg.vocab_size, s)]
  data = datasets.Dataset.from_dict({"prompt": [" ".join(f"t{i}" for i in r) for r in ids[:n]]})
  rows_per_step = spec["prompts"] * spec["generations"]
  micro = min(spec["trl_micro_batch"], rows_per_step)
  args = trl.GRPOConfig(
      output_dir=tempfile.mkdtemp(), per_device_train_batch_size=micro,
      gradient_accumulation_steps=rows_per_step // micro, num_generations=spec["generations"],
      max_completion_length=spec["new"], temperature=1.0, top_k=0, top_p=1.0, beta=0.0,
      num_iterations=1, loss_type="dapo", learning_rate=1e-6, lr_scheduler_type="constant",
      warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0, bf16=dev == "cuda",
      use_cpu=dev == "cpu", gradient_checkpointing=not spec["smoke"],
      max_steps=spec["warmup"] + spec["steps"], logging_steps=1, save_strategy="no",
      report_to=[], shuffle_dataset=False, seed=0, use_vllm=False,
      generation_kwargs={"min_new_tokens": spec["new"]})
  lora_cfg = None
  if spec["method"] != "full":
    lora_cfg = peft.LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, bias="none",
                               target_modules=["q_proj", "k_proj", "v_proj", "o_proj",
                                               "gate_proj", "up_proj", "down_proj"],
                               task_type="CAUSAL_LM")
  trainer = trl.GRPOTrainer(model=model, reward_funcs=bench_grpo.even_share, args=args,
                            train_dataset=data, processing_class=tok, peft_config=lora_cfg)
  sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
  times = {"generate": [], "rollout": [], "step": [], "lens": []}

  def timed(name, fn):
    def wrapper(*a, **kw):
      sync()
      t = time.perf_counter()
      out = fn(*a, **kw)
      sync()
      times[name].append(time.perf_counter() - t)
      if name == "generate":
        times["lens"].extend(len(c) for c in out[1])  # (prompt_ids, completion_ids, ...)
      return out
    return wrapper

  trainer._generate = timed("generate", trainer._generate)  # noqa: SLF001
  trainer._generate_and_score_completions = timed(  # noqa: SLF001
      "rollout", trainer._generate_and_score_completions)  # noqa: SLF001

  class Clock(transformers.TrainerCallback):
    def on_step_begin(self, *a, **kw):
      sync()
      self.t = time.perf_counter()

    def on_step_end(self, *a, **kw):
      sync()
      times["step"].append(time.perf_counter() - self.t)

  trainer.add_callback(Clock())
  if dev == "cuda":
    torch.cuda.reset_peak_memory_stats()
  trainer.train()
  w = spec["warmup"]
  assert set(times["lens"]) == {spec["new"]}, f"completions of {set(times['lens'])} tokens"
  rows = [{"rollout_s": r, "generate_s": g, "update_s": s - r}
          for r, g, s in zip(times["rollout"][w:], times["generate"][w:], times["step"][w:])]
  losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
  return {"rows": rows, "losses": losses,
          "peak_bytes": torch.cuda.max_memory_allocated() if dev == "cuda" else None,
          "device": torch.cuda.get_device_name() if dev == "cuda" else "cpu",
          "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                       "trl": trl.__version__, "peft": peft.__version__},
          "config_extra": f"generate=transformers (no vLLM), ckpt={'on' if not spec['smoke'] else 'off'},"
                          f" micro_batch={micro}"}
