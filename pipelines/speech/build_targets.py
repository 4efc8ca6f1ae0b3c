"""Targets stage of the speech pipeline: forced-align the labeled and clean test sets with PocketSphinx
and write them again with per-10 ms-frame senone ids and the aligned phones.

Reads ``CORPUS/<set>/part-*.parquet`` (build_corpus.py) and writes ``OUT/<set>/part-*.parquet`` with the
corpus columns plus ``senones`` (list<int32>, one per frame of softlabels.audio's frontend: 1 + samples //
160, frame j centred on sample 160 j; see sphinx_align.on_frontend_frames), ``phones`` (list<string>, the
aligned phone segments, SIL included), ``phone_starts`` (list<int32>, first frame of each) and
``align_mode`` (the sphinx_align try that aligned it) and ``labels`` (list<int32>, the senone of each
40 ms output frame of the models, ``speech_models.frame_labels``: the column ``generate --label-column``
stores and the metrics score). ``test_real`` (build_real.py's human recordings) is aligned too when
``CORPUS/test_real`` exists (``CORPUS/real.json``, its summary, must then exist too). ``test_noisy`` takes
the targets of its clean utterance (the same samples under the noise). Utterances that fail to align are
dropped; ``OUT/targets.json`` (written last) counts them per set, with the alignment speed and the model's
senone count. A shard that exists is skipped, so an interrupted run resumes.

    python pipelines/speech/build_targets.py --corpus runs/speech/corpus --out runs/speech/targets
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

from build_corpus import features, write_shard  # noqa: E402
from senones import phone_error_rate, read_mdef  # noqa: E402
from kjv_sentences import align_transcript  # noqa: E402
from speech_models import frame_labels  # noqa: E402
from sphinx_align import Aligner, model_dir, on_frontend_frames  # noqa: E402

ALIGNED_SETS = ("labeled", "test_clean")
OPTIONAL_SETS = ("test_real",)  # aligned when the corpus has it (build_real.py needs apt packages)


def target_features():  # noqa: ANN201 - datasets.Features
    import datasets as hf

    out = features()
    out["senones"] = hf.List(hf.Value("int32"))
    out["phones"] = hf.List(hf.Value("string"))
    out["phone_starts"] = hf.List(hf.Value("int32"))
    out["align_mode"] = hf.Value("string")
    out["labels"] = hf.List(hf.Value("int32"))
    return out


def decode(row: dict) -> np.ndarray:
    import soundfile as sf

    samples, rate = sf.read(io.BytesIO(row["audio"]["bytes"]), dtype="int16")
    if rate != 16_000:
        raise ValueError(f"{row['id']}: {rate} Hz audio, the aligner needs 16 kHz")
    return samples


def shards(folder: Path) -> list[Path]:
    return sorted(folder.glob("part-*.parquet"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--corpus", required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    import pyarrow.parquet as pq

    corpus, out = Path(args.corpus), Path(args.out)
    if (out / "targets.json").exists():
        print(f"{out}: targets complete, skipped")
        return 0
    if not (corpus / "corpus.json").exists():
        raise SystemExit(f"{corpus}: no corpus.json (run build_corpus.py first)")
    optional = tuple(name for name in OPTIONAL_SETS if (corpus / name).exists())
    if "test_real" in optional and not (corpus / "real.json").exists():
        raise SystemExit(f"{corpus}/test_real: no {corpus}/real.json, the set is unfinished (run build_real.py again)")
    schema = target_features().arrow_schema
    aligner = Aligner()
    mdef = read_mdef(model_dir() / "en-us" / "mdef")
    counts: dict[str, dict] = {}
    align_seconds = audio_seconds = 0.0
    for name in ALIGNED_SETS + optional:
        kept = dropped = 0
        modes: dict[str, int] = {}
        for shard in shards(corpus / name):
            target = out / name / shard.name
            if target.exists():
                table = pq.read_table(target, columns=["align_mode"])
                kept += table.num_rows
                for mode in table.column("align_mode").to_pylist():
                    modes[mode] = modes.get(mode, 0) + 1
                dropped += pq.read_metadata(shard).num_rows - table.num_rows
                continue
            rows = []
            for row in pq.read_table(shard).to_pylist():
                samples = decode(row)
                start = time.perf_counter()
                alignment = aligner.align(samples, align_transcript(row["text"]))
                align_seconds += time.perf_counter() - start
                audio_seconds += samples.size / 16_000
                if alignment is None:
                    dropped += 1
                    continue
                alignment = on_frontend_frames(alignment, samples.size)
                kept += 1
                modes[alignment.mode] = modes.get(alignment.mode, 0) + 1
                rows.append({**row, "senones": alignment.senones.tolist(), "phones": alignment.phones,
                             "phone_starts": alignment.phone_starts, "align_mode": alignment.mode,
                             "labels": frame_labels(alignment.senones, samples.size).tolist()})
            write_shard(rows, target, schema)
        counts[name] = {"aligned": kept, "dropped": dropped, "modes": modes}
    # test_noisy: each row takes its clean utterance's targets; a row whose clean one was dropped is dropped.
    clean = {}
    for shard in shards(out / "test_clean"):
        for row in pq.read_table(shard, columns=["id", "senones", "phones", "phone_starts", "align_mode", "labels"]).to_pylist():
            clean[row.pop("id")] = row
    kept = dropped = 0
    for shard in shards(corpus / "test_noisy"):
        rows = []
        for row in pq.read_table(shard).to_pylist():
            targets = clean.get(row["id"].rsplit("@", 1)[0])
            if targets is None:
                dropped += 1
                continue
            kept += 1
            rows.append({**row, **targets})
        write_shard(rows, out / "test_noisy" / shard.name, schema)
    counts["test_noisy"] = {"aligned": kept, "dropped": dropped}
    # Sanity: the aligned phones against the senones' own base phones (0 when the map agrees with the aligner).
    sample = pq.read_table(out / "labeled", columns=["phones", "senones"]).slice(0, 200).to_pylist() if counts["labeled"]["aligned"] else []
    summary = {"sets": counts, "senones": mdef.n_sen, "ci_senones": mdef.n_ci_sen, "base_phones": len(mdef.ciphones),
               "senones_shared_across_base_phones": len(mdef.shared),
               "phone_error_rate_of_the_alignment_itself": phone_error_rate(((r["phones"], r["senones"]) for r in sample), mdef),
               "alignment_x_real_time": round(audio_seconds / align_seconds, 1) if align_seconds else None}
    partial = out / ".targets.json.partial"
    partial.write_text(json.dumps(summary, indent=1) + "\n")
    os.replace(partial, out / "targets.json")
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
