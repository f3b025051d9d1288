"""An OpenAI-compatible HTTP endpoint over jaxtune's sampler, to try a tuned model from any
OpenAI client or tool.

  python launch/serve.py --model=runs/lora --port=8000
  python launch/serve.py --model=DIR --host=0.0.0.0 --api_key=SECRET   # or JAXTUNE_API_KEY

  client = openai.OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="unused")
  client.chat.completions.create(model="m", messages=[...], max_tokens=64, stream=True)

Endpoints: POST /v1/chat/completions (messages rendered with the model's chat template),
POST /v1/completions (prompt: a string, strings, or token ids), streaming (server-sent
events) or not; GET /v1/models; GET /health. Parameters: max_tokens /
max_completion_tokens, temperature, top_p, n, seed, stream, and top_k / min_p as extras;
chat `logprobs: true` returns each token's log-prob. `stop` strings, `echo` and top
log-probs are refused with 400.

Safety: binds 127.0.0.1 unless --host says otherwise, and then refuses to start without an
API key; with a key, requests without `Authorization: Bearer KEY` get 401. Prompt length,
max_tokens, n and the body size are capped; a malformed request gets a 400 naming the
problem, and no request can stop the server. Concurrent requests are queued and run
together as one batch of rows (serve_batcher.py).
"""

import http.server
import hmac
import json
import os
import sys
import time
import uuid

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app  # noqa: E402
from absl import flags  # noqa: E402

from launch import sampling_io  # noqa: E402
from launch import serve_batcher  # noqa: E402

FLAGS = flags.FLAGS
LOCAL = ("127.0.0.1", "localhost", "::1")
KEY_ENV = "JAXTUNE_API_KEY"


def define_flags() -> None:
  """The command line; defined by __main__ only, so tests import this module flag-free."""
  from launch import common
  common.define_runtime_flags()
  sampling_io.define_model_flags()
  flags.DEFINE_string("host", "127.0.0.1", "Address to bind; anything but localhost needs an "
                      "API key.")
  flags.DEFINE_integer("port", 8000, "Port (0 = any free port; the chosen one is printed).")
  flags.DEFINE_string("api_key", None, f"Required bearer token (default: ${KEY_ENV}).")
  flags.DEFINE_string("served_model_name", "", "Model name in responses (default: --model's "
                      "base name).")
  flags.DEFINE_integer("max_prompt_tokens", 4096, "Longest prompt accepted (tokens).")
  flags.DEFINE_integer("max_tokens", 1024, "Largest max_tokens accepted.")
  flags.DEFINE_integer("default_max_tokens", 256, "max_tokens when a request gives none.")
  flags.DEFINE_integer("max_n", 8, "Largest n (completions per prompt).")
  flags.DEFINE_integer("max_batch", 32, "Most rows sampled together.")
  flags.DEFINE_float("batch_wait_ms", 20.0, "How long the first queued request waits for "
                     "others to batch with.")
  flags.DEFINE_integer("max_body_bytes", 4 << 20, "Largest request body.")


class Server(http.server.ThreadingHTTPServer):
  """The HTTP server plus what its handlers need."""
  daemon_threads = True

  def __init__(self, addr, model, batcher, *, limits, api_key, name, max_body):
    super().__init__(addr, Handler)
    self.model, self.batcher, self.limits = model, batcher, limits
    self.api_key, self.name, self.max_body = api_key, name, max_body


def _error(status: int, message: str, kind: str = "invalid_request_error", code=None) -> dict:
  return {"status": status, "body": {"error": {"message": message, "type": kind, "param": None,
                                               "code": code}}}


class Handler(http.server.BaseHTTPRequestHandler):
  server: Server
  protocol_version = "HTTP/1.0"  # one request per connection; streams end with the connection

  def log_message(self, fmt, *args):  # one line per request on stderr
    sys.stderr.write(f"serve: {self.address_string()} {fmt % args}\n")

  def _send(self, status: int, body: dict) -> None:
    data = json.dumps(body).encode()
    self.send_response(status)
    self.send_header("Content-Type", "application/json")
    self.send_header("Content-Length", str(len(data)))
    self.end_headers()
    self.wfile.write(data)

  def _authorized(self) -> bool:
    if not self.server.api_key:
      return True
    got = self.headers.get("Authorization", "")
    want = f"Bearer {self.server.api_key}"
    return hmac.compare_digest(got.encode(), want.encode())

  def do_GET(self):  # noqa: N802 (http.server's name)
    if not self._authorized():
      return self._send(**_error(401, "missing or wrong API key", code="invalid_api_key"))
    if self.path.rstrip("/") == "/v1/models":
      return self._send(200, {"object": "list", "data": [
          {"id": self.server.name, "object": "model", "created": 0, "owned_by": "jaxtune"}]})
    if self.path == "/health":
      return self._send(200, {"status": "ok", "sampler_calls": self.server.batcher.calls})
    return self._send(**_error(404, f"no route {self.path}", code="not_found"))

  def do_POST(self):  # noqa: N802
    if not self._authorized():
      return self._send(**_error(401, "missing or wrong API key", code="invalid_api_key"))
    path = self.path.rstrip("/")
    if path not in ("/v1/chat/completions", "/v1/completions"):
      return self._send(**_error(404, f"no route {self.path}", code="not_found"))
    try:
      job = self._parse(path)
    except serve_batcher.BadRequest as e:
      return self._send(**_error(400, str(e)))
    self.server.batcher.submit(job)
    (self._stream if job.stream else self._answer)(job)

  def _parse(self, path: str):
    length = self.headers.get("Content-Length")
    if length is None or not length.isdigit():
      raise serve_batcher.BadRequest("a JSON body with a Content-Length header is required")
    if int(length) > self.server.max_body:
      raise serve_batcher.BadRequest(f"the body has {length} bytes; at most "
                                     f"{self.server.max_body} are accepted")
    raw = self.rfile.read(int(length))
    try:
      body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
      raise serve_batcher.BadRequest(f"malformed JSON body: {e}") from None
    if not isinstance(body, dict):
      raise serve_batcher.BadRequest("the body must be a JSON object")
    m, lim = self.server.model, self.server.limits
    if path.endswith("chat/completions"):
      return serve_batcher.parse_chat(body, m.tok, lim, sampling_io.chat_ids)
    return serve_batcher.parse_completion(body, m.tok, lim, sampling_io.text_ids,
                                          m.cfg.vocab_size)

  def _head(self, job) -> dict:
    kind = "chat.completion" if job.kind == "chat" else "text_completion"
    return {"id": f"{'chatcmpl' if job.kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex[:24]}",
            "object": kind, "created": int(time.time()), "model": self.server.name}

  def _choice(self, job, i: int, text: str, res: dict | None, delta: bool) -> dict:
    finish = None if res is None else ("stop" if res["finished"] else "length")
    if job.kind == "completion":
      return {"index": i, "text": text, "logprobs": None, "finish_reason": finish}
    c = {"index": i, "finish_reason": finish, "logprobs": None}
    if res is not None and job.logprobs:
      tok = self.server.model.tok
      c["logprobs"] = {"content": [
          {"token": tok.decode([t]), "logprob": lp, "bytes": list(tok.decode([t]).encode()),
           "top_logprobs": []} for t, lp in zip(res["tokens"], res["logprobs"])]}
    c["delta" if delta else "message"] = ({"content": text} if delta else
                                          {"role": "assistant", "content": text})
    return c

  def _answer(self, job) -> None:
    kind, payload = job.events.get()
    while kind == "delta":
      kind, payload = job.events.get()
    if kind == "error":
      return self._send(**_error(500, payload, kind="server_error"))
    tok = self.server.model.tok
    choices = [self._choice(job, i, tok.decode(r["tokens"], skip_special_tokens=True), r, False)
               for i, r in enumerate(payload)]
    used = sum(len(r["tokens"]) for r in payload)
    prompt = sum(len(p) for p in job.prompts)
    self._send(200, {**self._head(job), "choices": choices, "usage": {
        "prompt_tokens": prompt, "completion_tokens": used, "total_tokens": prompt + used}})

  def _event(self, body) -> None:
    data = body if isinstance(body, str) else json.dumps(body)
    self.wfile.write(f"data: {data}\n\n".encode())
    self.wfile.flush()

  def _stream(self, job) -> None:
    self.send_response(200)
    self.send_header("Content-Type", "text/event-stream")
    self.send_header("Cache-Control", "no-cache")
    self.end_headers()
    head = dict(self._head(job), object=("chat.completion.chunk" if job.kind == "chat"
                                         else "text_completion"))
    sent = [""] * len(job.rows)
    if job.kind == "chat":
      for i in range(len(job.rows)):
        self._event({**head, "choices": [{"index": i, "delta": {"role": "assistant",
                                                                 "content": ""},
                                          "logprobs": None, "finish_reason": None}]})
    tok = self.server.model.tok
    while True:
      kind, payload = job.events.get()
      if kind == "error":
        self._event({"error": {"message": payload, "type": "server_error"}})
        break
      if kind == "delta":
        i, text = payload
        sent[i] += text
        self._event({**head, "choices": [self._choice(job, i, text, None, True)]})
        continue
      for i, r in enumerate(payload):
        rest = tok.decode(r["tokens"], skip_special_tokens=True)[len(sent[i]):]
        self._event({**head, "choices": [self._choice(job, i, rest, r, True)]})
      break
    self._event("[DONE]")


def make_server(model, *, host: str = "127.0.0.1", port: int = 0, api_key: str | None = None,
                name: str = "jaxtune", limits=None, max_batch: int = 32,
                batch_wait_s: float = 0.02, max_body: int = 4 << 20, chunk: int = 8) -> Server:
  """A ready server (call .serve_forever()); refuses a non-local host without an API key."""
  if host not in LOCAL and not api_key:
    raise ValueError(f"--host={host} exposes the model beyond this machine: set --api_key or "
                     f"${KEY_ENV} (or bind 127.0.0.1)")
  limits = limits or serve_batcher.Limits(max_prompt_tokens=4096, max_tokens=1024,
                                          default_max_tokens=256, max_n=8,
                                          max_position=model.cfg.max_position_embeddings)
  batcher = serve_batcher.Batcher(model, max_rows=max_batch, wait_s=batch_wait_s, chunk=chunk)
  return Server((host, port), model, batcher, limits=limits, api_key=api_key, name=name,
                max_body=max_body)


def main(argv):
  from launch import common
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  api_key = FLAGS.api_key or os.environ.get(KEY_ENV) or None
  if FLAGS.host not in LOCAL and not api_key:
    raise app.UsageError(f"--host={FLAGS.host} needs an API key: --api_key or ${KEY_ENV}")
  common.setup_runtime()
  model = sampling_io.load_model()
  limits = serve_batcher.Limits(FLAGS.max_prompt_tokens, FLAGS.max_tokens,
                                min(FLAGS.default_max_tokens, FLAGS.max_tokens), FLAGS.max_n,
                                model.cfg.max_position_embeddings)
  name = FLAGS.served_model_name or os.path.basename(os.path.abspath(FLAGS.model))
  server = make_server(model, host=FLAGS.host, port=FLAGS.port, api_key=api_key, name=name,
                       limits=limits, max_batch=FLAGS.max_batch,
                       batch_wait_s=FLAGS.batch_wait_ms / 1000, max_body=FLAGS.max_body_bytes)
  host, port = server.server_address[:2]
  print(f"serving {name} on http://{host}:{port}/v1", flush=True)
  try:
    server.serve_forever()
  except KeyboardInterrupt:
    pass
  finally:
    server.server_close()
    server.batcher.stop()


if __name__ == "__main__":
  define_flags()
  from launch import common  # noqa: E402
  common.run(main)
