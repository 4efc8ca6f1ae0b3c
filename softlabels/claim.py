"""One output claim: what every writing command checks of its ``--out`` before it writes, then the lease.

``generate``, ``select``, ``train-student`` and ``init-student`` claim their output with
``claim_output`` before any long work, in this order: the store's bucket exists; ``--out`` is not a
file and not inside a run's ``data/`` folder; it neither is, holds, nor lies inside one of the
command's inputs; every file already in it is one the command writes; then the command holds the
lease on it (``lease.take_lease``: one writer per output) until it returns. Each command passes only
what differs: its inputs, and its rule for which files it writes (``foreign``). ``check_output`` is
the same checks without the lease, for a caller that does not own the command's lifetime
(``DistillationRecipe`` driven by hand).

A refusal is one ``UserError`` line naming the flag, the directory and the culprit.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from pathlib import Path, PurePosixPath

from .errors import UserError
from .lease import is_lease_name, take_lease
from .rundir.layout import refuse_out_inside_data
from .storage import Location

__all__ = ["Foreign", "Inputs", "overlap", "names_in", "check_output", "claim_output"]

Foreign = Callable[[Location], "str | None"]
"""A command's rule: the first file in ``--out`` it did not write (named relative to ``--out``), or None."""
Inputs = Iterable[tuple["str | os.PathLike[str] | Location", str]]
"""The command's inputs as (place, how messages name it: ``"CORPUS"``, ``"the --teacher directory"``)."""


def overlap(out: Location, other: Location) -> str | None:
    """How ``out`` meets ``other``: ``"is"``, ``"is inside"`` or ``"holds"``; None when they are apart.

    Local paths compare after resolving links, store URIs as written; a local path never meets a URI.
    """
    if out.local != other.local:
        return None
    if out.local:
        here, there = Path(out.path).resolve(), Path(other.path).resolve()
    else:
        here, there = PurePosixPath(out.uri.rstrip("/")), PurePosixPath(other.uri.rstrip("/"))
    if here == there:
        return "is"
    if here.is_relative_to(there):
        return "is inside"
    if there.is_relative_to(here):
        return "holds"
    return None


def names_in(out: Location) -> list[str]:
    """The names directly inside ``out``, sorted, less the lease of a writer (none when it does not exist)."""
    return [name for name in out.listdir() if not is_lease_name(name)]


def check_output(out: "str | os.PathLike[str] | Location", command: str, foreign: Foreign | None = None,
                 apart_from: Inputs = (), flag: str = "--out") -> Location:
    """The checks of ``claim_output``, without the lease; returns ``out`` as a ``Location``.

    Raises:
        UserError: a missing bucket, a file, a place inside a run's ``data/``, an input overlapped, or
            a file ``command`` did not write (``foreign``), each naming ``flag`` and the culprit.
    """
    location = Location.of(out)
    location.require_bucket(flag)  # a missing bucket is refused before any work, not at the first write
    if location.is_file():
        raise UserError(f"{flag} {location} exists and is not a directory")
    refuse_out_inside_data(location, flag)
    for place, what in apart_from:
        relation = overlap(location, Location.of(place))
        if relation is not None:
            raise UserError(f"{flag} {location} {relation} {what} {place}; choose another {flag}")
    stranger = foreign(location) if foreign is not None else None
    if stranger is not None:
        raise UserError(f"{flag} {location} holds {stranger}, which {command} did not write; give an empty or new {flag}")
    return location


def claim_output(out: "str | os.PathLike[str] | Location", command: str, foreign: Foreign | None = None,
                 apart_from: Inputs = (), flag: str = "--out") -> Location:
    """Check ``out`` (``check_output``), then hold its lease until the enclosing ``lease_scope``
    command ends; returns ``out`` as a ``Location``.

    Args:
        command: the writer as users are told (``"softlabels generate"``), in refusals and the lease.
        foreign: the command's rule for files it did not write (None: anything may be there).
        apart_from: the command's inputs, which ``out`` may neither be, hold, nor lie inside.

    Raises:
        UserError: see ``check_output``; ``lease.LeaseHeld`` (a ``UserError``) when another writer
            holds ``out``.
    """
    location = check_output(out, command, foreign, apart_from, flag)
    take_lease(location, command, flag)
    return location
