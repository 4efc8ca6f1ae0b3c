"""``softlabels inspect``: what is in a soft-label directory, from Polars lazy scans.

Only the columns a figure needs are read, and per-position figures come from exploding the list
columns inside Polars, so no Python loop touches a position. The shards are the ones the manifest
lists (a file in data/ it does not list is refused, naming it), each checked first as ``verify`` checks it (size, sha256,
footer), so a damaged shard is a VerificationError naming it, never a page of plausible figures.
Quantiles are linear interpolations, as numpy's default.

Audio directories (``--audio-column``) also report the audio: hours (the ``duration_s`` column),
frames (their positions) per second, bytes per frame, and the rows skipped as bad audio.

Sampled directories (``targets: sample``) report, in place of the captured top-k mass, the distinct
ids stored per position (``unique_ids``) and their teacher probability (``drawn_mass``), and as
"top-1" the most drawn id of each position; bytes per position are reported for both kinds.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import polars as pl

from .codec import LogprobCodec
from .rundir import RunDirectory
from .targets import kind_named, kind_of
from .targets.base import distribution

__all__ = ["inspect", "render"]

TOP_CLASSES = 10


def inspect(directory: str | Path) -> dict[str, Any]:
    """Figures of a sealed directory (see the module docstring); raises VerificationError if unsealed."""
    run_directory = RunDirectory.open(directory)
    root = run_directory.root
    manifest = run_directory.open_sealed()  # data/ holds exactly the dataset
    kind = kind_of(manifest)
    shards = [path for _, path, _ in run_directory.check_shards(manifest)]  # damaged shards are named, never summarised
    files = [str(path) for path in shards]
    totals = manifest["totals"]
    report: dict[str, Any] = {
        "directory": str(root),
        "rows": totals["rows"],
        "positions": totals["positions"],
        "shards": totals["shards"],
        "bytes": totals["bytes"],
        "bytes_per_position": totals["bytes"] / max(totals["positions"], 1),
        "soft_label_bytes_per_position": totals.get("soft_label_bytes", 0) / max(totals["positions"], 1),
        "top_k": manifest.get("top_k"),  # None for kinds without k (as in earlier releases)
        "logprob_dtype": manifest.get("logprob_dtype", "float16"),
        "vocab_size": manifest["vocab_size"],
        "ensemble": manifest.get("ensemble"),
        "format": manifest.get("format"),
        "targets": kind.name,
        "teachers": [t.get("name", t.get("spec")) for t in manifest["teachers"]],
        "fidelity": manifest.get("fidelity", {}),
    }
    report.update(kind.report_fields(manifest))
    if not files:
        return report
    codec = LogprobCodec.from_header(manifest)
    scan = pl.scan_parquet(files)
    names = scan.collect_schema().names()
    rows = scan.select([c for c in ("confidence", "entropy", "agreement") if c in names]).collect()
    report["confidence"] = distribution(rows, "confidence", upper=1.0)
    report["entropy"] = distribution(rows, "entropy")
    if "agreement" in names:
        agreement = rows.get_column("agreement")
        report["agreement"] = {**distribution(rows, "agreement", upper=1.0), "unanimous_rows": float((agreement >= 1.0 - 1e-6).mean())}
    if manifest.get("audio_column") is not None and "duration_s" in names:
        report["audio"] = audio_figures(scan, manifest)
    figures, positions = kind.inspect(scan, manifest, codec)
    report.update(figures)
    counts = positions.get_column("top1").value_counts(sort=True).head(TOP_CLASSES)
    report["top1_classes"] = [
        {"class": int(c), "positions": int(n), "share": int(n) / max(positions.height, 1)}
        for c, n in zip(counts.get_column("top1").to_list(), counts.get_column("count").to_list())
    ]
    return report


def audio_figures(scan: pl.LazyFrame, manifest: dict[str, Any]) -> dict[str, Any]:
    """Hours of audio, frames per second, bytes per frame (whole shards and soft labels), skipped rows."""
    seconds = float(scan.select(pl.col("duration_s").cast(pl.Float64).sum()).collect().item() or 0.0)
    totals = manifest["totals"]
    return {"hours": seconds / 3600, "frames": totals["positions"], "frames_per_second": totals["positions"] / max(seconds, 1e-9),
            "bytes_per_frame": totals["bytes"] / max(totals["positions"], 1),
            "soft_label_bytes_per_frame": totals.get("soft_label_bytes", 0) / max(totals["positions"], 1),
            "sample_rate": manifest.get("sample_rate"), "skipped_samples": len(manifest.get("skipped_samples", []))}


def render(report: dict[str, Any]) -> str:
    """A short human-readable page."""
    kind = kind_named(report.get("targets", "topk"))
    stored, fidelity_lines, top1_counts = kind.inspect_lines(report)
    lines = [
        f"{report['directory']}: {report['rows']:,} rows, {report['positions']:,} positions, {report['shards']} shards, "
        f"{report['bytes']:,} bytes ({report['bytes_per_position']:.1f}/position, {report['soft_label_bytes_per_position']:.1f} for soft labels)",
        f"{stored} of {report['vocab_size']:,} classes, {report.get('logprob_dtype', 'float16')} log-probs; ensemble {report['ensemble']} of {len(report['teachers'])} teacher(s)",
    ]
    if "audio" in report:
        audio = report["audio"]
        skipped = f", {audio['skipped_samples']} rows skipped as bad audio" if audio["skipped_samples"] else ""
        lines.append(f"audio: {audio['hours']:,.3f} hours at {audio['sample_rate']} Hz, {audio['frames']:,} frames "
                     f"({audio['frames_per_second']:.1f}/s), {audio['bytes_per_frame']:.1f} bytes/frame "
                     f"({audio['soft_label_bytes_per_frame']:.1f} for soft labels){skipped}")
    for name in (*kind.inspect_figures, "confidence", "entropy"):
        figure = report.get(name)
        if figure and figure.get("mean") is not None:
            lines.append(f"{name.replace('_', ' ')}: mean {figure['mean']:.4f}, p5 {figure['p5']:.4f}, median {figure['p50']:.4f}, p95 {figure['p95']:.4f}")
    lines += fidelity_lines
    if "agreement" in report:
        lines.append(f"ensemble agreement: mean {report['agreement']['mean']:.4f}, unanimous rows {report['agreement']['unanimous_rows']:.2%}")
    if report.get("top1_classes"):
        shown = ", ".join(f"{c['class']} ({c['share']:.1%})" for c in report["top1_classes"])
        lines.append(f"{top1_counts}: {shown}")
    return "\n".join(lines)


def to_json(report: dict[str, Any]) -> str:
    return json.dumps(report, indent=2, sort_keys=True)


__all__ += ["to_json"]
