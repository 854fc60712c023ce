"""Process-group helpers: one process, torchrun, or the DeepSpeed launcher (env:// rendezvous).

On a machine without CUDA the backend is gloo. Gradients of the plain PyTorch backend are
averaged by ``all_reduce_grads`` (no DDP wrapper, so the trainer may call sub-modules freely).
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def is_main() -> bool:
    return rank() == 0


def init(backend: str = "", use_deepspeed: bool = False) -> None:
    """Join the process group when launched with WORLD_SIZE > 1 (or always for DeepSpeed)."""
    if dist.is_initialized():
        return
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    ws = int(os.environ.get("WORLD_SIZE", "1"))
    if use_deepspeed:
        os.environ.setdefault("RANK", "0")
        os.environ.setdefault("LOCAL_RANK", "0")
        os.environ.setdefault("WORLD_SIZE", "1")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
        import deepspeed
        deepspeed.init_distributed(dist_backend=backend)
    elif ws > 1:
        dist.init_process_group(backend=backend)
    if torch.cuda.is_available() and dist.is_initialized():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))


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


def mean_across(x: float) -> float:
    if world_size() == 1:
        return float(x)
    t = torch.tensor([float(x)], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return float(t.item() / world_size())


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
