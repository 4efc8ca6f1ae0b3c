"""Held-out figures of the DistilSmolLM run (pipelines/distil_smollm.sh), written once per model.

For the teacher (``RUN/teacher_heldout.json``) and every finished arm (``RUN/arms/ARM-seedS/heldout.json``)
without one: next-token cross-entropy (nats per token, every position but each window's last),
perplexity, top-1 accuracy and expected calibration error (``kjv_report.expected_calibration_error``)
on both held-out sets, ``RUN/corpus/heldout_kjv.parquet`` and ``heldout_ood.parquet``; in fp32.
``RUN/speed.json``: forward tokens per second of the teacher and of the student architecture
(``RUN/student``), fp32, batch 8, alternated over rounds on the same machine and threads.
Each file is written whole (temporary name, then renamed), so a stopped run leaves none half written.

    python pipelines/distil_eval.py RUN_DIR [--rounds 3] [--batches 3] [--no-speed]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from kjv_report import expected_calibration_error, heldout_tokens  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
SETS = ("kjv", "ood")


def load(spec: str) -> torch.nn.Module:
    from softlabels.teachers import load_teacher

    return load_teacher(spec, torch.device("cpu")).module.float().eval()


def figures(model: torch.nn.Module, tokens: torch.Tensor, batch_size: int = 8) -> dict[str, float]:
    """CE (nats/token), perplexity, top-1 accuracy and ECE of ``model`` predicting each next token of ``tokens``."""
    nll, confidence, correct = 0.0, [], []
    with torch.inference_mode():
        for begin in range(0, len(tokens), batch_size):
            x = tokens[begin : begin + batch_size]
            log_p = torch.log_softmax(model(x).float()[:, :-1], dim=-1)
            nll -= float(log_p.gather(-1, x[:, 1:, None]).double().sum())
            top = log_p.max(dim=-1)
            confidence.append(top.values.exp().reshape(-1).numpy())
            correct.append((top.indices == x[:, 1:]).reshape(-1).numpy())
    count = tokens[:, 1:].numel()
    hits = np.concatenate(correct)
    return {"ce": nll / count, "perplexity": math.exp(nll / count), "top1_accuracy": float(hits.mean()),
            "ece": expected_calibration_error(np.concatenate(confidence), hits), "tokens": count}


def write_json(path: Path, record: dict) -> None:
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    partial.replace(path)


def evaluate(spec: str, sets: dict[str, torch.Tensor]) -> dict[str, object]:
    model = load(spec)
    record: dict[str, object] = {"spec": spec}
    for name, tokens in sets.items():
        record.update({f"{key}_{name}": value for key, value in figures(model, tokens).items()})
    return record


def speed(teacher_spec: str, student_spec: str, window: int, rounds: int, batches: int = 3, batch_size: int = 8) -> dict[str, object]:
    """Forward tokens/s of teacher and student, fp32, median over ``rounds`` alternated rounds of ``batches`` batches."""
    models = {"teacher": load(teacher_spec), "student": load(student_spec)}
    x = torch.randint(0, 1000, (batch_size, window), generator=torch.Generator().manual_seed(0))
    times: dict[str, list[float]] = {name: [] for name in models}
    with torch.inference_mode():
        for model in models.values():
            model(x)  # warm-up
        for _ in range(rounds):
            for name, model in models.items():
                start = time.perf_counter()
                for _ in range(batches):
                    model(x)
                times[name].append((time.perf_counter() - start) / batches)
    record: dict[str, object] = {"threads": torch.get_num_threads(), "batch": batch_size, "window": window, "rounds": rounds, "batches_per_round": batches}
    for name, model in models.items():
        record[f"{name}_tokens_per_s"] = batch_size * window / statistics.median(times[name])
        record[f"{name}_parameters"] = sum(p.numel() for p in model.parameters())
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--rounds", type=int, default=3, help="alternated speed rounds")
    parser.add_argument("--batches", type=int, default=3, help="batches per model per speed round")
    parser.add_argument("--no-speed", action="store_true", help="held-out figures only (after each arm); speed.json is left for the last call")
    args = parser.parse_args()
    run = args.run
    from softlabels.hf import disable_progress_bars

    disable_progress_bars()
    sets = {name: heldout_tokens(run / "corpus" / f"heldout_{name}.parquet") for name in SETS}
    if not (run / "teacher_heldout.json").is_file():
        write_json(run / "teacher_heldout.json", evaluate(f"hf:{run / 'teacher'}", sets))
    for arm in sorted((run / "arms").glob("*-seed*")):
        if (arm / "student.safetensors").is_file() and not (arm / "heldout.json").is_file():
            spec = json.loads((arm / "student.json").read_text())["spec"]
            write_json(arm / "heldout.json", evaluate(spec, sets))
            print(f"{arm / 'heldout.json'}", file=sys.stderr)
    if not args.no_speed and not (run / "speed.json").is_file():
        write_json(run / "speed.json", speed(f"hf:{run / 'teacher'}", f"hf:{run / 'student'}", sets["kjv"].shape[1], args.rounds, args.batches))


if __name__ == "__main__":
    main()
