"""Object storage against a real S3-compatible server on localhost (moto's server mode).

Nothing here mocks the client: jaxtune reads and writes through s3fs with the endpoint and
credentials from the standard AWS environment variables, exactly as against AWS; the test
itself checks the bucket with boto3 (an independent client) and loads exports with
transformers.
"""

import json
import os
import shutil
import signal
import subprocess
import time

import numpy as np
import pytest
import torch

moto_server = pytest.importorskip("moto.server")
boto3 = pytest.importorskip("boto3")
pytest.importorskip("s3fs")

import jaxtune  # noqa: E402
from jaxtune import checkpoint  # noqa: E402
from jaxtune import storage  # noqa: E402
from tests import hf_models  # noqa: E402
from tests import launch_utils  # noqa: E402

BUCKET = "jaxtune-test"


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
  """A moto S3 server on a free localhost port, with the AWS environment pointing at it."""
  server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
  server.start()
  host, port = server.get_host_and_port()
  env = {"AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_ACCESS_KEY_ID": "testing",
         "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
         "JAXTUNE_BUCKET_CACHE": str(tmp_path_factory.mktemp("bucket-cache"))}
  saved = {k: os.environ.get(k) for k in env}
  os.environ.update(env)
  client = boto3.client("s3")
  client.create_bucket(Bucket=BUCKET)
  yield client
  for k, v in saved.items():
    if v is None:
      os.environ.pop(k, None)
    else:
      os.environ[k] = v
  server.stop()


def _keys(client, prefix: str) -> list[str]:
  pages = client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
  return sorted(o["Key"] for p in pages for o in p.get("Contents", []))


def _put_dir(client, local: str, prefix: str) -> None:
  for name in os.listdir(local):
    client.upload_file(os.path.join(local, name), BUCKET, f"{prefix}/{name}")


def _get_dir(client, prefix: str, local: str) -> None:
  for key in _keys(client, prefix + "/"):
    target = os.path.join(local, key[len(prefix) + 1:])
    os.makedirs(os.path.dirname(target), exist_ok=True)
    client.download_file(BUCKET, key, target)


def _hf_logits(model_dir: str, tokens: np.ndarray) -> np.ndarray:
  import transformers
  model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
  with torch.no_grad():
    return model(torch.tensor(tokens)).logits.numpy()


def test_hf_model_loads_from_and_exports_to_a_bucket(s3, tmp_path):
  model = hf_models.make("llama2", seed=3)
  model.save_pretrained(tmp_path / "src", safe_serialization=True)
  _put_dir(s3, str(tmp_path / "src"), "models/tiny")
  tokens = np.random.default_rng(0).integers(0, 101, (2, 9)).astype(np.int32)
  with torch.no_grad():
    want = model(torch.tensor(tokens)).logits.numpy()

  cfg, params = jaxtune.load_hf(f"s3://{BUCKET}/models/tiny")
  np.testing.assert_allclose(np.asarray(jaxtune.forward(cfg, params, tokens)), want,
                             atol=2e-5, rtol=2e-5)
  jaxtune.save_hf(cfg, params, f"s3://{BUCKET}/exports/tiny")
  assert "exports/tiny/model.safetensors" in _keys(s3, "exports/tiny/")
  _get_dir(s3, "exports/tiny", str(tmp_path / "back"))
  np.testing.assert_allclose(_hf_logits(str(tmp_path / "back"), tokens), want,
                             atol=2e-5, rtol=2e-5)

  # A changed object is fetched again (ETag), an unchanged one is not.
  local = storage.model_dir(f"s3://{BUCKET}/models/tiny")
  before = os.stat(os.path.join(local, "model.safetensors")).st_mtime_ns
  s3.put_object(Bucket=BUCKET, Key="models/tiny/config.json",
                Body=json.dumps({**json.loads(model.config.to_json_string()),
                                 "rms_norm_eps": 1e-3}).encode())
  local = storage.model_dir(f"s3://{BUCKET}/models/tiny")
  assert os.stat(os.path.join(local, "model.safetensors")).st_mtime_ns == before
  with open(os.path.join(local, "config.json")) as f:
    assert json.load(f)["rms_norm_eps"] == 1e-3


def test_convert_from_and_to_buckets(s3, tmp_path):
  """An HF dir in the bucket -> a jaxtune checkpoint in the bucket -> an HF export in the
  bucket: transformers loads the export with the source's logits."""
  from jaxtune import convert
  model = hf_models.make("qwen2", seed=5)
  model.save_pretrained(tmp_path / "src", safe_serialization=True)
  _put_dir(s3, str(tmp_path / "src"), "models/qwen")
  tokens = np.random.default_rng(2).integers(0, 101, (1, 7)).astype(np.int32)
  with torch.no_grad():
    want = model(torch.tensor(tokens)).logits.numpy()
  assert convert.hf_to_checkpoint(f"s3://{BUCKET}/models/qwen",
                                  f"s3://{BUCKET}/imported") == f"s3://{BUCKET}/imported"
  assert f"imported/checkpoints/0/{checkpoint.COMMIT}" in _keys(s3, "imported/")
  assert checkpoint.is_run(f"s3://{BUCKET}/imported")
  convert.checkpoint_to_hf(f"s3://{BUCKET}/imported", f"s3://{BUCKET}/reexported")
  _get_dir(s3, "reexported", str(tmp_path / "re"))
  np.testing.assert_allclose(_hf_logits(str(tmp_path / "re"), tokens), want,
                             atol=2e-5, rtol=2e-5)


def test_pickled_weights_on_a_bucket_are_refused_unread(s3):
  s3.put_object(Bucket=BUCKET, Key="models/pickled/config.json", Body=b"{}")
  s3.put_object(Bucket=BUCKET, Key="models/pickled/pytorch_model.bin", Body=b"not read")
  with pytest.raises(ValueError, match=r"pytorch_model\.bin: pickled weights are never"):
    jaxtune.load_hf(f"s3://{BUCKET}/models/pickled")
  assert not os.path.exists(os.path.join(storage.cache_dir(f"s3://{BUCKET}/models/pickled",
                                                            "models"), "pytorch_model.bin"))


def _state(x: float) -> dict:
  return {"step": np.int32(x), "trainable": {"w": np.full((3, 4), x, np.float32)}}


def test_checkpoints_commit_with_a_marker_and_torn_steps_are_ignored(s3, tmp_path):
  url = f"s3://{BUCKET}/ckpt-protocol"
  ckpt = checkpoint.Checkpointer(url, keep=2)
  for step in (1, 2, 3):
    ckpt.save(step, _state(step), {"pos": step}, {"config": {"step": step}})
  ckpt.close()
  keys = _keys(s3, "ckpt-protocol/checkpoints/")
  markers = sorted(k for k in keys if k.count("/") == 3 and k.endswith(checkpoint.COMMIT))
  assert markers == [f"ckpt-protocol/checkpoints/{s}/{checkpoint.COMMIT}" for s in (2, 3)]
  assert not any(k.startswith("ckpt-protocol/checkpoints/1/") for k in keys)

  # A step whose upload was cut off (its files, no marker) is not a resume point and goes.
  for k in keys:
    if k.startswith("ckpt-protocol/checkpoints/3/") and not k.endswith(checkpoint.COMMIT):
      s3.copy_object(Bucket=BUCKET, Key=k.replace("/3/", "/4/"),
                     CopySource={"Bucket": BUCKET, "Key": k})
  cache = os.environ["JAXTUNE_BUCKET_CACHE"]
  os.environ["JAXTUNE_BUCKET_CACHE"] = str(tmp_path / "other-machine")
  try:
    again = checkpoint.Checkpointer(url, keep=2)
    assert again.all_steps() == [2, 3]
    target = {"step": np.int32(0), "trainable": {"w": np.zeros((3, 4), np.float32)}}
    import jax
    abstract = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), target)
    state, data, meta = again.restore(3, abstract)
    np.testing.assert_array_equal(np.asarray(state["trainable"]["w"]), np.full((3, 4), 3.0))
    assert data == {"pos": 3} and meta == {"config": {"step": 3}}
    again.close()
    assert not any(k.startswith("ckpt-protocol/checkpoints/4/")
                   for k in _keys(s3, "ckpt-protocol/"))
    trainable, meta = checkpoint.read(url)  # the reader's path: the latest committed step
    np.testing.assert_array_equal(np.asarray(trainable["w"]), np.full((3, 4), 3.0))
  finally:
    os.environ["JAXTUNE_BUCKET_CACHE"] = cache


def _train_args(workdir: str, *extra: str) -> list[str]:
  return [f"--workdir={workdir}", "--set=train.max_steps=6", "--set=train.eval_every=3",
          "--set=train.progress=false", "--set=checkpoint.async_save=false",
          "--set=data.seq_len=64", "--set=eval.final=false", "--set=eval.overfit_evals=0",
          *extra]


@pytest.mark.slow
def test_train_from_a_bucket_killed_resumed_exported(s3, tmp_path):
  """Data, checkpoints and the HF export in the bucket; SIGKILL after the first committed
  checkpoint; the restart (with an empty local cache, as on another machine) resumes from
  the bucket and reproduces the uninterrupted run's losses and weights."""
  sample = os.path.join(launch_utils.ROOT, "jaxtune", "assets", "sample", "chat.jsonl")
  s3.upload_file(sample, BUCKET, "data/chat.jsonl")
  data = [f"--set=data.train_files=s3://{BUCKET}/data/chat.jsonl",
          "--set=data.eval_fraction=0.1", "--set=checkpoint.every_steps=2"]
  local_ref = str(tmp_path / "ref")
  launch_utils.run("train.py", *_train_args(local_ref, *data))

  url = f"s3://{BUCKET}/runs/killed"
  env = {**launch_utils.env(), "JAXTUNE_BUCKET_CACHE": str(tmp_path / "machine-a")}
  proc = subprocess.Popen(launch_utils.cmd("train.py", *_train_args(url, *data)), env=env,
                          cwd=launch_utils.ROOT, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True)
  marker = f"runs/killed/checkpoints/2/{checkpoint.COMMIT}"
  deadline = time.time() + 400
  while marker not in _keys(s3, "runs/killed/checkpoints/2/") and proc.poll() is None:
    assert time.time() < deadline, "no committed checkpoint in the bucket"
    time.sleep(0.2)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert not any("/checkpoints/6/" in k for k in _keys(s3, "runs/killed/"))

  env["JAXTUNE_BUCKET_CACHE"] = str(tmp_path / "machine-b")
  p = subprocess.run(launch_utils.cmd("train.py", *_train_args(url, *data)), env=env,
                     cwd=launch_utils.ROOT, capture_output=True, text=True, timeout=600)
  assert p.returncode == 0, p.stderr[-3000:]
  assert "resuming at step" in p.stdout + p.stderr
  got = tmp_path / "got"
  _get_dir(s3, "runs/killed", str(got))
  ref, run = launch_utils.losses(local_ref), launch_utils.losses(str(got))
  assert sorted(run) == list(range(1, 7))
  np.testing.assert_allclose([run[s] for s in range(1, 7)], [ref[s] for s in range(1, 7)],
                             rtol=1e-6)
  tokens = np.random.default_rng(1).integers(3, 90, (1, 12)).astype(np.int32)
  np.testing.assert_allclose(_hf_logits(str(got / "hf"), tokens),
                             _hf_logits(os.path.join(local_ref, "hf"), tokens), atol=1e-5)
  # launch/eval.py reads the run and the data from the bucket: the local run's numbers.
  evals = {}
  for name, model, data_file in (("bucket", url, f"s3://{BUCKET}/data/chat.jsonl"),
                                 ("local", local_ref, sample)):
    launch_utils.run("eval.py", f"--model={model}", f"--data={data_file}", "--max_examples=6",
                     "--nogenerate", f"--out={tmp_path / ('eval-' + name)}")
    with open(tmp_path / f"eval-{name}" / "metrics.json") as f:
      evals[name] = json.load(f)
  assert evals["bucket"]["perplexity"] == pytest.approx(evals["local"]["perplexity"], rel=1e-6)
  shutil.rmtree(tmp_path / "machine-a", ignore_errors=True)
