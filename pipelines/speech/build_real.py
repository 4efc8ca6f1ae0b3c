"""Real-recordings test set of the speech pipeline: Asterisk's English prompts (Debian's
``asterisk-core-sounds-en-wav``: 568 prompts, 25.5 min, one human speaker, 8 kHz WAV, CC-BY-SA-3.0), with
their transcripts (``asterisk-core-sounds-en``'s ``core-sounds-en.txt[.gz]``: lines ``name: transcript``,
``;`` comments), as ``OUT/part-NNNNN.parquet`` shards of build_corpus.py's schema.

Each ``SOUNDS/<name>.wav`` (any folder depth; ``name`` is its relative path without ``.wav``) with a
transcript line is resampled to 16 kHz with soxr (HQ, float64 in int16 units, rounded and clipped to
int16) and written as a row: id ``real-<name>`` with every character outside ``[A-Za-z0-9_-]`` as ``.``;
engine ``human``, voice ``asterisk``, noise ``none``; book, verse, rate, pitch and snr_db null.
``text`` is the transcript as spoken (build_targets.py hands it to ``kjv_sentences.align_transcript``, so
its punctuation marks the pauses): annotations in ``[...]``, ``(...)`` and ``<...>`` removed (``[this is
a simple beep tone]``, ``dot [.]``), a lone digit spelled (``press 1`` -> ``press one``), ``*`` as
``star`` and ``#`` as ``pound``; ``words`` its lower-case dictionary words. A prompt is dropped, and
counted, when it has no transcript, when nothing spoken is left (``no_speech``), when it holds another
numeral (``numerals``: ``dial 500``, ``3D``, ``H.323`` could be read as a number or digit by digit),
or when a word is not in PocketSphinx's dictionary (``out_of_dictionary``, as build_corpus.py drops
verses), so that alignment failures are acoustic only.

The summary ``real.json`` goes beside OUT (in CORPUS, next to ``corpus.json``; not inside OUT, whose
folder then reads as one Parquet table): prompts found, kept, dropped by reason (with the names), minutes.
It is written last (a temporary name, then renamed); when it exists the stage is skipped. Otherwise every
shard is written again (soxr is deterministic), each under a hidden name and renamed.

    python pipelines/speech/build_real.py --sounds /usr/share/asterisk/sounds/en_US_f_Allison \\
        --transcripts /usr/share/doc/asterisk-core-sounds-en/core-sounds-en.txt.gz --out runs/speech/corpus/test_real
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import re
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from build_corpus import SAMPLE_RATE, dictionary_path, row, write_shard  # noqa: E402
from kjv_sentences import read_dictionary, words_of  # noqa: E402

ANNOTATION = re.compile(r"\[[^\]]*\]|\([^)]*\)|<[^>]*>")
LONE_DIGIT = re.compile(r"(?<![\w.])\d(?![\w.]*\w)")  # "press 1," but not "500", "3D", "28.8", "H.323"
DIGITS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
REASONS = ("no_transcript", "no_speech", "numerals", "out_of_dictionary")


def read_transcripts(path: Path) -> dict[str, str]:
    """{prompt name: transcript} of a ``name: transcript`` file (gzipped when it ends in ``.gz``)."""
    opener = gzip.open if path.suffix == ".gz" else open
    out: dict[str, str] = {}
    try:
        with opener(path, "rt", encoding="utf-8") as handle:
            for number, line in enumerate(handle, 1):
                if not line.strip() or line.startswith(";"):
                    continue
                name, colon, text = line.partition(":")
                if not colon or not name.strip():
                    raise SystemExit(f"{path}:{number}: not a 'name: transcript' line: {line.strip()!r}")
                if name.strip() in out:
                    raise SystemExit(f"{path}:{number}: a second transcript for {name.strip()!r}")
                out[name.strip()] = text.strip()
    except (OSError, UnicodeDecodeError) as error:
        raise SystemExit(f"{path}: cannot read the transcripts ({error})") from None
    return out


def spoken(transcript: str) -> tuple[str, str | None]:
    """(the transcript as spoken, None) or ("", the reason it cannot be: no_speech or numerals)."""
    text = ANNOTATION.sub(" ", transcript).replace("*", " star ").replace("#", " pound ")
    text = LONE_DIGIT.sub(lambda m: DIGITS[int(m.group())], text)
    text = " ".join(text.split())
    if re.search(r"\d", text):
        return "", "numerals"
    return (text, None) if words_of(text) else ("", "no_speech")


def sample_id(name: str) -> str:
    return "real-" + re.sub(r"[^A-Za-z0-9_-]", ".", name)


def to_16k(samples: np.ndarray, rate: int) -> np.ndarray:
    """int16 ``samples`` at ``rate`` as int16 at 16 kHz: soxr HQ on float64 in int16 units, rounded, clipped."""
    import soxr

    out = samples.astype(np.float64)
    if rate != SAMPLE_RATE:
        out = soxr.resample(out, rate, SAMPLE_RATE, quality="HQ")
    return np.clip(np.round(out), -32768, 32767).astype(np.int16)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sounds", required=True, help="folder of the prompt WAVs (searched recursively)")
    parser.add_argument("--transcripts", required=True, help="core-sounds-en.txt or .txt.gz")
    parser.add_argument("--out", required=True, help="the set's folder, CORPUS/test_real")
    parser.add_argument("--shard-rows", type=int, default=500)
    args = parser.parse_args(argv)
    import soundfile as sf

    sounds, out = Path(args.sounds), Path(args.out)
    summary_path = out.parent / "real.json"
    if summary_path.exists():
        print(f"{out}: real recordings complete, skipped")
        return 0
    if args.shard_rows < 1:
        raise SystemExit(f"--shard-rows {args.shard_rows}: must be at least 1")
    if not sounds.is_dir():
        raise SystemExit(f"{sounds}: no such folder of prompt WAVs (apt-get install asterisk-core-sounds-en-wav)")
    transcripts = read_transcripts(Path(args.transcripts))
    names = sorted(p.relative_to(sounds).with_suffix("").as_posix() for p in sounds.rglob("*.wav"))
    if not names:
        raise SystemExit(f"{sounds}: no .wav files")
    ids: dict[str, str] = {}
    for name in names:
        if sample_id(name) in ids:
            raise SystemExit(f"{sounds}: {name}.wav and {ids[sample_id(name)]}.wav would both be {sample_id(name)}")
        ids[sample_id(name)] = name
    started = time.perf_counter()
    dictionary = read_dictionary(dictionary_path())
    dropped: dict[str, list[str]] = {reason: [] for reason in REASONS}
    unknown: set[str] = set()
    rows: list[dict] = []
    found_seconds = 0.0
    for name in names:
        path = sounds / f"{name}.wav"
        try:
            samples, rate = sf.read(path, dtype="int16")
        except (OSError, RuntimeError) as error:  # soundfile raises LibsndfileError (a RuntimeError)
            raise SystemExit(f"{path}: cannot read the WAV ({error})") from None
        if samples.ndim != 1:
            raise SystemExit(f"{path}: {samples.shape[1]} channels, expected mono")
        found_seconds += samples.size / rate
        if name not in transcripts:
            dropped["no_transcript"].append(name)
            continue
        text, reason = spoken(transcripts[name])
        words = words_of(text)
        if reason is None and not all(w in dictionary for w in words):
            reason = "out_of_dictionary"
            unknown.update(w for w in words if w not in dictionary)
        if reason is not None:
            dropped[reason].append(name)
            continue
        audio = to_16k(samples, rate)
        rows.append(row((sample_id(name), None, None, text, " ".join(words)), audio,
                        {"voice": "asterisk", "rate": None, "pitch": None, "noise": "none", "snr_db": None})
                    | {"engine": "human"})
    written = set()
    for first in range(0, len(rows), args.shard_rows):
        path = out / f"part-{first // args.shard_rows:05d}.parquet"
        write_shard(rows[first:first + args.shard_rows], path)
        written.add(path.name)
    for stale in out.glob("part-*.parquet"):  # from an earlier try with another --shard-rows
        if stale.name not in written:
            stale.unlink()
    summary = {"prompts": len(names), "kept": len(rows), "dropped": {r: len(v) for r, v in dropped.items()},
               "minutes_found": round(found_seconds / 60, 2),
               "minutes_kept": round(sum(r["duration"] for r in rows) / 60, 2),
               "transcripts_without_a_recording": sorted(set(transcripts) - set(names)),
               "dropped_names": dropped, "out_of_dictionary_words": sorted(unknown),
               "sample_rate": SAMPLE_RATE, "shards": len(written), "seconds": round(time.perf_counter() - started, 1)}
    summary_path.parent.mkdir(parents=True, exist_ok=True)
    partial = summary_path.with_name("." + summary_path.name + ".partial")
    partial.write_text(json.dumps(summary, indent=1) + "\n")
    os.replace(partial, summary_path)
    print(json.dumps({k: summary[k] for k in ("prompts", "kept", "dropped", "minutes_found", "minutes_kept")}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
