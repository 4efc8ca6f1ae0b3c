"""The results table of the KJV distillation pipeline (pipelines/kjv_distill.sh).

Reads each student's final evaluation (``metrics.jsonl``) and the soft-label manifests, measures the
teacher's own held-out perplexity with one direct forward pass over the held-out windows, and prints
a markdown table: held-out perplexity and bits per token, top-1 agreement with the teacher, and the
fidelity of the stored top-k.

    python pipelines/kjv_report.py RUN_DIR TEACHER_SPEC
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

ARMS = (
    ("hard", "hard next-token labels only"),
    ("offline_k20", "offline KD from k=20 shards"),
    ("offline_k64", "offline KD from k=64 shards"),
    ("online", "online KD, teacher in the loop (full logits)"),
)


def teacher_perplexity(spec: str, heldout: Path, batch_size: int = 8) -> float:
    from softlabels.teachers import load_teacher

    teacher = load_teacher(spec, torch.device("cpu"))
    column = pq.read_table(heldout, columns=["inputs"]).column("inputs").combine_chunks()
    window = column.type.list_size
    tokens = torch.from_numpy(column.flatten().to_numpy().astype(np.int64).reshape(-1, window))
    nll, count = 0.0, 0
    with torch.inference_mode():
        for begin in range(0, len(tokens), batch_size):
            x = tokens[begin : begin + batch_size]
            logits = teacher.module(x).float()
            log_p = torch.log_softmax(logits[:, :-1], dim=-1)
            nll -= float(log_p.gather(-1, x[:, 1:, None]).sum())
            count += x[:, 1:].numel()
    return math.exp(nll / count)


def final_eval(run: Path) -> dict[str, float]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if "eval_kd" in r][-1]


def main() -> None:
    root, spec = Path(sys.argv[1]), sys.argv[2]
    teacher_ppl = teacher_perplexity(spec, root / "corpus" / "heldout.parquet")
    print("| model | held-out perplexity | bits per token | top-1 agreement with teacher |")
    print("|---|---|---|---|")
    print(f"| teacher (SmolLM2-135M-Instruct, fp32) | {teacher_ppl:.2f} | {math.log2(teacher_ppl):.3f} | 1 |")
    for name, label in ARMS:
        run = root / name
        if not (run / "metrics.jsonl").is_file():
            continue
        metrics = final_eval(run)
        ppl = metrics["eval_perplexity"]
        print(f"| student: {label} | {ppl:.2f} | {math.log2(ppl):.3f} | {metrics['eval_top1_agreement']:.4f} |")
    print()
    print("| stored k | captured mass mean | captured mass p5 | KL(full ‖ stored) nats/position | soft-label bytes/position |")
    print("|---|---|---|---|---|")
    for k in (20, 64):
        manifest = json.loads((root / f"soft_k{k}" / "manifest.json").read_text())
        fidelity, totals = manifest["fidelity"], manifest["totals"]
        print(f"| {k} | {fidelity['captured_mass_mean']:.4f} | {fidelity['captured_mass_p5']:.3f} | "
              f"{fidelity['kl_full_vs_stored_mean']:.4f} | {totals['soft_label_bytes'] / totals['positions']:.1f} |")


if __name__ == "__main__":
    main()
