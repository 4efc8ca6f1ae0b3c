"""Deterministic kill points for crash tests: ``SOFTLABELS_KILL_AT=NAME[:COUNT]`` makes the process
SIGKILL itself the COUNT-th time (default the first) it reaches ``kill_point(NAME)``.

A leaf module. The points sit at the commit steps of every local write: ``FILE-staged`` (the whole
temporary file is fsync'd, not yet renamed), ``FILE-renamed`` (renamed into place), where FILE is
the target's name (``shard-000002.parquet``, ``manifest.json``, ``checkpoint.pt``,
``rank-00000.jsonl``), and for appended files (journals, ``metrics.jsonl``) ``FILE-appended`` and
``FILE-torn`` (half the line is written and fsync'd, then the kill). Unset, a point costs one
dictionary lookup.
"""

from __future__ import annotations

import os
import signal
from typing import Callable

__all__ = ["KILL_AT", "kill_point"]

KILL_AT = "SOFTLABELS_KILL_AT"
_hits: dict[str, int] = {}


def kill_point(name: str, before: Callable[[], None] | None = None) -> None:
    """SIGKILL this process here if ``SOFTLABELS_KILL_AT`` names this point (and its count is reached);
    ``before`` runs first (for example, to write a torn line)."""
    wanted = os.environ.get(KILL_AT)
    if not wanted:
        return
    target, _, count = wanted.rpartition(":") if wanted.rpartition(":")[2].isdigit() else (wanted, "", "1")
    if target != name:
        return
    _hits[name] = _hits.get(name, 0) + 1
    if _hits[name] == int(count):
        if before is not None:
            before()
        os.kill(os.getpid(), signal.SIGKILL)
