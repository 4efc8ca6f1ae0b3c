"""The results table of the KJV distillation pipeline (pipelines/kjv_distill.sh).

Reads each student's final evaluation (``metrics.jsonl``) and the soft-label manifests, runs the
teacher and every student once over the held-out windows to measure perplexity and the expected
calibration error of the next-token distribution, and prints markdown tables: held-out perplexity
and bits per token, top-1 agreement with the teacher, ECE, the soft-label bytes per position each
arm trained from, and the fidelity of the stored targets. An arm run with several seeds (``ARM``
for seed 0, ``ARM-seedS`` for the others) is reported as mean ± sample standard deviation.

    python pipelines/kjv_report.py RUN_DIR TEACHER_SPEC
"""

from __future__ import annotations

import json
import math
import statistics
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

ARMS = (
    ("hard", "hard next-token labels only"),
    ("offline_k20", "offline KD from k=20 shards"),
    ("offline_k64", "offline KD from k=64 shards"),
    ("sampled_12", "offline KD from N=12 sampled shards"),
    ("sampled_24", "offline KD from N=24 sampled shards"),
    ("online", "online KD, teacher in the loop (full logits)"),
)
SHARDS = {"offline_k20": "soft_k20", "offline_k64": "soft_k64", "sampled_12": "soft_s12", "sampled_24": "soft_s24"}
CALIBRATION_BINS = 15


def expected_calibration_error(confidence: np.ndarray, correct: np.ndarray, bins: int = CALIBRATION_BINS) -> float:
    """ECE over equal-width confidence bins: sum over bins of (share of positions) x |accuracy - mean confidence|.

    Args:
        confidence: [n] the model's top-1 probability per position, in [0, 1].
        correct: [n] bool, whether the top-1 token is the next token.
    """
    confidence = np.asarray(confidence, dtype=np.float64)
    correct = np.asarray(correct, dtype=np.float64)
    if confidence.shape != correct.shape or confidence.size == 0:
        raise ValueError(f"confidence {confidence.shape} and correct {correct.shape} must be equal, non-empty shapes")
    index = np.minimum((confidence * bins).astype(np.int64), bins - 1)
    gap = np.bincount(index, weights=correct - confidence, minlength=bins)
    return float(np.abs(gap).sum() / confidence.size)


def heldout_tokens(heldout: Path) -> torch.Tensor:
    """[windows, window] int64 token ids of the held-out Parquet file."""
    column = pq.read_table(heldout, columns=["inputs"]).column("inputs").combine_chunks()
    return torch.from_numpy(column.flatten().to_numpy().astype(np.int64).reshape(-1, column.type.list_size))


def next_token_figures(spec: str, tokens: torch.Tensor, batch_size: int = 8) -> dict[str, float]:
    """Perplexity and ECE of a model (teacher or student SPEC) predicting each next held-out token, in fp32."""
    from softlabels.teachers import load_teacher

    model = load_teacher(spec, torch.device("cpu")).module.float()
    nll, confidence, correct = 0.0, [], []
    with torch.inference_mode():
        for begin in range(0, len(tokens), batch_size):
            x = tokens[begin : begin + batch_size]
            log_p = torch.log_softmax(model(x).float()[:, :-1], dim=-1)
            nll -= float(log_p.gather(-1, x[:, 1:, None]).sum())
            top = log_p.max(dim=-1)
            confidence.append(top.values.exp().reshape(-1).numpy())
            correct.append((top.indices == x[:, 1:]).reshape(-1).numpy())
    count = tokens[:, 1:].numel()
    return {"perplexity": math.exp(nll / count),
            "ece": expected_calibration_error(np.concatenate(confidence), np.concatenate(correct))}


def final_eval(run: Path) -> dict[str, float]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if "eval_kd" in r][-1]


def seed_runs(root: Path, arm: str) -> list[Path]:
    """The finished runs of an arm: ``ARM`` (seed 0) and ``ARM-seedS``, in seed order."""
    runs = [root / arm] + sorted(root.glob(f"{arm}-seed*"), key=lambda p: int(p.name.rsplit("seed", 1)[1]))
    return [run for run in runs if (run / "student.safetensors").is_file()]


def spread(values: list[float], digits: int) -> str:
    """``mean`` for one value, ``mean ± sd`` (sample sd) for several."""
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def bytes_per_position(root: Path, arm: str) -> str:
    manifest_path = root / SHARDS.get(arm, "") / "manifest.json"
    if arm not in SHARDS or not manifest_path.is_file():
        return "—"
    totals = json.loads(manifest_path.read_text())["totals"]
    return f"{totals['soft_label_bytes'] / totals['positions']:.1f}"


def main() -> None:
    root, spec = Path(sys.argv[1]), sys.argv[2]
    tokens = heldout_tokens(root / "corpus" / "heldout.parquet")
    teacher = next_token_figures(spec, tokens)
    print("| model | seeds | held-out perplexity | bits per token | top-1 agreement with teacher | ECE | soft-label bytes/position |")
    print("|---|---|---|---|---|---|---|")
    print(f"| teacher (SmolLM2-135M-Instruct, fp32) | — | {teacher['perplexity']:.2f} | {math.log2(teacher['perplexity']):.3f} | 1 | "
          f"{teacher['ece']:.4f} | — |")
    for arm, label in ARMS:
        runs = seed_runs(root, arm)
        if not runs:
            continue
        metrics = [final_eval(run) for run in runs]
        ece = [next_token_figures(json.loads((run / "student.json").read_text())["spec"], tokens)["ece"] for run in runs]
        ppl = [m["eval_perplexity"] for m in metrics]
        print(f"| student: {label} | {len(runs)} | {spread(ppl, 2)} | {spread([math.log2(p) for p in ppl], 3)} | "
              f"{spread([m['eval_top1_agreement'] for m in metrics], 4)} | {spread(ece, 4)} | {bytes_per_position(root, arm)} |")
    print()
    print("| stored targets | mass of the stored ids, mean | p5 | KL(full ‖ stored) nats/position | distinct ids/position | soft-label bytes/position |")
    print("|---|---|---|---|---|---|")
    for arm, directory in SHARDS.items():
        path = root / directory / "manifest.json"
        if not path.is_file():
            continue
        manifest = json.loads(path.read_text())
        fidelity = manifest["fidelity"]
        if "drawn_mass_mean" in fidelity:
            print(f"| N={manifest['samples']} sampled | {fidelity['drawn_mass_mean']:.4f} | {fidelity['drawn_mass_p5']:.3f} | — | "
                  f"{fidelity['unique_ids_mean']:.2f} | {bytes_per_position(root, arm)} |")
        else:
            print(f"| top-{manifest['top_k']} | {fidelity['captured_mass_mean']:.4f} | {fidelity['captured_mass_p5']:.3f} | "
                  f"{fidelity['kl_full_vs_stored_mean']:.4f} | {manifest['top_k']} | {bytes_per_position(root, arm)} |")


if __name__ == "__main__":
    main()
