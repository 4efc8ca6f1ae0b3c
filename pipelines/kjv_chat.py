"""Chat distillation on KJV-derived conversations: assistant-only targets against full-sequence targets.

Builds a few hundred short conversations from the King James Bible (a system prompt on some, one to
three user/assistant turns: the user quotes the first half of a verse and asks for the rest, the
assistant answers with it), then runs the SmolLM2-135M-Instruct teacher over them twice:

1. ``softlabels generate --chat-column messages``: the chat template applied, targets stored only at
   the positions that predict an assistant token;
2. the same conversations pre-rendered with the same template into a token column and run as plain
   token sequences: targets at every position (what a tool without chat support stores).

It prints bytes per row and per stored position of both, the share of prompt tokens, and trains the
KJV student (the 10M-parameter Llama of ``prepare_kjv.py``) for a few steps on the chat shards to show
the loss falls.

    python pipelines/kjv_chat.py --out runs/kjv_chat --conversations 300
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

os.environ.setdefault("HF_HUB_OFFLINE", "1")
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from prepare_kjv import chapters, load_tokenizer, smollm2_dir, write_student_config  # noqa: E402

SYSTEM = "You complete verses of the King James Bible."


def conversations(count: int, seed: int = 0) -> list[dict[str, object]]:
    """``count`` conversations of one to three turns, each asking for the end of a verse."""
    verses = [(chapter, index, verse) for _, chapter, text in chapters() for index, verse in enumerate(text.split("\n"), 1)
              if len(verse.split()) >= 8]
    rng = np.random.default_rng(seed)
    rows = []
    for number in range(count):
        turns: list[dict[str, str]] = [{"role": "system", "content": SYSTEM}] if number % 2 == 0 else []
        for _ in range(1 + number % 3):
            chapter, index, verse = verses[int(rng.integers(len(verses)))]
            words = verse.split()
            half = len(words) // 2
            turns.append({"role": "user", "content": f"{chapter.replace('-', ' ')}:{index} begins: \"{' '.join(words[:half])}\". How does it go on?"})
            turns.append({"role": "assistant", "content": " ".join(words[half:])})
        rows.append({"id": f"conv{number:04d}", "messages": turns})
    return rows


def softlabels(*args: object) -> None:
    subprocess.run([sys.executable, "-m", "softlabels.cli", *map(str, args)], check=True)


def stats(directory: Path) -> dict[str, float]:
    manifest = json.loads((directory / "manifest.json").read_text())
    totals = manifest["totals"]
    return {"rows": totals["rows"], "positions": totals["positions"], "bytes": totals["bytes"],
            "soft_label_bytes": totals["soft_label_bytes"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--conversations", type=int, default=300)
    parser.add_argument("--top-k", type=int, default=20)
    parser.add_argument("--steps", type=int, default=60)
    args = parser.parse_args()
    teacher_dir = smollm2_dir()
    teacher = f"hf:{teacher_dir}"
    args.out.mkdir(parents=True, exist_ok=True)
    rows = conversations(args.conversations)
    corpus = args.out / "chat.jsonl"
    corpus.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tokenizer = load_tokenizer(teacher_dir)
    rendered = [list(tokenizer.apply_chat_template(r["messages"], tokenize=True, return_dict=True)["input_ids"]) for r in rows]
    full = args.out / "rendered.parquet"
    pq.write_table(pa.table({"id": [r["id"] for r in rows], "inputs": pa.array(rendered, pa.list_(pa.int32()))}), full)
    common = ["--teacher", teacher, "--id-column", "id", "--top-k", args.top_k, "--precision", "bf16", "--batch-size", 8, "--no-progress"]
    if not (args.out / "soft_chat" / "manifest.json").is_file():
        softlabels("generate", corpus, "--chat-column", "messages", "--max-length", 1024, "--out", args.out / "soft_chat", *common)
    if not (args.out / "soft_full" / "manifest.json").is_file():
        softlabels("generate", full, "--out", args.out / "soft_full", *common)
    chat, dense = stats(args.out / "soft_chat"), stats(args.out / "soft_full")
    tokens = sum(len(r) for r in rendered)
    print(f"{len(rows)} conversations, {tokens:,} tokens; assistant targets at {chat['positions']:,} positions "
          f"({chat['positions'] / tokens:.1%}), prompt share {1 - chat['positions'] / tokens:.1%}")
    print("| targets | positions stored | bytes per row | soft-label bytes per row | bytes per stored position |")
    print("|---|---|---|---|---|")
    for name, figures in (("assistant only (--chat-column)", chat), ("every position (full sequence)", dense)):
        print(f"| {name} | {figures['positions']:,} | {figures['bytes'] / figures['rows']:,.0f} | "
              f"{figures['soft_label_bytes'] / figures['rows']:,.0f} | {figures['bytes'] / figures['positions']:.1f} |")
    print(f"bytes per row: assistant-only / full = {chat['bytes'] / dense['bytes']:.3f}")
    student = args.out / "student_config"
    if not (student / "config.json").is_file():
        write_student_config(teacher_dir, student)
    trained = args.out / "student"
    if not (trained / "metrics.jsonl").is_file():
        softlabels("train-student", args.out / "soft_chat", "--student", f"hf:{student}", "--max-steps", args.steps,
                   "--batch-size", 8, "--lr", 2e-3, "--temperature", 1, "--alpha", 0.5, "--log-every", 10,
                   "--eval", args.out / "soft_chat", "--eval-every", args.steps // 3, "--no-progress", "--out", trained)
    evals = [json.loads(line) for line in (trained / "metrics.jsonl").read_text().splitlines()]
    evals = [e for e in evals if "eval_kd" in e]
    print("student eval KD on the chat shards (assistant positions):", ", ".join(f"step {e['step']}: {e['eval_kd']:.3f}" for e in evals))


if __name__ == "__main__":
    main()
