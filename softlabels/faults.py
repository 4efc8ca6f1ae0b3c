"""Deterministic kill points for crash tests: ``SOFTLABELS_KILL_AT=NAME[:COUNT]`` makes the process
SIGKILL itself the COUNT-th time (default the first) it reaches ``kill_point(NAME)``, as ``kill -9``
would; ``SOFTLABELS_INTERRUPT_AT=NAME[:COUNT]`` sends it SIGINT there instead, as Ctrl-C would (the
process then handles it as it handles a user's Ctrl-C).

A leaf module. The points sit at the commit steps of every local write: ``FILE-staged`` (the whole
temporary file is fsync'd, not yet renamed), ``FILE-renamed`` (renamed into place), where FILE is
the target's name (``shard-000002.parquet``, ``manifest.json``, ``checkpoint.pt``,
``rank-00000.jsonl``), and for appended files (journals, ``metrics.jsonl``) ``FILE-appended`` and
``FILE-torn`` (half the line is written and fsync'd, then the kill); ``journal-appended`` follows
each durable shard record of a run's journal on any store. Unset, a point costs two dictionary lookups.
"""

from __future__ import annotations

import os
import signal
from typing import Callable

__all__ = ["INTERRUPT_AT", "KILL_AT", "kill_point"]

KILL_AT = "SOFTLABELS_KILL_AT"
INTERRUPT_AT = "SOFTLABELS_INTERRUPT_AT"
_hits: dict[tuple[str, str], int] = {}


def _reached(variable: str, name: str) -> bool:
    """Whether ``variable`` names the point ``name`` and this is the COUNT-th time it is reached."""
    wanted = os.environ.get(variable)
    if not wanted:
        return False
    target, _, count = wanted.rpartition(":") if wanted.rpartition(":")[2].isdigit() else (wanted, "", "1")
    if target != name:
        return False
    _hits[variable, name] = _hits.get((variable, name), 0) + 1
    return _hits[variable, name] == int(count)


def kill_point(name: str, before: Callable[[], None] | None = None) -> None:
    """Signal this process here if ``SOFTLABELS_KILL_AT`` (SIGKILL) or ``SOFTLABELS_INTERRUPT_AT``
    (SIGINT) names this point and its count is reached; ``before`` runs first (for example, to write a
    torn line)."""
    for variable, sig in ((KILL_AT, signal.SIGKILL), (INTERRUPT_AT, signal.SIGINT)):
        if _reached(variable, name):
            if before is not None:
                before()
            os.kill(os.getpid(), sig)
