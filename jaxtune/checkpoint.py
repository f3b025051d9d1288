"""Orbax checkpoints of a run: TrainState, data position, resolved config and provenance.

Each checkpoint is one orbax step directory with three items: `state` (a plain tree; a run
saves its TrainState as {step, trainable, opt_state, rng}), `data` (the loader's position,
JSON) and `meta` (the resolved config and the data/tokenizer fingerprint, JSON). This module
takes and returns plain trees and imports nothing from the trainer.
Orbax writes a step into a temporary directory and renames it only once every item is
complete on every host, so an interrupted save is never listed as a resume point.

Rotation is ours, not orbax's `max_to_keep`: the latest `keep` complete steps are kept,
plus the steps passed to `protect` (the best checkpoint of early stopping / keep_best,
which must survive any number of later saves). Old steps are pruned once the newer ones
are complete (at the next save, `wait` and `close`), never before.

A workdir on a bucket (`s3://b/run`, `gs://...`, any fsspec URL) is staged: `stage(url)`
returns a local directory that mirrors the bucket's committed checkpoints and run files,
orbax writes there as it does locally, and each save, once complete, is committed to the
bucket: every file of `checkpoints/STEP/` is uploaded first, then the marker object
`checkpoints/STEP/commit_success.txt` (orbax's own marker name for object stores) last.
Object stores have no atomic directory rename, but a single PUT is atomic, so a step
without its marker (a run killed mid-upload) is never a resume point: `stage` deletes it.
Pruning deletes the marker first. The bucket is the truth: staging drops local steps the
bucket does not hold and downloads the committed steps it lacks, so a run killed on one
machine resumes on another. orbax's own path was not usable for s3:// (checked with
orbax 0.12.8 / tensorstore 0.1.86 against moto's S3 server): orbax builds a local-file
tensorstore spec for s3:// URLs ("Checkpoint path should be absolute. Got s3:/..."); only
gs:// goes to tensorstore's GCS driver; and tensorstore's s3 driver, which writes to the
server when its spec names the endpoint, ignores AWS_ENDPOINT_URL (a bare s3:// spec timed
out), so using it would mean patching orbax's private spec builder. Staging serves every
fsspec store the same way, through the same standard credentials. Saves to a bucket are
synchronous (the upload follows orbax's write), and one process only.
"""

from __future__ import annotations

import os
import shutil
import uuid

import orbax.checkpoint as ocp

from jaxtune import storage

COMMIT = "commit_success.txt"  # the marker object that makes a step on a bucket complete
_REMOTE = ".jaxtune-remote"  # in a staging dir: the bucket URL it mirrors
_RUN_FILES = ("metrics.jsonl", "config.json")  # run files committed with each checkpoint


class Checkpointer:
  """A keep-N, optionally async, orbax CheckpointManager over DIR/checkpoints."""

  def __init__(self, workdir: str, *, keep: int = 3, async_save: bool = True):
    if storage.is_remote(workdir):
      workdir = stage(workdir)
    self.remote = remote_of(workdir)  # the bucket URL a staged workdir commits to, or ""
    async_save = async_save and not self.remote
    self.directory = os.path.join(os.path.abspath(workdir), "checkpoints")
    self.keep = keep
    self._protected: set[int] = set()
    options = ocp.CheckpointManagerOptions(max_to_keep=None, create=True,
                                           enable_async_checkpointing=async_save)
    self._mngr = ocp.CheckpointManager(self.directory, options=options,
                                       item_names=("state", "data", "meta"))

  def protect(self, steps) -> None:
    """Keeps exactly these steps (e.g. {best step}) outside the keep-N rotation."""
    self._protected = {int(s) for s in steps if s is not None}

  def _prune(self) -> None:
    """Deletes complete steps beyond the latest `keep`, except protected ones (all
    processes call it: orbax's delete is collective)."""
    self._mngr.wait_until_finished()
    steps = sorted(self._mngr.all_steps())
    for step in steps[:max(len(steps) - self.keep, 0)]:
      if step not in self._protected:
        if self.remote:  # the marker first: a half-deleted step is never complete
          _delete_remote_step(self.remote, step)
        self._mngr.delete(step)

  def latest_step(self) -> int | None:
    return self._mngr.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._mngr.all_steps())

  def save(self, step: int, state: dict, data_state: dict, meta: dict) -> None:
    """Saves the tree `state` with the loader position and meta (async unless disabled)."""
    self._prune()  # the previous saves are complete here: orbax would wait for them anyway
    self._mngr.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        data=ocp.args.JsonSave(data_state),
        meta=ocp.args.JsonSave(meta)), force=True)
    if self.remote:
      self._mngr.wait_until_finished()
      _commit(os.path.dirname(self.directory), self.remote, step)

  def restore(self, step: int, abstract_state: dict):
    """(state tree, data_state, meta) at `step`, placed per the ShapeDtypeStruct shardings
    of `abstract_state`."""
    out = self._mngr.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state),
        data=ocp.args.JsonRestore(),
        meta=ocp.args.JsonRestore()))
    return out["state"], out["data"], out["meta"]

  def meta(self, step: int) -> dict:
    """The meta item of `step` alone (the config and identities; no arrays are read)."""
    return self._mngr.restore(step, args=ocp.args.Composite(
        meta=ocp.args.JsonRestore()))["meta"]

  def wait(self) -> None:
    self._prune()

  def close(self) -> None:
    self._prune()
    self._mngr.close()


def is_run(path: str) -> bool:
  """True for a run's workdir (or a `launch/convert.py --from_hf` output) with checkpoints."""
  if storage.is_remote(path):
    return storage.isdir(storage.join(path, "checkpoints"))
  return os.path.isdir(os.path.join(path, "checkpoints"))


def read(path: str, step: int | None = None):
  """(trainable tree, meta) of a run's checkpoint, without the optimizer's structure.

  `path` is a run's workdir, its `checkpoints` dir, or a `launch/convert.py --from_hf` output
  (local, or on a bucket: the step read is fetched into a local cache first).
  """
  if storage.is_remote(path):
    path, step = _fetched(path, step)
  path = os.path.abspath(path)
  if os.path.isdir(os.path.join(path, "checkpoints")):
    path = os.path.join(path, "checkpoints")
  mngr = ocp.CheckpointManager(path, item_names=("state", "data", "meta"))
  step = mngr.latest_step() if step is None else step
  if step is None:
    raise ValueError(f"{path}: no complete checkpoint")
  meta = mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
  restored = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
  mngr.close()
  return restored["state"]["trainable"], meta


def locate(path: str) -> tuple[str, int | None] | None:
  """(directory for `read`, step or None) when `path` is a run's workdir, its `checkpoints`
  dir or one step dir under it (runs/x/checkpoints/12); None for anything else."""
  if storage.is_remote(path):
    return _locate_remote(path)
  path = os.path.abspath(path)
  if is_run(path):
    return path, None
  if os.path.basename(path) == "checkpoints" and os.path.isdir(path):
    return path, None
  parent, name = os.path.split(path)
  if os.path.basename(parent) == "checkpoints" and name.isdigit() and os.path.isdir(path):
    return parent, int(name)
  return None


def read_meta(path: str, step: int | None = None) -> dict:
  """The meta item (resolved config, model config, provenance) of a run's checkpoint at
  `step` (default: the latest), without reading any array. `path` as for `locate`."""
  where = locate(path)
  if where is None:
    raise ValueError(f"{path}: not a run's workdir or checkpoint directory")
  directory, at = where
  if storage.is_remote(directory):
    directory, at = _fetched(directory, step if step is not None else at)
  if os.path.isdir(os.path.join(directory, "checkpoints")):
    directory = os.path.join(directory, "checkpoints")
  mngr = ocp.CheckpointManager(directory, item_names=("state", "data", "meta"))
  step = step if step is not None else at if at is not None else mngr.latest_step()
  if step is None:
    raise ValueError(f"{directory}: no complete checkpoint")
  meta = mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
  mngr.close()
  return meta


# ---- workdirs on a bucket (see the module docstring) ----


def local_workdir(path: str) -> str:
  """`path` itself, or for a bucket URL its staging directory (see `stage`)."""
  return stage(path) if storage.is_remote(path) else path


def remote_of(staged: str) -> str:
  """The bucket URL a staged workdir mirrors, or "" for a plain local workdir."""
  marker = os.path.join(staged, _REMOTE)
  return storage.read_text(marker).strip() if os.path.exists(marker) else ""


def _remote_steps(url: str) -> dict[int, str]:
  """{step: its marker's text} of the committed steps of the workdir `url`."""
  ckdir = storage.join(url, "checkpoints")
  if not storage.exists(ckdir):
    return {}
  committed = {}
  for name in storage.listing(ckdir):
    head, _, tail = name.partition("/")
    if tail == COMMIT and head.isdigit():
      committed[int(head)] = storage.read_text(storage.join(ckdir, name)).strip()
  return committed


def _local_steps(ckdir: str) -> dict[int, str]:
  if not os.path.isdir(ckdir):
    return {}
  out = {}
  for name in os.listdir(ckdir):
    marker = os.path.join(ckdir, name, COMMIT)
    if name.isdigit() and os.path.exists(marker):
      out[int(name)] = storage.read_text(marker).strip()
  return out


def stage(url: str, *, steps=None, kind: str = "runs") -> str:
  """The local staging directory of the workdir `url`, made to mirror the bucket: its
  committed checkpoint steps (all, or only `steps`) and run files; local steps the bucket
  does not hold as committed are removed; a run's staging (kind="runs", the writer) also
  deletes uncommitted leftovers on the bucket, a reader's never changes the bucket."""
  import jax  # pylint: disable=g-import-not-at-top
  if kind == "runs" and jax.process_count() > 1:
    raise ValueError(f"--workdir={url}: a workdir on a bucket is staged by one process; "
                     f"with {jax.process_count()} processes use a shared filesystem path "
                     "(e.g. a gcsfuse / s3 mount)")
  local = storage.cache_dir(url, kind)
  ckdir = os.path.join(local, "checkpoints")
  os.makedirs(ckdir, exist_ok=True)
  remote = _remote_steps(url)
  held = _local_steps(ckdir)
  for name in os.listdir(ckdir):  # torn, stale or not committed: the bucket is the truth
    if not (name.isdigit() and remote.get(int(name)) == held.get(int(name)) is not None):
      shutil.rmtree(os.path.join(ckdir, name), ignore_errors=True)
  if kind == "runs":
    _drop_uncommitted(url, set(remote))
  wanted = set(remote) if steps is None else set(remote) & {int(s) for s in steps}
  for step in sorted(wanted - {s for s, t in held.items() if remote.get(s) == t}):
    storage.download(storage.join(url, "checkpoints", str(step)), os.path.join(ckdir, str(step)))
  for name in _RUN_FILES:
    path = os.path.join(local, name)
    if storage.exists(storage.join(url, name)):
      storage.download(url, local, [name])
    elif os.path.exists(path):
      os.remove(path)
  if kind == "runs":  # what makes Checkpointer(local) commit to the bucket
    storage.write_text(os.path.join(local, _REMOTE), url)
  return local


def _drop_uncommitted(url: str, committed: set[int]) -> None:
  ckdir = storage.join(url, "checkpoints")
  if not storage.exists(ckdir):
    return
  names = storage.listing(ckdir)
  torn = sorted({n.split("/", 1)[0] for n in names} - {str(s) for s in committed})
  for head in torn:
    storage.remove(storage.join(ckdir, head))


def _commit(staged: str, url: str, step: int) -> None:
  """Uploads checkpoints/STEP (files first, marker last) and the run files."""
  src = os.path.join(staged, "checkpoints", str(step))
  dst = storage.join(url, "checkpoints", str(step))
  storage.upload(src, dst, exclude=(COMMIT,))
  for name in _RUN_FILES:
    if os.path.exists(os.path.join(staged, name)):
      storage.upload(os.path.join(staged, name), storage.join(url, name))
  token = uuid.uuid4().hex
  storage.write_text(os.path.join(src, COMMIT), token)
  storage.write_text(storage.join(dst, COMMIT), token)


def _delete_remote_step(url: str, step: int) -> None:
  dst = storage.join(url, "checkpoints", str(step))
  if storage.exists(storage.join(dst, COMMIT)):
    storage.remove(dst, [COMMIT])
  storage.remove(dst)


def publish(staged: str, path: str | None) -> str | None:
  """After a run: uploads a staged workdir's files (HF export, metrics, reports; the
  checkpoints are already committed) to its bucket. Returns `path` (a file or directory
  inside the staging dir) as its bucket URL; unchanged for a local workdir."""
  url = remote_of(staged)
  if not url:
    return path
  import jax  # pylint: disable=g-import-not-at-top
  if jax.process_index() == 0:
    storage.upload(staged, url, exclude=("checkpoints", _REMOTE))
  if not path:
    return path
  rel = os.path.relpath(path, staged)
  return url if rel == "." else storage.join(url, *rel.split(os.sep))


def _locate_remote(url: str) -> tuple[str, int | None] | None:
  url = url.rstrip("/")
  if is_run(url):
    return url, None
  parent, name = url.rsplit("/", 1)
  if name == "checkpoints" and storage.isdir(url):
    return parent, None
  grand, ck = parent.rsplit("/", 1)
  if ck == "checkpoints" and name.isdigit() and storage.exists(storage.join(url, COMMIT)):
    return grand, int(name)
  return None


def _fetched(url: str, step: int | None) -> tuple[str, int]:
  """(local workdir, step) with `step` (default: the latest committed) of the run at `url`
  (workdir, checkpoints dir or step dir) fetched into a local read cache."""
  where = _locate_remote(url)
  if where is None:
    raise ValueError(f"{url}: not a run's workdir or checkpoint directory")
  workdir, at = where
  step = step if step is not None else at
  committed = _remote_steps(workdir)
  if not committed:
    raise ValueError(f"{workdir}: no complete checkpoint (no step with {COMMIT})")
  step = max(committed) if step is None else step
  if step not in committed:
    raise ValueError(f"{workdir}: step {step} is not a complete checkpoint (complete: "
                     f"{sorted(committed)})")
  return stage(workdir, steps=[step], kind="reads"), step
