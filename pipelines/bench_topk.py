"""The top-k step alone: ``softlabels.targets.topk.soft_labels`` against the pre-issue-12 one, per position.

One batch of generate's shape (8 rows of 128 positions) of bf16 logits at SmolLM2's width
(V = 49,152) by default, k = 20, one teacher. The current and the reference
(``topk_reference.py``: the old NaN/Inf pass, log-softmax, top-k, exp, batched dot) alternate
``--rounds`` times at each thread count; the figures are medians of microseconds per position, wall
and process CPU. ``--profile`` adds torch.profiler's table of the current one's operators.

    python pipelines/bench_topk.py [--threads 1,2] [--rounds 9] [--profile]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import topk_reference  # noqa: E402

from softlabels.targets import topk  # noqa: E402


def per_position(run: Callable[[], object], positions: int) -> tuple[float, float]:
    """(wall, process CPU) microseconds per position of one call."""
    wall, cpu = time.perf_counter(), time.process_time()
    run()
    return (time.perf_counter() - wall) / positions * 1e6, (time.process_time() - cpu) / positions * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vocab", type=int, default=49152)
    parser.add_argument("--positions", type=int, default=1024)
    parser.add_argument("--top-k", type=int, default=20)
    parser.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    parser.add_argument("--threads", default="1,2", help="comma-separated torch thread counts")
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(args.positions, args.vocab, generator=generator) * 3
    logits = logits.to(torch.bfloat16 if args.dtype == "bf16" else torch.float32)
    per_row = torch.full((8,), args.positions // 8)
    per_row[-1] += args.positions - int(per_row.sum())
    variants = {
        "current": lambda: topk.soft_labels([logits], per_row, args.top_k, "probs"),
        "reference": lambda: topk_reference.soft_labels([logits], per_row, args.top_k, "probs"),
    }
    print(f"`python {' '.join(sys.argv)}`: [{args.positions}, {args.vocab}] {args.dtype} logits, k={args.top_k}, "
          f"median of {args.rounds} alternating rounds\n")
    print("| torch threads | current: wall / CPU us per position | pre-issue-12: wall / CPU | wall ratio |\n|---|---|---|---|")
    for threads in (int(t) for t in args.threads.split(",")):
        torch.set_num_threads(threads)
        for run in variants.values():
            run()  # warm-up
        times: dict[str, list[tuple[float, float]]] = {name: [] for name in variants}
        for _ in range(args.rounds):
            for name, run in variants.items():
                times[name].append(per_position(run, args.positions))
        wall = {name: statistics.median(t[0] for t in runs) for name, runs in times.items()}
        cpu = {name: statistics.median(t[1] for t in runs) for name, runs in times.items()}
        print(f"| {threads} | {wall['current']:.1f} / {cpu['current']:.1f} | {wall['reference']:.1f} / {cpu['reference']:.1f} "
              f"| {wall['reference'] / wall['current']:.2f}x |")
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as profiled:
            variants["current"]()
        print()
        print(profiled.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))


if __name__ == "__main__":
    main()
