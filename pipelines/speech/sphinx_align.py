"""Forced alignment with the ``pocketsphinx`` wheel's en-us model: per-10 ms-frame senone ids and the
aligned phone sequence of an utterance (16 kHz int16 audio and its transcript).

Two passes, as PocketSphinx 5 documents: ``set_align_text`` and a decode (word alignment), then
``set_alignment`` and a second decode, whose ``get_alignment`` has words, phones and HMM states, each
state named by its senone id. Tries in order, the first that aligns every word wins (``Alignment.mode``):
  pauses   the transcript as given, with ``<sil>`` at the ends and where punctuation made the
           synthesizer pause, no other fillers (``fsgusefiller`` off): on 52 synthesized utterances
           this aligned 47;
  wide     the same with wider beams (1e-80, against the default 1e-48): of 19 held-out-voice
           utterances that the first try failed, this aligned 10;
  fillers  the words under the model's default configuration (optional silence and noise between any
           words): alone it aligned 18 of 32, the word pass mostly ending before the last word or
           finding no path;
  edges    the words with ``<sil>`` at the ends only, no fillers.
An utterance fails (``None``) when no try aligns every word, or when the states do not tile the frames
from 0 without gaps.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

FRAME_RATE = 100  # frames per second (10 ms)
HOP = 160  # samples per frame at 16 kHz


@dataclass
class Alignment:
    senones: np.ndarray  # int32 [frames]
    phones: list[str]  # aligned phone segments in order (SIL included)
    phone_starts: list[int]  # first frame of each phone segment
    words: list[str]  # aligned words (<s>, <sil>, </s> and alternates like and(2) as the decoder names them)
    mode: str  # the try that aligned it: pauses, wide, fillers or edges


def model_dir() -> Path:
    import pocketsphinx

    return Path(pocketsphinx.get_model_path()) / "en-us"


def on_frontend_frames(alignment: Alignment, samples: int) -> Alignment:
    """The alignment re-timed onto softlabels.audio's frontend frames: ``1 + samples // 160``, frame j
    centred on sample 160 j. PocketSphinx's frame t is centred on sample 160 t + 205 (a 25.6 ms window
    from 160 t), so frame j takes PocketSphinx's frame j - 1 (0.3 frame apart at most); the first frame
    repeats PocketSphinx's first, and the frames past its last (its window ran off the end) repeat its
    last, the final silence."""
    frames = 1 + samples // HOP
    source = np.clip(np.arange(frames) - 1, 0, alignment.senones.size - 1)
    starts = [0] + [s + 1 for s in alignment.phone_starts[1:]]
    keep = [i for i, s in enumerate(starts) if s < frames]
    return Alignment(alignment.senones[source], [alignment.phones[i] for i in keep], [starts[i] for i in keep],
                     alignment.words, alignment.mode)


def spoken_words(names) -> list[str]:  # noqa: ANN001 - decoder word names
    """Decoder word names without fillers (<s>, <sil>, </s>, [NOISE] ...) and alternate marks (``and(2)``)."""
    return [n.split("(")[0] for n in names if not n.startswith(("<", "[", "+"))]


class Aligner:
    """PocketSphinx decoders with the model's default configuration (and one without fillers), quiet."""

    def __init__(self) -> None:
        import pocketsphinx

        self.plain = pocketsphinx.Decoder(loglevel="FATAL", fsgusefiller=False)  # only the <sil> given
        self.wide = pocketsphinx.Decoder(loglevel="FATAL", fsgusefiller=False, beam=1e-80, pbeam=1e-80, wbeam=1e-60)
        self.fillers = pocketsphinx.Decoder(loglevel="FATAL")

    def align(self, samples: np.ndarray, transcript: str) -> Alignment | None:
        """The alignment of 16 kHz int16 ``samples`` to ``transcript`` (dictionary spellings, ``<sil>``
        where a pause is expected), or None."""
        pcm = np.ascontiguousarray(samples, dtype=np.int16).tobytes()
        words = " ".join(spoken_words(transcript.split()))
        tries = [(self.plain, transcript, "pauses"), (self.wide, transcript, "wide"), (self.fillers, words, "fillers")]
        edges = f"<sil> {words} <sil>"
        if transcript != edges:
            tries.append((self.plain, edges, "edges"))
        for decoder, text, mode in tries:
            result = self._align(decoder, pcm, text, mode)
            if result is not None:
                return result
        return None

    @staticmethod
    def _align(decoder, pcm: bytes, text: str, mode: str) -> Alignment | None:  # noqa: ANN001
        try:
            decoder.set_align_text(text)
            decoder.start_utt()
            decoder.process_raw(pcm, full_utt=True)
            decoder.end_utt()
            hyp = decoder.hyp()
            words = spoken_words(text.split())
            if hyp is None or spoken_words(hyp.hypstr.split()) != words:
                return None
            decoder.set_alignment()
            decoder.start_utt()
            decoder.process_raw(pcm, full_utt=True)
            decoder.end_utt()
            alignment = decoder.get_alignment()
        except RuntimeError:
            try:  # leave the decoder ready for the next utterance
                decoder.end_utt()
            except RuntimeError:
                pass
            return None
        if alignment is None:
            return None
        senones: list[int] = []
        phones, starts = [], []
        for phone in alignment.phones():
            phones.append(phone.name)
            starts.append(phone.start)
            for state in phone:
                if state.start != len(senones) or state.duration <= 0:
                    return None
                senones.extend([int(state.name)] * state.duration)
        if not senones:
            return None
        names = [w.name for w in alignment.words()]
        if spoken_words(names) != words:
            return None
        return Alignment(np.asarray(senones, np.int32), phones, starts, names, mode)
