"""Names in a run directory: the folders, the shard names, the layout (v1 or v2) a directory has,
the run fingerprint, and the refusal of an output inside a run's data folder."""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any, Literal

from ..errors import UserError
from ..schema import FORMAT, FORMAT_V1
from ..storage import Location

__all__ = ["MANIFEST_NAME", "DATA_DIR", "JOURNAL_DIR", "STAGING_DIR", "SHARD_PATTERN", "Layout", "shard_name",
           "shard_unit", "settings_fingerprint", "detect_layout", "refuse_out_inside_data"]

MANIFEST_NAME = "manifest.json"
DATA_DIR = "data"
JOURNAL_DIR = "_journal"
STAGING_DIR = "_staging"
SHARD_PATTERN = re.compile(r"shard-\d{6,}\.parquet")
Layout = Literal["v1", "v2"]


def shard_name(unit: int) -> str:
    """Unit N always writes ``shard-NNNNNN.parquet``."""
    return f"shard-{unit:06d}.parquet"


def shard_unit(name: str) -> int:
    """The unit of a shard name (``shard-000012.parquet`` -> 12)."""
    return int(name[len("shard-"):-len(".parquet")])


def settings_fingerprint(settings: dict[str, Any]) -> str:
    """The run fingerprint: the first 16 hex digits of the sha256 of the settings as sorted JSON."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def detect_layout(root: Location) -> Layout:
    """The layout of an existing directory: from its manifest's format or, failing that, its contents."""
    names = root.listdir()
    if MANIFEST_NAME in names:
        try:
            recorded = json.loads((root / MANIFEST_NAME).read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            recorded = None
        if isinstance(recorded, dict) and recorded.get("format") == FORMAT_V1:
            return "v1"
        if isinstance(recorded, dict) and recorded.get("format") == FORMAT:
            return "v2"
    if DATA_DIR in names or JOURNAL_DIR in names:
        return "v2"
    if any(re.fullmatch(r"journal-\d+\.jsonl", name) for name in names):
        return "v1"
    return "v2"


def refuse_out_inside_data(out: "str | os.PathLike[str] | Location", flag: str = "--out") -> None:
    """Refuse an output inside a run's ``data/`` (a folder named ``data`` beside a manifest or journal):
    anything written there breaks the dataset for every reader of ``DIR/data``.

    Raises:
        UserError: naming the run directory.
    """
    location = Location.of(out)
    if location.local:
        parts = Path(os.path.realpath(location.path)).parts
        candidates = [Location.of(Path(*parts[:i])) for i in range(2, len(parts) + 1) if parts[i - 1] == DATA_DIR]
    else:
        text = location.uri.rstrip("/")
        scheme, _, rest = text.partition("://")
        pieces = rest.split("/")
        candidates = [Location.of(f"{scheme}://{'/'.join(pieces[:i])}") for i in range(2, len(pieces) + 1) if pieces[i - 1] == DATA_DIR]
    for folder in candidates:
        parent = Location.of(os.path.dirname(folder.path)) if folder.local else Location.of(folder.uri.rsplit("/", 1)[0])
        names = parent.listdir()
        if MANIFEST_NAME in names or JOURNAL_DIR in names:
            raise UserError(f"{flag} {location} is inside {folder}, the data folder of the soft-label run {parent}; "
                            f"choose an {flag} outside it (only that run's shards may live in {DATA_DIR}/)")
