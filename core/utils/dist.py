"""Process-group helpers: one process, torchrun, or the DeepSpeed launcher (env:// rendezvous).

On a machine without CUDA the backend is gloo. Gradients of the plain PyTorch backend are
averaged by ``all_reduce_grads`` (no DDP wrapper, so the trainer may call sub-modules freely).
``device`` is where this process computes: its GPU (``cuda:LOCAL_RANK``) when there is one.
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


DEVICE_CHOICES = "auto | cpu | cuda | cuda:N"


def _own_gpu() -> torch.device:
    """This process's GPU: ``cuda:LOCAL_RANK``, or, where a launcher shows each process fewer GPUs
    than its local rank (one per task), ``LOCAL_RANK`` modulo the visible count."""
    return torch.device("cuda", local_rank() % max(1, torch.cuda.device_count()))


def device(choice: str = "auto") -> torch.device:
    """The device this process computes on. ``auto``: its own GPU (``cuda:LOCAL_RANK``) when CUDA is
    available, else the CPU; ``cuda`` (its own GPU), ``cuda:N`` (one process only) or ``cpu`` as
    given. A CUDA choice on a machine without CUDA raises ``ValueError``."""
    choice = (choice or "auto").strip()
    if choice == "auto":
        return _own_gpu() if torch.cuda.is_available() else torch.device("cpu")
    try:
        dev = torch.device(choice)
    except RuntimeError:
        raise ValueError(f"{choice!r} is not a device ({DEVICE_CHOICES})") from None
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"{choice!r} is not a device this project trains on ({DEVICE_CHOICES})")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"{choice!r}: this machine has no CUDA GPU (torch {torch.__version__}); use auto or cpu")
        if dev.index is None:
            return _own_gpu()
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise ValueError(f"{choice!r} would put every one of the {os.environ['WORLD_SIZE']} processes on one GPU; "
                             "use auto or cuda (each process its LOCAL_RANK's GPU)")
        if dev.index >= torch.cuda.device_count():
            raise ValueError(f"{choice!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return dev


def _comm_device() -> torch.device:
    """Where a tensor for a collective must live: NCCL reduces GPU tensors only."""
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def is_main() -> bool:
    return rank() == 0


def init(backend: str = "", use_deepspeed: bool = False, device_choice: str = "auto") -> None:
    """Join the process group when launched with WORLD_SIZE > 1 (or always for DeepSpeed). The
    default backend is NCCL when this process computes on a GPU (``device(device_choice)``), else
    gloo; each process's current CUDA device is then its own."""
    if dist.is_initialized():
        return
    on_gpu = device(device_choice).type == "cuda"
    backend = backend or ("nccl" if on_gpu else "gloo")
    ws = int(os.environ.get("WORLD_SIZE", "1"))
    if use_deepspeed:
        one_process_env()
        import deepspeed
        deepspeed.init_distributed(dist_backend=backend)
    elif ws > 1:
        dist.init_process_group(backend=backend)
    if on_gpu:
        torch.cuda.set_device(device(device_choice))


def one_process_env() -> None:
    """The rendezvous variables of a one-process group (rank 0 of 1 on a free local port), where
    no launcher has set them."""
    for k, v in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1")):
        os.environ.setdefault(k, v)
    if "MASTER_PORT" not in os.environ:
        os.environ["MASTER_PORT"] = str(_free_port())


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def all_reduce_grads(params) -> None:
    ws = world_size()
    if ws == 1:
        return
    for p in params:
        if p.grad is not None:
            dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
            p.grad.div_(ws)


def sum_across(x: float) -> float:
    """``x`` summed over every process (``x`` itself with one)."""
    if world_size() == 1:
        return float(x)
    t = torch.tensor([float(x)], dtype=torch.float64, device=_comm_device())
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return float(t.item())


def mean_across(x: float) -> float:
    if world_size() == 1:
        return float(x)
    t = torch.tensor([float(x)], dtype=torch.float64, device=_comm_device())
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return float(t.item() / world_size())


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
