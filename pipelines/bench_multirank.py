"""Scaling efficiency of multi-rank ``generate`` on a fixed CPU budget.

The same corpus and teacher through ``softlabels generate`` three ways, each a child process with
the same total of ``--cpus`` cores (default 2): one process with that many torch threads; and
``torchrun --nproc-per-node N`` with N ranks of one thread each (N = --cpus). Reported: wall time of
each and the ratio t(1 rank) / t(N ranks), i.e. the speed-up the ranks give on the same cores (1.0 =
no gain; N would need N times the cores). Both outputs are compared row for row (the multi-rank one
must equal the single-process one). Runs alternate (1, N, 1, N, ...); the median per-pair ratio is the
figure. Teacher: ``bench_generate:lm_quick`` (18M parameters, V = 32,000) over ragged 64-256-token rows.

    python pipelines/bench_multirank.py [--rows 96] [--pairs 2] [--out runs/bench_multirank]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from bench_generate import LM_LENGTHS, LM_VOCAB, token_table, write_corpus  # noqa: E402


def save_weights(path: Path) -> str:
    import torch
    from safetensors.torch import save_file

    from bench_generate import lm_quick

    torch.manual_seed(0)
    save_file({k: v.contiguous() for k, v in lm_quick().state_dict().items()}, str(path))
    return f"bench_generate:lm_quick@{path}"


def run(ranks: int, cpus: int, corpus: Path, teacher: str, out: Path, rows_per_shard: int) -> float:
    shutil.rmtree(out, ignore_errors=True)
    threads = cpus if ranks == 1 else max(1, cpus // ranks)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(PYTHONPATH=f"{REPO}{os.pathsep}{HERE}", OMP_NUM_THREADS=str(threads), HF_HUB_OFFLINE="1")
    args = ["generate", str(corpus), "--teacher", teacher, "--out", str(out), "--rows-per-shard", str(rows_per_shard),
            "--batch-size", "4", "--device", "cpu", "--no-progress"]
    if ranks == 1:
        command = [sys.executable, "-m", "softlabels.cli", *args]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(ranks),
                   "-m", "softlabels.cli", *args]
    started = time.perf_counter()
    result = subprocess.run(command, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{result.stderr[-3000:]}")
    return seconds


def rows_of(out: Path):  # noqa: ANN201 - a pyarrow table
    import pyarrow as pa

    from softlabels.rundir import RunDirectory

    return pa.concat_tables(pq.read_table(str(p)) for p in RunDirectory.open(out).shard_files()).sort_by("sample_id")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=96)
    parser.add_argument("--rows-per-shard", type=int, default=8)
    parser.add_argument("--cpus", type=int, default=2)
    parser.add_argument("--pairs", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("runs/bench_multirank"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    corpus = write_corpus(token_table(args.rows, LM_VOCAB, LM_LENGTHS, seed=0, with_id=True), args.out / "corpus.parquet")
    teacher = save_weights(args.out / "lm_quick.safetensors")
    ranks = args.cpus
    pairs = []
    for _ in range(args.pairs):
        single = run(1, args.cpus, corpus, teacher, args.out / "one", args.rows_per_shard)
        multi = run(ranks, args.cpus, corpus, teacher, args.out / "many", args.rows_per_shard)
        pairs.append({"one_rank_s": single, "ranks_s": multi, "speedup": single / multi})
        print(json.dumps(pairs[-1]), file=sys.stderr, flush=True)
    one, many = rows_of(args.out / "one"), rows_of(args.out / "many")
    from softlabels.rundir import RunDirectory
    from softlabels.targets import soft_columns

    soft = ["sample_id", *soft_columns(RunDirectory.open(args.out / "one").read_sealed()), "confidence", "entropy"]
    # one thread per rank vs two threads in one process: sums may round differently in the last bit
    equal_ids = one.select(["sample_id", "topk_ids"]).equals(many.select(["sample_id", "topk_ids"]))
    identical = one.select(soft).equals(many.select(soft))
    speedup = statistics.median(p["speedup"] for p in pairs)
    result = {"command": "python " + " ".join(sys.argv), "rows": args.rows, "cpus": args.cpus, "ranks": ranks,
              "pairs": pairs, "speedup": speedup, "wall_ratio_ranks_over_one": 1 / speedup,
              "same_ids": equal_ids, "bitwise_identical": identical}
    (args.out / "results.json").write_text(json.dumps(result, indent=2))
    print(f"`{result['command']}` ({args.rows} rows, {args.cpus} cores)\n")
    print("| layout | wall time (median) |\n|---|---|")
    print(f"| 1 process, {args.cpus} threads | {statistics.median(p['one_rank_s'] for p in pairs):.1f} s |")
    print(f"| torchrun, {ranks} ranks x {max(1, args.cpus // ranks)} thread | {statistics.median(p['ranks_s'] for p in pairs):.1f} s |")
    print(f"\nwall time {ranks} ranks / 1 rank = {1 / speedup:.3f} (speed-up {speedup:.2f}x on the same {args.cpus} cores); "
          f"top-k ids equal: {equal_ids}; all soft-label columns bitwise identical: {identical}")


if __name__ == "__main__":
    main()
