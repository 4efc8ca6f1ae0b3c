"""Loader throughput against a raw pyarrow read of the same shards and columns, in one run.

Generates (once) a soft-label directory of ``--rows`` token rows of ``--length`` tokens with a
small GRU teacher (k=20, bfloat16 log-probs, the default), then alternates ``--rounds`` times:
a plain ``pq.read_table`` of every shard's ``sample_id``, ``inputs``, ``topk_ids`` and
``topk_logprobs`` (no conversion), and one shuffled, sha256-checked ``SoftLabelDataset`` epoch
(batches of 32, every position turned into padded tensors). The figure is the median of the
per-round ratios of positions per second, loader / raw.

    python pipelines/bench_loader.py --rows 4000 --length 128 --rounds 9
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def build(work: Path, rows: int, length: int) -> Path:
    import torch
    from safetensors.torch import save_file

    from softlabels.generate import generate
    from softlabels.options import GenerateConfig
    from softlabels.loading import load_model

    out = work / "soft"
    if (out / "manifest.json").is_file():
        return out
    tokens = np.random.default_rng(0).integers(0, 97, (rows, length))
    offsets = np.arange(0, rows * length + 1, length, dtype=np.int32)
    pq.write_table(pa.table({"id": [f"r{i}" for i in range(rows)],
                             "inputs": pa.ListArray.from_arrays(pa.array(offsets), pa.array(tokens.reshape(-1)))}), work / "c.parquet")
    torch.manual_seed(1)
    model, _ = load_model("softlabels.models:token_gru")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(work / "t.safetensors"))
    generate(GenerateConfig(corpus=[str(work / "c.parquet")], teachers=[f"softlabels.models:token_gru@{work / 't.safetensors'}"],
                            out=str(out), id_column="id", rows_per_shard=1000, batch_size=128, progress=False))
    return out


def raw_read(soft: Path) -> tuple[float, int]:
    from softlabels.rundir import RunDirectory
    from softlabels.targets import soft_columns

    directory = RunDirectory.open(soft)
    manifest = directory.read_sealed()
    columns = ["sample_id", manifest["input_column"], *soft_columns(manifest)]
    started = time.perf_counter()
    positions = 0
    for path in directory.shard_files():
        table = pq.read_table(path.path, columns=columns)
        positions += len(table.column("topk_ids").combine_chunks().flatten())
    return time.perf_counter() - started, positions


def loader_read(soft: Path) -> tuple[float, int]:
    from softlabels.data import SoftLabelDataset

    started = time.perf_counter()
    positions = sum(int(batch["mask"].sum()) for batch in SoftLabelDataset(soft, batch_size=32, shuffle=True))
    return time.perf_counter() - started, positions


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=4000)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--work", type=Path, default=None)
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="bench-loader-"))
    work.mkdir(parents=True, exist_ok=True)
    soft = build(work, args.rows, args.length)
    raw_read(soft), loader_read(soft)  # warm the page cache and imports
    ratios, raw_rates, loader_rates = [], [], []
    for _ in range(args.rounds):
        raw_seconds, positions = raw_read(soft)
        loader_seconds, loaded = loader_read(soft)
        assert loaded == positions
        raw_rates.append(positions / raw_seconds)
        loader_rates.append(positions / loader_seconds)
        ratios.append(raw_seconds / loader_seconds)
    print(json.dumps({"positions": positions, "raw_positions_per_s_median": statistics.median(raw_rates),
                      "loader_positions_per_s_median": statistics.median(loader_rates),
                      "loader_over_raw_median": statistics.median(ratios), "ratios": ratios}, indent=2))


if __name__ == "__main__":
    main()
