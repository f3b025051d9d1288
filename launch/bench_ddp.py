"""The PyTorch peer on several GPUs: DistributedDataParallel under torchrun (bench
framework `torch_ddp`, run when `--mesh` names more than one device).

`launch/bench.py --frameworks=torch_ddp,jaxtune --mesh=data=2` starts the peer as
`python -m torch.distributed.run --nproc_per_node=2 launch/bench.py --worker=SPEC`: each
process drives one GPU (NCCL; gloo on CPU), holds a whole copy of the model, takes its own
contiguous rows of the global batch, and DDP all-reduces the trainable gradients (bucketed,
overlapped with the backward pass). Rank 0 times the steps and writes the row (its losses
and peak memory are rank 0's own); tokens count the whole global batch, as jaxtune's mesh
rows do. NCCL's environment (NVLink multicast off
where the machine says so) is inherited.
"""

import os
import sys


def command(script: str, spec: dict, worker_arg: str) -> list[str]:
  """The torchrun command line of a `torch_ddp` spec (--standalone: a local rendezvous on
  a port torchrun picks itself)."""
  return [sys.executable, "-m", "torch.distributed.run", "--standalone",
          f"--nproc_per_node={spec['ddp']}", script, worker_arg]


def rank() -> int:
  return int(os.environ.get("RANK", "0"))


def setup(spec: dict, dev: str) -> tuple[int, int]:
  """(rank, world): joins the process group of a `torch_ddp` spec and selects this rank's
  GPU (so "cuda" means it); (0, 1) for a one-device peer."""
  if not spec.get("ddp"):
    return 0, 1
  import torch
  import torch.distributed as dist
  local = int(os.environ["LOCAL_RANK"])
  if dev == "cuda":
    torch.cuda.set_device(local)
  dist.init_process_group("nccl" if dev == "cuda" else "gloo")
  world = dist.get_world_size()
  if spec["batch"] % world:
    raise ValueError(f"--batch={spec['batch']} does not split over {world} DDP processes")
  return dist.get_rank(), world


def rows(batch: dict, r: int, world: int) -> dict:
  """This rank's contiguous share of a host batch's rows."""
  n = next(iter(batch.values())).shape[0] // world
  return {k: v[r * n:(r + 1) * n] for k, v in batch.items()}


def wrap(model, dev: str):
  """The model under DistributedDataParallel (gradients of frozen weights are skipped)."""
  from torch.nn.parallel import DistributedDataParallel
  import torch
  return DistributedDataParallel(
      model, device_ids=[torch.cuda.current_device()] if dev == "cuda" else None)


def finish(spec: dict) -> None:
  """Waits for every rank and leaves the group. (Every step's gradient all-reduce already
  keeps the ranks in step, so rank 0's timing is the group's; its row's losses and peak
  memory are rank 0's own.)"""
  if spec.get("ddp"):
    import torch.distributed as dist
    dist.barrier()
    dist.destroy_process_group()
