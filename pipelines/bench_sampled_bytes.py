"""Bytes per position of sampled targets against top-k, on a real LLM teacher (SmolLM2 over KJV windows).

Runs the teacher over a few tokenized windows, then writes the same positions as Parquet soft labels
twice over: top-k (``topk_ids`` + ``topk_logprobs``, the shard layout) and sampled at each N
(``sample_ids`` + ``sample_counts`` + ``sample_logprobs``, ``softlabels.targets.sampling``), both with zstd,
BYTE_STREAM_SPLIT on the soft-label leaves and the log-prob column at zstd level 6 as
``softlabels.shards`` writes them. Prints compressed bytes of the soft-label columns per position and
the distinct ids per position.

    python pipelines/prepare_kjv.py --out runs/kjv_bytes/corpus --max-windows 64   # once
    python pipelines/bench_sampled_bytes.py --corpus runs/kjv_bytes/corpus/train.parquet [--windows 32]
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from prepare_kjv import smollm2_dir

from softlabels.codec import LogprobCodec, leaf_type
from softlabels.inputs import to_teacher_inputs
from softlabels.schema import id_type
from softlabels.targets import TOPK
from softlabels.targets.sampled import sample_arrays
from softlabels.targets.sampling import draw_targets, position_keys, sample_fields
from softlabels.shards import LOGPROB_ZSTD_LEVEL
from softlabels.teachers import load_teacher

__all__ = ["parquet_bytes", "main"]


def parquet_bytes(table: pa.Table) -> int:
    """Compressed bytes of all column chunks, written as softlabels.shards writes soft labels."""
    leaves = {f"{name}.list.element.list.element": name for name in table.column_names}
    split = [leaf for leaf, name in leaves.items() if not pa.types.is_float16(leaf_type(table.schema.field(name).type))]
    levels = {leaf: LOGPROB_ZSTD_LEVEL for leaf, name in leaves.items() if "logprob" in name}
    sink = io.BytesIO()
    pq.write_table(table, sink, compression="zstd", use_dictionary=False, column_encoding=dict.fromkeys(split, "BYTE_STREAM_SPLIT"),
                   compression_level=levels)
    metadata = pq.ParquetFile(io.BytesIO(sink.getvalue())).metadata
    return sum(metadata.row_group(g).column(c).total_compressed_size
               for g in range(metadata.num_row_groups) for c in range(metadata.num_columns))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", type=Path, required=True, help="tokenized windows (prepare_kjv.py's train.parquet)")
    parser.add_argument("--windows", type=int, default=32)
    parser.add_argument("--samples", default="12,24")
    parser.add_argument("--top-k", default="20,64")
    parser.add_argument("--logprob-dtype", default="bfloat16")
    args = parser.parse_args(argv)
    table = pq.read_table(args.corpus).slice(0, args.windows)
    teacher = load_teacher(f"hf:{smollm2_dir()}", torch.device("cpu"))
    inputs = to_teacher_inputs(table.column("inputs"), "inputs", table.column("id"))
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        logits = teacher.logits(inputs)
    rows, steps, vocab = logits.shape
    logprobs = torch.log_softmax(logits.float().reshape(rows * steps, vocab), dim=-1)
    positions = torch.full((rows,), steps, dtype=torch.int64)
    codec = LogprobCodec.named(args.logprob_dtype)
    offsets = pa.array(np.arange(rows + 1, dtype=np.int32) * steps)
    print(f"{rows} windows x {steps} tokens = {rows * steps} positions, V = {vocab}, log-probs {codec.dtype}")
    print("| targets | distinct ids/position (mean, p50, p90, max) | soft-label bytes/position (zstd) | draw time ms/position |")
    print("|---|---|---:|---:|")
    for k in (int(x) for x in args.top_k.split(",")):
        values, ids = torch.topk(logprobs, k, dim=-1)
        fields = TOPK.fields(vocab, {"top_k": k}, codec)
        arrays = [pa.ListArray.from_arrays(offsets, pa.FixedSizeListArray.from_arrays(
                      pa.array(flat.reshape(-1), type=kind), k))
                  for flat, kind in ((ids.numpy().astype(id_type(vocab).to_pandas_dtype()), id_type(vocab)),
                                     (codec.encode_numpy(values.numpy()), codec.arrow_type))]
        size = parquet_bytes(pa.Table.from_arrays(arrays, schema=pa.schema(fields)))
        print(f"| top-{k} | {k} | {size / (rows * steps):.1f} | |")
    keys = position_keys("bench-sampled-bytes", table.column("id").to_pylist(), positions)
    for n in (int(x) for x in args.samples.split(",")):
        started = time.perf_counter()
        targets = draw_targets(logprobs, keys, n)
        seconds = time.perf_counter() - started
        distinct = targets.unique_per_position().float()
        sampled = pa.Table.from_arrays(sample_arrays(targets, positions, vocab, codec), schema=pa.schema(sample_fields(vocab, n, 1.0, codec)))
        size = parquet_bytes(sampled)
        quantiles = torch.quantile(distinct, torch.tensor([0.5, 0.9]))
        print(f"| sampled N={n} | {float(distinct.mean()):.2f}, {float(quantiles[0]):.0f}, {float(quantiles[1]):.0f}, "
              f"{int(distinct.max())} | {size / (rows * steps):.1f} | {seconds / (rows * steps) * 1e3:.3f} |")


if __name__ == "__main__":
    main()
