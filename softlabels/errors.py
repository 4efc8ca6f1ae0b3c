"""Error types the CLI maps to exit codes.

A ``UserError`` is bad usage or bad input: the CLI prints its one-line message and exits 1, with no
traceback. A ``VerificationError`` means a dataset on disk is incomplete or corrupt: exit 2. Both
subclass ``ValueError`` so library callers can treat them as bad data.
"""

from __future__ import annotations

__all__ = ["UserError", "VerificationError", "NotSealedError"]


class UserError(ValueError):
    """Bad usage or bad input; the message names the file, column, flag or sample ids."""


class VerificationError(ValueError):
    """A soft-label directory failed verification; the message names the bad file."""


class NotSealedError(VerificationError):
    """A directory that holds no finished run (no manifest, or the manifest of an unfinished one): not
    damage, but work to finish. Readers that need a sealed directory turn it into a ``UserError``."""
