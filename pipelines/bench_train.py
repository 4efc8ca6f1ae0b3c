"""Student-side benchmarks: loader throughput and offline vs online distillation epoch time.

1. Loader throughput: positions per second through ``SoftLabelDataset`` + collate (shuffled,
   sha256-checked, padded int64/float32 tensors, inputs included) as a ratio to a raw pyarrow read
   of the same columns of the same shards (``pq.read_table`` of each file, no conversion), in the
   same process. Target >= 0.5. Also reported without the sha256 pass and without shuffling.
2. Offline vs online: wall time of one epoch of distillation from the shards (student forward,
   backward and ``kd_loss`` over the stored top-20) against online distillation with the teacher in
   the loop (teacher forward over the same batches, dense full-vocabulary KD), same student, same
   optimizer, same batches. Offline must never be slower; the ratio shows by how much it is faster.

Workload: an LLM-shaped token corpus (ragged sequences of 32-128 tokens, vocabulary 32,000), a
teacher of a 2-layer GRU of width 256 and a student of width 64, both with a full 32,000-way
output layer. Alternating runs; medians of per-pair ratios.

    python pipelines/bench_train.py [--quick] [--out runs/bench_train]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch import nn

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

VOCAB = 32000


class TokenLM(nn.Module):
    """Embedding, a GRU stack and a full-vocabulary head; ``model(x, lengths)`` -> [B, T, V]."""

    def __init__(self, width: int, layers: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, width)
        self.rnn = nn.GRU(width, width, num_layers=layers, batch_first=True)
        self.head = nn.Linear(width, VOCAB)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        return self.head(self.rnn(self.embed(x))[0])


def teacher_lm() -> nn.Module:
    return TokenLM(256, 2)


def student_lm() -> nn.Module:
    return TokenLM(64, 1)


def build(out: Path, rows: int) -> tuple[Path, Path]:
    """A token corpus and its soft labels (k=20) from a seeded teacher."""
    from safetensors.torch import save_file

    from softlabels.generate import GenerateConfig, generate

    rng = np.random.default_rng(0)
    lengths = rng.integers(32, 129, rows)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    tokens = rng.integers(0, VOCAB, int(lengths.sum()))
    corpus = out / "corpus.parquet"
    pq.write_table(pa.table({"id": [f"r{i:06d}" for i in range(rows)],
                             "inputs": pa.ListArray.from_arrays(pa.array(offsets), pa.array(tokens))}), corpus)
    torch.manual_seed(0)
    weights = out / "teacher.safetensors"
    save_file({k: v.contiguous() for k, v in teacher_lm().state_dict().items()}, str(weights))
    soft = out / "soft"
    generate(GenerateConfig(corpus=[str(corpus)], teachers=[f"bench_train:teacher_lm@{weights}"], out=soft,
                            id_column="id", top_k=20, rows_per_shard=max(rows // 6, 1), batch_size=16, progress=False))
    return soft, weights


def raw_read(soft: Path) -> tuple[float, int]:
    """A plain ``pq.read_table`` of the columns the loader reads, shard by shard, no conversion."""
    from softlabels.rundir import RunDirectory
    from softlabels.targets import soft_columns

    directory = RunDirectory.open(soft)
    manifest = directory.read_sealed()
    columns = ["sample_id", manifest["input_column"], *soft_columns(manifest)]  # ids, log-probs (or uint8 codes)
    shards = [str(path) for path in directory.shard_files()]  # local disk: plain paths for pyarrow
    started = time.perf_counter()
    positions = 0
    for path in shards:
        table = pq.read_table(path, columns=columns)
        positions += len(table.column("topk_ids").combine_chunks().flatten())
    return time.perf_counter() - started, positions


def loader_read(soft: Path, **options: Any) -> tuple[float, int]:
    from softlabels.data import SoftLabelDataset

    started = time.perf_counter()
    dataset = SoftLabelDataset(soft, batch_size=32, **options)
    positions = sum(int(batch["mask"].sum()) for batch in dataset)
    return time.perf_counter() - started, positions


def epoch(soft: Path, teacher_weights: Path, online: bool, seed: int = 0) -> float:
    """One epoch of distillation; the teacher runs in the loop when ``online``."""
    from safetensors.torch import load_file

    from softlabels.data import SoftLabelDataset
    from softlabels.losses import dense_kd_loss, kd_loss

    torch.manual_seed(seed)
    student = student_lm()
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-3)
    teacher = None
    if online:
        teacher = teacher_lm()
        teacher.load_state_dict(load_file(str(teacher_weights)))
        teacher.eval().requires_grad_(False)
    dataset = SoftLabelDataset(soft, batch_size=16, seed=seed, with_inputs=True)
    started = time.perf_counter()
    for batch in dataset:
        mask = batch["mask"]
        logits = student(batch["inputs"], batch["lengths"])[:, : mask.shape[1]][mask]  # valid positions [N, V]
        if teacher is not None:
            with torch.inference_mode():
                teacher_logits = teacher(batch["inputs"], batch["lengths"])[:, : mask.shape[1]][mask]
            loss = dense_kd_loss(logits, teacher_logits.clone(), 2.0)
        else:
            loss = kd_loss(logits, batch["topk_ids"][mask], batch["topk_logprobs"][mask], 2.0, "bucket")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "bench_train")
    args = parser.parse_args()
    if args.out.exists():
        shutil.rmtree(args.out)
    args.out.mkdir(parents=True)
    rows = 120 if args.quick else 240
    repeats = 2 if args.quick else 3
    soft, weights = build(args.out, rows)
    results: dict[str, Any] = {"rows": rows, "threads": torch.get_num_threads()}

    ratios: dict[str, list[float]] = {"default": [], "no_sha256": [], "no_shuffle_no_sha256": []}
    raw_rates = []
    for _ in range(repeats):
        raw_seconds, positions = raw_read(soft)
        raw_rates.append(positions / raw_seconds)
        for name, options in (("default", {}), ("no_sha256", {"verify_sha256": False}),
                              ("no_shuffle_no_sha256", {"verify_sha256": False, "shuffle": False})):
            seconds, counted = loader_read(soft, **options)
            if counted != positions:
                raise SystemExit(f"loader yielded {counted} positions, the shards hold {positions}")
            ratios[name].append((counted / seconds) / (positions / (raw_seconds)))
    results["positions"] = positions
    results["raw_positions_per_s"] = statistics.median(raw_rates)
    results["loader_ratio"] = {k: statistics.median(v) for k, v in ratios.items()}

    epoch_ratios, offline_times, online_times = [], [], []
    for _ in range(repeats):
        offline = epoch(soft, weights, online=False)
        online = epoch(soft, weights, online=True)
        offline_times.append(offline)
        online_times.append(online)
        epoch_ratios.append(offline / online)
    results["offline_epoch_s"] = statistics.median(offline_times)
    results["online_epoch_s"] = statistics.median(online_times)
    results["offline_over_online"] = statistics.median(epoch_ratios)
    (args.out / "results.json").write_text(json.dumps(results, indent=2))

    command = "python pipelines/bench_train.py" + (" --quick" if args.quick else "")
    print(f"`{command}`: {rows} rows, {positions:,} positions, k=20, V={VOCAB:,}, {results['threads']} torch threads, "
          f"medians of {repeats} alternating runs.\n")
    print("| figure | value | target |")
    print("|---|---|---|")
    print(f"| raw pyarrow read of the same columns | {results['raw_positions_per_s']:,.0f} positions/s | |")
    for name, label in (("default", "SoftLabelDataset + collate (shuffle, sha256)"), ("no_sha256", "... verify_sha256=False"),
                        ("no_shuffle_no_sha256", "... and shuffle=False")):
        print(f"| {label} / raw read | {results['loader_ratio'][name]:.2f} | >= 0.5 |")
    print(f"| offline epoch / online epoch (teacher in the loop) | {results['offline_over_online']:.3f} "
          f"({results['offline_epoch_s']:.1f} s vs {results['online_epoch_s']:.1f} s) | < 1 |")


if __name__ == "__main__":
    main()
