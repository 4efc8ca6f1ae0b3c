"""The manifest flip sweep (issue 19): every single-bit flip of a small run's ``manifest.json`` either
fails ``verify`` or leaves the dataset's meaning unchanged.

A small sealed run is made (3 shards of the digits CNN ensemble over 37 random rows, units of 16),
or ``--dir`` names an existing sealed directory. Then, for every byte of its manifest and every mask
in ``--masks`` (default: the 8 single bits), the byte is XORed with the mask, the readers run in
this process, and the manifest is put back. Each flip is one of:

* ``rejected``: ``verify`` raised ``VerificationError`` (exit 2), and so did every other reader run;
* ``unchanged``: the flipped text parses to JSON equal to the original (the dataset means the same),
  and every reader accepted it;
* ``silent_wrong``: a reader accepted a manifest whose meaning changed (the failure this sweep exists
  to find); ``crash``: a reader raised anything but ``VerificationError`` (a traceback for the user);
  ``refused_unchanged``: the meaning is unchanged but a reader refused it (safe, counted apart).

``--legacy`` sweeps the same manifest stripped of its checksum, as an earlier release wrote it: what
the cross-checks alone (shard headers, settings fingerprint, entry types, totals) catch.

The readers: ``verify`` (full, sha256 included; ``--quick`` for sizes and footers only) and, with
``--readers``, ``inspect`` and ``SoftLabelDataset`` (what ``train-student`` opens), read through.

    python pipelines/manifest_flip_sweep.py --work runs/flip_sweep --readers

``tests/test_manifest_integrity.py`` runs a deterministic sample of it (``sweep(..., flips=...)``).
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parents[1]
TEACHERS = [f"softlabels.models:digits_cnn@{REPO}/data/teachers/digits_cnn_{i}.safetensors" for i in range(2)]
ROWS, ROWS_PER_SHARD = 37, 16
MASKS = (0x01, 0x02, 0x04, 0x08, 0x10, 0x20, 0x40, 0x80)
OUTCOMES = ("rejected", "unchanged", "refused_unchanged", "silent_wrong", "crash")


def build_run(work: Path) -> Path:
    """A small sealed run under ``work``: 37 rows of 64 floats, 2 teachers, 3 shards (16, 16, 5 rows)."""
    from softlabels.cli import main

    rng = np.random.default_rng(19)
    values = rng.random((ROWS, 64), dtype=np.float32)
    corpus = work / "corpus.parquet"
    work.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"id": [f"r-{i:03d}" for i in range(ROWS)],
                             "inputs": pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1)), 64),
                             "label": rng.integers(0, 10, ROWS)}), corpus)
    out = work / "run"
    args = ["generate", str(corpus), "--out", str(out), "--id-column", "id", "--label-column", "label",
            "--rows-per-shard", str(ROWS_PER_SHARD), "--top-k", "5", "--no-progress"]
    for spec in TEACHERS:
        args += ["--teacher", spec]
    if main(args) != 0:
        raise SystemExit(f"generate failed for {out}")
    return out


def strip_checksum(directory: Path) -> None:
    """Rewrite the manifest as an earlier release wrote it: the same body, no checksum and no marker."""
    from softlabels.rundir import MANIFEST_CHECKSUM_KEY, MANIFEST_INTEGRITY_KEY

    path = directory / "manifest.json"
    body = {k: v for k, v in json.loads(path.read_text()).items() if k not in (MANIFEST_CHECKSUM_KEY, MANIFEST_INTEGRITY_KEY)}
    path.write_text(json.dumps(body, indent=2, sort_keys=True) + "\n")


def readers(with_others: bool, quick: bool) -> dict[str, Callable[[Path], Any]]:
    """Name -> a callable that opens the directory as that reader does (raising to refuse)."""
    from softlabels.verify import verify

    chosen: dict[str, Callable[[Path], Any]] = {"verify": lambda d: verify(d, quick=quick)}
    if with_others:
        from softlabels.data import SoftLabelDataset
        from softlabels.inspect import inspect

        chosen["inspect"] = inspect
        chosen["loader"] = lambda d: sum(1 for _ in SoftLabelDataset(d, batch_size=8, shuffle=False))  # opened and read through
    return chosen


def all_flips(size: int, masks: Iterable[int] = MASKS) -> list[tuple[int, int]]:
    return [(offset, mask) for offset in range(size) for mask in masks]


def sample_flips(text: bytes, count: int, seed: int = 0, masks: Iterable[int] = MASKS) -> list[tuple[int, int]]:
    """A deterministic sample of ``count`` flips, plus every flip of the bytes that name the checksum
    and its marker, the first shard's ``sha256`` key and ``top_k`` (the edits that could switch a
    check off)."""
    everything = all_flips(len(text), masks)
    chosen = set(random.Random(seed).sample(everything, min(count, len(everything))))
    for needle in (b'"manifest_sha256"', b'"manifest_integrity"', b'"sha256"', b'"top_k"'):
        start = text.find(needle)
        if start >= 0:
            chosen.update((offset, mask) for offset in range(start, start + len(needle)) for mask in masks)
    return sorted(chosen)


def _same_meaning(original: Any, flipped: bytes) -> bool:
    try:
        return json.loads(flipped.decode("utf-8")) == original
    except (UnicodeDecodeError, ValueError, RecursionError):
        return False


def classify(directory: Path, original_text: bytes, flip: tuple[int, int],
             chosen: dict[str, Callable[[Path], Any]]) -> tuple[str, str]:
    """(outcome, detail) of one flip; the manifest is put back afterwards."""
    from softlabels.errors import VerificationError

    offset, mask = flip
    flipped = bytearray(original_text)
    flipped[offset] ^= mask
    path = directory / "manifest.json"
    path.write_bytes(bytes(flipped))
    try:
        same = _same_meaning(json.loads(original_text), bytes(flipped))
        refused: list[str] = []
        for name, reader in chosen.items():
            try:
                reader(directory)
            except VerificationError:
                refused.append(name)
            except Exception as exc:  # noqa: BLE001 - any other exception is the finding
                return "crash", f"{name}: {type(exc).__name__}: {exc}"
        if same:
            return ("refused_unchanged", ",".join(refused)) if refused else ("unchanged", "")
        accepted = [name for name in chosen if name not in refused]
        return ("silent_wrong", f"accepted by {', '.join(accepted)}") if accepted else ("rejected", "")
    finally:
        path.write_bytes(original_text)


def sweep(directory: Path, flips: list[tuple[int, int]] | None = None, with_others: bool = False,
          quick: bool = False) -> tuple[Counter[str], list[tuple[int, int, str, str]]]:
    """Run the flips (all single-bit flips when None) over ``directory``'s manifest.

    Returns:
        outcome counts, and (offset, mask, outcome, detail) of every flip that is silent_wrong or crash.
    """
    text = (directory / "manifest.json").read_bytes()
    chosen = readers(with_others, quick)
    counts: Counter[str] = Counter()
    findings: list[tuple[int, int, str, str]] = []
    for flip in flips if flips is not None else all_flips(len(text)):
        outcome, detail = classify(directory, text, flip, chosen)
        counts[outcome] += 1
        if outcome in ("silent_wrong", "crash"):
            findings.append((*flip, outcome, detail))
    return counts, findings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("runs/flip_sweep"), help="where the small run is made")
    parser.add_argument("--dir", type=Path, help="sweep this sealed directory instead (a copy is swept)")
    parser.add_argument("--readers", action="store_true", help="also run inspect and SoftLabelDataset on every flip")
    parser.add_argument("--quick", action="store_true", help="verify --quick (sizes and footers, no sha256)")
    parser.add_argument("--sample", type=int, help="a deterministic sample of this many flips, not all")
    parser.add_argument("--legacy", action="store_true",
                        help="strip the checksum and its marker first, as a manifest of an earlier release (the cross-checks alone)")
    parser.add_argument("--masks", default=",".join(f"0x{m:02x}" for m in MASKS), help="XOR masks, comma-separated")
    args = parser.parse_args(argv)
    masks = [int(m, 0) for m in args.masks.split(",")]
    if args.dir is not None:
        directory = args.work / "swept"
        shutil.rmtree(directory, ignore_errors=True)
        shutil.copytree(args.dir, directory)
    else:
        shutil.rmtree(args.work / "run", ignore_errors=True)
        directory = build_run(args.work)
    if args.legacy:
        strip_checksum(directory)
    text = (directory / "manifest.json").read_bytes()
    flips = sample_flips(text, args.sample, masks=masks) if args.sample else all_flips(len(text), masks)
    started = time.perf_counter()
    counts, findings = sweep(directory, flips, with_others=args.readers, quick=args.quick)
    seconds = time.perf_counter() - started
    for offset, mask, outcome, detail in findings[:50]:
        context = text[max(0, offset - 20): offset + 20].decode("utf-8", "replace").replace("\n", " ")
        print(f"{outcome}: byte {offset} ^ 0x{mask:02x} in ...{context}...: {detail}")
    readers_run = "verify" + (" --quick" if args.quick else "") + (", inspect, SoftLabelDataset" if args.readers else "")
    print(f"{directory / 'manifest.json'}: {len(text):,} bytes, {len(flips):,} flips (masks {args.masks}; readers: {readers_run}) "
          f"in {seconds:.1f} s: " + ", ".join(f"{name} {counts[name]:,}" for name in OUTCOMES))
    return 1 if counts["silent_wrong"] or counts["crash"] else 0


if __name__ == "__main__":
    sys.exit(main())
