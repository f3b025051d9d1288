"""The serving side of launch/serve.py: parsed requests, and the thread that batches them into
the sampler.

HTTP handler threads turn a request body into a `Job` (`parse_chat` / `parse_completion`,
which raise `BadRequest` with the field and what was expected) and hand it to the
`Batcher`. The batcher's one thread owns the sampler: it takes the oldest job, waits up to
`wait_s` for more that can share a program (same top-k), and runs them as one batch of rows
(`sampling.run_rows`, streaming), sending each job its text deltas as chunks of tokens come
and its result as soon as all its rows have stopped. Jobs that arrive meanwhile wait for the
next batch (finished rows are not refilled mid-batch). `calls` counts sampler runs.
"""

import dataclasses
import queue
import threading
import time
import traceback
from typing import Any

import numpy as np

ROLES = ("system", "user", "assistant")


class BadRequest(ValueError):
  """A request the server refuses with 400; the message names the field."""


@dataclasses.dataclass
class Limits:
  max_prompt_tokens: int
  max_tokens: int
  default_max_tokens: int
  max_n: int
  max_position: int


@dataclasses.dataclass
class Job:
  kind: str  # "chat" | "completion"
  prompts: list[list[int]]  # one per prompt (completions may batch several)
  n: int
  max_tokens: int
  temperature: float
  top_p: float
  top_k: int
  min_p: float
  seed: int | None
  stream: bool
  logprobs: bool
  events: queue.Queue = dataclasses.field(default_factory=queue.Queue)
  rows: list = dataclasses.field(default_factory=list)
  texts: list = dataclasses.field(default_factory=list)
  done: bool = False


def _number(body: dict, name: str, default, lo, hi, kind=float):
  v = body.get(name)
  if v is None:
    return default
  if isinstance(v, bool) or not isinstance(v, (int, float)) or (kind is int and v != int(v)):
    raise BadRequest(f"'{name}' must be a{'n integer' if kind is int else ' number'}, got "
                     f"{json_short(v)}")
  if not lo <= v <= hi:
    raise BadRequest(f"'{name}' must be in [{lo}, {hi}], got {v}")
  return kind(v)


def json_short(v: Any) -> str:
  s = repr(v)
  return s if len(s) <= 60 else s[:57] + "..."


def _common(body: dict, limits: Limits, prompt_lens: list[int], max_key: str) -> dict:
  if body.get("stop") not in (None, [], ""):
    raise BadRequest("'stop' sequences are not supported; the model stops at its "
                     "end-of-turn token or 'max_tokens'")
  seed = body.get("seed")
  if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
    raise BadRequest(f"'seed' must be an integer, got {json_short(seed)}")
  stream = body.get("stream", False)
  if not isinstance(stream, bool):
    raise BadRequest(f"'stream' must be true or false, got {json_short(stream)}")
  out = dict(
      n=_number(body, "n", 1, 1, limits.max_n, int),
      temperature=_number(body, "temperature", 1.0, 0.0, 2.0),
      top_p=_number(body, "top_p", 1.0, 1e-9, 1.0), top_k=_number(body, "top_k", 0, 0, 10**6, int),
      min_p=_number(body, "min_p", 0.0, 0.0, 1.0), seed=seed, stream=stream)
  max_tokens = _number(body, max_key, None, 1, 10**9, int)
  if max_tokens is None and max_key != "max_tokens":
    max_tokens = _number(body, "max_tokens", None, 1, 10**9, int)
  if max_tokens is not None and max_tokens > limits.max_tokens:
    raise BadRequest(f"'{max_key}' is {max_tokens}; this server allows at most "
                     f"{limits.max_tokens} (--max_tokens)")
  longest = max(prompt_lens)
  if longest > limits.max_prompt_tokens:
    raise BadRequest(f"the prompt has {longest} tokens; this server takes at most "
                     f"{limits.max_prompt_tokens} (--max_prompt_tokens)")
  room = limits.max_position - longest
  if max_tokens is None:  # the default, shortened to what the model's positions leave
    max_tokens = min(limits.default_max_tokens, room)
  if max_tokens < 1 or longest + max_tokens > limits.max_position:
    raise BadRequest(f"the prompt ({longest} tokens) plus '{max_key}' ({max_tokens}) exceeds "
                     f"the model's {limits.max_position} positions")
  return dict(out, max_tokens=max_tokens)


def _content(m: dict, i: int) -> str:
  c = m.get("content")
  if isinstance(c, list):  # [{"type": "text", "text": ...}, ...]
    parts = []
    for j, p in enumerate(c):
      if not isinstance(p, dict) or p.get("type") != "text" or not isinstance(p.get("text"), str):
        raise BadRequest(f"'messages[{i}].content[{j}]' must be a text part "
                         "{'type': 'text', 'text': str}")
      parts.append(p["text"])
    return "".join(parts)
  if not isinstance(c, str):
    raise BadRequest(f"'messages[{i}].content' must be a string, got {json_short(c)}")
  return c


def parse_chat(body: dict, tok, limits: Limits, chat_ids) -> Job:
  msgs = body.get("messages")
  if not isinstance(msgs, list) or not msgs:
    raise BadRequest("'messages' must be a non-empty list of {'role', 'content'} objects")
  messages = []
  for i, m in enumerate(msgs):
    if not isinstance(m, dict) or m.get("role") not in ROLES:
      raise BadRequest(f"'messages[{i}].role' must be one of {', '.join(ROLES)}")
    messages.append({"role": m["role"], "content": _content(m, i)})
  try:
    ids = chat_ids(tok, messages)
  except Exception as e:  # noqa: BLE001 (the template's own error, e.g. roles out of order)
    raise BadRequest(f"'messages' rejected by the model's chat template: {e}") from None
  lp = body.get("logprobs", False)
  if not isinstance(lp, bool) or body.get("top_logprobs") not in (None, 0):
    raise BadRequest("'logprobs' must be true or false ('top_logprobs' is not supported)")
  return Job("chat", [ids], logprobs=lp,
             **_common(body, limits, [len(ids)], "max_completion_tokens"))


def parse_completion(body: dict, tok, limits: Limits, text_ids, vocab: int) -> Job:
  p = body.get("prompt")
  if isinstance(p, str):
    prompts = [text_ids(tok, p)]
  elif isinstance(p, list) and p and all(isinstance(x, str) for x in p):
    prompts = [text_ids(tok, x) for x in p]
  elif isinstance(p, list) and p and all(isinstance(x, int) and not isinstance(x, bool)
                                          for x in p):
    if not all(0 <= x < vocab for x in p):
      raise BadRequest(f"'prompt' token ids must be in [0, {vocab})")
    prompts = [list(p)]
  else:
    raise BadRequest("'prompt' must be a string, a list of strings or a list of token ids")
  if any(not ids for ids in prompts):
    raise BadRequest("'prompt' is empty")
  if body.get("logprobs") not in (None, 0) or body.get("echo") or body.get("suffix"):
    raise BadRequest("'logprobs', 'echo' and 'suffix' are not supported for completions")
  return Job("completion", prompts, logprobs=False,
             **_common(body, limits, [len(x) for x in prompts], "max_tokens"))


class Batcher:
  """One thread running the sampler over batches of jobs (see the module docstring)."""

  def __init__(self, model, *, max_rows: int = 32, wait_s: float = 0.02, chunk: int = 8):
    self.model, self.max_rows, self.wait_s, self.chunk = model, max_rows, wait_s, chunk
    self.queue: queue.Queue = queue.Queue()
    self.calls = 0
    self._thread = threading.Thread(target=self._loop, name="sampler", daemon=True)
    self._thread.start()

  def submit(self, job: Job) -> None:
    from jaxtune.sampling import api
    import jax
    seed = job.seed if job.seed is not None else int(np.random.randint(0, 2**31 - 1))
    key = jax.random.PRNGKey(seed)
    for p in job.prompts:
      job.rows += api.rows_for([p] * job.n, max_new_tokens=job.max_tokens,
                               temperature=job.temperature, top_p=job.top_p, min_p=job.min_p,
                               key=jax.random.fold_in(key, len(job.rows)))
    self.queue.put(job)

  def stop(self) -> None:
    self.queue.put(None)
    self._thread.join(timeout=60)

  def _take(self, pending: list) -> list | None:
    first = pending.pop(0) if pending else self.queue.get()
    if first is None:
      return None
    batch, rows = [first], len(first.rows)
    keep = []
    for j in pending:  # compatible jobs that waited first
      if j.top_k == first.top_k and rows + len(j.rows) <= self.max_rows:
        batch.append(j)
        rows += len(j.rows)
      else:
        keep.append(j)
    pending[:] = keep
    deadline = time.monotonic() + self.wait_s
    while rows < self.max_rows and (left := deadline - time.monotonic()) > 0:
      try:
        j = self.queue.get(timeout=left)
      except queue.Empty:
        break
      if j is None:
        self.queue.put(None)
        break
      if j.top_k == first.top_k and rows + len(j.rows) <= self.max_rows:
        batch.append(j)
        rows += len(j.rows)
      else:
        pending.append(j)
    return batch

  def _loop(self) -> None:
    pending: list = []
    while (batch := self._take(pending)) is not None:
      try:
        self._run(batch)
      except Exception as e:  # noqa: BLE001 (the jobs get a 500; the server keeps serving)
        traceback.print_exc()
        for job in batch:
          if not job.done:
            job.done = True
            job.events.put(("error", f"{type(e).__name__}: {e}"))

  def _run(self, batch: list[Job]) -> None:
    from jaxtune import sampling
    from launch import sampling_io
    m = self.model
    rows = [r for job in batch for r in job.rows]
    for job in batch:
      job.texts = [sampling_io.TextStream(m.tok) for _ in job.rows]
    self.calls += 1
    gen = None
    for gen in sampling.run_rows(m.cfg, m.params, rows, top_k=batch[0].top_k,
                                 eos_ids=m.eos_ids, chunk=self.chunk, stream=True,
                                 min_rows=min(8, self.max_rows), min_prompt=32):
      self._progress(batch, gen, final=False)
    self._progress(batch, gen, final=True)

  def _progress(self, batch: list[Job], gen, *, final: bool) -> None:
    off = 0
    for job in batch:
      idx = range(off, off + len(job.rows))
      off += len(job.rows)
      if job.done:
        continue
      if job.stream:
        for c, i in enumerate(idx):
          delta = job.texts[c].update(gen.tokens[i])
          if delta:
            job.events.put(("delta", (c, delta)))
      stopped = [gen.finished[i] or len(gen.tokens[i]) >= job.max_tokens for i in idx]
      if final or all(stopped):
        job.done = True
        job.events.put(("done", [dict(tokens=gen.tokens[i], logprobs=gen.logprobs[i],
                                      finished=gen.finished[i]) for i in idx]))
