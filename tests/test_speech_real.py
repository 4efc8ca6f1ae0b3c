"""pipelines/speech/build_real.py (issue 22, the real-recordings test set) without the apt packages: a fake
prompt folder of 8 kHz WAVs (espeak-ng speech taken down to 8 kHz, and tones) and a transcripts file,
built into rows of the corpus schema at 16 kHz that equal soxr's resampling of each WAV, the drops
counted by reason, a rerun skipped, and build_targets.py aligning the set when the corpus has it."""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import numpy as np
import pytest

import espeakng_loader  # noqa: F401 - extra [dev]; a missing package fails the suite rather than skipping it
import pocketsphinx  # noqa: F401
import soundfile
import soxr

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "pipelines" / "speech"))

import build_corpus  # noqa: E402
import build_real  # noqa: E402
import build_targets  # noqa: E402
from noise_mix import fit_int16  # noqa: E402

TRANSCRIPTS = """; Core Asterisk Sounds in English (a fake)

press-one: Please press 1 to continue.
sub/thanks: Thank you.  Goodbye.
beep: [this is a simple beep tone]
oov: Press the flurbix key.
demo: Dial 500 now.
no-recording: Nobody recorded this.
"""


def test_spoken_forms():
    assert build_real.spoken("Press 1 for help, or 0.") == ("Press one for help, or zero.", None)
    assert build_real.spoken("press * to pause, press # to enter") == ("press star to pause, press pound to enter", None)
    assert build_real.spoken("dot [.]") == ("dot", None)
    assert build_real.spoken("Leave a message. (simple tone sound plays)") == ("Leave a message.", None)
    for silent in ("[ascending tones]", "<beep ascending>", "(10 seconds of silence)", "..."):
        assert build_real.spoken(silent) == ("", "no_speech")
    for numeral in ("dial 500 now", "3D audio", "H.323", "a 28.8 kilobit modem", "IAX (note) 2x"):
        assert build_real.spoken(numeral) == ("", "numerals"), numeral
    assert build_real.sample_id("dictate/both_help") == "real-dictate.both_help"


@pytest.fixture(scope="module")
def sounds(tmp_path_factory):
    """{name: 8 kHz int16 samples} written as SOUNDS/<name>.wav, and the transcripts file."""
    root = tmp_path_factory.mktemp("real")
    synth = build_corpus.Synthesizer()
    rng = np.random.default_rng(5)
    speech = {name: fit_int16(synth(text, "en-us+m3", 170, 50, rng))[0]
              for name, text in (("press-one", "Please press one to continue."), ("sub/thanks", "Thank you. Goodbye."))}
    tone = (8000 * np.sin(2 * np.pi * 440 * np.arange(2400) / 8000)).astype(np.int16)
    clips = {name: np.round(soxr.resample(s.astype(np.float64), 16_000, 8_000, quality="HQ")).astype(np.int16)
             for name, s in speech.items()}
    clips |= {"beep": tone, "oov": tone[:1200], "demo": tone[:800], "no-text": -tone}
    for name, samples in clips.items():
        (root / "sounds" / name).parent.mkdir(parents=True, exist_ok=True)
        soundfile.write(root / "sounds" / f"{name}.wav", samples, 8000, subtype="PCM_16")
    (root / "core-sounds-en.txt").write_text(TRANSCRIPTS)
    return root, clips


def test_build_real_rows_counts_rerun_and_targets(sounds, tmp_path, capsys):
    import pyarrow.parquet as pq

    root, clips = sounds
    corpus = tmp_path / "corpus"
    argv = ["--sounds", str(root / "sounds"), "--transcripts", str(root / "core-sounds-en.txt"),
            "--out", str(corpus / "test_real"), "--shard-rows", "1"]
    assert build_real.main(argv) == 0
    summary = json.loads((corpus / "real.json").read_text())
    assert (summary["prompts"], summary["kept"]) == (6, 2)
    assert summary["dropped"] == {"no_transcript": 1, "no_speech": 1, "numerals": 1, "out_of_dictionary": 1}
    assert summary["dropped_names"]["no_transcript"] == ["no-text"] and summary["out_of_dictionary_words"] == ["flurbix"]
    assert summary["transcripts_without_a_recording"] == ["no-recording"]
    assert summary["minutes_found"] == pytest.approx(sum(c.size for c in clips.values()) / 8000 / 60, abs=0.005)
    shards = sorted((corpus / "test_real").glob("part-*.parquet"))
    assert [s.name for s in shards] == ["part-00000.parquet", "part-00001.parquet"]
    table = pq.read_table(corpus / "test_real")  # the folder reads as one table: only shards in it
    assert table.schema.remove_metadata() == build_corpus.features().arrow_schema.remove_metadata()
    hf = json.loads(table.schema.metadata[b"huggingface"])["info"]["features"]["audio"]
    assert hf == {"_type": "Audio", "sampling_rate": 16_000}
    rows = {r["id"]: r for r in table.to_pylist()}
    assert sorted(rows) == ["real-press-one", "real-sub.thanks"]
    assert rows["real-press-one"]["text"] == "Please press one to continue."
    assert rows["real-sub.thanks"]["words"] == "thank you goodbye"
    for name in ("press-one", "sub/thanks"):
        row = rows[build_real.sample_id(name)]
        samples, rate = soundfile.read(io.BytesIO(row["audio"]["bytes"]), dtype="int16")
        source, source_rate = soundfile.read(root / "sounds" / f"{name}.wav", dtype="int16")
        assert rate == 16_000 and source_rate == 8_000
        expected = np.clip(np.round(soxr.resample(source.astype(np.float64), 8_000, 16_000, quality="HQ")), -32768, 32767)
        np.testing.assert_array_equal(samples, expected.astype(np.int16))
        assert samples.size == 2 * source.size and row["duration"] == pytest.approx(samples.size / 16_000)
        assert (row["engine"], row["voice"], row["noise"]) == ("human", "asterisk", "none")
        assert row["snr_db"] is row["book"] is row["verse"] is row["rate"] is row["pitch"] is None
    # a rerun is skipped (the summary exists): nothing written again
    stamps = [s.stat().st_mtime_ns for s in shards]
    capsys.readouterr()
    assert build_real.main(argv) == 0
    assert "real recordings complete, skipped" in capsys.readouterr().out
    assert [s.stat().st_mtime_ns for s in shards] == stamps
    # build_targets aligns test_real when the corpus has it (a corpus of test_real alone here)
    (corpus / "corpus.json").write_text("{}\n")
    assert build_targets.main(["--corpus", str(corpus), "--out", str(tmp_path / "targets")]) == 0
    report = json.loads((tmp_path / "targets" / "targets.json").read_text())
    assert report["sets"]["test_real"]["aligned"] + report["sets"]["test_real"]["dropped"] == 2
    assert report["sets"]["test_real"]["aligned"] >= 1  # both, here
    aligned = pq.read_table(tmp_path / "targets" / "test_real").to_pylist()
    for row in aligned:
        assert len(row["senones"]) == 1 + len(soundfile.read(io.BytesIO(row["audio"]["bytes"]))[0]) // 160
        assert row["phones"][0] == row["phones"][-1] == "SIL"
    # test_real without its summary is an unfinished set: refused in one line
    (corpus / "real.json").unlink()
    with pytest.raises(SystemExit, match="real.json, the set is unfinished"):
        build_targets.main(["--corpus", str(corpus), "--out", str(tmp_path / "targets2")])


def test_missing_inputs_are_one_line_errors(tmp_path):
    with pytest.raises(SystemExit, match="no such folder of prompt WAVs"):
        build_real.main(["--sounds", str(tmp_path / "nope"), "--transcripts", "x", "--out", str(tmp_path / "o" / "test_real")])
    (tmp_path / "s").mkdir()
    soundfile.write(tmp_path / "s" / "a.wav", np.zeros(80, np.int16), 8000, subtype="PCM_16")
    (tmp_path / "t.txt").write_text("a: one\nno colon here\n")
    with pytest.raises(SystemExit, match=r"t.txt:2: not a 'name: transcript' line"):
        build_real.main(["--sounds", str(tmp_path / "s"), "--transcripts", str(tmp_path / "t.txt"), "--out", str(tmp_path / "o" / "test_real")])
    with pytest.raises(SystemExit, match="missing.txt: cannot read the transcripts"):
        build_real.main(["--sounds", str(tmp_path / "s"), "--transcripts", str(tmp_path / "missing.txt"), "--out", str(tmp_path / "o" / "test_real")])
