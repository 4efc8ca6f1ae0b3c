"""Performance of ``softlabels generate --audio-column`` with the acoustic teacher (issue 21).

Figures, each a ratio or a size inside one run (the machines are small and shared):

1. Overhead: wall time of ``softlabels.generate.generate`` (decode, resample, teacher, top-k, write,
   seal) over the wall time of the bare teacher forward on the same utterances in the same batches
   (decoded and padded before the clock starts), same process, same torch threads. Bare and generate
   alternate; the median of the per-pair ratios is the figure. Target: <= 1.10.
2. Padding waste on a realistic mix of lengths (0.5 to 20 s, log-normal around 4 s): the share of
   computed samples that are padding, batches of --batch-size rows in corpus order against batches by
   length (``softlabels.batching``, --batch-seconds). Target: <= 10% by length.
3. Hours of audio labelled per core-hour (generate's wall time x torch threads), and bytes per frame
   (whole shards, and the soft labels alone) at k=20, bfloat16 log-probs.

The teacher is ``softlabels.audio:acoustic_teacher`` with seeded random weights (no trained acoustic
model ships here): its speed is the trained model's; its near-uniform outputs are the worst case for
compressing the soft labels. The utterances are noise (decoding and resampling cost the same as speech):
a quarter of them 8 kHz (resampled to 16 kHz), a few stereo, in an HF Audio struct column of WAV bytes.

    python pipelines/bench_audio.py            # about 1-2 minutes on 2 busy cores
    python pipelines/bench_audio.py --quick    # smoke version, about 20 s

Everything is built under --out (default ``runs/bench_audio``); prints a markdown table and writes
``results-full.json`` (or ``results-quick.json``) there.
"""

from __future__ import annotations

import argparse
import io
import json
import shutil
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import soundfile
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from softlabels.audio import SAMPLE_RATE, acoustic_teacher  # noqa: E402
from softlabels.audio_input import decode_audio, resample  # noqa: E402
from softlabels.audio_kind import AudioKind  # noqa: E402
from softlabels.batching import corpus_order_batches, length_batches, padding_waste  # noqa: E402
from softlabels.generate import generate  # noqa: E402
from softlabels.inputs import ColumnBlock  # noqa: E402
from softlabels.options import GenerateConfig  # noqa: E402

AUDIO = pa.struct([("bytes", pa.binary()), ("path", pa.string())])


def utterance_seconds(count: int, seed: int) -> np.ndarray:
    """Log-normal lengths around 4 s, clipped to 0.5-20 s (read speech: LibriSpeech-like, with short turns)."""
    rng = np.random.default_rng(seed)
    return np.clip(np.exp(rng.normal(np.log(4.0), 0.8, count)), 0.5, 20.0)


def build_corpus(path: Path, seconds: np.ndarray, seed: int) -> None:
    rng = np.random.default_rng(seed)
    cells = []
    for index, length in enumerate(seconds):
        rate = 8_000 if index % 4 == 3 else SAMPLE_RATE
        channels = 2 if index % 10 == 5 else 1
        values = (rng.standard_normal((int(length * rate), channels)) * 3_000).astype(np.int16)
        buffer = io.BytesIO()
        soundfile.write(buffer, values, rate, format="WAV", subtype="PCM_16")
        cells.append({"bytes": buffer.getvalue(), "path": f"utt-{index:05d}.wav"})
    table = pa.table({"utt": [f"utt-{i:05d}" for i in range(len(seconds))], "audio": pa.array(cells, type=AUDIO)})
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path, row_group_size=64)  # as HF datasets writes audio: small row groups


def bare_batches(corpus: Path, rows_per_shard: int, batch_size: int, batch_seconds: float | None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The batches generate computes, decoded and padded ahead: units of ``rows_per_shard`` rows, by length."""
    table = pq.read_table(corpus)
    kind = AudioKind("audio", SAMPLE_RATE, batch_size=batch_size, batch_seconds=batch_seconds)
    batches = []
    for start in range(0, table.num_rows, rows_per_shard):
        cells = table.column("audio").slice(start, rows_per_shard).to_pylist()
        clips = [resample(decode_audio(c["bytes"], "x"), SAMPLE_RATE, "x").samples for c in cells]
        offsets = np.concatenate([[0], np.cumsum([len(c) for c in clips])]).astype(np.int64)
        block = ColumnBlock(np.concatenate(clips), offsets)
        for rows in kind.batches(np.diff(offsets)):
            x, lengths = block.gather(rows)
            batches.append((torch.from_numpy(x), torch.from_numpy(lengths)))
    return batches


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "bench_audio")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--pairs", type=int, default=3, help="alternated (bare, generate) pairs; the median ratio is reported")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    count, pairs = (48, 2) if args.quick else (768, args.pairs)
    rows_per_shard, batch_size, batch_seconds = 256, 64, 60.0
    seconds = utterance_seconds(count, seed=0)
    corpus = args.out / "corpus" / "speech.parquet"
    build_corpus(corpus, seconds, seed=1)
    torch.manual_seed(0)
    weights = args.out / "acoustic_teacher.safetensors"
    from safetensors.torch import save_file
    save_file({k: v.contiguous() for k, v in acoustic_teacher().state_dict().items()}, str(weights))
    spec = f"softlabels.audio:acoustic_teacher@{weights}"
    model = acoustic_teacher()
    from safetensors.torch import load_file
    model.load_state_dict(load_file(str(weights)))
    model.eval()

    batches = bare_batches(corpus, rows_per_shard, batch_size, batch_seconds)

    def bare() -> float:
        started = time.perf_counter()
        with torch.inference_mode():
            for x, lengths in batches:
                model(x, lengths)
        return time.perf_counter() - started

    def run(out: Path) -> tuple[float, dict]:
        shutil.rmtree(out, ignore_errors=True)
        started = time.perf_counter()
        generate(GenerateConfig(corpus=[str(corpus)], teachers=[spec], out=str(out), audio_column="audio", id_column="utt",
                                rows_per_shard=rows_per_shard, batch_size=batch_size, batch_seconds=batch_seconds, progress=False))
        return time.perf_counter() - started, json.loads((out / "manifest.json").read_text())

    bare()  # warm up
    ratios, bare_times, generate_times = [], [], []
    manifest: dict = {}
    for _ in range(pairs):
        b = bare()
        g, manifest = run(args.out / "generated")
        bare_times.append(b)
        generate_times.append(g)
        ratios.append(g / b)
    samples = [int(s * SAMPLE_RATE) for s in seconds]
    cap = int(batch_seconds * SAMPLE_RATE)
    units = [list(range(start, min(start + rows_per_shard, count))) for start in range(0, count, rows_per_shard)]
    in_order = [[unit[i] for i in batch] for unit in units for batch in corpus_order_batches(len(unit), batch_size)]
    by_length = [[unit[i] for i in batch] for unit in units for batch in length_batches([samples[j] for j in unit], cap, batch_size)]
    totals = manifest["totals"]
    hours = float(seconds.sum()) / 3600
    results = {
        "utterances": count, "audio_hours": hours, "threads": args.threads, "rows_per_shard": rows_per_shard,
        "batch_size": batch_size, "batch_seconds": batch_seconds,
        "bare_seconds": bare_times, "generate_seconds": generate_times, "overhead_ratio_median": statistics.median(ratios),
        "padding_waste_corpus_order": padding_waste(samples, in_order), "padding_waste_by_length": padding_waste(samples, by_length),
        "hours_per_core_hour": hours / (statistics.median(generate_times) * args.threads / 3600),
        "frames": totals["positions"], "bytes_per_frame": totals["bytes"] / totals["positions"],
        "soft_label_bytes_per_frame": totals["soft_label_bytes"] / totals["positions"],
    }
    (args.out / f"results-{'quick' if args.quick else 'full'}.json").write_text(json.dumps(results, indent=2) + "\n")
    print(f"| figure | value |\n|---|---|")
    print(f"| audio | {count} utterances, {hours * 60:.1f} min (0.5-20 s), {totals['positions']:,} frames |")
    print(f"| generate / bare forward (median of {pairs}) | {results['overhead_ratio_median']:.3f} |")
    print(f"| padding waste, corpus order / by length | {results['padding_waste_corpus_order']:.1%} / {results['padding_waste_by_length']:.1%} |")
    print(f"| hours of audio per core-hour | {results['hours_per_core_hour']:.0f} |")
    print(f"| bytes per frame (shards / soft labels), k=20 | {results['bytes_per_frame']:.1f} / {results['soft_label_bytes_per_frame']:.1f} |")
    print(f"\ncommand: python pipelines/bench_audio.py{' --quick' if args.quick else ''} --threads {args.threads}")


if __name__ == "__main__":
    main()
