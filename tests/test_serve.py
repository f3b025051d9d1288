"""launch/serve.py through the official `openai` client: chat and completions, streaming and
not, against transformers' greedy generate; batching of concurrent requests; API keys; 400s
that leave the server serving; the refusal to bind beyond localhost without a key.

The server runs in this process on 127.0.0.1 (a free port), over a tiny random Qwen2 with the
bundled tokenizer (ChatML template, <|im_end|> = id 2 as eos).
"""

import concurrent.futures
import http.client
import json
import os
import subprocess
import sys
import threading

import numpy as np
import openai
import pytest
import torch

import jaxtune
from jaxtune import data
from launch import sampling_io
from launch import serve
from tests import hf_models

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAX_TOKENS = 8


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  d = str(tmp_path_factory.mktemp("serve_model"))
  model = hf_models.make("qwen2", vocab_size=512, tie_word_embeddings=False)
  model.save_pretrained(d, safe_serialization=True)
  tok = data.load_tokenizer("")
  tok.save_pretrained(d)
  cfg, params = jaxtune.load_hf(d)
  tok = data.load_tokenizer(d)
  m = sampling_io.Model(cfg, params, tok, (2,), d)
  return model, m


def _start(m, **kw):
  server = serve.make_server(m, port=0, name="tiny", batch_wait_s=0.05, chunk=4, **kw)
  threading.Thread(target=server.serve_forever, daemon=True).start()
  return server


@pytest.fixture(scope="module")
def server(tiny):
  s = _start(tiny[1])
  yield s
  s.shutdown()
  s.batcher.stop()


def _client(server, key="unused"):
  host, port = server.server_address[:2]
  return openai.OpenAI(base_url=f"http://{host}:{port}/v1", api_key=key, max_retries=0)


def _hf_text(tiny, ids, n=MAX_TOKENS):
  model, m = tiny
  out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids),
                       dtype=torch.long), max_new_tokens=n, do_sample=False, eos_token_id=2,
                       pad_token_id=0)
  return m.tok.decode(out[0, len(ids):].tolist(), skip_special_tokens=True)


def _chat_ref(tiny, content):
  return _hf_text(tiny, sampling_io.chat_ids(tiny[1].tok, [{"role": "user", "content": content}]))


def test_chat_and_completion_equal_transformers_greedy(tiny, server):
  client = _client(server)
  r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                     max_tokens=MAX_TOKENS, temperature=0, logprobs=True)
  assert r.choices[0].message.content == _chat_ref(tiny, "hi")
  assert r.choices[0].finish_reason in ("stop", "length")
  assert r.usage.completion_tokens == len(r.choices[0].logprobs.content) > 0
  assert all(t.logprob <= 0 for t in r.choices[0].logprobs.content)
  c = client.completions.create(model="tiny", prompt="Once upon", max_tokens=MAX_TOKENS,
                                temperature=0)
  ids = sampling_io.text_ids(tiny[1].tok, "Once upon")
  assert c.choices[0].text == _hf_text(tiny, ids)
  assert c.usage.prompt_tokens == len(ids)
  assert [m.id for m in client.models.list().data] == ["tiny"]


def test_streaming_gives_the_same_text_in_pieces(tiny, server):
  client = _client(server)
  chunks = list(client.chat.completions.create(
      model="tiny", messages=[{"role": "user", "content": "tell me"}], max_tokens=MAX_TOKENS,
      temperature=0, stream=True))
  text = "".join(c.choices[0].delta.content or "" for c in chunks)
  assert text == _hf_text(tiny, sampling_io.chat_ids(
      tiny[1].tok, [{"role": "user", "content": "tell me"}]))
  assert chunks[-1].choices[0].finish_reason in ("stop", "length")
  assert sum(bool(c.choices[0].delta.content) for c in chunks) >= 2  # more than one piece
  pieces = list(client.completions.create(model="tiny", prompt="abc", max_tokens=MAX_TOKENS,
                                          temperature=0, stream=True))
  assert "".join(p.choices[0].text for p in pieces) == _hf_text(
      tiny, sampling_io.text_ids(tiny[1].tok, "abc"))


def test_concurrent_requests_are_batched(tiny, server):
  client = _client(server)
  before = server.batcher.calls
  words = [f"question {i}" for i in range(8)]

  def ask(w):
    return client.chat.completions.create(model="tiny", messages=[{"role": "user",
                                                                    "content": w}],
                                          max_tokens=MAX_TOKENS, temperature=0).choices[0]

  with concurrent.futures.ThreadPoolExecutor(8) as pool:
    answers = list(pool.map(ask, words))
  calls = server.batcher.calls - before
  print(f"8 concurrent requests served in {calls} sampler calls")
  assert calls < 8
  for w, a in zip(words, answers):
    assert a.message.content == _chat_ref(tiny, w)


def test_api_key_is_required_when_set(tiny):
  s = _start(tiny[1], api_key="sekret")
  try:
    with pytest.raises(openai.AuthenticationError) as e:
      _client(s, "wrong").completions.create(model="tiny", prompt="x", max_tokens=MAX_TOKENS)
    assert e.value.status_code == 401
    host, port = s.server_address[:2]
    conn = http.client.HTTPConnection(host, port, timeout=30)
    conn.request("POST", "/v1/completions", body=json.dumps({"prompt": "x"}),
                 headers={"Content-Type": "application/json"})
    assert conn.getresponse().status == 401  # no Authorization header at all
    ok = _client(s, "sekret").completions.create(model="tiny", prompt="x",
                                                 max_tokens=MAX_TOKENS, temperature=0)
    assert len(ok.choices) == 1
  finally:
    s.shutdown()
    s.batcher.stop()
  with pytest.raises(ValueError, match="exposes the model beyond this machine"):
    serve.make_server(tiny[1], host="0.0.0.0", port=0)


def _post(server, path, raw: bytes):
  host, port = server.server_address[:2]
  conn = http.client.HTTPConnection(host, port, timeout=60)
  conn.request("POST", path, body=raw, headers={"Content-Type": "application/json"})
  resp = conn.getresponse()
  return resp.status, json.loads(resp.read())


@pytest.mark.parametrize("path,raw,message", [
    ("/v1/chat/completions", b'{"messages": [', "malformed JSON body"),
    ("/v1/chat/completions", b'[1, 2]', "the body must be a JSON object"),
    ("/v1/completions", json.dumps({"prompt": "word " * 5000}).encode(),
     "tokens; this server takes at most 4096 (--max_prompt_tokens)"),
    ("/v1/completions", json.dumps({"prompt": "x", "max_tokens": 5000}).encode(),
     "'max_tokens' is 5000; this server allows at most 1024"),
    ("/v1/chat/completions", json.dumps({"messages": [{"role": "bot", "content": "x"}]}).encode(),
     "'messages[0].role' must be one of system, user, assistant"),
    ("/v1/completions", json.dumps({"prompt": "x", "temperature": "hot"}).encode(),
     "'temperature' must be a number"),
])
def test_bad_requests_get_400_and_the_server_keeps_serving(server, path, raw, message):
  status, body = _post(server, path, raw)
  assert status == 400 and message in body["error"]["message"], body
  status, body = _post(server, "/v1/completions", json.dumps(
      {"prompt": "still there?", "max_tokens": MAX_TOKENS, "temperature": 0}).encode())
  assert status == 200 and len(body["choices"]) == 1


def test_launcher_refuses_a_public_host_without_a_key(tmp_path):
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
  env.pop("JAXTUNE_API_KEY", None)
  p = subprocess.run([sys.executable, os.path.join(ROOT, "launch", "serve.py"),
                      f"--model={tmp_path}", "--host=0.0.0.0"], env=env, capture_output=True,
                     text=True, timeout=120)
  assert p.returncode != 0
  assert "--host=0.0.0.0 needs an API key" in p.stderr
