"""The distributed environment: this process's place among torchrun (or other launcher) ranks.

The one reader of ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK``; a process outside any launcher is
rank 0 of 1 on local device 0.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Mapping

from .errors import UserError

__all__ = ["DistributedEnv", "distributed_env"]


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
