"""Bookkeeping at scale (issue 11): resume listing, seal, ``verify --quick`` and loader open at 10^3-10^5 shards.

A synthetic sealed ``softlabels.v2`` directory of N tiny shards is built quickly and consistently:

1. a corpus of N rows of 64 floats (``rows_per_shard`` 1, so N units) and the committed digits CNN
   teacher;
2. the real ``softlabels generate`` runs unit 0 only (as rank 0 of ``WORLD_SIZE=N``): that gives the
   run's journal run line (fingerprint, settings), one real shard and its journal line;
3. shards 1..N-1 are that shard's rows written again by the shard writer with their own header
   (``unit`` = N), each with its journal line (size and sha256 of its bytes) in rank 0's journal;
4. the manifest is ``rundir.build_manifest`` over the journal entries, as ``seal`` builds it.

Each operation then runs in a fresh subprocess (imports done before the clock starts), which
reports its wall time, its RSS before the operation (after the imports) and its peak RSS
(``VmHWM``; ``ru_maxrss`` would carry the benchmark's own peak across fork and exec):

* resume: a no-op rerun of the same ``softlabels generate`` command on the complete directory
  (reads the journals, one listing of data/, hashes each journalled shard, rewrites the same manifest);
* seal: ``softlabels seal`` after removing the manifest (checks every unit: size, sha256, footer);
* verify --quick: ``softlabels verify --quick`` (one listing for sizes, every footer, no hashing);
* verify: the full ``softlabels verify`` (hashes every shard), for reference;
* loader open: ``SoftLabelDataset(DIR)`` (manifest, one listing, every footer to plan the pieces).

    python pipelines/bench_bookkeeping.py --shards 1000 10000 100000 --work runs/bookkeeping

The builder (``build_synthetic``) is also used by ``tests/test_scale.py``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parents[1]
TEACHER = f"softlabels.models:digits_cnn@{REPO}/data/teachers/digits_cnn_0.safetensors"
FEATURES = 64
OPERATIONS = ("resume", "seal", "verify --quick", "verify", "loader open")


def _env() -> dict[str, str]:
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


def write_corpus(path: Path, rows: int, seed: int = 0) -> Path:
    """``rows`` samples of 64 floats in [0, 16) (digits-like), column ``inputs``, ids ``s-NNNNNNN``."""
    values = np.random.default_rng(seed).random((rows, FEATURES), dtype=np.float32) * 16
    table = pa.table({
        "id": pa.array([f"s-{i:07d}" for i in range(rows)]),
        "inputs": pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1)), FEATURES),
    })
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)
    return path


def generate_command(corpus: Path, out: Path) -> list[str]:
    """The ``softlabels generate`` command of the synthetic run (one row per unit)."""
    return [sys.executable, "-m", "softlabels.cli", "generate", str(corpus), "--teacher", TEACHER, "--out", str(out),
            "--id-column", "id", "--rows-per-shard", "1", "--batch-size", "1", "--no-progress"]


def build_synthetic(out: Path, shards: int, corpus: Path | None = None) -> dict[str, Any]:
    """Build a sealed v2 directory of ``shards`` one-row shards at ``out`` (see the module docstring).

    Args:
        corpus: where to write the corpus (default: beside ``out``, ``<out>.corpus.parquet``).

    Returns:
        ``{"corpus", "command", "fingerprint", "seconds"}``: ``command`` reruns the run's ``generate``.
    """
    from softlabels.rundir import RunDirectory, build_manifest, run_header, shard_name
    from softlabels.schema import HEADER_KEY, decode_header, encode_header
    from softlabels.shards import write_parquet

    started = time.perf_counter()
    out = Path(out)
    corpus = write_corpus(corpus or out.with_name(out.name + ".corpus.parquet"), shards)
    command = generate_command(corpus, out)
    # rank 0 of WORLD_SIZE=N runs unit 0 only: the real run line, shard and journal line
    result = subprocess.run(command, env={**_env(), "WORLD_SIZE": str(shards), "RANK": "0"},
                            capture_output=True, text=True, timeout=600)
    if result.returncode != 0:
        raise RuntimeError(f"generate failed ({result.returncode}): {result.stderr[-2000:]}")
    directory = RunDirectory.open(out)
    journal = directory.journal(0).path
    lines = journal.read_text().splitlines()
    run = json.loads(lines[0])
    first = json.loads(lines[1])
    assert run["kind"] == "run" and first["kind"] == "shard" and first["unit"] == 0 and len(lines) == 2, lines
    data = Path(directory.data_dir.path)
    table = pq.read_table(data / shard_name(0))
    header = decode_header(table.schema.metadata)
    positions = first["positions"]
    entries = [{k: v for k, v in first.items() if k != "kind"}]
    with open(journal, "a", encoding="utf-8") as handle:
        for unit in range(1, shards):
            name = shard_name(unit)
            metadata = {**table.schema.metadata, HEADER_KEY: encode_header({**header, "unit": unit})}
            path = data / name
            write_parquet(table.replace_schema_metadata(metadata), path, positions)
            blob = path.read_bytes()
            entry = {**entries[0], "file": name, "unit": unit, "bytes": len(blob), "sha256": hashlib.sha256(blob).hexdigest()}
            entries.append(entry)
            handle.write(json.dumps({"kind": "shard", **entry}, sort_keys=True) + "\n")
    settings = run["settings"]
    manifest = build_manifest(run_header(header), settings, settings.get("id_column"), settings["corpus"], entries)
    directory.write_manifest(manifest)
    return {"corpus": str(corpus), "command": command, "fingerprint": run["fingerprint"],
            "seconds": time.perf_counter() - started}


# -- timing each operation in a fresh process ------------------------------------------------------

CHILD = r"""
import json, resource, sys, time
op, directory, command = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
import torch  # noqa: F401  (every operation's imports happen before the clock starts)
from softlabels.cli import main
from softlabels.data import SoftLabelDataset
import softlabels.generate, softlabels.seal, softlabels.verify  # noqa: F401
import io, contextlib


def memory_kb(field):
    # VmHWM / VmRSS of this process since its exec; ru_maxrss would carry the parent's peak across fork+exec
    try:
        with open("/proc/self/status") as status:
            return next(int(line.split()[1]) for line in status if line.startswith(field + ":"))
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


before = memory_kb("VmRSS")
out = io.StringIO()
started = time.perf_counter()
with contextlib.redirect_stdout(out):
    if op == "resume":
        code = main(command[3:])
    elif op == "seal":
        code = main(["seal", directory])
    elif op == "verify --quick":
        code = main(["verify", directory, "--quick"])
    elif op == "verify":
        code = main(["verify", directory])
    elif op == "loader open":
        dataset = SoftLabelDataset(directory, shuffle=False)
        code = 0
        print(f"{len(dataset.shards)} shards, {len(dataset.pieces)} pieces")
seconds = time.perf_counter() - started
after = memory_kb("VmHWM")
print(json.dumps({"op": op, "code": code, "seconds": seconds, "rss_before_kb": before, "rss_peak_kb": after,
                  "output": out.getvalue().strip()[-300:]}))
"""


def time_operation(op: str, directory: Path, command: list[str]) -> dict[str, Any]:
    """Run one operation in a fresh interpreter; its wall time and peak RSS."""
    if op == "seal":
        (Path(directory) / "manifest.json").unlink()
    result = subprocess.run([sys.executable, "-c", CHILD, op, str(directory), json.dumps(command)],
                            env=_env(), capture_output=True, text=True, timeout=3600)
    if result.returncode != 0:
        raise RuntimeError(f"{op} failed: {result.stderr[-3000:]}")
    record = json.loads(result.stdout.strip().splitlines()[-1])
    if record["code"] != 0:
        raise RuntimeError(f"{op} exited {record['code']}: {result.stderr[-3000:]}")
    return record


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def bench(sizes: list[int], work: Path, keep: bool) -> list[dict[str, Any]]:
    rows = []
    for shards in sizes:
        out = work / f"run-{shards}"
        if out.exists():
            shutil.rmtree(out)
        built = build_synthetic(out, shards, work / f"corpus-{shards}.parquet")
        manifest = out / "manifest.json"
        sealed = _sha(manifest)
        size = manifest.stat().st_size
        print(f"{shards:,} shards: built in {built['seconds']:.1f} s; manifest {size:,} bytes", flush=True)
        for op in OPERATIONS:
            record = time_operation(op, out, built["command"])
            if op in ("resume", "seal"):  # both must leave exactly the manifest the builder wrote
                assert _sha(manifest) == sealed, f"{op} wrote a different manifest"
            if op == "resume":
                assert "already complete" in record["output"], record["output"]
            record.update(shards=shards, manifest_bytes=size)
            rows.append(record)
            print(f"  {op:15s} {record['seconds']:8.2f} s  {record['seconds'] / shards * 1e6:8.1f} us/shard  "
                  f"peak RSS {record['rss_peak_kb'] / 1024:7.0f} MB (before {record['rss_before_kb'] / 1024:.0f} MB)", flush=True)
        if not keep:
            shutil.rmtree(out)
            (work / f"corpus-{shards}.parquet").unlink()
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    """The README table: time and peak RSS (growth over the process's RSS before the operation) per size."""
    sizes = sorted({r["shards"] for r in rows})
    by = {(r["op"], r["shards"]): r for r in rows}
    short = [f"{n // 1000}k" if n >= 1000 else str(n) for n in sizes]
    head = ("| operation | " + " | ".join(f"{k} shards: s, peak RSS MB (growth)" for k in short) +
            f" | us per shard {' / '.join(short)} | per-shard cost {short[-1]} / {short[0]} ({short[-1]} / {short[-2]})"
            f" | growth KB per shard at {short[-1]} |")
    lines = [head, "|---" * (len(sizes) + 4) + "|"]
    for op in OPERATIONS:
        cells, per = [], []
        for n in sizes:
            r = by[op, n]
            growth = (r["rss_peak_kb"] - r["rss_before_kb"]) / 1024
            cells.append(f"{r['seconds']:.2f} s, {r['rss_peak_kb'] / 1024:.0f} (+{growth:.0f})")
            per.append(r["seconds"] / n * 1e6)
        last = by[op, sizes[-1]]
        lines.append(f"| {op} | " + " | ".join(cells) + " | " + " / ".join(f"{p:.0f}" for p in per) +
                     f" | {per[-1] / per[0]:.2f} ({per[-1] / per[-2]:.2f}) | {(last['rss_peak_kb'] - last['rss_before_kb']) / sizes[-1]:.1f} |")
    manifest = " / ".join(f"{by[OPERATIONS[0], n]['manifest_bytes'] / 1e6:.1f}" for n in sizes)
    lines.append(f"\nmanifest.json at {' / '.join(short)} shards: {manifest} MB")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shards", type=int, nargs="+", default=[1000, 10000, 100000])
    parser.add_argument("--work", type=Path, default=Path("runs/bookkeeping"))
    parser.add_argument("--keep", action="store_true", help="keep the synthetic directories")
    parser.add_argument("--json", type=Path, help="also write the measurements here")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    rows = bench(args.shards, args.work, args.keep)
    print(table(rows))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
