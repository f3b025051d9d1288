"""Object storage: s3://, gs:// and any other fsspec URL, for models, workdirs and exports.

Local code paths stay local: safetensors are memory-mapped, orbax writes a directory, the
tokenizer is a directory transformers reads. A URL is therefore met at the boundary:

    model_dir("s3://b/models/base")  -> ~/.cache/jaxtune/buckets/<key>/   (a local copy of
                                        its json / safetensors / tokenizer files, refreshed
                                        when an object's ETag changes; pickles never fetched)
    upload("runs/x/hf", "s3://b/run/hf")    every file below, as objects under the prefix
    download("s3://b/run/hf", "/tmp/hf")    every object below the prefix, as files

Credentials, endpoint and region come from the standard environment, read by the fsspec
backend (s3fs / gcsfs): AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_DEFAULT_REGION and
AWS_ENDPOINT_URL (an S3-compatible server: MinIO, moto, R2), or ~/.aws; Google's
application-default credentials for gs://. The same command then runs against AWS, GCS or
a local server. Install the backend with the extras `jaxtune[s3]` / `jaxtune[gcs]`.

Where a workdir on a bucket is staged and how its checkpoints stay atomic is
`jaxtune/checkpoint.py`'s business; the local cache root is $JAXTUNE_BUCKET_CACHE
(default ~/.cache/jaxtune/buckets).
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import posixpath

# What a model directory download fetches (the hub's patterns): never *.bin / *.pt pickles.
MODEL_PATTERNS = ("*.json", "*.safetensors", "tokenizer*", "*.model", "*.jinja", "*.txt")
_EXTRAS = {"s3": "s3", "s3a": "s3", "gs": "gcs", "gcs": "gcs"}


def is_remote(path: str) -> bool:
  """True for a URL with a protocol (s3://, gs://, memory://, ...), not file://."""
  return isinstance(path, str) and "://" in path and not path.startswith("file://")


def join(base: str, *parts: str) -> str:
  """os.path.join for local paths, '/'-joined for URLs."""
  if is_remote(base):
    return posixpath.join(base.rstrip("/"), *parts)
  return os.path.join(base, *parts)


def filesystem(url: str):
  """(fsspec filesystem, path inside it) for `url`; a missing backend names its extra."""
  import fsspec  # pylint: disable=g-import-not-at-top
  try:
    return fsspec.core.url_to_fs(url)
  except ImportError as e:
    scheme = url.split("://", 1)[0]
    extra = _EXTRAS.get(scheme)
    hint = f"pip install 'jaxtune[{extra}]'" if extra else "install its fsspec backend"
    raise ValueError(f"{url}: no fsspec backend for {scheme}:// ({e}); {hint}") from e


def _url(fs, path: str) -> str:
  protocol = fs.protocol[0] if isinstance(fs.protocol, (tuple, list)) else fs.protocol
  return path if "://" in path else f"{protocol}://{path}"


def exists(url: str) -> bool:
  if not is_remote(url):
    return os.path.exists(url)
  fs, path = filesystem(url)
  return fs.exists(path)


def isdir(url: str) -> bool:
  if not is_remote(url):
    return os.path.isdir(url)
  fs, path = filesystem(url)
  return fs.isdir(path)


def listing(url: str) -> dict[str, dict]:
  """{relative path: info} of every object below the prefix `url` (one LIST per page)."""
  fs, path = filesystem(url)
  path = path.rstrip("/")
  found = fs.find(path, detail=True)
  return {p[len(path) + 1:]: info for p, info in found.items()
          if p.startswith(path + "/") and info.get("type", "file") != "directory"}


def read_text(url: str) -> str:
  if not is_remote(url):
    with open(url, encoding="utf-8") as f:
      return f.read()
  fs, path = filesystem(url)
  with fs.open(path, "rb") as f:
    return f.read().decode("utf-8")


def write_text(url: str, text: str) -> None:
  """One object (or file) with `text`; an object PUT is atomic: readers see all or nothing."""
  if not is_remote(url):
    with open(url, "w", encoding="utf-8") as f:
      f.write(text)
    return
  fs, path = filesystem(url)
  fs.pipe_file(path, text.encode("utf-8"))


def download(url: str, local_dir: str, names=None) -> list[str]:
  """Copies the objects below `url` (or only the relative `names`) into `local_dir`."""
  fs, path = filesystem(url)
  names = sorted(listing(url)) if names is None else sorted(names)
  for name in names:  # each file appears whole (a concurrent reader never sees a part)
    target = os.path.join(local_dir, *name.split("/"))
    os.makedirs(os.path.dirname(target), exist_ok=True)
    part = f"{target}.part-{os.getpid()}"
    fs.get_file(f"{path.rstrip('/')}/{name}", part)
    os.replace(part, target)
  return names


def upload(local: str, url: str, *, exclude=()) -> str:
  """Copies a local file, or every file below a local directory, to the prefix `url`
  (top-level entries named in `exclude` skipped). Returns `url`."""
  fs, path = filesystem(url)
  path = path.rstrip("/")
  if os.path.isfile(local):
    fs.put_file(local, path)
    return url
  for root, dirs, files in os.walk(local):
    rel_root = os.path.relpath(root, local)
    if rel_root == ".":
      dirs[:] = sorted(d for d in dirs if d not in exclude)
      files = [f for f in files if f not in exclude]
    for name in sorted(files):
      rel = name if rel_root == "." else f"{rel_root.replace(os.sep, '/')}/{name}"
      fs.put_file(os.path.join(root, name), f"{path}/{rel}")
  return url


def remove(url: str, names=None) -> None:
  """Deletes the objects below `url` (or only the relative `names`, in that order)."""
  fs, path = filesystem(url)
  path = path.rstrip("/")
  if names is None:
    if fs.exists(path):
      fs.rm(path, recursive=True)
    return
  for name in names:
    fs.rm_file(f"{path}/{name}")


def cache_dir(url: str, kind: str = "cache") -> str:
  """A local directory that belongs to `url` (stable across runs of this machine)."""
  root = os.environ.get("JAXTUNE_BUCKET_CACHE",
                        os.path.join(os.path.expanduser("~"), ".cache", "jaxtune", "buckets"))
  key = hashlib.sha256(url.rstrip("/").encode()).hexdigest()[:16]
  name = posixpath.basename(url.rstrip("/")) or "root"
  return os.path.join(root, kind, f"{name}-{key}")


def _version(info: dict) -> str:
  """An object's identity: its ETag / generation / md5 where the store gives one, else
  size and modification time."""
  for k in ("ETag", "etag", "generation", "md5Hash"):
    if info.get(k):
      return str(info[k])
  return f"{info.get('size')}:{info.get('LastModified') or info.get('mtime') or ''}"


def model_dir(url: str) -> str:
  """A local copy of the model / tokenizer directory at `url` (see the module docstring).

  Only MODEL_PATTERNS files are fetched; unchanged objects are not fetched again. A prefix
  holding pickled weights only is refused, naming them."""
  everything = listing(url)
  objects = {n: i for n, i in everything.items()
             if any(fnmatch.fnmatch(posixpath.basename(n), p) for p in MODEL_PATTERNS)}
  if not objects:
    raise ValueError(f"{url}: no model files there (looked for {', '.join(MODEL_PATTERNS)}; "
                     f"found {', '.join(sorted(everything)[:8]) or 'nothing'})")
  pickles = sorted(n for n in everything if n.endswith((".bin", ".pt", ".pth")))
  if pickles and not any(n.endswith(".safetensors") for n in objects):
    raise ValueError(f"{url}: no *.safetensors weights (found {', '.join(pickles)}: pickled "
                     "weights are never loaded, since unpickling runs code)")
  local = cache_dir(url, "models")
  manifest_path = os.path.join(local, ".jaxtune-objects.json")
  old = {}
  if os.path.exists(manifest_path):
    with open(manifest_path, encoding="utf-8") as f:
      old = json.load(f)
  new = {n: _version(i) for n, i in objects.items()}
  stale = [n for n in new if old.get(n) != new[n]
           or not os.path.exists(os.path.join(local, *n.split("/")))]
  for n in set(old) - set(new):  # deleted in the bucket: deleted here
    try:
      os.remove(os.path.join(local, *n.split("/")))
    except FileNotFoundError:
      pass
  os.makedirs(local, exist_ok=True)
  download(url, local, stale)
  tmp = manifest_path + ".tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    json.dump(new, f, indent=1)
  os.replace(tmp, manifest_path)
  return local
