"""Measure what sizes the DistilSmolLM run (pipelines/distil_smollm.sh) within its time budget.

In one process, alternating so that a load on the machine hits every figure alike: the teacher's bf16
forward (the cost of ``generate``), its fp32 forward (the online arm's extra cost per step), and one
training step (forward, backward, AdamW; batch x window tokens, full-vocabulary CE) of students made
of every other, every third, ... teacher layer. Every figure is also given as a multiple of the bf16
forward of the same round, so figures measured on a busy machine can be scaled to a quiet one by a
known quiet bf16 rate (the README's 1,041 tokens/s on the 2-core CPU).

    python pipelines/distil_calibrate.py TEACHER_DIR [--depths 15,10,8,6] [--rounds 2] [--batch 8] [--window 128]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def timed(fn, repeats: int) -> float:  # noqa: ANN001
    """Median seconds of ``fn()`` over ``repeats`` calls, after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("teacher_dir")
    parser.add_argument("--depths", default="15,10,8,6")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--window", type=int, default=128)
    args = parser.parse_args()
    from transformers import AutoModelForCausalLM

    from softlabels.student_init import select_layers

    teacher = AutoModelForCausalLM.from_pretrained(args.teacher_dir, dtype=torch.float32).eval()
    teacher_bf16 = AutoModelForCausalLM.from_pretrained(args.teacher_dir, dtype=torch.bfloat16).eval()
    layers = teacher.config.num_hidden_layers
    x = torch.randint(0, teacher.config.vocab_size, (args.batch, args.window), generator=torch.Generator().manual_seed(0))
    tokens = x.numel()

    def forward(model: torch.nn.Module) -> None:
        with torch.inference_mode():
            model(input_ids=x, use_cache=False)

    students = {}
    for depth in map(int, args.depths.split(",")):
        chosen = [round(i * (layers - 1) / max(depth - 1, 1)) for i in range(depth)] if depth != (layers + 1) // 2 else list(range(0, layers, 2))
        student = select_layers(teacher, chosen).train()
        optimizer = torch.optim.AdamW(student.parameters(), lr=1e-5)
        students[depth] = (student, optimizer, chosen)

    def step(student: torch.nn.Module, optimizer: torch.optim.Optimizer, bf16: bool = False) -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):  # train-student --precision bf16
            logits = student(input_ids=x, use_cache=False).logits[:, :-1].float()
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    rounds = []
    for _ in range(args.rounds):
        record = {"teacher_bf16_forward_s": timed(lambda: forward(teacher_bf16), args.repeats),
                  "teacher_fp32_forward_s": timed(lambda: forward(teacher), args.repeats)}
        for depth, (student, optimizer, _) in students.items():
            record[f"step_{depth}_s"] = timed(lambda: step(student, optimizer), args.repeats)
            record[f"step_{depth}_bf16_s"] = timed(lambda: step(student, optimizer, bf16=True), args.repeats)
        rounds.append(record)
        print(json.dumps(record), flush=True)
    summary = {key: statistics.median(r[key] for r in rounds) for key in rounds[0]}
    bf16 = summary["teacher_bf16_forward_s"]
    print(f"threads {torch.get_num_threads()}, {tokens} tokens per batch; teacher bf16 forward {tokens / bf16:.0f} tokens/s")
    for key, value in summary.items():
        print(f"{key}: median {value:.3f} s, fastest {min(r[key] for r in rounds):.3f} s  ({value / bf16:.2f} x the bf16 forward of the same rounds)")
    for depth, (student, _, chosen) in students.items():
        print(f"depth {depth}: layers {chosen}, {sum(p.numel() for p in student.parameters()):,} parameters")


if __name__ == "__main__":
    main()
