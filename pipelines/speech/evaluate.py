"""Metrics stage of the speech pipeline: frame senone error and phone error rate of the teacher and of
every student on each test set, and each model's size and speed.

Models: the teacher (``RUN/teacher/teacher.safetensors``) and every ``RUN/students/ARM-seedS`` that
train-student finished (``student.json``; its factory with that folder's ``student.safetensors``).
Test sets, from ``RUN/targets`` (build_targets.py): ``test_clean``; ``test_noisy`` pooled and per SNR
(ids ``<id>@<snr>dB``: ``test_noisy_0dB``, ...); ``test_real`` when it was built. Per set:

  frame_error  share of the 40 ms output frames whose argmax is not the frame's senone (``labels``)
  per          phone error rate: argmax senones mapped to base phones, repeats collapsed, silence
               removed, edit distance to the aligned phones, summed over the set (senones.phone_errors)
  frames, utterances

Speed: seconds of audio per second of a forward over test_clean, one thread, batches of at most 60 s.
Writes ``MODEL_DIR/metrics.json`` whole (temporary name, then renamed); a model with one is skipped.

    python pipelines/speech/evaluate.py RUN_DIR
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from senones import Mdef, phone_errors, read_mdef  # noqa: E402
from sphinx_align import model_dir  # noqa: E402

BATCH_SECONDS = 60.0
RATE = 16_000


def load_test_set(folder: Path) -> list[dict]:
    """Rows of a target set: id, float32 waveform, int64 labels (40 ms frames), aligned phones."""
    import pyarrow.parquet as pq
    import soundfile as sf

    rows = []
    for shard in sorted(folder.glob("part-*.parquet")):
        for row in pq.read_table(shard, columns=["id", "audio", "labels", "phones"]).to_pylist():
            samples, rate = sf.read(io.BytesIO(row["audio"]["bytes"]), dtype="float32")
            if rate != RATE:
                raise SystemExit(f"{shard}: {row['id']} is {rate} Hz audio; the models hear {RATE} Hz")
            rows.append({"id": row["id"], "samples": samples, "labels": np.asarray(row["labels"], dtype=np.int64), "phones": row["phones"]})
    return rows


def test_sets(targets: Path) -> dict[str, list[dict]]:
    """Every test set by name, test_noisy also split by SNR."""
    sets: dict[str, list[dict]] = {}
    for name in ("test_clean", "test_noisy", "test_real"):
        if (targets / name).is_dir():
            sets[name] = load_test_set(targets / name)
    for row in sets.get("test_noisy", []):
        sets.setdefault(f"test_noisy_{row['id'].rsplit('@', 1)[1]}", []).append(row)
    return sets


def predictions(model: torch.nn.Module, rows: list[dict]) -> list[np.ndarray]:
    """The argmax senone of each output frame of each row, in row order (batches by length)."""
    from softlabels.batching import length_batches

    out: list[np.ndarray] = [np.zeros(0, dtype=np.int64)] * len(rows)
    with torch.inference_mode():
        for batch in length_batches([r["samples"].size for r in rows], cap=int(BATCH_SECONDS * RATE)):
            lengths = torch.tensor([rows[i]["samples"].size for i in batch])
            waves = torch.zeros(len(batch), int(lengths.max()))
            for slot, i in enumerate(batch):
                waves[slot, : rows[i]["samples"].size] = torch.from_numpy(rows[i]["samples"])
            logits, frames = model(waves, lengths)
            best = logits.argmax(-1).numpy()
            for slot, i in enumerate(batch):
                out[i] = best[slot, : int(frames[slot])]
    return out


def scores(rows: list[dict], predicted: list[np.ndarray], mdef: Mdef) -> dict[str, float]:
    """frame_error and per of a set from its rows and predicted senones."""
    wrong = frames = edits = phones = 0
    for row, best in zip(rows, predicted):
        n = min(len(best), len(row["labels"]))
        wrong += int((best[:n] != row["labels"][:n]).sum()) + abs(len(best) - len(row["labels"]))
        frames += len(row["labels"])
        e, p = phone_errors(row["phones"], best.tolist(), mdef)
        edits, phones = edits + e, phones + p
    return {"frame_error": wrong / max(frames, 1), "per": edits / max(phones, 1), "frames": frames, "utterances": len(rows)}


def speed(model: torch.nn.Module, rows: list[dict]) -> float:
    """Seconds of audio per second of forward, on the current thread count."""
    start = time.perf_counter()
    predictions(model, rows)
    return sum(r["samples"].size for r in rows) / RATE / (time.perf_counter() - start)


def models(run: Path) -> list[tuple[Path, str]]:
    """(folder, SPEC) of the teacher and of every finished student."""
    found = [(run / "teacher", f"speech_models:teacher@{run / 'teacher' / 'teacher.safetensors'}")]
    for record in sorted((run / "students").glob("*-seed*/student.json")):
        if (record.parent / "student.safetensors").is_file():
            factory = json.loads(record.read_text())["factory"]
            found.append((record.parent, f"{factory}@{record.parent / 'student.safetensors'}"))
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path)
    args = parser.parse_args(argv)
    from softlabels.loading import load_model

    torch.set_num_threads(1)
    mdef = read_mdef(model_dir() / "en-us" / "mdef")
    sets: dict[str, list[dict]] | None = None
    for folder, spec in models(args.run):
        if (folder / "metrics.json").is_file():
            continue
        sets = sets if sets is not None else test_sets(args.run / "targets")
        model = load_model(spec)[0].eval()
        record = {"spec": spec.replace(str(args.run) + "/", ""), "parameters": sum(p.numel() for p in model.parameters()),
                  "x_real_time": speed(model, sets["test_clean"]), "threads": torch.get_num_threads(),
                  "sets": {name: scores(rows, predictions(model, rows), mdef) for name, rows in sets.items()}}
        partial = folder / ".metrics.json.partial"
        partial.write_text(json.dumps(record, indent=1) + "\n")
        os.replace(partial, folder / "metrics.json")
        print(f"{folder}: " + ", ".join(f"{n} PER {s['per']:.3f} frame error {s['frame_error']:.3f}" for n, s in record["sets"].items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
