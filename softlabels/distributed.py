"""The distributed environment: this process's place among torchrun (or other launcher) ranks, and
the device and precision it computes on.

The one reader of ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK``; a process outside any launcher is
rank 0 of 1 on local device 0.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from typing import Any, Mapping

import torch

from .errors import UserError

__all__ = ["DistributedEnv", "autocast", "data_parallel_position", "distributed_env", "launcher_job", "resolve_device"]


@dataclass(frozen=True)
class DistributedEnv:
    """Attributes: rank (0..world_size-1), world_size (>= 1), local_rank (the device on this node)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0


def distributed_env(environ: Mapping[str, str] | None = None) -> DistributedEnv:
    """This process's rank, world size and local rank from the launcher's environment.

    Raises:
        UserError: values that are not integers, or a rank outside the world size.
    """
    environ = os.environ if environ is None else environ
    try:
        env = DistributedEnv(int(environ.get("RANK", 0)), int(environ.get("WORLD_SIZE", 1)), int(environ.get("LOCAL_RANK", 0)))
    except ValueError:
        raise UserError("RANK, WORLD_SIZE and LOCAL_RANK must be integers") from None
    if env.world_size < 1 or not 0 <= env.rank < env.world_size:
        raise UserError(f"RANK {env.rank} is outside WORLD_SIZE {env.world_size}")
    return env


def data_parallel_position() -> tuple[int, int]:
    """(rank, world size) among the ranks that split the data: the initialised torch.distributed
    process group's, else the launcher's (``distributed_env``)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    env = distributed_env()
    return env.rank, env.world_size


LOOPBACK_HOSTS = ("localhost", "::1", "0.0.0.0")


def launcher_job(environ: Mapping[str, str] | None = None) -> str | None:
    """The identity of the multi-process job this rank belongs to, the same in each of its ranks; None
    for a single process (WORLD_SIZE 1) or a launcher that names no job.

    torchrun's ``TORCHELASTIC_RUN_ID`` (random under ``--standalone``, ``none`` by default otherwise)
    with ``MASTER_ADDR:MASTER_PORT`` and ``WORLD_SIZE``: two jobs live at once cannot share a master
    port on one address. A loopback master address adds the host name, as such a job has one host.

    Raises:
        UserError: as ``distributed_env``.
    """
    environ = os.environ if environ is None else environ
    env = distributed_env(environ)
    run_id = environ.get("TORCHELASTIC_RUN_ID", "")
    addr, port = environ.get("MASTER_ADDR", ""), environ.get("MASTER_PORT", "")
    if env.world_size == 1 or not ((run_id and run_id != "none") or (addr and port)):
        return None
    job = f"{run_id or 'none'}@{addr}:{port}/{env.world_size}"
    if addr.startswith("127.") or addr in LOOPBACK_HOSTS:
        job += f"@{socket.gethostname()}"
    return job


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """``auto``, ``cpu`` or ``cuda`` (this process's LOCAL_RANK GPU under torchrun)."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise UserError("--device cuda: no CUDA device is available")
        return torch.device("cuda", local_rank)
    return torch.device(name)


def autocast(device: torch.device, precision: str) -> Any:
    """bf16 autocast on ``device`` for ``--precision bf16``, a disabled one for fp32."""
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return torch.autocast(device.type, enabled=False)
