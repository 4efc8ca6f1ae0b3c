"""The corpora of the DistilSmolLM run (pipelines/distil_smollm.sh): KJV training windows and two held-out sets.

The KJV is split by book as ``prepare_kjv.py`` splits it (every eighth book, starting with the fourth,
is held out), tokenized with the teacher's tokenizer and cut into ``--window``-token windows. Written:

- ``train.parquet``: ``--train`` windows evenly spread over all 7,182 windows of the 58 training books;
- ``heldout_kjv.parquet``: ``--heldout`` windows evenly spread over the 8 held-out books, which no
  training window comes from;
- ``heldout_ood.parquet``: ``--heldout`` windows of out-of-domain English prose, the standard-library
  docstrings of ``data/stdlib_docstrings.jsonl`` (joined in id order by blank lines, tokenized, cut).

Columns ``id``, ``inputs`` (``fixed_size_list<int32>[window]``), ``source`` (the book or module).

    python pipelines/distil_prepare.py --teacher-dir RUN/teacher --out RUN/corpus --train N --heldout M
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parent))
from prepare_kjv import HELD_OUT_EVERY, HELD_OUT_OFFSET, books, load_tokenizer, windows  # noqa: E402

DOCSTRINGS = Path(__file__).resolve().parents[1] / "data" / "stdlib_docstrings.jsonl"


def spread(count: int, total: int) -> np.ndarray:
    """``count`` indices evenly spread over ``range(total)`` (all of them when count >= total)."""
    if count >= total:
        return np.arange(total)
    return np.linspace(0, total - 1, count).round().astype(int)


def write(path: Path, ids: list[str], sources: list[str], tokens: np.ndarray, window: int) -> None:
    table = pa.table({"id": ids, "inputs": pa.FixedSizeListArray.from_arrays(pa.array(tokens.reshape(-1)), window), "source": sources})
    pq.write_table(table, path, compression="zstd")
    print(f"{path}: {table.num_rows:,} windows of {window} tokens ({table.num_rows * window:,} tokens) from "
          f"{len(set(sources))} {'books' if 'kjv' in path.name or 'train' in path.name else 'modules'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--teacher-dir", type=Path, required=True, help="tokenizer source (the dequantised teacher)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--train", type=int, required=True, help="training windows")
    parser.add_argument("--heldout", type=int, required=True, help="windows of each held-out set")
    parser.add_argument("--window", type=int, default=128)
    args = parser.parse_args()
    tokenizer = load_tokenizer(args.teacher_dir)
    args.out.mkdir(parents=True, exist_ok=True)
    splits: dict[str, list[tuple[str, np.ndarray]]] = {"train": [], "heldout_kjv": []}
    for index, (name, text) in enumerate(books()):
        split = "heldout_kjv" if index % HELD_OUT_EVERY == HELD_OUT_OFFSET else "train"
        splits[split].append((name, windows(tokenizer, text, args.window)))
    for split, parts in splits.items():
        ids = [f"{name}-{i:04d}" for name, block in parts for i in range(len(block))]
        sources = [name for name, block in parts for _ in range(len(block))]
        tokens = np.concatenate([block for _, block in parts])
        keep = spread(args.train if split == "train" else args.heldout, len(ids))
        write(args.out / f"{split}.parquet", [ids[i] for i in keep], [sources[i] for i in keep], tokens[keep], args.window)
    records = [json.loads(line) for line in DOCSTRINGS.read_text(encoding="utf-8").splitlines()]
    ids_per_record = [np.asarray(tokenizer(record["text"] + "\n\n", add_special_tokens=False)["input_ids"], dtype=np.int32)
                      for record in records]
    stream = np.concatenate(ids_per_record)
    owner = np.repeat([record["module"] for record in records], [len(ids) for ids in ids_per_record])
    count = len(stream) // args.window
    keep = spread(args.heldout, count)
    write(args.out / "heldout_ood.parquet", [f"stdlib-{i:04d}" for i in keep], [str(owner[i * args.window]) for i in keep],
          stream[: count * args.window].reshape(count, args.window)[keep], args.window)


if __name__ == "__main__":
    main()
