"""Corpus stage of the speech pipeline: synthesize KJV utterances with espeak-ng into Parquet sets with
an HF ``datasets`` Audio column (16 kHz WAV PCM16 bytes).

Sets (books split by ``kjv_sentences.split_of``, so no verse is in two sets; voices are
``<dialect>+<variant>`` and variants are held apart between the sets):
  labeled      the labeled books, LABELED_VARIANTS (a few voices), clean, rates 150-190 wpm
  unlabeled    the unlabeled books, every other non-test variant in every dialect, rates 110-260 wpm,
               pitch 20-80; half of it mixed with white, pink or babble noise at 0-20 dB SNR
  test_clean   the test books, TEST_VARIANTS (held-out voices), clean
  test_noisy   test_clean's stored samples again under held-out noise (brown, or babble of held-out
               voices) at 0, 5 and 10 dB: ids ``<id>@<snr>dB``
Each set is written in shards ``OUT/<set>/part-NNNNN.parquet`` of ``--shard-rows`` rows; a shard that
exists is skipped (each shard is written to a temporary name and renamed), and every utterance's voice,
rate, pitch, noise and SNR come from a generator seeded by (seed, set, index), so an interrupted run
resumes with the same utterances, voices and noise. The samples are not bitwise the same in another
run order: espeak-ng keeps state across calls (even across espeak_Terminate and a new
espeak_Initialize), and an utterance's length drifts by a few samples with what was spoken before it. ``OUT/corpus.json`` (written last) holds the counts and hours.

    python pipelines/speech/build_corpus.py --out runs/speech/corpus --labeled 2000 --unlabeled 24000 --test 400
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import time
import zlib
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from espeak_synth import DIALECTS, VARIANTS, Espeak  # noqa: E402
from kjv_sentences import read_dictionary, utterance_texts  # noqa: E402
from noise_mix import babble, brown, fit_int16, mix, pink, white  # noqa: E402

SAMPLE_RATE = 16_000
LABELED_VOICES = ("en-us+m1", "en-us+f2", "en-gb-x-rp+m3", "en+f1")
TEST_VARIANTS = ("m6", "f4", "steph", "quincy", "Alex")
LABELED_VARIANTS = tuple(sorted({v.split("+")[1] for v in LABELED_VOICES}))
UNLABELED_VARIANTS = tuple(v for v in VARIANTS if v not in TEST_VARIANTS and v not in LABELED_VARIANTS)
TRAIN_NOISES = ("white", "pink", "babble")
TEST_NOISES = ("brown", "babble")
TEST_SNRS = (0, 5, 10)
SETS = ("labeled", "unlabeled", "test_clean", "test_noisy")
# espeak-ng's pauses are exact zeros; a recording never is. A floor of Gaussian noise at 2 int16 units
# (about -84 dBFS, 60-70 dB under the speech) is added to every utterance: on a sample of 60 labeled
# utterances PocketSphinx's word pass failed on 22 with exact zeros and on 10 with the floor (2 after
# sphinx_align's fallback without fillers).
NOISE_FLOOR = 2.0
# espeak-ng starts speaking at the first sample; a segmented recording has some silence around the
# speech, which the aligner labels SIL: each utterance gets 100-300 ms of (floor-only) silence at each end.
EDGE_SILENCE = (0.1, 0.3)


def dictionary_path() -> Path:
    import pocketsphinx

    return Path(pocketsphinx.get_model_path()) / "en-us" / "cmudict-en-us.dict"


def features():  # noqa: ANN201 - datasets.Features
    """The corpus columns as HF ``datasets`` features (the Parquet schema and its ``huggingface`` metadata)."""
    import datasets as hf

    string, f32, i32 = hf.Value("string"), hf.Value("float32"), hf.Value("int32")
    return hf.Features({"id": string, "audio": hf.Audio(sampling_rate=SAMPLE_RATE), "text": string, "words": string,
                        "book": string, "verse": string, "engine": string, "voice": string, "rate": i32, "pitch": i32,
                        "noise": string, "snr_db": f32, "duration": f32})


def wav_bytes(samples: np.ndarray) -> bytes:
    import soundfile as sf

    buffer = io.BytesIO()
    sf.write(buffer, samples, SAMPLE_RATE, format="WAV", subtype="PCM_16")
    return buffer.getvalue()


def read_wav(data: bytes) -> np.ndarray:
    import soundfile as sf

    return sf.read(io.BytesIO(data), dtype="int16")[0]


def seed_of(seed: int, name: str, index: int) -> int:
    return zlib.crc32(f"{seed}/{name}/{index}".encode())


class Synthesizer:
    """espeak-ng at 16 kHz (soxr from the library's 22,050 Hz) with the noise floor, float64 in int16 units."""

    def __init__(self) -> None:
        self.espeak = Espeak()
        self.seconds = 0.0  # synthesis + resampling time
        self.audio_seconds = 0.0

    def __call__(self, text: str, voice: str, rate: int, pitch: int, rng: np.random.Generator) -> np.ndarray:
        import soxr

        start = time.perf_counter()
        raw = self.espeak.say(text, voice, rate, pitch)
        speech = soxr.resample(raw.astype(np.float64), self.espeak.sample_rate, SAMPLE_RATE, quality="HQ")
        lead, trail = (int(rng.uniform(*EDGE_SILENCE) * SAMPLE_RATE) for _ in range(2))
        out = np.concatenate([np.zeros(lead), speech, np.zeros(trail)])
        out += rng.standard_normal(out.size) * NOISE_FLOOR
        self.seconds += time.perf_counter() - start
        self.audio_seconds += out.size / SAMPLE_RATE
        return out


def plan(name: str, index: int, seed: int) -> dict:
    """Voice, rate, pitch, noise and SNR of utterance ``index`` of set ``name``."""
    rng = np.random.default_rng(seed_of(seed, name, index))
    if name == "labeled":
        voice = LABELED_VOICES[index % len(LABELED_VOICES)]
        rate, pitch = int(rng.integers(150, 191)), int(rng.integers(40, 61))
    elif name == "unlabeled":
        voice = f"{DIALECTS[rng.integers(len(DIALECTS))]}+{UNLABELED_VARIANTS[rng.integers(len(UNLABELED_VARIANTS))]}"
        rate, pitch = int(rng.integers(110, 261)), int(rng.integers(20, 81))
    else:
        voice = f"{DIALECTS[rng.integers(len(DIALECTS))]}+{TEST_VARIANTS[index % len(TEST_VARIANTS)]}"
        rate, pitch = int(rng.integers(140, 201)), int(rng.integers(35, 66))
    noisy = name == "unlabeled" and rng.random() < 0.5
    return {"voice": voice, "rate": rate, "pitch": pitch, "rng": rng,
            "noise": TRAIN_NOISES[rng.integers(len(TRAIN_NOISES))] if noisy else "none",
            "snr_db": float(rng.uniform(0, 20)) if noisy else None}


def noise_of(kind: str, n: int, rng: np.random.Generator, voices: list[np.ndarray]) -> np.ndarray:
    if kind == "white":
        return white(n, rng)
    if kind == "pink":
        return pink(n, rng)
    if kind == "brown":
        return brown(n, rng)
    if kind == "babble":
        return babble(n, voices, rng)
    raise ValueError(f"unknown noise {kind!r}")


def spread(total: int, count: int) -> np.ndarray:
    """Indices of ``count`` of ``total`` utterances, evenly spread (over all of a split's books)."""
    return np.linspace(0, total - 1, count).round().astype(int) if count and total else np.zeros(0, int)


def babble_voices(synth: Synthesizer, texts: list, used: int, variants: tuple[str, ...], count: int = 12) -> list[np.ndarray]:
    """``count`` utterances by ``variants`` of texts from the end of ``texts`` that none of the ``used``
    spread picks is (so no talker in the babble says the sentence under it)."""
    taken = set(spread(len(texts), min(used, len(texts))).tolist())
    picks = [t for i, t in reversed(list(enumerate(texts))) if i not in taken][:count]
    rng = np.random.default_rng(len(picks))
    return [synth(t[3], f"{DIALECTS[i % len(DIALECTS)]}+{variants[i % len(variants)]}", 170, 50, rng) for i, t in enumerate(picks)]


def row(utt: tuple, samples: np.ndarray, p: dict) -> dict:
    uid, book, verse, text, words = utt
    return {"id": uid, "audio": {"bytes": wav_bytes(samples), "path": f"{uid}.wav"}, "text": text, "words": words,
            "book": book, "verse": verse, "engine": "espeak-ng", "voice": p["voice"], "rate": p["rate"],
            "pitch": p["pitch"], "noise": p["noise"], "snr_db": p["snr_db"], "duration": samples.size / SAMPLE_RATE}


def write_shard(rows: list[dict], path: Path, schema=None) -> None:  # noqa: ANN001 - a pyarrow schema
    """``rows`` as one Parquet file at ``path``, written under a hidden name and renamed."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = schema or features().arrow_schema
    table = pa.Table.from_pylist(rows, schema=schema)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name("." + path.name + ".partial")  # hidden: readers of the folder skip it
    pq.write_table(table, partial)
    os.replace(partial, path)


def build_set(name: str, utts: list, count: int, args, synth: Synthesizer, voices: list[np.ndarray]) -> dict:  # noqa: ANN001
    """Write set ``name`` (its shards not yet written); return its counts."""
    import pyarrow.parquet as pq

    out = Path(args.out) / name
    count = min(count, len(utts))
    picks = spread(len(utts), count)
    shards = range(0, count, args.shard_rows)
    for first in shards:
        path = out / f"part-{first // args.shard_rows:05d}.parquet"
        if path.exists():
            continue
        rows = []
        if name == "test_noisy":  # the very samples of test_clean's shard of the same number, under noise
            clean_rows = pq.read_table(Path(args.out) / "test_clean" / path.name).to_pylist()
        for index in range(first, min(first + args.shard_rows, count)):
            utt = utts[picks[index]]
            if name == "test_noisy":
                stored = clean_rows[index - first]
                if stored["id"] != utt[0]:
                    raise RuntimeError(f"{path}: test_clean row {stored['id']} where {utt[0]} was expected")
                clean = read_wav(stored["audio"]["bytes"]).astype(np.float64)
                p = {k: stored[k] for k in ("voice", "rate", "pitch")}
                for snr in TEST_SNRS:
                    rng = np.random.default_rng(seed_of(args.seed, f"{name}@{snr}", index))
                    kind = TEST_NOISES[rng.integers(len(TEST_NOISES))]
                    mixed, _ = mix(clean, noise_of(kind, clean.size, rng, voices), snr)
                    samples, _ = fit_int16(mixed)
                    rows.append(row((f"{utt[0]}@{snr}dB", *utt[1:]), samples, {**p, "noise": kind, "snr_db": float(snr)}))
                continue
            p = plan(name, index, args.seed)
            clean = synth(utt[3], p["voice"], p["rate"], p["pitch"], p["rng"])
            if p["noise"] != "none":
                mixed, _ = mix(clean, noise_of(p["noise"], clean.size, p["rng"], voices), p["snr_db"])
                samples, _ = fit_int16(mixed)
            else:
                samples, _ = fit_int16(clean)
            rows.append(row(utt, samples, p))
        write_shard(rows, path)
    return {"utterances": count * (len(TEST_SNRS) if name == "test_noisy" else 1), "shards": len(shards)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--labeled", type=int, default=2000, help="utterances (about 2 h at 2000: 3.6 s each)")
    parser.add_argument("--unlabeled", type=int, default=24000, help="over 10x the labeled hours at 24000")
    parser.add_argument("--test", type=int, default=400, help="test_clean utterances (test_noisy has 3x)")
    parser.add_argument("--shard-rows", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    out = Path(args.out)
    if (out / "corpus.json").exists():
        print(f"{out}: corpus complete, skipped")
        return 0
    # The sizes and seed fix every shard's contents: resuming with others would mix two corpora.
    params = {"labeled": args.labeled, "unlabeled": args.unlabeled, "test": args.test,
              "shard_rows": args.shard_rows, "seed": args.seed}
    out.mkdir(parents=True, exist_ok=True)
    if (out / "params.json").exists():
        if json.loads((out / "params.json").read_text()) != params:
            raise SystemExit(f"{out}/params.json: this corpus was started with other sizes or seed "
                             f"({(out / 'params.json').read_text().strip()}); use another --out or the same arguments")
    else:
        (out / "params.json").write_text(json.dumps(params) + "\n")
    started = time.perf_counter()
    texts, stats = utterance_texts(read_dictionary(dictionary_path()))
    synth = Synthesizer()
    # Babble for training noise from unlabeled voices; held-out babble from test voices on test-book text.
    train_babble = babble_voices(synth, texts["unlabeled"], args.unlabeled, UNLABELED_VARIANTS)
    test_babble = babble_voices(synth, texts["test"], args.test, TEST_VARIANTS)
    counts = {
        "labeled": build_set("labeled", texts["labeled"], args.labeled, args, synth, train_babble),
        "unlabeled": build_set("unlabeled", texts["unlabeled"], args.unlabeled, args, synth, train_babble),
        "test_clean": build_set("test_clean", texts["test"], args.test, args, synth, test_babble),
        "test_noisy": build_set("test_noisy", texts["test"], args.test, args, synth, test_babble),
    }
    import pyarrow.parquet as pq

    for name in SETS:
        durations = pq.read_table(out / name, columns=["duration"]).column("duration").to_numpy() if counts[name]["utterances"] else np.zeros(0)
        counts[name]["hours"] = round(float(durations.sum()) / 3600, 4)
    summary = {"sets": counts, "text": {"verses": stats.verses, "utterances": stats.pieces,
                                        "dropped_out_of_dictionary": stats.out_of_dictionary},
               "labeled_voices": list(LABELED_VOICES), "test_variants": list(TEST_VARIANTS),
               "unlabeled_variants": list(UNLABELED_VARIANTS), "dialects": list(DIALECTS),
               "train_noises": list(TRAIN_NOISES), "test_noises": list(TEST_NOISES), "test_snrs": list(TEST_SNRS),
               "synthesis_x_real_time": round(synth.audio_seconds / max(synth.seconds, 1e-9), 1),
               "seconds": round(time.perf_counter() - started, 1)}
    partial = out / "corpus.json.partial"
    partial.write_text(json.dumps(summary, indent=1) + "\n")
    os.replace(partial, out / "corpus.json")
    print(json.dumps(summary["sets"]), f"synthesis {summary['synthesis_x_real_time']}x real time")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
