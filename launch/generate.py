"""Sample from a model: one prompt, a prompts file, or an interactive chat in the terminal.

  python launch/generate.py --model=runs/default --prompt="Once upon a time"
  python launch/generate.py --model=meta-llama/Llama-3.2-1B-Instruct --dtype=bfloat16
      --prompts=prompts.jsonl --out=completions.jsonl --num_samples=4 --temperature=1
  python launch/generate.py --model=runs/lora --chat          # /reset, /exit

--model is an HF directory or hub id, a training run's workdir (its latest checkpoint, a PEFT
run's adapters included) or a `convert.py --from_hf` output; --adapter adds a PEFT adapter
directory. Everything loads through `jaxtune.weights.load`; sampling is `jaxtune.sampling`.

--prompts records (JSONL): {"prompt": "text"} is used as it is (no template);
{"messages": [...]} or {"prompt": [messages]} (optionally with "system") is rendered with the
model's chat template and the assistant turn opened. --out gets one JSON line per completion:
{"index", "sample", "prompt", "completion", "tokens", "logprobs", "finish_reason"}.
"""

import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app  # noqa: E402
from absl import flags  # noqa: E402

from launch import common  # noqa: E402
from launch import sampling_io  # noqa: E402

FLAGS = flags.FLAGS
common.define_runtime_flags()
sampling_io.define_model_flags()
flags.DEFINE_string("prompt", None, "One prompt, used as it is (no chat template).")
flags.DEFINE_string("prompts", None, "A JSONL file of prompt records (see the module doc).")
flags.DEFINE_string("out", "", "Write completions here as JSONL (default: print them).")
flags.DEFINE_integer("num_samples", 1, "Completions per prompt.")
flags.DEFINE_integer("batch_size", 64, "Prompts sampled together (one compiled batch).")
flags.DEFINE_bool("chat", False, "Interactive multi-turn chat on stdin/stdout, streaming the "
                  "reply; /reset starts over, /exit (or end of input) quits.")
flags.DEFINE_string("system", "", "--chat: a system message opening the conversation.")
flags.DEFINE_bool("progress", True, "A progress bar with tokens/s on stderr (--prompts).")


def _records(path: str, tok) -> list[tuple[str, object, list[int]]]:
  """(where, prompt as given, token ids) per record of a JSONL prompts file."""
  from jaxtune.data import errors
  from jaxtune.data import formats
  from jaxtune.data import sources
  out = []
  for source in sources.parse(path, setting="--prompts"):
    for where, rec in sources.read(source):
      if isinstance(rec, errors.DataError):
        raise rec
      if isinstance(rec.get("prompt"), str) and "system" not in rec:
        out.append((where, rec["prompt"], sampling_io.text_ids(tok, rec["prompt"])))
        continue
      messages = formats.normalize(rec, "prompt", where).messages
      out.append((where, messages, sampling_io.chat_ids(tok, messages)))
  if not out:
    raise errors.DataError(f"--prompts: {path} holds no records")
  return out


def _sample_all(m, prompts: list[list[int]]):
  """Generation results for every (prompt, sample), batched; yields (i, sample, gen row)."""
  import jax
  import tqdm
  from jaxtune import sampling
  jobs = [(i, s) for i in range(len(prompts)) for s in range(FLAGS.num_samples)]
  key = jax.random.PRNGKey(FLAGS.seed)
  bar = tqdm.tqdm(total=len(jobs), unit="completion", disable=not FLAGS.progress,
                  file=sys.stderr)
  made, t0 = 0, time.perf_counter()
  for lo in range(0, len(jobs), FLAGS.batch_size):
    batch = jobs[lo:lo + FLAGS.batch_size]
    rows = sampling.api.rows_for([prompts[i] for i, _ in batch],
                                 max_new_tokens=FLAGS.max_new_tokens,
                                 temperature=FLAGS.temperature, top_p=FLAGS.top_p,
                                 min_p=FLAGS.min_p, key=jax.random.fold_in(key, lo))
    gen = next(sampling.run_rows(m.cfg, m.params, rows, top_k=FLAGS.top_k, eos_ids=m.eos_ids))
    made += sum(len(t) for t in gen.tokens)
    bar.update(len(batch))
    bar.set_postfix(tokens_per_s=f"{made / (time.perf_counter() - t0):,.0f}")
    for j, (i, s) in enumerate(batch):
      yield i, s, gen.tokens[j], gen.logprobs[j], gen.finished[j]
  bar.close()


def _batch(m) -> None:
  if FLAGS.prompt is not None:
    recs = [("--prompt", FLAGS.prompt, sampling_io.text_ids(m.tok, FLAGS.prompt))]
  else:
    recs = _records(FLAGS.prompts, m.tok)
  out = open(FLAGS.out, "w", encoding="utf-8") if FLAGS.out else None
  try:
    for i, s, toks, lps, fin in _sample_all(m, [ids for _, _, ids in recs]):
      text = m.tok.decode(toks, skip_special_tokens=True)
      row = {"index": i, "sample": s, "prompt": recs[i][1], "completion": text,
             "tokens": toks, "logprobs": lps, "finish_reason": "stop" if fin else "length"}
      if out:
        out.write(json.dumps(row, ensure_ascii=False) + "\n")
      elif FLAGS.prompt is not None:
        print(text, flush=True)
      else:
        print(json.dumps(row, ensure_ascii=False), flush=True)
  finally:
    if out:
      out.close()


def _reply(m, messages: list[dict], turn: int) -> str:
  """Streams the assistant's reply to stdout; returns its text."""
  import jax
  from jaxtune import sampling
  ids = sampling_io.chat_ids(m.tok, messages)
  text = sampling_io.TextStream(m.tok)
  key = jax.random.fold_in(jax.random.PRNGKey(FLAGS.seed), turn)
  for part in sampling.stream(m.cfg, m.params, [ids], max_new_tokens=FLAGS.max_new_tokens,
                              temperature=FLAGS.temperature, top_k=FLAGS.top_k,
                              top_p=FLAGS.top_p, min_p=FLAGS.min_p, eos_ids=m.eos_ids,
                              key=key):
    sys.stdout.write(text.update(part.tokens[0]))
    sys.stdout.flush()
  final = m.tok.decode(part.tokens[0], skip_special_tokens=True)
  sys.stdout.write(final[len(text.text):] + "\n")
  sys.stdout.flush()
  return final


def _chat(m) -> None:
  start = [{"role": "system", "content": FLAGS.system}] if FLAGS.system else []
  messages = list(start)
  print("chat: type a message; /reset starts over, /exit quits", file=sys.stderr, flush=True)
  turn = 0
  while True:
    sys.stdout.write("> ")
    sys.stdout.flush()
    line = sys.stdin.readline()
    if not line or line.strip() == "/exit":
      break
    line = line.rstrip("\n")
    if line.strip() == "/reset":
      messages = list(start)
      print("(conversation reset)", file=sys.stderr, flush=True)
      continue
    if not line.strip():
      continue
    messages.append({"role": "user", "content": line})
    reply = _reply(m, messages, turn)
    messages.append({"role": "assistant", "content": reply})
    turn += 1


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  modes = [FLAGS.prompt is not None, FLAGS.prompts is not None, FLAGS.chat]
  if sum(modes) != 1:
    raise app.UsageError("give exactly one of --prompt, --prompts, --chat")
  if FLAGS.num_samples < 1 or FLAGS.batch_size < 1:
    raise app.UsageError("--num_samples and --batch_size must be >= 1")
  from jaxtune import sampling
  try:
    sampling.api.check_settings(max_new_tokens=FLAGS.max_new_tokens,
                                temperature=FLAGS.temperature, top_k=FLAGS.top_k,
                                top_p=FLAGS.top_p, min_p=FLAGS.min_p)
  except ValueError as e:
    raise app.UsageError(str(e)) from None
  common.setup_runtime()
  m = sampling_io.load_model()
  if FLAGS.chat:
    _chat(m)
  else:
    _batch(m)


if __name__ == "__main__":
  common.run(main)
