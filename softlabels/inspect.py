"""``softlabels inspect``: what is in a soft-label directory, from Polars lazy scans.

Only the columns a figure needs are read, and per-position figures come from exploding the list
columns inside Polars, so no Python loop touches a position. The shards are the ones the manifest
lists (a file in data/ it does not list is refused, naming it), each checked first as ``verify`` checks it (size, sha256,
footer), so a damaged shard is a VerificationError naming it, never a page of plausible figures.
Quantiles are linear interpolations, as numpy's default.

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
from .rundir import RunDirectory, check_shard
from .schema import soft_columns, targets_of

__all__ = ["inspect", "render"]

HISTOGRAM_BINS = 10
TOP_CLASSES = 10


def _distribution(frame: pl.DataFrame, column: str, upper: float | None = None) -> dict[str, Any]:
    values = frame.get_column(column).drop_nulls()
    if values.len() == 0:
        return {"mean": None}
    high = upper if upper is not None else max(float(values.max()), 1e-9)
    edges = [high * i / HISTOGRAM_BINS for i in range(HISTOGRAM_BINS + 1)]
    bins = (values.cast(pl.Float64) / high * HISTOGRAM_BINS).floor().clip(0, HISTOGRAM_BINS - 1).cast(pl.Int64)
    counts = bins.value_counts().sort(bins.name)
    histogram = [0] * HISTOGRAM_BINS
    for index, count in zip(counts.get_column(bins.name).to_list(), counts.get_column("count").to_list()):
        histogram[index] = count
    return {
        "mean": float(values.mean()),
        "p5": float(values.quantile(0.05, "linear")),
        "p50": float(values.quantile(0.5, "linear")),
        "p95": float(values.quantile(0.95, "linear")),
        "histogram": {"edges": edges, "counts": histogram},
    }


def inspect(directory: str | Path) -> dict[str, Any]:
    """Figures of a sealed directory (see the module docstring); raises VerificationError if unsealed."""
    run_directory = RunDirectory.open(directory)
    root = run_directory.root
    manifest = run_directory.read_sealed()
    run_directory.refuse_unlisted(manifest)  # data/ holds exactly the dataset
    shards = [run_directory.shard_path(entry["file"]) for entry in manifest["shards"]]
    for path, entry in zip(shards, manifest["shards"]):  # damaged shards are named, never summarised
        check_shard(path, entry, manifest)
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
        "top_k": manifest.get("top_k"),
        "logprob_dtype": manifest.get("logprob_dtype", "float16"),
        "vocab_size": manifest["vocab_size"],
        "ensemble": manifest.get("ensemble"),
        "format": manifest.get("format"),
        "targets": targets_of(manifest),
        "teachers": [t.get("name", t.get("spec")) for t in manifest["teachers"]],
        "fidelity": manifest.get("fidelity", {}),
    }
    if report["targets"] == "sample":
        report.update(samples=manifest["samples"], proposal_temperature=manifest["proposal_temperature"])
    if not files:
        return report
    codec = LogprobCodec.from_header(manifest)
    scan = pl.scan_parquet(files)
    names = scan.collect_schema().names()
    rows = scan.select([c for c in ("confidence", "entropy", "agreement") if c in names]).collect()
    report["confidence"] = _distribution(rows, "confidence", upper=1.0)
    report["entropy"] = _distribution(rows, "entropy")
    if "agreement" in names:
        agreement = rows.get_column("agreement")
        report["agreement"] = {**_distribution(rows, "agreement", upper=1.0), "unanimous_rows": float((agreement >= 1.0 - 1e-6).mean())}
    if report["targets"] == "sample":
        ids_column, logprob_column = soft_columns(manifest)
        positions = scan.select(
            pl.col(logprob_column).explode().list.eval(codec.decode_polars(pl.element()).exp()).list.sum().alias("mass"),
            pl.col(ids_column).explode().list.len().alias("unique"),
            pl.col(ids_column).explode().list.first().alias("top1"),
        ).collect()
        report["drawn_mass"] = _distribution(positions, "mass", upper=1.0)
        report["unique_ids"] = _distribution(positions, "unique", upper=float(manifest["samples"]))
    else:
        positions = scan.select(
            pl.col(codec.column).explode().arr.to_list().list.eval(codec.decode_polars(pl.element()).exp()).list.sum().alias("mass"),
            pl.col("topk_ids").explode().arr.first().alias("top1"),
        ).collect()
        report["captured_mass"] = _distribution(positions, "mass", upper=1.0)
    counts = positions.get_column("top1").value_counts(sort=True).head(TOP_CLASSES)
    report["top1_classes"] = [
        {"class": int(c), "positions": int(n), "share": int(n) / max(positions.height, 1)}
        for c, n in zip(counts.get_column("top1").to_list(), counts.get_column("count").to_list())
    ]
    return report


def render(report: dict[str, Any]) -> str:
    """A short human-readable page."""
    lines = [
        f"{report['directory']}: {report['rows']:,} rows, {report['positions']:,} positions, {report['shards']} shards, "
        f"{report['bytes']:,} bytes ({report['bytes_per_position']:.1f}/position, {report['soft_label_bytes_per_position']:.1f} for soft labels)",
        f"{_stored(report)} of {report['vocab_size']:,} classes, {report.get('logprob_dtype', 'float16')} log-probs; ensemble {report['ensemble']} of {len(report['teachers'])} teacher(s)",
    ]
    for name in ("captured_mass", "unique_ids", "drawn_mass", "confidence", "entropy"):
        figure = report.get(name)
        if figure and figure.get("mean") is not None:
            lines.append(f"{name.replace('_', ' ')}: mean {figure['mean']:.4f}, p5 {figure['p5']:.4f}, median {figure['p50']:.4f}, p95 {figure['p95']:.4f}")
    fidelity = report.get("fidelity") or {}
    if "unique_ids_mean" in fidelity:
        lines.append(f"whole run: {fidelity['unique_ids_mean']:.2f} distinct ids per position holding {fidelity['drawn_mass_mean']:.4f} "
                     "of the teacher's mass (the draws estimate the rest without bias)")
    if "kl_full_vs_stored_mean" in fidelity:
        lines.append(f"KL(full || stored with uniform tail): {fidelity['kl_full_vs_stored_mean']:.3e} nats per position")
    if "agreement" in report:
        lines.append(f"ensemble agreement: mean {report['agreement']['mean']:.4f}, unanimous rows {report['agreement']['unanimous_rows']:.2%}")
    if report.get("top1_classes"):
        shown = ", ".join(f"{c['class']} ({c['share']:.1%})" for c in report["top1_classes"])
        kind = "classes most often the most drawn id of a position" if report.get("targets") == "sample" else "most frequent top-1 classes"
        lines.append(f"{kind}: {shown}")
    return "\n".join(lines)


def _stored(report: dict[str, Any]) -> str:
    """What each position stores: ``top-k 20`` or ``12 draws (proposal T=1)``."""
    if report.get("targets") == "sample":
        return f"{report['samples']} draws (proposal temperature {report['proposal_temperature']:g})"
    return f"top-k {report['top_k']}"


def to_json(report: dict[str, Any]) -> str:
    return json.dumps(report, indent=2, sort_keys=True)


__all__ += ["to_json"]
