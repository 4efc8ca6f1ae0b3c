"""The manifest: its shard entries, how it is built, its checksum of its own body, and what makes a
parsed one untrustworthy (damage) or unusable by readers (shape)."""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any, TypedDict

from ..codec import LogprobCodec
from ..errors import UserError
from ..fidelity import Fidelity
from ..targets import kind_of
from .layout import SHARD_PATTERN, settings_fingerprint

__all__ = ["MANIFEST_BODY_KEYS", "SHARD_FIELDS", "REQUIRED_MANIFEST_KEYS", "MANIFEST_CHECKSUM_KEY", "MANIFEST_INTEGRITY_KEY",
           "ShardEntry", "build_manifest", "manifest_checksum", "manifest_text", "manifest_damage", "shape_damage"]

# Manifest keys that are not the run header (everything else in a manifest is a header field).
MANIFEST_BODY_KEYS = ("complete", "settings", "id_column", "corpus", "shards", "totals", "fidelity", "selection", "skipped_samples")
SHARD_FIELDS = ("file", "rows", "positions", "bytes", "sha256")
REQUIRED_MANIFEST_KEYS = ("fingerprint", "vocab_size", "teachers", "shards", "totals")
"""What every sealed manifest must hold; its target kind adds its ``manifest_keys`` (``top_k``; ``samples`` ...)."""
MANIFEST_CHECKSUM_KEY = "manifest_sha256"
"""The manifest's checksum of its own body: ``manifest_checksum``."""
MANIFEST_INTEGRITY_KEY = "manifest_integrity"
MANIFEST_INTEGRITY = "manifest_sha256 is the sha256 of the sorted, compact JSON of every other key"
"""Written beside the checksum by every writer of this release. A manifest with neither key is one of an
earlier release (read as it was); one with either must carry a matching checksum, so no single edit
(the checksum key renamed or deleted included) turns the check off."""


class ShardEntry(TypedDict, total=False):
    """One committed shard, as journalled (all keys) and as listed in a manifest (the first five)."""

    file: str
    rows: int
    positions: int
    bytes: int
    sha256: str | None
    unit: int
    soft_label_bytes: int
    fidelity: dict[str, Any]
    skipped_nonfinite: int
    skipped_samples: list[dict[str, str]]


def build_manifest(
    header: dict[str, Any],
    settings: dict[str, Any],
    id_column: str | None,
    corpus: list[dict[str, Any]],
    entries: list[ShardEntry],
) -> dict[str, Any]:
    """The manifest of a finished directory.

    Args:
        header: the run header every shard carries (without the shard's ``unit``).
        settings: the settings the fingerprint hashes.
        id_column: ``--id-column`` of the run.
        corpus: the corpus record ``[{path, rows, bytes}]``.
        entries: one journal-style entry per shard in unit order; ``fidelity`` and
            ``skipped_nonfinite`` where the teacher ran. The manifest has a ``fidelity`` summary
            only when every entry has one (a selection cannot recompute it).
    """
    totals = {
        "rows": sum(e["rows"] for e in entries),
        "positions": sum(e["positions"] for e in entries),
        "bytes": sum(e["bytes"] for e in entries),
        "soft_label_bytes": sum(e["soft_label_bytes"] for e in entries),
        "shards": len(entries),
        "skipped_nonfinite": sum(e.get("skipped_nonfinite", 0) for e in entries),
    }
    manifest: dict[str, Any] = {
        **header,
        "complete": True,
        "settings": settings,
        "id_column": id_column,
        "corpus": corpus,
        "shards": [{k: e[k] for k in SHARD_FIELDS} for e in entries],
        "totals": totals,
    }
    if entries and all("fidelity" in e for e in entries):
        fidelity = Fidelity()
        for entry in entries:
            fidelity.merge(Fidelity.from_json(entry["fidelity"]))
        manifest["fidelity"] = kind_of(header).fidelity_summary(fidelity)
    skipped = [sample for entry in entries for sample in entry.get("skipped_samples", [])]
    if skipped:  # rows dropped as bad input (--on-bad-audio skip): [{sample_id, reason}] in unit order
        manifest["skipped_samples"] = skipped
    return manifest


def manifest_checksum(manifest: dict[str, Any]) -> str:
    """The sha256 of the manifest's body (every key but ``manifest_sha256``) as sorted, compact JSON."""
    body = {k: v for k, v in manifest.items() if k != MANIFEST_CHECKSUM_KEY}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def manifest_text(manifest: dict[str, Any]) -> str:
    """The text of ``manifest.json``: the body with its integrity note and checksum added."""
    body = {k: v for k, v in manifest.items() if k not in (MANIFEST_CHECKSUM_KEY, MANIFEST_INTEGRITY_KEY)}
    body[MANIFEST_INTEGRITY_KEY] = MANIFEST_INTEGRITY
    body[MANIFEST_CHECKSUM_KEY] = manifest_checksum(body)
    return json.dumps(body, indent=2, sort_keys=True) + "\n"


def manifest_damage(manifest: dict[str, Any]) -> str | None:
    """What makes a parsed manifest untrustworthy (checksum, entry shapes), or None."""
    if MANIFEST_CHECKSUM_KEY in manifest or MANIFEST_INTEGRITY_KEY in manifest:
        recorded = manifest.get(MANIFEST_CHECKSUM_KEY)
        if not isinstance(recorded, str):
            return f"no {MANIFEST_CHECKSUM_KEY}, which every manifest with {MANIFEST_INTEGRITY_KEY} carries"
        if recorded != manifest_checksum(manifest):
            return "its checksum does not match its contents"
    settings = manifest.get("settings")
    if "settings" in manifest and (not isinstance(settings, dict) or settings_fingerprint(settings) != manifest.get("fingerprint")):
        return "its settings do not hash to its fingerprint"
    for key in ("corpus", "id_column"):
        if isinstance(settings, dict) and key in manifest and key in settings and manifest[key] != settings[key]:
            return f"its {key} differs from the settings' {key}"
    return None



def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def shape_damage(manifest: dict[str, Any]) -> str | None:
    """What a sealed manifest's readers would trip over (a shard entry or total missing or mistyped), or None."""
    shards = manifest.get("shards")
    if not isinstance(shards, list):
        return "'shards' is not a list"
    files: set[str] = set()
    for index, entry in enumerate(shards):
        if not isinstance(entry, dict):
            return f"shards[{index}] is not an object"
        for key in SHARD_FIELDS:
            if key not in entry:
                return f"shards[{index}] has no {key!r}"
        if not isinstance(entry["file"], str) or not SHARD_PATTERN.fullmatch(entry["file"]):
            return f"names an invalid shard file {entry['file']!r}"
        if entry["file"] in files:
            return f"lists {entry['file']} twice"
        files.add(entry["file"])
        if not all(_is_count(entry[key]) for key in ("rows", "positions", "bytes")):
            return f"shards[{index}]: rows, positions and bytes must be counts"
        if not isinstance(entry["sha256"], str) or not re.fullmatch(r"[0-9a-f]{64}", entry["sha256"]):
            return f"shards[{index}]: sha256 is not 64 hex digits"
    totals = manifest.get("totals")
    if not isinstance(totals, dict) or not all(_is_count(totals.get(key)) for key in ("rows", "positions", "bytes", "shards")):
        return "'totals' lacks counts of rows, positions, bytes and shards"
    if totals["shards"] != len(shards):
        return f"totals.shards is {totals['shards']}, but it lists {len(shards)} shards"
    for key in ("rows", "positions", "bytes"):
        if totals[key] != sum(entry[key] for entry in shards):
            return f"totals.{key} is not the sum of its shards' {key}"
    try:
        LogprobCodec.from_header(manifest)
    except (ValueError, TypeError) as exc:
        return f"its log-prob storage is unreadable ({exc})"
    if not _is_count(manifest.get("vocab_size")) or not manifest["vocab_size"]:
        return "'vocab_size' is not a positive count"
    teachers = manifest.get("teachers")
    if not isinstance(teachers, list) or not teachers or not all(isinstance(t, dict) and isinstance(t.get("sha256"), str) for t in teachers):
        return "'teachers' is not a list of {name, sha256}"
    try:
        counted = kind_of(manifest).size_key
    except UserError as exc:
        return str(exc)
    if counted is not None and (not _is_count(manifest.get(counted)) or not manifest[counted]):
        return f"{counted!r} is not a positive count"
    return None

