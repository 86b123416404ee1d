"""Process layout of a run: one process, or torchrun's N processes with NCCL (CUDA) or gloo (CPU).

torchrun sets RANK, LOCAL_RANK and WORLD_SIZE; without them the run is a single process and no process group
is created, so every helper below also works at world_size 1 with plain numbers.
"""

import importlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from pgolf.errors import UserError


@dataclass
class DistEnv:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def dist_env_from_environ(environ=None) -> tuple[int, int, int]:
    """(rank, local_rank, world_size) from torchrun's variables; (0, 0, 1) when they are absent."""
    env = os.environ if environ is None else environ
    if "RANK" not in env or "WORLD_SIZE" not in env:
        return 0, 0, 1
    try:
        rank, world = int(env["RANK"]), int(env["WORLD_SIZE"])
        local = int(env.get("LOCAL_RANK", rank))
    except ValueError:
        raise UserError(f"RANK/LOCAL_RANK/WORLD_SIZE must be integers, got {env.get('RANK')!r}/"
                        f"{env.get('LOCAL_RANK')!r}/{env.get('WORLD_SIZE')!r}") from None
    if not 0 <= rank < world:
        raise UserError(f"RANK={rank} is outside 0..WORLD_SIZE-1 (WORLD_SIZE={world})")
    return rank, local, world


def pick_device(device_pref: str, local_rank: int) -> torch.device:
    """auto -> cuda:<local_rank> when CUDA is available, else cpu; cuda without a GPU is an error."""
    if device_pref not in ("auto", "cpu", "cuda"):
        raise UserError(f"train.device={device_pref!r} is not one of auto|cpu|cuda")
    if device_pref == "cpu" or (device_pref == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise UserError("train.device=cuda but no CUDA GPU is available")
    return torch.device("cuda", local_rank)


# A gloo group over the ranks of a NCCL run, for the small host-side reductions (see _reduce_floats).
_CONTROL_GROUP = None


def cuda_sync() -> None:
    """Wait for the work queued on this process's GPU (a no-op without CUDA): a wall clock read after it sees
    the work done, not the work queued."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def init_process_group(backend: str, **kwargs) -> None:
    """dist.init_process_group, with torch._dynamo imported first.

    Imported after a group exists (creating any torch.optim optimizer imports it), torch._dynamo keeps the
    group alive past destroy_process_group: gloo's threads then outlive the interpreter and abort the process
    at exit (SIGABRT after a successful run). Imported here, it costs start-up time only to runs that need it.
    """
    importlib.import_module("torch._dynamo")
    dist.init_process_group(backend, **kwargs)


def init_distributed(device_pref: str = "auto") -> DistEnv:
    """Read torchrun's layout, pick the device, and start the process group when there is more than one rank."""
    rank, local_rank, world_size = dist_env_from_environ()
    device = pick_device(device_pref, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world_size > 1 and not dist.is_initialized():
        if device.type == "cuda":
            init_process_group("nccl", device_id=device)
            global _CONTROL_GROUP
            _CONTROL_GROUP = dist.new_group(backend="gloo")
        else:
            init_process_group("gloo")
    return DistEnv(rank=rank, local_rank=local_rank, world_size=world_size, device=device)


def destroy_distributed() -> None:
    global _CONTROL_GROUP
    _CONTROL_GROUP = None
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def is_dist_active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def current_rank() -> int:
    return dist.get_rank() if is_dist_active() else 0


def print0(*args, **kwargs) -> None:
    """print on rank 0 only."""
    if current_rank() == 0:
        print(*args, **kwargs)


def collective_device() -> torch.device:
    """Where small tensors for collectives live: the current GPU under NCCL, the CPU under gloo."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _reduce_floats(values: list[float], op) -> list[float]:
    """Host numbers reduced over ranks: through the gloo control group where there is one, so that the
    collective does not queue behind the GPU's work (the training loop reads a step while the next runs)."""
    if not is_dist_active():
        return [float(v) for v in values]
    device = torch.device("cpu") if _CONTROL_GROUP is not None else collective_device()
    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=op, group=_CONTROL_GROUP)
    return [float(v) for v in t.cpu().tolist()]


def _reduce_float(value: float, op) -> float:
    return _reduce_floats([value], op)[0]


def all_reduce_max_many(values: list[float]) -> list[float]:
    """Element-wise MAX over ranks of a short list of numbers, in one collective."""
    return _reduce_floats(values, dist.ReduceOp.MAX)


def all_reduce_max(value: float) -> float:
    return _reduce_float(value, dist.ReduceOp.MAX)


def all_reduce_sum(value: float) -> float:
    return _reduce_float(value, dist.ReduceOp.SUM)


def all_reduce_mean(value: float) -> float:
    return all_reduce_sum(value) / (dist.get_world_size() if is_dist_active() else 1)


def broadcast_text(text: str) -> str:
    """Rank 0's string on every rank (UTF-8 bytes in a tensor; no pickle)."""
    if not is_dist_active():
        return text
    device = collective_device()
    data = text.encode()
    n = torch.tensor([len(data)], dtype=torch.int64, device=device)
    dist.broadcast(n, src=0)
    if int(n.item()) == 0:
        return ""
    buf = torch.zeros(int(n.item()), dtype=torch.uint8, device=device)
    if current_rank() == 0:
        buf.copy_(torch.frombuffer(bytearray(data), dtype=torch.uint8))
    dist.broadcast(buf, src=0)
    return bytes(buf.cpu().tolist()).decode()


def all_gather_text(text: str) -> list[str]:
    """Every rank's string, in rank order, on every rank (UTF-8 bytes padded to the longest; no pickle)."""
    if not is_dist_active():
        return [text]
    device = collective_device()
    data = text.encode()
    sizes = [torch.zeros(1, dtype=torch.int64, device=device) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, torch.tensor([len(data)], dtype=torch.int64, device=device))
    longest = max(int(n.item()) for n in sizes)
    buf = torch.zeros(max(longest, 1), dtype=torch.uint8, device=device)
    if data:
        buf[:len(data)].copy_(torch.frombuffer(bytearray(data), dtype=torch.uint8))
    bufs = [torch.zeros_like(buf) for _ in sizes]
    dist.all_gather(bufs, buf)
    return [bytes(b[:int(n.item())].cpu().tolist()).decode() for b, n in zip(bufs, sizes, strict=True)]


def barrier() -> None:
    if is_dist_active():
        dist.barrier()
