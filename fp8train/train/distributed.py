"""Process-group setup and the few collectives the trainer needs.

torchrun exports RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT. A plain
`python launch/train.py` has none of them, and DeepSpeed would then fall back to MPI discovery
(which needs mpi4py), so `ensure_launcher_env` fills in a one-process world on a free local port.
DeepSpeed picks the backend: NCCL on CUDA, gloo on a CPU-only torch.

Collective helpers take and return Python numbers; tensors travel on `device` because NCCL only
moves CUDA tensors. Without a process group they act as the one-process world (the checkpoint
code runs that way in the fault-injection tests).
"""

from __future__ import annotations

import atexit
import datetime
import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def ensure_launcher_env() -> bool:
    """Give a process started without torchrun a one-rank world; True if we had to."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return False
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    return True


def pick_device(requested: str) -> torch.device:
    """'auto' -> this rank's CUDA device when CUDA is available, else the CPU."""
    if requested not in ("auto", "cpu", "cuda"):
        raise ValueError(f"trainer.device={requested!r} is not allowed; choose auto, cpu or cuda")
    if requested == "cuda" and not torch.cuda.is_available():
        raise ValueError("trainer.device=cuda but torch sees no CUDA device; "
                         "use trainer.device=auto")
    if requested == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))


def init_distributed(device: torch.device, timeout_s: int) -> DistInfo:
    """Start the process group through DeepSpeed (it selects the backend for the accelerator).

    The group lives until the process exits: a Hydra multirun runs several jobs one after
    another in one process, and DeepSpeed cannot re-initialise a destroyed group.
    """
    import deepspeed

    ensure_launcher_env()
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        deepspeed.init_distributed(timeout=datetime.timedelta(seconds=timeout_s))
        atexit.register(_shutdown)
    return DistInfo(rank=dist.get_rank(), world_size=dist.get_world_size(),
                    local_rank=int(os.environ.get("LOCAL_RANK", 0)), device=device)


def _world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def all_reduce(values: list[float], op: str, device: torch.device) -> list[float]:
    """Element-wise SUM, MAX or MIN of a list of floats over all ranks."""
    ops = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    if _world_size() > 1:
        dist.all_reduce(tensor, op=ops[op])
    return tensor.tolist()


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank if `flag` is True on at least one (a MAX all-reduce)."""
    return all_reduce([float(flag)], "max", device)[0] > 0


def gather_objects(obj) -> list:
    """Every rank's `obj`, indexed by rank (pickled through the process group)."""
    if _world_size() == 1:
        return [obj]
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def peer_failure(error: BaseException) -> bool:
    """Did a collective fail because another rank is gone? (NCCL: DistError; gloo: a plain
    RuntimeError "Connection closed by peer ... caused by a remote worker crashing")."""
    text = str(error)
    return isinstance(error, dist.DistError) or (
        isinstance(error, RuntimeError) and ("closed by peer" in text or "remote worker" in text))


def barrier() -> None:
    if _world_size() > 1:
        dist.barrier()


def _shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
