"""The PyTorch peer on several devices under torchrun: bench frameworks `torch_ddp`
(DistributedDataParallel) and `torch_fsdp` (FSDP2, `fully_shard`), run when `--mesh` names
more than one device.

`launch/bench.py --frameworks=torch_ddp,torch_fsdp,jaxtune --mesh=data=2` starts each peer
as `python -m torch.distributed.run --nproc_per_node=2 launch/bench.py --worker=SPEC`: each
process drives one GPU (NCCL; gloo on CPU) and takes its own contiguous rows of the global
batch. spec["ddp"] is the process count, spec["shard"] how the model is spread:
  ddp   every process holds a whole copy of the model; DDP all-reduces the trainable
        gradients (bucketed, overlapped with the backward pass).
  fsdp  every decoder layer, then the root (embeddings, final norm, head), is one
        `fully_shard` group: each process holds 1/N of every weight (frozen ones too: LoRA's
        base and adapters share a group), all-gathers a group's weights before its forward
        and its backward (a layer frees them after each; the root keeps its own from
        forward to backward) and reduce-scatters its gradients; the optimizer steps on the
        local shards. Weights keep their dtype (no MixedPrecisionPolicy): bf16 params are
        gathered and their gradients reduced in bf16 as DDP reduces them, and the compute
        runs under the same autocast.
Rank 0 times the steps and writes the row (its losses and peak memory are rank 0's own);
tokens count the whole global batch, as jaxtune's mesh rows do. NCCL's environment (NVLink
multicast off where the machine says so) is inherited. Under --smoke, `check` adds the
numbers tests/test_bench_mesh.py compares with a one-process run.
"""

import datetime
import os
import sys

SHARDS = {"torch_ddp": "ddp", "torch_fsdp": "fsdp"}  # bench framework -> spec["shard"]


def command(script: str, spec: dict, worker_arg: str) -> list[str]:
  """The torchrun command line of a `torch_ddp` / `torch_fsdp` spec (--standalone: a local
  rendezvous on a port torchrun picks itself)."""
  return [sys.executable, "-m", "torch.distributed.run", "--standalone",
          f"--nproc_per_node={spec['ddp']}", script, worker_arg]


def rank() -> int:
  return int(os.environ.get("RANK", "0"))


def setup(spec: dict, dev: str) -> tuple[int, int]:
  """(rank, world): joins the process group of a torchrun spec and selects this rank's GPU
  (so "cuda" means it); (0, 1) for a one-device peer. A rendezvous or collective that waits
  longer than 120 s (smoke) / 600 s raises, so a stuck rank fails the run, never hangs it."""
  if not spec.get("ddp"):
    return 0, 1
  import torch
  import torch.distributed as dist
  local = int(os.environ["LOCAL_RANK"])
  if dev == "cuda":
    torch.cuda.set_device(local)
  dist.init_process_group("nccl" if dev == "cuda" else "gloo",
                          timeout=datetime.timedelta(seconds=120 if spec["smoke"] else 600))
  world = dist.get_world_size()
  if spec["batch"] % world:
    raise ValueError(f"--batch={spec['batch']} does not split over {world} processes")
  return dist.get_rank(), world


def rows(batch: dict, r: int, world: int) -> dict:
  """This rank's contiguous share of a host batch's rows."""
  n = next(iter(batch.values())).shape[0] // world
  return {k: v[r * n:(r + 1) * n] for k, v in batch.items()}


def wrap(model, dev: str, spec: dict):
  """The model as spec["shard"] spreads it (see the module docstring); unchanged for a
  one-device peer. DDP skips the gradients of frozen weights; FSDP2 shards a peft model's
  decoder layers (found under its base model) like a plain one's."""
  if not spec.get("ddp"):
    return model
  import torch
  if spec["shard"] == "ddp":
    from torch.nn.parallel import DistributedDataParallel
    return DistributedDataParallel(
        model, device_ids=[torch.cuda.current_device()] if dev == "cuda" else None)
  from torch.distributed.device_mesh import init_device_mesh
  from torch.distributed.fsdp import fully_shard
  mesh = init_device_mesh(dev, (spec["ddp"],))
  base = model.get_base_model() if hasattr(model, "get_base_model") else model
  for layer in base.model.layers:
    fully_shard(layer, mesh=mesh)
  fully_shard(model, mesh=mesh)
  return model


def _full(t):
  """A tensor's whole value: FSDP2's DTensor params and optimizer state are all-gathered
  (a collective: every rank calls it in the same order)."""
  from torch.distributed.tensor import DTensor
  return t.full_tensor() if isinstance(t, DTensor) else t


def snapshot(params: list, spec: dict):
  """Under --smoke, float32 copies of the trainable params' whole values before training
  (what `check` measures the update against); None otherwise."""
  return [_full(p.detach()).float().clone() for p in params] if spec["smoke"] else None


def _sketch(vec, k: int = 16) -> list[float]:
  """k fixed Gaussian projections of a vector (the same on every process, for one torch
  version and length), a few numbers a JSON row can hold: ||sketch(a) - sketch(b)|| /
  ||sketch(b)|| estimates ||a - b|| / ||b||, each norm to a relative standard deviation of
  about 1 / sqrt(2 k) (0.18 for k = 16; Johnson-Lindenstrauss)."""
  import torch
  proj = torch.randn(k, vec.numel(), generator=torch.Generator().manual_seed(0))
  return (proj @ vec.cpu()).tolist()


def check(params: list, opt, init: list, world: int) -> dict:
  """Smoke runs' test numbers after the steps: replica_diff, the largest difference between
  any rank's trainable params and this rank's (a DDP whose gradients were not all-reduced
  leaves different replicas: the ranks trained on different rows); sketches (`_sketch`) of
  the whole update (params minus `init`) and of AdamW's first moment (zero for a param that
  never had a gradient), which tests compare with a one-process run of the global batch."""
  import torch
  vec = torch.cat([_full(p.detach()).float().flatten() for p in params])
  replica = 0.0
  if world > 1:
    import torch.distributed as dist
    got = [torch.empty_like(vec) for _ in range(world)]
    dist.all_gather(got, vec)
    replica = max(float((g - vec).abs().max()) for g in got)
  update = vec - torch.cat([i.flatten() for i in init])
  moment = torch.cat([_full(opt.state[p]["exp_avg"]).float().flatten() if opt.state[p]
                      else torch.zeros(p.numel(), device=vec.device) for p in params])
  return {"replica_diff": replica, "update": _sketch(update), "moment": _sketch(moment)}


def finish(spec: dict, out: dict, params: list, opt, init) -> None:
  """Adds `check` to a smoke run's row (`init` from `snapshot`); then, under torchrun, waits
  for every rank and leaves the group. (Every step's gradient reduction already keeps the
  ranks in step, so rank 0's timing is the group's; its row's losses and peak memory are
  rank 0's own.)"""
  if init is not None:
    out["check"] = check(params, opt, init, spec.get("ddp") or 1)
  if spec.get("ddp"):
    import torch.distributed as dist
    dist.barrier()
    dist.destroy_process_group()
